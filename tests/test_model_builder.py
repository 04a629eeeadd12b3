"""`model.builder`: a user's Keras model through `dpsgd train` and `dpsgd audit`; every bad builder is one
line `error: …` with exit 2, before anything is written."""

from __future__ import annotations

import textwrap
import uuid

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from dpsgd_cli.cli import app
from dpsgd_cli.config import load_config

BUILDERS = '''
import keras


def tiny(input_shape, num_classes):
    return keras.Sequential([keras.Input(shape=input_shape), keras.layers.Flatten(),
                             keras.layers.Dense(16, activation="relu"), keras.layers.Dense(num_classes)])


def grouped(input_shape, num_classes):
    inputs = keras.Input(shape=input_shape)
    h = keras.layers.Conv2D(4, 5, strides=3, activation="relu")(inputs)
    h = keras.layers.GroupNormalization(groups=2)(h)
    outputs = keras.layers.Dense(num_classes)(keras.layers.Flatten()(h))
    return keras.Model(inputs, outputs)


def unit_norm(input_shape, num_classes):
    inputs = keras.Input(shape=input_shape)
    h = keras.layers.UnitNormalization()(keras.layers.Flatten()(inputs))
    return keras.Model(inputs, keras.layers.Dense(num_classes)(h))


def raises(input_shape, num_classes):
    raise ValueError("no GPU\\nhere")


def not_a_model(input_shape, num_classes):
    return [keras.layers.Dense(num_classes)]


def batchnorm(input_shape, num_classes):
    return keras.Sequential([keras.Input(shape=input_shape), keras.layers.Flatten(),
                             keras.layers.Dense(16), keras.layers.BatchNormalization(name="bn"),
                             keras.layers.Dense(num_classes)])


def seven_classes(input_shape, num_classes):
    return keras.Sequential([keras.Input(shape=input_shape), keras.layers.Flatten(), keras.layers.Dense(7)])


def softmax(input_shape, num_classes):
    return keras.Sequential([keras.Input(shape=input_shape), keras.layers.Flatten(),
                             keras.layers.Dense(num_classes, activation="softmax")])


def no_arguments():
    return tiny((28, 28, 1), 10)


NOT_CALLABLE = 3
'''


@pytest.fixture
def builders(tmp_path, monkeypatch) -> str:
    """The name of an importable module holding the builders above."""
    name = f"dpsgd_test_builders_{uuid.uuid4().hex[:8]}"
    folder = tmp_path / "builders"
    folder.mkdir()
    (folder / f"{name}.py").write_text(textwrap.dedent(BUILDERS))
    monkeypatch.syspath_prepend(str(folder))
    return name


def _train(tiny_overrides, *extra: str):
    args = ["train", "--quiet"]
    for item in [*tiny_overrides, "training.epochs=1", *extra]:
        args += ["--set", item]
    return CliRunner().invoke(app, args)


def _error_line(result) -> str:
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


@pytest.mark.slow
@pytest.mark.parametrize("builder,path", [("tiny", "fast"), ("grouped", "fast"),
                                          ("unit_norm", "vectorized_map")])
def test_a_builder_in_yaml_trains_end_to_end_and_audit_loads_it(builders, tiny_overrides, tmp_path, builder,
                                                                 path):
    config = tmp_path / "mine.yaml"
    config.write_text(yaml.safe_dump({"name": "mine", "model": {"builder": f"{builders}:{builder}"}}))
    args = ["train", "--quiet", "--config", str(config)]
    for item in [*tiny_overrides, "training.epochs=1"]:
        args += ["--set", item]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    run_dir = tmp_path / "results" / "mine"
    doc = yaml.safe_load((run_dir / "run.yaml").read_text())
    assert doc["status"] == "finished" and doc["config"]["model"]["builder"] == f"{builders}:{builder}"
    assert doc["resolved"]["gradient_path"] == path
    assert 0 < doc["final"]["epsilon_pld"] < np.inf

    from dpsgd_cli.audit import membership as audit

    model = audit.load_model(audit.load_run(run_dir))  # the audit rebuilds the same model from the builder
    assert model.count_params() > 0 and model.output_shape == (None, 10)


def test_building_twice_gives_the_same_variable_names_and_weights(builders):
    """The checkpoint records variable paths: a resumed run (or a sweep's next point) must rebuild the
    same names, and the seed the same initial weights."""
    from dpsgd_cli.training.model import model_from_config

    cfg = load_config(None, [f"model.builder={builders}:grouped", "seed=4", "privacy.noise_multiplier=1.0"])
    a, b = model_from_config(cfg.model, cfg.seed), model_from_config(cfg.model, cfg.seed)
    assert [v.path for v in a.weights] == [v.path for v in b.weights]
    for x, y in zip(a.get_weights(), b.get_weights()):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("builder,message", [
    ("dpsgd_no_such_module_xyz:tiny", r"cannot import module 'dpsgd_no_such_module_xyz' \(ModuleNotFound"),
    ("{m}:missing", "has no attribute 'missing'"),
    ("{m}:NOT_CALLABLE", "is a int, not a function"),
    ("{m}:raises", "raised ValueError: no GPU here"),
    ("{m}:no_arguments", "raised TypeError"),
    ("{m}:not_a_model", "returned list .* not a Keras model"),
    ("{m}:batchnorm", "'bn' is BatchNormalization, which normalizes each example with statistics of the "
                      "whole batch.*use keras.layers.GroupNormalization"),
    ("{m}:seven_classes", r"output has shape \(7,\) per example; expected \(10,\)"),
    ("{m}:softmax", "applies softmax; return logits"),
    ("not a spec", 'must name a function as "package.module:function"'),
])
def test_each_bad_builder_is_one_line_exit_2_and_writes_nothing(builders, tiny_overrides, tmp_path, builder,
                                                                message):
    result = _train(tiny_overrides, f"model.builder={builder.format(m=builders)}", "name=bad")
    line = _error_line(result)
    assert line.startswith("error: model.builder:") and _matches(message, line), line
    assert not (tmp_path / "results" / "bad").exists()


def _matches(pattern: str, text: str) -> bool:
    import re

    return re.search(pattern, text) is not None
