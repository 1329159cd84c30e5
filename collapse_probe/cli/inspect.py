"""`formats`, `tokens`, `export`: look at what a run or a tokenizer holds (registered by app.py)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from collapse_probe.cli.output import JSON_HELP, err, out, print_json, show_path
from collapse_probe.errors import UserError


# ----------------------------------------------------------------------------------------------- formats
def formats(
    path: Path = typer.Argument(..., help="JSONL of turns, our rollouts/, TRL completions/*.parquet or verl rollout dumps."),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
    syntax: str = typer.Option("hermes", "--format", help="Tool-call syntax: hermes (alias canonical), "
                               "renamed_tags, json, python_list, xml, markdown, llama3, mistral."),
    known_tools: Optional[str] = typer.Option(None, help="Comma-separated tool names; others count as unknown_tool."),
    step_bins: Optional[int] = typer.Option(None, help="Also break the counts into this many step ranges."),
) -> None:
    """Classify every assistant turn: healthy tool call / healthy response / text pollution / full collapse."""
    from collapse_probe.formats.registry import get_syntax
    from collapse_probe.runs.rollout_files import load_turns
    from collapse_probe.runs.turn_summary import render_summary, summarise_turns

    if step_bins is not None and step_bins < 1:
        raise UserError(f"--step-bins {step_bins} must be 1 or more (the number of step ranges)")
    tools = frozenset(t.strip() for t in known_tools.split(",") if t.strip()) if known_tools else None
    spec = get_syntax(syntax).spec(tools)  # UserError naming every format for an unknown one
    turns = load_turns(path, spec)
    summary = summarise_turns(turns, spec, step_bins=step_bins)
    if as_json:
        print_json(summary)
    else:
        out.print(render_summary(summary))


# ----------------------------------------------------------------------------------------------- tokens
def tokens(
    model: str = typer.Argument(..., help="A local model/tokenizer directory (or a hub name already in the local "
                                          "cache; nothing is downloaded)."),
    token: list[str] = typer.Option([], "--token", help="Override a role: ROLE=STRING (repeatable)."),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Show which control tokens collapse-probe tracks for a tokenizer, and which it could not resolve."""
    from collapse_probe.models.weights import require_local_tokenizer

    require_local_tokenizer(model)  # in milliseconds, before transformers is imported
    from collapse_probe.tokens import parse_token_overrides, resolve_control_tokens
    from collapse_probe.models.load import load_tokenizer

    overrides = parse_token_overrides(token)
    tok = load_tokenizer(model)  # local files only: never the network
    ct = resolve_control_tokens(tok, overrides)
    # each role's pieces too: a tag of several tokens (SmolLM2's `<tool_call>`) shows all of them
    if as_json:
        print_json(ct.to_dict(tok))
    else:
        out.print(ct.report(tok), markup=False, highlight=False, soft_wrap=True)


# ----------------------------------------------------------------------------------------------- export
def export(run_dir: Path = typer.Argument(..., help="Run dir or metrics JSONL."),
           out_path: Path = typer.Argument(..., help="OUT.parquet or OUT.csv"),
           as_json: bool = typer.Option(False, "--json", help=JSON_HELP)) -> None:
    """Export a run's metrics to Parquet or CSV for pandas users."""
    from collapse_probe.runs.timeline import Timeline

    tl = Timeline.from_run(run_dir)
    path = tl.export(out_path)
    if as_json:
        print_json({"path": str(path), "steps": len(tl), "keys": len(tl.keys())})
    else:
        err.print(f"wrote {show_path(path)}", highlight=False)
