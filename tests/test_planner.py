"""The planner: picks only tested formulations, caches per key, obeys the config, records the plan."""

from __future__ import annotations

import json

import keras
import pytest
import yaml

from dpsgd_cli.errors import ConfigError
from dpsgd_cli.training import fastgrad, planner
from dpsgd_cli.training.model import build_model


@pytest.fixture
def planner_on(tmp_path, monkeypatch):
    monkeypatch.delenv(planner.OFF_ENV, raising=False)
    monkeypatch.setenv(planner.CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache"


def _allowed(model, private):
    return dict(planner._layer_options(model, private))


@pytest.mark.slow
@pytest.mark.parametrize("private", [True, False], ids=["dp", "nonprivate"])
def test_plan_is_measured_once_then_read_from_the_cache(planner_on, private):
    model = build_model()
    plan = planner.plan_step(model, capacity=8, private=private, jit_compile=False)
    assert plan.source == "measured" and plan.jit_compile is False and plan.planning_s > 0
    allowed = _allowed(model, private)
    assert plan.gradient_path in (("fast",) if private else ("fast", "keras"))
    if plan.gradient_path == "fast":
        assert all(plan.formulation[name] in choices for name, choices in allowed.items())
    if not private:
        # the plain Keras step is always a candidate: timed against a fast forward, or the only candidate
        # (and chosen, untimed) when every layer's fastest forward is the native one, i.e. the Keras step
        assert "keras graph" in plan.step_ms or (plan.gradient_path == "keras" and not plan.step_ms)
    again = planner.plan_step(model, capacity=8, private=private, jit_compile=False)
    assert again.source == "cache" and again.formulation == plan.formulation
    assert len(json.loads((planner_on / planner.CACHE_FILE).read_text())) == 1
    other = planner.plan_step(model, capacity=16, private=private, jit_compile=False)
    assert other.source == "measured"  # another capacity is another plan


def test_config_formulation_and_forced_jit_are_obeyed_without_measuring(planner_on):
    model = build_model()
    fixed = {"conv1": {"forward": "native", "grads": "depthwise"}, "pool1": {"forward": "native"}}
    plan = planner.plan_step(model, capacity=8, private=True, jit_compile=True, formulation=fixed)
    assert plan.source == "config" and plan.jit_compile is True and plan.step_ms == {}
    assert plan.formulation["conv1"] == fixed["conv1"] and plan.formulation["pool1"] == fixed["pool1"]
    assert plan.formulation["conv2"] == fastgrad.default_formulation(model)["conv2"]
    nonprivate = planner.plan_step(model, capacity=8, private=False, jit_compile=False, formulation=fixed)
    assert nonprivate.formulation["conv1"] == {"forward": "native"}


@pytest.mark.parametrize(("formulation", "match"), [
    ({"conv9": {"forward": "native"}}, r"training\.plan\.conv9: no such layer"),
    ({"conv2": {"grads": "depthwise"}}, r"training\.plan\.conv2: .* is not one of"),
    ({"pool1": {"forward": "patches"}}, r"training\.plan\.pool1"),
    ("fastest", r"training\.plan: must be auto")])
def test_bad_plans_are_config_errors(planner_on, formulation, match):
    with pytest.raises(ConfigError, match=match):
        planner.plan_step(build_model(), capacity=8, private=True, jit_compile=False, formulation=formulation)


def test_vectorized_map_and_unsupported_models_skip_formulations(planner_on):
    plan = planner.plan_step(build_model(), capacity=8, private=True, jit_compile=False,
                             gradient_path="vectorized_map")
    assert plan.gradient_path == "vectorized_map" and plan.formulation == {}
    model = keras.Sequential([keras.Input(shape=(6,)), keras.layers.Dense(4),
                              keras.layers.LayerNormalization(), keras.layers.Dense(3)])
    assert planner.plan_step(model, capacity=8, private=False, jit_compile=False).gradient_path == "keras"
    with pytest.raises(ConfigError, match="training.gradient_path 'fast'"):
        planner.plan_step(model, capacity=8, private=True, jit_compile=False, gradient_path="fast")


def test_planner_off_uses_the_default_formulation(monkeypatch):
    monkeypatch.setenv(planner.OFF_ENV, "off")
    model = build_model()
    plan = planner.plan_step(model, capacity=8, private=True)
    assert plan.formulation == fastgrad.default_formulation(model) and plan.jit_compile is False
    assert planner.plan_step(model, capacity=8, private=True, jit_compile=True).jit_compile is True


def test_config_accepts_plans_and_rejects_bad_ones():
    from dpsgd_cli.config import load_config

    base = ["privacy.noise_multiplier=1.0"]
    cfg = load_config(None, [*base, "training.plan={conv1: {forward: native, grads: depthwise}}"])
    assert cfg.training.plan == {"conv1": {"forward": "native", "grads": "depthwise"}}
    assert load_config(None, base).training.plan == "auto"
    for bad in ("training.plan=fast", "training.plan={conv1: {speed: high}}",
                "training.plan={conv1: {grads: turbo}}", "training.plan={conv1: native}"):
        with pytest.raises(ConfigError, match=r"training\.plan"):
            load_config(None, [*base, bad])


@pytest.mark.slow
def test_run_yaml_records_the_measured_plan(planner_on, tiny_overrides):
    from dpsgd_cli.config import load_config
    from dpsgd_cli.training.runner import run

    cfg = load_config(None, [*tiny_overrides, "training.epochs=1", "training.jit_compile=false",
                             "name=planned"])
    result = run(cfg)
    resolved = yaml.safe_load((result.run_dir / "run.yaml").read_text())["resolved"]
    assert resolved["jit_compile"] is False and resolved["gradient_path"] == "fast"
    assert resolved["plan"]["source"] == "measured" and set(resolved["plan"]["formulation"]) == {
        "conv1", "pool1", "conv2", "pool2", "dense1", "logits"}
