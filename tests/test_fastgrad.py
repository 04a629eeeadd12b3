"""The fast Dense/Conv2D clipping path agrees with the vectorized reference and a plain per-example loop."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from dpsgd_cli.errors import ConfigError
from dpsgd_cli.training import engine, fastgrad
from dpsgd_cli.training.model import build_model

BATCH = 16
RTOL, ATOL = 1e-4, 1e-5


def _batch(seed: int = 0, n: int = BATCH):
    rng = np.random.default_rng(seed)
    x = tf.constant(rng.random((n, 28, 28, 1), dtype=np.float32))
    y = tf.constant(rng.integers(0, 10, n), dtype=tf.int32)
    mask = tf.constant([1.0] * (n - 3) + [0.0] * 3)  # the last three slots are padding
    return x, y, mask


def _loop_unit_grads(model, x, y, k):
    """Each unit's gradient of its mean loss, one GradientTape per unit (no vectorization), as float64."""
    grads = []
    for start in range(0, x.shape[0], k):
        with tf.GradientTape() as tape:
            logits = model(x[start:start + k], training=True)
            loss = tf.reduce_mean(engine.per_example_loss(logits, y[start:start + k]))
        grads.append([tf.convert_to_tensor(g).numpy().astype(np.float64)  # an Embedding's are IndexedSlices
                      for g in tape.gradient(loss, model.trainable_variables)])
    return grads


def _clip_between_norms(model, x, y, mask, k):
    """C = the median unit norm, so some units are clipped and some not; loop norms and Σ mask_u·clip(g_u)."""
    unit_grads = _loop_unit_grads(model, x, y, k)
    norms = np.array([np.sqrt(sum(np.sum(g ** 2) for g in grads)) for grads in unit_grads])
    l2_norm_clip = float(np.median(norms))
    assert norms.min() < l2_norm_clip < norms.max()
    scales = np.asarray(mask)[::k] * np.minimum(1.0, l2_norm_clip / norms)
    sums = [sum(s * grads[i] for s, grads in zip(scales, unit_grads)) for i in range(len(unit_grads[0]))]
    return l2_norm_clip, norms, sums


def _compiled(fn, jit: bool):
    return tf.function(fn, jit_compile=jit, reduce_retracing=False)


@pytest.fixture(scope="module", params=["relu", "tanh"])
def model(request):
    return build_model(activation=request.param, seed=3)


def _assert_sums_close(sums, expected, variables, what):
    assert len(sums) == len(variables)
    for s, e, var in zip(sums, expected, variables):
        assert s.shape == var.shape
        np.testing.assert_allclose(s, e, rtol=RTOL, atol=ATOL, err_msg=f"{what}: {var.path}")


@pytest.mark.parametrize("k", [1, 4], ids=["per_example", "microbatch4"])
def test_fast_path_matches_vmap_and_loop(model, k):
    x, y, mask = _batch()
    l2_norm_clip, ref_norms, ref_sums = _clip_between_norms(model, x, y, mask, k)

    def all_paths(x, y, mask):
        out = {s: fastgrad._clipped_sum(model, x, y, mask, l2_norm_clip, k, strategy=s)
               for s in ("auto", "ghost", "materialize")}
        norms = {s: fastgrad.per_unit_norms(model, x, y, k, strategy=s) for s in ("ghost", "materialize")}
        return out, norms, engine.vmap_clipped_gradient_sum(model, x, y, mask, l2_norm_clip, k)

    out, norms, (vmap_sums, vmap_losses, vmap_logits, _) = _compiled(all_paths, jit=False)(x, y, mask)
    for strategy, (sums, losses, logits, _) in out.items():
        _assert_sums_close(sums, vmap_sums, model.trainable_variables, f"{strategy} vs vmap")
        _assert_sums_close(sums, ref_sums, model.trainable_variables, f"{strategy} vs loop")
        np.testing.assert_allclose(losses, vmap_losses, rtol=RTOL, atol=ATOL)
        np.testing.assert_allclose(logits, vmap_logits, rtol=RTOL, atol=ATOL)
    for strategy, n in norms.items():
        np.testing.assert_allclose(n, ref_norms, rtol=RTOL, atol=ATOL, err_msg=strategy)


@pytest.mark.slow  # XLA compiles
@pytest.mark.parametrize(("activation", "k"), [("relu", 1), ("tanh", 2)])
def test_fast_path_under_xla_matches_loop(activation, k):
    model = build_model(activation=activation, seed=3)
    x, y, mask = _batch(seed=5)
    l2_norm_clip, _, ref_sums = _clip_between_norms(model, x, y, mask, k)
    fast = _compiled(lambda *a: fastgrad.fast_clipped_gradient_sum(model, *a, l2_norm_clip, k), jit=True)
    sums, losses, *_ = fast(x, y, mask)
    _assert_sums_close(sums, ref_sums, model.trainable_variables, "xla fast vs loop")
    vmap_losses = engine.vmap_clipped_gradient_sum(model, x, y, mask, l2_norm_clip, k)[1]
    np.testing.assert_allclose(losses, vmap_losses, rtol=RTOL, atol=ATOL)


def test_ties_like_blank_image_borders_match_loop(model):
    """Constant regions make equal activations, so max-pool windows tie; routing must match TensorFlow's."""
    x, y, mask = _batch(seed=6)
    x = x * tf.cast(tf.random.stateless_uniform(x.shape, [1, 2]) > 0.7, tf.float32)  # mostly exact zeros
    x = tf.concat([tf.zeros_like(x[:4]), x[4:]], axis=0)  # four blank images
    l2_norm_clip, _, ref_sums = _clip_between_norms(model, x, y, mask, 1)
    fast = _compiled(lambda *a: fastgrad.fast_clipped_gradient_sum(model, *a, l2_norm_clip), jit=False)
    _assert_sums_close(fast(x, y, mask)[0], ref_sums, model.trainable_variables, "fast vs loop with ties")


@pytest.mark.parametrize("jit", [False, True], ids=["graph", "xla"])
def test_stride1_max_pool_matches_tensorflow_with_ties(jit):
    rng = np.random.default_rng(7)
    h = tf.constant(np.maximum(np.round(rng.normal(size=(3, 7, 6, 2)) * 2) / 2, 0), dtype=tf.float32)
    upstream = tf.constant(rng.normal(size=(3, 5, 4, 2)), dtype=tf.float32)

    def value_and_grad(pool):
        with tf.GradientTape() as tape:
            tape.watch(h)
            out = pool(h)
        return out, tape.gradient(out, h, output_gradients=upstream)

    mine = _compiled(lambda: value_and_grad(lambda t: fastgrad.pooling.max_pool_stride1(t, (3, 3))), jit)()
    ref = _compiled(lambda: value_and_grad(lambda t: tf.nn.max_pool2d(t, (3, 3), 1, "VALID")), jit)()
    for a, b in zip(mine, ref):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_masked_examples_contribute_nothing(model):
    x, y, mask = _batch(seed=1)
    fn = _compiled(lambda x, y, m: fastgrad.fast_clipped_gradient_sum(model, x, y, m, 0.5)[0], jit=False)
    noisy_x = tf.concat([x[:-3], 100.0 * tf.ones_like(x[-3:])], axis=0)  # padded slots hold garbage
    for a, b in zip(fn(x, y, mask), fn(noisy_x, y, mask)):
        np.testing.assert_allclose(a, b, rtol=RTOL, atol=ATOL)
    zeros = fn(x, y, tf.zeros_like(mask))
    assert all(float(tf.reduce_max(tf.abs(z))) == 0.0 for z in zeros)


def _model_with(layer: keras.layers.Layer) -> keras.Model:
    return keras.Sequential([keras.Input(shape=(6,)), keras.layers.Dense(4), layer, keras.layers.Dense(3)])


@pytest.mark.parametrize("layer", [keras.layers.UnitNormalization(name="unit"),
                                   keras.layers.BatchNormalization(name="bn")], ids=["unregistered", "batch"])
def test_unsupported_layer_falls_back(layer):
    model = _model_with(layer)
    assert not fastgrad.supports_fast_path(model)
    assert fastgrad.choose_gradient_sum_fn(model, "auto") is engine.vmap_clipped_gradient_sum
    assert fastgrad.choose_gradient_sum_fn(model, "vectorized_map") is engine.vmap_clipped_gradient_sum
    with pytest.raises(ConfigError, match=r"training\.gradient_path.*" + layer.name) as info:
        fastgrad.choose_gradient_sum_fn(model, "fast")
    assert "\n" not in str(info.value)


def test_masked_embedding_is_off_the_fast_path_and_bad_path_name():
    model = keras.Sequential([keras.Input(shape=(5,), dtype="int32"),
                              keras.layers.Embedding(20, 4, mask_zero=True, name="emb"),
                              keras.layers.GlobalAveragePooling1D(), keras.layers.Dense(3)])
    assert "(mask_zero)" in fastgrad.fast_path_problem(model)
    with pytest.raises(ConfigError, match="training.gradient_path"):
        fastgrad.choose_gradient_sum_fn(build_model(), "fastest")


def test_supported_models_choose_fast_path():
    model = build_model()
    assert fastgrad.supports_fast_path(model)
    for path in ("auto", "fast"):
        assert fastgrad.choose_gradient_sum_fn(model, path) is fastgrad.fast_clipped_gradient_sum
    dropout = _model_with(keras.layers.Dropout(0.1))
    assert fastgrad.supports_fast_path(dropout)


def test_dense_on_sequences_and_no_bias_matches_vmap():
    model = keras.Sequential([keras.Input(shape=(5, 6)), keras.layers.Dense(4, activation="tanh"),
                              keras.layers.Flatten(), keras.layers.Dense(3, use_bias=False)])
    assert fastgrad.supports_fast_path(model)
    rng = np.random.default_rng(2)
    x = tf.constant(rng.normal(size=(8, 5, 6)).astype(np.float32))
    y = tf.constant(rng.integers(0, 3, 8), dtype=tf.int32)
    mask = tf.ones([8])
    fast = fastgrad.fast_clipped_gradient_sum(model, x, y, mask, 0.3)[0]
    ref = engine.vmap_clipped_gradient_sum(model, x, y, mask, 0.3)[0]
    for a, b in zip(fast, ref):
        np.testing.assert_allclose(a, b, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("jit", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["graph", "xla"])
def test_train_step_without_noise_or_clipping_is_plain_sgd(jit):
    x, y, _ = _batch(seed=4)
    mask = tf.ones([BATCH])
    model, reference = build_model(seed=5), build_model(seed=5)
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(engine.per_example_loss(reference(x, training=True), y))
    mean_grads = tape.gradient(loss, reference.trainable_variables)
    expected = [v.numpy() - 0.1 * g.numpy() for v, g in zip(reference.trainable_variables, mean_grads)]

    optimizer = keras.optimizers.SGD(0.1)
    settings = engine.StepSettings(private=True, noise_multiplier=0.0, l2_norm_clip=1e9, microbatch_size=1,
                                   denominator=float(BATCH), jit_compile=jit)
    grad_sum_fn = fastgrad.choose_gradient_sum_fn(model, "fast")
    step, _ = engine.make_train_step(model, optimizer, settings, grad_sum_fn)
    zeros = [tf.zeros_like(v) for v in model.trainable_variables]
    loss_sum, _, count, _ = step(x, y, mask, zeros, tf.constant([7, 0], tf.int64))
    assert float(count) == BATCH
    np.testing.assert_allclose(float(loss_sum) / BATCH, float(loss), rtol=RTOL)
    for v, e in zip(model.trainable_variables, expected):
        np.testing.assert_allclose(v.numpy(), e, rtol=RTOL, atol=ATOL, err_msg=v.path)


def _formulations(model, private: bool = True):
    """Formulations covering every choice of every layer: the i-th one takes choice i (mod count) of each."""
    first, options = True, {}
    for layer in model.layers:
        choices = fastgrad.formulation_choices(layer, first, private)
        if choices:
            options[layer.name] = choices
        first = first and type(layer) not in (keras.layers.Dense, keras.layers.Conv2D)
    count = max(len(c) for c in options.values())
    return [{name: c[i % len(c)] for name, c in options.items()} for i in range(count)]


def test_formulations_cover_every_choice():
    formulations = _formulations(build_model())
    grouped = {"grouped"} if fastgrad.conv.grouped_filter_gradients() else set()
    assert len(formulations) == 5 + len(grouped)
    assert {f["conv1"]["grads"] for f in formulations} == {"materialize", "ghost", "depthwise"} | grouped
    assert {f["conv2"]["grads"] for f in formulations} == {"materialize", "ghost"} | grouped
    assert {f["pool1"]["forward"] for f in formulations} == {"native", "slices"}
    assert {f["conv2"]["forward"] for f in formulations} == {"native", "patches"}
    assert all(c.get("grads") != "depthwise" for f in formulations for c in (f["conv2"],))  # 16 inputs


@pytest.mark.slow  # every formulation of every layer (the default one: test_fast_path_matches_vmap_and_loop)
@pytest.mark.parametrize("k", [1, 4], ids=["per_example", "microbatch4"])
def test_every_formulation_matches_the_loop(model, k):
    """Each formulation (native/patches forward, slices/native pooling, materialized/ghost/depthwise
    per-unit gradients) gives the loop's clipped sums, norms and losses: a plan changes speed only."""
    x, y, mask = _batch(seed=8)
    x = tf.concat([tf.zeros_like(x[:2]), x[2:]], axis=0)  # blank images: pooling ties
    l2_norm_clip, ref_norms, ref_sums = _clip_between_norms(model, x, y, mask, k)
    formulations = _formulations(model)

    def all_formulations(x, y, mask):
        return [(fastgrad.fast_clipped_gradient_sum(model, x, y, mask, l2_norm_clip, k, f),
                 fastgrad.per_unit_norms(model, x, y, k, formulation=f)) for f in formulations]

    ref_losses = engine.per_example_loss(model(x), y)
    results = _compiled(all_formulations, jit=False)(x, y, mask)
    for f, ((sums, losses, *_), norms) in zip(formulations, results):
        _assert_sums_close(sums, ref_sums, model.trainable_variables, f"{f} vs loop")
        np.testing.assert_allclose(norms, ref_norms, rtol=RTOL, atol=ATOL, err_msg=str(f))
        np.testing.assert_allclose(losses, ref_losses, rtol=RTOL, atol=ATOL)


@pytest.mark.slow  # XLA compiles
@pytest.mark.parametrize("index", range(6))
def test_every_formulation_under_xla_matches_the_loop(index):
    model = build_model(activation="relu", seed=3)
    if index >= len(_formulations(model)):
        pytest.skip("grouped filter gradients are not available in this TensorFlow build")
    x, y, mask = _batch(seed=9)
    l2_norm_clip, _, ref_sums = _clip_between_norms(model, x, y, mask, 1)
    f = _formulations(model)[index]
    fn = _compiled(fastgrad.make_grad_sum_fn(f), jit=True)
    sums = tf.function(lambda *a: fn(model, *a, l2_norm_clip), jit_compile=True)(x, y, mask)[0]
    _assert_sums_close(sums, ref_sums, model.trainable_variables, f"xla {f} vs loop")


@pytest.mark.parametrize("jit", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["graph", "xla"])
def test_every_nonprivate_formulation_is_the_keras_gradient(model, jit):
    x, y, mask = _batch(seed=10)
    x = tf.concat([tf.zeros_like(x[:2]), x[2:]], axis=0)

    def gradient(forward_fn):
        with tf.GradientTape() as tape:
            logits = forward_fn(x, tape)
            loss = tf.reduce_sum(engine.per_example_loss(logits, y) * mask)
        return tape.gradient(loss, model.trainable_variables)

    reference = _compiled(lambda: gradient(lambda x, tape: model(x, training=True)), jit)()
    for f in _formulations(model, private=False):
        fn = fastgrad.make_forward_fn(f) or (lambda m, x, tape: m(x, training=True))
        grads = _compiled(lambda fn=fn: gradient(lambda x, tape: fn(model, x, tape)), jit)()
        _assert_sums_close(grads, reference, model.trainable_variables, f"nonprivate {f}")
    all_native = {name: {"forward": "native"} for name in ("conv1", "pool1", "conv2", "pool2")}
    assert fastgrad.make_forward_fn(all_native) is None  # all native = the plain Keras step


class _Halve(keras.layers.Layer):
    """A weightless layer type no rule knows."""

    def call(self, x):
        return 0.5 * x


class _HalveRule(fastgrad.LayerRule):
    """A weightless rule with a choice for the planner: Keras's call or a plain multiply."""

    def choices(self, layer, private):
        return [{"forward": "native"}, {"forward": "multiply"}]

    def forward(self, layer, h, choice):
        return h * 0.5 if choice.get("forward") == "multiply" else layer(h, training=True)


class _AffineLayerNormRule(fastgrad.WeightRule):
    """LayerNormalization over the last axis with γ and β: y = x̂ ⊙ γ + β, so a unit's γ gradient is the sum
    over its positions of dL/dy ⊙ x̂ and its β gradient that of dL/dy (over its k examples, / k)."""

    def problem(self, layer):
        rank = len(layer.input.shape)
        last = [a % rank for a in layer.axis] == [rank - 1]
        return None if last and layer.scale and layer.center else "axis, center or scale"

    def pre_activation(self, layer, a, choice):
        mean, variance = tf.nn.moments(a, axes=[-1], keepdims=True)
        x_hat = (a - mean) * tf.math.rsqrt(variance + layer.epsilon)
        return x_hat * layer.gamma + layer.beta, x_hat

    def unit_terms(self, layer, a, x_hat, dz, units, k, choice, strategy="auto"):
        c = dz.shape[-1]
        gamma = tf.reduce_sum(tf.reshape(dz * x_hat, [units, -1, c]), axis=1) / k
        beta = tf.reduce_sum(tf.reshape(dz, [units, -1, c]), axis=1) / k
        return tf.reduce_sum(gamma ** 2 + beta ** 2, axis=1), {id(layer.gamma): gamma, id(layer.beta): beta}

    def weighted_sums(self, layer, term, weights):
        return [tf.tensordot(weights, term[id(v)], 1) for v in layer.trainable_variables]


def _sequence_batch(n: int = 12, seed: int = 3):
    rng = np.random.default_rng(seed)
    x = tf.constant(rng.normal(size=(n, 5, 6)).astype(np.float32))
    return x, tf.constant(rng.integers(0, 3, n), dtype=tf.int32), tf.constant([1.0] * (n - 3) + [0.0] * 3)


def _assert_fast_equals_loop(model, k: int, formulations=(None,)):
    x, y, mask = _sequence_batch()
    l2_norm_clip, ref_norms, ref_sums = _clip_between_norms(model, x, y, mask, k)

    def every_formulation(x, y, mask):
        return [(fastgrad.fast_clipped_gradient_sum(model, x, y, mask, l2_norm_clip, k, f)[0],
                 fastgrad.per_unit_norms(model, x, y, k, formulation=f)) for f in formulations]

    for f, (sums, norms) in zip(formulations, _compiled(every_formulation, jit=False)(x, y, mask)):
        _assert_sums_close(sums, ref_sums, model.trainable_variables, f"registered rule {f}")
        np.testing.assert_allclose(norms, ref_norms, rtol=RTOL, atol=ATOL, err_msg=str(f))


def test_registering_a_weightless_layer_type_puts_it_on_the_fast_path_and_the_planner(monkeypatch):
    """The registry is the one dispatch point: support, forward choices and the planner's options."""
    from dpsgd_cli.training import planner

    def build():
        return keras.Sequential([keras.Input(shape=(5, 6)), keras.layers.Dense(4, activation="tanh"),
                                 _Halve(name="halve"), keras.layers.Flatten(), keras.layers.Dense(3)])

    assert "_Halve layer 'halve'" in fastgrad.fast_path_problem(build())
    monkeypatch.setitem(fastgrad.REGISTRY, _Halve, _HalveRule())
    model = build()
    assert fastgrad.supports_fast_path(model)
    assert dict(planner._layer_options(model, private=True))["halve"] == _HalveRule().choices(None, True)
    assert planner.validate_formulation(model, {"halve": {"forward": "multiply"}}, True)
    _assert_fast_equals_loop(model, 1, [{"halve": {"forward": f}} for f in ("native", "multiply")])
    monkeypatch.delitem(fastgrad.REGISTRY, keras.layers.Dense)
    assert fastgrad.fast_path_problem(model).startswith("Dense layer")


@pytest.mark.parametrize("k", [1, 4], ids=["per_example", "microbatch4"])
def test_registering_a_weight_rule_gives_per_example_gradients_equal_to_the_loop(monkeypatch, k):
    """An affine LayerNormalization (γ, β per-example rules written outside fastgrad) on the fast path."""
    def build():
        return keras.Sequential([keras.Input(shape=(5, 6)), keras.layers.Dense(8, activation="tanh"),
                                 keras.layers.LayerNormalization(name="norm"), keras.layers.Flatten(),
                                 keras.layers.Dense(3)])

    monkeypatch.setitem(fastgrad.REGISTRY, keras.layers.LayerNormalization, _AffineLayerNormRule())
    model = build()
    assert fastgrad.supports_fast_path(model)
    assert isinstance(fastgrad.rule_for(model.get_layer("norm")), _AffineLayerNormRule)  # replaced
    rng = np.random.default_rng(4)  # γ, β away from their initial 1 and 0
    for v in model.get_layer("norm").trainable_variables:
        v.assign(v + rng.normal(scale=0.3, size=v.shape).astype(np.float32))
    _assert_fast_equals_loop(model, k)


@pytest.mark.parametrize("layer", [
    keras.layers.LayerNormalization(center=False, scale=False, name="norm"),
    keras.layers.GroupNormalization(2, center=False, scale=False, name="norm")], ids=["layer", "group"])
def test_weightless_normalisations_are_on_the_fast_path(layer):
    model = keras.Sequential([keras.Input(shape=(5, 6)), keras.layers.Dense(8, activation="tanh"), layer,
                              keras.layers.Flatten(), keras.layers.Dense(3)])
    assert fastgrad.supports_fast_path(model)
    _assert_fast_equals_loop(model, 1)


def test_normalising_across_examples_is_off_the_fast_path():
    model = keras.Sequential([keras.Input(shape=(6,)), keras.layers.Dense(4),
                              keras.layers.LayerNormalization(axis=0, center=False, scale=False, name="bad")])
    assert "(normalises across examples" in fastgrad.fast_path_problem(model)


def _perturbed(model):
    rng = np.random.default_rng(5)  # γ, β away from their initial 1 and 0
    for v in model.trainable_variables:
        v.assign(v + rng.normal(scale=0.3, size=v.shape).astype(np.float32))
    return model


@pytest.mark.parametrize("k", [1, 4], ids=["per_example", "microbatch4"])
@pytest.mark.parametrize("make", [
    lambda: keras.layers.LayerNormalization(name="norm"),
    lambda: keras.layers.LayerNormalization(axis=[1, 2], name="norm"),
    lambda: keras.layers.LayerNormalization(center=False, name="norm"),
    lambda: keras.layers.GroupNormalization(2, name="norm"),
    lambda: keras.layers.GroupNormalization(4, scale=False, name="norm")],
    ids=["layer", "layer_two_axes", "layer_scale_only", "group", "group_center_only"])
def test_affine_normalisations_have_per_example_gradients_equal_to_the_loop(make, k):
    """The built-in rule: γ's gradient Σ dL/dy ⊙ x̂ and β's Σ dL/dy per example."""
    model = keras.Sequential([keras.Input(shape=(5, 6)), keras.layers.Dense(8, activation="tanh"), make(),
                              keras.layers.Flatten(), keras.layers.Dense(3)])
    assert isinstance(fastgrad.rule_for(model.get_layer("norm")), fastgrad.AffineNormRule)
    _assert_fast_equals_loop(_perturbed(model), k)


def test_affine_group_norm_after_a_convolution_equals_the_loop():
    model = keras.Sequential([keras.Input(shape=(5, 6)), keras.layers.Reshape((5, 6, 1)),
                              keras.layers.Conv2D(8, 3, padding="same", activation="tanh"),
                              keras.layers.GroupNormalization(4, name="norm"), keras.layers.Flatten(),
                              keras.layers.Dense(3)])
    _assert_fast_equals_loop(_perturbed(model), 1)


@pytest.mark.filterwarnings("ignore:You passed `rms_scaling=True`")
@pytest.mark.parametrize(("make", "why"), [
    (lambda: keras.layers.LayerNormalization(rms_scaling=True, name="norm"), "rms_scaling"),
    (lambda: keras.layers.GroupNormalization(2, axis=1, name="norm"),
     "groups over an axis other than the last")])
def test_normalisations_the_rules_do_not_cover_stay_off_the_fast_path(make, why):
    model = keras.Sequential([keras.Input(shape=(4, 6)), keras.layers.Dense(8), make(),
                              keras.layers.Flatten(), keras.layers.Dense(3)])
    assert f"({why})" in fastgrad.fast_path_problem(model)


@pytest.mark.parametrize("k", [1, 2], ids=["per_example", "microbatch2"])
@pytest.mark.parametrize("pool", [keras.layers.Flatten, keras.layers.GlobalAveragePooling1D])
def test_embedding_per_example_gradients_equal_the_loop(k, pool):
    """Token ids repeat within a sequence and across examples: a row's gradient sums its positions."""
    layers = [keras.layers.Embedding(9, 4, name="emb"), keras.layers.Dense(5, activation="tanh"), pool(),
              keras.layers.Dense(3)]
    model = keras.Sequential([keras.Input(shape=(7,), dtype="int32"), *layers])
    assert isinstance(fastgrad.rule_for(model.get_layer("emb")), fastgrad.EmbeddingRule)
    rng = np.random.default_rng(7)
    x = tf.constant(rng.integers(0, 9, (12, 7)).astype(np.int32))  # 84 ids from 9: many repeats
    y = tf.constant(rng.integers(0, 3, 12), dtype=tf.int32)
    mask = tf.constant([1.0] * 10 + [0.0] * 2)
    l2_norm_clip, ref_norms, ref_sums = _clip_between_norms(model, x, y, mask, k)

    def fast(x, y, mask):
        return (fastgrad.fast_clipped_gradient_sum(model, x, y, mask, l2_norm_clip, k)[0],
                fastgrad.per_unit_norms(model, x, y, k))

    sums, norms = _compiled(fast, jit=False)(x, y, mask)
    _assert_sums_close(sums, ref_sums, model.trainable_variables, "embedding")
    np.testing.assert_allclose(norms, ref_norms, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("k", [1, 2], ids=["per_example", "microbatch2"])
def test_embedding_ids_outside_the_vocabulary_drop_their_unit_and_reach_no_other(k):
    """On a GPU tf.gather returns zeros for an id outside [0, vocab) instead of failing, and the rule's
    pair = unit·vocab + id would then alias another unit's row: one example would change another's clip
    factor. The rule must catch such ids itself — here on CPU, where TensorFlow's own gather would raise —
    drop their unit (counted as not kept) and leave the sum of the other units as the loop gives it."""
    vocab = 9
    model = keras.Sequential([keras.Input(shape=(7,), dtype="int32"), keras.layers.Embedding(vocab, 4),
                              keras.layers.Dense(5, activation="tanh"), keras.layers.Flatten(),
                              keras.layers.Dense(3)])
    rng = np.random.default_rng(8)
    ids = rng.integers(0, vocab, (12, 7)).astype(np.int32)
    ids[2, 3] = vocab + ids[4, 0]  # unit·vocab + id lands on a pair of a later unit
    ids[7, 0] = -1
    y = tf.constant(rng.integers(0, 3, 12), dtype=tf.int32)
    mask = tf.ones([12])
    bad_units = sorted({2 // k, 7 // k})
    good = np.array([u // k not in bad_units for u in range(12)])
    x_good, y_good = tf.constant(ids[good]), tf.boolean_mask(y, good)
    l2_norm_clip, _, ref_sums = _clip_between_norms(model, x_good, y_good, tf.ones([int(good.sum())]), k)
    fast = _compiled(lambda x, y, m: fastgrad.fast_clipped_gradient_sum(model, x, y, m, l2_norm_clip, k),
                     jit=False)
    sums, _, _, kept = fast(tf.constant(ids), y, mask)
    np.testing.assert_array_equal(kept.numpy(), good.astype(np.float32))
    _assert_sums_close(sums, ref_sums, model.trainable_variables, "embedding with out-of-range ids")


def _near_cancelling(kind: str, n: int = 16):
    """A model and a batch whose per-unit kernel gradient Σ_t a_t d_tᵀ nearly cancels: the layer's input
    rows come in near-opposite pairs (a, −a + δ with ‖a‖ ≈ 10⁵‖δ‖) and average pooling gives every
    position the same output-gradient d, so the gradient is Σδ·dᵀ, tiny against its terms. A Dense layer on
    2-row sequences, or a 1×1 convolution on 4×4 images (half the pixels +v, half −v + δ), without biases
    and before a frozen output layer, so the unit's whole gradient is the cancelling one."""
    rng = np.random.default_rng(11)
    keras.utils.set_random_seed(11)
    if kind == "dense":
        a = rng.normal(size=(n, 1, 64)) * 1e3
        x = np.concatenate([a, -a + rng.normal(size=(n, 1, 64)) * 1e-2], axis=1)
        layers = [keras.Input((2, 64)), keras.layers.Dense(16, use_bias=False, name="seq"),
                  keras.layers.GlobalAveragePooling1D()]
    else:
        v = rng.normal(size=(n, 8)) * 1e3
        x = np.concatenate([v, -v + rng.normal(size=(n, 8)) * 1e-2], axis=1).reshape(n, 4, 4, 1)
        layers = [keras.Input((4, 4, 1)), keras.layers.Conv2D(8, 1, use_bias=False, name="conv"),
                  keras.layers.GlobalAveragePooling2D()]
    logits = keras.layers.Dense(3, use_bias=False, name="logits")
    model = keras.Sequential([*layers, logits])
    logits.trainable = False  # the unit's gradient is the cancelling one alone
    return model, tf.constant(x, tf.float32), tf.constant(rng.integers(0, 3, n), tf.int32)


@pytest.mark.parametrize("k", [1, 2], ids=["per_example", "microbatch2"])
@pytest.mark.parametrize("kind", ["dense", "conv"])
def test_every_clipped_contribution_stays_within_c_on_near_cancelling_gradients(kind, k):
    """The norm each formulation computes must bound the gradient it actually sums: for every formulation
    the planner can choose, every unit's clipped contribution (the backend's weighted sum with only that
    unit's weight, its norm taken in float64) is at most C·(1 + 1e-6). Gram-matrix norms summed in float32
    lose the cancelling gradient (a computed norm far below the true one: the unit escapes clipping)."""
    model, x, y = _near_cancelling(kind)
    units, mask = x.shape[0] // k, tf.ones([x.shape[0]])
    for formulation in [None, *_formulations(model)]:
        sq, weighted_sum, losses, _ = fastgrad.unit_terms(model, x, y, k, formulation=formulation)

        def contribution_norm(u, weights, weighted_sum=weighted_sum):
            one = tf.one_hot(u, units) * weights
            return np.sqrt(sum(np.sum(t.numpy().astype(np.float64) ** 2) for t in weighted_sum(one)))

        plain = [contribution_norm(u, tf.ones([units])) for u in range(units)]
        clip = 0.5 * float(np.median(plain))  # most units are clipped
        weights, _ = engine.clip_weights(sq, losses, mask, clip, k)
        worst = max(contribution_norm(u, weights) for u in range(units)) / clip
        assert worst <= 1 + 1e-6, (formulation, worst)


@pytest.mark.parametrize("frozen", ["first", "last"])
def test_a_frozen_weight_layer_adds_nothing_to_the_norms(frozen):
    """Only trainable variables are clipped and summed: a layer with trainable=False must not count in a
    unit's norm (it would clip the others too hard, unlike the GradientTape loop and tf.vectorized_map)."""
    x, y, mask = _sequence_batch()
    model = keras.Sequential([keras.Input((5, 6)), keras.layers.Dense(4, activation="tanh", name="first"),
                              keras.layers.Flatten(), keras.layers.Dense(3, name="last")])
    model.get_layer(frozen).trainable = False
    l2_norm_clip, ref_norms, ref_sums = _clip_between_norms(model, x, y, mask, 1)
    norms = fastgrad.per_unit_norms(model, x, y)
    np.testing.assert_allclose(norms, ref_norms, rtol=RTOL, atol=ATOL)
    sums = fastgrad.fast_clipped_gradient_sum(model, x, y, mask, l2_norm_clip)[0]
    _assert_sums_close(sums, ref_sums, model.trainable_variables, f"{frozen} frozen")


def test_phase_patches_are_traced_once_per_geometry_and_equal_the_slices():
    """A first convolution's patches (few input channels) are one traced function per geometry, called
    from every graph that needs them (the planner traces dozens): the same values and input gradient
    as the slices written inline, with and without XLA, and no second trace for a second graph."""
    from dpsgd_cli.training.fastgrad import conv

    layer = keras.layers.Conv2D(4, 5, strides=2, padding="same")
    layer.build((None, 11, 11, 2))
    x = tf.constant(np.random.default_rng(0).random((3, 11, 11, 2), dtype=np.float32))

    def patches_and_grad(fn):
        with tf.GradientTape() as tape:
            tape.watch(x)
            patches = fn(x)
            total = tf.reduce_sum(tf.sin(patches))
        return patches, tape.gradient(total, x)

    inline = patches_and_grad(lambda a: conv._phase_slices(a, (5, 5), (2, 2), "same"))
    for jit in (False, True):
        graph = tf.function(lambda: patches_and_grad(lambda a: conv._patches_by_phase(a, layer)),
                            jit_compile=jit)
        for got, want in zip(graph(), inline):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    shared = conv._phase_function((5, 5), (2, 2), "same", (3, 11, 11, 2), tf.float32)
    assert shared.experimental_get_tracing_count() == 1
