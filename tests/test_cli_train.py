"""`dpsgd train` in-process: results written, existing runs refused with the flag to pass, --resume's rules,
Ctrl-C. Run directories for the refusal tests are made by hand (`make_run_dir`), without TensorFlow."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from dpsgd_cli.cli import app
from dpsgd_cli.config import load_config
from dpsgd_cli.privacy.run_key import KEY_FILE, load_run_key, new_run_key, save_run_key
from dpsgd_cli.runs import checkpoint
from dpsgd_cli.runs.results import write_yaml
from dpsgd_cli.training import trainer

MISSING_DATA = "/nonexistent/dpsgd-test-data"


def make_run_dir(run_dir: Path, status: str, *, epochs: int = 3, epochs_done: int | None = None,
                 data_dir: str = MISSING_DATA) -> Path:
    """A run directory as `dpsgd train` leaves it, without training: run.yaml with `status` and, if
    `epochs_done` is given, a checkpoint after that many epochs (its arrays are placeholders)."""
    cfg = load_config(None, [f"data.data_dir={data_dir}", f"training.epochs={epochs}", "data.batch_size=64",
                             "privacy.noise_multiplier=1.1", f"output_dir={run_dir.parent}",
                             f"name={run_dir.name}"])
    run_dir.mkdir(parents=True, exist_ok=True)
    write_yaml({"status": status, "config": cfg.to_dict()}, run_dir / "run.yaml")
    save_run_key(new_run_key(reproducible=False, seed=cfg.seed), run_dir)
    if epochs_done is not None:
        records = [{"epoch": e, "step": 10 * e} for e in range(1, epochs_done + 1)]
        state = {"epochs_done": epochs_done, "epochs": epochs, "steps_done": 10 * epochs_done,
                 "elapsed_s": 1.5, "records": records, "config": cfg.to_dict(), "noise_multiplier": 1.1}
        checkpoint.save(run_dir, checkpoint.Checkpoint(state, [np.zeros((2, 3), np.float32)],
                                                       [np.zeros((), np.int64)]))
        (run_dir / "metrics.csv").write_text("epoch\n" + "".join(f"{e}\n" for e in range(1, epochs_done + 1)))
    return run_dir


def invoke(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


def error_line(result) -> str:
    """The one line a user error prints; fails the test on anything else (a traceback, several lines)."""
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------------------
# Refusals (no TensorFlow)
# ------------------------------------------------------------------------------------------------
def test_an_unfinished_run_is_refused_with_both_ways_out(tmp_path):
    run_dir = make_run_dir(tmp_path / "r", "interrupted", epochs=3, epochs_done=1)
    before = tree(tmp_path)
    result = invoke("train", "--set", f"output_dir={tmp_path}", "--name", "r", "--set",
                    "privacy.noise_multiplier=1.1")
    line = error_line(result)
    assert result.exit_code == 2
    assert "holds an unfinished run (epoch 1 of 3)" in line
    assert f"--resume {run_dir}" in line and "--overwrite" in line
    assert tree(tmp_path) == before


@pytest.mark.parametrize("status, epochs_done, expected", [
    ("finished", 3, "holds a finished run (3 epochs); pass --overwrite to replace it"),
    ("failed", 1, "holds a failed run (epoch 1 of 3 finished; its run.yaml says why): pass --resume"),
    ("running", None, "holds an unfinished run (epoch 0 of 3): pass --resume"),
])
def test_refusal_says_what_the_directory_holds(tmp_path, status, epochs_done, expected):
    make_run_dir(tmp_path / "r", status, epochs=3, epochs_done=epochs_done)
    result = invoke("train", "--set", f"output_dir={tmp_path}", "--name", "r", "--sigma", "1")
    assert result.exit_code == 2 and expected in error_line(result)


def test_a_corrupt_checkpoint_is_named_in_the_refusal(tmp_path):
    run_dir = make_run_dir(tmp_path / "r", "running", epochs_done=2)
    path = checkpoint.path_in(run_dir)
    path.write_bytes(path.read_bytes()[:-7])
    line = error_line(invoke("train", "--set", f"output_dir={tmp_path}", "--name", "r", "--sigma", "1"))
    assert "cannot be resumed" in line and "truncated" in line and "--overwrite" in line


def test_overwrite_never_deletes_what_is_not_a_run(tmp_path):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "thesis.tex").write_text("precious")
    result = invoke("train", "--set", f"output_dir={tmp_path}", "--name", "r", "--sigma", "1", "--overwrite")
    assert result.exit_code == 2 and "not a dpsgd run" in error_line(result)
    assert (tmp_path / "r" / "thesis.tex").read_text() == "precious"


def test_overwrite_keeps_the_old_run_when_the_new_one_cannot_start(tmp_path):
    make_run_dir(tmp_path / "r", "finished", epochs_done=3)
    before = tree(tmp_path)
    result = invoke("train", "--set", f"output_dir={tmp_path}", "--name", "r", "--sigma", "1", "--overwrite",
                    "--set", f"data.data_dir={MISSING_DATA}")
    assert result.exit_code == 2 and "data directory not found" in error_line(result)
    assert tree(tmp_path) == before


@pytest.mark.parametrize("extra, expected", [
    (["--set", "training.epochs=5"], "drop --set"),
    (["--config", "configs/quickstart.yaml", "--sigma", "2"], "drop --config, --sigma"),
    (["--epochs", "9"], "drop --epochs"),
    (["--overwrite"], "--resume and --overwrite exclude each other"),
])
def test_resume_takes_the_recorded_config_only(tmp_path, extra, expected):
    run_dir = make_run_dir(tmp_path / "r", "interrupted", epochs_done=1)
    before = tree(tmp_path)
    result = invoke("train", "--resume", run_dir, *extra)
    assert result.exit_code == 2 and expected in error_line(result)
    assert tree(tmp_path) == before


def test_resume_refusals(tmp_path):
    finished = make_run_dir(tmp_path / "done", "finished", epochs_done=3)
    (tmp_path / "empty").mkdir()
    cases = {finished: "nothing to resume", tmp_path / "nope": "no such run directory",
             tmp_path / "empty": "not a dpsgd run directory"}
    for run_dir, expected in cases.items():
        result = invoke("train", "--resume", run_dir)
        assert result.exit_code == 2 and expected in error_line(result), run_dir


def test_resume_uses_run_yaml_and_reaches_the_data(tmp_path):
    """With a sound checkpoint, --resume gets as far as loading the recorded data (missing here)."""
    run_dir = make_run_dir(tmp_path / "r", "interrupted", epochs_done=1)
    result = invoke("train", "--resume", run_dir)
    assert result.exit_code == 2 and MISSING_DATA in error_line(result)
    assert "resuming" in result.stdout and "after epoch 1 of 3" in result.stdout


# ------------------------------------------------------------------------------------------------
# Real runs (TensorFlow, a few seconds each)
# ------------------------------------------------------------------------------------------------
def _tiny_args(data_dir, out: Path, name: str, epochs: int = 2) -> list[str]:
    sets = [f"data.data_dir={data_dir}", "data.train_size=256", "data.test_size=100", "data.batch_size=64",
            "privacy.noise_multiplier=1.1", f"output_dir={out}"]
    return ["train", *[a for s in sets for a in ("--set", s)], "--epochs", str(epochs), "--name", name,
            "--quiet"]


@pytest.mark.slow
def test_train_writes_checkpoint_refuses_rerun_then_overwrites(data_dir, tmp_path):
    """In reproducible mode the replacing run repeats the first one exactly."""
    args = [*_tiny_args(data_dir, tmp_path, "t"), "--set", "privacy.reproducible=true"]
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    run_dir = tmp_path / "t"
    ckpt = checkpoint.load(run_dir)
    assert ckpt.epochs_done == 2 and ckpt.steps_done == 8
    metrics = pd.read_csv(run_dir / "metrics.csv")
    assert metrics["epoch"].tolist() == [1, 2]
    assert [r["epsilon_pld"] for r in ckpt.records] == metrics["epsilon_pld"].tolist()
    assert yaml.safe_load((run_dir / "run.yaml").read_text())["status"] == "finished"
    assert not [p for p in run_dir.iterdir() if p.name.startswith(".")]  # no temporaries left

    again = invoke(*args)
    assert again.exit_code == 2 and "holds a finished run (2 epochs)" in error_line(again)
    replaced = invoke(*args, "--overwrite")
    assert replaced.exit_code == 0, replaced.output
    assert pd.read_csv(run_dir / "metrics.csv").drop(columns="elapsed_s").equals(
        metrics.drop(columns="elapsed_s"))


@pytest.mark.slow
def test_ctrl_c_keeps_finished_epochs_and_says_how_to_resume(data_dir, tmp_path, monkeypatch):
    original = trainer.Trainer.train_epoch

    def interrupted_in_epoch_2(self, epoch, on_step):
        if epoch == 2:
            raise KeyboardInterrupt
        return original(self, epoch, on_step)

    monkeypatch.setattr(trainer.Trainer, "train_epoch", interrupted_in_epoch_2)
    args = _tiny_args(data_dir, tmp_path, "c", epochs=3)
    result = invoke(*args)
    run_dir = tmp_path / "c"
    assert result.exit_code == 130 and "Traceback" not in result.output
    assert (f"interrupted: 1 of 3 epochs are saved in {run_dir}; continue with: dpsgd train --resume "
            f"{run_dir}") in result.stderr
    assert yaml.safe_load((run_dir / "run.yaml").read_text())["status"] == "interrupted"
    assert checkpoint.load(run_dir).epochs_done == 1
    assert len(pd.read_csv(run_dir / "metrics.csv")) == 1

    monkeypatch.setattr(trainer.Trainer, "train_epoch", original)
    resumed = invoke("train", "--resume", run_dir, "--quiet")
    assert resumed.exit_code == 0, resumed.output
    assert pd.read_csv(run_dir / "metrics.csv")["epoch"].tolist() == [1, 2, 3]
    doc = yaml.safe_load((run_dir / "run.yaml").read_text())
    assert doc["status"] == "finished" and doc["resumed_at_epochs"] == [1]


@pytest.mark.slow
def test_diverging_run_is_one_line_exit_1(data_dir, tmp_path):
    args = _tiny_args(data_dir, tmp_path, "nan")
    result = invoke(*args, "--set", "privacy.enabled=false", "--set", "training.optimizer=sgd",
                    "--set", "training.learning_rate=1e6")
    line = error_line(result)
    assert result.exit_code == 1
    assert "training diverged; lower training.learning_rate (now 1e+06)" in line and "epoch 1" in line
    assert yaml.safe_load((tmp_path / "nan" / "run.yaml").read_text())["status"] == "failed"


@pytest.mark.slow
@pytest.mark.parametrize("plan", ["auto", "{conv1: {grads: ghost}, conv2: {grads: ghost}}"])
def test_one_overflowing_example_is_dropped_and_counted_not_a_failed_run(data_dir, tmp_path, monkeypatch,
                                                                         plan):
    """One training image of 1e38 overflows float32 in the first convolution: its unit is left out of
    every step (batch = the whole set, so every step samples it) and counted in train_nonfinite_units;
    the run finishes with finite weights and test metrics instead of failing on a NaN (with the default
    formulation, and with Gram-matrix norms, where 0·∞ poisoned the sum)."""
    from dpsgd_cli.experiment import run as run_module
    from dpsgd_cli.training.data import load_config_data

    def with_one_huge_image(cfg):
        data = load_config_data(cfg)
        x = data.x_train.copy()
        x[5] = 1e38
        return dataclasses.replace(data, x_train=x)

    monkeypatch.setattr(run_module, "load_config_data", with_one_huge_image)
    args = [*_tiny_args(data_dir, tmp_path, "huge"), "--set", "data.batch_size=256", "--set",
            f"training.plan={plan}"]
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    metrics = pd.read_csv(tmp_path / "huge" / "metrics.csv")
    assert metrics["train_nonfinite_units"].tolist() == [1.0, 1.0]  # one step per epoch, each drops it
    assert np.isfinite(metrics[["train_loss", "train_accuracy", "test_loss", "test_accuracy"]]).all().all()
    assert checkpoint.load(tmp_path / "huge").epochs_done == 2


# ------------------------------------------------------------------------------------------------
# The secret run key
# ------------------------------------------------------------------------------------------------
def key_representations(material: bytes) -> list[bytes]:
    """Every way the key could leak into a file or a log: raw, hex, base64, its integer and its halves."""
    import base64

    whole = int.from_bytes(material, "big")
    halves = [int.from_bytes(material[i:i + 8], "big", signed=signed) for i in (0, 8) for signed in (0, 1)]
    texts = [material.hex(), material.hex().upper(), base64.b64encode(material).decode(), str(whole),
             *(str(h) for h in halves if abs(h) >= 10**6)]
    return [material, *(t.encode() for t in texts)]


@pytest.mark.parametrize("damage", ["missing", "damaged"])
def test_resume_without_a_good_key_file_is_one_line_exit_2_and_changes_nothing(tmp_path, damage):
    run_dir = make_run_dir(tmp_path / "r", "interrupted", epochs=3, epochs_done=1)
    key = load_run_key(run_dir)
    if damage == "missing":
        (run_dir / KEY_FILE).unlink()
    else:
        text = (run_dir / KEY_FILE).read_text()
        (run_dir / KEY_FILE).write_text(text.replace(key.material.hex(), "00" * 16))
    before = tree(tmp_path)
    result = invoke("train", "--resume", run_dir)
    line = error_line(result)
    assert result.exit_code == 2 and f"run.key: {damage}" in line and "--overwrite" in line
    assert key.material.hex() not in result.output
    assert tree(tmp_path) == before


@pytest.mark.slow
def test_the_key_is_only_in_its_0600_file_and_never_printed(data_dir, tmp_path):
    """A default-mode run with canaries, then audit, plot and export: no file but run.key holds the key
    in any encoding, run.key is 0600, and nothing printed shows it."""
    out = tmp_path / "results"
    result = invoke("train", "--set", f"data.data_dir={data_dir}", "--set", "data.train_size=512",
                    "--set", "data.test_size=100", "--set", "data.batch_size=64", "--epochs", "1",
                    "--sigma", "1.1", "--set", "privacy.canaries=16", "--set", f"output_dir={out}",
                    "--name", "r")
    assert result.exit_code == 0, result.output
    run_dir = out / "r"
    key = load_run_key(run_dir)
    assert key.mode == "secret" and (run_dir / KEY_FILE).stat().st_mode & 0o777 == 0o600
    outputs = [result.output]
    for args in (["audit", run_dir, "--json"], ["plot", run_dir], ["report", run_dir],
                 ["export", run_dir, tmp_path / "published"]):
        step = invoke(*args)
        assert step.exit_code == 0, step.output
        outputs.append(step.output)
    files = [p for p in tmp_path.rglob("*") if p.is_file() and p != run_dir / KEY_FILE]
    names = {p.name for p in files}
    assert {"run.yaml", "metrics.csv", "checkpoint.ckpt", "canaries.npz", "audit.json"} <= names
    for needle in key_representations(key.material):
        for path in files:
            assert needle not in path.read_bytes(), (path, needle[:4])
        assert all(needle.decode("latin-1") not in text for text in outputs)
    said = " ".join(result.output.split())
    assert "secret 128-bit key" in said and "train_loss" in said
    assert "does not cover what is computed from the private data" in said
    published = sorted(p.name for p in (tmp_path / "published").iterdir())
    assert not {KEY_FILE, "checkpoint.ckpt", "canaries.npz"} & set(published)
