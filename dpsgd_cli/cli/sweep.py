"""`dpsgd sweep`, `dpsgd plot`, `dpsgd report`: grids of runs, their figures, and a comparison table."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

from dpsgd_cli.cli.app import app, console, err_console, user_errors
from dpsgd_cli.cli.tables import print_table
from dpsgd_cli.cli.train import ConfigOption, SetOption, _progress, step_and_epoch_printers
from dpsgd_cli.errors import ConfigError

PathsArgument = Annotated[list[Path], typer.Argument(
    help="Run directories (holding run.yaml) or sweep directories (holding runs).", show_default=False)]

if TYPE_CHECKING:
    from dpsgd_cli.experiment.sweep import PlannedRun, SweepPlan
    from dpsgd_cli.runs.summaries import RunInfo


def _sweeps():
    """`dpsgd_cli.experiment.sweep`, imported when a command needs it (not for every `dpsgd` command)."""
    from dpsgd_cli.experiment import sweep

    return sweep


def _summaries():
    """The `dpsgd_cli.runs.summaries` module, imported when a command needs it."""
    from dpsgd_cli.runs import summaries as run_summaries

    return run_summaries


@app.command()
@user_errors
def sweep(
    config: ConfigOption = None,
    grid: Annotated[list[str] | None, typer.Option(
        "--grid", help="KEY=V1,V2,... to sweep, e.g. --grid privacy.noise_multiplier=1.1,1.2 (repeatable; "
                       "the cartesian product of all --grid options is run).")] = None,
    overrides: SetOption = None,
    epochs: Annotated[int | None, typer.Option(help="Shortcut for --set training.epochs=E.")] = None,
    name: Annotated[str | None, typer.Option(
        help="Sweep name: runs go to <output_dir>/<name>/<run>/ (default: the config's name).")] = None,
    overwrite: Annotated[bool, typer.Option(help="Re-train runs that already finished.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Show the runs and their state; train nothing.")]
    = False,
    list_runs: Annotated[bool, typer.Option(
        "--list", help="Print the planned runs, one per line: index, name, state (tab-separated); train "
                       "nothing. The index is what --index takes.")] = False,
    index: Annotated[int | None, typer.Option(
        "--index", metavar="K", help="Train grid point K only (0-based, in --list order), e.g. "
        "$SLURM_ARRAY_TASK_ID or $JOB_COMPLETION_INDEX; does not rewrite summary.csv (see --summary-only).")]
    = None,
    summary_only: Annotated[bool, typer.Option(
        "--summary-only", help="Rebuild summary.csv from the finished runs in the sweep directory; train "
                               "nothing (the last job of a cluster sweep).")] = False,
    quiet: Annotated[bool, typer.Option(help="No progress bar.")] = False,
) -> None:
    """Run every combination of the --grid values as its own run; skip runs that already finished.

    Each run goes to results/<sweep>/<run>/, named after its grid values (e.g. noise_multiplier=1.1);
    results/<sweep>/summary.csv gets one row per finished run in the sweep directory. On a cluster: one
    job per point with --index K, then one job with --summary-only."""
    modes = [flag for flag, on in (("--list", list_runs), ("--summary-only", summary_only),
                                    ("--index", index is not None)) if on]
    if len(modes) > 1:
        raise ConfigError(f"{' and '.join(modes)} exclude each other: --list shows the points, --index K "
                          "trains one, --summary-only rebuilds summary.csv")
    sweeps = _sweeps()
    items = list(overrides or []) + ([f"training.epochs={epochs}"] if epochs is not None else [])
    plan = sweeps.plan_sweep(config, items, grid or [], name)
    if list_runs:
        for i, planned in enumerate(plan.runs):
            typer.echo(f"{i}\t{planned.name}\t{planned.state}")  # plain text for scripts (rich expands tabs)
        return
    if summary_only:
        console.print(f"wrote {sweeps.summarize(plan)}", highlight=False, markup=False)
        return
    if index is not None:
        plan = plan.only(index)
    console.print(f"[bold]sweep {plan.name}[/]: {_plan_counts(plan, overwrite)}", highlight=False)
    if dry_run:
        print_table(_plan_table(plan, overwrite), console)
        return
    outcome = sweeps.run_sweep(plan, overwrite=overwrite, summary=index is None, **_callbacks(quiet))
    if outcome.summary_path is not None:
        runs, keys = _summaries().load_runs([plan.sweep_dir], plan.keys)
        print_table(report_table(runs, keys), console)
        console.print(f"wrote {outcome.summary_path}", highlight=False)
    if outcome.failed:
        for planned, message in outcome.failed:
            err_console.print(f"[bold red]failed:[/] {planned.name}: {message}", highlight=False)
        raise typer.Exit(1)


def _plan_counts(plan: SweepPlan, overwrite: bool) -> str:
    """'4 runs in results/x/: 3 already finished, 1 to train' (plus runs whose config changed)."""
    n = len(plan.runs)
    finished = sum(r.state == _summaries().FINISHED for r in plan.runs)
    changed = sum(r.state == "changed" for r in plan.runs)
    todo = n - finished - changed if not overwrite else n
    runs = f"{n} run" + ("s" if n != 1 else "")
    text = f"{runs} in {plan.sweep_dir}/: {finished} already finished, {todo} to train"
    if changed and not overwrite:
        text += f", {changed} finished with another config"
    return text


def _callbacks(quiet: bool) -> dict[str, Any]:
    """Progress callbacks for run_sweep: a header per run, a step bar, one line per epoch and per run."""
    progress = _progress(quiet)
    task = progress.add_task("", total=None, info="")
    current: dict[str, Any] = {}

    def on_run_start(index: int, total: int, planned: PlannedRun) -> None:
        current.update(planned=planned, label=f"[{index}/{total}] {planned.name}")
        console.print(f"[bold]{current['label']}[/]: {planned.state} run", highlight=False)
        progress.reset(task, total=None, description=planned.name, info="")
        progress.start()

    on_step, on_epoch = step_and_epoch_printers(
        progress, task, lambda: (current["planned"].name, current["planned"].cfg.training.epochs))

    def on_run_end(index: int, total: int, planned: PlannedRun, result: Any) -> None:
        progress.stop()
        records = getattr(result, "records", None)
        if isinstance(result, Exception):
            err_console.print(f"{current['label']}: [bold red]failed[/]: {result}", highlight=False)
        elif records:
            last = records[-1]
            console.print(f"{current['label']}: done, test accuracy {last['test_accuracy']:.4f}"
                          f"{_eps_text(last['epsilon_pld'], last['epsilon_rdp'])}, {last['elapsed_s']:.0f} s",
                          highlight=False)

    return {"on_run_start": on_run_start, "on_run_end": on_run_end, "on_step": on_step, "on_epoch": on_epoch}


def _eps_text(pld: float, rdp: float) -> str:
    return f", ε {pld:.3g} (PLD) / {rdp:.3g} (RDP)" if math.isfinite(pld) else ", non-private"


def _plan_table(plan: SweepPlan, overwrite: bool) -> Table:
    summaries = _summaries()
    table = Table(title=f"sweep {plan.name}")
    table.add_column("run")
    for key in plan.keys:
        table.add_column(summaries.short_name(key), justify="right")
    table.add_column("state → action")
    for planned in plan.runs:
        table.add_row(planned.name, *(summaries.value_text(v) for _, v in planned.assignment),
                      _plan_action(planned, overwrite))
    return table


def _plan_action(planned: PlannedRun, overwrite: bool) -> str:
    if planned.state == _summaries().FINISHED:
        return "finished → re-train" if overwrite else "finished → skip"
    if planned.state == "changed":
        what = f"finished with another config ({'; '.join(planned.differences)})"
        return f"{what} → re-train" if overwrite else f"{what} → [red]error[/] (needs --overwrite)"
    return {"new": "new → train", "unfinished": "unfinished → replace"}.get(planned.state, planned.state)


@app.command()
@user_errors
def report(paths: PathsArgument) -> None:
    """Compare runs in a table: final and best test accuracy, ε (PLD and RDP), epochs, wall time.

    Columns name only the settings that differ between the runs; the title names the shared ones."""
    runs, keys = _summaries().load_runs(paths)
    print_table(report_table(runs, keys), console)
    for note in _summaries().report_notes(runs):
        console.print(f"note: {note}", highlight=False, markup=False, soft_wrap=True)


RESULT_COLUMNS = ("σ", "epochs", "final acc", "best acc (epoch)", "ε PLD", "ε RDP", "δ", "time", "status")


def report_table(runs: list[RunInfo], keys: list[str]) -> Table:
    """One row per run: its values of the varied keys, σ, epochs, accuracies, ε, wall time (and δ and
    status when they matter). The title names what all runs share."""
    summaries = _summaries()
    title = summaries.shared_title(runs, keys) if runs else "no runs"
    deltas = {run.settings.get("privacy.delta") for run in runs if run.private}
    distinct = {tuple(summaries.value_text(r.settings.get(k)) for k in keys) for r in runs}
    show = {
        "run": not keys or len(distinct) < len(runs),
        "σ": "privacy.noise_multiplier" not in keys,
        "δ": len(deltas) > 1,
        "status": any(run.status != summaries.FINISHED for run in runs),
    }
    if len(deltas) == 1:
        title += f", δ = {summaries.value_text(next(iter(deltas)))}"
    table = Table(title=title)
    if show["run"]:
        table.add_column("run")
    columns = [c for c in RESULT_COLUMNS if show.get(c, True)]
    for key in keys:
        short = summaries.short_name(key)
        table.add_column(key if short in columns else short, justify="right")
    for column in columns:
        table.add_column(column, justify="left" if column == "status" else "right", no_wrap=True)
    for run in runs:
        row = summaries.summary_row(run, keys)
        cells = [run.name] if show["run"] else []
        cells += [summaries.value_text(row[k]) for k in keys]
        values = _result_cells(row, run)
        table.add_row(*cells, *(values[c] for c in columns))
    return table


def _result_cells(row: dict[str, Any], run: RunInfo) -> dict[str, str]:
    cells = {"σ": f"{row['noise_multiplier']:.4g}" if run.private else "—", "δ": _num(row["delta"]),
             "status": run.status if run.status == _summaries().FINISHED else f"[yellow]{run.status}[/]"}
    if math.isnan(row["epochs"]):
        return {**dict.fromkeys(RESULT_COLUMNS, "—"), **cells}
    private = run.private and math.isfinite(row["epsilon_pld"])
    return {**cells, "epochs": str(row["epochs"]), "final acc": f"{row['final_test_accuracy']:.4f}",
            "best acc (epoch)": f"{row['best_test_accuracy']:.4f} ({row['best_epoch']})",
            "ε PLD": f"{row['epsilon_pld']:.3f}" if private else "∞",
            "ε RDP": f"{row['epsilon_rdp']:.3f}" if private else "∞",
            "time": format_duration(row["wall_time_s"])}


def _num(value: float) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4g}"


def format_duration(seconds: float) -> str:
    """12.3 → '12 s', 754 → '12m 34s', 7384 → '2h 03m'."""
    if math.isnan(seconds):
        return "—"
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60}m {seconds % 60:02d}s"
    return f"{seconds // 3600}h {seconds % 3600 // 60:02d}m"


@app.command()
@user_errors
def plot(
    paths: PathsArgument,
    out: Annotated[Path | None, typer.Option(
        "--out", "-o", help="PNG for the accuracy and ε curves (default: curves.png in the directory "
                            "given, or in the one holding all of them). The per-class bar chart goes "
                            "next to it as <name>-per-class.png.")] = None,
    per_class: Annotated[bool, typer.Option(help="Also draw per-class test accuracy bars.")] = True,
) -> None:
    """Draw test accuracy and ε per epoch, one line per run, per-class accuracy bars, and (for private
    runs) test accuracy against PLD ε with the best published results marked, as <name>-tradeoff.png."""
    from dpsgd_cli.runs.plots import plot_runs  # matplotlib is imported only now

    written, drawn = plot_runs(paths, out, per_class)
    for run in drawn:
        if run.status != _summaries().FINISHED:
            console.print(f"note: {run.run_dir} is {run.status} (drawn up to epoch "
                          f"{int(run.metrics['epoch'].iloc[-1])})", highlight=False)
    for path in written:
        console.print(f"wrote {path}", highlight=False)
