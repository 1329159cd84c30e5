"""The study's per-method table, the check of the paper's five claims, and the written report.

Input: one row per finished run (grid.py), grouped by (method, lr), plus one `start` row (the start model
evaluated before any RL). The claims are checked by these rules, on the groups at the main lr unless said:

1. "Vanilla RL collapses": vanilla collapsed in a majority of its seeds, k > n/2.
2. "Interleaved SFT+RL stabilises": interleaved collapsed in a smaller fraction of its seeds than vanilla
   (k/n; the same as fewer seeds when both have the same seeds) AND its mean final success is higher.
3. "Interleaved SFT costs format-OOD and content-OOD performance": interleaved's format-OOD mean and
   content-OOD mean are each at least 0.05 below the start model's, AND its format-OOD loss relative to the
   start (start - interleaved) exceeds its in-distribution loss (start.success_final - interleaved's mean final
   success). The evidence also names, for reference, the best method that does no canonical SFT (vanilla,
   off-policy, hint; best = highest mean final success) among those not collapsing in a majority of seeds;
   it does not enter the verdict.
4. "Higher lr collapses sooner": vanilla at >= 2 lrs (all lrs, not only the main one); per lr the median over
   seeds of the collapse step, a run that did not collapse counting as steps + 1 (censored). Holds if the
   median is non-increasing in lr and strictly lower at the highest lr than at the lowest.
5. "Process reflection scores best in distribution": reflection's mean final success is the highest of all
   methods (not the start row); a tie holds, as long as no other method is strictly higher.

A claim is None (not checked) when the grid lacks what its rule needs (a method, the start row's OOD scores,
a second lr, another method to compare with); the evidence says which.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import statistics
from collections.abc import Iterable, Sequence
from pathlib import Path

from collapse_probe.schema import finite_or_none
from collapse_probe.study.figures import plot_study
from collapse_probe.study.rows import NO_SFT_METHODS, group_rows, same_lr

__all__ = ["check_claims", "claims_markdown", "method_table", "table_markdown", "write_atomic", "write_report"]

OOD_MARGIN = 0.05  # claim 3: the smallest drop below the start model that counts as a cost
_EPS = 1e-9  # float slack on the comparisons of the rules (0.90 - 0.85 must count as 0.05)


def _num(x) -> float | None:
    """A finite float, or None for a missing / NaN value (rows may carry either)."""
    return finite_or_none(x)


def _mean(values: Iterable) -> float | None:
    vals = [v for v in map(_num, values) if v is not None]
    return statistics.fmean(vals) if vals else None


def _per_key_means(dicts: Sequence[dict]) -> dict[str, float]:
    """Mean over seeds of each key; keys may vary between runs, so each key averages the seeds that have it."""
    keys = list(dict.fromkeys(k for d in dicts for k in d))
    means = {k: _mean(d.get(k) for d in dicts) for k in keys}
    return {k: v for k, v in means.items() if v is not None}


def method_table(rows: Iterable[dict], *, main_lr: float) -> list[dict]:
    """One dict per (method, lr) group, in display order (see group_rows). `main_lr` marks the main groups."""
    table = []
    for (method, lr), group in group_rows(rows).items():
        group = sorted(group, key=lambda r: (r.get("seed") is None, r.get("seed") or 0))
        finals = [v for v in (_num(r.get("success_final")) for r in group) if v is not None]
        steps = sorted(int(r["collapse_step"]) for r in group if r.get("collapsed") and r.get("collapse_step")
                       is not None)
        fmt = [r.get("format_ood") or {} for r in group]
        content = [r.get("content_ood") or {} for r in group]
        table.append({
            "method": method, "lr": lr, "main": same_lr(lr, main_lr), "n": len(group),
            "collapsed": sum(bool(r.get("collapsed")) for r in group),
            "collapse_steps": steps, "collapse_step_median": statistics.median(steps) if steps else None,
            "success_final_mean": statistics.fmean(finals) if finals else None,
            "success_final_sd": statistics.pstdev(finals) if finals else None,
            # per seed the mean over its syntaxes first, so a seed evaluated on fewer syntaxes weighs the same
            "format_ood_mean": _mean(_mean(d.values()) for d in fmt), "format_ood": _per_key_means(fmt),
            "content_ood_mean": _mean(_mean(d.values()) for d in content), "content_ood": _per_key_means(content),
            "seeds": [r.get("seed") for r in group],
        })
    return table


def _f(x: float | None) -> str:
    return "—" if x is None else f"{x:.2f}"


def _lr(lr: float) -> str:
    return f"{lr:g}"


def _find(table: Sequence[dict], method: str, lr: float) -> dict | None:
    return next((g for g in table if g["method"] == method and same_lr(g["lr"], lr)), None)


def _claim(claim: str, holds: bool | None, evidence: str) -> dict:
    return {"claim": claim, "holds": holds, "evidence": evidence}


def _collapses(table, main_lr) -> dict:
    name = "Vanilla RL collapses"
    v = _find(table, "vanilla", main_lr)
    if v is None:
        return _claim(name, None, f"no vanilla runs at lr {_lr(main_lr)}")
    return _claim(name, v["collapsed"] > v["n"] / 2,
                  f"vanilla at lr {_lr(main_lr)} collapsed in {v['collapsed']}/{v['n']} seeds "
                  f"(rule: k > n/2 = {v['n'] / 2:g})")


def _stabilises(table, main_lr) -> dict:
    name = "Interleaved SFT+RL stabilises"
    v, i = _find(table, "vanilla", main_lr), _find(table, "interleaved", main_lr)
    missing = [m for m, g in (("vanilla", v), ("interleaved", i)) if g is None]
    if missing:
        return _claim(name, None, f"no {' or '.join(missing)} runs at lr {_lr(main_lr)}")
    if v["success_final_mean"] is None or i["success_final_mean"] is None:
        return _claim(name, None, "a final success is missing")
    fewer = i["collapsed"] / i["n"] < v["collapsed"] / v["n"] - _EPS
    higher = i["success_final_mean"] > v["success_final_mean"] + _EPS
    return _claim(name, fewer and higher,
                  f"collapsed interleaved {i['collapsed']}/{i['n']} vs vanilla {v['collapsed']}/{v['n']} "
                  f"({'fewer' if fewer else 'not fewer'}); final success interleaved {_f(i['success_final_mean'])} "
                  f"vs vanilla {_f(v['success_final_mean'])} ({'higher' if higher else 'not higher'}); "
                  "rule: fewer collapses (k/n) and higher mean final success")


def _start_ood(start: dict | None, key: str) -> float | None:
    return None if start is None else _mean((start.get(key) or {}).values())


def _ood_cost(table, start, main_lr) -> dict:
    name = "Interleaved SFT costs format-OOD and content-OOD performance"
    i = _find(table, "interleaved", main_lr)
    if i is None:
        return _claim(name, None, f"no interleaved runs at lr {_lr(main_lr)}")
    s_fmt, s_con = _start_ood(start, "format_ood"), _start_ood(start, "content_ood")
    s_in = None if start is None else _num(start.get("success_final"))
    need = [("the start row's format-OOD", s_fmt), ("the start row's content-OOD", s_con),
            ("the start row's final success", s_in), ("interleaved's format-OOD", i["format_ood_mean"]),
            ("interleaved's content-OOD", i["content_ood_mean"]), ("interleaved's final success",
                                                                    i["success_final_mean"])]
    missing = [label for label, x in need if x is None]
    if missing:
        return _claim(name, None, "missing: " + ", ".join(missing))
    d_fmt, d_con, d_in = s_fmt - i["format_ood_mean"], s_con - i["content_ood_mean"], s_in - i["success_final_mean"]
    holds = d_fmt >= OOD_MARGIN - _EPS and d_con >= OOD_MARGIN - _EPS and d_fmt > d_in + _EPS
    evidence = (f"format-OOD {_f(i['format_ood_mean'])} vs start {_f(s_fmt)} ({-d_fmt:+.2f}); "
                f"content-OOD {_f(i['content_ood_mean'])} vs start {_f(s_con)} ({-d_con:+.2f}); "
                f"in-distribution {_f(i['success_final_mean'])} vs start {_f(s_in)} ({-d_in:+.2f}); "
                f"rule: both OOD drops >= {OOD_MARGIN:.2f} and the format-OOD drop > the in-distribution drop")
    ref = [g for g in table if g["method"] in NO_SFT_METHODS and same_lr(g["lr"], main_lr)
           and g["collapsed"] <= g["n"] / 2 and g["success_final_mean"] is not None]
    if ref:
        best = max(ref, key=lambda g: g["success_final_mean"])
        evidence += (f"; for reference, the best no-SFT method not collapsing in a majority, {best['method']}: "
                     f"format-OOD {_f(best['format_ood_mean'])}, content-OOD {_f(best['content_ood_mean'])}, "
                     f"final success {_f(best['success_final_mean'])}")
    else:
        evidence += "; no no-SFT method (vanilla, off-policy, hint) avoided collapse in a majority of seeds"
    return _claim(name, holds, evidence)


def _lr_sooner(table, steps) -> dict:
    name = "Higher lr collapses sooner"
    groups = [g for g in table if g["method"] == "vanilla"]  # ascending lr (table order)
    if len(groups) < 2:
        return _claim(name, None, f"vanilla was run at {len(groups)} lr; the rule needs >= 2")
    # a run that did not collapse within `steps` counts as collapsing at steps + 1 (censored)
    medians = [statistics.median(g["collapse_steps"] + [steps + 1] * (g["n"] - len(g["collapse_steps"])))
               for g in groups]
    monotone = all(b <= a + _EPS for a, b in itertools.pairwise(medians))
    holds = monotone and medians[-1] < medians[0] - _EPS
    per_lr = "; ".join(f"lr {_lr(g['lr'])}: median {m:g} ({g['collapsed']}/{g['n']} collapsed)"
                       for g, m in zip(groups, medians))
    return _claim(name, holds, f"{per_lr}; rule: median collapse step (no collapse = {steps + 1}) "
                  "non-increasing in lr and lower at the highest lr than at the lowest")


def _reflection_best(table, main_lr) -> dict:
    name = "Process reflection scores best in distribution"
    main = [g for g in table if same_lr(g["lr"], main_lr) and g["success_final_mean"] is not None]
    r = next((g for g in main if g["method"] == "reflection"), None)
    others = [g for g in main if g["method"] != "reflection"]
    if r is None or not others:
        return _claim(name, None, f"no {'reflection' if r is None else 'other method'} with a final success "
                      f"at lr {_lr(main_lr)}")
    top = max(others, key=lambda g: g["success_final_mean"])
    holds = top["success_final_mean"] <= r["success_final_mean"] + _EPS
    return _claim(name, holds, f"final success reflection {_f(r['success_final_mean'])} vs the best other, "
                  f"{top['method']} {_f(top['success_final_mean'])}; rule: no other method strictly higher")


def check_claims(table: Sequence[dict], start: dict | None, *, main_lr: float, steps: int) -> list[dict]:
    """The five claims in order, each {"claim", "holds": bool | None, "evidence"}; rules in the module doc."""
    return [_collapses(table, main_lr), _stabilises(table, main_lr), _ood_cost(table, start, main_lr),
            _lr_sooner(table, steps), _reflection_best(table, main_lr)]


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _per_key(mean: float | None, d: dict) -> str:
    if mean is None:
        return "—"
    if not d:
        return f"{mean:.2f}"
    return f"{mean:.2f} (" + ", ".join(f"{k} {v:.2f}" for k, v in d.items()) + ")"


def table_markdown(table: Sequence[dict], start: dict | None) -> str:
    """The per-method table; the start row first. OOD cells: the mean, then each syntax / kind."""
    head = ["method", "lr", "collapsed k/n", "collapse step (median; the list)", "final success (mean ± sd)",
            "format-OOD (per syntax)", "content-OOD (per kind)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    if start is not None:
        fmt, con = start.get("format_ood") or {}, start.get("content_ood") or {}
        cells = ["start", "—", "—", "—", _f(_num(start.get("success_final"))),
                 _per_key(_mean(fmt.values()), {k: v for k, v in fmt.items() if _num(v) is not None}),
                 _per_key(_mean(con.values()), {k: v for k, v in con.items() if _num(v) is not None})]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    for g in table:
        med = g["collapse_step_median"]
        step = "—" if med is None else f"{med:g} ({', '.join(map(str, g['collapse_steps']))})"
        final = "—" if g["success_final_mean"] is None else \
            f"{g['success_final_mean']:.2f} ± {g['success_final_sd']:.2f}"
        cells = [g["method"], _lr(g["lr"]), f"{g['collapsed']}/{g['n']}", step, final,
                 _per_key(g["format_ood_mean"], g["format_ood"]), _per_key(g["content_ood_mean"], g["content_ood"])]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def claims_markdown(claims: Sequence[dict]) -> str:
    verdicts = {True: "**holds**", False: "**does not hold**", None: "**not checked**"}
    lines = ["## The paper's claims on the embedded world", ""]
    lines += [f"- {verdicts[c['holds']]} — {c['claim']}: {c['evidence']}" for c in claims]
    return "\n".join(lines) + "\n"


def _finite(obj):
    """NaN / inf become None: the JSON stays strict (json.dumps would write the non-standard NaN)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def write_atomic(path: Path, text: str) -> None:
    """Temp file in the same directory, then os.replace: a killed process never leaves a half-written file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # plain open(): the umask sets the mode
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


_FIGURE_CAPTIONS = {"methods": "Per method (columns): sampled success (top) and on-policy p(end-of-turn) right after "
                               "the tool-call opener (bottom) per RL step; line: mean over seeds, band: min to max, "
                               "dashed: vanilla's mean",
                    "success": "Sampled success per RL step (mean over seeds; band: min to max)",
                    "p_eot": "On-policy p(end-of-turn) right after the tool-call opener per RL step",
                    "lr": "Vanilla RL at each lr: sampled success per RL step"}


def write_report(rows: Sequence[dict], start: dict | None, out_dir: Path | str, *, main_lr: float, steps: int,
                 settings: str) -> dict:
    """Write table.md, table.json, claims.md, report.md and the figures into `out_dir`; return table.json's
    content. report.md is written last, so its presence means the whole report is there."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = method_table(rows, main_lr=main_lr)
    claims = check_claims(table, start, main_lr=main_lr, steps=steps)
    figures = plot_study(rows, out, main_lr=main_lr)
    payload = _finite({"table": table, "start": start, "claims": claims, "rows": list(rows)})
    table_md, claims_md = table_markdown(table, start), claims_markdown(claims)
    write_atomic(out / "table.md", table_md)
    write_atomic(out / "claims.md", claims_md)
    write_atomic(out / "table.json", json.dumps(payload, indent=1, allow_nan=False) + "\n")
    images = "\n\n".join(f"![{_FIGURE_CAPTIONS.get(p.stem, p.stem)}]({p.name})" for p in figures)
    report = f"# The supervisory-signal study\n\n{settings.strip()}\n\n{table_md}\n{images}\n\n{claims_md}"
    write_atomic(out / "report.md", report)
    return payload
