"""A model's local files checked before torch or transformers is imported: where they are, and the safetensors
headers.

The header is 8 bytes of length, then that many bytes of JSON naming each tensor's dtype, shape and byte range.
A cut file, garbage, or a header that lies about its size or ranges is refused here as one UserError line, in
milliseconds; `train.tiny.load_pretrained` still turns anything the real loader finds into a UserError too.
Nothing is ever unpickled: other weight formats are not loaded at all.
"""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path

from collapse_probe.errors import UserError

__all__ = ["check_weights", "require_local_tokenizer"]

MAX_HEADER = 100 << 20  # safetensors' own limit
_ITEM = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
         "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}
_HINT = "the checkpoint may be truncated, corrupt or still being written: re-save it or pass another one"


def _check_file(f: Path) -> None:
    size = f.stat().st_size
    with open(f, "rb") as fh:
        raw = fh.read(8)
        if len(raw) < 8:
            raise UserError(f"{f}: not a safetensors file (only {size} bytes); {_HINT}")
        n = struct.unpack("<Q", raw)[0]
        if n > MAX_HEADER or 8 + n > size:
            raise UserError(f"{f}: its header claims {n} bytes but the file has {size}; {_HINT}")
        try:
            head = json.loads(fh.read(n))
        except (ValueError, RecursionError):
            raise UserError(f"{f}: its header is not JSON; {_HINT}") from None
    if not isinstance(head, dict):
        raise UserError(f"{f}: its header is not a JSON object; {_HINT}")
    data = size - 8 - n
    for name, t in head.items():
        if name == "__metadata__":
            continue
        try:
            start, end = (int(x) for x in t["data_offsets"])
            count = 1
            for d in t["shape"]:
                count *= int(d)
            width = _ITEM.get(t["dtype"])
        except (KeyError, TypeError, ValueError):
            raise UserError(f"{f}: tensor {name!r} has a malformed header entry; {_HINT}") from None
        if not 0 <= start <= end <= data or (width is not None and end - start != count * width):
            raise UserError(f"{f}: tensor {name!r} claims bytes {start}..{end} of {data}; {_HINT}")


def check_weights(model_dir: str | os.PathLike) -> None:
    """Refuse a directory whose *.safetensors files are missing, cut short or lie in their headers."""
    d = Path(model_dir)
    files = sorted(d.glob("*.safetensors"))
    if not files:
        raise UserError(f"{d}: no *.safetensors weights (other formats are never unpickled); pass a directory "
                        "written by save_pretrained")
    for f in files:
        try:
            _check_file(f)
        except OSError as e:
            raise UserError(f"{f}: cannot read ({e.strerror}); check the path and its permissions") from None


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def require_local_tokenizer(name: str) -> None:
    """Refuse at once a tokenizer that is neither a local directory with tokenizer files nor a hub name already in
    the local Hugging Face cache: nothing is ever downloaded, and importing transformers to find out takes seconds."""
    p = Path(name)
    if p.is_dir():
        if not any((p / f).is_file() for f in _TOKENIZER_FILES):
            raise UserError(f"{name}: no tokenizer files here ({', '.join(_TOKENIZER_FILES)}); pass a directory "
                            "written by save_pretrained")
        return
    if p.exists():
        raise UserError(f"{name} is a file: pass a directory holding tokenizer files")
    cache = Path(os.environ.get("HF_HUB_CACHE") or Path(os.environ.get("HF_HOME") or
                                                        Path.home() / ".cache" / "huggingface") / "hub")
    if name.count("/") != 1 or not (cache / f"models--{name.replace('/', '--')}").is_dir():
        raise UserError(f"{name}: no such directory, and no such model in the local Hugging Face cache "
                        "(nothing is downloaded): pass a local directory holding tokenizer files")
