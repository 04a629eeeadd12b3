"""The recipe models (tanh CNN, ScatterNet + linear, ScatterNet + CNN) take the fast per-example path, and
its clipped gradient sums equal a per-example GradientTape loop."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from dpsgd_cli.training import engine, fastgrad
from dpsgd_cli.training.model import build_model
from dpsgd_cli.training.recipe_models import input_shape

ARCHITECTURES = ("tanh_cnn", "scatter_linear", "scatter_pointwise", "scatter_cnn_16_32", "scatter_cnn_32_64",
                 "scatter_cnn_64_128")


def _batch(architecture: str, n: int = 12):
    rng = np.random.default_rng(5)
    shape = input_shape(architecture)
    x = rng.random((n, *shape), dtype=np.float32)
    if architecture.startswith("scatter"):  # scattering-like scales: channels of very different magnitude
        x *= np.geomspace(1.0, 1e-3, shape[-1], dtype=np.float32)
    mask = np.array([1.0] * (n - 2) + [0.0] * 2, np.float32)
    return tf.constant(x), tf.constant(rng.integers(0, 10, n), tf.int32), tf.constant(mask)


def _loop_reference(model, x, y, mask):
    grads = []
    for i in range(x.shape[0]):
        with tf.GradientTape() as tape:
            loss = engine.per_example_loss(model(x[i:i + 1], training=True), y[i:i + 1])[0]
        grads.append([g.numpy().astype(np.float64) for g in tape.gradient(loss, model.trainable_variables)])
    norms = np.array([np.sqrt(sum((g ** 2).sum() for g in gs)) for gs in grads])
    clip = float(np.median(norms))
    scales = mask.numpy() * np.minimum(1.0, clip / norms)
    return clip, [sum(s * gs[k] for s, gs in zip(scales, grads)) for k in range(len(grads[0]))]


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_fast_path_equals_gradient_tape_loop(architecture):
    model = build_model(architecture, "tanh", seed=2)
    assert fastgrad.choose_gradient_sum_fn(model, "auto") is fastgrad.fast_clipped_gradient_sum
    x, y, mask = _batch(architecture)
    clip, expected = _loop_reference(model, x, y, mask)
    sums, losses, logits, _ = tf.function(lambda x, y, m: fastgrad.fast_clipped_gradient_sum(
        model, x, y, m, clip))(x, y, mask)
    for s, e, v in zip(sums, expected, model.trainable_variables):
        np.testing.assert_allclose(s, e, rtol=1e-4, atol=1e-6 * max(1.0, np.abs(e).max()), err_msg=v.path)
    np.testing.assert_allclose(logits, model(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("architecture", [a for a in ARCHITECTURES if a.startswith("scatter_cnn_")])
def test_a_scatter_cnn_name_gives_its_channel_widths(architecture):
    c1, c2 = (int(width) for width in architecture.split("_")[-2:])
    model = build_model(architecture, "tanh", seed=0)
    assert model.get_layer("conv1").kernel.shape == (3, 3, 81, c1)
    assert model.get_layer("conv2").kernel.shape == (3, 3, c1, c2)


def test_group_norm_uses_per_example_statistics_only():
    model = build_model("scatter_linear", seed=0)
    x, _, _ = _batch("scatter_linear", 4)
    alone = model(x[:1]).numpy()
    in_batch = model(x).numpy()[:1]
    np.testing.assert_allclose(alone, in_batch, rtol=1e-5, atol=1e-6)  # no mixing across examples


def test_affine_group_norm_has_its_own_weight_rule():
    model = keras.Sequential([keras.Input((7, 7, 81)), keras.layers.GroupNormalization(27, name="gn"),
                              keras.layers.Flatten(), keras.layers.Dense(10)])
    assert isinstance(fastgrad.rule_for(model.get_layer("gn")), fastgrad.AffineNormRule)  # γ, β per example
    assert fastgrad.choose_gradient_sum_fn(model, "auto") is not engine.vmap_clipped_gradient_sum


def test_input_standardization_is_a_weightless_first_layer_on_the_fast_path():
    from dpsgd_cli.config import load_config
    from dpsgd_cli.training.model import model_from_config

    sigma = "privacy.noise_multiplier=1.0"
    cfg = load_config(None, [sigma, "model.activation=tanh", "model.input_mean=0.286",
                             "model.input_std=0.353"])
    model = model_from_config(cfg.model, seed=2)
    plain = model_from_config(load_config(None, [sigma, "model.activation=tanh"]).model, seed=2)
    assert isinstance(model.layers[0], keras.layers.Rescaling) and not model.layers[0].weights
    assert [v.shape for v in model.trainable_variables] == [v.shape for v in plain.trainable_variables]
    x, y, mask = _batch("tfp_cnn")
    np.testing.assert_allclose(model(x), plain((x - 0.286) / 0.353), rtol=1e-5, atol=1e-6)  # same init
    assert fastgrad.choose_gradient_sum_fn(model, "auto") is fastgrad.fast_clipped_gradient_sum
    clip, expected = _loop_reference(model, x, y, mask)
    sums, *_ = tf.function(lambda x, y, m: fastgrad.fast_clipped_gradient_sum(model, x, y, m, clip))(
        x, y, mask)
    for s, e, v in zip(sums, expected, model.trainable_variables):
        np.testing.assert_allclose(s, e, rtol=1e-4, atol=1e-6 * max(1.0, np.abs(e).max()), err_msg=v.path)
