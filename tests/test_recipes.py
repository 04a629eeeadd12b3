"""Large-batch recipe options: the physical batch splits the logical batch without changing the step,
EMA evaluation uses the averaged weights, the cosine schedule, and the config keys."""

from __future__ import annotations

import numpy as np
import pytest

from dpsgd_cli.config import load_config
from dpsgd_cli.errors import ConfigError
from dpsgd_cli.privacy.plan import plan_privacy
from dpsgd_cli.privacy.run_key import new_run_key
from dpsgd_cli.privacy.sampling import Sampler
from dpsgd_cli.training import recipes
from dpsgd_cli.training.data import load_dataset
from dpsgd_cli.training.trainer import Trainer


def _trainer(data_dir, tmp_path, *extra: str) -> Trainer:
    cfg = load_config(None, [f"data.data_dir={data_dir}", "data.train_size=256", "data.test_size=100",
                             "data.batch_size=64", "training.epochs=1", "training.optimizer=momentum",
                             "training.learning_rate=0.5", "privacy.noise_multiplier=1.0",
                             "privacy.l2_norm_clip=0.5", "privacy.reproducible=true",
                             f"output_dir={tmp_path}", *extra])
    dataset = load_dataset(cfg.data.dataset, data_dir, cfg.data.train_size, cfg.data.test_size)
    return Trainer(cfg, dataset, plan_privacy(cfg, len(dataset.y_train)), new_run_key(reproducible=True,
                                                                                       seed=cfg.seed))


@pytest.mark.parametrize("sampling", ["poisson", "shuffle"])
def test_physical_batch_splits_without_dropping(sampling):
    key = new_run_key(reproducible=True, seed=1)
    full = Sampler(sampling=sampling, batch_size=100, dataset_size=1000, key=key)
    small = Sampler(sampling=sampling, batch_size=100, dataset_size=1000, key=key, max_capacity=16)
    assert small.capacity == 16
    for a, b in zip(full.epoch(1), small.epoch(1)):
        assert a.size == b.size and len(b.chunks) == -(-b.size // 16)
        chosen = np.concatenate([idx[mask > 0] for idx, mask in b.chunks])
        np.testing.assert_array_equal(chosen, np.concatenate([idx[m > 0] for idx, m in a.chunks]))


@pytest.mark.slow
def test_physical_batch_gives_the_same_training(data_dir, tmp_path):
    """Chunks of 16 are summed before the noise: the same weights as one pass over the logical batch."""
    whole = _trainer(data_dir, tmp_path)
    split = _trainer(data_dir, tmp_path, "training.physical_batch_size=16")
    assert split.sampler.capacity == 16 < whole.sampler.capacity
    whole.train_epoch(1, None)
    split.train_epoch(1, None)
    for a, b in zip(whole.model.get_weights(), split.model.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_ema_evaluation_uses_the_averaged_weights(data_dir, tmp_path):
    trainer = _trainer(data_dir, tmp_path, "training.ema_decay=0.8")
    trainer.train_epoch(1, None)
    raw = [v.numpy().copy() for v in trainer.model.trainable_variables]
    averaged = [a.numpy() for a in trainer.optimizer._model_variables_moving_average]
    assert any(not np.allclose(r, a) for r, a in zip(raw, averaged))
    reported = trainer.evaluate()
    for v, r in zip(trainer.model.trainable_variables, raw):  # training continues from the raw weights
        np.testing.assert_array_equal(v.numpy(), r)
    on_raw = trainer._evaluate()
    for v, a in zip(trainer.model.trainable_variables, averaged):
        v.assign(a)
    on_averaged = trainer._evaluate()
    assert reported["test_loss"] == pytest.approx(on_averaged["test_loss"], rel=1e-6)
    assert reported["test_loss"] != pytest.approx(on_raw["test_loss"], rel=1e-4)
    names = [v.path for v in trainer.optimizer.variables]
    assert any("average" in n for n in names)  # checkpoints (optimizer variables) hold the averages


def test_cosine_schedule_and_config_keys():
    cfg = load_config(None, ["training.learning_rate=4", "training.lr_schedule=cosine",
                             "privacy.noise_multiplier=1"])
    schedule = recipes.learning_rate(cfg, 100)
    assert float(schedule(0)) == pytest.approx(4.0) and float(schedule(50)) == pytest.approx(2.0, rel=1e-5)
    assert float(schedule(100)) == pytest.approx(0.0, abs=1e-6)
    assert recipes.learning_rate(load_config(None, ["privacy.noise_multiplier=1"]), 100) == 0.001
    assert recipes.optimizer_options(load_config(None, ["training.ema_decay=0.99",
                                                        "privacy.noise_multiplier=1"])) == \
        {"use_ema": True, "ema_momentum": 0.99}
    for bad in ("training.ema_decay=1.0", "training.physical_batch_size=2", "training.lr_schedule=step"):
        with pytest.raises(ConfigError, match=bad.split("=")[0]):
            load_config(None, [bad, "privacy.noise_multiplier=1"])
