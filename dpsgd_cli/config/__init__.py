"""Experiment configuration: the schema (`schema`), reading YAML and `--set` overrides (`parsing`), checks
(`validation`) and values derived without the data (`derived`). Every error names the dotted key and what
is allowed; unknown keys are rejected. No TensorFlow here."""

from dpsgd_cli.config.derived import (
    dataset_size,
    feature_releases,
    microbatch_size,
    release_bounds,
    resolved_data_dir,
    views_per_example,
)
from dpsgd_cli.config.parsing import (
    config_from_dict,
    flatten,
    load_config,
    replace,
    resolve_aliases,
    with_overrides,
)
from dpsgd_cli.config.schema import (
    _SECTIONS,
    ACTIVATIONS,
    ARCHITECTURE_ALIASES,
    ARCHITECTURES,
    AUGMENTATIONS,
    BUILTIN_DATASETS,
    CLUSTERS,
    DATASET_SIZES,
    DATASETS,
    FEATURE_NORMS,
    FILE_DATASETS,
    GRADIENT_PATHS,
    JIT_CHOICES,
    LR_SCHEDULES,
    OPTIMIZERS,
    PIXEL_ARCHITECTURES,
    PLAN_CHOICES,
    SAMPLINGS,
    STRATEGIES,
    DataConfig,
    DistributeConfig,
    ExperimentConfig,
    ModelConfig,
    PrivacyConfig,
    TrackingConfig,
    TrainingConfig,
    json_schema,
    json_schema_text,
    reference_rows,
)
from dpsgd_cli.config.validation import validate

__all__ = [
    "_SECTIONS", "ACTIVATIONS", "ARCHITECTURE_ALIASES", "ARCHITECTURES", "AUGMENTATIONS", "BUILTIN_DATASETS",
    "CLUSTERS", "DATASET_SIZES", "DATASETS", "FEATURE_NORMS", "FILE_DATASETS", "GRADIENT_PATHS",
    "JIT_CHOICES", "LR_SCHEDULES", "OPTIMIZERS", "PIXEL_ARCHITECTURES", "PLAN_CHOICES", "SAMPLINGS",
    "STRATEGIES", "DataConfig", "DistributeConfig", "ExperimentConfig", "ModelConfig", "PrivacyConfig",
    "TrackingConfig", "TrainingConfig", "config_from_dict", "dataset_size", "feature_releases", "flatten",
    "json_schema", "json_schema_text", "load_config", "microbatch_size", "reference_rows", "release_bounds",
    "replace", "resolve_aliases", "resolved_data_dir", "validate", "views_per_example", "with_overrides",
]
