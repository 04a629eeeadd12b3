"""The privacy parameters of a run, resolved once before training: σ (given, or calibrated from
`privacy.target_epsilon`), the accounting σ, the sampling rate q = B/n, the total steps, the microbatch
size. `dpsgd train` and `dpsgd epsilon --config` both use this, so they account the same event.
No TensorFlow, no pandas.
"""

from __future__ import annotations

from dataclasses import dataclass

from dpsgd_cli.config import ExperimentConfig, feature_releases, microbatch_size
from dpsgd_cli.errors import AccountingInputError, ConfigError
from dpsgd_cli.privacy import accounting
from dpsgd_cli.privacy.calibration import calibrate_noise_multiplier
from dpsgd_cli.privacy.pld_composition import PldTooLargeError
from dpsgd_cli.privacy.sampling import steps_after_epochs

# The config key each accounting input comes from (AccountingInputError.parameter → key).
CONFIG_KEYS = {"noise_multiplier": "privacy.noise_multiplier", "sampling_rate": "data.batch_size",
               "steps": "training.epochs", "delta": "privacy.delta",
               "target_epsilon": "privacy.target_epsilon"}


@dataclass(frozen=True)
class PrivacyPlan:
    """The privacy parameters of a run, resolved before training starts. `dataset_size` is the n of
    q = batch_size / n: the training examples plus all `privacy.canaries` (included or not). `releases`: the
    noise multipliers of full-batch Gaussian mechanisms run before training (`config.feature_releases`),
    composed with the steps into ε."""

    noise_multiplier: float
    accounting_noise_multiplier: float
    sampling_rate: float
    total_steps: int
    microbatch_size: int
    dataset_size: int
    releases: tuple[float, ...] = ()


def plan_privacy(cfg: ExperimentConfig, dataset_size: int, *,
                 noise_multiplier: float | None = None) -> PrivacyPlan:
    """Resolve σ (calibrating it from `target_epsilon` if asked, unless `noise_multiplier` gives the σ a
    resumed run already trained with) and the accounting parameters. `dataset_size`: the real training
    examples; all m canaries are added to it, so q does not depend on their secret inclusion coins."""
    b, n = cfg.data.batch_size, dataset_size + cfg.privacy.canaries
    if b > n:
        raise ConfigError(f"data.batch_size: {b} is larger than the {n} training examples")
    epochs, limit = cfg.training.epochs, accounting.MAX_STEPS
    if epochs > limit:  # every epoch is at least one step; refused before E·n/B can overflow
        raise ConfigError(f"training.epochs: {epochs:,} epochs are more than the {limit:,} steps the "
                          "accountants take")
    total = steps_after_epochs(epochs, b, n, cfg.data.sampling)
    if total > limit:
        raise ConfigError(f"training.epochs: {epochs:,} epochs are {total:,} steps, more than the {limit:,} "
                          "the accountants take")
    k = microbatch_size(cfg)
    releases = feature_releases(cfg)
    sigma = cfg.privacy.noise_multiplier if noise_multiplier is None else noise_multiplier
    target = cfg.privacy.target_epsilon
    try:
        if cfg.privacy.enabled:
            if sigma is None:
                if target is None:  # load_config refuses this; a config built in code may not
                    raise ConfigError("privacy: give exactly one of noise_multiplier or target_epsilon when "
                                      "privacy.enabled is true")
                sigma = calibrate_noise_multiplier(target, cfg.privacy.delta, b / n, total, accountant="pld",
                                                   microbatch_size=k, releases=releases)
            accounting.check_args(accounting.accounting_noise_multiplier(sigma, k), b / n, cfg.privacy.delta)
    except PldTooLargeError:  # only calibration uses the PLD accountant here
        raise ConfigError(f"privacy.target_epsilon: ε = {target:g} over {total:,} steps needs so little "
                          "noise that the PLD accountant, which calibrates σ for a run, cannot compute it; "
                          "ask for a smaller ε, or give privacy.noise_multiplier instead") from None
    except AccountingInputError as exc:
        raise config_error(exc) from None
    sigma = 0.0 if sigma is None else sigma
    return PrivacyPlan(sigma, accounting.accounting_noise_multiplier(sigma, k), b / n, total, k, n, releases)


def config_error(exc: AccountingInputError) -> ConfigError:
    """The accountants' complaint about an input, as a ConfigError that names the config key it came from."""
    key = CONFIG_KEYS.get(exc.parameter)
    return ConfigError(f"{key}: {exc}" if key else str(exc))
