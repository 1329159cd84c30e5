"""A real pretrained model in the tool world: load it, check it speaks the world's ChatML, say what it is.

The tool world renders ChatML itself (world/chat.py) with the Hermes tags as plain text, so a ChatML model
needs no new tokens: on SmolLM2 `<tool_call>` is 5 ordinary pieces and `<|im_end|>` one token, and
`tokens.resolve_control_tokens` resolves the tags as those sequences. The reference trainer takes such a
directory as `--init` unchanged (train.tiny.load_pretrained is the one loader).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from collapse_probe.errors import UserError
from collapse_probe.models import check_chat_tokens
from collapse_probe.tokens import ControlTokens, resolve_control_tokens
from collapse_probe.train.tiny import load_pretrained


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
