"""The study's table, claims and report on synthetic run rows (no training).

Designed grid (main lr 2e-3, 20 steps, 3 seeds): vanilla collapses 3/3; interleaved never collapses and ends
high but loses OOD; reflection ends highest; the lr sweep is not monotone (5e-3 collapses later than 2e-3), so
claims 1, 2, 3 and 5 hold and claim 4 does not.
"""
import copy
import json
import math

import numpy as np
import pytest

from collapse_probe.study.figures import trace_band
from collapse_probe.study.report import check_claims, claims_markdown, method_table, table_markdown, write_report

MAIN_LR, STEPS = 2e-3, 20
START = {"run": "start", "method": "start", "seed": 0, "lr": 0.0, "steps": 0, "success_start": 0.6,
         "success_final": 0.6, "format_ood": {"python_list": 0.9, "json": 0.8},
         "content_ood": {"reworded": 0.7, "renamed_tools": 0.6}}


def _trace(n_steps, start, end, collapse_step):
    steps = list(range(n_steps))
    success = [start if collapse_step is None or s < collapse_step else end for s in steps]
    p_eot = [1e-3 if collapse_step is None or s < collapse_step else 0.9 for s in steps]
    return {"step": steps, "success": success, "p_eot": p_eot}


def _row(method, seed, *, lr=MAIN_LR, collapse_step=None, final, fmt=(0.5, 0.5), content=(0.5, 0.5)):
    trace = _trace(STEPS + 1, 0.6, 0.0, collapse_step)
    return {"run": f"{method}-lr{lr:g}-s{seed}", "method": method, "seed": seed, "lr": lr, "steps": STEPS,
            "collapsed": collapse_step is not None, "collapse_step": collapse_step, "success_start": 0.6,
            "success_final": final, "format_ood": {"python_list": fmt[0], "json": fmt[1]},
            "content_ood": {"reworded": content[0], "renamed_tools": content[1]}, "trace": trace}


def _grid():
    rows = []
    for seed, (cs, final) in enumerate([(5, 0.0), (7, 0.0), (9, 0.1)]):
        rows.append(_row("vanilla", seed, collapse_step=cs, final=final))
    for seed, final in enumerate([0.8, 0.85, 0.9]):
        rows.append(_row("interleaved", seed, final=final, fmt=(0.1, 0.2), content=(0.4, 0.3)))
    for seed, cs in enumerate([6, 8, None]):
        rows.append(_row("off-policy", seed, collapse_step=cs, final=0.2 if cs else 0.6))
    for seed, cs in enumerate([None, 12, None]):
        rows.append(_row("hint", seed, collapse_step=cs, final=0.7, fmt=(0.8, 0.7)))
    for seed in range(3):
        rows.append(_row("error-sft", seed, final=0.75))
        rows.append(_row("reflection", seed, final=0.9))
    for seed, cs in enumerate([15, None, None]):
        rows.append(_row("vanilla", seed, lr=1e-3, collapse_step=cs, final=0.5))
    for seed, cs in enumerate([8, 8, 10]):
        rows.append(_row("vanilla", seed, lr=5e-3, collapse_step=cs, final=0.0))
    # messy traces: one seed logged fewer steps, another has holes (None and NaN)
    rows[2]["trace"] = {k: v[:15] for k, v in rows[2]["trace"].items()}
    rows[0]["trace"]["success"][4] = None
    rows[0]["trace"]["p_eot"][4] = float("nan")
    return rows


def _claims(rows, start=START):
    return check_claims(method_table(rows, main_lr=MAIN_LR), start, main_lr=MAIN_LR, steps=STEPS)


def _holds(rows, start=START):
    return [c["holds"] for c in _claims(rows, start)]


def test_method_table():
    table = method_table(_grid(), main_lr=MAIN_LR)
    keys = [(g["method"], g["lr"]) for g in table]
    assert keys == [("vanilla", 1e-3), ("vanilla", 2e-3), ("vanilla", 5e-3), ("interleaved", 2e-3),
                    ("off-policy", 2e-3), ("hint", 2e-3), ("error-sft", 2e-3), ("reflection", 2e-3)]
    by = {k: g for k, g in zip(keys, table)}
    v = by["vanilla", 2e-3]
    assert (v["collapsed"], v["n"], v["collapse_steps"], v["collapse_step_median"]) == (3, 3, [5, 7, 9], 7)
    assert v["seeds"] == [0, 1, 2] and v["main"] and not by["vanilla", 1e-3]["main"]
    assert v["success_final_mean"] == pytest.approx(0.1 / 3)
    assert v["success_final_sd"] == pytest.approx(np.std([0.0, 0.0, 0.1]))
    h = by["hint", 2e-3]
    assert (h["collapsed"], h["collapse_steps"], h["collapse_step_median"]) == (1, [12], 12)
    assert h["success_final_sd"] == 0.0
    assert by["off-policy", 2e-3]["collapse_step_median"] == 7  # median of [6, 8]
    assert by["reflection", 2e-3]["collapse_step_median"] is None
    i = by["interleaved", 2e-3]
    assert i["format_ood"] == pytest.approx({"python_list": 0.1, "json": 0.2})
    assert i["format_ood_mean"] == pytest.approx(0.15) and i["content_ood_mean"] == pytest.approx(0.35)


def test_ood_keys_may_vary_between_seeds():
    rows = [_row("hint", 0, final=0.5), _row("hint", 1, final=0.7)]
    rows[1]["format_ood"] = {"json": 0.9}  # seed 1 evaluated on one syntax only
    (g,) = method_table(rows, main_lr=MAIN_LR)
    assert g["format_ood"] == pytest.approx({"python_list": 0.5, "json": 0.7})
    assert g["format_ood_mean"] == pytest.approx((0.5 + 0.9) / 2)  # each seed's own mean, then over seeds
    assert g["success_final_sd"] == pytest.approx(0.1)


def test_claims_on_the_designed_grid():
    claims = _claims(_grid())
    assert [c["holds"] for c in claims] == [True, True, True, False, True]
    assert claims[0]["claim"] == "Vanilla RL collapses"
    assert "3/3" in claims[0]["evidence"]
    assert "format-OOD 0.15 vs start 0.85 (-0.70)" in claims[2]["evidence"]
    assert "in-distribution 0.85 vs start 0.60 (+0.25)" in claims[2]["evidence"]
    assert "hint: format-OOD 0.75" in claims[2]["evidence"]  # the reference no-SFT method
    assert "lr 0.001: median 21" in claims[3]["evidence"] and "lr 0.005: median 8" in claims[3]["evidence"]


def test_claims_flip():
    rows = _grid()
    # vanilla collapsing in 1/3 at the main lr: claim 1 fails; 1/3 vs interleaved's 0/3 is still fewer
    few = [r for r in rows if not (r["method"] == "vanilla" and r["lr"] == MAIN_LR)]
    few += [_row("vanilla", 0, collapse_step=5, final=0.0), _row("vanilla", 1, final=0.5),
            _row("vanilla", 2, final=0.5)]
    assert _holds(few)[:2] == [False, True]
    # interleaved ending below vanilla does not stabilise
    low = copy.deepcopy(rows)
    for r in low:
        if r["method"] == "interleaved":
            r["success_final"] = 0.0
    assert _holds(low)[1] is False
    # reflection below interleaved's 0.85; a tie at the top still holds
    for final, want in ((0.8, False), (0.85, True)):
        r = copy.deepcopy(rows)
        for row in r:
            if row["method"] == "reflection":
                row["success_final"] = final
        assert _holds(r)[4] is want
    # sooner collapse at 5e-3 makes claim 4 hold
    sooner = copy.deepcopy(rows)
    for row, cs in zip([r for r in sooner if r["lr"] == 5e-3], [3, 4, 6]):
        row["collapse_step"] = cs
    assert _holds(sooner)[3] is True


def test_ood_cost_rule():
    rows = copy.deepcopy(_grid())
    # OOD keeps up with the start model: no cost
    for r in rows:
        if r["method"] == "interleaved":
            r["format_ood"], r["content_ood"] = {"python_list": 0.88, "json": 0.8}, {"reworded": 0.7}
    assert _holds(rows)[2] is False
    # a format drop smaller than the in-distribution drop does not count either
    start = dict(START, success_final=1.0)
    for r in rows:
        if r["method"] == "interleaved":
            r["format_ood"], r["content_ood"] = {"json": 0.8}, {"reworded": 0.5}
    assert _holds(rows, start)[2] is False  # format -0.05 (>= 0.05) but in-distribution -0.15
    start = dict(START, success_final=0.8)
    for r in rows:
        if r["method"] == "interleaved":
            r["format_ood"] = {"json": 0.6}
    assert _holds(rows, start)[2] is True  # format -0.25 > in-distribution 0.8 - 0.85 = -0.05
    assert _holds(rows, dict(START, format_ood={}))[2] is None


def test_claims_not_checked():
    rows = _grid()
    no_inter = [r for r in rows if r["method"] != "interleaved"]
    claims = _claims(no_inter)
    assert [c["holds"] for c in claims] == [True, None, None, False, True]
    assert "no interleaved runs" in claims[1]["evidence"]
    one_lr = [r for r in rows if r["lr"] == MAIN_LR]
    c4 = _claims(one_lr)[3]
    assert c4["holds"] is None and "1 lr" in c4["evidence"]
    assert _holds([r for r in rows if r["method"] != "reflection"])[4] is None
    assert _holds([r for r in rows if r["method"] != "vanilla"])[:2] == [None, None]


def test_markdown():
    table = method_table(_grid(), main_lr=MAIN_LR)
    md = table_markdown(table, START)
    lines = md.splitlines()
    assert lines[0].startswith("| method | lr | collapsed k/n | collapse step (median; the list) |")
    assert lines[2] == ("| start | — | — | — | 0.60 | 0.85 (python_list 0.90, json 0.80) | "
                        "0.65 (reworded 0.70, renamed_tools 0.60) |")
    assert "| vanilla | 0.002 | 3/3 | 7 (5, 7, 9) | 0.03 ± 0.05 |" in md
    assert "| reflection | 0.002 | 0/3 | — | 0.90 ± 0.00 |" in md
    assert len(lines) == 2 + 1 + len(table)
    cm = claims_markdown(check_claims(table, START, main_lr=MAIN_LR, steps=STEPS))
    assert cm.startswith("## The paper's claims on the embedded world")
    assert "- **holds** — Vanilla RL collapses: vanilla at lr 0.002 collapsed in 3/3 seeds" in cm
    assert "- **does not hold** — Higher lr collapses sooner:" in cm
    no_refl = check_claims(method_table([r for r in _grid() if r["method"] != "reflection"], main_lr=MAIN_LR),
                           START, main_lr=MAIN_LR, steps=STEPS)
    assert "- **not checked** — Process reflection scores best in distribution:" in claims_markdown(no_refl)


def test_trace_band_aligns_and_skips_missing():
    rows = _grid()
    vanilla = [r for r in rows if r["method"] == "vanilla" and r["lr"] == MAIN_LR]
    steps, mean, lo, hi = trace_band(vanilla, "success")
    assert steps.tolist() == list(range(STEPS + 1))
    assert mean[4] == pytest.approx(0.6) and (lo[4], hi[4]) == (0.6, 0.6)  # seed 0 has None at step 4
    assert mean[6] == pytest.approx(0.4) and (lo[6], hi[6]) == (0.0, 0.6)  # seed 0 collapsed at 5
    assert mean[16] == 0.0  # only seeds 0 and 1 logged step 16
    one = trace_band(vanilla[:1], "p_eot")
    assert 4 not in one[0].tolist() and np.array_equal(one[2], one[3])  # NaN skipped; band = line
    assert trace_band([START], "success")[0].size == 0


def test_write_report(tmp_path):
    rows = _grid()
    out = tmp_path / "study"
    payload = write_report(rows, START, out, main_lr=MAIN_LR, steps=STEPS, settings="Settings: synthetic rows.")
    for name in ("table.md", "table.json", "claims.md", "report.md"):
        assert (out / name).stat().st_size > 0
    for stem in ("success", "p_eot", "lr"):
        png = out / f"{stem}.png"
        assert png.read_bytes()[:4] == b"\x89PNG" and png.stat().st_size > 5000
        assert (out / f"{stem}.pdf").read_bytes()[:4] == b"%PDF"
    assert not list(out.glob(".*tmp"))  # no temp files left behind
    (tmp_path / "plain").write_text("")  # the report's files get the mode of any new file (umask), not 0600
    assert (out / "report.md").stat().st_mode == (out / "success.png").stat().st_mode == \
        (tmp_path / "plain").stat().st_mode
    back = json.loads((out / "table.json").read_text())
    assert back == payload and set(back) == {"table", "start", "claims", "rows"}
    assert [c["holds"] for c in back["claims"]] == [True, True, True, False, True]
    assert back["table"][1]["collapse_steps"] == [5, 7, 9] and back["start"] == START
    assert back["rows"][0]["trace"]["p_eot"][4] is None  # NaN written as null: strict JSON
    assert math.isclose(back["rows"][0]["lr"], MAIN_LR)
    report = (out / "report.md").read_text()
    assert report.startswith("# The supervisory-signal study\n\nSettings: synthetic rows.\n")
    for img in ("methods.png", "success.png", "p_eot.png", "lr.png"):
        assert f"]({img})" in report
    assert report.index("| method |") < report.index("](success.png)") < report.index("## The paper's claims")
    assert (out / "table.md").read_text() in report and (out / "claims.md").read_text() in report


def test_one_lr_one_seed_no_lr_figure(tmp_path):
    rows = [_row("vanilla", 0, collapse_step=5, final=0.0), _row("reflection", 0, final=0.9)]
    rows[1].pop("trace")
    paths = write_report(rows, None, tmp_path, main_lr=MAIN_LR, steps=STEPS, settings="x")["claims"]
    assert [c["holds"] for c in paths] == [True, None, None, None, True]
    assert (tmp_path / "success.png").exists() and not (tmp_path / "lr.png").exists()
    assert "](lr.png)" not in (tmp_path / "report.md").read_text()
