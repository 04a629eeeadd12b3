"""The fast path on graphs (Functional, nested and subclassed models: residual Add, Concatenate, branches,
shared layers) and the DepthwiseConv2D / SeparableConv2D rules, each equal to a per-example GradientTape
loop; what stays off the fast path falls back to tf.vectorized_map, named."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from dpsgd_cli.errors import ConfigError
from dpsgd_cli.training import engine, fastgrad, planner

RTOL, ATOL = 1e-4, 1e-5
SHAPE = (8, 8, 2)


def _batch(n: int = 12, seed: int = 0, shape=SHAPE):
    rng = np.random.default_rng(seed)
    x = tf.constant(rng.normal(size=(n, *shape)).astype(np.float32))
    y = tf.constant(rng.integers(0, 3, n), dtype=tf.int32)
    mask = tf.constant([1.0] * (n - 2) + [0.0] * 2)  # the last two slots are padding
    return x, y, mask


def _loop(model, x, y, mask, k: int):
    """Each unit's gradient of its mean loss by its own GradientTape (float64), C = the median unit norm
    (some units clipped, some not), the loop's norms and Σ mask_u · clip(g_u)."""
    unit_grads = []
    for start in range(0, x.shape[0], k):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(engine.per_example_loss(model(x[start:start + k], training=True),
                                                          y[start:start + k]))
        unit_grads.append([tf.convert_to_tensor(g).numpy().astype(np.float64)
                           for g in tape.gradient(loss, model.trainable_variables)])
    norms = np.array([np.sqrt(sum(np.sum(g ** 2) for g in grads)) for grads in unit_grads])
    clip = float(np.median(norms))
    assert norms.min() < clip < norms.max()
    scales = np.asarray(mask)[::k] * np.minimum(1.0, clip / norms)
    sums = [sum(s * grads[i] for s, grads in zip(scales, unit_grads)) for i in range(len(unit_grads[0]))]
    return clip, norms, sums


def _perturbed(model, seed: int = 5):
    """Weights moved off their initial values (γ = 1, β = 0, biases 0 would hide mistakes)."""
    rng = np.random.default_rng(seed)
    for v in model.trainable_variables:
        v.assign(v + rng.normal(scale=0.3, size=v.shape).astype(np.float32))
    return model


def _assert_fast_equals_loop(model, k: int = 1, formulations=(None,), strategies=("auto",), shape=SHAPE):
    """Clipped sums, per-unit norms and losses of every formulation × norm strategy equal the loop's."""
    assert fastgrad.fast_path_problem(model) is None
    x, y, mask = _batch(shape=shape)
    clip, ref_norms, ref_sums = _loop(model, x, y, mask, k)
    cases = [(f, s) for f in formulations for s in strategies]

    @tf.function(jit_compile=False, reduce_retracing=False)
    def every_case(x, y, mask):
        return [(fastgrad._clipped_sum(model, x, y, mask, clip, k, strategy=s, formulation=f),
                 fastgrad.per_unit_norms(model, x, y, k, strategy=s, formulation=f)) for f, s in cases]

    ref_losses = engine.per_example_loss(model(x, training=True), y)
    for case, ((sums, losses, *_), norms) in zip(cases, every_case(x, y, mask)):
        assert len(sums) == len(model.trainable_variables)
        for s, e, v in zip(sums, ref_sums, model.trainable_variables):
            assert s.shape == v.shape
            np.testing.assert_allclose(s, e, rtol=RTOL, atol=ATOL, err_msg=f"{case}: {v.path}")
        np.testing.assert_allclose(norms, ref_norms, rtol=RTOL, atol=ATOL, err_msg=str(case))
        np.testing.assert_allclose(losses, ref_losses, rtol=RTOL, atol=ATOL)


def _conv(filters, name, **kw):
    return keras.layers.Conv2D(filters, 3, padding="same", activation="tanh", name=name, **kw)


def _head(h, name="logits"):
    return keras.layers.Dense(3, name=name)(keras.layers.GlobalAveragePooling2D()(h))


def residual_add():
    inputs = keras.Input(SHAPE)
    h = _conv(4, "stem")(inputs)
    r = keras.layers.Conv2D(4, 3, padding="same", name="block")(h)
    h = keras.layers.Activation("tanh")(keras.layers.Add(name="skip")([h, r]))
    return keras.Model(inputs, _head(h), name="residual")


def concatenate():
    inputs = keras.Input(SHAPE)
    a = _conv(3, "left")(inputs)
    b = keras.layers.Conv2D(2, 1, name="right")(inputs)
    return keras.Model(inputs, _head(keras.layers.Concatenate(name="join")([a, b])), name="concat")


def two_branches():
    """A convolutional branch and a dense branch from the same input, one through the other's output too."""
    inputs = keras.Input(SHAPE)
    conv = keras.layers.Flatten()(_conv(2, "conv_branch", strides=2)(inputs))
    dense = keras.layers.Dense(6, activation="relu", name="dense_branch")(keras.layers.Flatten()(inputs))
    both = keras.layers.Concatenate()([conv, keras.layers.Dense(6, name="mix")(dense)])
    out = keras.layers.Add()([keras.layers.Dense(3, name="a")(both), keras.layers.Dense(3, name="b")(dense)])
    return keras.Model(inputs, out, name="branches")


def shared_dense():
    """One Dense called twice in a row and on a parallel branch: its gradient is the sum over its calls."""
    inputs = keras.Input(SHAPE)
    flat = keras.layers.Flatten()(inputs)
    shared = keras.layers.Dense(5, activation="tanh", name="shared")
    first = shared(keras.layers.Dense(5, name="to5")(flat))
    second = shared(first)
    side = shared(keras.layers.Dense(5, name="side")(flat))
    h = keras.layers.Concatenate()([second, side, first])
    return keras.Model(inputs, keras.layers.Dense(3, name="logits")(h), name="shared_dense")


def functional_group_norm():
    inputs = keras.Input(SHAPE)
    h = _conv(4, "stem")(inputs)
    r = keras.layers.GroupNormalization(2, name="gn")(keras.layers.Conv2D(4, 3, padding="same")(h))
    return keras.Model(inputs, _head(keras.layers.Add()([h, r])), name="gn_residual")


GRAPHS = [residual_add, concatenate, two_branches, shared_dense, functional_group_norm]


@pytest.mark.parametrize("k", [1, 3], ids=["per_example", "microbatch3"])
@pytest.mark.parametrize("build", GRAPHS, ids=lambda b: b.__name__)
def test_functional_graphs_equal_the_loop(build, k):
    keras.utils.set_random_seed(1)
    _assert_fast_equals_loop(_perturbed(build()), k)


@pytest.mark.slow  # every formulation and norm strategy
@pytest.mark.parametrize("build", [residual_add, shared_dense, functional_group_norm],
                         ids=lambda b: b.__name__)
def test_functional_graphs_every_formulation_equals_the_loop(build):
    keras.utils.set_random_seed(2)
    model = _perturbed(build())
    options = dict(planner._layer_options(model, private=True))
    count = max(len(c) for c in options.values())
    formulations = [{name: c[i % len(c)] for name, c in options.items()} for i in range(count)]
    _assert_fast_equals_loop(model, 1, formulations, ("auto", "ghost", "materialize"))


def test_a_shared_convolution_and_norm_sum_their_calls():
    """Cross terms: a shared Conv2D (ghost and materialized norms) and a shared affine GroupNorm."""
    keras.utils.set_random_seed(3)
    inputs = keras.Input(SHAPE)
    conv, norm = _conv(2, "shared_conv"), keras.layers.GroupNormalization(1, name="shared_gn")
    h = norm(conv(conv(inputs)))
    h = keras.layers.Add()([h, norm(conv(inputs))])
    model = _perturbed(keras.Model(inputs, _head(h)))
    formulations = [None, {"shared_conv": {"forward": "patches", "grads": "materialize"}}]
    if fastgrad.conv.grouped_filter_gradients():
        formulations.append({"shared_conv": {"forward": "native", "grads": "grouped"}})
    _assert_fast_equals_loop(model, 2, formulations, ("auto", "ghost", "materialize"))


def test_nested_sequential_and_subclassed_models_equal_the_loop():
    keras.utils.set_random_seed(4)
    block = keras.Sequential([keras.Input((8, 8, 4)), keras.layers.Conv2D(4, 3, padding="same"),
                              keras.layers.GroupNormalization(2)], name="block")
    inputs = keras.Input(SHAPE)
    h = _conv(4, "stem")(inputs)
    h = keras.layers.Add()([h, block(h)])
    h = keras.layers.Add()([h, block(h)])  # the nested model (its layers) called twice
    _assert_fast_equals_loop(_perturbed(keras.Model(inputs, _head(h))), 1)

    class Residual(keras.Model):
        def __init__(self):
            super().__init__()
            self.stem = keras.layers.Conv2D(3, 3, padding="same", name="stem")
            self.inner = keras.layers.SeparableConv2D(3, 3, padding="same", name="inner")
            self.pool = keras.layers.GlobalAveragePooling2D()
            self.out = keras.layers.Dense(3)

        def call(self, x, training=None):
            h = keras.ops.relu(self.stem(x))
            h = h + self.inner(h)  # a Keras operation, not a layer
            return self.out(self.pool(h))

    model = Residual()
    model(tf.zeros((1, *SHAPE)))
    _assert_fast_equals_loop(_perturbed(model), 2)
    assert fastgrad.as_functional(model).get_layer("inner") is model.inner  # the very same layers


@pytest.mark.skipif(not fastgrad.conv.grouped_filter_gradients(),
                    reason="this TensorFlow build has no grouped filter gradients (oneDNN off)")
@pytest.mark.parametrize("k", [1, 3], ids=["per_example", "microbatch3"])
def test_grouped_filter_gradients_of_convolutions_equal_the_loop(k):
    """`grouped`: the batch as the groups of one grouped convolution; strides, both paddings, one and
    several input channels."""
    keras.utils.set_random_seed(8)
    inputs = keras.Input(SHAPE)
    h = keras.layers.Conv2D(3, 3, strides=2, padding="same", activation="tanh", name="c1")(inputs)
    h = keras.layers.Conv2D(4, 2, strides=1, padding="valid", activation="tanh", name="c2")(h)
    one = keras.layers.Conv2D(2, 3, strides=2, name="c3")(keras.layers.Reshape((8, 16, 1))(inputs))
    h = keras.layers.Concatenate()([keras.layers.Flatten()(h), keras.layers.Flatten()(one)])
    model = _perturbed(keras.Model(inputs, keras.layers.Dense(3)(h)))
    grouped = {"forward": "native", "grads": "grouped"}
    _assert_fast_equals_loop(model, k, [{"c1": grouped, "c2": grouped, "c3": grouped}])


@pytest.mark.parametrize("k", [1, 4], ids=["per_example", "microbatch4"])
@pytest.mark.parametrize("make", [
    lambda: keras.layers.DepthwiseConv2D(3, padding="same", depth_multiplier=2, activation="tanh", name="dw"),
    lambda: keras.layers.DepthwiseConv2D(3, strides=2, use_bias=False, name="dw"),
    lambda: keras.layers.SeparableConv2D(5, 3, padding="same", depth_multiplier=2, activation="tanh",
                                         name="dw"),
    lambda: keras.layers.SeparableConv2D(4, 3, strides=2, use_bias=False, name="dw")],
    ids=["depthwise", "depthwise_stride2", "separable", "separable_stride2"])
def test_depthwise_and_separable_convolutions_equal_the_loop(make, k):
    model = keras.Sequential([keras.Input(SHAPE), make(), keras.layers.Flatten(), keras.layers.Dense(3)])
    assert isinstance(fastgrad.rule_for(model.get_layer("dw")),
                      (fastgrad.DepthwiseConv2DRule, fastgrad.SeparableConv2DRule))
    formulations = [{"dw": {"grads": g}} for g in ("depthwise", "materialize")]
    _assert_fast_equals_loop(_perturbed(model), k, formulations, ("auto", "ghost", "materialize"))


def test_a_shared_separable_convolution_equals_the_loop():
    keras.utils.set_random_seed(6)
    inputs = keras.Input(SHAPE)
    sep = keras.layers.SeparableConv2D(2, 3, padding="same", activation="tanh", name="sep")
    model = _perturbed(keras.Model(inputs, _head(keras.layers.Add()([sep(inputs), sep(sep(inputs))]))))
    _assert_fast_equals_loop(model, 1, [{"sep": {"grads": g}} for g in ("depthwise", "materialize")])


@pytest.mark.parametrize("jit", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["graph", "xla"])
def test_nonprivate_forward_of_a_graph_is_the_keras_gradient(jit):
    keras.utils.set_random_seed(7)
    model = _perturbed(functional_group_norm())
    x, y, mask = _batch(seed=3)

    def gradient(forward_fn):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(engine.per_example_loss(forward_fn(x, tape), y) * mask)
        return tape.gradient(loss, model.trainable_variables)

    reference = tf.function(lambda: gradient(lambda x, tape: model(x, training=True)), jit_compile=jit)()
    patches = {"stem": {"forward": "patches"}}
    for formulation in (None, patches):
        mine = tf.function(lambda f=formulation: gradient(
            lambda x, tape: fastgrad.forward(model, x, tape, f)), jit_compile=jit)()
        for a, b, v in zip(mine, reference, model.trainable_variables):
            np.testing.assert_allclose(a, b, rtol=RTOL, atol=ATOL, err_msg=v.path)


def test_first_layers_of_a_graph_and_the_planner_options():
    """`first` (input independent of every weight layer): both branches from the input, not the later ones."""
    model = two_branches()
    first = {layer.name: f for layer, f in fastgrad.layers_in_order(model)}
    assert first["conv_branch"] and first["dense_branch"] and not first["mix"] and not first["a"]
    assert fastgrad.default_formulation(model)["conv_branch"]["forward"] == "patches"
    options = dict(planner._layer_options(model, private=True))
    assert "conv_branch" in options and "mix" in options
    assert planner.validate_formulation(model, {"conv_branch": {"forward": "native", "grads": "ghost"}}, True)
    shapes = planner.layer_shapes(model, 5)
    assert shapes["conv_branch"] == (5, *SHAPE) and shapes["mix"] == (5, 6)


def test_plan_cache_key_tells_wirings_apart():
    """Same layers, different wiring: different model signatures (the plan cache key)."""
    def build(swap: bool):
        inputs = keras.Input((6,))
        a, b = keras.layers.Dense(6, name="a"), keras.layers.Dense(6, name="b")
        h = keras.layers.Add(name="add")([a(inputs), b(inputs)]) if not swap else b(a(inputs))
        return keras.Model(inputs, keras.layers.Dense(3, name="out")(h if not swap else
                                                                      keras.layers.Activation(None)(h)))

    assert planner.model_signature(build(False)) != planner.model_signature(build(True))


def _every_graph_rule():
    """Shared Conv2D, DepthwiseConv2D, SeparableConv2D, GroupNorm and Dense calls in one Functional model."""
    keras.utils.set_random_seed(9)
    inputs = keras.Input(SHAPE)
    conv, norm = _conv(4, "conv"), keras.layers.GroupNormalization(2, name="gn")
    wide = keras.initializers.RandomNormal(stddev=1.0, seed=9)  # 3e38·Σw overflows to ±∞, then NaN
    h = norm(conv(keras.layers.Conv2D(4, 3, activation="relu", kernel_initializer=wide, name="stem")(inputs)))
    h = keras.layers.Add()([h, norm(conv(h))])
    h = keras.layers.DepthwiseConv2D(3, padding="same", name="dw")(h)
    h = keras.layers.SeparableConv2D(4, 3, padding="same", activation="relu", name="sep")(h)
    dense = keras.layers.Dense(4, activation="tanh", name="dense")
    h = dense(dense(keras.layers.GlobalAveragePooling2D()(h)))
    return _perturbed(keras.Model(inputs, keras.layers.Dense(3, name="logits")(h)))


def _formulation_of(model, index: int):
    options = dict(planner._layer_options(model, private=True))
    return {name: c[index % len(c)] for name, c in options.items()}


@pytest.mark.parametrize("index", [0, 1, 2, 3])
def test_a_non_finite_unit_is_dropped_from_every_graph_rule(index):
    """One example of 3e38 overflows float32: its unit is dropped (weight 0, terms left out, kept 0) by
    every rule and formulation, shared calls included, and the sum is the loop's without it."""
    model = _every_graph_rule()
    x, y, mask = _batch(n=8, seed=5)
    x = tf.tensor_scatter_nd_update(x, [[2]], tf.fill([1, *SHAPE], 3e38))
    clip = 0.3
    sums, _, _, kept = tf.function(lambda x, y, m: fastgrad.fast_clipped_gradient_sum(
        model, x, y, m, clip, 1, _formulation_of(model, index)))(x, y, mask)
    expected = np.asarray(mask).copy()
    expected[2] = 0.0
    np.testing.assert_array_equal(kept.numpy(), expected)
    reference = [np.zeros(v.shape, np.float64) for v in model.trainable_variables]
    for i in np.flatnonzero(expected):
        with tf.GradientTape() as tape:
            loss = engine.per_example_loss(model(x[i:i + 1], training=True), y[i:i + 1])[0]
        grads = [g.numpy().astype(np.float64) for g in tape.gradient(loss, model.trainable_variables)]
        scale = min(1.0, clip / np.sqrt(sum(np.sum(g ** 2) for g in grads)))
        reference = [r + scale * g for r, g in zip(reference, grads)]
    for got, want, v in zip(sums, reference, model.trainable_variables):
        assert np.isfinite(got.numpy()).all(), v.path
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6, err_msg=v.path)


class _Odd(keras.layers.Layer):
    """A weightless layer type no rule knows."""

    def call(self, x):
        return x * 0.5


def test_unsupported_graphs_fall_back_to_vectorized_map_and_name_why():
    inputs = keras.Input(SHAPE)
    h = _conv(2, "stem")(inputs)
    model = keras.Model(inputs, _head(keras.layers.Add()([h, _Odd(name="odd")(h)])))
    assert fastgrad.fast_path_problem(model) == "_Odd layer 'odd'"
    assert fastgrad.choose_gradient_sum_fn(model, "auto") is engine.vmap_clipped_gradient_sum
    with pytest.raises(ConfigError, match=r"gradient_path 'fast' does not support _Odd layer 'odd'"):
        fastgrad.choose_gradient_sum_fn(model, "fast")

    class Untraceable(keras.Model):
        def __init__(self):
            super().__init__()
            self.dense = keras.layers.Dense(3)

        def call(self, x):
            return self.dense(tf.math.cumsum(x, axis=1))  # a TensorFlow op: no symbolic trace

    model = Untraceable()
    model(tf.zeros((2, 4)))
    assert "its call could not be traced" in fastgrad.fast_path_problem(model)
    assert fastgrad.choose_gradient_sum_fn(model, "auto") is engine.vmap_clipped_gradient_sum

    class Scaled(keras.Model):
        def __init__(self):
            super().__init__()
            self.dense = keras.layers.Dense(3)
            self.scale = self.add_weight(shape=(), initializer="ones")

        def call(self, x):
            return self.dense(x) * self.scale  # a variable outside every layer

    model = Scaled()
    model(tf.zeros((2, 4)))
    assert fastgrad.fast_path_problem(model) is not None


class _NoSharing(fastgrad.WeightRule):
    """A weight rule without `shared_unit_terms` (Dense, one call at a time)."""

    def problem(self, layer):
        return None

    def pre_activation(self, layer, a, choice):
        return a @ layer.kernel + layer.bias, None


def test_a_shared_layer_whose_rule_cannot_sum_calls_stays_off(monkeypatch):
    monkeypatch.setitem(fastgrad.REGISTRY, keras.layers.Dense, _NoSharing())
    inputs = keras.Input((4,))
    dense = keras.layers.Dense(4, name="twice")
    model = keras.Model(inputs, dense(dense(inputs)))
    assert fastgrad.fast_path_problem(model) == (
        "Dense layer 'twice' (called 2 times; its rule has no shared-call terms)")
