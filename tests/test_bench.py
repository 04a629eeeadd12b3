"""The benchmark harness measures what it says (no timing assertions: speed is read off `make bench`)."""

from __future__ import annotations

import math

import pytest
from typer.testing import CliRunner

from dpsgd_cli.cli import app
from dpsgd_cli.training.bench import MEMORY_PATHS, BenchCase, default_cases, run_benchmark


@pytest.mark.slow
def test_rows_have_every_field_and_ratios_to_their_own_baseline():
    cases = [BenchCase(path="nonprivate", batch_size=8, jit_compile=False),
             BenchCase(path="vectorized_map", batch_size=8, jit_compile=False),
             BenchCase(path="fast", batch_size=8, jit_compile=False, capacity=16)]
    rows = run_benchmark(cases, steps=5, warmup=1)
    assert [r["path"] for r in rows] == ["nonprivate", "vectorized_map", "fast"]
    assert rows[0]["ratio_to_nonprivate"] == 1.0
    for r in rows:
        assert r["traces"] == 1  # the timed calls never retrace
        assert r["step_s"] > 0 and r["compile_s"] > 0 and math.isfinite(r["ratio_to_nonprivate"])
        assert r["examples_per_s"] == r["batch_size"] / r["step_s"]
    assert rows[2]["capacity"] == 16 and rows[2]["batch_size"] == 8


def test_default_grid_covers_the_issue():
    cases = default_cases()
    assert {(c.batch_size, c.jit_compile, c.path) for c in cases if c.capacity is None} == {
        (b, j, p) for b in (64, 256, 1024) for j in (False, True)
        for p in ("plain", "nonprivate", "nonprivate_fast", "vectorized_map", "fast")}


def test_the_fastest_nonprivate_row_includes_the_plain_tensorflow_step():
    from dpsgd_cli.cli.bench import summary_lines
    from dpsgd_cli.training.bench import add_ratios

    def row(path, step_s, jit=False, capacity=256):
        return {"path": path, "batch_size": 256, "capacity": capacity, "jit_compile": jit, "step_s": step_s,
                "plan": "fast, XLA off (cache)"}

    rows = [row("plain", 0.004), row("plain", 0.009, jit=True), row("nonprivate", 0.005),
            row("nonprivate_planned", 0.0045), row("planned", 0.006), row("fast", 0.007, capacity=288)]
    add_ratios(rows)
    for r in rows:  # every ratio divides by the plain XLA-off step, the fastest non-private one
        assert math.isclose(r["ratio_to_fastest_nonprivate"], r["step_s"] / 0.004)
        assert math.isclose(r["ratio_to_plain"], r["step_s"] / 0.004)
    assert math.isclose(rows[2]["ratio_to_nonprivate"], 1.0)
    assert math.isnan(rows[0]["ratio_to_nonprivate_fast"])  # no nonprivate_fast row
    lines = summary_lines(rows)
    assert "batch 256: dpsgd's fastest non-private step 4.50 ms (nonprivate_planned, XLA off) / plain " \
           "TensorFlow step 4.00 ms (plain, XLA off) = 1.12" in lines
    assert any(line.startswith("batch 256: fastest DP step 6.00 ms (planned") and line.endswith("= 1.50")
               for line in lines)


@pytest.mark.slow
def test_the_plain_step_is_a_gradient_tape_sgd_step_of_the_mean_loss():
    import keras
    import numpy as np
    import tensorflow as tf

    from dpsgd_cli.training.bench import plain_step
    from dpsgd_cli.training.model import build_model

    rng = np.random.default_rng(0)
    x = tf.constant(rng.random((8, 28, 28, 1), dtype=np.float32))
    y = tf.constant(rng.integers(0, 10, 8).astype(np.int32))
    model, reference = build_model(seed=1), build_model(seed=1)
    step = plain_step(model, keras.optimizers.SGD(0.5), jit_compile=False)
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(y, reference(x, training=True)))
    grads = tape.gradient(loss, reference.trainable_variables)
    assert math.isclose(float(step(x, y)), float(loss), rel_tol=1e-6)
    for v, ref, g in zip(model.trainable_variables, reference.trainable_variables, grads):
        np.testing.assert_allclose(v.numpy(), ref.numpy() - 0.5 * g.numpy(), atol=1e-6)
    assert step.experimental_get_tracing_count() == 1


@pytest.mark.slow
def test_cli_writes_csv_and_rejects_bad_options(tmp_path):
    out = tmp_path / "bench.csv"
    result = CliRunner().invoke(app, ["bench", "--batch-sizes", "4", "--jit", "off", "--paths",
                                      "nonprivate,fast", "--steps", "5", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("CPU: ") and "(family " in result.output and "oneDNN" in result.output
    lines = out.read_text().splitlines()
    assert len(lines) == 1 + 3 and "ratio_to_nonprivate" in lines[0]
    for column in ("cpu_model_name", "cpu_family", "cpu_model", "tensorflow", "onednn"):
        assert column in lines[0].split(",")
    bad = CliRunner().invoke(app, ["bench", "--paths", "turbo"])
    assert bad.exit_code == 2 and "--paths" in bad.output


def test_planned_rows_record_the_plan_and_the_ratio_to_the_fastest_nonprivate_step():
    from dpsgd_cli.cli.bench import summary_lines
    from dpsgd_cli.training.bench import planned_cases

    cases = [BenchCase(path="nonprivate", batch_size=8, jit_compile=False), *planned_cases([8])]
    rows = run_benchmark(cases, steps=5, warmup=1)
    assert [r["path"] for r in rows] == ["nonprivate", "nonprivate_planned", "planned"]
    fastest = min(r["step_s"] for r in rows[:2])
    for r in rows:
        assert math.isclose(r["ratio_to_fastest_nonprivate"], r["step_s"] / fastest)
    assert "XLA" in rows[2]["plan"] and isinstance(rows[2]["jit_compile"], bool)
    lines = summary_lines(rows)
    assert any(line.startswith("plan at batch 8 (planned)") for line in lines)
    assert any(line.startswith("batch 8: fastest DP step") for line in lines)


@pytest.mark.slow
def test_epoch_rows_time_whole_epochs_through_the_trainer(data_dir):
    from dpsgd_cli.training.bench import epoch_rows

    rows = epoch_rows(batch_size=64, data_dir=data_dir, train_size=640)
    assert [r["path"] for r in rows] == ["epoch_nonprivate", "epoch_dp"]
    for r in rows:
        assert r["epoch_s"] > 0 and r["examples_per_s"] == 640 / r["epoch_s"] and r["eval_s"] > 0
        assert math.isclose(r["step_s"], r["epoch_s"] / 10)  # 640 / 64 steps
    assert math.isclose(rows[1]["ratio_to_epoch_nonprivate"], rows[1]["epoch_s"] / rows[0]["epoch_s"])


@pytest.mark.slow
def test_memory_rows_run_each_path_in_its_own_process_and_the_cli_writes_them(tmp_path, monkeypatch):
    import csv

    monkeypatch.setenv("DPSGD_PLANNER", "off")
    out = tmp_path / "bench.csv"
    result = CliRunner().invoke(app, ["bench", "--paths", "nonprivate,memory", "--batch-sizes", "4", "--jit",
                                      "off", "--steps", "5", "--memory-batch", "8", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "memory at batch 8: planned" in result.output
    with open(tmp_path / "bench_memory.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["path"] for r in rows] == [f"memory_{p}" for p in MEMORY_PATHS]
    assert "cpu_model_name" in rows[0] and "fast" in rows[MEMORY_PATHS.index("planned")]["plan"]
    base = min(float(r["peak_mb"]) for r in rows if r["path"] in ("memory_plain", "memory_nonprivate"))
    for r in rows:
        assert float(r["peak_mb"]) >= 0 and float(r["start_mb"]) > 100  # TensorFlow loaded before the block
        assert math.isclose(float(r["ratio_to_nonprivate"]), float(r["peak_mb"]) / base, rel_tol=1e-6)


@pytest.mark.slow
def test_device_rows_run_the_dp_step_on_one_and_two_logical_cpus(tmp_path):
    """`dpsgd bench --devices 1,2` in its own process (the CPU split must precede TensorFlow's start)."""
    import csv
    import os
    import subprocess
    import sys

    out = tmp_path / "devices.csv"
    command = [sys.executable, "-m", "dpsgd_cli", "bench", "--devices", "1,2", "--batch-sizes", "16",
               "--steps", "5", "--warmup", "0", "--out", str(out)]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "TF_CPP_MIN_LOG_LEVEL": "3"}
    proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = list(csv.DictReader(out.open()))
    assert [(r["replicas"], r["devices"]) for r in rows] == [("1", "CPU:0"), ("2", "CPU:0,CPU:1")]
    assert all(float(r["step_s"]) > 0 and float(r["examples_per_s"]) > 0 for r in rows)


@pytest.mark.slow
def test_layer_rows_time_every_weight_layer_private_and_not_and_the_noise():
    from dpsgd_cli.training.bench import layer_limits, layer_rows

    rows = layer_rows(16, steps=5, warmup=1)
    layers = [r["layer"] for r in rows]
    assert list(dict.fromkeys(layers)) == ["conv1", "conv2", "dense1", "logits", "noise"]
    for name in ("conv1", "conv2", "dense1", "logits"):  # one non-private row, then every DP formulation
        assert [r["private"] for r in rows if r["layer"] == name][0] is False
        assert sum(r["private"] for r in rows if r["layer"] == name) >= 2
    assert {r["choice"] for r in rows if r["layer"] == "conv1"} >= {"native", "native/depthwise"}
    limits = {limit["layer"]: limit for limit in layer_limits(rows)}
    for name, limit in limits.items():
        mine = [r for r in rows if r["layer"] == name]
        assert math.isclose(limit["dp_ms"], 1000 * min(r["step_s"] for r in mine if r["private"]))
        assert math.isclose(limit["extra_ms"], limit["dp_ms"] - limit["nonprivate_ms"])
    assert limits["noise"]["nonprivate_ms"] == 0.0 and limits["noise"]["dp_ms"] > 0
