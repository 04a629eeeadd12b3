"""Reading a config: YAML files, `--set KEY=VALUE` overrides, type checks against the schema, and the
dotted-key helpers (`flatten`, `replace`). Every error names the dotted key and what is allowed."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import yaml

from dpsgd_cli.config.schema import _SECTIONS, ARCHITECTURE_ALIASES, ExperimentConfig
from dpsgd_cli.config.validation import _describe, validate
from dpsgd_cli.errors import ConfigError


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> ExperimentConfig:
    """Read YAML at `path` (or start from defaults), apply `key.sub=value` overrides, validate.

    Args:
        path: an experiment YAML file, or None for the defaults.
        overrides: `--set` style items, e.g. `["training.epochs=1", "privacy.noise_multiplier=1.3"]`,
            applied in order; values are read as YAML scalars.

    Returns:
        The validated, frozen `ExperimentConfig`.

    Raises:
        ConfigError: an unreadable file, an unknown key, a value of the wrong type or out of range; the
            message names the dotted key and what is allowed.
    """
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
    raw = resolve_aliases(raw)
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


def resolve_aliases(raw: dict[str, Any]) -> dict[str, Any]:
    """A copy of a config mapping (as from YAML) whose `model.architecture`, if it is another name of a
    built-in model (`ARCHITECTURE_ALIASES`), is replaced by the model's name; anything else is unchanged."""
    model = raw.get("model")
    if not isinstance(model, dict):
        return raw
    name = model.get("architecture")
    if not isinstance(name, str) or name not in ARCHITECTURE_ALIASES:
        return raw
    return {**raw, "model": {**model, "architecture": ARCHITECTURE_ALIASES[name]}}


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
