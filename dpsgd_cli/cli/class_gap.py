"""`dpsgd class-gap DP_RUN TWIN_RUN`: per-class accuracy lost to privacy."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from dpsgd_cli.cli.app import app, console, user_errors
from dpsgd_cli.cli.tables import print_table


@app.command("class-gap")
@user_errors
def class_gap(
    dp_run: Annotated[Path, typer.Argument(help="A private run directory.")],
    twin_run: Annotated[Path, typer.Argument(help="Its non-private twin (privacy.enabled: false).")],
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Also draw the bars to this PNG.")] = None,
) -> None:
    """Per-class test accuracy of a DP run next to its non-private twin: which classes pay for privacy."""
    from dpsgd_cli.runs.class_gap import class_gaps

    gaps, dp, twin = class_gaps(dp_run, twin_run)
    table = Table(title=f"{dp.name} vs {twin.name} (last epochs)")
    for column in ("class", "non-private", "DP", "lost (points)"):
        table.add_column(column, justify="left" if column == "class" else "right")
    for g in gaps:
        table.add_row(f"{g.label} {g.name}", f"{g.nonprivate:.4f}", f"{g.private:.4f}", f"{100 * g.loss:.2f}")
    print_table(table, console)
    if out is not None:
        from dpsgd_cli.runs.class_gap import gap_figure
        from dpsgd_cli.runs.plots import save_figure

        save_figure(gap_figure(gaps), out)
        console.print(f"wrote {out}", highlight=False)
