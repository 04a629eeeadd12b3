"""The DP-SGD step: per-example gradients → clip → mask → sum → noise → normalise → optimizer.

Everything here runs inside one `tf.function` (optionally XLA-compiled) whose input shapes never change,
so it is traced once per run. Shapes: `x` [capacity, *input shape] float32 (the CLI's datasets:
[capacity, 28, 28, 1]), `y` [capacity, *label shape] (class indices [capacity] int32 by default),
`mask` [capacity] float32 (1 = a real example, 0 = a padded slot that must not influence anything).

The loss is softmax cross-entropy from logits and integer labels (`per_example_loss`) unless a `loss_fn`
is given: any `loss_fn(logits, labels) -> [batch]` per-example loss (e.g. a Keras loss, `keras_api`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import keras
import tensorflow as tf

from dpsgd_cli.privacy import accounting

# (clipped sums per variable, per-example loss [capacity], logits [capacity, ...], kept [capacity])
GradSumFn = Callable[..., tuple[list[tf.Tensor], tf.Tensor, tf.Tensor, tf.Tensor]]
LossFn = Callable[[tf.Tensor, tf.Tensor], tf.Tensor]  # (logits, labels) -> per-example loss [batch]


def per_example_loss(logits: tf.Tensor, labels: tf.Tensor) -> tf.Tensor:
    """Softmax cross-entropy of each example, shape [batch] (no reduction)."""
    return tf.nn.sparse_softmax_cross_entropy_with_logits(labels=tf.cast(labels, tf.int32), logits=logits)


def correct_predictions(logits: tf.Tensor, labels: tf.Tensor) -> tf.Tensor:
    """1.0 where argmax(logits) is the label, else 0.0, shape [batch]. Labels are class indices [batch]
    or one-hot / probability rows [batch, classes] (compared by their argmax)."""
    if labels.shape.rank is not None and labels.shape.rank > 1:
        labels = tf.argmax(labels, axis=-1, output_type=tf.int32)
    predicted = tf.argmax(logits, axis=-1, output_type=tf.int32)
    return tf.cast(tf.equal(predicted, tf.cast(labels, tf.int32)), tf.float32)


def per_unit_gradients(model: keras.Model, x: tf.Tensor, y: tf.Tensor, microbatch_size: int = 1,
                       loss_fn: LossFn = per_example_loss):
    """Gradients of each unit's mean loss, vectorized with `tf.vectorized_map` (the general reference path).

    A unit is one example (`microbatch_size` = 1) or `microbatch_size` consecutive examples (TensorFlow
    Privacy's microbatches). Returns (list of [units, *var.shape] gradients, per-example loss [capacity],
    logits [capacity, classes]).
    """
    variables = model.trainable_variables
    units = x.shape[0] // microbatch_size
    xu = tf.reshape(x, [units, microbatch_size, *x.shape[1:]])
    yu = tf.reshape(y, [units, microbatch_size, *y.shape[1:]])

    def unit_grad(args):
        xi, yi = args
        with tf.GradientTape() as tape:
            logits = model(xi, training=True)
            losses = loss_fn(logits, yi)
            loss = tf.reduce_mean(losses)
        return tape.gradient(loss, variables), losses, logits

    grads, losses, logits = tf.vectorized_map(unit_grad, (xu, yu))
    return grads, tf.reshape(losses, [-1]), tf.reshape(logits, [x.shape[0], -1])


def squared_norms(per_unit_grads: list[tf.Tensor]) -> tf.Tensor:
    """Squared L2 norm of each unit's gradient over all variables together, shape [units]."""
    return tf.add_n([tf.reduce_sum(tf.reshape(g, [g.shape[0], -1]) ** 2, axis=1) for g in per_unit_grads])


def global_norms(per_unit_grads: list[tf.Tensor]) -> tf.Tensor:
    """L2 norm of each unit's gradient over all variables together, shape [units]."""
    return tf.sqrt(squared_norms(per_unit_grads))


def clip_factors(norms: tf.Tensor, l2_norm_clip: float) -> tf.Tensor:
    """Per-unit scale min(1, C / norm): the clipped gradient has L2 norm ≤ C (a zero gradient stays zero)."""
    return l2_norm_clip / tf.maximum(norms, l2_norm_clip)


# What a gradient backend answers about one batch: (squared norm of each unit's gradient [units],
# weighted_sum(weights [units]) -> Σ_u weights_u · g_u per trainable variable, per-example losses, logits).
# A unit whose weight is 0 must contribute exactly 0 to weighted_sum, even when its terms hold ∞ or NaN
# (`without_dropped`): 0·∞ would be NaN.
# Backends: `vmap_unit_terms` here (the general reference) and `fastgrad.unit_terms` (per-layer rules).
UnitTerms = tuple[tf.Tensor, Callable[[tf.Tensor], list[tf.Tensor]], tf.Tensor, tf.Tensor]


def without_dropped(weights: tf.Tensor, terms: tf.Tensor) -> tf.Tensor:
    """`terms` [units, ...] with the rows of units whose weight is 0 set to exactly 0, whatever they held
    (∞ or NaN too): what a backend's weighted sum multiplies, so a dropped unit adds nothing."""
    keep = tf.cast(tf.not_equal(weights, 0.0), terms.dtype)
    return tf.math.multiply_no_nan(terms, tf.reshape(keep, [-1] + [1] * (terms.shape.rank - 1)))


def clipped_sum(unit_terms: UnitTerms, mask: tf.Tensor, l2_norm_clip: float, microbatch_size: int = 1):
    """The one place per-unit gradients are clipped and masked: Σ_u mask_u · min(1, C/‖g_u‖) · g_u.

    `mask` is per example; a unit's weight is the mask of its first example (microbatches never hold
    padding: the sampler only pads per-example batches). A unit whose squared gradient norm or one of
    whose losses is not finite (e.g. an input of 1e38 overflowing float32) is dropped: its weight is 0 and
    its terms are left out of the sum entirely, so one example can never turn the step into NaN; dropping
    depends on that unit's own data only, so the sum still moves by at most C per unit.
    Returns (sums, per-example loss, logits, kept [capacity]: 1 for a real example whose unit was summed,
    0 for padding and for the examples of a dropped unit)."""
    sq_norms, weighted_sum, losses, logits = unit_terms
    weights, kept = clip_weights(sq_norms, losses, mask, l2_norm_clip, microbatch_size)
    return weighted_sum(weights), losses, logits, kept


def clip_weights(sq_norms: tf.Tensor, losses: tf.Tensor, mask: tf.Tensor, l2_norm_clip: float,
                 microbatch_size: int = 1) -> tuple[tf.Tensor, tf.Tensor]:
    """`clipped_sum`'s weights [units] (min(1, C/‖g_u‖) · the unit's mask; 0 for a dropped unit) and kept
    [capacity]."""
    k = microbatch_size
    finite = tf.logical_and(tf.math.is_finite(sq_norms),
                            tf.reduce_all(tf.reshape(tf.math.is_finite(losses), [-1, k]), axis=1))
    factors = clip_factors(tf.sqrt(tf.where(finite, sq_norms, 0.0)), l2_norm_clip)
    weights = tf.where(finite, factors, 0.0) * mask[::k]
    return weights, mask * tf.repeat(tf.cast(finite, mask.dtype), k)


def vmap_unit_terms(model, x, y, microbatch_size: int = 1, loss_fn: LossFn = per_example_loss) -> UnitTerms:
    """The reference backend: every unit's gradient materialized by `per_unit_gradients`."""
    grads, losses, logits = per_unit_gradients(model, x, y, microbatch_size, loss_fn)
    return (squared_norms(grads), lambda w: [tf.tensordot(w, without_dropped(w, g), axes=1) for g in grads],
            losses, logits)


def vmap_clipped_gradient_sum(model, x, y, mask, l2_norm_clip, microbatch_size=1,
                              loss_fn: LossFn = per_example_loss):
    """Σ_units mask_u · clip(g_u) for every trainable variable (`clipped_sum` of `vmap_unit_terms`).
    Returns (sums, per-example loss, logits, kept)."""
    return clipped_sum(vmap_unit_terms(model, x, y, microbatch_size, loss_fn), mask, l2_norm_clip,
                       microbatch_size)


def chunk_bounds(capacity: int, chunk_size: int, microbatch_size: int = 1) -> list[tuple[int, int]]:
    """(start, stop) of each pass over `capacity` slots, `chunk_size` slots each (rounded up to whole
    microbatches; the last pass takes what is left). `chunk_size` ≤ 0 or ≥ capacity: one pass."""
    if chunk_size <= 0 or chunk_size >= capacity:
        return [(0, capacity)]
    size = -(-chunk_size // microbatch_size) * microbatch_size
    return [(start, min(start + size, capacity)) for start in range(0, capacity, size)]


def chunked_gradient_sum(grad_sum_fn: GradSumFn, chunk_size: int) -> GradSumFn:
    """`grad_sum_fn` computed in sequential passes of `chunk_size` slots inside the same compiled step.

    The clipped sums of the passes are added (a sum over units does not care how units are grouped, and
    no unit is split: passes hold whole microbatches), losses, logits and kept are concatenated in slot
    order: the result equals one pass, only peak memory (per-example intermediates of one pass at a time)
    and speed (smaller operands may suit the caches better) change. Each pass starts after the previous
    pass's sums exist (control dependencies), so the passes do not run side by side."""
    def grad_sum(model, x, y, mask, l2_norm_clip, microbatch_size=1, loss_fn: LossFn = per_example_loss):
        bounds = chunk_bounds(x.shape[0], chunk_size, microbatch_size)
        if len(bounds) == 1:
            return grad_sum_fn(model, x, y, mask, l2_norm_clip, microbatch_size, loss_fn=loss_fn)
        total, losses, logits, kept = None, [], [], []
        for start, stop in bounds:
            with tf.control_dependencies(total or []):
                part = [tf.identity(t[start:stop]) for t in (x, y, mask)]
            sums, part_losses, part_logits, part_kept = grad_sum_fn(model, *part, l2_norm_clip,
                                                                    microbatch_size, loss_fn=loss_fn)
            total = list(sums) if total is None else [a + b for a, b in zip(total, sums)]
            losses.append(part_losses)
            logits.append(part_logits)
            kept.append(part_kept)
        return total, tf.concat(losses, 0), tf.concat(logits, 0), tf.concat(kept, 0)

    return grad_sum


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
    views: int = 1  # K: inputs per example (augmentation multiplicity), all in the example's one unit

    def dp_event(self, sampling_rate: float):
        """The dp-accounting event of one step of this mechanism, from the very σ and microbatch size the
        step uses: a Gaussian with noise multiplier σ (σ/2 when a microbatch holds > 1 example: one
        example can move its clipped microbatch by 2C) on a Poisson sample at rate `sampling_rate`."""
        if not self.private:
            raise ValueError("a non-private step has no DP event")
        sigma = accounting.accounting_noise_multiplier(self.noise_multiplier, self.microbatch_size)
        return accounting.step_event(sigma, sampling_rate)


def make_train_step(model: keras.Model, optimizer: keras.optimizers.Optimizer, settings: StepSettings,
                    grad_sum_fn: GradSumFn | None = None, forward_fn=None, data=None, *,
                    loss_fn: LossFn = per_example_loss, return_logits: bool = False, autograph: bool = True):
    """Build the compiled step `step(x, y, mask, extra_sums, noise_seed) -> (loss_sum, correct, count,
    dropped)` (`step_statistics`).

    `noise_seed` [2] int64 keys this step's noise (`run_key.RunKey.noise_seed(step)`); it is an input of
    the step, never a constant inside the traced graph, so no graph or XLA dump holds key material.

    `extra_sums` are clipped-gradient sums of overflow chunks of the same step (zeros normally), added
    before the noise, so a Poisson batch larger than the capacity is never truncated.
    Returned sums are over the real (mask = 1) examples only. `forward_fn(model, x, tape) -> logits`
    replaces `model(x, training=True)` in the non-private step (e.g. `fastgrad.forward`).
    `loss_fn(logits, labels)`: the per-example loss (default softmax cross-entropy on class indices).
    `return_logits`: the step also returns the logits [capacity, classes] and `kept` [capacity] (1 for a
    real example whose unit was summed; e.g. for Keras metrics on those examples) after its statistics.

    `autograph`: False traces without converting Python control flow: several times faster to trace, the
    same graph unless `loss_fn` branches in Python on tensor values (then it fails to trace; Keras layers'
    `call` is never converted by autograph either way).

    `data` = (x_all, y_all) tensors kept on the device: then the steps take indices instead of examples,
    `step(idx, mask, extra_sums, noise_seed)` and `chunk_sum(idx, mask)`, and gather inside the compiled
    function (no host copy of the batch per step).
    """
    variables = model.trainable_variables
    optimizer.build(variables)  # create its slots now, so the compiled step is traced exactly once
    gradient_sum = make_gradient_sum(model, settings, grad_sum_fn, forward_fn, loss_fn=loss_fn)

    def step(x, y, mask, extra_sums, noise_seed):
        sums, losses, logits, kept = gradient_sum(x, y, mask)
        optimizer.apply(noisy_gradients(variables, settings, sums, extra_sums, noise_seed), variables)
        stats = step_statistics(losses, logits, y, mask, kept, settings.microbatch_size)
        return (*stats, logits, kept) if return_logits else stats

    def chunk_sum(x, y, mask):
        return gradient_sum(x, y, mask)[0]

    if data is not None:
        x_all, y_all = data
        take_step, take_chunk = step, chunk_sum

        def step(idx, mask, extra_sums, noise_seed):
            return take_step(tf.gather(x_all, idx), tf.gather(y_all, idx), mask, extra_sums, noise_seed)

        def chunk_sum(idx, mask):
            return take_chunk(tf.gather(x_all, idx), tf.gather(y_all, idx), mask)

    return (tf.function(step, jit_compile=settings.jit_compile, reduce_retracing=False, autograph=autograph),
            tf.function(chunk_sum, jit_compile=settings.jit_compile, autograph=autograph))


def step_statistics(losses, logits, y, mask, kept, microbatch_size: int = 1) -> tuple[tf.Tensor, ...]:
    """A step's running statistics, on the private batch without noise (not covered by ε): (loss sum,
    correct predictions, count) over the examples kept in the sum, and the number of real units dropped
    for a non-finite gradient norm or loss (`clipped_sum`)."""
    kept_loss = tf.where(kept > 0, losses, tf.zeros_like(losses))  # a dropped example's loss may be NaN
    dropped = (tf.reduce_sum(mask) - tf.reduce_sum(kept)) / microbatch_size
    return (tf.reduce_sum(kept_loss), tf.reduce_sum(correct_predictions(logits, y) * kept),
            tf.reduce_sum(kept), dropped)


def make_gradient_sum(model: keras.Model, settings: StepSettings, grad_sum_fn: GradSumFn | None = None,
                      forward_fn=None, *, loss_fn: LossFn = per_example_loss):
    """`gradient_sum(x, y, mask) -> (sums, per-example loss, logits, kept)`: the clipped, masked sums of
    the per-unit gradients (`grad_sum_fn`, default `vmap_clipped_gradient_sum`) when `settings.private`,
    else the plain gradient of the masked loss sum (through `forward_fn` when given; kept = mask). No
    noise, no division.

    With `settings.views` K > 1, x is [slots, K, *input]: each example's loss is the mean of its K views'
    losses and its K views form one clipped unit (K·microbatch_size consecutive rows), so one example
    still moves the sum by at most C. The per-example loss is then that mean, the logits view 0's."""
    variables = model.trainable_variables
    grad_sum_fn = grad_sum_fn or vmap_clipped_gradient_sum
    s, k = settings, settings.views

    def private_sum(x, y, mask):
        return grad_sum_fn(model, x, y, mask, s.l2_norm_clip, s.microbatch_size * k, loss_fn=loss_fn)

    def plain_sum(x, y, mask):
        with tf.GradientTape() as tape:
            logits = forward_fn(model, x, tape) if forward_fn else model(x, training=True)
            losses = loss_fn(logits, y)
            total = tf.reduce_sum(losses * mask) / k
        return tape.gradient(total, variables), losses, logits, mask

    inner = private_sum if s.private else plain_sum
    if k == 1:
        return inner

    def views_sum(x, y, mask):
        rows = tf.reshape(x, [-1, *x.shape[2:]])  # example-major: the K views of one example are adjacent
        sums, losses, logits, kept = inner(rows, tf.repeat(y, k, axis=0), tf.repeat(mask, k, axis=0))
        return (sums, tf.reduce_mean(tf.reshape(losses, [-1, k]), axis=1),
                tf.reshape(logits, [-1, k, *logits.shape[1:]])[:, 0], tf.reshape(kept, [-1, k])[:, 0])

    return views_sum


def noisy_gradients(variables, settings: StepSettings, sums, extra_sums, noise_seed) -> list[tf.Tensor]:
    """What the optimizer receives: (clipped sums + `extra_sums` of overflow chunks + ONE draw of
    N(0, (σC)²) keyed by `noise_seed`) / denominator. `sums` must already be the sum over every example
    of the step (under tf.distribute: after the all-reduce), so the noise is added exactly once."""
    s = settings
    sums = [g + e for g, e in zip(sums, extra_sums)]
    if s.private and s.noise_multiplier > 0:
        noise = gaussian_noise(variables, s.noise_multiplier * s.l2_norm_clip, noise_seed)
        sums = [g + n for g, n in zip(sums, noise)]
    return [g / s.denominator for g in sums]


def overflow_sums(chunk_fn, overflow: Sequence[tuple], zeros: list[tf.Tensor]) -> list[tf.Tensor]:
    """Σ of the clipped sums of an oversized Poisson step's overflow chunks (`chunk_fn(*args)` for each
    `args` in `overflow`; `zeros` when there are none): the step adds them before its one noise draw,
    so no sampled example is dropped."""
    if not overflow:
        return zeros
    parts = [chunk_fn(*args) for args in overflow]
    return [tf.add_n(list(p)) for p in zip(*parts)]


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
