"""The DP-SGD step: per-example gradients → clip → mask → sum → noise → normalise → optimizer.

Everything here runs inside one `tf.function` (optionally XLA-compiled) whose input shapes never change,
so it is traced once per run. Shapes: `x` [capacity, 28, 28, 1] float32, `y` [capacity] int32,
`mask` [capacity] float32 (1 = a real example, 0 = a padded slot that must not influence anything).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import keras
import tensorflow as tf

GradSumFn = Callable[..., tuple[list[tf.Tensor], tf.Tensor, tf.Tensor]]


def per_example_loss(logits: tf.Tensor, labels: tf.Tensor) -> tf.Tensor:
    """Softmax cross-entropy of each example, shape [batch] (no reduction)."""
    return tf.nn.sparse_softmax_cross_entropy_with_logits(labels=tf.cast(labels, tf.int32), logits=logits)


def per_unit_gradients(model: keras.Model, x: tf.Tensor, y: tf.Tensor, microbatch_size: int = 1):
    """Gradients of each unit's mean loss, vectorized with `tf.vectorized_map` (the general reference path).

    A unit is one example (`microbatch_size` = 1) or `microbatch_size` consecutive examples (TensorFlow
    Privacy's microbatches). Returns (list of [units, *var.shape] gradients, per-example loss [capacity],
    logits [capacity, classes]).
    """
    variables = model.trainable_variables
    units = x.shape[0] // microbatch_size
    xu = tf.reshape(x, [units, microbatch_size, *x.shape[1:]])
    yu = tf.reshape(y, [units, microbatch_size])

    def unit_grad(args):
        xi, yi = args
        with tf.GradientTape() as tape:
            logits = model(xi, training=True)
            losses = per_example_loss(logits, yi)
            loss = tf.reduce_mean(losses)
        return tape.gradient(loss, variables), losses, logits

    grads, losses, logits = tf.vectorized_map(unit_grad, (xu, yu))
    return grads, tf.reshape(losses, [-1]), tf.reshape(logits, [x.shape[0], -1])


def global_norms(per_unit_grads: list[tf.Tensor]) -> tf.Tensor:
    """L2 norm of each unit's gradient over all variables together, shape [units]."""
    squares = [tf.reduce_sum(tf.reshape(g, [g.shape[0], -1]) ** 2, axis=1) for g in per_unit_grads]
    return tf.sqrt(tf.add_n(squares))


def clip_factors(norms: tf.Tensor, l2_norm_clip: float) -> tf.Tensor:
    """Per-unit scale min(1, C / norm): the clipped gradient has L2 norm ≤ C (a zero gradient stays zero)."""
    return l2_norm_clip / tf.maximum(norms, l2_norm_clip)


def vmap_clipped_gradient_sum(model, x, y, mask, l2_norm_clip, microbatch_size=1):
    """Σ_units mask_u · clip(g_u) for every trainable variable, via `per_unit_gradients`.

    `mask` is per example; a unit's weight is the mask of its first example (microbatches never hold
    padding: the sampler only pads per-example batches). Returns (sums, per-example loss, logits).
    """
    grads, losses, logits = per_unit_gradients(model, x, y, microbatch_size)
    unit_mask = mask[::microbatch_size]
    weights = clip_factors(global_norms(grads), l2_norm_clip) * unit_mask
    sums = [tf.tensordot(weights, g, axes=1) for g in grads]
    return sums, losses, logits


def gaussian_noise(variables, stddev: float, noise_seed: tf.Tensor) -> list[tf.Tensor]:
    """Fresh N(0, stddev²) noise shaped like each variable, from TensorFlow's stateless generator (Philox)
    keyed by `noise_seed` ([2] int64; one per step, `run_key.RunKey.noise_seed(step)`).

    The same seed always gives the same noise, so a run resumes exactly; the seed derives from the run's
    secret key, so nobody without the key can regenerate (and subtract) the noise.
    """
    sizes = [int(v.shape.num_elements()) for v in variables]
    seed = tf.cast(noise_seed, tf.int64)
    flat = tf.random.stateless_normal([sum(sizes)], seed=seed, stddev=stddev, dtype=tf.float32)
    return [tf.reshape(part, v.shape) for part, v in zip(tf.split(flat, sizes), variables)]


@dataclass(frozen=True, kw_only=True)
class StepSettings:
    """What the compiled step needs to know. Units: `l2_norm_clip` is C in gradient L2 norm;
    the noise std added to the clipped sum is `noise_multiplier · l2_norm_clip`; the noisy sum is
    divided by `denominator` (the expected batch size, or the number of microbatches)."""

    private: bool
    noise_multiplier: float
    l2_norm_clip: float
    microbatch_size: int
    denominator: float
    jit_compile: bool


def make_train_step(model: keras.Model, optimizer: keras.optimizers.Optimizer, settings: StepSettings,
                    grad_sum_fn: GradSumFn | None = None, forward_fn=None):
    """Build the compiled step `step(x, y, mask, extra_sums, noise_seed) -> (loss_sum, correct, count)`.

    `noise_seed` [2] int64 keys this step's noise (`run_key.RunKey.noise_seed(step)`); it is an input of
    the step, never a constant inside the traced graph, so no graph or XLA dump holds key material.

    `extra_sums` are clipped-gradient sums of overflow chunks of the same step (zeros normally), added
    before the noise, so a Poisson batch larger than the capacity is never truncated.
    Returned sums are over the real (mask = 1) examples only. `forward_fn(model, x, tape) -> logits`
    replaces `model(x, training=True)` in the non-private step (e.g. `fastgrad.forward`).
    """
    variables = model.trainable_variables
    grad_sum_fn = grad_sum_fn or vmap_clipped_gradient_sum
    s = settings
    optimizer.build(variables)  # create its slots now, so the compiled step is traced exactly once

    def private_sum(x, y, mask):
        return grad_sum_fn(model, x, y, mask, s.l2_norm_clip, s.microbatch_size)

    def plain_sum(x, y, mask):
        with tf.GradientTape() as tape:
            logits = forward_fn(model, x, tape) if forward_fn else model(x, training=True)
            losses = per_example_loss(logits, y)
            total = tf.reduce_sum(losses * mask)
        return tape.gradient(total, variables), losses, logits

    gradient_sum = private_sum if s.private else plain_sum

    def step(x, y, mask, extra_sums, noise_seed):
        sums, losses, logits = gradient_sum(x, y, mask)
        sums = [g + e for g, e in zip(sums, extra_sums)]
        if s.private and s.noise_multiplier > 0:
            noise = gaussian_noise(variables, s.noise_multiplier * s.l2_norm_clip, noise_seed)
            sums = [g + n for g, n in zip(sums, noise)]
        grads = [g / s.denominator for g in sums]
        optimizer.apply(grads, variables)
        correct = tf.cast(tf.equal(tf.argmax(logits, axis=1, output_type=tf.int32), tf.cast(y, tf.int32)),
                          tf.float32)
        return tf.reduce_sum(losses * mask), tf.reduce_sum(correct * mask), tf.reduce_sum(mask)

    def chunk_sum(x, y, mask):
        return gradient_sum(x, y, mask)[0]

    return (tf.function(step, jit_compile=s.jit_compile, reduce_retracing=False),
            tf.function(chunk_sum, jit_compile=s.jit_compile))


def make_optimizer(name: str, learning_rate, momentum: float = 0.9, **options) -> keras.optimizers.Optimizer:
    """'sgd', 'momentum' (SGD with `momentum`) or 'adam'. DP is kept: the optimizer only post-processes.
    `learning_rate` may be a Keras schedule; `options` go to the Keras optimizer (e.g. use_ema)."""
    if name == "sgd":
        return keras.optimizers.SGD(learning_rate, **options)
    if name == "momentum":
        return keras.optimizers.SGD(learning_rate, momentum=momentum, **options)
    if name == "adam":
        return keras.optimizers.Adam(learning_rate, **options)
    raise ValueError(f"unknown optimizer {name!r}")


def resolve_jit_compile(setting, *, private: bool = True, gradient_path: str = "fast") -> bool:
    """`true`/`false` as given; `auto` picks what `dpsgd bench` measured faster for this CNN.

    On a GPU: XLA. On CPU (2 cores, batch 64–256): XLA for the non-private step on the fast formulation
    (27 vs 45 ms/step at batch 256), plain TensorFlow graphs for DP steps (fast path 52 vs 57 ms; the
    vectorized_map path 76 vs 133 ms) and for the Keras non-private step (45 vs 73 ms).
    """
    if setting != "auto":
        return bool(setting)
    if tf.config.list_physical_devices("GPU"):
        return True
    return not private and gradient_path == "fast"


def choose_gradient_path(model: keras.Model, gradient_path: str, private: bool):
    """(grad_sum_fn, forward_fn, name) for `make_train_step`, following `training.gradient_path`.

    Private: the fast per-example path when the model supports it (or `gradient_path` says so), else
    `tf.vectorized_map`. Non-private: the plain gradient of the mean loss, through the fast path's
    forward formulation when supported, so DP and non-private runs differ only in clipping and noise.
    """
    from dpsgd_cli import fastgrad

    if gradient_path == "vectorized_map":
        return (vmap_clipped_gradient_sum if private else None), None, "vectorized_map"
    fn = fastgrad.choose_gradient_sum_fn(model, gradient_path)  # raises ConfigError for "fast" if unsupported
    fast = fn is not vmap_clipped_gradient_sum
    if not private:
        return None, (fastgrad.forward if fast else None), ("fast" if fast else "keras")
    return fn, None, ("fast" if fast else "vectorized_map")
