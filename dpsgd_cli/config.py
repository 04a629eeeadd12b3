"""Experiment configuration: frozen dataclasses mirroring the YAML, loaded and validated in one place.

Vocabulary follows TensorFlow Privacy: `noise_multiplier` (σ), `l2_norm_clip` (C), `num_microbatches`.
Every error names the dotted key and what is allowed; unknown keys are rejected.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import reprlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dpsgd_cli.errors import ConfigError

DATASETS = ("fashion_mnist", "mnist")
ARCHITECTURES = ("tfp_cnn", "tanh_cnn", "scatter_linear", "scatter_pointwise", "scatter_cnn",
                 "scatter_cnn_wide", "scatter_cnn_wider")
PIXEL_ARCHITECTURES = ("tfp_cnn", "tanh_cnn")  # on 28×28 pixels (the others on scattering features)
ACTIVATIONS = ("relu", "tanh")
FEATURE_NORMS = ("group_norm", "private_stats")
OPTIMIZERS = ("sgd", "momentum", "adam")
SAMPLINGS = ("poisson", "shuffle")
# data.augmentation → views per example (augmentation multiplicity K)
AUGMENTATIONS = {"none": 1, "mirror": 2}
JIT_CHOICES = ("auto", True, False)
GRADIENT_PATHS = ("auto", "fast", "vectorized_map")
PLAN_CHOICES = {"forward": ("native", "patches", "slices"), "grads": ("materialize", "ghost", "depthwise")}
STRATEGIES = ("none", "mirrored", "multi_worker")
CLUSTERS = ("tf_config", "slurm")
DATASET_SIZES = {"fashion_mnist": 60000, "mnist": 60000}
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._=+-]*$")
_BUILDER_RE = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """Which data and how each step samples it. `batch_size` is the (expected) examples per step."""

    dataset: str = "fashion_mnist"
    data_dir: str | None = None
    batch_size: int = 256
    sampling: str = "poisson"
    train_size: int | None = None
    test_size: int | None = None
    augmentation: str = "none"


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """The built-in `architecture` (with `activation`), or `builder`: "package.module:function", a function
    called as `function(input_shape=(28, 28, 1), num_classes=10)` that returns an un-compiled Keras model
    whose outputs are logits; when given, it replaces `architecture` and `activation`.
    `input_mean`, `input_std`: the pixel models (`tfp_cnn`, `tanh_cnn`) see (x − mean) / std instead of the
    pixels x in [0, 1] (a weightless first layer; the defaults 0, 1 leave the model as it is).
    `feature_norm`: how the ScatterNet models normalise their features — `group_norm` (GroupNorm, 27 groups,
    per example) or `private_stats` (per-channel mean and variance of the training set, released with
    noise before training and composed into ε; `training.feature_norm`)."""

    architecture: str = "tfp_cnn"
    activation: str = "relu"
    builder: str | None = None
    input_mean: float = 0.0
    input_std: float = 1.0
    feature_norm: str = "group_norm"


@dataclass(frozen=True, kw_only=True)
class TrainingConfig:
    epochs: int = 10
    optimizer: str = "adam"
    learning_rate: float = 0.001
    momentum: float = 0.9
    jit_compile: Any = "auto"
    gradient_path: str = "auto"
    # auto: the planner times the formulations on this device (dpsgd_cli.training.planner); or fix some
    # layers by hand, e.g. {conv1: {forward: native, grads: depthwise}, pool1: {forward: slices}}
    plan: Any = "auto"
    # auto: the planner measures how many slots a private step's per-example work handles per pass (fewer
    # per pass = less memory, same update); or a number of slots
    chunk_size: Any = "auto"
    # issue 15: examples per compiled pass (the logical batch is summed over passes before the noise);
    # EMA of the weights used for evaluation (null = off); "constant" or "cosine" learning rate
    physical_batch_size: int | None = None
    ema_decay: float | None = None
    lr_schedule: str = "constant"


@dataclass(frozen=True, kw_only=True)
class PrivacyConfig:
    """DP-SGD settings. σ is `noise_multiplier` (noise std = σ·C on the clipped sum), C is `l2_norm_clip`.

    `num_microbatches`: null = per-example clipping; M < batch_size clips the mean gradient of each of M
    microbatches (TensorFlow Privacy semantics), which doubles the sensitivity (accounted as σ/2).
    `target_epsilon`: instead of `noise_multiplier`, calibrate σ so the run ends at this ε (at `delta`).
    `canaries`: m canary examples for a one-run privacy audit (`dpsgd audit`), each in the training set
    with probability 1/2; 0 = none.
    `reproducible`: false (default) = the noise, the batches and the canary coins come from a secret key
    drawn from OS entropy for each run; true = derived from `seed` and the run name (research and tests:
    the run's ε then holds only while seed and config stay secret). See `run_key`.
    """

    enabled: bool = True
    noise_multiplier: float | None = None
    target_epsilon: float | None = None
    l2_norm_clip: float = 1.0
    num_microbatches: int | None = None
    delta: float = 1e-5
    canaries: int = 0
    reproducible: bool = False
    # model.feature_norm: private_stats — the release of the features' per-channel statistics
    feature_norm_noise_multiplier: float = 8.0
    feature_norm_clip_mean: float = 0.3
    feature_norm_clip_square: float = 0.15
    # optional refinement: a second release of both statistics, of the features standardised by the first
    # (null: none); its bounds are in standardised units (√81 = 9 is one unit per channel)
    feature_norm_refine_noise_multiplier: float | None = None
    feature_norm_refine_clip_mean: float = 9.0
    feature_norm_refine_clip_square: float = 18.0


@dataclass(frozen=True, kw_only=True)
class DistributeConfig:
    """tf.distribute (issue 17; `training.distribute`). `strategy`: none (one device, today's step),
    mirrored (the devices of this machine) or multi_worker (several processes/hosts, `cluster` from the
    TF_CONFIG environment variable or SLURM's). `devices`: e.g. [GPU:0, GPU:1]; null = all GPUs, else all
    (logical) CPUs. `cpu_devices`: split the CPU into N logical devices (tests, benchmarks; null = no split).
    `collective_timeout_s`: a collective (all-reduce) waiting longer for a lost worker raises an error.
    The privacy mechanism and ε do not depend on any of these."""

    strategy: str = "none"
    devices: list | None = None
    cpu_devices: int | None = None
    cluster: str = "tf_config"
    collective_timeout_s: float = 600.0


@dataclass(frozen=True, kw_only=True)
class ExperimentConfig:
    name: str = "run"
    output_dir: str = "results"
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    distribute: DistributeConfig = field(default_factory=DistributeConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_SECTIONS = {"data": DataConfig, "model": ModelConfig, "training": TrainingConfig, "privacy": PrivacyConfig,
             "distribute": DistributeConfig}


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> ExperimentConfig:
    """Read YAML at `path` (or start from defaults), apply `key.sub=value` overrides, validate."""
    raw: dict[str, Any] = {}
    if path is not None:
        raw = _read_yaml(Path(path))
    for item in overrides or []:
        _apply_override(raw, item)
    return config_from_dict(raw)


def with_overrides(cfg: ExperimentConfig, overrides: list[str]) -> ExperimentConfig:
    """`cfg` with `key.sub=value` overrides applied (as `--set` does), validated."""
    raw = cfg.to_dict()
    for item in overrides:
        _apply_override(raw, item)
    return config_from_dict(raw)


def config_from_dict(raw: dict[str, Any]) -> ExperimentConfig:
    """Validate a nested dict (as from YAML) into an ExperimentConfig."""
    if not isinstance(raw, dict):
        raise ConfigError("config: the top level must be a mapping of keys (name, seed, data, model, ...)")
    top_fields = {f.name for f in dataclasses.fields(ExperimentConfig)}
    _reject_unknown(raw, top_fields, "")
    sections = {}
    for key, cls in _SECTIONS.items():
        value = raw.get(key, {})
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: must be a mapping of keys, got {_describe(value)}")
        _reject_unknown(value, {f.name for f in dataclasses.fields(cls)}, key + ".")
        sections[key] = cls(**{k: _coerce(cls, k, v, key) for k, v in value.items()})
    top = {k: _coerce(ExperimentConfig, k, v, "") for k, v in raw.items() if k not in _SECTIONS}
    cfg = ExperimentConfig(**top, **sections)
    validate(cfg)
    return cfg


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read config file ({exc.__class__.__name__})") from None
    try:
        raw = yaml.safe_load(text)
    except Exception as exc:  # besides YAMLError: RecursionError (deep nesting), IndexError… ('!!float ')
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}: not valid YAML{where}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, got {_describe(raw)}")
    return raw


def _apply_override(raw: dict[str, Any], item: str) -> None:
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. privacy.noise_multiplier=1.3")
    key, _, text = item.partition("=")
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"--set {item!r}: the key must be dotted names, e.g. data.batch_size")
    try:
        value = yaml.safe_load(text)
    except Exception:  # YAMLError, RecursionError, and PyYAML's tag constructors' IndexError, KeyError…
        value = text
    node = raw
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"--set {item!r}: {part} is not a section")
        node = child
    node[parts[-1]] = value


def _reject_unknown(raw: dict, allowed: set[str], prefix: str) -> None:
    for key in raw:
        if key not in allowed:
            raise ConfigError(f"{prefix}{key if str(key).isidentifier() else repr(key)}: unknown key; "
                              f"allowed here: {', '.join(sorted(allowed))}")


def _describe(value: Any) -> str:
    return f"{type(value).__name__} {reprlib.repr(value)}"[:80]  # bounded: YAML aliases can nest hugely


def _coerce(cls, key: str, value: Any, section: str) -> Any:
    """Check the YAML value's type against the dataclass annotation; accept '1e-5'-style float strings."""
    dotted = f"{section}.{key}" if section else key
    annotation = {f.name: f.type for f in dataclasses.fields(cls)}[key]
    if key == "jit_compile":
        if value in ("auto", True, False):
            return value
        raise ConfigError(f"{dotted}: must be true, false or auto, got {_describe(value)}")
    if key == "chunk_size":
        if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            return value
        raise ConfigError(f"{dotted}: must be auto or a whole number of examples ≥ 1, got {_describe(value)}")
    optional = "None" in annotation
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{dotted}: must not be empty")
    base = annotation.replace("| None", "").strip()
    if base == "bool":
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{dotted}: must be true or false, got {_describe(value)}")
    if base == "int":
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{dotted}: must be an integer, got {_describe(value)}")
    if base == "float":
        return _as_float(dotted, value)
    if base == "str":
        if isinstance(value, str):
            return value
        raise ConfigError(f"{dotted}: must be a string, got {_describe(value)}")
    return value


def _as_float(dotted: str, value: Any) -> float:
    if isinstance(value, bool):
        raise ConfigError(f"{dotted}: must be a number, got {_describe(value)}")
    if isinstance(value, (int, float)):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            raise ConfigError(f"{dotted}: must be a number, got {_describe(value)}") from None
    else:
        raise ConfigError(f"{dotted}: must be a number, got {_describe(value)}")
    if math.isnan(number):
        raise ConfigError(f"{dotted}: must be a number, got NaN")
    return number


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
    _choice("training.lr_schedule", t.lr_schedule, ("constant", "cosine"))
    _validate_privacy(p, d)
    _validate_distribute(cfg.distribute, p, d)


def _validate_distribute(dist: DistributeConfig, p: PrivacyConfig, d: DataConfig) -> None:
    """`distribute.*`; that the devices exist is checked when the run starts (`training.distribute`)."""
    _choice("distribute.strategy", dist.strategy, STRATEGIES)
    _choice("distribute.cluster", dist.cluster, CLUSTERS)
    devices = dist.devices
    _check(devices is None or (isinstance(devices, list) and devices and all(
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
    _check(isinstance(plan, dict) and plan, f"training.plan: must be auto or a mapping of layer names to "
           f"choices, got {_describe(plan)}")
    for layer, choice in plan.items():
        _check(isinstance(choice, dict) and choice, f"training.plan.{layer}: must be a mapping such as "
               f"{{forward: native, grads: depthwise}}, got {_describe(choice)}")
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
    bounds = (p.feature_norm_clip_mean, p.feature_norm_clip_square)
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


def dataset_size(cfg: ExperimentConfig) -> int:
    """Training examples the run uses (n), without loading the data."""
    full = DATASET_SIZES[cfg.data.dataset]
    return min(full, cfg.data.train_size) if cfg.data.train_size else full


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"privacy": {"delta": 1e-5}} → {"privacy.delta": 1e-5}."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def replace(cfg: ExperimentConfig, **changes: Any) -> ExperimentConfig:
    """Return a copy with dotted-key changes, e.g. replace(cfg, **{"privacy.noise_multiplier": 1.3})."""
    raw = cfg.to_dict()
    for dotted, value in changes.items():
        node = raw
        *parents, last = dotted.split(".")
        for part in parents:
            node = node[part]
        node[last] = value
    return config_from_dict(raw)
