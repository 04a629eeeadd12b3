"""`dpsgd export RUN_DIR DEST`: copy a finished run for publication, without what its ε does not cover."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from dpsgd_cli.cli.app import app, console, user_errors


@app.command()
@user_errors
def export(
    run_dir: Annotated[Path, typer.Argument(help="A finished run directory.")],
    dest: Annotated[Path, typer.Argument(help="A new (or empty) folder for the publishable copy.")],
    allow_reproducible: Annotated[bool, typer.Option(
        help="Export a run trained with privacy.reproducible: true (its seed regenerates the noise)."),
    ] = False,
) -> None:
    """Copy a finished run for publication: run.yaml, metrics.csv without train_loss/train_accuracy, the
    weights, plots and audit.json. Never run.key, the checkpoint or the canaries."""
    from dpsgd_cli.runs.export import export_run

    written = export_run(run_dir, dest, allow_reproducible=allow_reproducible)
    console.print(f"exported {len(written)} files to {dest}: {', '.join(p.name for p in written)}",
                  highlight=False, markup=False, soft_wrap=True)
