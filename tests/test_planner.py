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
    # a plan timed while the other test process ran would be timed again whenever the machine seemed
    # quiet: the tests of the cache turn that rule off (and its own test on)
    monkeypatch.setattr(planner, "BUSY", 1.0)
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
    if plan.gradient_path == "fast":  # layers chosen from the rules' choices, or the default step won
        default = fastgrad.default_formulation(model)
        if not private:
            default = {name: {"forward": c["forward"]} for name, c in default.items()}
        assert (all(plan.formulation[name] in choices for name, choices in allowed.items())
                or plan.formulation == default)
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
                              keras.layers.UnitNormalization(), keras.layers.Dense(3)])
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
    from dpsgd_cli.experiment.run import run

    cfg = load_config(None, [*tiny_overrides, "training.epochs=1", "training.jit_compile=false",
                             "name=planned"])
    result = run(cfg)
    resolved = yaml.safe_load((result.run_dir / "run.yaml").read_text())["resolved"]
    assert resolved["jit_compile"] is False and resolved["gradient_path"] == "fast"
    assert resolved["plan"]["source"] == "measured" and set(resolved["plan"]["formulation"]) == {
        "conv1", "pool1", "conv2", "pool2", "dense1", "logits"}
    assert resolved["plan"]["chunk_size"] == 0  # the tiny run's capacity is below MIN_CHUNK: one pass


@pytest.mark.slow
def test_a_run_in_passes_trains_like_one_pass_and_records_them(tiny_overrides, tmp_path, monkeypatch):
    from dpsgd_cli.config import load_config
    from dpsgd_cli.experiment.run import run

    monkeypatch.setenv(planner.OFF_ENV, "off")
    # the same reproducible key (seed and name) in two folders: the same batches and noise
    base = [*tiny_overrides, "training.epochs=1", "training.jit_compile=false", "seed=3", "name=passes",
            "privacy.reproducible=true"]
    runs = [run(load_config(None, [*base, f"training.chunk_size={size}", f"output_dir={tmp_path}/{size}"]))
            for size in (1000, 5)]
    plans = [yaml.safe_load((r.run_dir / "run.yaml").read_text())["resolved"]["plan"] for r in runs]
    assert [p["chunk_size"] for p in plans] == [0, 5]
    metrics = [(r.run_dir / "metrics.csv").read_text().splitlines()[1].split(",") for r in runs]
    header = (runs[0].run_dir / "metrics.csv").read_text().splitlines()[0].split(",")
    for column in ("train_loss", "test_accuracy", "epsilon_rdp"):
        i = header.index(column)
        assert abs(float(metrics[0][i]) - float(metrics[1][i])) < 1e-4 * max(1.0, abs(float(metrics[0][i])))


def test_pass_sizes_halve_down_to_the_minimum_in_whole_microbatches():
    assert planner.chunk_sizes(1024) == [1024, 512, 256, 128]
    assert planner.chunk_sizes(288) == [288, 144]
    assert planner.chunk_sizes(300, microbatch_size=4) == [300, 152]
    assert planner.chunk_sizes(64) == [64]


def test_equally_fast_candidates_go_to_the_one_with_least_memory():
    slots = {"one pass": 1024, "passes of 512": 512, "passes of 256": 256}
    # within TIE of the fastest: the smallest pass wins even if a little slower
    assert planner.choose({"one pass": 40.0, "passes of 512": 41.0, "passes of 256": 41.5}, slots) \
        == "passes of 256"
    # clearly slower: speed wins
    assert planner.choose({"one pass": 40.0, "passes of 512": 41.0, "passes of 256": 60.0}, slots) \
        == "passes of 512"
    assert planner.choose({"one pass": 40.0, "passes of 512": 50.0, "passes of 256": 60.0}, slots) \
        == "one pass"


def test_config_pass_size_is_obeyed(planner_on, monkeypatch):
    model = build_model()
    fixed = {"conv1": {"forward": "native", "grads": "depthwise"}}
    plan = planner.plan_step(model, capacity=8, private=True, jit_compile=False, formulation=fixed,
                             chunk_size=4)
    assert plan.source == "config" and plan.chunk_size == 4 and "passes of 4" in plan.describe()
    one = planner.plan_step(model, capacity=8, private=True, jit_compile=False, formulation=fixed,
                            chunk_size=100)
    assert one.chunk_size == 0  # a pass as large as the capacity is one pass
    nonprivate = planner.plan_step(model, capacity=8, private=False, jit_compile=False, chunk_size=4)
    assert nonprivate.chunk_size == 0
    monkeypatch.setenv(planner.OFF_ENV, "off")
    assert planner.plan_step(model, capacity=8, private=True, chunk_size=4).chunk_size == 4
    assert planner.plan_step(model, capacity=8, private=True).chunk_size == 0


@pytest.mark.slow
def test_pass_sizes_are_measured_with_layers_chosen_at_each_size(planner_on, monkeypatch):
    monkeypatch.setattr(planner, "MIN_CHUNK", 4)
    model = build_model()
    plan = planner.plan_step(model, capacity=16, private=True, jit_compile=False)
    assert set(plan.step_ms) - {"default graph"} == {"fast graph", "fast graph passes of 8",
                                                      "fast graph passes of 4"}
    assert set(plan.layer_ms) == {"graph", "graph passes of 8", "graph passes of 4"}
    assert plan.chunk_size in (0, 8, 4)
    assert plan == planner.StepPlan(**{**plan.to_dict()})
    vmap = planner.plan_step(model, capacity=16, private=True, jit_compile=False,
                             gradient_path="vectorized_map")
    assert set(vmap.step_ms) == {"vectorized_map graph", "vectorized_map graph passes of 8",
                                 "vectorized_map graph passes of 4"}


def test_config_accepts_pass_sizes_and_rejects_bad_ones():
    from dpsgd_cli.config import load_config

    base = ["privacy.noise_multiplier=1.0"]
    assert load_config(None, base).training.chunk_size == "auto"
    assert load_config(None, [*base, "training.chunk_size=256"]).training.chunk_size == 256
    for bad in ("0", "-3", "true", "big", "1.5"):
        with pytest.raises(ConfigError, match=r"^training\.chunk_size: must be auto or a whole number"):
            load_config(None, [*base, f"training.chunk_size={bad}"])


def test_the_oneDNN_switch_is_part_of_the_cache_key(planner_on, monkeypatch):
    """Kernels differ with oneDNN on or off: a plan measured with one must not be reused with the other."""
    model = build_model()
    fixed = {"conv1": {"forward": "native", "grads": "depthwise"}}
    monkeypatch.setenv("TF_ENABLE_ONEDNN_OPTS", "1")
    planner.plan_step(model, capacity=8, private=True, jit_compile=False, formulation=fixed, chunk_size=8)
    monkeypatch.setenv("TF_ENABLE_ONEDNN_OPTS", "0")
    planner.plan_step(model, capacity=8, private=True, jit_compile=False, formulation=fixed, chunk_size=8)
    assert len(json.loads((planner_on / planner.CACHE_FILE).read_text())) == 2


def test_the_default_step_competes_unless_a_candidate_is_it():
    model = build_model()
    default = fastgrad.default_formulation(model)
    candidates = {"fast graph": planner.StepPlan("fast", False, {**default, "conv1": {"forward": "native",
                                                                                     "grads": "depthwise"}})}
    planner._add_default(candidates, model, private=True)
    assert candidates["default graph"] == planner.StepPlan("fast", False, default)
    again = {"fast graph": planner.StepPlan("fast", False, default)}
    planner._add_default(again, model, private=True)
    assert list(again) == ["fast graph"]  # already there
    nonprivate = {"keras graph": planner.StepPlan("keras", False)}
    planner._add_default(nonprivate, model, private=False)  # the default forward: conv1 patches, pools slices
    assert nonprivate["default graph"].formulation["conv1"] == {"forward": "patches"}


def test_a_race_stops_timing_clear_losers_early():
    import time

    calls = {"fast": 0, "slow": 0, "close": 0}

    def make(name, seconds):
        def fn():
            calls[name] += 1
            time.sleep(seconds)
            return 0.0
        return fn

    ms = planner._race([make("fast", 0.0), make("slow", 0.05)], calls=5, margin=1.0)
    assert calls["slow"] == 2  # the untimed first call and one timed call: > PRUNE× the leader, dropped
    assert ms[1] > ms[0] and calls["fast"] >= 2
    calls.update(fast=0, close=0)
    planner._race([make("fast", 0.01), make("close", 0.01)], calls=4, margin=10.0)
    assert calls["fast"] == calls["close"] == 5  # never clearly apart: every round is timed


def _fake_timings(monkeypatch, xla_ms):
    """Whole steps 'timed' without running: 10 ms without XLA, `xla_ms` with; per-layer choices recorded."""
    layer_jits = []

    def race(steps, candidates):
        return {name: (xla_ms if plan.jit_compile else 10.0) for name, plan in candidates.items()}

    def per_layer(model, capacity, private, microbatch_size, jit, full, keep=None, before_timing=None):
        layer_jits.append(jit)
        return fastgrad.default_formulation(model), {}

    monkeypatch.setattr(planner._Steps, "race", race)
    monkeypatch.setattr(planner._Steps, "start", lambda steps, candidates: None)
    monkeypatch.setattr(planner, "_fastest_per_layer", per_layer)
    return layer_jits


@pytest.mark.parametrize("private", [True, False], ids=["dp", "nonprivate"])
def test_xla_layers_are_chosen_only_when_the_xla_gate_is_passed(planner_on, monkeypatch, private):
    layer_jits = _fake_timings(monkeypatch, xla_ms=10.0 * planner.XLA_GATE * 1.5)
    plan = planner.plan_step(build_model(), capacity=8, private=private, use_cache=False)
    assert plan.jit_compile is False and planner.GATE in plan.step_ms and True not in layer_jits
    assert (planner.GATE_BASE in plan.step_ms) == private  # a private plan's gate: the non-private steps
    layer_jits = _fake_timings(monkeypatch, xla_ms=5.0)
    plan = planner.plan_step(build_model(), capacity=8, private=private, use_cache=False)
    assert plan.jit_compile is True and True in layer_jits and "fast xla" in plan.step_ms



def test_norms_needing_far_more_arithmetic_are_not_timed():
    model = build_model()
    shapes = planner.layer_shapes(model, 64)
    conv1, conv2 = model.get_layer("conv1"), model.get_layer("conv2")
    # conv1: T = 196 output positions, p = 64, c = 16: Gram matrices need 16× the multiply-adds
    ghost, materialize = (planner._multiply_adds(conv1, shapes["conv1"], g) for g in ("ghost", "materialize"))
    assert materialize == 196 * 64 * 16 + 2 * 64 * 16 and ghost == 196 * 196 * 81 + 196 * 64 * 16
    choices = fastgrad.formulation_choices(conv1, True, True)
    kept = planner._arithmetic_prune(conv1, shapes["conv1"], choices)
    # ghost is dropped; every other choice (those without an arithmetic model too) is kept
    assert {c["grads"] for c in kept} == {c["grads"] for c in choices} - {"ghost"}
    assert {"materialize", "depthwise"} <= {c["grads"] for c in kept}
    # conv2 (T = 25) and the Dense layers keep both: within ARITHMETIC_PRUNE× of each other
    for name in ("conv2", "dense1", "logits"):
        layer = model.get_layer(name)
        choices = fastgrad.formulation_choices(layer, False, True)
        assert planner._arithmetic_prune(layer, shapes[name], choices) == choices
    assert planner._multiply_adds(conv2, shapes["conv2"], "depthwise") is None


def test_other_processes_share_is_what_the_machine_did_beyond_this_process(monkeypatch):
    monkeypatch.setattr(planner.os, "cpu_count", lambda: 2)
    # 10 s apart: the CPUs were busy 12 CPU-seconds, this process used 7 of them → others 5 / 20
    assert planner.others_share((100.0, 1.0), (112.0, 8.0), 10.0) == pytest.approx(0.25)
    assert planner.others_share((100.0, 1.0), (107.0, 8.0), 10.0) == 0.0  # only this process ran
    assert planner.others_share(None, (107.0, 8.0), 10.0) == -1.0  # no /proc/stat
    before = planner.cpu_times()
    if before is not None:  # Linux: busy CPU-seconds since boot ≥ what this process used
        assert before[0] >= 0 and before[1] > 0


def test_a_plan_timed_on_a_busy_machine_is_timed_again_once_it_is_quiet(planner_on, monkeypatch):
    model = build_model()
    timed = []

    def measure(*args):
        timed.append(1)
        return planner.StepPlan("keras", False)

    monkeypatch.setattr(planner, "_measure", measure)
    monkeypatch.setattr(planner, "BUSY", 0.25)
    busy = iter([(0.0, 0.0), (15.0, 5.0)])  # others used 10 CPU-seconds while planning (the whole machine)
    monkeypatch.setattr(planner, "cpu_times", lambda: next(busy))
    first = planner.plan_step(model, capacity=8, private=False, jit_compile=False)
    assert timed == [1] and first.others == 1.0 and first.source == "measured"
    monkeypatch.setattr(planner, "_others_now", lambda: 0.6)  # still busy: the cached plan is kept
    assert planner.plan_step(model, capacity=8, private=False, jit_compile=False).source == "cache"
    assert timed == [1]
    quiet = iter([(0.0, 0.0), (5.0, 5.0)])  # only this process ran while planning again
    monkeypatch.setattr(planner, "cpu_times", lambda: next(quiet))
    monkeypatch.setattr(planner, "_others_now", lambda: 0.02)  # quiet now: timed again, and cached
    again = planner.plan_step(model, capacity=8, private=False, jit_compile=False)
    assert timed == [1, 1] and again.source == "measured" and again.others == 0.0
    monkeypatch.setattr(planner, "_others_now", lambda: pytest.fail("a quiet plan is not re-checked"))
    assert planner.plan_step(model, capacity=8, private=False, jit_compile=False).source == "cache"
