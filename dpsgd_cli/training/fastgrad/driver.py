"""The fast path's driver: one forward pass recording each weight layer's input and z, one backward pass
for every example's dz, the rules' per-unit terms, the clipped sum, and the choice of gradient path."""

from __future__ import annotations

from typing import NamedTuple

import keras
import tensorflow as tf

from dpsgd_cli.config import GRADIENT_PATHS
from dpsgd_cli.errors import ConfigError
from dpsgd_cli.training import engine
from dpsgd_cli.training.fastgrad.base import WeightRule
from dpsgd_cli.training.fastgrad.registry import rule_for


def _unsupported_layer(model: keras.Model) -> str | None:
    """What the fast path cannot handle in `model` (a short phrase), or None when it handles everything."""
    if not isinstance(model, keras.Sequential):
        return f"{type(model).__name__} model {model.name!r} (only Sequential models)"
    for layer in model.layers:
        rule = rule_for(layer)
        problem = "" if rule is None else rule.problem(layer)
        if problem is not None:
            return f"{type(layer).__name__} layer {layer.name!r}" + (f" ({problem})" if problem else "")
    owned = {id(v) for layer in model.layers for v in layer.trainable_variables}
    if any(id(v) not in owned for v in model.trainable_variables):
        return "a trainable variable outside the model's layers"
    return None


def fast_path_problem(model: keras.Model) -> str | None:
    """What keeps `model` off the fast path (a phrase, e.g. "LayerNormalization layer 'ln'"), or None."""
    return _unsupported_layer(model)


def supports_fast_path(model: keras.Model) -> bool:
    """True when `fast_clipped_gradient_sum` handles every layer and every trainable variable of `model`."""
    return _unsupported_layer(model) is None


def choose_gradient_sum_fn(model: keras.Model, gradient_path: str) -> engine.GradSumFn:
    """The `grad_sum_fn` for `engine.make_train_step`.

    `gradient_path`: "auto" (the fast path when `supports_fast_path`, else the vmap reference), "fast"
    (ConfigError when unsupported) or "vectorized_map".
    """
    if gradient_path not in GRADIENT_PATHS:
        raise ConfigError(f"training.gradient_path must be one of {', '.join(GRADIENT_PATHS)}, "
                          f"got {gradient_path!r}")
    if gradient_path == "vectorized_map":
        return engine.vmap_clipped_gradient_sum
    reason = _unsupported_layer(model)
    if reason is None:
        return fast_clipped_gradient_sum
    if gradient_path == "fast":
        raise ConfigError(f"training.gradient_path 'fast' does not support {reason}; "
                          "use 'auto' or 'vectorized_map'")
    return engine.vmap_clipped_gradient_sum


# weight layers: native | patches; stride-1 max pooling: native | slices
FORWARDS = ("native", "patches", "slices")
GRADS = ("materialize", "ghost", "depthwise")  # per-unit kernel gradients or norms of Dense/Conv2D layers


def default_formulation(model: keras.Model) -> dict[str, dict[str, str]]:
    """The formulation used when none is given (each rule's `default`): the first Conv2D as patches ×
    kernel (its patches are needed for its per-example gradients anyway), every other weight layer native,
    stride-1 max pooling as shifted slices, per-layer norms by `kernel.prefer_ghost`'s operation count. A plan
    (`planner`) replaces it."""
    out, first = {}, True
    for layer in model.layers:
        rule = rule_for(layer)
        choice = rule.default(layer, first) if rule else None
        if choice:
            out[layer.name] = choice
        first = first and not (rule and rule.weighted)
    return out


def formulation_choices(layer, first: bool, private: bool) -> list[dict[str, str]]:
    """Every formulation this module can run for `layer` (all tested equal to the GradientTape reference).

    `first`: the layer is the first weight layer (its input needs no gradient). Empty for layers with
    nothing to choose."""
    rule = rule_for(layer)
    return rule.choices(layer, private) if rule else []


def _choice(formulation, layer, default: dict[str, str] | None) -> dict[str, str]:
    return {**(default or {}), **(formulation or {}).get(layer.name, {})}


class _Record(NamedTuple):
    """One weight layer's share of the forward pass: its input `a`, the watched z and the rule's `aux`."""

    rule: WeightRule
    layer: keras.layers.Layer
    a: tf.Tensor
    z: tf.Tensor
    aux: tf.Tensor | None
    choice: dict[str, str]


def _forward(model: keras.Model, x: tf.Tensor, tape: tf.GradientTape, formulation=None):
    """Logits and a `_Record` per weight layer with trainable variables, z's watched (a frozen layer is
    run like a weightless one: its gradient is neither clipped nor summed, so it must not count in a
    unit's norm). `formulation`: {layer name: {"forward": ..., "grads": ...}} (missing:
    `default_formulation`)."""
    defaults = default_formulation(model)
    records, h = [], x
    for layer in model.layers:
        rule = rule_for(layer)
        choice = _choice(formulation, layer, defaults.get(layer.name))
        if rule.weighted and layer.trainable_variables:
            z, aux = rule.pre_activation(layer, h, choice)
            tape.watch(z)
            records.append(_Record(rule, layer, h, z, aux, choice))
            h = rule.activation(layer, z)
        else:
            h = rule.forward(layer, h, choice)
    return h, records


def forward(model: keras.Model, x: tf.Tensor, tape: tf.GradientTape, formulation=None) -> tf.Tensor:
    """The model's training-mode logits through `formulation` (default: `default_formulation`): the same
    function as `model(x)`, for a non-private step. Native choices call the Keras layer itself, so an
    all-native formulation is the plain Keras forward. Call inside `tape`."""
    defaults = default_formulation(model)
    h = x
    for layer in model.layers:
        rule = rule_for(layer)
        choice = _choice(formulation, layer, defaults.get(layer.name))
        h = rule.forward(layer, h, choice) if rule else layer(h, training=True)
    return h


def make_forward_fn(formulation):
    """`forward_fn` for `engine.make_train_step` following `formulation` (None when it is all native: the
    plain Keras step)."""
    if not any(c.get("forward", "native") != "native" for c in formulation.values()):
        return None
    return lambda model, x, tape: forward(model, x, tape, formulation)




def _per_unit_terms(model, x, y, microbatch_size: int, strategy: str, formulation=None,
                    loss_fn: engine.LossFn = engine.per_example_loss):
    """Per-unit squared gradient norms [units], (record, term) per weight layer, losses, logits."""
    k = microbatch_size
    units = x.shape[0] // k
    with tf.GradientTape(watch_accessed_variables=False) as tape:
        logits, records = _forward(model, x, tape, formulation)
        losses = loss_fn(logits, y)
        total = tf.reduce_sum(losses)
    dzs = tape.gradient(total, [r.z for r in records])
    terms, sq_norms = [], []
    for r, dz in zip(records, dzs):
        sq, term = r.rule.unit_terms(r.layer, r.a, r.aux, dz, units, k, r.choice, strategy)
        sq_norms.append(sq)
        terms.append((r, term))
    return tf.add_n(sq_norms), terms, losses, logits


def _weighted_sums(model, terms, weights: tf.Tensor) -> list[tf.Tensor]:
    """Σ_u weights_u · g_u for every trainable variable, in `model.trainable_variables` order."""
    sums = {}
    for record, term in terms:
        variables = record.layer.trainable_variables
        sums.update(zip(map(id, variables), record.rule.weighted_sums(record.layer, term, weights)))
    return [sums[id(v)] for v in model.trainable_variables]


def per_unit_norms(model, x, y, microbatch_size: int = 1, strategy: str = "auto",
                   formulation=None, loss_fn: engine.LossFn = engine.per_example_loss) -> tf.Tensor:
    """Global L2 norm of each unit's gradient (of its mean loss), shape [capacity / microbatch_size]."""
    return tf.sqrt(_per_unit_terms(model, x, y, microbatch_size, strategy, formulation, loss_fn)[0])


def unit_terms(model, x, y, microbatch_size: int = 1, strategy: str = "auto", formulation=None,
               loss_fn: engine.LossFn = engine.per_example_loss) -> engine.UnitTerms:
    """This backend's answer (`engine.UnitTerms`): per-unit squared norms from the per-layer rules, and
    the weighted sum of per-unit gradients as one GEMM per layer. Requires `supports_fast_path(model)`."""
    sq_norms, terms, losses, logits = _per_unit_terms(model, x, y, microbatch_size, strategy, formulation,
                                                      loss_fn)
    return sq_norms, lambda weights: _weighted_sums(model, terms, weights), losses, logits


def _clipped_sum(model, x, y, mask, l2_norm_clip, microbatch_size=1, strategy="auto", formulation=None,
                 loss_fn: engine.LossFn = engine.per_example_loss):
    """`fast_clipped_gradient_sum` with the per-layer norm strategy: "auto" (each layer's formulation
    choice, else `kernel.prefer_ghost`), "ghost" or "materialize" (every layer that is not "depthwise")."""
    terms = unit_terms(model, x, y, microbatch_size, strategy, formulation, loss_fn)
    return engine.clipped_sum(terms, mask, l2_norm_clip, microbatch_size)


def fast_clipped_gradient_sum(model, x, y, mask, l2_norm_clip, microbatch_size=1, formulation=None,
                              loss_fn: engine.LossFn = engine.per_example_loss):
    """Σ_units mask_u · clip(g_u) per trainable variable; same contract as `engine.vmap_clipped_gradient_sum`.

    Requires `supports_fast_path(model)`. `formulation`: per-layer choices (see `formulation_choices`;
    default `default_formulation`); every formulation computes the same sums, only the speed differs.
    Returns (sums aligned with `model.trainable_variables`, per-example loss [capacity], logits).
    """
    return _clipped_sum(model, x, y, mask, l2_norm_clip, microbatch_size, formulation=formulation,
                        loss_fn=loss_fn)


def make_grad_sum_fn(formulation) -> engine.GradSumFn:
    """`grad_sum_fn` for `engine.make_train_step` that follows `formulation`."""
    def grad_sum(model, x, y, mask, l2_norm_clip, microbatch_size=1,
                 loss_fn: engine.LossFn = engine.per_example_loss):
        return fast_clipped_gradient_sum(model, x, y, mask, l2_norm_clip, microbatch_size, formulation,
                                         loss_fn=loss_fn)
    return grad_sum


def choose_gradient_path(model: keras.Model, gradient_path: str, private: bool):
    """(grad_sum_fn, forward_fn, name) for `engine.make_train_step` following `training.gradient_path`,
    with this backend's default formulation (`planner` chooses measured ones).

    Private: the fast per-example path when the model supports it (or `gradient_path` says so), else
    `tf.vectorized_map`. Non-private: the plain gradient of the mean loss, through the fast path's
    forward formulation when supported, so DP and non-private runs differ only in clipping and noise.
    """
    if gradient_path == "vectorized_map":
        return (engine.vmap_clipped_gradient_sum if private else None), None, "vectorized_map"
    fn = choose_gradient_sum_fn(model, gradient_path)  # raises ConfigError for "fast" if unsupported
    fast = fn is not engine.vmap_clipped_gradient_sum
    if not private:
        return None, (forward if fast else None), ("fast" if fast else "keras")
    return fn, None, ("fast" if fast else "vectorized_map")
