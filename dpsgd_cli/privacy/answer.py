"""The answers to `dpsgd epsilon` and `dpsgd noise`, shared by the command line and the Python API
(`dpsgd_cli.epsilon`, `dpsgd_cli.noise_multiplier`): ε of a training described without training it, and
the smallest σ for a target ε. `question` resolves and checks the description, `accounting` and
`calibration` compute. No TensorFlow.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from dpsgd_cli.config import ExperimentConfig, load_config
from dpsgd_cli.errors import AccountingInputError, ConfigError
from dpsgd_cli.privacy import accounting
from dpsgd_cli.privacy.calibration import calibrate_noise_multiplier
from dpsgd_cli.privacy.question import (
    DEFAULT_DELTA,
    PrivacyQuestion,
    resolve_experiment,
    resolve_options,
    round_up,
)


def epsilons(s: PrivacyQuestion, accountants: Sequence[str], steps: Sequence[int]) -> dict[str, list[float]]:
    """ε by each accountant after each step count in `steps`, for the σ, q, δ (and releases) of `s`; an
    input the accountants refuse becomes a ConfigError naming the option or config key it came from."""
    try:
        return {a: accounting.epsilon_curve(s.accounting_sigma, s.sampling_rate, steps, s.delta, a,
                                            s.releases) for a in accountants}
    except AccountingInputError as exc:  # e.g. σ out of range, or too small for the PLD accountant
        raise s.option_error(exc) from None


def calibrated_noise(s: PrivacyQuestion, target_epsilon: float, accountant: str) -> tuple[float, float]:
    """(σ, exact σ): the smallest noise multiplier whose ε after the steps of `s` is ≤ `target_epsilon`,
    rounded up to 4 significant digits (so ε at it stays ≤ the target), and as calibrated."""
    if not 0 < target_epsilon < math.inf:
        raise ConfigError(f"--target-epsilon must be > 0 and finite, got {target_epsilon:g}")
    try:
        exact = calibrate_noise_multiplier(target_epsilon, s.delta, s.sampling_rate, s.steps,
                                           accountant=accountant, microbatch_size=s.microbatch_size)
    except AccountingInputError as exc:  # e.g. no σ the accountants take meets the target
        raise s.option_error(exc) from None
    return round_up(exact), exact


def _check_accountant(accountant: str) -> None:
    if accountant not in accounting.ACCOUNTANTS:
        raise ConfigError(f"accountant must be one of {', '.join(accounting.ACCOUNTANTS)}, got "
                          f"{accountant!r}")


def epsilon(noise_multiplier: float | None = None, *, steps: int | None = None,
            epochs: float | None = None, batch_size: int | None = None, dataset_size: int | None = None,
            sampling_rate: float | None = None, num_microbatches: int | None = None,
            sampling: str = "poisson", delta: float = DEFAULT_DELTA, accountant: str = "rdp",
            config: ExperimentConfig | str | Path | None = None) -> float:
    """ε of DP-SGD with noise multiplier σ after the training described (what `dpsgd epsilon` prints).

    Describe the training either by its numbers (σ, a length, a sampling rate) or by an experiment
    `config`, never both. Steps are counted as `dpsgd train` counts them: ⌈E·n/B⌉ for Poisson sampling,
    E·⌊n/B⌋ for shuffled batches. No TensorFlow is imported.

    Args:
        noise_multiplier: σ, the noise std divided by the clipping norm C.
        steps: training steps (or give `epochs`).
        epochs: training length in epochs, with `batch_size` and `dataset_size` (or `sampling_rate`).
        batch_size: expected batch size B; the sampling rate is q = B/n.
        dataset_size: training examples n.
        sampling_rate: q in (0, 1], instead of `batch_size` and `dataset_size`.
        num_microbatches: microbatches per batch (TF Privacy semantics); microbatches of more than one
            example are accounted with σ/2. None: per-example clipping.
        sampling: "poisson" (what the analysis assumes) or "shuffle" (fixed shuffled batches: the Poisson
            ε is then optimistic).
        delta: δ in (0, 1).
        accountant: "rdp" or "pld" (tighter, slower).
        config: an `ExperimentConfig` (or the path of its YAML file): every number as `dpsgd train` will
            use it, σ calibrated when the config gives `privacy.target_epsilon`.

    Returns:
        ε at `delta` under add/remove-one adjacency (math.inf when σ = 0).

    Raises:
        ConfigError: a missing, contradictory or out-of-range input; the message names the matching
            `dpsgd epsilon` option (e.g. --steps) or config key.
    """
    _check_accountant(accountant)
    if config is not None:
        given = {"noise_multiplier": noise_multiplier, "steps": steps, "epochs": epochs,
                 "batch_size": batch_size, "dataset_size": dataset_size, "sampling_rate": sampling_rate,
                 "num_microbatches": num_microbatches}
        extra = [name for name, value in given.items() if value is not None]
        if extra:
            raise ConfigError(f"config gives every number (change the config itself, e.g. with "
                              f"dpsgd_cli.config.with_overrides), not {extra[0]}")
        cfg = config if isinstance(config, ExperimentConfig) else load_config(config)
        where = "config" if isinstance(config, ExperimentConfig) else str(config)
        s = resolve_experiment(cfg, where)
    else:
        s = resolve_options(sigma=noise_multiplier, steps=steps, epochs=epochs, batch_size=batch_size,
                            dataset_size=dataset_size, sampling_rate=sampling_rate,
                            num_microbatches=num_microbatches, sampling=sampling, delta=delta,
                            need_sigma=True)
    return epsilons(s, [accountant], [s.steps])[accountant][-1]


def noise_multiplier(target_epsilon: float, *, steps: int | None = None, epochs: float | None = None,
                     batch_size: int | None = None, dataset_size: int | None = None,
                     sampling_rate: float | None = None, num_microbatches: int | None = None,
                     sampling: str = "poisson", delta: float = DEFAULT_DELTA,
                     accountant: str = "rdp") -> float:
    """The smallest noise multiplier σ that keeps ε ≤ `target_epsilon` after the training described
    (what `dpsgd noise` prints). No TensorFlow is imported.

    Args:
        target_epsilon: the ε the training may spend, at `delta`.
        steps: training steps (or give `epochs`).
        epochs: training length in epochs, with `batch_size` and `dataset_size` (or `sampling_rate`).
        batch_size: expected batch size B; the sampling rate is q = B/n.
        dataset_size: training examples n.
        sampling_rate: q in (0, 1], instead of `batch_size` and `dataset_size`.
        num_microbatches: microbatches per batch; microbatches of more than one example double σ.
        sampling: "poisson" or "shuffle" (as for `epsilon`).
        delta: δ in (0, 1).
        accountant: "rdp" or "pld" (tighter, so a smaller σ; slower).

    Returns:
        σ rounded up to 4 significant digits, so ε at it stays ≤ `target_epsilon`.

    Raises:
        ConfigError: a missing, contradictory or out-of-range input, or a target no σ the accountants
            take can meet; the message names the matching `dpsgd noise` option.
    """
    _check_accountant(accountant)
    s = resolve_options(sigma=None, steps=steps, epochs=epochs, batch_size=batch_size,
                        dataset_size=dataset_size, sampling_rate=sampling_rate,
                        num_microbatches=num_microbatches, sampling=sampling, delta=delta, need_sigma=False)
    return calibrated_noise(s, target_epsilon, accountant)[0]
