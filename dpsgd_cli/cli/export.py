"""`dpsgd export RUN_DIR DEST`: copy a finished run for publication, without what its ε does not cover."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from dpsgd_cli.cli.app import app, console, err_console, user_errors


@app.command()
@user_errors
def export(
    run_dir: Annotated[Path, typer.Argument(help="A finished run directory.")],
    dest: Annotated[Path, typer.Argument(help="A new (or empty) folder for the publishable copy.")],
    allow_reproducible: Annotated[bool, typer.Option(
        help="Export a run trained with privacy.reproducible: true (its seed regenerates the noise)."),
    ] = False,
    include_private: Annotated[bool, typer.Option(
        help="Also copy audit.json, the full metrics.csv and the run directory's PNG/CSV files, which ε "
             "does not cover; the exported run.yaml then says so."),
    ] = False,
) -> None:
    """Copy a finished run for publication, with only what its ε covers: run.yaml, the weights, metrics.csv
    with the covered columns (test metrics, ε, settings) and figures drawn from them. Never audit.json,
    train metrics, timings, run.key, the checkpoint or the canaries (see --include-private)."""
    from dpsgd_cli.runs.export import export_run

    written = export_run(run_dir, dest, allow_reproducible=allow_reproducible,
                         include_private=include_private)
    console.print(f"exported {len(written)} files to {dest}: {', '.join(p.name for p in written)}",
                  highlight=False, markup=False, soft_wrap=True)
    if include_private:
        err_console.print("warning: exported with --include-private: the copy holds files not covered by "
                          "the run's (ε, δ) (listed in its run.yaml under export.not_covered)",
                          highlight=False, markup=False, soft_wrap=True)
