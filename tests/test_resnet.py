"""The small GroupNorm ResNet: its shape, its config, and its per-example gradients on the fast path equal
to a per-example GradientTape loop."""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from dpsgd_cli.config import load_config
from dpsgd_cli.training import engine, fastgrad
from dpsgd_cli.training.model import batch_mixing_layer, model_from_config
from dpsgd_cli.training.resnet import small_resnet

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "fashion_mnist_resnet_groupnorm.yaml"


def test_the_resnet_is_a_functional_graph_on_the_fast_path():
    model = small_resnet()
    assert model.count_params() == 38410 and batch_mixing_layer(model) is None
    assert not isinstance(model, keras.Sequential) and fastgrad.fast_path_problem(model) is None
    adds = [layer for layer in model.layers if isinstance(layer, keras.layers.Add)]
    norms = [layer for layer in model.layers if isinstance(layer, keras.layers.GroupNormalization)]
    assert len(adds) == 3 and len(norms) == 7
    assert model(tf.zeros((2, 28, 28, 1))).shape == (2, 10)


def test_the_config_builds_the_resnet():
    cfg = load_config(CONFIG)
    assert cfg.model.builder == "dpsgd_cli.training.resnet:small_resnet"
    model = model_from_config(cfg.model, seed=0)
    assert model.name == "small_resnet" and fastgrad.supports_fast_path(model)


def test_resnet_per_example_gradients_equal_the_loop():
    """The shipped widths (narrower ones hit a oneDNN crash in TensorFlow 2.21's eager Conv2DBackpropFilter
    of the 1×1 stride-2 shortcut, in the loop reference, not in the fast path)."""
    keras.utils.set_random_seed(3)
    model = small_resnet()
    rng = np.random.default_rng(0)
    for v in model.trainable_variables:  # γ, β, biases away from 1 and 0
        v.assign(v + rng.normal(scale=0.2, size=v.shape).astype(np.float32))
    n = 5
    x = tf.constant(rng.random((n, 28, 28, 1), dtype=np.float32))
    y = tf.constant(rng.integers(0, 10, n).astype(np.int32))
    mask = tf.constant([1.0] * (n - 1) + [0.0])
    grads = []
    for i in range(n):
        with tf.GradientTape() as tape:
            loss = engine.per_example_loss(model(x[i:i + 1], training=True), y[i:i + 1])[0]
        grads.append([g.numpy().astype(np.float64) for g in tape.gradient(loss, model.trainable_variables)])
    norms = np.array([np.sqrt(sum(np.sum(g ** 2) for g in per)) for per in grads])
    clip = float(np.median(norms))
    scales = np.asarray(mask) * np.minimum(1.0, clip / norms)
    expected = [sum(s * per[j] for s, per in zip(scales, grads)) for j in range(len(grads[0]))]
    fast = tf.function(lambda x, y, m: (fastgrad.fast_clipped_gradient_sum(model, x, y, m, clip)[0],
                                        fastgrad.per_unit_norms(model, x, y)))
    sums, fast_norms = fast(x, y, mask)
    np.testing.assert_allclose(fast_norms, norms, rtol=1e-4, atol=1e-5)
    for got, want, v in zip(sums, expected, model.trainable_variables):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5, err_msg=v.path)
