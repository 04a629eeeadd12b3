"""The experiment schema: frozen dataclasses mirroring the YAML, each field with its default and a one-line
`help` (the config reference and the JSON Schema are generated from them, so neither can drift).

Vocabulary follows TensorFlow Privacy: `noise_multiplier` (σ), `l2_norm_clip` (C), `num_microbatches`.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BUILTIN_DATASETS = ("fashion_mnist", "mnist")  # IDX files or the Keras download
FILE_DATASETS = ("npz", "image_folder", "csv")  # read from data.path
DATASETS = (*BUILTIN_DATASETS, "cifar10", "cifar100", *FILE_DATASETS)
ARCHITECTURES = ("tfp_cnn", "tanh_cnn", "scatter_linear", "scatter_pointwise", "scatter_cnn_16_32",
                 "scatter_cnn_32_64", "scatter_cnn_64_128", "mlp")
# other names of model.architecture, read as the name they map to (run.yaml files written under them still
# load, resume and audit); configs are written with the names of ARCHITECTURES
ARCHITECTURE_ALIASES = {"scatter_cnn": "scatter_cnn_16_32", "scatter_cnn_wide": "scatter_cnn_32_64",
                        "scatter_cnn_wider": "scatter_cnn_64_128"}
PIXEL_ARCHITECTURES = ("tfp_cnn", "tanh_cnn")  # on pixels (the scatter_* models on scattering features)
ACTIVATIONS = ("relu", "tanh")
FEATURE_NORMS = ("group_norm", "private_stats")
OPTIMIZERS = ("sgd", "momentum", "adam")
SAMPLINGS = ("poisson", "shuffle")
# data.augmentation → views per example (augmentation multiplicity K)
AUGMENTATIONS = {"none": 1, "mirror": 2}
JIT_CHOICES = ("auto", True, False)
GRADIENT_PATHS = ("auto", "fast", "vectorized_map")
LR_SCHEDULES = ("constant", "cosine")
PLAN_CHOICES = {"forward": ("native", "patches", "slices"), "grads": ("materialize", "ghost", "depthwise")}
STRATEGIES = ("none", "mirrored", "multi_worker")
CLUSTERS = ("tf_config", "slurm")
DATASET_SIZES = {"fashion_mnist": 60000, "mnist": 60000, "cifar10": 50000, "cifar100": 50000}
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._=+-]*$")
_BUILDER_RE = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")


def _key(default: Any, help: str, choices: tuple | None = None) -> Any:
    """A config field: its default, its one-line help, and (when closed) the values allowed."""
    meta = {"help": help} if choices is None else {"help": help, "choices": tuple(choices)}
    return field(default=default, metadata=meta)


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """Which data and how each step samples it. `batch_size` is the (expected) examples per step."""

    dataset: str = _key("fashion_mnist", "the data: a built-in dataset (fashion_mnist, mnist, cifar10, "
                                          "cifar100) or your own from data.path (npz, image_folder, csv)",
                        DATASETS)
    data_dir: str | None = _key(None, "folder with the IDX .gz files (or cifar-10-batches-py, "
                                      "cifar-100-python); null: $DPSGD_DATA_DIR, else the Keras download")
    path: str | None = _key(None, "npz: the .npz file (x_train, y_train, x_test, y_test); image_folder: the "
                                  "folder holding train/<class>/ and test/<class>/; csv: the folder holding "
                                  "train.csv and test.csv")
    label_column: str = _key("label", "csv: the column holding the labels 0..K−1 (all others are features)")
    batch_size: int = _key(256, "B: expected examples per step (poisson) or the exact batch size (shuffle)")
    sampling: str = _key("poisson", "poisson: each example joins each step with probability q = B/n (what ε "
                                    "assumes); shuffle: fixed batches of a per-epoch permutation (ε then "
                                    "optimistic)", SAMPLINGS)
    train_size: int | None = _key(None, "use only the first N training examples (quick runs, tests); null: "
                                        "all")
    test_size: int | None = _key(None, "use only the first N test examples; null: all")
    augmentation: str = _key("none", "mirror: augmentation multiplicity K = 2 (the image and its left-right "
                                     "mirror clipped as one unit: sensitivity, σ and ε stay per example)",
                             tuple(AUGMENTATIONS))


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """The built-in `architecture` (with `activation`), or `builder`: "package.module:function", a function
    called as `function(input_shape=..., num_classes=...)` with the data's shape (e.g. (28, 28, 1)) and
    number of classes (e.g. 10), that returns an un-compiled Keras model whose outputs are logits; when
    given, it replaces `architecture` and `activation`."""

    architecture: str = _key("tfp_cnn", "the built-in model: tfp_cnn is TensorFlow Privacy's tutorial CNN; "
                                        "mlp a small multilayer perceptron (any input, e.g. csv); the others "
                                        "are the recipes of the results page (scatter_cnn_C1_C2: "
                                        "ScatterNet features, then convolutions of C1 and C2 channels)",
                             ARCHITECTURES)
    activation: str = _key("relu", "the hidden layers' activation", ACTIVATIONS)
    builder: str | None = _key(None, "\"package.module:function\" building any Keras model (logits) "
                                     "instead of architecture")
    input_mean: float = _key(0.0, "pixel models see (x − input_mean) / input_std (a weightless first layer)")
    input_std: float = _key(1.0, "see input_mean; the defaults leave the model as it is")
    feature_norm: str = _key("group_norm", "ScatterNet models: group_norm (per example, free) or "
                                           "private_stats (per-channel statistics released with noise "
                                           "before training, composed into ε)", FEATURE_NORMS)


@dataclass(frozen=True, kw_only=True)
class TrainingConfig:
    """How the model is trained: epochs, optimizer, and the speed settings of the compiled step."""

    epochs: int = _key(10, "epochs; under Poisson sampling epoch e ends after step ⌈e·n/B⌉")
    optimizer: str = _key("adam", "sgd, momentum (SGD with training.momentum) or adam", OPTIMIZERS)
    learning_rate: float = _key(0.001, "the optimizer's learning rate")
    momentum: float = _key(0.9, "momentum of optimizer: momentum")
    jit_compile: Any = _key("auto", "XLA: true, false, or auto (whichever the planner measures faster on "
                                    "this device)", JIT_CHOICES)
    gradient_path: str = _key("auto", "per-example gradients: fast (layer rules), vectorized_map (the "
                                      "general reference), auto (fast when every layer is supported)",
                              GRADIENT_PATHS)
    plan: Any = _key("auto", "per-layer formulations: auto (measured on this device, cached) or e.g. "
                             "{conv1: {forward: native, grads: depthwise}}")
    chunk_size: Any = _key("auto", "slots of per-example work per sequential pass inside the step (less "
                                   "memory, the same update): auto (measured) or a number")
    physical_batch_size: int | None = _key(None, "examples per compiled pass; a larger logical batch is "
                                                 "summed over passes before the noise")
    ema_decay: float | None = _key(None, "exponential moving average of the weights for evaluation and "
                                         "saving (post-processing: free); null: off")
    lr_schedule: str = _key("constant", "constant, or cosine (decay to 0 over the run's steps)", LR_SCHEDULES)


@dataclass(frozen=True, kw_only=True)
class PrivacyConfig:
    """DP-SGD settings. σ is `noise_multiplier` (noise std = σ·C on the clipped sum), C is `l2_norm_clip`."""

    enabled: bool = _key(True, "false: the non-private baseline on the same code path (no clipping or noise)")
    noise_multiplier: float | None = _key(None, "σ: the noise std is σ·C on the sum of clipped gradients")
    target_epsilon: float | None = _key(None, "instead of σ: the smallest σ reaching this ε (PLD, at delta) "
                                              "after all epochs")
    l2_norm_clip: float = _key(1.0, "C: every per-example (or per-microbatch) gradient is clipped to global "
                                    "L2 norm ≤ C")
    num_microbatches: int | None = _key(None, "null: per-example clipping; M: clip the mean gradient of each "
                                              "of M microbatches (needs sampling: shuffle; accounted with "
                                              "σ/2)")
    delta: float = _key(1e-5, "δ of the reported (ε, δ)")
    canaries: int = _key(0, "canary examples for a one-run privacy audit (dpsgd audit); needs sampling: "
                            "poisson")
    reproducible: bool = _key(False, "false: noise, batches and canary coins from a fresh secret key (OS "
                                     "entropy, kept in run.key); true: derived from seed (research and tests "
                                     "only)")
    feature_norm_noise_multiplier: float = _key(8.0, "feature_norm private_stats: σ of each of the two "
                                                     "full-batch Gaussian releases")
    feature_norm_clip_mean: float = _key(0.3, "L2 bound on each example's per-channel feature means")
    feature_norm_clip_square: float = _key(0.15, "L2 bound on each example's per-channel feature mean "
                                                 "squares")
    feature_norm_refine_noise_multiplier: float | None = _key(None, "a number: two more releases (this σ "
                                                                    "each) of the statistics of the "
                                                                    "standardised features; null: none")
    feature_norm_refine_clip_mean: float = _key(9.0, "the refinement's mean bound, in standardised units")
    feature_norm_refine_clip_square: float = _key(18.0, "the refinement's mean-square bound, in "
                                                        "standardised units")


@dataclass(frozen=True, kw_only=True)
class DistributeConfig:
    """tf.distribute. The privacy mechanism and ε do not depend on any of these."""

    strategy: str = _key("none", "none: one device; mirrored: this machine's devices; multi_worker: one "
                                 "process per worker", STRATEGIES)
    devices: list | None = _key(None, "mirrored: e.g. [GPU:0, GPU:1]; null: all GPUs, else all (logical) "
                                      "CPUs")
    cpu_devices: int | None = _key(None, "split the CPU into N logical devices (tests, benchmarks)")
    cluster: str = _key("tf_config", "multi_worker: the cluster from TF_CONFIG, or slurm", CLUSTERS)
    collective_timeout_s: float = _key(600.0, "seconds a collective may wait for a lost worker before the "
                                              "run fails with one error line")


@dataclass(frozen=True, kw_only=True)
class TrackingConfig:
    """Experiment trackers fed after every epoch with what the privacy statement covers (test metrics, ε,
    the hyperparameters, the statement); the training metrics only with `training_metrics: true`."""

    tensorboard: bool = _key(False, "write TensorBoard event files to <run dir>/tensorboard/ (needs the "
                                    "tensorboard package: pip install tensorboard)")
    mlflow: Any = _key(False, "log to MLflow: true (MLFLOW_TRACKING_URI if set, else sqlite:///mlflow.db "
                              "in the current folder) or a tracking URI; needs pip install mlflow")
    mlflow_experiment: str = _key("dpsgd", "the MLflow experiment the runs are logged in")
    training_metrics: bool = _key(False, "also log train_loss and train_accuracy (computed on the private "
                                         "batches without noise: not covered by ε; the statement says so)")


@dataclass(frozen=True, kw_only=True)
class ExperimentConfig:
    """One experiment: a name, where results go, the non-secret seed, and the sections. Frozen; build it
    with `load_config` (which validates it) and change it with `config.with_overrides`.

    Attributes:
        name: run name; results go to `<output_dir>/<name>/` (`run_dir`).
        output_dir: where run directories are created.
        seed: seeds what is not secret (initial weights, canary images); noise and batches come from the
            run key.
        data, model, training, privacy, distribute: the sections, one per YAML section (see the config
            reference for every key).
    """

    name: str = _key("run", "run name: results go to <output_dir>/<name>/")
    output_dir: str = _key("results", "where run directories are created")
    seed: int = _key(0, "seeds what is not secret: initial weights, canary images (noise and batches come "
                        "from the run key)")
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    distribute: DistributeConfig = field(default_factory=DistributeConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    @property
    def run_dir(self) -> Path:
        """`output_dir / name`: the run's directory."""
        return Path(self.output_dir) / self.name

    def to_dict(self) -> dict[str, Any]:
        """The config as nested dicts, as in the YAML file."""
        return dataclasses.asdict(self)


_SECTIONS = {"data": DataConfig, "model": ModelConfig, "training": TrainingConfig, "privacy": PrivacyConfig,
             "distribute": DistributeConfig, "tracking": TrackingConfig}


def reference_rows() -> list[tuple[str, Any, str, tuple | None]]:
    """(dotted key, default, help, allowed values or None) for every key, in schema order."""
    rows = []
    for f in dataclasses.fields(ExperimentConfig):
        if f.name in _SECTIONS:
            rows += [(f"{f.name}.{g.name}", g.default, g.metadata.get("help", ""), g.metadata.get("choices"))
                     for g in dataclasses.fields(_SECTIONS[f.name])]
        else:
            rows.append((f.name, f.default, f.metadata.get("help", ""), f.metadata.get("choices")))
    return rows


JSON_SCHEMA_DIALECT = "http://json-schema.org/draft-07/schema#"  # what editors' YAML support implements


def json_schema() -> dict[str, Any]:
    """A JSON Schema of the YAML file, for editors: pydantic's schema of the dataclasses, with each key's
    help as its description, closed choices as enums and unknown keys refused. It declares draft-07 (the
    draft VS Code's YAML extension implements) and uses only keywords draft-07 knows; its `$ref`s are
    JSON pointers into `$defs`, which every draft resolves."""
    from pydantic import TypeAdapter

    schema = {"$schema": JSON_SCHEMA_DIALECT, **TypeAdapter(ExperimentConfig).json_schema()}
    rows = {key: (help_, choices) for key, _, help_, choices in reference_rows()}
    defs = schema.get("$defs", {})
    for section, cls in [("", ExperimentConfig), *_SECTIONS.items()]:
        node = schema if not section else defs[cls.__name__]
        node["additionalProperties"] = False
        node.pop("required", None)  # every key has a default
        for name, prop in node.get("properties", {}).items():
            dotted = f"{section}.{name}" if section else name
            if dotted in rows:
                help_, choices = rows[dotted]
                prop["description"] = help_
                if choices is not None:
                    prop["enum"] = list(choices)
    schema["title"] = "dpsgd experiment"
    return schema


def json_schema_text() -> str:
    """`json_schema()` as the text `dpsgd config schema` prints and docs/dpsgd-config.schema.json holds:
    two-space indented JSON, non-ASCII characters kept (σ, ε), ending in a newline."""
    import json

    return json.dumps(json_schema(), indent=2, ensure_ascii=False) + "\n"
