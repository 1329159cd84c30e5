"""Task sources for forensics on the user's own checkpoint: BFCL v4 multi-turn categories from the installed
`bfcl-eval` package, or the user's JSONL file. A layer beside world/ and formats/: it imports only errors,
formats and the standard library (and bfcl_eval's data, constants, environment classes and pure checkers).

    open_source("bfcl:multi_turn_base")   -> TaskSource (200 ToolTasks, each with its BFCL environment)
    open_source("my_tasks.jsonl")         -> TaskSource (tasks/jsonl.py documents the schema)
"""

from __future__ import annotations

from collapse_probe.tasks.base import (SPLITS, Call, Environment, GoldCalls, TaskSource, ToolTask, TurnCheck,
                                       match_count, same_call)

__all__ = ["open_source", "TaskSource", "ToolTask", "Environment", "GoldCalls", "TurnCheck", "Call", "SPLITS",
           "match_count", "same_call", "BFCL_SPECS"]

BFCL_SPECS = ("bfcl:multi_turn_base", "bfcl:multi_turn_miss_param", "bfcl:multi_turn_miss_func")


def open_source(spec: str) -> TaskSource:
    """`bfcl:CATEGORY` or a JSONL path -> TaskSource; every problem is one UserError line."""
    spec = str(spec).strip()
    if spec.startswith("bfcl:"):
        from collapse_probe.tasks.bfcl import load_bfcl

        return load_bfcl(spec)
    from collapse_probe.tasks.jsonl import load_jsonl

    return load_jsonl(spec)
