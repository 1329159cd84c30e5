"""The study's rows: the method names in display order and how runs group by (method, lr); shared by the
table (report.py) and the figures (figures.py)."""
from __future__ import annotations

import math
from collections.abc import Iterable

METHODS = ("vanilla", "interleaved", "off-policy", "hint", "error-sft", "reflection")
NO_SFT_METHODS = ("vanilla", "off-policy", "hint")  # methods that never train on the canonical calls


def same_lr(a: float, b: float) -> bool:
    """lrs read back from JSON or config strings differ in the last bits: compare relatively."""
    return math.isclose(float(a), float(b), rel_tol=1e-6, abs_tol=1e-12)


def method_order(method: str) -> tuple[int, str]:
    return (METHODS.index(method), "") if method in METHODS else (len(METHODS), method)


def group_rows(rows: Iterable[dict]) -> dict[tuple[str, float], list[dict]]:
    """Run rows (not the start row) by (method, lr), in display order: METHODS, then lr ascending."""
    groups: dict[tuple[str, float], list[dict]] = {}
    for row in rows:
        if row.get("method") == "start":
            continue
        key = next((k for k in groups if k[0] == row["method"] and same_lr(k[1], row["lr"])),
                   (row["method"], float(row["lr"])))
        groups.setdefault(key, []).append(row)
    return dict(sorted(groups.items(), key=lambda kv: (method_order(kv[0][0]), kv[0][1])))
