"""training.graph_registry: the gradient functions TensorFlow registers while a block traces are removed
when it ends (also on an exception), older ones are kept, and — training — runs in one process do not keep
each other's traced graphs (and with them each training set on the device) alive."""

from __future__ import annotations

import gc

import keras
import numpy as np
import pytest
import tensorflow as tf
from tensorflow.python.framework import func_graph

from dpsgd_cli.training import graph_registry


def _trace_optimizer_step() -> float:
    """Trace and run a step that applies a Keras optimizer (which uses tf.custom_gradient) to a variable,
    capturing a constant; return the updated value."""
    data = tf.constant(np.ones((256, 4), np.float32))
    weights = tf.Variable(tf.zeros((4, 1)))
    optimizer = keras.optimizers.SGD(0.1)

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean((tf.matmul(data, weights) - 1.0) ** 2)
        optimizer.apply(tape.gradient(loss, [weights]), [weights])

    step()
    return float(weights.numpy().sum())


def _live_graphs() -> int:
    gc.collect()
    return sum(1 for obj in gc.get_objects() if isinstance(obj, func_graph.FuncGraph))


def test_entries_added_in_the_block_are_removed_and_older_ones_kept():
    _trace_optimizer_step()  # registered outside any block: must survive
    before = graph_registry.custom_gradient_count()
    assert before >= 1, "this TensorFlow no longer registers custom gradients by name: revisit the module"
    with graph_registry.released_custom_gradients():
        assert _trace_optimizer_step() == pytest.approx(0.8)  # 4 weights, each -0.1 × 2 × (0 - 1)
        assert graph_registry.custom_gradient_count() == before + 1
    assert graph_registry.custom_gradient_count() == before


def test_entries_are_removed_when_the_block_raises():
    before = graph_registry.custom_gradient_count()
    with pytest.raises(RuntimeError), graph_registry.released_custom_gradients():
        _trace_optimizer_step()
        raise RuntimeError("stop")
    assert graph_registry.custom_gradient_count() == before


def test_a_traced_graph_is_freed_only_with_the_block():
    start = _live_graphs()
    _trace_optimizer_step()
    assert _live_graphs() == start + 1  # TensorFlow's registry keeps it (the leak this module fixes)
    with graph_registry.released_custom_gradients():
        _trace_optimizer_step()
    assert _live_graphs() == start + 1  # the block's graph is gone; the earlier one is still held


@pytest.mark.slow
def test_runs_in_one_process_release_their_graphs(data_dir, tmp_path):
    from dpsgd_cli.config import load_config
    from dpsgd_cli.experiment import run as runner

    counts = []
    for index in range(2):
        cfg = load_config(None, [f"data.data_dir={data_dir}", "data.train_size=256", "data.test_size=100",
                                 "data.batch_size=64", "training.epochs=1", "privacy.noise_multiplier=1.0",
                                 "privacy.reproducible=true", f"name=run{index}",
                                 f"output_dir={tmp_path / 'results'}"])
        registered = graph_registry.custom_gradient_count()
        runner.run(cfg)
        assert graph_registry.custom_gradient_count() == registered
        counts.append(_live_graphs())
    assert counts[1] == counts[0], f"traced graphs alive after each run: {counts}"


@pytest.mark.slow
def test_dpmodel_fits_release_their_graphs():
    """Keras API: a finished `fit` leaves no registry entry, and a second model's fit no more traced
    graphs than the first left."""
    from dpsgd_cli.keras_api import DPModel

    rng = np.random.default_rng(0)
    x, y = rng.random((64, 6), dtype=np.float32), rng.integers(0, 3, 64)
    counts = []
    for _ in range(2):
        model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(8, activation="relu"),
                                  keras.layers.Dense(3)])
        dp_model = DPModel(model, l2_norm_clip=1.0, noise_multiplier=1.0)
        dp_model.compile(optimizer=keras.optimizers.SGD(0.1),
                         loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        registered = graph_registry.custom_gradient_count()
        dp_model.fit(x, y, epochs=1, batch_size=16, verbose=0)
        assert graph_registry.custom_gradient_count() == registered
        del dp_model, model
        counts.append(_live_graphs())
    assert counts[1] == counts[0], f"traced graphs alive after each fit: {counts}"
