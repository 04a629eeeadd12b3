"""Range and consistency checks of a config that do not need the data (one-line `ConfigError`s)."""

from __future__ import annotations

import math
import re
import reprlib
from typing import Any

from dpsgd_cli.config.schema import (
    _BUILDER_RE,
    _NAME_RE,
    ACTIVATIONS,
    ARCHITECTURES,
    AUGMENTATIONS,
    CLUSTERS,
    DATASETS,
    FEATURE_NORMS,
    FILE_DATASETS,
    GRADIENT_PATHS,
    LR_SCHEDULES,
    OPTIMIZERS,
    PIXEL_ARCHITECTURES,
    PLAN_CHOICES,
    SAMPLINGS,
    STRATEGIES,
    DataConfig,
    DistributeConfig,
    ExperimentConfig,
    PrivacyConfig,
    TrackingConfig,
)
from dpsgd_cli.errors import ConfigError


def _describe(value: Any) -> str:
    return f"{type(value).__name__} {reprlib.repr(value)}"[:80]  # bounded: YAML aliases can nest hugely



def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _choice(dotted: str, value: Any, allowed: tuple) -> None:
    shown = ", ".join(str(a).lower() if isinstance(a, bool) else str(a) for a in allowed)
    _check(value in allowed, f"{dotted}: {value!r} is not allowed; choose one of: {shown}")


def validate(cfg: ExperimentConfig) -> None:
    """Range and consistency checks that do not need the data. Raises ConfigError."""
    _check(bool(_NAME_RE.match(cfg.name)), f"name: {cfg.name!r} must be a plain file name "
           "(letters, digits, . _ - = +), it names the run directory")
    _check(0 <= cfg.seed < 2**32, f"seed: must be in [0, 2**32 - 1], got {cfg.seed}")
    d, m, t, p = cfg.data, cfg.model, cfg.training, cfg.privacy
    _choice("data.dataset", d.dataset, DATASETS)
    if d.dataset in FILE_DATASETS:
        _check(bool(d.path), f"data.path: data.dataset {d.dataset} reads your data from data.path; set it "
               "(see the data sources page of the docs)")
    else:
        _check(d.path is None, f"data.path: only for data.dataset {', '.join(FILE_DATASETS)}; "
               f"{d.dataset} is read from data.data_dir (or downloaded); remove data.path")
    _check(bool(d.label_column.strip()), "data.label_column: must name a column, got an empty string")
    _choice("data.sampling", d.sampling, SAMPLINGS)
    _choice("data.augmentation", d.augmentation, tuple(AUGMENTATIONS))
    _check(d.batch_size >= 1, f"data.batch_size: must be ≥ 1, got {d.batch_size}")
    for key in ("train_size", "test_size"):
        size = getattr(d, key)
        _check(size is None or size >= 1, f"data.{key}: must be ≥ 1 or null (all), got {size}")
    if d.train_size is not None:
        _check(d.batch_size <= d.train_size,
               f"data.batch_size: {d.batch_size} is larger than data.train_size {d.train_size}")
    _choice("model.architecture", m.architecture, ARCHITECTURES)
    _choice("model.activation", m.activation, ACTIVATIONS)
    _check(m.builder is None or bool(_BUILDER_RE.match(m.builder)),
           f"model.builder: {m.builder!r} must name a function as \"package.module:function\"")
    _check(math.isfinite(m.input_mean), f"model.input_mean: must be finite, got {m.input_mean}")
    _check(0 < m.input_std < math.inf, f"model.input_std: must be > 0, got {m.input_std}")
    if (m.input_mean, m.input_std) != (0.0, 1.0):
        _check(m.builder is None and m.architecture in PIXEL_ARCHITECTURES,
               "model.input_mean, model.input_std: only for the pixel models "
               f"({', '.join(PIXEL_ARCHITECTURES)}), not for a builder or scattering features")
    _choice("model.feature_norm", m.feature_norm, FEATURE_NORMS)
    pixel_or_builder = m.builder is not None or m.architecture in PIXEL_ARCHITECTURES
    _check(m.feature_norm == "group_norm" or not pixel_or_builder,
           "model.feature_norm: private_stats is only for the ScatterNet models (scatter_*), not for the "
           "pixel models or a builder")
    _check(t.epochs >= 1, f"training.epochs: must be ≥ 1, got {t.epochs}")
    _choice("training.optimizer", t.optimizer, OPTIMIZERS)
    _choice("training.gradient_path", t.gradient_path, GRADIENT_PATHS)
    _validate_plan(t.plan)
    _check(0 < t.learning_rate < math.inf, f"training.learning_rate: must be > 0, got {t.learning_rate}")
    _check(0 <= t.momentum < 1, f"training.momentum: must be in [0, 1), got {t.momentum}")
    _check(t.physical_batch_size is None or t.physical_batch_size >= 8,
           f"training.physical_batch_size: must be ≥ 8 or null, got {t.physical_batch_size}")
    _check(t.ema_decay is None or 0 <= t.ema_decay < 1,
           f"training.ema_decay: must be in [0, 1) or null (off), got {t.ema_decay}")
    _choice("training.lr_schedule", t.lr_schedule, LR_SCHEDULES)
    _validate_privacy(p, d)
    _validate_distribute(cfg.distribute, p, d)
    _validate_tracking(cfg.tracking)


def _validate_tracking(tracking: TrackingConfig) -> None:
    """`tracking.*`; whether the tracker's package is installed is checked when the run starts."""
    uri = tracking.mlflow
    _check(isinstance(uri, bool) or (isinstance(uri, str)
                                      and re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:\S", uri) is not None),
           f"tracking.mlflow: must be true, false or a tracking URI with its scheme (e.g. "
           f"sqlite:///mlflow.db, http://localhost:5000), got {_describe(uri)}")
    _check(bool(tracking.mlflow_experiment.strip()),
           "tracking.mlflow_experiment: must name an experiment, got an empty string")


def _validate_distribute(dist: DistributeConfig, p: PrivacyConfig, d: DataConfig) -> None:
    """`distribute.*`; that the devices exist is checked when the run starts (`training.distribute`)."""
    _choice("distribute.strategy", dist.strategy, STRATEGIES)
    _choice("distribute.cluster", dist.cluster, CLUSTERS)
    devices = dist.devices
    _check(devices is None or (isinstance(devices, list) and len(devices) > 0 and all(
        isinstance(v, str) and re.fullmatch(r"(/[\w:.-]+)*/?(device:)?(CPU|GPU|TPU):\d+", v) for v in devices)
        and len(set(devices)) == len(devices)),
        f"distribute.devices: must be null (all GPUs, else all CPUs) or a list of distinct devices such as "
        f"[GPU:0, GPU:1], got {_describe(devices)}")
    _check(dist.cpu_devices is None or 1 <= dist.cpu_devices <= 64,
           f"distribute.cpu_devices: must be in [1, 64] or null (no split), got {dist.cpu_devices}")
    _check(0 < dist.collective_timeout_s < math.inf,
           f"distribute.collective_timeout_s: must be > 0 seconds, got {dist.collective_timeout_s}")
    _check(dist.strategy != "none" or (devices is None and dist.cpu_devices is None),
           "distribute.strategy: is none, so distribute.devices and distribute.cpu_devices must be null; "
           "choose mirrored or multi_worker")
    _check(d.augmentation == "none" or dist.strategy == "none",
           f"data.augmentation: {d.augmentation} is not supported with distribute.strategy: "
           f"{dist.strategy} yet (views are tested on one device only); use none, or strategy none")
    m = p.num_microbatches
    if m is not None and devices:
        _check(m % len(devices) == 0, f"privacy.num_microbatches: {m} must be divisible by the number of "
               f"replicas ({len(devices)} devices in distribute.devices)")


def _validate_plan(plan: Any) -> None:
    """`training.plan`: auto, or {layer name: {forward: …, grads: …}} (layer names are checked against the
    model when the run starts)."""
    if plan == "auto":
        return
    _check(isinstance(plan, dict) and len(plan) > 0, f"training.plan: must be auto or a mapping of layer "
           f"names to choices, got {_describe(plan)}")
    for layer, choice in plan.items():
        _check(isinstance(choice, dict) and len(choice) > 0, f"training.plan.{layer}: must be a mapping such "
               f"as {{forward: native, grads: depthwise}}, got {_describe(choice)}")
        for key, value in choice.items():
            _check(key in PLAN_CHOICES, f"training.plan.{layer}.{key}: unknown key; allowed here: "
                   f"{', '.join(PLAN_CHOICES)}")
            _choice(f"training.plan.{layer}.{key}", value, PLAN_CHOICES[key])


def _validate_privacy(p: PrivacyConfig, d: DataConfig) -> None:
    _check(0 < p.delta < 1, f"privacy.delta: must be in (0, 1), got {p.delta}")
    _check(0 < p.l2_norm_clip, f"privacy.l2_norm_clip: must be > 0, got {p.l2_norm_clip}")
    _check(math.isfinite(p.l2_norm_clip) or not p.noise_multiplier,
           "privacy.l2_norm_clip: must be finite when noise_multiplier > 0 (the noise std is σ·C)")
    _check(p.canaries >= 0, f"privacy.canaries: must be ≥ 0, got {p.canaries}")
    _check(0 < p.feature_norm_noise_multiplier < math.inf,
           f"privacy.feature_norm_noise_multiplier: must be > 0, got {p.feature_norm_noise_multiplier}")
    refine = p.feature_norm_refine_noise_multiplier
    _check(refine is None or 0 < refine < math.inf,
           f"privacy.feature_norm_refine_noise_multiplier: must be > 0 or null (no refinement), got {refine}")
    for key in ("feature_norm_clip_mean", "feature_norm_clip_square", "feature_norm_refine_clip_mean",
                "feature_norm_refine_clip_square"):
        _check(0 < getattr(p, key) < math.inf, f"privacy.{key}: must be > 0, got {getattr(p, key)}")
    _check(p.canaries == 0 or d.sampling == "poisson",
           "privacy.canaries: the canary audit needs data.sampling: poisson (each canary may join any step)")
    if p.noise_multiplier is not None:
        _check(0 <= p.noise_multiplier < math.inf,
               f"privacy.noise_multiplier: must be ≥ 0, got {p.noise_multiplier}")
    if p.target_epsilon is not None:
        _check(0 < p.target_epsilon < math.inf,
               f"privacy.target_epsilon: must be > 0, got {p.target_epsilon}")
    if p.enabled:
        _check((p.noise_multiplier is None) != (p.target_epsilon is None),
               "privacy: give exactly one of noise_multiplier or target_epsilon when privacy.enabled is true")
    if p.num_microbatches is not None:
        m = p.num_microbatches
        _check(m >= 1, f"privacy.num_microbatches: must be ≥ 1 or null (per-example), got {m}")
        _check(d.batch_size % m == 0,
               f"privacy.num_microbatches: {m} does not divide data.batch_size {d.batch_size}")
        _check(d.sampling == "shuffle" or m == d.batch_size,
               "privacy.num_microbatches: microbatches need fixed-size batches; with data.sampling: poisson "
               "use null (per-example clipping), or set data.sampling: shuffle")


