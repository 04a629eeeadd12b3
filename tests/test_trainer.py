"""The Trainer's real steps against independent references: one step's update is exactly
(Σ per-example clipped gradients from a GradientTape loop + the noise regenerated from the run key) / B,
and the check notices when the noise is missing; two default-mode trainers of one config and seed start
from the same weights but draw different batches and different noise."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from dpsgd_cli.config import load_config
from dpsgd_cli.privacy.plan import plan_privacy
from dpsgd_cli.privacy.run_key import new_run_key
from dpsgd_cli.training import engine
from dpsgd_cli.training.data import load_dataset
from dpsgd_cli.training.model import build_model
from dpsgd_cli.training.trainer import Trainer

pytestmark = pytest.mark.slow
REAL_NOISE = engine.gaussian_noise  # the reference regenerates the noise with the real function
SIGMA, CLIP, LR, BATCH = 1.1, 0.5, 0.5, 32


def _trainer(data_dir, tmp_path, *, reproducible: bool, key=None) -> Trainer:
    cfg = load_config(None, [f"data.data_dir={data_dir}", "data.train_size=256", "data.test_size=50",
                             f"data.batch_size={BATCH}", "training.epochs=1", "training.optimizer=sgd",
                             f"training.learning_rate={LR}", f"privacy.noise_multiplier={SIGMA}",
                             f"privacy.l2_norm_clip={CLIP}", f"output_dir={tmp_path}",
                             f"privacy.reproducible={str(reproducible).lower()}"])
    dataset = load_dataset(cfg.data.dataset, data_dir, cfg.data.train_size, cfg.data.test_size)
    key = key or new_run_key(reproducible=reproducible, seed=cfg.seed)
    return Trainer(cfg, dataset, plan_privacy(cfg, len(dataset.y_train)), key)


def _weights(model) -> list[np.ndarray]:
    return [v.numpy().copy() for v in model.trainable_variables]


def _loop_clipped_sum(model, x, y, clip: float) -> list[np.ndarray]:
    """Σ_i clip(∇ loss_i): one GradientTape per example, global L2 norm over all variables."""
    total = [np.zeros(v.shape, np.float64) for v in model.trainable_variables]
    for xi, yi in zip(x, y):
        with tf.GradientTape() as tape:
            loss = engine.per_example_loss(model(xi[None], training=True), yi[None])[0]
        grads = [g.numpy().astype(np.float64) for g in tape.gradient(loss, model.trainable_variables)]
        norm = np.sqrt(sum((g ** 2).sum() for g in grads))
        total = [t + g * min(1.0, clip / norm) for t, g in zip(total, grads)]
    return total


@pytest.mark.parametrize("noise_removed", [False, True])
def test_one_real_step_is_clipped_sum_plus_regenerated_noise_over_b(data_dir, tmp_path, monkeypatch,
                                                                     noise_removed):
    """Reproducible mode, SGD: w1 = w0 − lr·(Σ clip(g_i) + N(key, step 0)) / B. With `gaussian_noise`
    patched to zeros the same comparison must fail (the test has teeth)."""
    if noise_removed:
        monkeypatch.setattr(engine, "gaussian_noise",
                            lambda variables, stddev, seed: [tf.zeros_like(v) for v in variables])
    trainer = _trainer(data_dir, tmp_path, reproducible=True)
    w0 = _weights(trainer.model)
    first = next(iter(trainer.sampler.epoch(1)))
    assert first.step == 0 and len(first.chunks) == 1
    monkeypatch.setattr(trainer.sampler, "epoch", lambda epoch: iter([first]))  # the epoch's first step only
    trainer.train_epoch(1, None)
    assert trainer.ledger.steps == 1
    w1 = _weights(trainer.model)

    idx, mask = first.chunks[0]
    real = idx[mask > 0]
    reference = build_model(trainer.cfg.model.architecture, trainer.cfg.model.activation)
    reference.set_weights(w0)
    clipped = _loop_clipped_sum(reference, trainer.data.x_train[real], trainer.data.y_train[real], CLIP)
    noise = [n.numpy() for n in REAL_NOISE(reference.trainable_variables, SIGMA * CLIP,
                                           trainer.key.noise_seed(first.step))]
    expected = [w - LR * (c + n) / BATCH for w, c, n in zip(w0, clipped, noise)]
    gaps = [np.abs(a - e).max() for a, e in zip(w1, expected)]
    noise_size = LR * SIGMA * CLIP / BATCH  # std of the noise's effect on one weight
    if noise_removed:
        assert max(gaps) > 2 * noise_size, gaps  # missing noise is noticed
    else:
        assert max(gaps) < 1e-5, gaps  # ≈ 1000 times smaller than the noise's effect


def test_default_mode_same_seed_same_start_different_batches_and_noise(data_dir, tmp_path):
    a = _trainer(data_dir, tmp_path, reproducible=False)
    b = _trainer(data_dir, tmp_path, reproducible=False)
    for wa, wb in zip(_weights(a.model), _weights(b.model)):
        np.testing.assert_array_equal(wa, wb)  # the seed (public) fixes the initial weights
    ia = [idx[mask > 0].tolist() for batch in a.sampler.epoch(1) for idx, mask in batch.chunks]
    ib = [idx[mask > 0].tolist() for batch in b.sampler.epoch(1) for idx, mask in batch.chunks]
    assert ia != ib  # the batches come from each run's secret key

    # the same inputs through both compiled steps: any difference is the noise
    idx, mask = next(iter(a.sampler.epoch(1))).chunks[0]
    start = _weights(a.model)
    a.step_fn(idx, mask, a.zeros, a.key.noise_seed(0))
    b.step_fn(idx, mask, b.zeros, b.key.noise_seed(0))
    ua = np.concatenate([(w1 - w0).ravel() for w1, w0 in zip(_weights(a.model), start)])
    ub = np.concatenate([(w1 - w0).ravel() for w1, w0 in zip(_weights(b.model), start)])
    noise_std = LR * SIGMA * CLIP / BATCH
    # two independent noise draws: their difference has std √2·σC·lr/B per weight
    assert abs(np.std(ua - ub) / (np.sqrt(2) * noise_std) - 1) < 0.05


def test_the_ledger_composes_the_steps_that_ran(data_dir, tmp_path):
    """Count the compiled step's executions over two epochs; the ledger holds exactly that many steps, and
    its ε equals dp-accounting's RDP accountant called directly for that count."""
    import dp_accounting

    trainer = _trainer(data_dir, tmp_path, reproducible=True)
    calls = []
    step_fn = trainer.step_fn

    def counted(*args):
        calls.append(1)
        return step_fn(*args)

    trainer.step_fn = counted
    for epoch in (1, 2):
        trainer.train_epoch(epoch, None)
        assert trainer.ledger.steps == len(calls) == trainer.steps_done
    assert len(calls) == 16  # ⌈2 · 256 / 32⌉
    expected_event = dp_accounting.PoissonSampledDpEvent(BATCH / 256, dp_accounting.GaussianDpEvent(SIGMA))
    assert trainer.step_event == expected_event  # the engine states the event of the step it runs
    rdp = dp_accounting.rdp.RdpAccountant()
    rdp.compose(expected_event, len(calls))
    assert trainer.ledger.epsilon("rdp") == pytest.approx(rdp.get_epsilon(1e-5), rel=1e-9)
