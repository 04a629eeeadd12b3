"""dpsgd_cli.experiment.tune and `dpsgd tune`: the plan (candidates, σ, ε), the private folder and the key,
draws that depend on the key alone, and — training tiny trials — that the publication holds the winner
only (no loser's hyperparameters, score or weights, nothing that depends on K), that a search killed mid-
trial resumes to the very result of an uninterrupted one, and that array jobs plus --select do too."""

from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from dpsgd_cli.cli import app
from dpsgd_cli.config import replace
from dpsgd_cli.errors import ConfigError, RunDirError, TrainingError
from dpsgd_cli.experiment import tune
from dpsgd_cli.experiment.tune import search as search_module
from dpsgd_cli.privacy import tuning
from dpsgd_cli.privacy.run_key import KEY_FILE, new_run_key
from dpsgd_cli.runs.run_dir import RUN_FILE, SEARCH_FILE, WEIGHTS_FILE

ROOT = Path(__file__).resolve().parents[1]
LEARNING_RATES = [0.0123457, 0.0456789, 0.0891011, 0.1234567]  # distinctive: searched for in the bytes


def config_file(folder: Path, data_dir: str, *, seed: int = 0, epochs: int = 1, **tune_changes) -> Path:
    """A tiny search: tfp_cnn, 512 training + 128 held-out examples, reproducible."""
    doc = {
        "name": "srch", "output_dir": "results", "seed": seed,
        "data": {"data_dir": data_dir, "train_size": 640, "test_size": 200, "batch_size": 64},
        "model": {"architecture": "tfp_cnn"},
        "training": {"epochs": epochs, "optimizer": "sgd", "learning_rate": 0.1},
        "privacy": {"reproducible": True},
        "tune": {"space": {"training.learning_rate": LEARNING_RATES,
                           "privacy.l2_norm_clip": {"low": 0.5, "high": 2.0}},
                 "distribution": "geometric", "mean": 2, "target_epsilon": 10.0, "holdout": 128,
                 "score_noise_multiplier": 2.0, **tune_changes},
    }
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "tune.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def seed_with(count: int, data_dir: str, folder: Path) -> int:
    """A seed whose reproducible search draws K = `count` (K comes from the key alone: cheap to find)."""
    plan = tune.plan_search(config_file(folder, data_dir))
    for seed in range(200):
        key = new_run_key(reproducible=True, seed=seed, label=f"tune/{plan.name}")
        if plan.count.sample(key.generator(tuning.STREAM_TRIAL_COUNT)) == count:
            return seed
    raise AssertionError("no seed draws that K")


# ---------------------------------------------------------------------------------------------------
# The plan


def test_calibrated_candidates_meet_the_target_and_less_noise_would_not(in_tmp, data_dir):
    path = config_file(in_tmp, data_dir, space={"data.batch_size": [32, 64, 128],
                                                "training.learning_rate": {"low": 0.1, "high": 1.0}})
    plan = tune.plan_search(path)
    assert plan.train_size == 512 and plan.score_examples == 128 and plan.dataset_size == 640
    assert [c.privacy.sampling_rate for c in plan.candidates] == [32 / 512, 64 / 512, 128 / 512]
    assert len({c.noise_multiplier for c in plan.candidates}) == 3
    trials = [c.privacy for c in plan.candidates]
    assert plan.epsilon <= 10.0
    less = [t.with_noise(t.noise_multiplier * 0.999) for t in trials]
    assert tuning.search_epsilon(less, 2.0, plan.count, plan.delta) > 10.0
    assert plan.epsilon == tuning.search_epsilon(trials, 2.0, plan.count, plan.delta)


def test_a_fixed_sigma_is_every_trials_and_its_epsilon_is_reported(in_tmp, data_dir):
    plan = tune.plan_search(config_file(in_tmp, data_dir, target_epsilon=None, noise_multiplier=1.3))
    assert {c.noise_multiplier for c in plan.candidates} == {1.3}
    one = plan.candidates[0].privacy
    assert plan.epsilon == tuning.search_epsilon([one], 2.0, tuning.TrialCount("geometric", 2.0), 1e-5)


def test_too_large_a_holdout_is_a_config_error(in_tmp, data_dir):
    with pytest.raises(ConfigError, match="tune.holdout: 640 examples leave none"):
        tune.plan_search(config_file(in_tmp, data_dir, holdout=640))
    with pytest.raises(ConfigError, match=r"tune.space: the trial data.batch_size=600 \(on the 512 examples "
                                          r"left after tune.holdout\) does not fit: data.batch_size: 600 is "
                                          "larger than data.train_size 512"):
        tune.plan_search(config_file(in_tmp, data_dir, space={"data.batch_size": [64, 600]}))


# ---------------------------------------------------------------------------------------------------
# The search: folder, key, draws


def test_open_search_keeps_its_key_and_settings_private(in_tmp, data_dir):
    path = config_file(in_tmp, data_dir)
    plan = tune.plan_search(path)
    search = tune.open_search(plan)
    private = plan.private_dir
    assert stat.S_IMODE(os.stat(private).st_mode) == 0o700
    for name in (KEY_FILE, SEARCH_FILE):
        assert stat.S_IMODE(os.stat(private / name).st_mode) == 0o600
    again = tune.open_search(tune.plan_search(path))
    assert again.key == search.key and again.trials == search.trials
    assert [t.index for t in search.trials] == list(range(search.count))
    assert len({t.key.material for t in search.trials}) == search.count
    assert not plan.publish_dir.exists()


def test_secret_searches_draw_fresh_keys_and_keep_them(in_tmp, data_dir):
    path = config_file(in_tmp, data_dir)
    text = path.read_text().replace("reproducible: true", "reproducible: false")
    path.write_text(text)
    first = tune.open_search(tune.plan_search(path))
    assert first.key.mode == "secret" and tune.open_search(tune.plan_search(path)).key == first.key
    other = tune.open_search(tune.plan_search(path, name="other"))
    assert other.key != first.key


def test_draws_come_from_the_key_alone(in_tmp, data_dir):
    """K and each trial's hyperparameters depend on the key only: not on the data (another n), not on
    how many trials there are, and trial i's settings come from stream i."""
    plan = tune.plan_search(config_file(in_tmp, data_dir))
    other_data = tune.plan_search(config_file(in_tmp / "b", data_dir), dataset_size=2000)
    key = new_run_key(reproducible=True, seed=11, label="x")
    trials = tune.draw_trials(plan, key)
    assert len(trials) == plan.count.sample(key.generator(tuning.STREAM_TRIAL_COUNT))
    assert [t.assignment for t in tune.draw_trials(other_data, key)] == [t.assignment for t in trials]
    for t in trials:
        rng = key.generator(tuning.STREAM_TRIAL_SETTINGS, t.index)
        lr_pick = plan.tune.space[0].pick(rng)
        assert t.assignment[0] == ("training.learning_rate", LEARNING_RATES[lr_pick])
        assert t.assignment[1] == ("privacy.l2_norm_clip", plan.tune.space[1].draw(rng))
        assert t.cfg.training.learning_rate == LEARNING_RATES[lr_pick]
        assert t.cfg.privacy.noise_multiplier == t.candidate.noise_multiplier
        assert t.cfg.privacy.target_epsilon is None and t.cfg.data.train_size == 512
        assert t.run_dir == plan.private_dir / "trials" / f"trial-{t.index:04d}"
        assert t.key == tuning.trial_key(key, t.index)


def test_many_keys_draw_k_with_the_distributions_mean(in_tmp, data_dir):
    plan = tune.plan_search(config_file(in_tmp, data_dir, distribution="poisson", mean=3))
    counts = [len(tune.draw_trials(plan, new_run_key(reproducible=False, seed=0))) for _ in range(300)]
    assert abs(np.mean(counts) - 3) < 5 * np.sqrt(3 / 300) and 0 in counts


def test_a_changed_search_or_mode_is_refused(in_tmp, data_dir):
    path = config_file(in_tmp, data_dir)
    tune.open_search(tune.plan_search(path))
    with pytest.raises(RunDirError, match=r"other settings \(tune.mean\)"):
        tune.open_search(tune.plan_search(path, ["tune.mean=3"]))
    with pytest.raises(RunDirError, match="search's key is reproducible but privacy.reproducible is false"):
        plan = tune.plan_search(path, ["privacy.reproducible=false"])
        (plan.private_dir / SEARCH_FILE).unlink()
        tune.open_search(plan)
    # --overwrite starts again
    assert tune.open_search(tune.plan_search(path, ["tune.mean=3"]), overwrite=True).plan.tune.mean == 3


def test_an_occupied_publication_folder_is_refused_before_anything_runs(in_tmp, data_dir):
    plan = tune.plan_search(config_file(in_tmp, data_dir))
    plan.publish_dir.mkdir(parents=True)
    (plan.publish_dir / "notes.txt").write_text("mine")
    with pytest.raises(RunDirError, match="is not this search's publication"):
        tune.open_search(plan)
    assert not plan.private_dir.exists()


def test_the_key_and_settings_are_created_once(tmp_path):
    path = tmp_path / "f.yaml"
    assert search_module._create_once(path, "first") == "first"
    assert search_module._create_once(path, "second") == "first"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_selection_waits_for_every_trial(in_tmp, data_dir):
    search = tune.open_search(tune.plan_search(config_file(in_tmp, data_dir, seed=seed_with(2, data_dir,
                                                                                            in_tmp / "s"))))
    with pytest.raises(RunDirError, match="trials 0, 1 have not finished"):
        tune.select_and_publish(search)


def test_diverged_trials_are_never_selected_and_k_zero_publishes_nothing(in_tmp, data_dir):
    seed = seed_with(2, data_dir, in_tmp / "s")
    search = tune.open_search(tune.plan_search(config_file(in_tmp, data_dir, seed=seed)))
    ran = []

    def diverging(cfg, **kwargs):
        ran.append((cfg.name, kwargs.get("run_key")))
        raise TrainingError("loss is nan at epoch 1, step 3: training diverged")

    tune.run_trials(search, run_fn=diverging)
    assert ran == [(t.name, t.key) for t in search.trials]
    assert {tune.trial_state(search, t) for t in search.trials} == {"diverged"}
    selection = tune.select_and_publish(search)
    assert selection.winner is None and not search.plan.publish_dir.exists()
    assert tune.run_trials(search, run_fn=diverging) == []  # done: nothing runs again
    # Poisson can draw K = 0: the search publishes nothing
    path = config_file(in_tmp / "p", data_dir, distribution="poisson", mean=1)
    plan = tune.plan_search(path, name="empty")
    seed = next(s for s in range(100) if plan.count.sample(new_run_key(
        reproducible=True, seed=s, label="tune/empty").generator(tuning.STREAM_TRIAL_COUNT)) == 0)
    empty = tune.open_search(tune.plan_search(path, [f"seed={seed}"], name="empty"))
    assert empty.count == 0 and tune.select_and_publish(empty).winner is None


# ---------------------------------------------------------------------------------------------------
# Training tiny searches


def cli(*args: str) -> str:
    result = CliRunner().invoke(app, ["tune", *args])
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture(scope="module")
def searched(data_dir, tmp_path_factory):
    """One tiny reproducible search with K = 3, run by `dpsgd tune` to its publication."""
    root = tmp_path_factory.mktemp("searched")
    seed = seed_with(3, data_dir, root / "seed")
    path = config_file(root, data_dir, seed=seed)
    cwd = os.getcwd()
    os.chdir(root)
    try:
        output = cli("--config", str(path), "--quiet")
        search = tune.open_search(tune.plan_search(path))
    finally:
        os.chdir(cwd)
    return root, path, output, search


def _relative(search, root: Path):
    """The search's plan, with its folders made absolute (it was planned with output_dir: results)."""
    return root / search.plan.publish_dir, root / search.plan.private_dir


@pytest.mark.slow
def test_a_search_publishes_its_winner_only(searched):
    root, _, output, search = searched
    publish, private = _relative(search, root)
    assert sorted(p.name for p in publish.iterdir()) == [WEIGHTS_FILE, RUN_FILE]
    doc = yaml.safe_load((publish / RUN_FILE).read_text())
    selected = yaml.safe_load((private / "selected.yaml").read_text())
    winner = search.trials[selected["winner"]]
    assert selected["trials"] == 3 == search.count
    scores = {t.index: yaml.safe_load((private / "scores" / f"{t.name}.yaml").read_text())["noisy_score"]
              for t in search.trials}
    assert selected["winner"] == max(scores, key=lambda i: (scores[i], -i))
    # the winner: its hyperparameters, σ, noisy score, ε and the statement
    assert doc["status"] == "finished" and doc["config"]["name"] == "srch"
    assert doc["config"]["training"]["learning_rate"] == winner.cfg.training.learning_rate
    assert doc["config"]["privacy"]["l2_norm_clip"] == winner.cfg.privacy.l2_norm_clip
    assert doc["config"]["privacy"]["noise_multiplier"] == winner.candidate.noise_multiplier
    assert doc["search"]["score"]["noisy_correct"] == scores[winner.index]
    assert doc["search"]["epsilon"] == doc["final"]["epsilon_rdp"] == search.plan.epsilon <= 10.0
    statement = doc["privacy_statement"]
    assert tuning_phrase() in statement and "geometric distribution of mean 2" in statement
    assert "1 continuous range" in statement and "noise of std 2" in statement
    own_file = root / winner.run_dir / WEIGHTS_FILE
    with h5py.File(publish / WEIGHTS_FILE) as published, h5py.File(own_file) as own:
        assert _arrays(published) == _arrays(own)
    # nothing of the losers, nor K, in any published byte
    blob = b"".join((publish / name).read_bytes() for name in (RUN_FILE, WEIGHTS_FILE))
    losers = [t for t in search.trials if t.index != winner.index]
    for t in losers:
        for key, value in t.assignment:
            if value != dict(winner.assignment)[key]:
                for needle in _encodings(value):
                    assert needle not in blob, (key, value)
        for needle in _encodings(scores[t.index]):
            assert needle not in blob
        with h5py.File(root / t.run_dir / WEIGHTS_FILE) as own:
            for array in _arrays(own).values():
                assert array[:64] not in blob
    for needle in (b"trial-", b".private", b"trials:", b"naive"):
        assert needle not in blob
    # the positive controls: the winner's settings and score are found by the same search
    assert any(n in blob for n in _encodings(scores[winner.index]))
    assert "published" in output and "naive composition of the 3 trials" in output
    # one line per trial at its start and one at its end; no line per epoch
    assert output.count("[trial ") == 6 and "epoch 1:" not in output


def tuning_phrase() -> str:
    return ("(ε, δ) covers the whole search: the random number of trials, every trial's training, the scores "
            "and the selection")


def _arrays(h5) -> dict[str, bytes]:
    """Every dataset of an HDF5 file, as bytes, by path."""
    found: dict[str, bytes] = {}

    def keep(name, obj):
        if isinstance(obj, h5py.Dataset):
            found[name] = np.asarray(obj[()]).tobytes()

    h5.visititems(keep)
    return found


def _encodings(value) -> list[bytes]:
    if isinstance(value, float):
        return [repr(value).encode(), f"{value:g}".encode(), np.float64(value).tobytes(),
                np.float32(value).tobytes()]
    return [str(value).encode()]


@pytest.mark.slow
def test_the_published_score_is_the_held_out_count_plus_the_stated_noise(searched, data_dir, monkeypatch):
    """Recomputed apart: the winner's correct predictions on training examples 512..639 (the held-out
    end), and the noise: N(0, 2²) drawn from the search key's score stream for the winner's index."""
    import keras

    from dpsgd_cli.training.data import load_dataset
    from dpsgd_cli.training.model import model_from_config

    root, _, _, search = searched
    monkeypatch.chdir(root)
    selected = yaml.safe_load((search.plan.private_dir / "selected.yaml").read_text())
    winner = search.trials[selected["winner"]]
    data = load_dataset("fashion_mnist", data_dir, 640, 1)
    model = model_from_config(winner.cfg.model, 0)
    model.load_weights(search.plan.publish_dir / WEIGHTS_FILE)
    logits = keras.ops.convert_to_numpy(model(data.x_train[512:640], training=False))
    correct = int((logits.argmax(axis=1) == data.y_train[512:640]).sum())
    noise = search.key.generator(tuning.STREAM_SCORE_NOISE, winner.index).normal(0.0, 2.0)
    published = yaml.safe_load((search.plan.publish_dir / RUN_FILE).read_text())["search"]["score"]
    assert published["noisy_correct"] == pytest.approx(correct + noise, abs=1e-9)
    assert published["examples"] == 128 and published["noise_multiplier"] == 2.0


@pytest.mark.slow
def test_export_takes_the_publication_and_refuses_a_trial(searched, tmp_path):
    root, _, _, search = searched
    publish, _ = _relative(search, root)
    result = CliRunner().invoke(app, ["export", str(publish), str(tmp_path / "out"), "--allow-reproducible"])
    assert result.exit_code == 0 and sorted(p.name for p in (tmp_path / "out").iterdir()) == [WEIGHTS_FILE,
                                                                                             RUN_FILE]
    trial = root / search.trials[0].run_dir
    result = CliRunner().invoke(app, ["export", str(trial), str(tmp_path / "loser"), "--allow-reproducible"])
    assert result.exit_code == 2 and "is a trial of the private hyperparameter search" in result.output
    assert not (tmp_path / "loser").exists()


@pytest.mark.slow
def test_a_rerun_trains_nothing_and_publishes_nothing_new(searched):
    root, path, _, search = searched
    publish, _ = _relative(search, root)
    before = {p.name: p.stat().st_mtime_ns for p in publish.iterdir()}
    cwd = os.getcwd()
    os.chdir(root)
    try:
        output = cli("--config", str(path), "--quiet")
    finally:
        os.chdir(cwd)
    assert "[trial" not in output and {p.name: p.stat().st_mtime_ns for p in publish.iterdir()} == before


@pytest.mark.slow
def test_the_publication_does_not_depend_on_k(searched, tmp_path, monkeypatch):
    """The same search with one more trial that does not win publishes the very same bytes."""
    root, path, _, search = searched
    selected = yaml.safe_load((root / search.plan.private_dir / "selected.yaml").read_text())
    monkeypatch.chdir(tmp_path)
    shutil.copy(path, tmp_path / "tune.yaml")
    plan = tune.plan_search(tmp_path / "tune.yaml")
    real_sample = tuning.TrialCount.sample
    monkeypatch.setattr(tuning.TrialCount, "sample", lambda self, rng: real_sample(self, rng) + 1)
    bigger = tune.open_search(plan)
    assert bigger.count == search.count + 1
    assert [t.assignment for t in bigger.trials[:-1]] == [t.assignment for t in search.trials]
    # the extra trial must lose for the comparison to mean anything: give it no learning at all
    extra = bigger.trials[-1]
    slow_cfg = replace(extra.cfg, **{"training.learning_rate": 1e-9})
    trials = (*bigger.trials[:-1], search_module.Trial(extra.index, extra.assignment, slow_cfg,
                                                       extra.candidate, extra.key))
    bigger = search_module.Search(bigger.plan, bigger.key, trials)
    tune.run_trials(bigger)
    result = tune.select_and_publish(bigger)
    assert result.winner.index == selected["winner"]
    for name in (RUN_FILE, WEIGHTS_FILE):
        assert (plan.publish_dir / name).read_bytes() == (root / search.plan.publish_dir / name).read_bytes()


def _publication(root: Path) -> tuple[dict, bytes, dict]:
    publish, private = root / "results" / "srch", root / "results" / "srch.private"
    doc = yaml.safe_load((publish / RUN_FILE).read_text())
    scores = {p.name: p.read_text() for p in sorted((private / "scores").iterdir())}
    return doc, (publish / WEIGHTS_FILE).read_bytes(), scores


@pytest.mark.slow
def test_a_search_killed_mid_trial_resumes_to_the_uninterrupted_result(searched, data_dir, tmp_path):
    root, _, _, search = searched
    # the same search with 3 epochs per trial, uninterrupted (in-process) and killed (a child process)
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    seed = search.plan.base.seed
    for folder in (reference, killed):
        config_file(folder, data_dir, seed=seed, epochs=3)
    cwd = os.getcwd()
    try:
        os.chdir(reference)
        cli("--config", "tune.yaml", "--quiet")
    finally:
        os.chdir(cwd)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3"}
    child = subprocess.Popen([sys.executable, "-m", "dpsgd_cli", "tune", "--config", "tune.yaml", "--quiet"],
                             cwd=killed, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    second = killed / "results" / "srch.private" / "trials" / "trial-0001"
    deadline = time.monotonic() + 300
    try:
        while not (second / "checkpoint.ckpt").exists():  # trial 1 finished its first of 3 epochs
            assert child.poll() is None and time.monotonic() < deadline
            time.sleep(0.02)
        os.kill(child.pid, signal.SIGSTOP)
        assert yaml.safe_load((second / RUN_FILE).read_text())["status"] != "finished"  # mid-trial
        os.kill(child.pid, signal.SIGKILL)
    finally:
        if child.poll() is None:
            os.kill(child.pid, signal.SIGKILL)
        child.wait()
    assert not (killed / "results" / "srch").exists()
    try:
        os.chdir(killed)
        output = cli("--config", "tune.yaml", "--quiet")
    finally:
        os.chdir(cwd)
    assert "[trial 1 of 3]" not in output and "[trial 2 of 3]" in output  # trial 0 was not rerun
    ref_doc, ref_weights, ref_scores = _publication(reference)
    doc, weights, scores = _publication(killed)
    assert doc == ref_doc and weights == ref_weights and scores == ref_scores


@pytest.mark.slow
def test_array_jobs_and_select_equal_one_search(searched, tmp_path):
    root, path, _, search = searched
    shutil.copy(path, tmp_path / "tune.yaml")
    cwd = os.getcwd()
    try:
        os.chdir(tmp_path)
        listing = cli("--config", "tune.yaml", "--list")
        lines = [line.split("\t") for line in listing.splitlines() if "\t" in line]
        assert [(int(i), state) for i, state, _ in lines] == [(0, "new"), (1, "new"), (2, "new")]
        result = CliRunner().invoke(app, ["tune", "--config", "tune.yaml", "--select"])
        assert result.exit_code == 2 and "have not finished" in result.output
        for index in (2, 0, 1, 7):  # any order; an index beyond K does nothing
            out = cli("--config", "tune.yaml", "--index", str(index), "--quiet")
            assert "published" not in out
        assert "not part of this search" in out
        cli("--config", "tune.yaml", "--select")
    finally:
        os.chdir(cwd)
    assert _publication(tmp_path) == _publication(root)
