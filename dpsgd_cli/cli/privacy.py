"""`dpsgd epsilon` and `dpsgd noise`: privacy questions answered without training (and without TensorFlow).

`dpsgd epsilon`: what ε does this σ give after this many steps? `dpsgd noise`: what σ keeps ε ≤ a target?
This module parses options and prints; `privacy.question` resolves and checks the question (steps as
`dpsgd train` counts them, a config through the same plan as `dpsgd train`), `privacy.accounting` and
`privacy.calibration` answer it.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from dpsgd_cli.cli.app import app, console, user_errors
from dpsgd_cli.cli.tables import print_table
from dpsgd_cli.errors import ConfigError, OutputError
from dpsgd_cli.privacy import accounting
from dpsgd_cli.privacy.answer import calibrated_noise, epsilons
from dpsgd_cli.privacy.question import (
    PrivacyQuestion,
    answer_statement,
    describe_question,
    resolve_config,
    resolve_options,
)

# --- options shared by both commands -----------------------------------------------------------------
StepsOption = Annotated[int | None, typer.Option("--steps", help="Number of training steps.")]
EpochsOption = Annotated[float | None, typer.Option(
    "--epochs", help="Training length in epochs instead of --steps: ⌈E·n/B⌉ steps with Poisson sampling, "
    "E·⌊n/B⌋ with --sampling shuffle (as dpsgd train counts them).")]
BatchOption = Annotated[int | None, typer.Option(
    "--batch-size", help="Expected batch size B (with --dataset-size: q = B/n).")]
DatasetOption = Annotated[int | None, typer.Option("--dataset-size", help="Training examples n.")]
RateOption = Annotated[float | None, typer.Option(
    "--sampling-rate", help="Sampling rate q in (0, 1], instead of --batch-size and --dataset-size.")]
MicrobatchOption = Annotated[int | None, typer.Option(
    "--num-microbatches", help="Microbatches per batch (TF Privacy semantics). Microbatches of more than "
    "one example double the sensitivity: accounted with σ/2. Default: per-example clipping.")]
SamplingOption = Annotated[str | None, typer.Option(
    "--sampling", help="How batches are drawn: poisson (what the analysis assumes; default) or shuffle "
    "(fixed-size shuffled batches: the Poisson ε is then optimistic).")]
DeltaOption = Annotated[float | None, typer.Option("--delta", help="δ in (0, 1). Default 1e-5.")]
JsonOption = Annotated[bool, typer.Option("--json", help="Print one JSON object instead of a table.")]

def _given(**options: Any) -> list[str]:
    return ["--" + name.replace("_", "-") for name, value in options.items() if value is not None]


def _accountants(accountant: str, allowed: tuple[str, ...]) -> list[str]:
    if accountant not in allowed:
        raise ConfigError(f"--accountant must be one of {', '.join(allowed)}, got {accountant!r}")
    return list(accounting.ACCOUNTANTS) if accountant == "all" else [accountant]


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def _eps_text(x: float) -> str:
    return "∞" if math.isinf(x) else f"{x:.4g}"


def _setting_rows(table: Table, s: PrivacyQuestion, sigma: float) -> None:
    acc_sigma = accounting.accounting_noise_multiplier(sigma, s.microbatch_size)
    sig = f"{sigma:.6g}" + (f" (accounted as σ/2 = {acc_sigma:.6g}: microbatches of {s.microbatch_size})"
                            if s.microbatch_size > 1 else "")
    if s.target_epsilon is not None:
        sig += f" (calibrated for ε = {s.target_epsilon:g})"
    table.add_row("noise multiplier σ", sig)
    rate = f"{s.sampling_rate:.6g}"
    if s.batch_size and s.dataset_size:
        rate += f" = {s.batch_size}/{s.dataset_size}"
    table.add_row("sampling rate q", rate + f" ({s.sampling})")
    table.add_row("steps", s.steps_text)
    table.add_row("δ", f"{s.delta:g}")


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from exc


@app.command()
@user_errors
def epsilon(
    config: Annotated[Path | None, typer.Option(
        "--config", "-c", help="Experiment YAML: every number as dpsgd train will use it.")] = None,
    overrides: Annotated[list[str] | None, typer.Option(
        "--set", help="With --config: override a key, e.g. --set training.epochs=50 (repeatable).")] = None,
    sigma: Annotated[float | None, typer.Option(
        "--sigma", "--noise-multiplier", help="Noise multiplier σ (noise std / clipping norm).")] = None,
    steps: StepsOption = None,
    epochs: EpochsOption = None,
    batch_size: BatchOption = None,
    dataset_size: DatasetOption = None,
    sampling_rate: RateOption = None,
    num_microbatches: MicrobatchOption = None,
    sampling: SamplingOption = None,
    delta: DeltaOption = None,
    accountant: Annotated[str, typer.Option(
        "--accountant", help="rdp (fast), pld (tighter; a few seconds) or all.")] = "rdp",
    json_out: JsonOption = False,
    per_epoch: Annotated[bool, typer.Option("--per-epoch", help="ε after every epoch.")] = False,
    csv_path: Annotated[Path | None, typer.Option(
        "--csv", help="Write the per-epoch ε curve to this CSV file (implies --per-epoch).")] = None,
) -> None:
    """Print the (ε, δ) of DP-SGD with noise multiplier σ after the given training, and what it assumes."""
    accountants = _accountants(accountant, ("rdp", "pld", "all"))
    if config is not None:
        extra = _given(sigma=sigma, steps=steps, epochs=epochs, batch_size=batch_size,
                       dataset_size=dataset_size, sampling_rate=sampling_rate,
                       num_microbatches=num_microbatches, sampling=sampling, delta=delta)
        if extra:
            raise ConfigError(f"--config gives every number; change one with --set (e.g. --set "
                              f"training.epochs=50), not {extra[0]}")
        from dpsgd_cli.training.data import count_records  # no TensorFlow: loads data.path's records

        s = resolve_config(config, overrides, count_records)
    else:
        if overrides:
            raise ConfigError("--set needs --config")
        s = resolve_options(sigma=sigma, steps=steps, epochs=epochs, batch_size=batch_size,
                            dataset_size=dataset_size, sampling_rate=sampling_rate,
                            num_microbatches=num_microbatches, sampling=sampling, delta=delta,
                            need_sigma=True)
    per_epoch = per_epoch or csv_path is not None
    points = s.epoch_points() if per_epoch else [(s.epochs, s.steps)]
    curves = epsilons(s, accountants, [k for _, k in points])
    final = {a: curve[-1] for a, curve in curves.items()}
    statement = answer_statement(s, s.noise_multiplier, final)
    rows = [{"epoch": round(e, 6) if e is not None else None, "steps": k,
             **{f"epsilon_{a}": curves[a][i] for a in accountants}} for i, (e, k) in enumerate(points)]
    if csv_path is not None:
        _write_csv(csv_path, rows)
    if json_out:
        out = {"accountant": accountant, **{f"epsilon_{a}": _finite(v) for a, v in final.items()},
               **describe_question(s, s.noise_multiplier), "statement": statement}
        if s.target_epsilon is not None:
            out["target_epsilon"] = s.target_epsilon
        if per_epoch:
            out["per_epoch"] = [{k: (_finite(v) if isinstance(v, float) and k.startswith("epsilon") else v)
                                 for k, v in row.items()} for row in rows]
        print(json.dumps(out, allow_nan=False))
        return
    if per_epoch and csv_path is None:
        curve = Table(title="ε after each epoch")
        for column in ("epoch", "steps", *(f"ε ({a.upper()})" for a in accountants)):
            curve.add_column(column, justify="right")
        for row in rows:
            curve.add_row(f"{row['epoch']:g}", str(row["steps"]),
                          *(_eps_text(row[f"epsilon_{a}"]) for a in accountants))
        print_table(curve, console)
    _print_privacy(s, s.noise_multiplier, final, statement, "privacy of this training")
    if csv_path is not None:
        console.print(f"wrote {csv_path} ({len(rows)} rows)", highlight=False)


def _print_privacy(s, sigma: float, epsilons: dict[str, float], statement: str, title: str) -> None:
    """The settings and ε of each accountant as a two-column table, then the plain-words statement."""
    table = Table(show_header=False, title=title)
    table.add_column(style="bold")
    table.add_column()
    _setting_rows(table, s, sigma)
    for name, value in epsilons.items():
        table.add_row(f"ε ({name.upper()})", _eps_text(value))
    print_table(table, console)
    console.print(statement, highlight=False)


@app.command()
@user_errors
def noise(
    target_epsilon: Annotated[float | None, typer.Option(
        "--target-epsilon", help="The ε the training may spend (at δ).")] = None,
    steps: StepsOption = None,
    epochs: EpochsOption = None,
    batch_size: BatchOption = None,
    dataset_size: DatasetOption = None,
    sampling_rate: RateOption = None,
    num_microbatches: MicrobatchOption = None,
    sampling: SamplingOption = None,
    delta: DeltaOption = None,
    accountant: Annotated[str, typer.Option(
        "--accountant", help="rdp (fast) or pld (tighter, so a smaller σ; a few seconds).")] = "rdp",
    json_out: JsonOption = False,
) -> None:
    """Print the smallest noise multiplier σ that keeps ε ≤ --target-epsilon after the given training."""
    if target_epsilon is None:
        raise ConfigError("give the privacy budget: --target-epsilon E")
    if not 0 < target_epsilon < math.inf:  # before the other options are checked
        raise ConfigError(f"--target-epsilon must be > 0 and finite, got {target_epsilon:g}")
    (acc,) = _accountants(accountant, accounting.ACCOUNTANTS)
    s = resolve_options(sigma=None, steps=steps, epochs=epochs, batch_size=batch_size,
                        dataset_size=dataset_size, sampling_rate=sampling_rate,
                        num_microbatches=num_microbatches, sampling=sampling, delta=delta, need_sigma=False)
    sigma, exact = calibrated_noise(s, target_epsilon, acc)
    eps = accounting.epsilon(accounting.accounting_noise_multiplier(sigma, s.microbatch_size),
                             s.sampling_rate, s.steps, s.delta, acc)
    statement = answer_statement(s, sigma, {acc: eps})
    if json_out:
        out = {"accountant": acc, "target_epsilon": target_epsilon, f"epsilon_{acc}": _finite(eps),
               **describe_question(s, sigma), "noise_multiplier_exact": exact, "statement": statement}
        print(json.dumps(out, allow_nan=False))
        return
    console.print(f"σ = [bold]{sigma:.4g}[/]  (smallest noise multiplier with ε ≤ {target_epsilon:g} at "
                  f"δ = {s.delta:g} by the {acc.upper()} accountant; rounded up from {exact:.7g})",
                  highlight=False)
    _print_privacy(s, sigma, {acc: eps}, statement, "privacy at this σ")
