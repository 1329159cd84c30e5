"""Greedy evaluation of one tool-call format: is the turn well-formed, is the content right, did it succeed.

Three numbers, kept apart on purpose (a collapse is a format failure; a lost skill is a content failure):

    validity          fraction of assistant turns well-formed in the format's syntax
    content_accuracy  fraction of the oracle chain the model got right: each call is compared with the call
                      the oracle would make given the observations so far (a wrong call is a miss and the
                      oracle step stays due, so a retry can still match), plus one item per episode for a
                      correct final answer; the denominator is (chain length + 1) per episode
    success           episode success (the world's own check of the final answer)

The environment executes calls with the format's own parser. Two diagnostics come with them:
`content_accuracy_any_syntax` (the same count when a call written in any syntax of the grid is read: the content
of a model that ignores the requested syntax) and `canonical_turn_frac` (turns that are hermes `<tool_call>`
calls whatever was asked).
"""

from __future__ import annotations

from typing import Sequence

from collapse_probe import world
from collapse_probe.formats.registry import HERMES
from collapse_probe.recover.grid import FORMATS, GridFormat, get_format
from collapse_probe.train.rollout import LogitsProcessor, rollout


def any_syntax_parse(fmt: GridFormat, text: str) -> list[dict]:
    """Calls in `fmt`'s syntax, else in the first other syntax of the grid that reads the turn cleanly."""
    for parser in [fmt] + [f for f in FORMATS.values() if f.kind == "syntax" and f.name != fmt.name]:
        calls, error = parser.parse(text)
        if calls and error is None:
            return calls
    return []


def _match(fmt: GridFormat, calls: list[dict], oracle: list, k: int) -> tuple[int, int]:
    """Walk `calls` against the oracle chain from step k; returns (matched, new k)."""
    matched = 0
    for call in calls:
        canon = fmt.to_canonical(call)
        if k < len(oracle) and canon is not None and canon[0] == oracle[k][0] and canon[1] == oracle[k][1]:
            matched += 1
            k += 1
    return matched, k


def score_episode(fmt: GridFormat, task: world.Task, turns: Sequence[str], success: bool) -> dict[str, int]:
    """Counts for one episode: valid turns, matched oracle steps, attempted calls, correct answer; and the same
    content count when calls written in any syntax of the grid are read (`matched_any_syntax`), plus how many
    turns were well-formed canonical calls (`canonical_turns`: a model ignoring the syntax it was asked for)."""
    oracle = [(name, args) for name, args, _ in task.oracle_calls()]
    canonical = FORMATS[HERMES]
    k = k_any = matched = matched_any = attempted = valid = canonical_turns = 0
    for text in turns:
        valid += bool(fmt.validity(text))
        calls, error = canonical.parse(text)
        canonical_turns += bool(calls) and error is None
        got, k_any = _match(fmt, any_syntax_parse(fmt, text), oracle, k_any)
        matched_any += got
        calls, error = fmt.parse(text)
        if error is not None:
            continue
        attempted += len(calls)
        got, k = _match(fmt, calls, oracle, k)
        matched += got
    return {"turns": len(turns), "valid_turns": valid, "oracle_steps": len(oracle), "matched_calls": matched,
            "attempted_calls": attempted, "answer_correct": int(bool(success)), "matched_any_syntax": matched_any,
            "canonical_turns": canonical_turns}


def max_new_tokens_for(fmt: GridFormat, tok, *, floor: int = 40, n_tasks: int = 8) -> int:
    """Room for the longest oracle turn of this format with this tokenizer (x1.5), at least `floor`."""
    longest = 0
    for task in world.task_split("format_probe", n_tasks):
        for turn in fmt.oracle_turns(task):
            longest = max(longest, len(tok.encode(turn, add_special_tokens=False)))
    return max(floor, int(longest * 1.5) + 8)


def evaluate_format(model, tok, fmt: GridFormat | str, *, n: int = 32, max_turns: int = 8,
                    max_new_tokens: int | None = None, logits_processor: LogitsProcessor | None = None,
                    offset: int = 0, keep_turns: int = 0) -> dict:
    """Greedy rollouts of `n` held-out tasks posed in format `fmt`; returns validity, content_accuracy, success
    and the counts behind them. `keep_turns` > 0 also returns that many conversations' turns as examples."""
    fmt = get_format(fmt)
    tasks = [fmt.prepare(t) for t in world.task_split("eval", n, offset=offset)]
    if max_new_tokens is None:
        max_new_tokens = max_new_tokens_for(fmt, tok)
    trajs = rollout(model, tok, tasks, group_size=1, max_turns=max_turns, max_new_tokens=max_new_tokens,
                    greedy=True, system=fmt.system_prompt(), parse=fmt.parse, logits_processor=logits_processor)
    tot: dict[str, int] = {}
    for t in trajs:
        for key, v in score_episode(fmt, t.task, t.episode.turns, t.success).items():
            tot[key] = tot.get(key, 0) + v
    n_eps = max(len(trajs), 1)
    items = tot.get("oracle_steps", 0) + len(trajs)
    out = {
        "format": fmt.name,
        "validity": tot.get("valid_turns", 0) / max(tot.get("turns", 0), 1),
        "content_accuracy": (tot.get("matched_calls", 0) + tot.get("answer_correct", 0)) / max(items, 1),
        "success": sum(t.success for t in trajs) / n_eps,
        "call_accuracy": tot.get("matched_calls", 0) / max(tot.get("oracle_steps", 0), 1),
        "content_accuracy_any_syntax": (tot.get("matched_any_syntax", 0) + tot.get("answer_correct", 0))
        / max(items, 1),
        "canonical_turn_frac": tot.get("canonical_turns", 0) / max(tot.get("turns", 0), 1),
        "call_precision": (tot["matched_calls"] / tot["attempted_calls"]) if tot.get("attempted_calls") else None,
        "calls_per_episode": tot.get("attempted_calls", 0) / n_eps,
        "turns_per_episode": tot.get("turns", 0) / n_eps,
        "n": len(trajs),
    }
    if keep_turns:
        out["examples"] = [list(t.episode.turns) for t in trajs[:keep_turns]]
    return out


def format_spread(results: dict[str, dict], key: str = "content_accuracy") -> float:
    """Best minus worst `key` across formats (FormatSpread's spread); 0.0 for fewer than one format."""
    vals = [r[key] for r in results.values() if isinstance(r.get(key), (int, float))]
    return (max(vals) - min(vals)) if vals else 0.0
