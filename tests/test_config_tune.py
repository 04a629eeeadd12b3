"""dpsgd_cli.config.tune: the tune: block — its space of lists and ranges, K's distribution, the budget and
the score — validated with one-line errors that name the key; `dpsgd tune` exits 2 on each, no traceback."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from dpsgd_cli.cli import app
from dpsgd_cli.config.tune import RANGE_KEYS, TuneConfig, load_tune_config, tune_from_dict
from dpsgd_cli.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]

BASE = {"data": {"batch_size": 64}, "training": {"epochs": 1}}
GOOD = {"space": {"training.learning_rate": {"low": 0.1, "high": 2.0}, "privacy.l2_norm_clip": [0.5, 1.0]},
        "distribution": "logarithmic", "mean": 4, "target_epsilon": 3.0}


def load(block: dict, base: dict | None = None):
    return tune_from_dict(yaml.safe_load(yaml.safe_dump(base or BASE)), dict(block))


def test_a_good_block_loads():
    base, tune = load(GOOD)
    assert [a.key for a in tune.space] == ["training.learning_rate", "privacy.l2_norm_clip"]
    lr, clip = tune.space
    assert lr.is_range and (lr.low, lr.high, lr.scale) == (0.1, 2.0, "log")
    assert clip.values == (0.5, 1.0) and tune.lists == (clip,) and tune.combinations == 2
    assert (tune.distribution, tune.mean, tune.shape, tune.target_epsilon) == ("logarithmic", 4.0, None, 3.0)
    assert tune.noise_multiplier is None and tune.holdout == 5000 and tune.score_noise_multiplier == 10.0
    assert tune.space_size() == "2 combinations of listed values × 1 continuous range"
    # the base config carries the search's budget, never a σ of its own
    assert base.privacy.target_epsilon == 3.0 and base.privacy.noise_multiplier is None


def test_the_base_configs_sigma_settings_are_replaced_by_the_searchs():
    base, _ = load({**GOOD, "target_epsilon": None, "noise_multiplier": 2.5},
                   {**BASE, "privacy": {"target_epsilon": 3.0}})
    assert base.privacy.noise_multiplier == 2.5 and base.privacy.target_epsilon is None


def test_nested_space_keys_and_set_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    nested = {"training": {"momentum": [0.8, 0.9]}}
    path.write_text(yaml.safe_dump({**BASE, "tune": {**GOOD, "space": nested}}))
    _, tune = load_tune_config(path, ["tune.mean=6", "tune.space.privacy.l2_norm_clip=[0.1, 0.2, 0.4]"])
    assert tune.mean == 6.0
    assert {a.key: a.values for a in tune.space} == {"training.momentum": (0.8, 0.9),
                                                      "privacy.l2_norm_clip": (0.1, 0.2, 0.4)}


def test_a_space_file_replaces_the_configs_block(tmp_path):
    config, space = tmp_path / "c.yaml", tmp_path / "s.yaml"
    config.write_text(yaml.safe_dump({**BASE, "tune": GOOD}))
    space.write_text(yaml.safe_dump({"space": {"training.epochs": [1, 2]}, "distribution": "poisson",
                                     "mean": 3, "noise_multiplier": 1.5}))
    _, tune = load_tune_config(config, [], space)
    assert [a.key for a in tune.space] == ["training.epochs"] and tune.distribution == "poisson"


def test_draws_stay_in_the_space():
    _, tune = load({**GOOD, "space": {"training.learning_rate": {"low": 0.1, "high": 2.0},
                                      "training.momentum": {"low": 0.5, "high": 0.9, "scale": "linear"},
                                      "data.batch_size": [32, 64]}})
    lr, momentum, batch = tune.space
    rng = np.random.default_rng(0)
    lrs = np.array([lr.draw(rng) for _ in range(4000)])
    assert lrs.min() >= 0.1 and lrs.max() < 2.0
    # log-uniform: log(lr) is uniform, so its median is the geometric mean of the ends
    assert np.median(lrs) == pytest.approx(math.sqrt(0.2), rel=0.05)
    moms = np.array([momentum.draw(rng) for _ in range(4000)])
    assert moms.min() >= 0.5 and moms.max() < 0.9 and np.median(moms) == pytest.approx(0.7, abs=0.01)
    picks = [batch.pick(rng) for _ in range(4000)]
    assert set(picks) == {0, 1} and abs(np.mean(picks) - 0.5) < 0.03


def test_the_to_dict_round_trip():
    _, tune = load(GOOD)
    _, again = load(tune.to_dict())
    assert again == tune and isinstance(again, TuneConfig)


@pytest.mark.parametrize("change,message", [
    ({"space": {}}, "tune.space: empty"),
    ({"space": None}, "tune.space: empty"),
    ({"space": {"training.lerning_rate": [0.1]}}, "tune.space.training.lerning_rate: unknown config key"),
    ({"space": {"training.learning_rate": {"low": 2.0, "high": 1.0}}},
     "tune.space.training.learning_rate: low 2 must be below high 1"),
    ({"space": {"training.learning_rate": {"low": 1.0, "high": 1.0}}}, "low 1 must be below high 1"),
    ({"space": {"training.learning_rate": {"low": 0.0, "high": 1.0}}}, "log-uniform range needs low > 0"),
    ({"space": {"training.learning_rate": {"low": 0.1}}}, "needs both low and high"),
    ({"space": {"training.learning_rate": {"low": 0.1, "high": 1, "scale": "exp"}}}, "scale: 'exp'"),
    ({"space": {"training.momentum": {"low": 0.5, "high": 1.0, "scale": "linear"}}},
     "tune.space.training.momentum: 1.0 does not fit"),
    ({"space": {"data.batch_size": {"low": 32, "high": 128}}}, "data.batch_size: give a list of values"),
    ({"space": {"training.learning_rate": []}}, "non-empty list"),
    ({"space": {"training.learning_rate": [0.1, 0.1]}}, "0.1 is listed twice"),
    ({"space": {"training.optimizer": ["sgd", "rmsprop"]}}, "training.optimizer: rmsprop does not fit"),
    ({"space": {"privacy.noise_multiplier": [1.0, 2.0]}}, "cannot be searched (the search sets every trial"),
    ({"space": {"privacy.delta": [1e-5, 1e-6]}}, "one δ holds for the whole search"),
    ({"space": {"data.train_size": [100, 200]}}, "the data are fixed"),
    ({"mean": 0}, "tune.mean: the mean number of trials must be > 0"),
    ({"mean": -3}, "tune.mean: the mean number of trials must be > 0"),
    ({"mean": 0.5}, "tune.mean: must be ≥ 1 for logarithmic"),
    ({"distribution": "poisson", "mean": 0.9}, "tune.mean: must be ≥ 1 for poisson"),
    ({"mean": "many"}, "tune.mean: must be a number"),
    ({"distribution": "binomial"}, "tune.distribution: 'binomial' is not allowed"),
    ({"distribution": "truncated_negative_binomial"}, "tune.shape: truncated_negative_binomial needs"),
    ({"distribution": "truncated_negative_binomial", "shape": -0.5}, "tune.shape: must be ≥ 0, got -0.5"),
    ({"shape": 1.0}, "tune.shape: only for truncated_negative_binomial"),
    ({"target_epsilon": None}, "give exactly one of tune.target_epsilon"),
    ({"noise_multiplier": 2.0}, "give exactly one of tune.target_epsilon"),
    ({"target_epsilon": 0}, "tune.target_epsilon: must be > 0"),
    ({"target_epsilon": None, "noise_multiplier": 0}, "tune.noise_multiplier: must be > 0"),
    ({"holdout": -1}, "tune.holdout: must be a whole number"),
    ({"score_noise_multiplier": 0}, "tune.score_noise_multiplier: must be > 0"),
    ({"trials": 8}, "tune.trials: unknown key"),
])
def test_bad_blocks_are_one_line_errors(change, message):
    with pytest.raises(ConfigError) as info:
        load({**GOOD, **change})
    assert message in str(info.value) and "\n" not in str(info.value)


def test_bad_base_configs():
    with pytest.raises(ConfigError, match="privacy.enabled: must be true"):
        load(GOOD, {**BASE, "privacy": {"enabled": False}})
    with pytest.raises(ConfigError, match="privacy.canaries: must be 0"):
        load(GOOD, {**BASE, "privacy": {"canaries": 10}})
    with pytest.raises(ConfigError, match="tune: missing"):
        load_tune_config(None, ["data.batch_size=64"])


def test_too_many_listed_combinations():
    space = {f"privacy.{k}": [1.0 + i for i in range(10)] for k in ("l2_norm_clip", "feature_norm_clip_mean",
                                                                    "feature_norm_clip_square")}
    space["training.learning_rate"] = [0.1 * (i + 1) for i in range(11)]
    with pytest.raises(ConfigError, match="11,000 combinations"):
        load({**GOOD, "space": space})


def test_range_keys_are_continuous_settings_of_the_schema():
    from dpsgd_cli.config import ExperimentConfig, flatten

    defaults = flatten(ExperimentConfig().to_dict())
    assert all(isinstance(defaults[k], float) or defaults[k] is None for k in RANGE_KEYS)
    assert not any(k.startswith("privacy.") and "noise" in k for k in RANGE_KEYS)


@pytest.mark.parametrize("change,message", [
    ({"space": {}}, "tune.space: empty"),
    ({"space": {"training.nope": [1]}}, "tune.space.training.nope: unknown config key"),
    ({"space": {"training.learning_rate": {"low": 3, "high": 1}}}, "low 3 must be below high 1"),
    ({"mean": 0}, "tune.mean"),
    ({"mean": 0.5}, "tune.mean"),
    ({"distribution": "uniform"}, "tune.distribution"),
    ({"distribution": "truncated_negative_binomial", "shape": -1}, "tune.shape"),
    ({"target_epsilon": 0.05, "score_noise_multiplier": 1.0}, "tune.target_epsilon: ε = 0.05 is spent by the "
                                                                "scores alone"),
])
def test_cli_bad_input_exits_2_with_one_line(tmp_path, data_dir, change, message):
    config = tmp_path / "tune.yaml"
    config.write_text(yaml.safe_dump({**BASE, "output_dir": str(tmp_path / "results"),
                                      "data": {**BASE["data"], "data_dir": data_dir, "train_size": 512},
                                      "tune": {**GOOD, "holdout": 64, **change}}))
    result = CliRunner().invoke(app, ["tune", "--config", str(config), "--dry-run"])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines[-1].startswith("error: ") and message in " ".join(result.output.split())
    assert "Traceback" not in result.output and not (tmp_path / "results").exists()


@pytest.mark.parametrize("space", sorted((ROOT / "configs" / "tune").glob("*.yaml")), ids=lambda p: p.name)
def test_every_search_in_configs_loads_with_its_base(space):
    """configs/tune/NAME.yaml holds the tune: block for configs/NAME.yaml."""
    base, tune = load_tune_config(ROOT / "configs" / space.name, [], space)
    assert base.name == space.stem and tune.space
