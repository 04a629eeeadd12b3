"""RunDir (no TensorFlow): one error path for run.yaml, the recorded config placed where the directory now
is, and the checkpoint verified once per version of the file however many readers ask."""

from __future__ import annotations

import numpy as np
import pytest
import yaml
from test_cli_train import make_run_dir

from dpsgd_cli.errors import RunDirError
from dpsgd_cli.runs import checkpoint
from dpsgd_cli.runs.run_dir import RunDir


@pytest.mark.parametrize("text, message", [
    (None, "not a run directory"),
    ("status: [unclosed", "run.yaml: unreadable"),
    ("- a list\n- not a mapping\n", "not a dpsgd run description"),
    ("status: finished\n", "not a dpsgd run description"),
])
def test_every_bad_run_yaml_is_one_run_dir_error(tmp_path, text, message):
    if text is not None:
        (tmp_path / "run.yaml").write_text(text)
    with pytest.raises(RunDirError, match=message) as error:
        RunDir(tmp_path).document()
    assert "\n" not in str(error.value)


def test_config_is_placed_where_the_directory_now_is(tmp_path):
    make_run_dir(tmp_path / "old" / "r", "finished", epochs=2)
    (tmp_path / "old" / "r").rename(tmp_path / "moved")
    cfg = RunDir(tmp_path / "moved").config()
    assert cfg.run_dir == tmp_path / "moved" and cfg.training.epochs == 2
    assert RunDir(tmp_path / "moved").status() == "finished"


def test_file_names_have_one_home(tmp_path):
    rd = RunDir(str(tmp_path))
    assert rd.path == tmp_path
    assert [p.name for p in (rd.run_file, rd.metrics_file, rd.weights_file, rd.key_file, rd.checkpoint_file,
                             rd.canaries_file, rd.audit_file)] == [
        "run.yaml", "metrics.csv", "model.weights.h5", "run.key", "checkpoint.ckpt", "canaries.npz",
        "audit.json"]


def test_the_checkpoint_is_verified_once_per_version(tmp_path, monkeypatch):
    make_run_dir(tmp_path / "r", "interrupted", epochs=3, epochs_done=1)
    loads = []
    real_load = checkpoint.load
    monkeypatch.setattr(checkpoint, "load", lambda run_dir: loads.append(1) or real_load(run_dir))
    first = RunDir(tmp_path / "r").checkpoint()
    again = RunDir(tmp_path / "r").checkpoint()  # another reader, same file: not verified again
    assert first is again and first.epochs_done == 1 and len(loads) == 1
    state = {**first.state, "epochs_done": 2, "steps_done": 20,
             "records": [*first.records, {"epoch": 2, "step": 20}]}
    checkpoint.save(tmp_path / "r", checkpoint.Checkpoint(state, [np.zeros((2, 3), np.float32)],
                                                          [np.zeros((), np.int64)]))
    assert RunDir(tmp_path / "r").checkpoint().epochs_done == 2 and len(loads) == 2  # a new version
    assert RunDir(tmp_path / "nowhere").checkpoint() is None


def test_a_run_yaml_under_another_architecture_name_loads_with_the_model_name(tmp_path):
    run_dir = make_run_dir(tmp_path / "r", "finished", epochs=2)
    doc = yaml.safe_load((run_dir / "run.yaml").read_text())
    doc["config"]["model"]["architecture"] = "scatter_cnn_wide"  # the name of scatter_cnn_32_64 in older runs
    (run_dir / "run.yaml").write_text(yaml.safe_dump(doc))
    assert RunDir(run_dir).config().model.architecture == "scatter_cnn_32_64"
