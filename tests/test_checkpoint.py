"""runs/checkpoint: a checkpoint round-trips exactly, any truncation or flipped byte is a clear RunDirError,
a failed write keeps the previous checkpoint, and a killed process's temporaries are removed
(no TensorFlow)."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest

from dpsgd_cli.errors import OutputError, RunDirError
from dpsgd_cli.runs import checkpoint


def _sample(epochs_done: int = 2) -> checkpoint.Checkpoint:
    records = [{"epoch": e, "step": 4 * e, "epsilon_rdp": math.inf, "test_accuracy_class_3": math.nan,
                "train_loss": 0.1 + e / 3} for e in range(1, epochs_done + 1)]
    state = {"epochs_done": epochs_done, "steps_done": 4 * epochs_done, "elapsed_s": 12.25,
             "records": records}
    rng = np.random.default_rng(0)
    return checkpoint.Checkpoint(state, [rng.normal(size=(3, 4)).astype(np.float32), np.arange(4.0)],
                                 [np.array(7, np.int64), np.float32(0.001), rng.normal(size=(3, 4))])


def test_checkpoint_round_trip(tmp_path):
    ckpt = _sample()
    checkpoint.save(tmp_path, ckpt)
    back = checkpoint.load(tmp_path)
    assert back.epochs_done == 2 and back.steps_done == 8 and back.elapsed_s == 12.25
    assert back.records[0]["epsilon_rdp"] == math.inf and math.isnan(back.records[1]["test_accuracy_class_3"])
    assert back.records[1]["train_loss"] == ckpt.records[1]["train_loss"]  # floats exactly
    for a, b in zip(ckpt.model_weights + ckpt.optimizer_variables,
                    back.model_weights + back.optimizer_variables):
        assert a.dtype == b.dtype and np.array_equal(a, b)
    assert checkpoint.load(tmp_path / "elsewhere") is None


def test_every_truncation_and_flipped_byte_is_a_clear_error(tmp_path):
    checkpoint.save(tmp_path, _sample())
    path = checkpoint.path_in(tmp_path)
    blob = path.read_bytes()
    damaged = [blob[:n] for n in range(0, len(blob), max(1, len(blob) // 97))] + [blob[:-1], blob + b"\0"]
    rng = np.random.default_rng(0)
    for offset in [*range(0, 64), *rng.integers(0, len(blob), 200)]:
        flipped = bytearray(blob)
        flipped[offset] ^= 1 << int(rng.integers(0, 8))
        damaged.append(bytes(flipped))
    for bad in damaged:
        path.write_bytes(bad)
        with pytest.raises(RunDirError, match=r"checkpoint is corrupt \(.+\); this run cannot be resumed"):
            checkpoint.load(tmp_path)


def test_a_failed_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    checkpoint.save(tmp_path, _sample(1))
    before = checkpoint.path_in(tmp_path).read_bytes()

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OutputError, match="No space left on device.*the previous checkpoint is kept"):
        checkpoint.save(tmp_path, _sample(2))
    assert checkpoint.path_in(tmp_path).read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.ckpt"]  # no temporary left


def test_temporaries_of_a_killed_process_are_removed_on_resume(tmp_path):
    for name in (".metrics.csv.abc.tmp", ".checkpoint.ckpt.x.tmp", ".tmp.model.weights.h5"):
        (tmp_path / name).write_text("partial")
    (tmp_path / "metrics.csv").write_text("kept")
    checkpoint.remove_temporaries(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.csv"]
