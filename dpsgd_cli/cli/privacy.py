"""`dpsgd epsilon` and `dpsgd noise`: privacy questions answered without training (and without TensorFlow).

`dpsgd epsilon`: what ε does this σ give after this many steps? `dpsgd noise`: what σ keeps ε ≤ a target?
Both describe one DP-SGD step as the Poisson-subsampled Gaussian (see `dpsgd_cli.privacy.accounting`). With
`--epochs E` the number of steps follows `dpsgd train`: ⌈E·n/B⌉ for Poisson sampling (an epoch is n/B
steps in expectation), E·⌊n/B⌋ for shuffled batches. `dpsgd epsilon --config X.yaml` derives every number
from an experiment file exactly as `dpsgd train` will (privacy_plan.plan_privacy), so it prints the ε the run
will report.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from decimal import ROUND_CEILING, Decimal
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from dpsgd_cli.cli.app import app, console, user_errors
from dpsgd_cli.config import SAMPLINGS
from dpsgd_cli.errors import AccountingInputError, ConfigError, OutputError
from dpsgd_cli.privacy import accounting
from dpsgd_cli.privacy.calibration import calibrate_noise_multiplier
from dpsgd_cli.privacy.statement import PrivacyFacts, privacy_statement

MAX_CURVE_POINTS = 10_000  # ε after every epoch (each point is one ε to compute)
MAX_COUNT = 2**63 - 1  # batch and dataset sizes (any larger and B/n, E·n/B lose their meaning as floats)

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

DEFAULT_DELTA = 1e-5


@dataclass(frozen=True)
class Setting:
    """Everything an ε question is about, resolved from options or from an experiment config."""

    noise_multiplier: float | None  # σ training uses (None for `dpsgd noise`)
    microbatch_size: int
    sampling_rate: float
    steps: int
    delta: float
    sampling: str
    batch_size: int | None
    dataset_size: int | None
    epochs: float | None
    l2_norm_clip: float | None
    source: str  # "options" or "config"
    target_epsilon: float | None = None  # set when σ was calibrated from a config's target ε
    randomness: str | None = None  # a config's: "secret" or "reproducible" (privacy_statement.PrivacyFacts)

    @property
    def accounting_sigma(self) -> float:
        return accounting.accounting_noise_multiplier(self.noise_multiplier, self.microbatch_size)

    @property
    def convention(self) -> str:
        """How the steps were counted from epochs (dpsgd train's convention)."""
        if self.epochs is None:
            return "given"
        if self.sampling == "shuffle":
            return "shuffle: E*floor(n/B)"
        return "poisson: ceil(E*n/B)" if self.batch_size else "poisson: ceil(E/q)"

    @property
    def steps_text(self) -> str:
        if self.epochs is None:
            return str(self.steps)
        e = f"{self.epochs:g}"
        if self.sampling == "shuffle":
            return f"{self.steps} = {e}·⌊{self.dataset_size}/{self.batch_size}⌋ (shuffle: ⌊n/B⌋ per epoch)"
        if self.batch_size:
            return f"{self.steps} = ⌈{e}·{self.dataset_size}/{self.batch_size}⌉ (Poisson: n/B per epoch)"
        return f"{self.steps} = ⌈{e}/q⌉ (Poisson: 1/q per epoch)"

    def option_error(self, exc: AccountingInputError) -> ConfigError:
        """The accountants' complaint about an input, naming the option (or config key) it came from."""
        from dpsgd_cli.privacy.plan import config_error

        if self.source == "config" and exc.parameter not in ("accountant", "curve"):
            return config_error(exc)
        names = {"noise_multiplier": "--sigma", "delta": "--delta", "target_epsilon": "--target-epsilon",
                 "sampling_rate": "--batch-size/--dataset-size" if self.batch_size else "--sampling-rate",
                 "steps": "--steps" if self.epochs is None else "--epochs", "accountant": "--accountant",
                 "curve": "--per-epoch"}
        note = (f" (the accountant sees σ/2: microbatches of {self.microbatch_size})"
                if exc.parameter == "noise_multiplier" and self.microbatch_size > 1 else "")
        name = names.get(exc.parameter)
        return ConfigError(f"{name}: {exc}{note}" if name else f"{exc}{note}")

    def steps_after(self, epochs: float) -> int:
        """Steps after `epochs` epochs (the dpsgd train convention)."""
        from dpsgd_cli.training.sampling import steps_after_epochs

        if self.batch_size and self.dataset_size:
            return steps_after_epochs(epochs, self.batch_size, self.dataset_size, self.sampling)
        return math.ceil(round(epochs / self.sampling_rate, 9))  # Poisson, q only

    def steps_per_epoch(self) -> float:
        if self.sampling == "shuffle":
            return float(self.dataset_size // self.batch_size)
        return 1.0 / self.sampling_rate

    def epoch_points(self) -> list[tuple[float, int]]:
        """(epoch, steps) at the end of every epoch up to the last step; the last point may be partial."""
        points: list[tuple[float, int]] = []
        if self.steps / self.steps_per_epoch() > MAX_CURVE_POINTS:
            raise ConfigError(f"--per-epoch: {self.steps} steps are more than {MAX_CURVE_POINTS} epochs")
        epoch = 1
        while (at := self.steps_after(epoch)) < self.steps:
            points.append((float(epoch), at))
            epoch += 1
        if self.epochs is not None:
            last = self.epochs
        elif at == self.steps:
            last = float(epoch)
        else:
            last = self.steps / self.steps_per_epoch()
        points.append((last, self.steps))
        return points


def _given(**options: Any) -> list[str]:
    return ["--" + name.replace("_", "-") for name, value in options.items() if value is not None]


def _check_positive_int(name: str, value: int | None) -> None:
    if value is not None and value < 1:
        raise ConfigError(f"{name} must be ≥ 1, got {value}")
    if value is not None and value > MAX_COUNT:
        digits = len(str(value))
        raise ConfigError(f"{name} must be at most 2^63 − 1, got "
                          + (str(value) if digits <= 30 else f"a number of {digits} digits"))


def resolve_options(*, sigma: float | None, steps: int | None, epochs: float | None, batch_size: int | None,
                    dataset_size: int | None, sampling_rate: float | None, num_microbatches: int | None,
                    sampling: str | None, delta: float | None, need_sigma: bool) -> Setting:
    """Check the command-line description of a training run; raise ConfigError (exit 2) when it is bad."""
    if need_sigma:
        if sigma is None:
            raise ConfigError("give the noise multiplier: --sigma S")
        if not sigma > 0:  # too much noise (up to ∞) is the accountants' to refuse
            raise ConfigError(f"--sigma must be > 0, got {sigma:g} (σ = 0 adds no noise: ε = ∞)")
    delta = DEFAULT_DELTA if delta is None else delta
    if not 0 < delta < 1:
        raise ConfigError(f"--delta must be in (0, 1), got {delta:g}")
    sampling = sampling or "poisson"
    if sampling not in SAMPLINGS:
        raise ConfigError(f"--sampling must be {' or '.join(SAMPLINGS)}, got {sampling!r}")
    # sampling rate
    if sampling_rate is not None:
        if batch_size is not None or dataset_size is not None:
            raise ConfigError("give either --sampling-rate or --batch-size with --dataset-size, not both")
        if not 0 < sampling_rate <= 1:
            raise ConfigError(f"--sampling-rate must be in (0, 1], got {sampling_rate:g}")
        q = sampling_rate
    else:
        if batch_size is None or dataset_size is None:
            missing = "--dataset-size" if batch_size is not None else "--batch-size"
            if batch_size is None and dataset_size is None:
                raise ConfigError("give the sampling rate: --batch-size B --dataset-size N, or "
                                  "--sampling-rate q")
            raise ConfigError(f"give {missing} too (the sampling rate is q = B/n), or --sampling-rate q")
        _check_positive_int("--batch-size", batch_size)
        _check_positive_int("--dataset-size", dataset_size)
        if batch_size > dataset_size:
            raise ConfigError(f"--batch-size {batch_size} is larger than --dataset-size {dataset_size}")
        q = batch_size / dataset_size
    # microbatches
    microbatch = 1
    if num_microbatches is not None:
        if batch_size is None:
            raise ConfigError("--num-microbatches needs --batch-size and --dataset-size (microbatch size "
                              "is B/M)")
        _check_positive_int("--num-microbatches", num_microbatches)
        if batch_size % num_microbatches:
            raise ConfigError(f"--num-microbatches {num_microbatches} does not divide --batch-size "
                              f"{batch_size}")
        microbatch = batch_size // num_microbatches
    # length
    if steps is None and epochs is None:
        raise ConfigError("give the training length: --steps N or --epochs E")
    if steps is not None and epochs is not None:
        raise ConfigError("give either --steps or --epochs, not both")
    if sampling == "shuffle" and batch_size is None:
        raise ConfigError("--sampling shuffle needs --batch-size and --dataset-size (an epoch is ⌊n/B⌋ "
                          "steps)")
    setting = Setting(noise_multiplier=sigma, microbatch_size=microbatch, sampling_rate=q, steps=0,
                      delta=delta, sampling=sampling, batch_size=batch_size, dataset_size=dataset_size,
                      epochs=epochs, l2_norm_clip=None, source="options")
    if steps is not None:
        _check_positive_int("--steps", steps)
    else:
        if not 0 < epochs < math.inf:
            raise ConfigError(f"--epochs must be > 0 and finite, got {epochs:g}")
        if sampling == "shuffle" and not float(epochs).is_integer():
            raise ConfigError(f"--epochs must be a whole number with --sampling shuffle, got {epochs:g}")
        count = epochs * setting.steps_per_epoch()
        if count > accounting.MAX_STEPS:  # refused before ⌈E·n/B⌉ can overflow
            many = f"{count:.4g} steps, more" if math.isfinite(count) else "more steps"
            raise ConfigError(f"--epochs {epochs:g} means {many} than the {accounting.MAX_STEPS:,} the "
                              "accountants take")
        steps = setting.steps_after(epochs)
        if steps < 1:
            raise ConfigError(f"--epochs {epochs:g} is less than one step (an epoch is "
                              f"{setting.steps_per_epoch():g} steps)")
    return Setting(**{**setting.__dict__, "steps": steps})


def resolve_config(config: Path, overrides: list[str] | None) -> Setting:
    """The privacy setting of an experiment file, from `privacy_plan.plan_privacy` as `dpsgd train` uses."""
    from dpsgd_cli.config import dataset_size, load_config
    from dpsgd_cli.privacy.plan import plan_privacy

    cfg = load_config(config, overrides)
    p = cfg.privacy
    if not p.enabled:
        raise ConfigError(f"{config}: privacy.enabled is false, a non-private run: there is no ε to report")
    if p.noise_multiplier is not None and p.noise_multiplier <= 0:
        raise ConfigError(f"{config}: privacy.noise_multiplier is {p.noise_multiplier:g}: no noise, ε = ∞")
    plan = plan_privacy(cfg, dataset_size(cfg))
    n = plan.dataset_size
    return Setting(noise_multiplier=plan.noise_multiplier, microbatch_size=plan.microbatch_size,
                   sampling_rate=plan.sampling_rate, steps=plan.total_steps, delta=p.delta,
                   sampling=cfg.data.sampling, batch_size=cfg.data.batch_size, dataset_size=n,
                   epochs=float(cfg.training.epochs), l2_norm_clip=p.l2_norm_clip, source="config",
                   target_epsilon=p.target_epsilon if p.noise_multiplier is None else None,
                   randomness="reproducible" if p.reproducible else "secret")


def _accountants(accountant: str, allowed: tuple[str, ...]) -> list[str]:
    if accountant not in allowed:
        raise ConfigError(f"--accountant must be one of {', '.join(allowed)}, got {accountant!r}")
    return list(accounting.ACCOUNTANTS) if accountant == "all" else [accountant]


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def _eps_text(x: float) -> str:
    return "∞" if math.isinf(x) else f"{x:.4g}"


def _statement(s: Setting, sigma: float, eps: dict[str, float]) -> str:
    return privacy_statement(PrivacyFacts(
        noise_multiplier=sigma,
        accounting_noise_multiplier=accounting.accounting_noise_multiplier(sigma, s.microbatch_size),
        l2_norm_clip=s.l2_norm_clip, sampling_rate=s.sampling_rate, steps=s.steps, delta=s.delta,
        sampling=s.sampling, microbatch_size=s.microbatch_size, epsilon_rdp=eps.get("rdp"),
        epsilon_pld=eps.get("pld"), source=s.source, randomness=s.randomness))


def _describe(s: Setting, sigma: float) -> dict[str, Any]:
    return {
        "steps": s.steps, "epochs": s.epochs, "steps_convention": s.convention, "sampling": s.sampling,
        "sampling_rate": s.sampling_rate, "batch_size": s.batch_size, "dataset_size": s.dataset_size,
        "noise_multiplier": sigma, "microbatch_size": s.microbatch_size,
        "accounting_noise_multiplier": accounting.accounting_noise_multiplier(sigma, s.microbatch_size),
        "delta": s.delta, "source": s.source,
    }


def _setting_rows(table: Table, s: Setting, sigma: float) -> None:
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
        s = resolve_config(config, overrides)
    else:
        if overrides:
            raise ConfigError("--set needs --config")
        s = resolve_options(sigma=sigma, steps=steps, epochs=epochs, batch_size=batch_size,
                            dataset_size=dataset_size, sampling_rate=sampling_rate,
                            num_microbatches=num_microbatches, sampling=sampling, delta=delta,
                            need_sigma=True)
    per_epoch = per_epoch or csv_path is not None
    points = s.epoch_points() if per_epoch else [(s.epochs, s.steps)]
    try:
        curves = {a: accounting.epsilon_curve(s.accounting_sigma, s.sampling_rate, [k for _, k in points],
                                              s.delta, a) for a in accountants}
    except AccountingInputError as exc:  # e.g. σ out of range, or too small for the PLD accountant
        raise s.option_error(exc) from None
    final = {a: curve[-1] for a, curve in curves.items()}
    statement = _statement(s, s.noise_multiplier, final)
    rows = [{"epoch": round(e, 6) if e is not None else None, "steps": k,
             **{f"epsilon_{a}": curves[a][i] for a in accountants}} for i, (e, k) in enumerate(points)]
    if csv_path is not None:
        _write_csv(csv_path, rows)
    if json_out:
        out = {"accountant": accountant, **{f"epsilon_{a}": _finite(v) for a, v in final.items()},
               **_describe(s, s.noise_multiplier), "statement": statement}
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
        console.print(curve)
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
    console.print(table)
    console.print(statement, highlight=False)


def round_up(x: float, digits: int = 4) -> float:
    """x rounded up to `digits` significant digits (never below x, so ε at it stays ≤ the target)."""
    d = Decimal(x)
    quantum = Decimal(1).scaleb(d.adjusted() - digits + 1)
    return float(d.quantize(quantum, rounding=ROUND_CEILING))


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
    if not 0 < target_epsilon < math.inf:
        raise ConfigError(f"--target-epsilon must be > 0 and finite, got {target_epsilon:g}")
    (acc,) = _accountants(accountant, accounting.ACCOUNTANTS)
    s = resolve_options(sigma=None, steps=steps, epochs=epochs, batch_size=batch_size,
                        dataset_size=dataset_size, sampling_rate=sampling_rate,
                        num_microbatches=num_microbatches, sampling=sampling, delta=delta, need_sigma=False)
    try:
        exact = calibrate_noise_multiplier(target_epsilon, s.delta, s.sampling_rate, s.steps,
                                           accountant=acc, microbatch_size=s.microbatch_size)
    except AccountingInputError as exc:  # e.g. no σ the accountants take meets the target
        raise s.option_error(exc) from None
    sigma = round_up(exact)
    eps = accounting.epsilon(accounting.accounting_noise_multiplier(sigma, s.microbatch_size),
                             s.sampling_rate, s.steps, s.delta, acc)
    statement = _statement(s, sigma, {acc: eps})
    if json_out:
        out = {"accountant": acc, "target_epsilon": target_epsilon, f"epsilon_{acc}": _finite(eps),
               **_describe(s, sigma), "noise_multiplier_exact": exact, "statement": statement}
        print(json.dumps(out, allow_nan=False))
        return
    console.print(f"σ = [bold]{sigma:.4g}[/]  (smallest noise multiplier with ε ≤ {target_epsilon:g} at "
                  f"δ = {s.delta:g} by the {acc.upper()} accountant; rounded up from {exact:.7g})",
                  highlight=False)
    _print_privacy(s, sigma, {acc: eps}, statement, "privacy at this σ")
