"""A privacy question without training: the σ, q, steps and δ of a DP-SGD run described by command-line
options or by an experiment config, checked (every error names the option or key), and the answer's
statement. Steps follow `dpsgd train`: ⌈E·n/B⌉ for Poisson sampling (an epoch is n/B steps in
expectation), E·⌊n/B⌋ for shuffled batches; a config goes through `privacy.plan.plan_privacy` exactly as
`dpsgd train` does. No TensorFlow, no typer.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from decimal import ROUND_CEILING, Decimal
from pathlib import Path
from typing import Any

from dpsgd_cli.config import SAMPLINGS, ExperimentConfig
from dpsgd_cli.errors import AccountingInputError, ConfigError
from dpsgd_cli.privacy import accounting
from dpsgd_cli.privacy.statement import PrivacyFacts, privacy_statement

MAX_CURVE_POINTS = 10_000  # ε after every epoch (each point is one ε to compute)
MAX_COUNT = 2**63 - 1  # batch and dataset sizes (any larger and B/n, E·n/B lose their meaning as floats)
DEFAULT_DELTA = 1e-5


@dataclass(frozen=True)
class PrivacyQuestion:
    """Everything an ε question is about (`dpsgd epsilon`, `dpsgd noise`), resolved from command-line
    options or from an experiment config; `source` says which."""

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
    views: int = 1  # a config's augmentation multiplicity K (one clipped unit per example)
    releases: tuple[float, ...] = ()  # a config's full-batch Gaussian releases before training (feature_norm)
    release_bounds: tuple[float, ...] = ()

    @property
    def accounting_sigma(self) -> float:
        """The σ the accountant sees (σ/2 for microbatches of more than one example)."""
        if self.noise_multiplier is None:
            raise ValueError("this question has no noise multiplier (dpsgd noise asks for one)")
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
        from dpsgd_cli.privacy.sampling import steps_after_epochs

        if self.batch_size and self.dataset_size:
            return steps_after_epochs(epochs, self.batch_size, self.dataset_size, self.sampling)
        return math.ceil(round(epochs / self.sampling_rate, 9))  # Poisson, q only

    def steps_per_epoch(self) -> float:
        if self.sampling == "shuffle":
            if self.batch_size is None or self.dataset_size is None:  # resolve_options refuses this
                raise ValueError("shuffled batches need the batch and dataset sizes")
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


def _check_positive_int(name: str, value: int | None) -> None:
    if value is not None and value < 1:
        raise ConfigError(f"{name} must be ≥ 1, got {value}")
    if value is not None and value > MAX_COUNT:
        digits = len(str(value))
        raise ConfigError(f"{name} must be at most 2^63 − 1, got "
                          + (str(value) if digits <= 30 else f"a number of {digits} digits"))


def resolve_options(*, sigma: float | None, steps: int | None, epochs: float | None, batch_size: int | None,
                    dataset_size: int | None, sampling_rate: float | None, num_microbatches: int | None,
                    sampling: str | None, delta: float | None, need_sigma: bool) -> PrivacyQuestion:
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
    setting = PrivacyQuestion(noise_multiplier=sigma, microbatch_size=microbatch, sampling_rate=q, steps=0,
                      delta=delta, sampling=sampling, batch_size=batch_size, dataset_size=dataset_size,
                      epochs=epochs, l2_norm_clip=None, source="options")
    if steps is not None:
        _check_positive_int("--steps", steps)
    elif epochs is not None:  # one of the two is given (checked above)
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
    return PrivacyQuestion(**{**setting.__dict__, "steps": steps})


def resolve_config(config: Path, overrides: list[str] | None,
                   count_records: Callable[[Any], int] | None = None) -> PrivacyQuestion:
    """The privacy setting of an experiment file, from `privacy_plan.plan_privacy` as `dpsgd train` uses.
    `count_records(cfg)`: n of data read from `data.path` (the training records its loader returns), which
    the config alone does not tell."""
    from dpsgd_cli.config import load_config

    return resolve_experiment(load_config(config, overrides), str(config), count_records)


def resolve_experiment(cfg: ExperimentConfig, where: str = "config",
                       count_records: Callable[[Any], int] | None = None) -> PrivacyQuestion:
    """The privacy setting of `cfg` (errors start with `where`, e.g. its file name), from
    `privacy_plan.plan_privacy` as `dpsgd train` uses it; `count_records` as in `resolve_config`."""
    from dpsgd_cli.config import dataset_size, release_bounds, views_per_example
    from dpsgd_cli.privacy.plan import plan_privacy

    p = cfg.privacy
    if not p.enabled:
        raise ConfigError(f"{where}: privacy.enabled is false, a non-private run: there is no ε to report")
    if p.noise_multiplier is not None and p.noise_multiplier <= 0:
        raise ConfigError(f"{where}: privacy.noise_multiplier is {p.noise_multiplier:g}: no noise, ε = ∞")
    n = dataset_size(cfg)
    if n is None:
        if count_records is None:
            raise ConfigError(f"{where}: data.dataset {cfg.data.dataset} reads data.path; its number of "
                              "records is known only by loading it")
        n = count_records(cfg)
    plan = plan_privacy(cfg, n)
    n = plan.dataset_size
    return PrivacyQuestion(noise_multiplier=plan.noise_multiplier, microbatch_size=plan.microbatch_size,
                   sampling_rate=plan.sampling_rate, steps=plan.total_steps, delta=p.delta,
                   sampling=cfg.data.sampling, batch_size=cfg.data.batch_size, dataset_size=n,
                   epochs=float(cfg.training.epochs), l2_norm_clip=p.l2_norm_clip, source="config",
                   target_epsilon=p.target_epsilon if p.noise_multiplier is None else None,
                   randomness="reproducible" if p.reproducible else "secret", views=views_per_example(cfg),
                   releases=plan.releases, release_bounds=release_bounds(cfg) if plan.releases else ())


def answer_statement(s: PrivacyQuestion, sigma: float, eps: dict[str, float]) -> str:
    return privacy_statement(PrivacyFacts(
        noise_multiplier=sigma,
        accounting_noise_multiplier=accounting.accounting_noise_multiplier(sigma, s.microbatch_size),
        l2_norm_clip=s.l2_norm_clip, sampling_rate=s.sampling_rate, steps=s.steps, delta=s.delta,
        sampling=s.sampling, microbatch_size=s.microbatch_size, epsilon_rdp=eps.get("rdp"),
        epsilon_pld=eps.get("pld"), source=s.source, randomness=s.randomness, views=s.views,
        releases=s.releases, release_bounds=s.release_bounds))


def describe_question(s: PrivacyQuestion, sigma: float) -> dict[str, Any]:
    return {
        "steps": s.steps, "epochs": s.epochs, "steps_convention": s.convention, "sampling": s.sampling,
        "sampling_rate": s.sampling_rate, "batch_size": s.batch_size, "dataset_size": s.dataset_size,
        "noise_multiplier": sigma, "microbatch_size": s.microbatch_size,
        "accounting_noise_multiplier": accounting.accounting_noise_multiplier(sigma, s.microbatch_size),
        "delta": s.delta, "source": s.source, "releases": list(s.releases),
    }


def round_up(x: float, digits: int = 4) -> float:
    """x rounded up to `digits` significant digits (never below x, so ε at it stays ≤ the target)."""
    d = Decimal(x)
    quantum = Decimal(1).scaleb(d.adjusted() - digits + 1)
    return float(d.quantize(quantum, rounding=ROUND_CEILING))
