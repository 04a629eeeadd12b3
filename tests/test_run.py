"""training/runner: a run killed (SIGKILL) or interrupted (SIGINT) mid-epoch and resumed writes the same
metrics.csv as an uninterrupted run, ε included; a diverging run keeps its last good checkpoint (the
checkpoint file itself: tests/test_checkpoint.py).

metrics.csv is compared byte for byte except `elapsed_s`, which is wall time (it continues from the time
already spent, so it grows across the resume but cannot repeat the uninterrupted run's clock)."""

from __future__ import annotations

import csv
import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import yaml

from dpsgd_cli.config import load_config
from dpsgd_cli.errors import RunDirError, TrainingError
from dpsgd_cli.experiment import run as runner
from dpsgd_cli.privacy.run_key import load_run_key
from dpsgd_cli.runs import checkpoint
from dpsgd_cli.runs.run_dir import check_run_dir, resume_config
from dpsgd_cli.training import trainer
from dpsgd_cli.training.data import write_idx

# 1024 examples / batch 64 = 16 steps an epoch: long enough that a kill right after the first checkpoint
# lands inside epoch 2.
TINY = ["data.train_size=1024", "data.test_size=200", "data.batch_size=64", "training.epochs=3",
        "privacy.noise_multiplier=1.1"]


def _cmd(data_dir, out: Path, name: str) -> list[str]:
    sets = [f"data.data_dir={data_dir}", *TINY, f"output_dir={out}", f"name={name}"]
    return [sys.executable, "-m", "dpsgd_cli", "train", *[a for s in sets for a in ("--set", s)], "--quiet"]


def _env() -> dict[str, str]:
    return {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": ""}


def _without_elapsed(path: Path) -> list[list[str]]:
    """metrics.csv as text fields, the wall-clock column dropped."""
    rows = list(csv.reader(io.StringIO(path.read_text())))
    drop = rows[0].index("elapsed_s")
    return [row[:drop] + row[drop + 1:] for row in rows]


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.monotonic() < deadline, f"no {path} after {timeout} s"
        time.sleep(0.01)


_UNINTERRUPTED = """
import sys
from pathlib import Path
from types import SimpleNamespace
from dpsgd_cli.experiment import run as runner
from dpsgd_cli.config import load_config
from dpsgd_cli.privacy.run_key import load_run_key
*sets, keyed = sys.argv[1:]
runner.run(load_config(None, sets), run_key=load_run_key(Path(keyed)))
"""


def _start_uninterrupted_with_key_of(run_dir: Path, data_dir, out: Path) -> subprocess.Popen:
    """The same run, uninterrupted, with the (secret) key of `run_dir`, in the background: a resumed
    default-mode run must equal the uninterrupted run of the same key."""
    sets = [f"data.data_dir={data_dir}", *TINY, f"output_dir={out}", f"name={run_dir.name}"]
    return subprocess.Popen([sys.executable, "-c", _UNINTERRUPTED, *sets, str(run_dir)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())


def _finished_metrics(proc: subprocess.Popen, out: Path, name: str) -> Path:
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-2000:]
    return out / name / "metrics.csv"


def _low_priority_with_default_sigint() -> None:
    """In the child: nice 10, and SIGINT's default action restored — a shell running the test suite in the
    background (`cmd &`, nohup) starts it with SIGINT ignored, and Python then never raises
    KeyboardInterrupt, so the run would ignore the interrupt the test sends, as a user asked it to."""
    os.nice(10)
    signal.signal(signal.SIGINT, signal.default_int_handler)


def _stopped_after_first_checkpoint(data_dir, out: Path, name: str, sig: int) -> tuple[Path, int, str]:
    """Start a run, send `sig` as soon as its first checkpoint exists; (run_dir, return code, stderr).

    The run gets a lower CPU priority (nice 10), so that on a busy 2-core machine this process sees the
    checkpoint and signals while epoch 2 is still running (epochs take well under a second)."""
    run_dir = out / name
    proc = subprocess.Popen(_cmd(data_dir, out, name), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=_env(), preexec_fn=_low_priority_with_default_sigint)
    _wait_for(checkpoint.path_in(run_dir), proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    return run_dir, proc.returncode, err


def _resume(run_dir: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "dpsgd_cli", "train", "--resume", str(run_dir), "--quiet"]
    resumed = subprocess.run(command, capture_output=True, text=True, env=_env(), timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    return resumed


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_gives_the_uninterrupted_metrics(data_dir, tmp_path):
    """Default (secret-key) mode: the resumed run equals the uninterrupted run of the same key."""
    run_dir, code, _ = _stopped_after_first_checkpoint(data_dir, tmp_path, "killed", signal.SIGKILL)
    reference = _start_uninterrupted_with_key_of(run_dir, data_dir, tmp_path / "reference")
    assert code == -signal.SIGKILL
    assert checkpoint.load(run_dir).epochs_done == 1  # killed inside epoch 2
    assert yaml.safe_load((run_dir / "run.yaml").read_text())["status"] == "running"

    resumed = _resume(run_dir)
    assert f"resuming {run_dir} after epoch 1 of 3" in resumed.stdout
    assert _without_elapsed(run_dir / "metrics.csv") == _without_elapsed(
        _finished_metrics(reference, tmp_path / "reference", "killed"))
    rows = csv.DictReader(io.StringIO((run_dir / "metrics.csv").read_text()))
    elapsed = [float(r["elapsed_s"]) for r in rows]
    assert elapsed == sorted(elapsed)  # the clock continued from the time already spent
    doc = yaml.safe_load((run_dir / "run.yaml").read_text())
    assert doc["status"] == "finished" and doc["resumed_at_epochs"] == [1] and doc["final"]["step"] == 48
    assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoint.ckpt", "metrics.csv", "model.weights.h5",
                                                        "run.key", "run.yaml"]


@pytest.mark.slow
def test_sigint_stops_cleanly_says_how_to_resume_and_resume_matches(data_dir, tmp_path):
    run_dir, code, err = _stopped_after_first_checkpoint(data_dir, tmp_path, "stopped", signal.SIGINT)
    reference = _start_uninterrupted_with_key_of(run_dir, data_dir, tmp_path / "reference")
    assert code == 130 and "Traceback" not in err, err[-2000:]
    done = checkpoint.load(run_dir).epochs_done
    assert f"interrupted: {done} of 3 epochs are saved in {run_dir}; continue with: dpsgd train --resume " \
           f"{run_dir}" in err
    doc = yaml.safe_load((run_dir / "run.yaml").read_text())
    assert doc["status"] == "interrupted" and doc["epochs_done"] == done
    assert len(_without_elapsed(run_dir / "metrics.csv")) - 1 == done

    _resume(run_dir)
    assert _without_elapsed(run_dir / "metrics.csv") == _without_elapsed(
        _finished_metrics(reference, tmp_path / "reference", "stopped"))


# ------------------------------------------------------------------------------------------------
# In-process
# ------------------------------------------------------------------------------------------------
def _cfg(data_dir, out: Path, name: str, *extra: str):
    return load_config(None, [f"data.data_dir={data_dir}", "data.train_size=256", "data.test_size=100",
                              "data.batch_size=64", "training.epochs=3", "privacy.noise_multiplier=1.1",
                              f"output_dir={out}", f"name={name}", *extra])


@pytest.mark.slow
def test_resume_continues_weights_optimizer_and_epsilon(data_dir, tmp_path):
    """Adam (slots and iteration count), the ledger and the step counter all continue: same records."""
    full = runner.run(_cfg(data_dir, tmp_path, "full"))

    def stop_after_epoch_1(record):
        if record["epoch"] == 1:
            raise KeyboardInterrupt

    cfg = _cfg(data_dir, tmp_path, "part")
    with pytest.raises(runner.RunInterrupted) as stop:  # the same secret key: the same batches and noise
        runner.run(cfg, on_epoch=stop_after_epoch_1, run_key=load_run_key(full.run_dir))
    assert (stop.value.epochs_done, stop.value.epochs) == (1, 3)
    with pytest.raises(RunDirError, match="holds an unfinished run"):
        runner.run(cfg)
    resumed = runner.run(resume_config(cfg.run_dir), resume=True)
    strip = [{k: v for k, v in r.items() if k != "elapsed_s"} for r in full.records]
    assert [{k: v for k, v in r.items() if k != "elapsed_s"} for r in resumed.records] == strip
    assert resumed.statement == full.statement
    assert resumed.records[1]["elapsed_s"] >= resumed.records[0]["elapsed_s"]

    # the data it resumes with must be the data it started with
    other = tmp_path / "other-data" / "fashion_mnist"
    other.mkdir(parents=True)
    for kind in ("images-idx3", "labels-idx1"):
        src = Path(data_dir) / "fashion_mnist" / f"t10k-{kind}-ubyte.gz"
        (other / src.name).write_bytes(src.read_bytes())
    rng = np.random.default_rng(1)
    write_idx(other, rng.integers(0, 255, (300, 28, 28)), rng.integers(0, 10, 300), "train")
    cfg2 = _cfg(data_dir, tmp_path, "moved")
    with pytest.raises(runner.RunInterrupted):
        runner.run(cfg2, on_epoch=stop_after_epoch_1)
    doc = yaml.safe_load((cfg2.run_dir / "run.yaml").read_text())
    doc["config"]["data"]["data_dir"] = str(other.parent)
    (cfg2.run_dir / "run.yaml").write_text(yaml.safe_dump(doc))
    with pytest.raises(RunDirError, match="the dataset differs"):
        runner.run(resume_config(cfg2.run_dir), resume=True)
    # an edited config (one that changes what is trained) is refused too
    doc["config"]["data"]["data_dir"] = str(data_dir)
    doc["config"]["privacy"]["noise_multiplier"] = 2.0
    (cfg2.run_dir / "run.yaml").write_text(yaml.safe_dump(doc))
    with pytest.raises(RunDirError, match=r"different config .*privacy\.noise_multiplier"):
        runner.run(resume_config(cfg2.run_dir), resume=True)


@pytest.mark.slow
def test_divergence_keeps_the_last_good_checkpoint_and_metrics(data_dir, tmp_path, monkeypatch):
    """Epoch 1 trains normally; in epoch 2 the learning rate jumps to 1e6 (SGD, non-private) → NaN."""
    original = trainer.Trainer.train_epoch

    def explode_in_epoch_2(self, epoch, on_step):
        if epoch == 2:
            self.optimizer.learning_rate.assign(1e6)
        return original(self, epoch, on_step)

    monkeypatch.setattr(trainer.Trainer, "train_epoch", explode_in_epoch_2)
    cfg = _cfg(data_dir, tmp_path, "nan", "privacy.enabled=false", "training.optimizer=sgd",
               "training.learning_rate=0.05")
    ckpt_path, metrics = checkpoint.path_in(cfg.run_dir), cfg.run_dir / "metrics.csv"
    seen: dict[str, bytes] = {}

    def remember(record):
        seen.update(ckpt=ckpt_path.read_bytes(), metrics=metrics.read_bytes())

    with pytest.raises(TrainingError) as failure:
        runner.run(cfg, on_epoch=remember)
    message = str(failure.value)
    assert "at epoch 2" in message or "after epoch 2" in message
    assert "step" in message and "lower training.learning_rate" in message
    assert "epochs 1–1 are kept" in message and "\n" not in message
    assert ckpt_path.read_bytes() == seen["ckpt"] and metrics.read_bytes() == seen["metrics"]
    assert checkpoint.load(cfg.run_dir).epochs_done == 1
    doc = yaml.safe_load((cfg.run_dir / "run.yaml").read_text())
    assert doc["status"] == "failed" and "diverged" in doc["error"] and doc["epochs_done"] == 1
    with pytest.raises(RunDirError, match=r"holds a failed run \(epoch 1 of 3 finished"):
        check_run_dir(cfg.run_dir)


def test_a_checkpoint_under_another_architecture_name_continues_and_a_changed_model_does_not():
    """A checkpoint whose recorded config names the model by another name (scatter_cnn_wide for
    scatter_cnn_32_64) belongs to the same run; one recording a different model does not."""
    cfg = load_config(None, [*TINY, "model.architecture=scatter_cnn_32_64", "model.activation=tanh"])
    plan = SimpleNamespace(noise_multiplier=1.1)

    def ckpt(architecture: str) -> checkpoint.Checkpoint:
        recorded = cfg.to_dict()
        recorded["model"] = {**recorded["model"], "architecture": architecture}
        return checkpoint.Checkpoint({"config": recorded, "noise_multiplier": 1.1, "data_fingerprint": "f",
                                      "dataset_size": 1024, "epochs_done": 1, "steps_done": 16})

    runner._check_continues(ckpt("scatter_cnn_wide"), cfg, plan, "f")
    with pytest.raises(RunDirError, match=r"different config .*model\.architecture"):
        runner._check_continues(ckpt("scatter_cnn_wider"), cfg, plan, "f")
