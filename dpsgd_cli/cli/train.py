"""`dpsgd train`: run one experiment from a YAML config, with a progress bar and a summary table."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from dpsgd_cli.cli.app import app, console, user_errors
from dpsgd_cli.config import ExperimentConfig, load_config

ConfigOption = Annotated[Path | None, typer.Option("--config", "-c", help="Experiment YAML file.")]
SetOption = Annotated[list[str] | None, typer.Option(
    "--set", help="Override a config key, e.g. --set privacy.noise_multiplier=1.3 (repeatable).")]


def config_with_shortcuts(config: Path | None, overrides: list[str] | None,
                          **shortcuts: Any) -> ExperimentConfig:
    """Load `config`, applying `--set` overrides then shortcut options (dotted key → value, None = unset)."""
    items = list(overrides or [])
    items += [f"{key}={value}" for key, value in shortcuts.items() if value is not None]
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
    quiet: Annotated[bool, typer.Option(help="No progress bar.")] = False,
) -> None:
    """Train a CNN with DP-SGD; write results/<name>/metrics.csv (one row per epoch) and run.yaml."""
    cfg = config_with_shortcuts(config, overrides, **{
        "privacy.noise_multiplier": sigma, "training.epochs": epochs, "name": name})
    from dpsgd_cli.runner import run  # TensorFlow is imported only now

    console.print(f"[bold]{cfg.name}[/]: {cfg.data.dataset}, {cfg.training.epochs} epochs, "
                  f"batch {cfg.data.batch_size} ({cfg.data.sampling}), "
                  + (f"σ {cfg.privacy.noise_multiplier}, C {cfg.privacy.l2_norm_clip}" if cfg.privacy.enabled
                     else "non-private"), highlight=False)
    with _progress(quiet) as progress:
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

        result = run(cfg, on_step=on_step, on_epoch=on_epoch, overwrite=overwrite)
    console.print(summary_table(result.records[-1], result.noise_multiplier))
    console.print(result.statement, highlight=False)
    console.print(f"wrote {result.run_dir / 'metrics.csv'} and {result.run_dir / 'run.yaml'}",
                  highlight=False)


def _progress(quiet: bool) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[info]}"), TimeElapsedColumn(), console=console,
                    disable=quiet, transient=True)


def _epoch_line(r: dict[str, Any]) -> str:
    eps = f", ε {r['epsilon_pld']:.3g} (PLD) / {r['epsilon_rdp']:.3g} (RDP)" if math.isfinite(
        r["epsilon_pld"]) else ""
    return (f"epoch {r['epoch']}: train loss {r['train_loss']:.4f} acc {r['train_accuracy']:.4f}, "
            f"test loss {r['test_loss']:.4f} acc {r['test_accuracy']:.4f}{eps}, {r['elapsed_s']:.1f} s")


def summary_table(last: dict[str, Any], noise_multiplier: float | None) -> Table:
    table = Table(title="final epoch")
    for column in ("epoch", "test accuracy", "ε (PLD)", "ε (RDP)", "δ", "σ", "elapsed"):
        table.add_column(column, justify="right")
    table.add_row(str(last["epoch"]), f"{last['test_accuracy']:.4f}", f"{last['epsilon_pld']:.4g}",
                  f"{last['epsilon_rdp']:.4g}", f"{last['delta']:g}", f"{noise_multiplier or 0:.4g}",
                  f"{last['elapsed_s']:.1f} s")
    return table
