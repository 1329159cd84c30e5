"""The format-state mix of many turns, per group and per step range (`collapse-probe formats`), and its table."""
from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterable

from collapse_probe.formats.classify import FormatSpec, StateMix, classify_turn
from collapse_probe.formats.reasons import EMPTY_AT
from collapse_probe.runs.rollout_files import as_step, group_name
from collapse_probe.schema import STATES, FormatState, Position


def summarise_turns(turns: Iterable[dict], spec: FormatSpec | None = None, *,
                    step_bins: int | None = None) -> dict:
    """Counts per group: ``{"groups": {GROUP: {"turns", <4 states>, "reasons": {code: n}, "empty": {where: n}}}}``
    (``empty``: empty turns by where they are empty, the `formats.reasons.EMPTY_AT` positions). With ``step_bins``
    and at least one turn with a step, also ``"step_ranges": [{"first_step", "last_step", "groups": {...}}]``:
    the step span cut into ``step_bins`` equal integer ranges (fewer when the span is shorter)."""
    spec = spec or FormatSpec()
    rows = [(group_name(t.get("group")), as_step(t.get("step")), classify_turn(t.get("text", ""), spec, t.get("user")))
            for t in turns]
    groups: dict[str, StateMix] = {}
    for g, _, v in rows:
        groups.setdefault(g, StateMix()).add(v)
    out: dict = {"groups": {g: _mix_dict(groups[g]) for g in sorted(groups)}}
    steps = [s for _, s, _ in rows if s is not None]
    if step_bins and step_bins > 0 and steps:
        lo, hi = min(steps), max(steps)
        k = min(step_bins, hi - lo + 1)
        edges = [lo + round(i * (hi - lo + 1) / k) for i in range(k + 1)]
        bins: list[dict[str, StateMix]] = [{} for _ in range(k)]
        for g, s, v in rows:
            if s is not None:
                bins[min(k - 1, bisect_right(edges, s) - 1)].setdefault(g, StateMix()).add(v)
        out["step_ranges"] = [{"first_step": edges[i], "last_step": edges[i + 1] - 1,
                               "groups": {g: _mix_dict(b[g]) for g in sorted(b)}} for i, b in enumerate(bins)]
    return out


def _mix_dict(mix: StateMix) -> dict:
    """A mix's summary plus its empty turns by position: an empty turn start and a bare call tag are different
    failures (the model never started vs it started a call and stopped)."""
    return {**mix.to_dict(), "empty": {where.value: mix.reasons.get(code, 0) for code, where in EMPTY_AT.items()}}


_LABELS = {FormatState.HEALTHY_TOOL_CALL.value: "tool call", FormatState.HEALTHY_RESPONSE.value: "answer",
           FormatState.TEXT_POLLUTION.value: "pollution", FormatState.FULL_COLLAPSE.value: "collapse"}
_EMPTY_LABELS = {Position.TURN_START.value: "start", Position.AFTER_OPEN.value: "tag"}  # where a turn is empty


def render_summary(summary: dict, top_reasons: int = 3):
    """One rich Table: a row per group, then a row per step range and group when the summary has ranges."""
    from rich.table import Table

    table = Table(title="Assistant-turn format states",
                  caption="empty start/tag: empty turns at turn start / right after the call tag")
    table.add_column("group", overflow="fold", min_width=10)
    table.add_column("steps", no_wrap=True)
    table.add_column("turns", justify="right")
    for s in STATES:
        table.add_column(_LABELS[s], justify="right")
    table.add_column("empty\nstart/tag", no_wrap=True)  # empty at a turn start / right after the call tag
    table.add_column("top reasons", overflow="fold")

    def row(group: str, steps: str, d: dict) -> None:
        n = d.get("turns", 0)
        pct = [f"{100 * d.get(s, 0) / n:.0f}%" if n else "-" for s in STATES]
        if n and d.get(FormatState.FULL_COLLAPSE.value, 0) / n >= 0.5:
            pct[3] = f"[bold red]{pct[3]}[/]"
        where = d.get("empty", {})
        empty = "/".join(str(where.get(w, 0)) for w in _EMPTY_LABELS) if any(where.values()) else "-"
        reasons = ", ".join(f"{r} {c}" for r, c in list(d.get("reasons", {}).items())[:top_reasons])
        table.add_row(group, steps, str(n), *pct, empty, reasons)

    for g, d in summary.get("groups", {}).items():
        row(g, "all", d)
    for rng in summary.get("step_ranges", []):
        for g, d in rng["groups"].items():
            row(g, f"{rng['first_step']}-{rng['last_step']}", d)
    return table
