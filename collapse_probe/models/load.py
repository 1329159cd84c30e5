"""Weights in: the one loader of a local checkpoint (our tiny model or any HF causal LM), with every check it
needs, and the tool world's ChatML check. Safetensors only, never a pickle, never the network, remote code off
unless asked; every way a load fails is one UserError line."""
from __future__ import annotations

from contextlib import contextmanager
import os
from pathlib import Path
from typing import Any, Iterator

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from collapse_probe.errors import UserError
from collapse_probe.models.weights import check_weights
from collapse_probe.tokens import ControlTokens, resolve_control_tokens
from collapse_probe.world import IM_END, IM_START


@contextmanager
def quiet_transformers(*, keep_bars: bool = False) -> Iterator[None]:
    """transformers' load reports off, and its progress bars unless `keep_bars` (our own bars say what is
    happening; a GGUF's de-quantisation bar is kept: it is the long part)."""
    from transformers.utils import logging as hf_logging

    bars, verbosity = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    if not keep_bars:
        hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def checkpoint_dir(path: str | os.PathLike) -> Path:
    """`path` when it is a directory written by save_pretrained (config.json, safetensors weights whose headers
    check out), else one UserError line; a run directory gets a hint naming its newest `checkpoint-N/`."""
    p = Path(path)
    if not p.is_dir():
        raise UserError(f"{path}: {'not a directory' if p.exists() else 'no such directory'}; pass a checkpoint "
                        "directory (e.g. RUN/checkpoint-N/)")
    found = sorted((c for c in p.glob("checkpoint-*") if (c / "config.json").is_file()),
                   key=lambda c: (len(c.name), c.name))
    hint = f" (this looks like a run directory: try {found[-1]})" if found else ""
    if not (p / "config.json").is_file() or (found and not any(p.glob("*.safetensors"))):
        what = "no config.json" if not (p / "config.json").is_file() else "no *.safetensors weights"
        raise UserError(f"{path}: no model here ({what}){hint}; pass a directory written by "
                        "save_pretrained (e.g. a run's checkpoint-N/)")
    check_weights(p)  # missing, cut or lying weight files: refused from their headers, before torch reads them
    return p


def load_tokenizer(path: str | Path, *, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """A tokenizer from a local directory or the local hub cache (never the network); any failure is one
    UserError line."""
    try:
        with quiet_transformers():
            return AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code,
                                                 local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - OSError, ValueError, tokenizers' own errors on bad files, ...
        if not Path(path).exists():
            raise UserError(f"{path}: no such directory, and no such model in the local Hugging Face cache "
                            "(nothing is downloaded): pass a local directory holding tokenizer files") from None
        first = (str(exc).strip().splitlines() or [""])[0][:160]
        raise UserError(f"{path}: could not load a tokenizer ({type(exc).__name__}: {first}); pass a local "
                        "directory holding tokenizer files (hub names work only when already cached)") from None


def load_pretrained(path: str | Path, *, trust_remote_code: bool = False):
    """Load (model, tokenizer) from a local directory (or a hub name already in the local cache): safetensors only,
    never a pickle, never the network. Every way a load can fail (no or cut weight files, a lying header,
    missing tensors, bad tokenizer files) is one UserError line. `trust_remote_code` stays off unless asked."""
    path = str(path)
    p = Path(path)
    hint = "pass a directory with config.json, model.safetensors and tokenizer files (e.g. a run's checkpoint-N/)"
    if p.exists():
        checkpoint_dir(p)
    tokenizer = load_tokenizer(path, trust_remote_code=trust_remote_code)
    try:
        with quiet_transformers():  # its load report and bars would break the one-line error
            model, info = AutoModelForCausalLM.from_pretrained(
                path, use_safetensors=True, trust_remote_code=trust_remote_code, dtype=torch.float32,
                local_files_only=True, output_loading_info=True)
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - SafetensorError, torch errors on cut files, OSError, ValueError, ...
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise UserError(f"{path}: could not load a model and tokenizer ({type(exc).__name__}: {first}); the files "
                        f"may be truncated, corrupt or still being written: {hint}") from None
    missing = [k for k in info.get("missing_keys", ()) if k not in getattr(model, "_tied_weights_keys", ()) or ()]
    if missing:
        raise UserError(f"{path}: the weights lack {len(missing)} tensor(s) (first: {missing[0]}); the checkpoint is "
                        f"incomplete: {hint}")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return model, tokenizer


def check_chat_tokens(tokenizer: Any, where: str | os.PathLike) -> None:
    """The tool world speaks ChatML: `<|im_start|>` and `<|im_end|>` must each be one token."""
    vocab = tokenizer.get_vocab()
    for tag in (IM_END, IM_START):
        ids = tokenizer.encode(tag, add_special_tokens=False)
        if tag not in vocab or len(ids) != 1:
            raise UserError(f"{where}: its tokenizer has no {tag} token (it splits into {len(ids)} pieces); the tool "
                            "world speaks ChatML, so use a ChatML model (e.g. smollm2-135m)")


def load_chat_model(path: str | Path) -> tuple[Any, Any, ControlTokens]:
    """(model, tokenizer, roles) of a local HF directory the tool world can use, else one UserError line: no
    weights, unreadable files, no ChatML `<|im_end|>`/`<|im_start|>`, or no tool-call tag at all."""
    model, tok = load_pretrained(path)
    check_chat_tokens(tok, path)
    roles = resolve_control_tokens(tok)
    if "tool_open" not in roles.ids:
        raise UserError(f"{path}: no tool-call tag resolves for its tokenizer "
                        f"({roles.unresolved.get('tool_open', 'not resolved')})")
    return model, tok, roles


def describe(path: str | Path) -> dict[str, Any]:
    """What `models check PATH` prints: architecture, size, vocabulary, and each control role's pieces."""
    model, tok, roles = load_chat_model(path)
    cfg = model.config
    return {
        "path": str(path), "architecture": type(model).__name__,
        "parameters": sum(p.numel() for p in model.parameters()),
        "layers": getattr(cfg, "num_hidden_layers", None), "hidden": getattr(cfg, "hidden_size", None),
        "vocab": getattr(cfg, "vocab_size", None), "roles": roles.to_dict(tok),
    }
