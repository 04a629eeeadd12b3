"""`dpsgd train`: run one experiment from a YAML config, with a progress bar and a summary table.

`--resume RUN_DIR` continues an unfinished run from its last checkpoint, with the config recorded in
RUN_DIR/run.yaml. Ctrl-C (or SIGTERM) stops a run after keeping what is finished and prints how to resume.
"""

from __future__ import annotations

import math
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

from dpsgd_cli.cli.app import app, console, err_console, user_errors
from dpsgd_cli.cli.tables import print_table
from dpsgd_cli.errors import ConfigError

if TYPE_CHECKING:
    from rich.progress import Progress

    from dpsgd_cli.config import ExperimentConfig

ConfigOption = Annotated[Path | None, typer.Option("--config", "-c", help="Experiment YAML file.")]
SetOption = Annotated[list[str] | None, typer.Option(
    "--set", help="Override a config key, e.g. --set privacy.noise_multiplier=1.3 (repeatable).")]


def config_with_shortcuts(config: Path | None, overrides: list[str] | None,
                          **shortcuts: Any) -> ExperimentConfig:
    """Load `config`, applying `--set` overrides then shortcut options (dotted key → value, None = unset)."""
    items = list(overrides or [])
    items += [f"{key}={value}" for key, value in shortcuts.items() if value is not None]
    from dpsgd_cli.config import load_config

    return load_config(config, items)


@app.command()
@user_errors
def train(
    config: ConfigOption = None,
    overrides: SetOption = None,
    sigma: Annotated[float | None, typer.Option(
        "--sigma", help="Shortcut for --set privacy.noise_multiplier=S.")] = None,
    epochs: Annotated[int | None, typer.Option(help="Shortcut for --set training.epochs=E.")] = None,
    name: Annotated[str | None, typer.Option(help="Run name (directory under output_dir).")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing run directory.")] = False,
    resume: Annotated[Path | None, typer.Option(
        "--resume", metavar="RUN_DIR", help="Continue the unfinished run in RUN_DIR from its last "
        "checkpoint, with the config in RUN_DIR/run.yaml (no --config/--set, except --set distribute.*: "
        "a run may resume on other devices).")] = None,
    quiet: Annotated[bool, typer.Option(help="No progress bar.")] = False,
) -> None:
    """Train a CNN with DP-SGD; write results/<name>/metrics.csv (one row per epoch) and run.yaml."""
    if resume is not None:
        # where it runs may change on resume (distribute.*: the mechanism and ε do not depend on it)
        moves = [o for o in overrides or [] if o.strip().startswith("distribute.")]
        others = [o for o in overrides or [] if o not in moves] or None
        given = {"--config": config, "--set": others, "--sigma": sigma, "--epochs": epochs, "--name": name}
        cfg = _resume_config(resume, [flag for flag, value in given.items() if value is not None], overwrite)
        if moves:
            from dpsgd_cli.config import with_overrides

            cfg = with_overrides(cfg, moves)
    else:
        cfg = config_with_shortcuts(config, overrides, **{
            "privacy.noise_multiplier": sigma, "training.epochs": epochs, "name": name})
    from dpsgd_cli.experiment.run import RunInterrupted, run  # TensorFlow only once training starts
    from dpsgd_cli.runs.run_dir import inspect_run_dir

    console.print(_header(cfg), highlight=False)
    if resume is not None:
        saved = inspect_run_dir(cfg.run_dir)
        console.print(f"resuming {cfg.run_dir} after {saved.progress if saved else 'epoch 0'} "
                      f"(config from its run.yaml)", highlight=False, markup=False, soft_wrap=True)
    with _progress(quiet) as progress, _sigterm_as_interrupt():
        task = progress.add_task("training", total=None, info="")
        state: dict[str, Any] = {"eps": ""}

        def on_step(s: dict[str, Any]) -> None:
            progress.update(task, total=s["steps_in_epoch"], completed=s["step_in_epoch"],
                            description=f"epoch {s['epoch']}/{cfg.training.epochs}",
                            info=f"loss {s['train_loss']:.3f} acc {s['train_accuracy']:.3f}{state['eps']}")

        def on_epoch(r: dict[str, Any]) -> None:
            if math.isfinite(r["epsilon_pld"]):
                state["eps"] = f" ε {r['epsilon_pld']:.3g}"
            progress.console.print(_epoch_line(r), highlight=False)

        try:
            result = run(cfg, on_step=on_step, on_epoch=on_epoch, overwrite=overwrite,
                         resume=resume is not None)
        except RunInterrupted as stop:
            progress.stop()
            err_console.print(f"interrupted: {stop.epochs_done} of {stop.epochs} epochs are saved in "
                              f"{stop.run_dir}; continue with: dpsgd train --resume {stop.run_dir}",
                              highlight=False, markup=False, soft_wrap=True)
            raise typer.Exit(130) from None
    print_table(summary_table(result.records[-1], result.noise_multiplier), console)
    console.print(result.statement, highlight=False, markup=False)
    console.print(f"wrote {result.run_dir / 'metrics.csv'} and {result.run_dir / 'run.yaml'}",
                  highlight=False, markup=False)


def _resume_config(run_dir: Path, config_flags: list[str], overwrite: bool) -> ExperimentConfig:
    """The recorded config of `run_dir`; a resumed run cannot change it (that would change its ε)."""
    if config_flags:
        raise ConfigError(f"--resume continues the run exactly as recorded in {run_dir / 'run.yaml'} (a "
                          f"different config would change what it trains and its ε); drop "
                          f"{', '.join(config_flags)}")
    from dpsgd_cli.runs.run_dir import check_run_dir, resume_config  # no TensorFlow

    check_run_dir(run_dir, overwrite=overwrite, resume=True)
    return resume_config(run_dir)


def _header(cfg: ExperimentConfig) -> str:
    return (f"[bold]{cfg.name}[/]: {cfg.data.dataset}, {cfg.training.epochs} epochs, "
            f"batch {cfg.data.batch_size} ({cfg.data.sampling}), "
            + (f"σ {cfg.privacy.noise_multiplier}, C {cfg.privacy.l2_norm_clip}" if cfg.privacy.enabled
               else "non-private"))


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """Treat SIGTERM (a batch scheduler's or `kill`'s stop) like Ctrl-C, so the run stops cleanly."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _progress(quiet: bool) -> Progress:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[info]}"), TimeElapsedColumn(), console=console,
                    disable=quiet, transient=True)


def _epoch_line(r: dict[str, Any]) -> str:
    eps = f", ε {r['epsilon_pld']:.3g} (PLD) / {r['epsilon_rdp']:.3g} (RDP)" if math.isfinite(
        r["epsilon_pld"]) else ""
    return (f"epoch {r['epoch']}: train loss {r['train_loss']:.4f} acc {r['train_accuracy']:.4f}, "
            f"test loss {r['test_loss']:.4f} acc {r['test_accuracy']:.4f}{eps}, {r['elapsed_s']:.1f} s")


def step_and_epoch_printers(progress: Progress, task: Any, current: Callable[[], tuple[str, int]]
                            ) -> tuple[Callable[[dict[str, Any]], None], Callable[[dict[str, Any]], None]]:
    """on_step and on_epoch callbacks for a run among several: `current()` gives its (name, epochs)."""

    def on_step(s: dict[str, Any]) -> None:
        name, epochs = current()
        progress.update(task, total=s["steps_in_epoch"], completed=s["step_in_epoch"],
                        description=f"{name} epoch {s['epoch']}/{epochs}",
                        info=f"loss {s['train_loss']:.3f} acc {s['train_accuracy']:.3f}")

    def on_epoch(record: dict[str, Any]) -> None:
        progress.console.print(f"  {_epoch_line(record)}", highlight=False)

    return on_step, on_epoch


def summary_table(last: dict[str, Any], noise_multiplier: float | None) -> Table:
    table = Table(title="final epoch")
    for column in ("epoch", "test accuracy", "ε (PLD)", "ε (RDP)", "δ", "σ", "elapsed"):
        table.add_column(column, justify="right")
    table.add_row(str(last["epoch"]), f"{last['test_accuracy']:.4f}", f"{last['epsilon_pld']:.4g}",
                  f"{last['epsilon_rdp']:.4g}", f"{last['delta']:g}", f"{noise_multiplier or 0:.4g}",
                  f"{last['elapsed_s']:.1f} s")
    return table
