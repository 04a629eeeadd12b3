"""The DP step against independent references: a per-example loop, dp-free SGD, and noise statistics."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from dpsgd_cli.training import engine, fastgrad
from dpsgd_cli.training.model import build_model


def _batch(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.random((n, 28, 28, 1), dtype=np.float32)
    y = rng.integers(0, 10, size=n).astype(np.int32)
    return tf.constant(x), tf.constant(y)


def _loop_gradients(model, x, y, microbatch_size=1):
    """Reference: one GradientTape per unit (mean loss over the unit's examples), flattened to [units, P]."""
    rows = []
    for start in range(0, len(y), microbatch_size):
        with tf.GradientTape() as tape:
            logits = model(x[start:start + microbatch_size], training=True)
            loss = tf.reduce_mean(engine.per_example_loss(logits, y[start:start + microbatch_size]))
        grads = tape.gradient(loss, model.trainable_variables)
        rows.append(np.concatenate([g.numpy().ravel() for g in grads]))
    return np.stack(rows)


def _flat(per_unit):
    return np.concatenate([g.numpy().reshape(g.shape[0], -1) for g in per_unit], axis=1)


@pytest.mark.parametrize("microbatch_size", [1, 4])
def test_vectorized_gradients_equal_loop(microbatch_size):
    model = build_model(activation="tanh", seed=3)
    x, y = _batch(16)
    grads, losses, _ = engine.per_unit_gradients(model, x, y, microbatch_size)
    reference = _loop_gradients(model, x, y, microbatch_size)
    np.testing.assert_allclose(_flat(grads), reference, rtol=1e-4, atol=1e-6)
    assert losses.shape == (16,)


def test_clipped_norms_are_at_most_c():
    model = build_model(seed=1)
    x, y = _batch(32)
    grads, _, _ = engine.per_unit_gradients(model, x, y)
    norms = engine.global_norms(grads).numpy()
    clip = float(np.median(norms))  # half the examples get clipped
    factors = engine.clip_factors(tf.constant(norms), clip).numpy()
    clipped = np.linalg.norm(_flat(grads) * factors[:, None], axis=1)
    assert (clipped <= clip * (1 + 1e-5)).all()
    small = norms <= clip
    np.testing.assert_allclose(clipped[small], norms[small], rtol=1e-5)  # unclipped ones untouched
    np.testing.assert_allclose(clipped[~small], clip, rtol=1e-5)


def _settings(**kw):
    base = dict(private=True, noise_multiplier=0.0, l2_norm_clip=1e9, microbatch_size=1, denominator=16.0,
                jit_compile=False)
    base.update(kw)
    return engine.StepSettings(**base)


def _one_step(settings, x, y, mask, seed=5, step=0, lr=0.1, grad_sum_fn=None):
    model = build_model(seed=seed)
    step_fn, _ = engine.make_train_step(model, keras.optimizers.SGD(lr), settings, grad_sum_fn)
    zeros = [tf.zeros_like(v) for v in model.trainable_variables]
    step_fn(x, y, mask, zeros, tf.constant([7, step], tf.int64))
    return np.concatenate([v.numpy().ravel() for v in model.trainable_variables])


@pytest.mark.parametrize("jit", [False, True])
def test_no_noise_huge_clip_equals_nonprivate_mean_gradient(jit):
    x, y = _batch(16, seed=2)
    mask = tf.ones([16])
    private = _one_step(_settings(jit_compile=jit), x, y, mask)
    plain = _one_step(_settings(private=False, jit_compile=jit), x, y, mask)
    np.testing.assert_allclose(private, plain, rtol=1e-4, atol=1e-6)


def test_noise_std_is_sigma_c_over_b():
    """All slots masked: the update is −lr·noise/B, whose std over 26k parameters must be lr·σC/B."""
    sigma, clip, denom, lr = 1.3, 0.7, 16.0, 1.0
    x, y = _batch(16)
    start = _one_step(_settings(private=False, denominator=denom), x, y, tf.zeros([16]), lr=lr)
    after = _one_step(_settings(noise_multiplier=sigma, l2_norm_clip=clip, denominator=denom), x, y,
                      tf.zeros([16]), lr=lr)
    delta = (after - start) / lr
    expected = sigma * clip / denom
    se = expected / np.sqrt(2 * delta.size)  # standard error of a sample std
    assert abs(delta.std() - expected) < 5 * se, (delta.std(), expected)
    assert abs(delta.mean()) < 5 * expected / np.sqrt(delta.size)


def test_noise_is_keyed_by_its_seed():
    variables = build_model().trainable_variables
    a = engine.gaussian_noise(variables, 1.0, tf.constant([3, 10], tf.int64))
    b = engine.gaussian_noise(variables, 1.0, tf.constant([3, 10], tf.int64))
    c = engine.gaussian_noise(variables, 1.0, tf.constant([3, 11], tf.int64))
    np.testing.assert_array_equal(a[0].numpy(), b[0].numpy())
    assert not np.allclose(a[0].numpy(), c[0].numpy())


def test_masked_slots_do_not_change_the_update():
    """A batch of 8 real examples padded with 8 masked ones updates exactly like the 8 alone."""
    x, y = _batch(16, seed=4)
    kw = dict(noise_multiplier=1.0, l2_norm_clip=0.5, denominator=8.0)
    padded = _one_step(_settings(**kw), x, y, tf.constant([1.0] * 8 + [0.0] * 8), step=3)
    alone = _one_step(_settings(**kw), x[:8], y[:8], tf.ones([8]), step=3)
    np.testing.assert_allclose(padded, alone, rtol=1e-5, atol=1e-7)


def test_step_is_traced_once_over_many_steps():
    model = build_model()
    step_fn, _ = engine.make_train_step(model, keras.optimizers.Adam(1e-3),
                                        _settings(noise_multiplier=1.1, l2_norm_clip=1.0))
    zeros = [tf.zeros_like(v) for v in model.trainable_variables]
    rng = np.random.default_rng(0)
    for i in range(6):
        x, y = _batch(16, seed=i)
        mask = (rng.random(16) < 0.7).astype(np.float32)  # a different Poisson batch size every step
        step_fn(x, y, mask, zeros, tf.constant([7, i], tf.int64))
    assert step_fn.experimental_get_tracing_count() == 1


def test_optimizers():
    assert isinstance(engine.make_optimizer("momentum", 0.1, 0.9), keras.optimizers.SGD)
    assert isinstance(engine.make_optimizer("adam", 0.1), keras.optimizers.Adam)


def test_step_on_device_data_gathers_the_indexed_examples():
    """`data=` keeps the training set on the device: stepping on indices equals stepping on the examples."""
    x, y = _batch(32, seed=7)
    idx = np.array([3, 1, 30, 3, 9, 0, 0, 0, 12, 5, 7, 8, 2, 4, 6, 11], np.int64)
    mask = tf.constant([1.0] * 13 + [0.0] * 3)
    settings = _settings(noise_multiplier=1.0, l2_norm_clip=0.5)
    results = []
    for on_device in (False, True):
        model = build_model(seed=5)
        step_fn, chunk_fn = engine.make_train_step(model, keras.optimizers.SGD(0.1), settings,
                                                   data=(x, y) if on_device else None)
        batch = (idx,) if on_device else (tf.gather(x, idx), tf.gather(y, idx))
        extra = chunk_fn(*batch, mask)
        out = step_fn(*batch, mask, extra, tf.constant([7, 1], tf.int64))
        results.append((np.concatenate([v.numpy().ravel() for v in model.trainable_variables]),
                        [float(v) for v in out]))
    np.testing.assert_allclose(results[0][0], results[1][0], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(results[0][1], results[1][1], rtol=1e-6)


@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_nonprivate_step_on_the_fast_formulation_equals_the_keras_step(activation):
    from dpsgd_cli.training import fastgrad

    rng = np.random.default_rng(9)
    x = rng.random((16, 28, 28, 1), dtype=np.float32)
    x[:, :10] = 0.0  # blank rows: pooling windows with ties
    y = tf.constant(rng.integers(0, 10, size=16).astype(np.int32))
    mask = tf.constant([1.0] * 12 + [0.0] * 4)
    results = []
    for forward in (None, fastgrad.forward):
        model = build_model(activation=activation, seed=4)
        step_fn, _ = engine.make_train_step(model, keras.optimizers.SGD(0.5), _settings(private=False), None,
                                            forward)
        zeros = [tf.zeros_like(v) for v in model.trainable_variables]
        step_fn(tf.constant(x), y, mask, zeros, tf.constant([7, 0], tf.int64))
        results.append(np.concatenate([v.numpy().ravel() for v in model.trainable_variables]))
    np.testing.assert_allclose(results[0], results[1], rtol=1e-4, atol=1e-6)


def test_gradient_path_choice():
    model = build_model()
    assert fastgrad.choose_gradient_path(model, "auto", True)[2] == "fast"
    assert fastgrad.choose_gradient_path(model, "vectorized_map", True)[0] is engine.vmap_clipped_gradient_sum
    grad_fn, forward_fn, name = fastgrad.choose_gradient_path(model, "auto", False)
    assert grad_fn is None and forward_fn is not None and name == "fast"
    assert fastgrad.choose_gradient_path(model, "vectorized_map", False)[1] is None


@pytest.mark.parametrize("path", ["vectorized_map", "fast"])
def test_overflow_chunks_add_before_the_noise_like_one_big_batch(path):
    """A Poisson batch larger than the capacity is split: chunk sums passed as `extra_sums` must give the
    same update (same noise draw) as processing all examples in one call."""
    from dpsgd_cli.training import fastgrad

    grad_fn = {"vectorized_map": engine.vmap_clipped_gradient_sum,
               "fast": fastgrad.fast_clipped_gradient_sum}[path]
    x, y = _batch(16, seed=6)
    settings = _settings(noise_multiplier=1.0, l2_norm_clip=0.3, denominator=12.0)
    whole = _one_step(settings, x, y, tf.ones([16]), step=2, grad_sum_fn=grad_fn)
    model = build_model(seed=5)
    step_fn, chunk_fn = engine.make_train_step(model, keras.optimizers.SGD(0.1), settings, grad_fn)
    extra = chunk_fn(x[8:], y[8:], tf.ones([8]))
    step_fn(x[:8], y[:8], tf.ones([8]), extra, tf.constant([7, 2], tf.int64))
    split = np.concatenate([v.numpy().ravel() for v in model.trainable_variables])
    np.testing.assert_allclose(split, whole, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("microbatch_size, accounted", [(1, 1.1), (4, 0.55)])
def test_the_step_states_its_dp_event(microbatch_size, accounted):
    """σ as used for per-example clipping, σ/2 when a microbatch holds several examples (sensitivity 2C)."""
    import dp_accounting

    settings = _settings(noise_multiplier=1.1, microbatch_size=microbatch_size)
    assert settings.dp_event(0.01) == dp_accounting.PoissonSampledDpEvent(
        0.01, dp_accounting.GaussianDpEvent(accounted))
    assert settings.dp_event(1.0) == dp_accounting.GaussianDpEvent(accounted)
    with pytest.raises(ValueError):
        _settings(private=False).dp_event(0.01)


def test_chunk_bounds_cover_the_capacity_in_whole_microbatches():
    assert engine.chunk_bounds(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert engine.chunk_bounds(12, 5, microbatch_size=2) == [(0, 6), (6, 12)]
    assert engine.chunk_bounds(8, 0) == engine.chunk_bounds(8, 8) == engine.chunk_bounds(8, 50) == [(0, 8)]


@pytest.mark.parametrize(("path", "microbatch_size"), [("fast", 1), ("fast", 2), ("vectorized_map", 1)])
def test_passes_give_the_sums_losses_and_logits_of_one_pass(path, microbatch_size):
    model = build_model(activation="tanh", seed=4)
    x, y = _batch(12, seed=2)
    mask = tf.constant([1.0] * 10 + [0.0] * 2)
    fn = fastgrad.fast_clipped_gradient_sum if path == "fast" else engine.vmap_clipped_gradient_sum
    whole = fn(model, x, y, mask, 0.5, microbatch_size)
    passes = engine.chunked_gradient_sum(fn, 5)(model, x, y, mask, 0.5, microbatch_size)
    for one, parts in zip(whole[0], passes[0]):
        np.testing.assert_allclose(parts.numpy(), one.numpy(), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(passes[1].numpy(), whole[1].numpy(), rtol=1e-6)
    np.testing.assert_allclose(passes[2].numpy(), whole[2].numpy(), rtol=1e-6)
    # and the passes are really smaller: a backend that records the batch sizes it was called with
    seen = []
    engine.chunked_gradient_sum(lambda m, xs, *a, **k: seen.append(xs.shape[0]) or fn(m, xs, *a, **k), 5)(
        model, x, y, mask, 0.5, microbatch_size)
    assert seen == ([5, 5, 2] if microbatch_size == 1 else [6, 6])


def _clipped_reference(model, x, y, clip, microbatch_size, drop_unit):
    """Σ over the units but `drop_unit` of the loop gradients clipped to `clip` (float64)."""
    keep = np.ones(len(y), bool)
    keep[drop_unit * microbatch_size:(drop_unit + 1) * microbatch_size] = False
    rows = _loop_gradients(model, tf.boolean_mask(x, keep), tf.boolean_mask(y, keep), microbatch_size)
    rows = rows.astype(np.float64)
    norms = np.linalg.norm(rows, axis=1)
    return (rows * np.minimum(1.0, clip / norms)[:, None]).sum(axis=0)


NON_FINITE_BACKENDS = {
    "vectorized_map": engine.vmap_clipped_gradient_sum,
    "fast-materialize": lambda *a, **k: fastgrad._clipped_sum(*a, strategy="materialize", **k),
    "fast-ghost": lambda *a, **k: fastgrad._clipped_sum(*a, strategy="ghost", **k),
    "fast-depthwise": lambda *a, **k: fastgrad._clipped_sum(
        *a, formulation={"conv1": {"forward": "native", "grads": "depthwise"}}, **k),
}


@pytest.mark.parametrize("microbatch_size", [1, 2])
@pytest.mark.parametrize("backend", sorted(NON_FINITE_BACKENDS))
def test_a_non_finite_unit_is_dropped_and_counted_instead_of_poisoning_the_sum(backend, microbatch_size):
    """One example whose input is 1e38 overflows float32 (its gradient norm is ∞ or NaN, and 0·∞ = NaN):
    its unit's terms are left out entirely, the sum is the clipped sum of the other units (a GradientTape
    loop without it), and `kept` marks its examples 0 so the step counts them."""
    model = build_model(seed=2)  # relu: the 1e38 image overflows the first convolution
    x, y = _batch(12, seed=4)
    x = tf.tensor_scatter_nd_update(x, [[3]], tf.fill([1, 28, 28, 1], 1e38))
    mask = tf.constant([1.0] * 10 + [0.0] * 2) if microbatch_size == 1 else tf.ones([12])
    clip = 0.5
    sums, losses, logits, kept = NON_FINITE_BACKENDS[backend](model, x, y, mask, clip, microbatch_size)
    flat = np.concatenate([s.numpy().ravel() for s in sums])
    assert np.isfinite(flat).all()
    dropped_unit = 3 // microbatch_size
    real = np.asarray(mask).astype(bool)
    keep = real.copy()
    keep[dropped_unit * microbatch_size:(dropped_unit + 1) * microbatch_size] = False
    np.testing.assert_array_equal(kept.numpy(), keep.astype(np.float32))
    units = 10 // microbatch_size if microbatch_size == 1 else 12 // microbatch_size
    reference = _clipped_reference(model, x[:units * microbatch_size], y[:units * microbatch_size], clip,
                                   microbatch_size, dropped_unit)
    np.testing.assert_allclose(flat, reference, rtol=1e-4, atol=1e-6)
