"""tf.distribute: the mechanism, the weights and ε do not depend on the replica count R.

Logical CPU devices must be configured before TensorFlow starts, so everything that needs 2 or 4 of them
runs in a fresh process: `tests/distribute_probe.py` (one process for the equivalence and padding checks)
and `dpsgd train` processes (mirrored, two TF_CONFIG workers on localhost ports, and `none`)."""

from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from dpsgd_cli.cli import app
from dpsgd_cli.config import load_config
from dpsgd_cli.errors import ConfigError
from dpsgd_cli.privacy.run_key import new_run_key
from dpsgd_cli.privacy.sampling import Sampler
from dpsgd_cli.training import distribute

ROOT = Path(__file__).resolve().parent.parent
PROBE = Path(__file__).resolve().parent / "distribute_probe.py"


def _env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3", **extra}
    env.pop("TF_CONFIG", None)
    return {**env, **extra}


def _probe(modes: str, data_dir: str, timeout: float = 600) -> dict:
    done = subprocess.run([sys.executable, str(PROBE), modes, data_dir], capture_output=True, text=True,
                          env=_env(), timeout=timeout, cwd=ROOT)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stderr[-3000:]
    return json.loads(lines[-1].removeprefix("RESULT "))


# ---- configuration --------------------------------------------------------------------------------------

@pytest.mark.parametrize("override, message", [
    ("distribute.strategy=ring", "distribute.strategy: 'ring' is not allowed; choose one of: none, mirrored, "
                                 "multi_worker"),
    ("distribute.devices=GPU:0", "distribute.devices: must be null"),
    ("distribute.cpu_devices=0", "distribute.cpu_devices: must be in [1, 64]"),
    ("distribute.collective_timeout_s=0", "distribute.collective_timeout_s: must be > 0 seconds"),
    ("distribute.cluster=k8s", "distribute.cluster: 'k8s' is not allowed; choose one of: tf_config, slurm"),
    ("distribute.cpu_devices=2", "distribute.strategy: is none, so distribute.devices"),
])
def test_bad_distribute_keys_are_named(override, message):
    with pytest.raises(ConfigError) as info:
        load_config(None, ["privacy.noise_multiplier=1", override])
    assert str(info.value).startswith(message)


def test_microbatches_must_divide_by_the_replicas():
    with pytest.raises(ConfigError, match=r"privacy.num_microbatches: 6 must be divisible by the number of "
                                          r"replicas \(4 devices"):
        load_config(None, ["privacy.noise_multiplier=1", "data.sampling=shuffle", "data.batch_size=12",
                           "privacy.num_microbatches=6", "distribute.strategy=mirrored",
                           "distribute.devices=[CPU:0, CPU:1, CPU:2, CPU:3]"])
    dist = distribute.Distribution(None, "mirrored", 4, 1, 0, True, ("CPU:0",) * 4)
    assert dist.capacity(48, 1) == 48 and dist.capacity(50, 1) == 52 and dist.capacity(24, 2) == 24
    with pytest.raises(ConfigError, match="privacy.num_microbatches: 3 microbatches per step cannot"):
        dist.capacity(12, 4)


def test_bad_distribute_input_exits_2_with_one_line(tmp_path):
    for args in (["--set", "distribute.strategy=bogus"],
                 ["--set", "distribute.strategy=multi_worker"]):  # no TF_CONFIG in this process
        os.environ.pop("TF_CONFIG", None)
        result = CliRunner().invoke(app, ["train", "--sigma", "1", "--set", f"output_dir={tmp_path}", *args])
        assert result.exit_code == 2, result.output
        errors = [line for line in result.output.splitlines() if line.startswith("error:")]
        assert "Traceback" not in result.output and len(errors) == 1
        assert errors[0].startswith("error: distribute.")


def test_the_cluster_comes_from_slurm_or_tf_config(monkeypatch):
    for key in ("TF_CONFIG", "CUDA_VISIBLE_DEVICES"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("PATH", "/nonexistent")  # no nvidia-smi: a CPU node
    slurm = {"SLURM_PROCID": "1", "SLURM_STEP_NUM_TASKS": "2", "SLURM_STEP_NODELIST": "node[07-08]",
             "SLURM_STEP_TASKS_PER_NODE": "1(x2)", "SLURM_NTASKS": "2"}
    for key, value in slurm.items():
        monkeypatch.setenv(key, value)
    resolver = distribute.cluster_resolver("slurm")
    assert resolver.cluster_spec().as_dict() == {"worker": ["node07:8888", "node08:8888"]}
    assert (resolver.task_type, resolver.task_id) == ("worker", 1)
    monkeypatch.delenv("SLURM_PROCID")
    with pytest.raises(ConfigError, match="distribute.cluster: slurm needs to run inside a Slurm job step"):
        distribute.cluster_resolver("slurm")
    with pytest.raises(ConfigError, match="distribute.cluster: tf_config needs the TF_CONFIG"):
        distribute.cluster_resolver("tf_config")
    monkeypatch.setenv("TF_CONFIG", "{not json")
    with pytest.raises(ConfigError, match="distribute.cluster: TF_CONFIG is not a valid cluster"):
        distribute.cluster_resolver("tf_config")


def test_a_failed_collective_is_one_training_error():
    import tensorflow as tf

    from dpsgd_cli.errors import TrainingError

    dist = distribute.Distribution(None, "multi_worker", 2, 2, 0, True, ("CPU:0",))
    for error in (tf.errors.UnavailableError, tf.errors.DeadlineExceededError):
        with pytest.raises(TrainingError, match=r"^distribute: a collective across the 2 workers failed "
                                                r"\(peer gone\); a worker was lost"):
            with distribute.collective_errors(dist):
                raise error(None, None, "peer gone\nmore detail")
    with pytest.raises(tf.errors.InvalidArgumentError):  # a bug, not a lost worker: not disguised
        with distribute.collective_errors(dist):
            raise tf.errors.InvalidArgumentError(None, None, "bad shape")


# ---- dealing the global sample into replica slices -------------------------------------------------------

@pytest.mark.parametrize("replicas, unit", [(1, 1), (2, 1), (3, 1), (4, 1), (2, 4), (4, 2)])
def test_every_sampled_index_lands_in_exactly_one_replica_slot(replicas, unit):
    sampler = Sampler(sampling="poisson", batch_size=40, dataset_size=500,
                      key=new_run_key(reproducible=False, seed=0), max_capacity=48)
    dist = distribute.Distribution(None, "mirrored", replicas, 1, 0, True, ())
    sampler.capacity = dist.capacity(sampler.capacity, unit)
    assert sampler.capacity % (replicas * unit) == 0
    for batch in sampler.epoch(1):
        seen = []
        for idx, mask in batch.chunks:
            rows, masks = distribute.deal(idx, replicas, unit), distribute.deal(mask, replicas, unit)
            assert rows.shape == masks.shape == (replicas, sampler.capacity // replicas)
            seen += list(rows[masks == 1])
            assert masks.sum() == mask.sum()
        chosen = np.concatenate([idx[mask == 1] for idx, mask in batch.chunks])
        assert sorted(seen) == sorted(chosen) and len(set(seen)) == len(seen) == batch.size


def test_units_stay_whole_and_the_graph_deals_like_the_host():
    import tensorflow as tf

    values = np.arange(24)
    rows = distribute.deal(values, 3, 4)
    assert [list(r[:4]) for r in rows] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    assert list(rows[0][4:]) == [12, 13, 14, 15]
    np.testing.assert_array_equal(distribute.deal(tf.constant(values), 3, 4).numpy(), rows)


def test_independently_started_workers_build_identical_plans(data_dir):
    procs = [subprocess.Popen([sys.executable, str(PROBE), "plan", data_dir], stdout=subprocess.PIPE,
                              text=True, env=_env(), cwd=ROOT) for _ in range(2)]
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    digests = [json.loads(text.split("RESULT ")[-1])["plan"]["digest"] for text in outputs]
    assert digests[0] == digests[1]
    other = Sampler(sampling="poisson", batch_size=32, dataset_size=96,
                    key=new_run_key(reproducible=True, seed=4), max_capacity=32)
    idx, _ = next(other.epoch(1)).chunks[0]
    import hashlib

    assert hashlib.sha256(distribute.deal(idx, 4).tobytes()).hexdigest() != digests[0]


# ---- the distributed step equals the one-device step ------------------------------------------------------

@pytest.fixture(scope="module")
def probe(data_dir):
    return _probe("equivalence", data_dir)["equivalence"]


@pytest.mark.slow
def test_replicas_train_like_one_device(probe):
    eq = probe
    assert max(eq["chunks"]) > 1 and len(eq["chunks"]) == 3  # an overflow step among the 3
    for case in eq["cases"]:
        results = case["results"]
        # 1 replica: the same computation as `none`, bit for bit (with XLA the clipped sum is compiled
        # while the reference `none` step is not)
        if not case["jit"]:
            assert results["1"]["identical"], case
        for replicas, r in results.items():
            assert r["steps"] == case["steps"] == 3 and r["ledger_steps"] == case["none_ledger_steps"] == 3
            assert r["capacity"] % int(replicas) == 0 and r["jit"] == case["jit"]
            # float reassociation of the sum over replicas only: far below one step's update (lr)
            assert r["max_diff"] < 1e-4 * case["lr"], (case["path"], case["optimizer"], replicas, r)
            assert r["loss_diff"] < 1e-5


@pytest.mark.slow
def test_an_all_padding_step_moves_the_weights_by_the_noise_over_b(probe):
    assert sorted(probe["padding"]) == ["2", "4", "none"]
    for replicas, r in probe["padding"].items():
        # noise counted R times (or √R too little) would give ratio R (or 1/√R); a missing draw, 0
        assert abs(r["ratio"] - 1.0) < 1e-5, (replicas, r)
        assert r["max_error"] < 1e-5 * r["max_change"] + 1e-7, (replicas, r)


# ---- whole runs: `none`, mirrored on 2 logical CPUs, two TF_CONFIG workers --------------------------------

def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("localhost", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _train(out: Path, name: str, data_dir: str, extra: list[str], env: dict | None = None):
    args = [sys.executable, "-m", "dpsgd_cli", "train", "--name", name, "--sigma", "1.0", "--quiet",
            "--set", f"output_dir={out}", "--set", f"data.data_dir={data_dir}",
            "--set", "data.train_size=480", "--set", "data.test_size=300", "--set", "data.batch_size=48",
            "--set", "training.epochs=1",
            "--set", "training.optimizer=sgd", "--set", "training.learning_rate=0.5",
            "--set", "privacy.reproducible=true", "--set", "training.jit_compile=false", *extra]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env or _env(), cwd=out)


def _weights(run_dir: Path) -> list[np.ndarray]:
    import h5py

    arrays = []
    with h5py.File(run_dir / "model.weights.h5", "r") as handle:
        handle.visititems(lambda _, item: arrays.append(np.array(item)) if hasattr(item, "shape") else None)
    return arrays


def _metrics(run_dir: Path) -> dict[str, str]:
    with open(run_dir / "metrics.csv") as handle:
        return list(csv.DictReader(handle))[-1]


def _two_workers(out: Path, name: str, data_dir: str, extra: list[str], scratch: Path) -> list:
    """Two `dpsgd train` processes joined by TF_CONFIG on free localhost ports (chief = index 0); the
    non-chief keeps its scratch run directory under `scratch` (its TMPDIR)."""
    cluster = {"worker": [f"localhost:{p}" for p in _free_ports(2)]}
    configs = [json.dumps({"cluster": cluster, "task": {"type": "worker", "index": i}}) for i in range(2)]
    return [_train(out, name, data_dir, ["--set", "distribute.strategy=multi_worker", *extra],
                   _env(TF_CONFIG=tf_config, TMPDIR=str(scratch))) for tf_config in configs]


def _wait_for_first_epoch(run_dir: Path, workers: list) -> None:
    deadline = time.monotonic() + 300
    while not (run_dir / "metrics.csv").exists() and time.monotonic() < deadline:
        assert all(w.poll() is None for w in workers), [w.stderr.read()[-2000:] for w in workers]
        time.sleep(0.2)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_dir):
    out = tmp_path_factory.mktemp("dist_runs")
    timings = {}
    start = time.perf_counter()
    none = _train(out, "none", data_dir, [])
    assert none.wait(600) == 0, none.stderr.read()[-3000:]
    timings["none"] = time.perf_counter() - start
    start = time.perf_counter()
    mirrored = _train(out, "mirrored", data_dir, ["--set", "distribute.strategy=mirrored",
                                                  "--set", "distribute.cpu_devices=2"])
    assert mirrored.wait(600) == 0, mirrored.stderr.read()[-3000:]
    timings["mirrored"] = time.perf_counter() - start
    start = time.perf_counter()
    scratch = tmp_path_factory.mktemp("worker_tmp")  # where the non-chief keeps its scratch run directory
    workers = _two_workers(out, "multi", data_dir, ["--set", "distribute.collective_timeout_s=120"], scratch)
    for w in workers:
        assert w.wait(600) == 0, w.stderr.read()[-3000:]
    timings["two_workers"] = time.perf_counter() - start
    print(f"wall times: {timings}")
    return out, scratch


@pytest.mark.slow
def test_two_workers_and_two_devices_equal_one_device(runs):
    out, _ = runs
    base = _weights(out / "none")
    for name in ("mirrored", "multi"):
        weights = _weights(out / name)
        assert [w.shape for w in weights] == [w.shape for w in base]
        diff = max(float(np.abs(a - b).max()) for a, b in zip(weights, base))
        assert diff < 1e-5, (name, diff)  # lr 0.5, 10 steps: only the sum's float order differs
        doc = (out / name / "run.yaml").read_text()
        assert "replicas: 2" in doc and ("multi_worker" if name == "multi" else "mirrored") in doc


@pytest.mark.slow
def test_only_the_chief_wrote_files(runs):
    out, scratch = runs
    assert sorted(p.name for p in out.iterdir()) == ["mirrored", "multi", "none"]
    files = {name: sorted(p.name for p in (out / name).iterdir()) for name in ("multi", "none")}
    assert files["multi"] == files["none"]
    assert not list(scratch.iterdir())  # the worker's scratch copy is gone


@pytest.mark.slow
def test_epsilon_is_identical_and_accuracy_within_noise(runs):
    out, _ = runs
    base = _metrics(out / "none")
    for name in ("mirrored", "multi"):
        row = _metrics(out / name)
        for column in ("step", "epsilon_rdp", "epsilon_pld", "delta", "noise_multiplier", "l2_norm_clip"):
            assert row[column] == base[column], (name, column)
        assert abs(float(row["test_accuracy"]) - float(base["test_accuracy"])) <= 0.01


@pytest.mark.slow
def test_sigterm_to_one_worker_stops_both_and_the_run_resumes_on_one_device(tmp_path, data_dir):
    import signal

    import yaml

    workers = _two_workers(tmp_path, "stop", data_dir, ["--set", "distribute.collective_timeout_s=120",
                                                        "--set", "training.epochs=3"], tmp_path)
    run_dir = tmp_path / "stop"
    _wait_for_first_epoch(run_dir, workers)
    workers[1].send_signal(signal.SIGTERM)  # the non-chief only: both must stop after the same step
    codes = [w.wait(180) for w in workers]
    assert codes == [130, 130], [w.stderr.read()[-2000:] for w in workers]
    doc = yaml.safe_load((run_dir / "run.yaml").read_text())
    assert doc["status"] == "interrupted" and 1 <= doc["epochs_done"] < 3
    done = doc["epochs_done"]
    assert not list(tmp_path.glob("dpsgd-worker*"))  # the stopped worker removed its scratch copy
    resumed = subprocess.run([sys.executable, "-m", "dpsgd_cli", "train", "--resume", str(run_dir), "--quiet",
                              "--set", "distribute.strategy=none"], capture_output=True, text=True,
                             env=_env(), cwd=tmp_path, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    doc = yaml.safe_load((run_dir / "run.yaml").read_text())
    assert doc["status"] == "finished" and doc["config"]["distribute"]["strategy"] == "none"
    assert doc["resolved"]["distribute"]["history"] == [
        {"from_epoch": 1, "strategy": "multi_worker", "replicas": 2, "workers": 2},
        {"from_epoch": done + 1, "strategy": "none", "replicas": 1, "workers": 1}]
    assert _metrics(run_dir)["step"] == "30"  # 3 epochs of 480 / 48 steps: the ledger composed each once


@pytest.mark.slow
def test_a_lost_worker_is_one_error_line_not_a_hang(tmp_path, data_dir):
    # scratch under tmp_path: the killed worker cannot remove its scratch directory
    workers = _two_workers(tmp_path, "lost", data_dir, ["--set", "distribute.collective_timeout_s=20",
                                                        "--set", "training.epochs=6"], tmp_path)
    _wait_for_first_epoch(tmp_path / "lost", workers)
    workers[1].kill()  # SIGKILL: no goodbye
    start = time.monotonic()
    code = workers[0].wait(180)
    stderr = workers[0].stderr.read()
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert code not in (0, 130) and "Traceback" not in stderr and len(errors) == 1, stderr[-3000:]
    assert errors[0].startswith("error: distribute: a collective across the 2 workers failed")
    assert time.monotonic() - start < 120
