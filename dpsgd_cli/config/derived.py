"""Values derived from a config without the data: microbatch size, feature releases and their bounds,
views per example, the data directory, the training-set size n."""

from __future__ import annotations

import os

from dpsgd_cli.config.schema import AUGMENTATIONS, DATASET_SIZES, ExperimentConfig


def microbatch_size(cfg: ExperimentConfig) -> int:
    """Examples per clipped unit: 1 for per-example clipping, batch_size / num_microbatches otherwise."""
    m = cfg.privacy.num_microbatches
    return 1 if m is None else cfg.data.batch_size // m


def feature_releases(cfg: ExperimentConfig) -> tuple[float, ...]:
    """Noise multipliers of the full-batch Gaussian mechanisms a private run releases before training
    (composed with its DP-SGD steps into ε): the two feature statistics of `model.feature_norm:
    private_stats` (and two more when `privacy.feature_norm_refine_noise_multiplier` is set), else none."""
    p = cfg.privacy
    if not (p.enabled and cfg.model.feature_norm == "private_stats"):
        return ()
    refine = p.feature_norm_refine_noise_multiplier
    return (p.feature_norm_noise_multiplier,) * 2 + ((refine,) * 2 if refine is not None else ())


def release_bounds(cfg: ExperimentConfig) -> tuple[float, ...]:
    """The L2 bounds of the feature-statistics releases, in release order: (per-channel mean, mean square)
    of the features, then, with a refinement, of the features standardised by the first pair."""
    p = cfg.privacy
    bounds: tuple[float, ...] = (p.feature_norm_clip_mean, p.feature_norm_clip_square)
    if p.feature_norm_refine_noise_multiplier is not None:
        bounds += (p.feature_norm_refine_clip_mean, p.feature_norm_refine_clip_square)
    return bounds


def views_per_example(cfg: ExperimentConfig) -> int:
    """K of augmentation multiplicity: model inputs per training example, all in that example's one clipped
    unit (1 without `data.augmentation`)."""
    return AUGMENTATIONS[cfg.data.augmentation]


def resolved_data_dir(cfg: ExperimentConfig) -> str | None:
    """The data directory: `data.data_dir` if set, else $DPSGD_DATA_DIR, else None (Keras download)."""
    return cfg.data.data_dir or os.environ.get("DPSGD_DATA_DIR") or None


def dataset_size(cfg: ExperimentConfig) -> int | None:
    """Training examples the run uses (n), without loading the data; None for data read from `data.path`
    (n is then the number of records its loader returns: count them with `training.data.count_records`)."""
    full = DATASET_SIZES.get(cfg.data.dataset)
    if full is None:
        return None
    return min(full, cfg.data.train_size) if cfg.data.train_size else full
