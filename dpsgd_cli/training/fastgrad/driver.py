"""The fast path's driver: one forward pass recording each weight layer's input and z, one backward pass
for every example's dz, the rules' per-unit terms, the clipped sum, and the choice of gradient path."""

from __future__ import annotations

from typing import NamedTuple

import keras
import numpy as np
import tensorflow as tf

from dpsgd_cli.config import GRADIENT_PATHS
from dpsgd_cli.errors import ConfigError
from dpsgd_cli.training import engine
from dpsgd_cli.training.fastgrad.base import WeightRule
from dpsgd_cli.training.fastgrad.graph import GraphProblem, graph_of
from dpsgd_cli.training.fastgrad.registry import rule_for


def _unsupported_layer(model: keras.Model) -> str | None:
    """What the fast path cannot handle in `model` (a short phrase), or None when it handles everything."""
    try:
        graph = graph_of(model)
    except GraphProblem as problem:
        return str(problem)
    inputs: dict[int, list[tuple]] = {}
    for call in graph.calls:
        if call.op is None:
            continue
        problem = _call_problem(call)
        if problem is not None:
            return f"{_what(call.op)}" + (f" ({problem})" if problem else "")
        if _weighted(call.op):
            inputs.setdefault(id(call.op), []).append(tuple(call.arguments.keras_tensors[0].shape[1:])
                                                      if call.arguments is not None else None)
    for call in graph.calls:
        uses = inputs.get(id(call.op), ())
        if len(uses) > 1:
            if not rule_for(call.op).shares():
                return f"{_what(call.op)} (called {len(uses)} times; its rule has no shared-call terms)"
            if len({len(shape) for shape in uses if shape is not None}) > 1:
                return f"{_what(call.op)} (called on inputs of different ranks)"
    owned = {id(v) for call in graph.calls for v in getattr(call.op, "trainable_variables", ())}
    if any(id(v) not in owned for v in model.trainable_variables):
        return "a trainable variable outside the model's layers"
    return None


def _what(op) -> str:
    kind = "layer" if isinstance(op, keras.layers.Layer) else "operation"
    return f"{type(op).__name__} {kind} {op.name!r}"


def _call_problem(call) -> str | None:
    """Why this one call is off the fast path ("" for no detail), or None."""
    rule = rule_for(call.op)
    if rule is None:
        return ""
    problem = rule.problem(call.op)
    if problem is not None:
        return problem
    if call.arguments is None:
        return None
    args, kwargs = call.arguments.args, call.arguments.kwargs
    constants = (bool, int, float, str, type(None), np.ndarray, np.generic)
    for value in keras.tree.flatten((args, kwargs)):
        if not isinstance(value, (keras.KerasTensor, *constants)):
            return f"an argument that is a {type(value).__name__}, not a tensor of the graph"
    if _weighted(call.op) and not (len(args) == 1 and isinstance(args[0], keras.KerasTensor)
                                   and set(kwargs) <= {"training"}):
        return "called on more than one tensor or with keyword arguments"
    return None


def _weighted(op) -> bool:
    """Whether `op` runs as a weight layer (a weight rule, and trainable variables: a frozen layer is a
    plain function of its input)."""
    rule = rule_for(op)
    return bool(rule and rule.weighted and getattr(op, "trainable_variables", None))


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
# per-unit kernel gradients or norms of Dense/Conv2D layers
GRADS = ("materialize", "ghost", "depthwise", "grouped")


def default_formulation(model: keras.Model) -> dict[str, dict[str, str]]:
    """The formulation used when none is given (each rule's `default`): a first Conv2D (one whose input
    depends on no weight layer) as patches × kernel (its patches are needed for its per-example gradients
    anyway), every other weight layer native, stride-1 max pooling as shifted slices, per-layer norms by
    `kernel.prefer_ghost`'s operation count. A plan (`planner`) replaces it."""
    out = {}
    for layer, first in layers_in_order(model):
        rule = rule_for(layer)
        choice = rule.default(layer, first) if rule else None
        if choice:
            out[layer.name] = choice
    return out


def layers_in_order(model: keras.Model) -> list[tuple]:
    """(layer, first) for each distinct layer of the model's graph in the order of its first call; `first`:
    its input depends on no weight layer, so the gradient to its input is not needed."""
    try:
        calls = graph_of(model).calls
    except GraphProblem:  # off the fast path: the layers Keras lists, none first
        return [(layer, False) for layer in getattr(model, "layers", [])]
    after_weights, seen, out = set(), set(), []
    for call in calls:
        first = not any(key in after_weights for key in call.inputs)
        if not first or (call.op is not None and _weighted(call.op)):
            after_weights.update(call.outputs)
        if isinstance(call.op, keras.layers.Layer) and id(call.op) not in seen:
            seen.add(id(call.op))
            out.append((call.op, first))
    return out


def layer_input_shapes(model: keras.Model) -> dict[str, tuple]:
    """Each single-input layer's input shape (without the batch axis) at its first call."""
    shapes = {}
    for call in graph_of(model).calls:
        if not isinstance(call.op, keras.layers.Layer) or call.op.name in shapes:
            continue
        if call.arguments is None:
            source = call.op.input
        elif len(call.arguments.keras_tensors) == 1:
            source = call.arguments.keras_tensors[0]
        else:
            continue
        if isinstance(source, keras.KerasTensor):
            shapes[call.op.name] = tuple(source.shape[1:])
    return shapes


def graph_signature(model: keras.Model) -> list:
    """The wiring: for each call, its op's name and the names of the ops whose outputs it reads."""
    graph = graph_of(model)
    producer = {graph.input: "input"}
    rows = []
    for call in graph.calls:
        name = call.op.name if call.op is not None else "identity"
        rows.append([name, [producer.get(key, "?") for key in call.inputs]])
        producer.update(dict.fromkeys(call.outputs, name))
    return rows


def formulation_choices(layer, first: bool, private: bool) -> list[dict[str, str]]:
    """Every formulation this module can run for `layer` (all tested equal to the GradientTape reference).

    `first`: the layer is the first weight layer (its input needs no gradient). Empty for layers with
    nothing to choose."""
    rule = rule_for(layer)
    return rule.choices(layer, private) if rule else []


def _choice(formulation, layer, default: dict[str, str] | None) -> dict[str, str]:
    if not isinstance(layer, keras.layers.Layer):
        return {}
    return {**(default or {}), **(formulation or {}).get(layer.name, {})}


class _Record(NamedTuple):
    """One weight layer call's share of the forward pass: its input `a`, the watched z, the rule's `aux`."""

    rule: WeightRule
    layer: keras.layers.Layer
    a: tf.Tensor
    z: tf.Tensor
    aux: tf.Tensor | None
    choice: dict[str, str]


def _run(model: keras.Model, x: tf.Tensor, visit) -> tf.Tensor:
    """The model's output on `x`, walking its graph: `visit(op, args, kwargs)` computes each call's output
    from its filled-in arguments (identities pass their value on)."""
    graph = graph_of(model)
    values = {graph.input: x}
    for call in graph.calls:
        if call.op is None:
            values[call.outputs[0]] = values[call.inputs[0]]
            continue
        if call.arguments is None:
            args, kwargs = (values[call.inputs[0]],), {}
        else:
            args, kwargs = call.arguments.fill_in(values)
        out = visit(call.op, args, kwargs)
        values.update(zip(call.outputs, keras.tree.flatten(out)))
    return values[graph.output]


def _call_weightless(rule, op, args, kwargs, choice) -> tf.Tensor:
    """A weightless call in training mode: the rule's `forward` for a layer on one input (a tensor or a
    merge layer's list), else the op on its arguments, with `training=True` where the op takes it."""
    if (rule is not None and isinstance(op, keras.layers.Layer) and len(args) == 1
            and set(kwargs) <= {"training"}):
        return rule.forward(op, args[0], choice)
    if "training" in getattr(op, "_call_context_args", ()):
        kwargs = {**kwargs, "training": True}
    return op(*args, **kwargs)


def _forward(model: keras.Model, x: tf.Tensor, tape: tf.GradientTape, formulation=None):
    """Logits and a `_Record` per call of a weight layer with trainable variables, z's watched (a frozen
    layer is run like a weightless one: its gradient is neither clipped nor summed, so it must not count
    in a unit's norm). `formulation`: {layer name: {"forward": ..., "grads": ...}} (missing:
    `default_formulation`)."""
    defaults = default_formulation(model)
    records = []

    def visit(op, args, kwargs):
        rule = rule_for(op)
        choice = _choice(formulation, op, defaults.get(op.name))
        if not _weighted(op):
            return _call_weightless(rule, op, args, kwargs, choice)
        z, aux = rule.pre_activation(op, args[0], choice)
        tape.watch(z)
        records.append(_Record(rule, op, args[0], z, aux, choice))
        return rule.activation(op, z)

    return _run(model, x, visit), records


def forward(model: keras.Model, x: tf.Tensor, tape: tf.GradientTape, formulation=None) -> tf.Tensor:
    """The model's training-mode logits through `formulation` (default: `default_formulation`): the same
    function as `model(x)`, for a non-private step. Native choices call the Keras layer itself, so an
    all-native formulation is the plain Keras forward. Call inside `tape`."""
    defaults = default_formulation(model)

    def visit(op, args, kwargs):
        rule = rule_for(op)
        choice = _choice(formulation, op, defaults.get(op.name))
        if _weighted(op):
            return rule.forward(op, args[0], choice)
        return _call_weightless(rule, op, args, kwargs, choice)

    return _run(model, x, visit)


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
    calls: dict[int, list] = {}  # a shared layer's calls together, in the order of their first call
    for r, dz in zip(records, dzs):
        calls.setdefault(id(r.layer), []).append((r, dz))
    terms, sq_norms = [], []
    for group in calls.values():
        r = group[0][0]
        if len(group) == 1:
            sq, term = r.rule.unit_terms(r.layer, r.a, r.aux, group[0][1], units, k, r.choice, strategy)
        else:
            uses = [(use.a, use.aux, dz) for use, dz in group]
            sq, term = r.rule.shared_unit_terms(r.layer, uses, units, k, r.choice, strategy)
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
