"""The privacy parameters of a run, resolved once before training: σ (given, or calibrated from
`privacy.target_epsilon`), the accounting σ, the sampling rate q = B/n, the total steps, the microbatch
size. `dpsgd train` and `dpsgd epsilon --config` both use this, so they account the same event.
No TensorFlow, no pandas.
"""

from __future__ import annotations

from dataclasses import dataclass

from dpsgd_cli import accounting
from dpsgd_cli.calibration import calibrate_noise_multiplier
from dpsgd_cli.config import ExperimentConfig, microbatch_size
from dpsgd_cli.errors import ConfigError
from dpsgd_cli.sampling import steps_after_epochs


@dataclass(frozen=True)
class PrivacyPlan:
    """The privacy parameters of a run, resolved before training starts. `dataset_size` is the n of
    q = batch_size / n: the training examples plus all `privacy.canaries` (included or not)."""

    noise_multiplier: float
    accounting_noise_multiplier: float
    sampling_rate: float
    total_steps: int
    microbatch_size: int
    dataset_size: int


def plan_privacy(cfg: ExperimentConfig, dataset_size: int, *,
                 noise_multiplier: float | None = None) -> PrivacyPlan:
    """Resolve σ (calibrating it from `target_epsilon` if asked, unless `noise_multiplier` gives the σ a
    resumed run already trained with) and the accounting parameters. `dataset_size`: the real training
    examples; all m canaries are added to it, so q does not depend on their secret inclusion coins."""
    b, n = cfg.data.batch_size, dataset_size + cfg.privacy.canaries
    if b > n:
        raise ConfigError(f"data.batch_size: {b} is larger than the {n} training examples")
    total = steps_after_epochs(cfg.training.epochs, b, n, cfg.data.sampling)
    k = microbatch_size(cfg)
    sigma = cfg.privacy.noise_multiplier if noise_multiplier is None else noise_multiplier
    if cfg.privacy.enabled and sigma is None:
        target = cfg.privacy.target_epsilon
        try:
            sigma = calibrate_noise_multiplier(target, cfg.privacy.delta, b / n, total,
                                                          accountant="pld", microbatch_size=k)
        except (ArithmeticError, MemoryError, ValueError, RuntimeError) as exc:
            raise ConfigError(f"privacy.target_epsilon: cannot calibrate σ for ε = {target:g} over {total} "
                              f"steps ({exc.__class__.__name__}); give privacy.noise_multiplier instead") \
                from None
    sigma = 0.0 if sigma is None else sigma
    return PrivacyPlan(sigma, accounting.accounting_noise_multiplier(sigma, k), b / n, total, k, n)
