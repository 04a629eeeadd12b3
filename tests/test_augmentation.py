"""Augmentation multiplicity: an example's K views are one clipped unit, checked against a GradientTape loop;
the accounting stays per-example; the views are the images' mirrors (and their features)."""

from __future__ import annotations

import dataclasses

import dp_accounting
import numpy as np
import pytest
import tensorflow as tf

from dpsgd_cli.config import load_config, views_per_example
from dpsgd_cli.errors import ConfigError
from dpsgd_cli.training import augmentation, engine, fastgrad, features, scattering
from dpsgd_cli.training.data import Dataset
from dpsgd_cli.training.model import build_model

K = 2


def _views_batch(n: int = 8, seed: int = 0):
    rng = np.random.default_rng(seed)
    images = rng.random((n, 28, 28, 1), dtype=np.float32)
    x = np.stack([images, augmentation.mirror(images)], axis=1)  # [n, K, 28, 28, 1]
    y = rng.integers(0, 10, n).astype(np.int32)
    mask = np.array([1.0] * (n - 2) + [0.0] * 2, np.float32)  # two padded slots
    return tf.constant(x), tf.constant(y), tf.constant(mask)


def _loop_clipped_sum(model, x, y, mask, clip, microbatch_size=1):
    """Reference: per unit (microbatch_size examples × K views), one GradientTape of the mean loss over its
    rows, clipped to `clip`, weighted by the unit's mask, summed (float64)."""
    total = None
    for start in range(0, x.shape[0], microbatch_size):
        rows = tf.reshape(x[start:start + microbatch_size], [-1, 28, 28, 1])
        labels = tf.repeat(y[start:start + microbatch_size], K)
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(engine.per_example_loss(model(rows, training=True), labels))
        grads = [g.numpy().astype(np.float64) for g in tape.gradient(loss, model.trainable_variables)]
        norm = np.sqrt(sum(np.sum(g ** 2) for g in grads))
        scale = float(mask[start]) * min(1.0, clip / norm)
        total = [scale * g for g in grads] if total is None else [t + scale * g for t, g in zip(total, grads)]
    return total


def _settings(private=True, microbatch_size=1, clip=1.0):
    return engine.StepSettings(private=private, noise_multiplier=1.0, l2_norm_clip=clip,
                               microbatch_size=microbatch_size, denominator=8.0, jit_compile=False, views=K)


@pytest.mark.parametrize("path", ["fast", "vectorized_map"])
@pytest.mark.parametrize("microbatch_size", [1, 2])
def test_views_of_one_example_are_one_clipped_unit(path, microbatch_size):
    model = build_model(activation="tanh", seed=4)
    x, y, mask = _views_batch()
    reference_unclipped = _loop_clipped_sum(model, x, y, mask, np.inf, microbatch_size)
    norms_scale = np.sqrt(sum(np.sum(g ** 2) for g in reference_unclipped))
    clip = 0.05 * norms_scale  # far below the units' norms: every unit is clipped, so the unit matters
    expected = _loop_clipped_sum(model, x, y, mask, clip, microbatch_size)
    grad_fn = fastgrad.choose_gradient_sum_fn(model, path)
    gradient_sum = engine.make_gradient_sum(model, _settings(microbatch_size=microbatch_size, clip=clip),
                                            grad_fn)
    sums, losses, logits, _ = gradient_sum(x, y, mask)
    for got, want, var in zip(sums, expected, model.trainable_variables):
        np.testing.assert_allclose(got, want, rtol=2e-4, atol=1e-7, err_msg=var.path)
    # the per-example loss is the mean over the views; the logits are view 0's
    rows = tf.reshape(x, [-1, 28, 28, 1])
    row_losses = engine.per_example_loss(model(rows, training=True), tf.repeat(y, K)).numpy().reshape(-1, K)
    np.testing.assert_allclose(losses, row_losses.mean(axis=1), rtol=1e-5)
    np.testing.assert_allclose(logits, model(x[:, 0], training=True), rtol=1e-5, atol=1e-6)


def test_clipping_views_separately_would_differ():
    """The reference is discriminating: clipping each view as its own unit gives another sum."""
    model = build_model(activation="tanh", seed=4)
    x, y, mask = _views_batch()
    per_view_x = tf.reshape(x, [-1, 1, 28, 28, 1])  # every row its own "example" with one view
    rows_unclipped = _loop_clipped_sum(model, x, y, mask, np.inf)
    clip = 0.05 * np.sqrt(sum(np.sum(g ** 2) for g in rows_unclipped))
    together = _loop_clipped_sum(model, x, y, mask, clip)
    grad_fn = fastgrad.choose_gradient_sum_fn(model, "fast")
    apart = grad_fn(model, tf.reshape(per_view_x, [-1, 28, 28, 1]), tf.repeat(y, K), tf.repeat(mask, K),
                    clip, 1)[0]
    difference = max(np.max(np.abs(a.numpy() / K - t)) for a, t in zip(apart, together))
    assert difference > 1e-3 * max(np.max(np.abs(t)) for t in together)


def test_nonprivate_views_average_the_loss():
    model = build_model(activation="relu", seed=2)
    x, y, mask = _views_batch(seed=1)
    sums, *_ = engine.make_gradient_sum(model, _settings(private=False))(x, y, mask)
    with tf.GradientTape() as tape:
        rows = model(tf.reshape(x, [-1, 28, 28, 1]), training=True)
        losses = tf.reshape(engine.per_example_loss(rows, tf.repeat(y, K)), [-1, K])
        total = tf.reduce_sum(tf.reduce_mean(losses, axis=1) * mask)
    for got, want in zip(sums, tape.gradient(total, model.trainable_variables)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-7)


def test_views_keep_the_per_example_accounting():
    """K views are one example's unit: the step's event is per-example DP-SGD's (no σ/2), checked against
    dp-accounting called directly."""
    event = _settings().dp_event(0.01)
    direct = dp_accounting.PoissonSampledDpEvent(0.01, dp_accounting.GaussianDpEvent(1.0))
    assert event == direct
    microbatched = dataclasses.replace(_settings(), microbatch_size=2).dp_event(0.01)
    assert microbatched == dp_accounting.PoissonSampledDpEvent(0.01, dp_accounting.GaussianDpEvent(0.5))


def test_mirror_views_of_pixels_and_of_features(tmp_path):
    rng = np.random.default_rng(3)
    images = rng.random((5, 28, 28, 1)).astype(np.float32)
    data = Dataset("fashion_mnist", images, np.arange(5), images[:2], np.arange(2))
    assert augmentation.with_views(data, images, "none", "tfp_cnn") is data
    pixels = augmentation.with_views(data, images, "mirror", "tfp_cnn").train_views
    assert pixels.shape == (5, K, 28, 28, 1)
    np.testing.assert_array_equal(pixels[:, 0], images)
    np.testing.assert_array_equal(pixels[:, 1, :, ::-1], images)  # column j of the mirror is column 27 - j
    scatter = "scatter_cnn_16_32"
    prepared = dataclasses.replace(data, x_train=features.model_inputs(images, scatter, tmp_path, 1))
    feats = augmentation.with_views(prepared, images, "mirror", scatter, tmp_path,
                                    uncached_tail=1).train_views
    assert feats.shape == (5, K, 7, 7, 81)
    np.testing.assert_allclose(feats[:, 0], scattering.scattering(images), rtol=1e-6)
    np.testing.assert_allclose(feats[:, 1], scattering.scattering(images[:, :, ::-1]), rtol=1e-6)
    assert len(list(tmp_path.glob("*.npy"))) == 2  # both views of the 4 real images; the tail uncached


def test_augmentation_config():
    sigma = "privacy.noise_multiplier=1.0"
    assert views_per_example(load_config(None, [sigma, "data.augmentation=mirror"])) == 2
    assert views_per_example(load_config(None, [sigma])) == 1
    with pytest.raises(ConfigError, match=r"data\.augmentation: 'flip' is not allowed; choose one of: none, "
                                          r"mirror"):
        load_config(None, [sigma, "data.augmentation=flip"])
    with pytest.raises(ConfigError, match=r"data\.augmentation: mirror is not supported with "
                                          r"distribute\.strategy: mirrored yet"):
        load_config(None, [sigma, "data.augmentation=mirror", "distribute.strategy=mirrored"])


@pytest.mark.slow
@pytest.mark.parametrize("architecture", ["tfp_cnn", "scatter_cnn_16_32"])
def test_a_run_with_mirror_views_trains_and_states_them(architecture, data_dir, tmp_path, monkeypatch):
    from dpsgd_cli.experiment import run as runner

    monkeypatch.setenv("DPSGD_CACHE_DIR", str(tmp_path / "cache"))
    cfg = load_config(None, [f"data.data_dir={data_dir}", "data.train_size=512", "data.test_size=100",
                             "data.batch_size=128", "data.augmentation=mirror", "training.epochs=1",
                             f"model.architecture={architecture}", "privacy.noise_multiplier=1.0",
                             f"output_dir={tmp_path}", "name=mirror"])
    result = runner.run(cfg)
    (record,) = result.records
    # ε is per-example DP-SGD's at σ = 1, q = 128/512 for the steps run (dp-accounting called directly)
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(128 / 512, dp_accounting.GaussianDpEvent(1.0)), record["step"])
    expected = dp_accounting.pld.PLDAccountant().compose(event).get_epsilon(1e-5)
    assert record["epsilon_pld"] == pytest.approx(expected, rel=1e-6)
    assert "2 augmented views" in result.statement
    assert 0.0 <= record["test_accuracy"] <= 1.0
