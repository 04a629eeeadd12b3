"""The `tune:` block of a config: the search space of a private hyperparameter search, the distribution of
its number of trials, its privacy budget and its score.

```yaml
tune:
  space:                                   # any config key: a list of values, or a range
    training.learning_rate: {low: 2, high: 32}           # log-uniform (scale: log, the default)
    training.momentum: {low: 0.8, high: 0.95, scale: linear}
    privacy.l2_norm_clip: [0.05, 0.1, 0.2]
  distribution: logarithmic                # poisson | logarithmic | geometric | truncated_negative_binomial
  mean: 8                                  # E[K], ≥ 1
  shape: null                              # truncated_negative_binomial only: η ≥ 0
  target_epsilon: 3                        # ε of the whole search (or noise_multiplier: σ of every trial)
  holdout: 5000                            # the last N training examples score the trials (0: training set)
  score_noise_multiplier: 10               # std of the Gaussian noise on each trial's count of correct
```

Ranges are only for the continuous keys that do not enter ε (`RANGE_KEYS`); everything else is a list, so
the candidates' privacy parameters are finite and can all be accounted. The keys the search sets itself
(`SET_BY_SEARCH`) are not in the space. Ground floor: no privacy accounting here (the checks that need it —
a target ε the scores alone exceed — are made when the search is planned).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dpsgd_cli.config.parsing import _apply_override, _read_yaml, config_from_dict, flatten
from dpsgd_cli.config.schema import ExperimentConfig
from dpsgd_cli.config.validation import _describe
from dpsgd_cli.errors import ConfigError

DISTRIBUTIONS = ("poisson", "logarithmic", "geometric", "truncated_negative_binomial")
SCALES = ("log", "linear")
# Continuous keys a range may cover: none of them changes a trial's (q, steps, σ) or its releases.
RANGE_KEYS = ("training.learning_rate", "training.momentum", "training.ema_decay", "privacy.l2_norm_clip",
              "model.input_mean", "model.input_std", "privacy.feature_norm_clip_mean",
              "privacy.feature_norm_clip_square", "privacy.feature_norm_refine_clip_mean",
              "privacy.feature_norm_refine_clip_square")
_PLACES = "the search names and places its trials itself"
_SIGMA = "the search sets every trial's σ: use tune.target_epsilon or tune.noise_multiplier"
_DATA = "the data are fixed for the whole search (tune.holdout sets the split)"
SET_BY_SEARCH = {
    "name": _PLACES, "output_dir": _PLACES,
    "privacy.enabled": "every trial is private", "privacy.noise_multiplier": _SIGMA,
    "privacy.target_epsilon": _SIGMA, "privacy.delta": "one δ holds for the whole search",
    "privacy.reproducible": "the whole search has one mode", "privacy.canaries": "trials are not audited",
    "data.dataset": _DATA, "data.data_dir": _DATA, "data.train_size": _DATA, "data.test_size": _DATA,
}
_TUNE_FIELDS = ("space", "distribution", "mean", "shape", "target_epsilon", "noise_multiplier", "holdout",
                "score_noise_multiplier")
_RANGE_FIELDS = {"low", "high", "scale"}
MAX_CANDIDATES = 10000  # combinations of listed values accounted one by one


@dataclass(frozen=True)
class Axis:
    """One key of the space: `values` (a list to draw from uniformly) or a range [low, high) drawn
    log-uniformly (`scale` log) or uniformly (linear)."""

    key: str
    values: tuple[Any, ...] = ()
    low: float | None = None
    high: float | None = None
    scale: str = "log"

    @property
    def is_range(self) -> bool:
        return self.low is not None

    def pick(self, rng: np.random.Generator) -> int:
        """The index of one of the listed values, uniformly, from `rng` alone."""
        return int(rng.integers(len(self.values)))

    def draw(self, rng: np.random.Generator) -> float:
        """One value of the range, from `rng` alone (never from the data or other trials)."""
        if self.low is None or self.high is None:
            raise ValueError(f"{self.key}: a list of values, not a range")
        if self.scale == "log":
            return float(math.exp(rng.uniform(math.log(self.low), math.log(self.high))))
        return float(rng.uniform(self.low, self.high))

    def describe(self) -> str:
        if self.is_range:
            how = "log-uniform" if self.scale == "log" else "uniform"
            return f"{self.key} {how} in [{self.low:g}, {self.high:g})"
        return f"{self.key} in {{{', '.join(_text(v) for v in self.values)}}}"

    def to_dict(self) -> Any:
        if self.is_range:
            return {"low": self.low, "high": self.high, "scale": self.scale}
        return list(self.values)


@dataclass(frozen=True)
class TuneConfig:
    """The search's settings (see the module docstring); `space` in the order the keys were given."""

    space: tuple[Axis, ...]
    distribution: str = "logarithmic"
    mean: float = 8.0
    shape: float | None = None
    target_epsilon: float | None = None
    noise_multiplier: float | None = None
    holdout: int = 5000
    score_noise_multiplier: float = 10.0
    lists: tuple[Axis, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "lists", tuple(a for a in self.space if not a.is_range))

    @property
    def combinations(self) -> int:
        """Combinations of listed values (the ranges not counted)."""
        return math.prod(len(a.values) for a in self.lists)

    def space_size(self) -> str:
        """E.g. '12 combinations of listed values × 1 continuous range'."""
        n, ranges = self.combinations, len(self.space) - len(self.lists)
        text = f"{n} combination{'s' if n != 1 else ''} of listed values" if self.lists else ""
        if ranges:
            text += (" × " if text else "") + f"{ranges} continuous range{'s' if ranges != 1 else ''}"
        return text

    def to_dict(self) -> dict[str, Any]:
        return {"space": {a.key: a.to_dict() for a in self.space}, "distribution": self.distribution,
                "mean": self.mean, "shape": self.shape, "target_epsilon": self.target_epsilon,
                "noise_multiplier": self.noise_multiplier, "holdout": self.holdout,
                "score_noise_multiplier": self.score_noise_multiplier}


def load_tune_config(path: str | Path | None, overrides: list[str] | None = None,
                     space_file: str | Path | None = None) -> tuple[ExperimentConfig, TuneConfig]:
    """(base config, search settings) from the YAML at `path` with its `tune:` block, or the block read
    from `space_file` (a YAML file holding the block's keys; it replaces the config's block), then
    `--set` overrides (`tune.mean=4` sets the block). The base config's σ settings are replaced by the
    search's. ConfigError, naming the key, for anything wrong."""
    raw: dict[str, Any] = _read_yaml(Path(path)) if path is not None else {}
    if space_file is not None:
        raw["tune"] = _read_yaml(Path(space_file))
    for item in overrides or []:
        _apply_override(raw, item)
    block = raw.pop("tune", None)
    if block is None:
        where = f"{path}" if path is not None else "the config"
        raise ConfigError(f"tune: missing; {where} needs a tune: block (or pass --space FILE) with at least "
                          "tune.space")
    if not isinstance(block, dict):
        raise ConfigError(f"tune: must be a mapping of keys, got {_describe(block)}")
    return tune_from_dict(raw, block)


def tune_from_dict(raw: dict[str, Any], block: dict[str, Any]) -> tuple[ExperimentConfig, TuneConfig]:
    """Validate the base config `raw` (without its tune block) and the block."""
    for key in block:
        if key not in _TUNE_FIELDS:
            raise ConfigError(f"tune.{key}: unknown key; allowed here: {', '.join(_TUNE_FIELDS)}")
    settings = _settings(block)
    if raw.get("privacy") is None:
        raw["privacy"] = {}
    privacy = raw["privacy"]
    if isinstance(privacy, dict):  # else config_from_dict says what is wrong with it
        if privacy.get("enabled", True) is not True:
            raise ConfigError("privacy.enabled: must be true for a search (a trial without noise has ε = ∞)")
        privacy["noise_multiplier"] = settings["noise_multiplier"]
        privacy["target_epsilon"] = settings["target_epsilon"]
    base = config_from_dict(raw)
    if base.privacy.canaries:
        raise ConfigError(f"privacy.canaries: must be 0 for a search ({SET_BY_SEARCH['privacy.canaries']}; "
                          "audit a run of the published settings instead)")
    space = _space(block.get("space"), base)
    tune = TuneConfig(space=space, **settings)
    if tune.combinations > MAX_CANDIDATES:
        raise ConfigError(f"tune.space: {tune.combinations:,} combinations of listed values, more than the "
                          f"{MAX_CANDIDATES:,} the search accounts one by one; list fewer values, or give "
                          f"ranges for continuous keys ({', '.join(RANGE_KEYS[:4])}, …)")
    return base, tune


def _settings(block: dict[str, Any]) -> dict[str, Any]:
    """Every tune.* key but the space, checked."""
    distribution = block.get("distribution", "logarithmic")
    if distribution not in DISTRIBUTIONS:
        raise ConfigError(f"tune.distribution: {distribution!r} is not allowed; choose one of: "
                          f"{', '.join(DISTRIBUTIONS)}")
    mean = _number("tune.mean", block.get("mean", 8.0))
    if not mean > 0:
        raise ConfigError(f"tune.mean: the mean number of trials must be > 0, got {mean:g}")
    if not 1 <= mean < math.inf:
        raise ConfigError(f"tune.mean: must be ≥ 1 for {distribution} (the analysis of a random number of "
                          f"trials takes means ≥ 1), got {mean:g}")
    shape = block.get("shape")
    if distribution == "truncated_negative_binomial":
        if shape is None:
            raise ConfigError("tune.shape: truncated_negative_binomial needs its shape η ≥ 0 (0 is the "
                              "logarithmic distribution, 1 the geometric)")
        shape = _number("tune.shape", shape)
        if not 0 <= shape < math.inf:
            raise ConfigError(f"tune.shape: must be ≥ 0, got {shape:g}")
    elif shape is not None:
        raise ConfigError(f"tune.shape: only for truncated_negative_binomial, not for {distribution}; "
                          "remove it")
    target, sigma = block.get("target_epsilon"), block.get("noise_multiplier")
    if (target is None) == (sigma is None):
        raise ConfigError("tune: give exactly one of tune.target_epsilon (ε of the whole search) or "
                          "tune.noise_multiplier (σ of every trial)")
    if target is not None:
        target = _number("tune.target_epsilon", target)
        if not 0 < target < math.inf:
            raise ConfigError(f"tune.target_epsilon: must be > 0, got {target:g}")
    if sigma is not None:
        sigma = _number("tune.noise_multiplier", sigma)
        if not 0 < sigma < math.inf:
            raise ConfigError(f"tune.noise_multiplier: must be > 0 (a trial without noise has ε = ∞), "
                              f"got {sigma:g}")
    holdout = block.get("holdout", 5000)
    if isinstance(holdout, bool) or not isinstance(holdout, int) or holdout < 0:
        raise ConfigError(f"tune.holdout: must be a whole number of examples ≥ 0 (0: score on the training "
                          f"set), got {_describe(holdout)}")
    score = _number("tune.score_noise_multiplier", block.get("score_noise_multiplier", 10.0))
    if not 0 < score < math.inf:
        raise ConfigError(f"tune.score_noise_multiplier: must be > 0 (an exact score is not private), "
                          f"got {score:g}")
    return {"distribution": distribution, "mean": mean, "shape": shape, "target_epsilon": target,
            "noise_multiplier": sigma, "holdout": holdout, "score_noise_multiplier": score}


def _number(dotted: str, value: Any) -> float:
    if isinstance(value, bool):
        raise ConfigError(f"{dotted}: must be a number, got {_describe(value)}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{dotted}: must be a number, got {_describe(value)}") from None
    if math.isnan(number):
        raise ConfigError(f"{dotted}: must be a number, got NaN")
    return number


def _space(raw: Any, base: ExperimentConfig) -> tuple[Axis, ...]:
    if raw is None or raw == {}:
        raise ConfigError("tune.space: empty; give at least one config key with a list of values or a range, "
                          "e.g. training.learning_rate: {low: 0.5, high: 8}")
    if not isinstance(raw, dict):
        raise ConfigError(f"tune.space: must be a mapping of config keys to lists or ranges, got "
                          f"{_describe(raw)}")
    known = flatten(base.to_dict())
    axes = [_axis(key, spec, base, known) for key, spec in _entries(raw, "")]
    return tuple(axes)


def _entries(raw: dict[str, Any], prefix: str) -> list[tuple[str, Any]]:
    """(dotted key, list or range) pairs; nested mappings (`training: {learning_rate: …}`) are walked."""
    found = []
    for key, spec in raw.items():
        dotted = f"{prefix}{key}"
        if isinstance(spec, dict) and spec and not set(spec) & _RANGE_FIELDS:
            found += _entries(spec, dotted + ".")
        else:
            found.append((dotted, spec))
    return found


def _axis(key: str, spec: Any, base: ExperimentConfig, known: dict[str, Any]) -> Axis:
    where = f"tune.space.{key}"
    if key not in known:
        raise ConfigError(f"{where}: unknown config key; the space takes keys such as "
                          "training.learning_rate, privacy.l2_norm_clip, data.batch_size, training.epochs")
    if key in SET_BY_SEARCH:
        raise ConfigError(f"{where}: cannot be searched ({SET_BY_SEARCH[key]})")
    if isinstance(spec, dict):
        return _range_axis(key, spec, base)
    if not isinstance(spec, list) or not spec:
        raise ConfigError(f"{where}: must be a non-empty list of values or a range {{low: …, high: …}}, got "
                          f"{_describe(spec)}")
    for i, value in enumerate(spec):
        if any(value == other and type(value) is type(other) for other in spec[i + 1:]):
            raise ConfigError(f"{where}: {_text(value)} is listed twice")
        _check_value(where, key, value, base)
    return Axis(key, values=tuple(spec))


def _range_axis(key: str, spec: dict[str, Any], base: ExperimentConfig) -> Axis:
    where = f"tune.space.{key}"
    unknown = set(spec) - _RANGE_FIELDS
    if unknown:
        raise ConfigError(f"{where}.{sorted(unknown)[0]}: unknown key; a range takes low, high and scale")
    if key not in RANGE_KEYS:
        raise ConfigError(f"{where}: give a list of values; a range is only for continuous keys that do not "
                          f"change ε ({', '.join(RANGE_KEYS)})")
    if "low" not in spec or "high" not in spec:
        raise ConfigError(f"{where}: a range needs both low and high")
    low, high = _number(f"{where}.low", spec["low"]), _number(f"{where}.high", spec["high"])
    scale = spec.get("scale", "log")
    if scale not in SCALES:
        raise ConfigError(f"{where}.scale: {scale!r} is not allowed; choose one of: {', '.join(SCALES)}")
    if not (math.isfinite(low) and math.isfinite(high)):
        raise ConfigError(f"{where}: low and high must be finite, got {low:g} and {high:g}")
    if not low < high:
        raise ConfigError(f"{where}: low {low:g} must be below high {high:g}")
    if scale == "log" and low <= 0:
        raise ConfigError(f"{where}: a log-uniform range needs low > 0, got {low:g} (or use scale: linear)")
    for value in (low, high):
        _check_value(where, key, value, base)
    return Axis(key, low=low, high=high, scale=scale)


def _check_value(where: str, key: str, value: Any, base: ExperimentConfig) -> None:
    """The base config with `key` set to `value` must validate; its complaint, named by the space key."""
    raw = base.to_dict()
    node = raw
    *parents, last = key.split(".")
    for part in parents:
        node = node[part]
    node[last] = value
    try:
        config_from_dict(raw)
    except ConfigError as exc:
        message = str(exc)
        raise ConfigError(f"{where}: {_text(value)} does not fit the config ({message})") from None


def _text(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)
