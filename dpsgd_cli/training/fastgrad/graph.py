"""A model as the fast path sees it: a list of calls in an order that computes every value before it is
read (topological), from the one input to the one output.

- Sequential: its layers in a chain.
- Functional: its Keras nodes, deepest first (as `Functional` runs them), so residual `Add`s, `Concatenate`s,
  branches and layers called more than once (shared) are kept as the model wires them.
- A Sequential or Functional model called inside another is inlined (two identity calls carry the value in
  and out), so its layers are the outer model's calls.
- Any other (subclassed) model: its `call` is traced once on a symbolic input of the shape it was built
  with (`training=True` when `call` takes it), giving a Functional model over the very same layer objects
  (kept for the model's lifetime). This works when `call` is a static graph of Keras layers and operations;
  Python branches on tensor values, TensorFlow ops on the inputs or several inputs cannot be traced, and
  the model then stays on the `tf.vectorized_map` path.
"""

from __future__ import annotations

import weakref
from collections.abc import Hashable
from typing import Any, NamedTuple

import keras


class Call(NamedTuple):
    """One call of the walk: `op` (a layer or Keras operation; None: an identity) applied to `arguments`
    (the Keras node's symbolic arguments, filled in from the values; None: the one value `inputs[0]`).
    `inputs` and `outputs` are the keys of the values it reads and writes."""

    op: Any
    arguments: Any
    inputs: tuple[Hashable, ...]
    outputs: tuple[Hashable, ...]


class Graph(NamedTuple):
    input: Hashable
    output: Hashable
    calls: tuple[Call, ...]


class GraphProblem(Exception):
    """Why a model cannot be walked as a graph (a phrase for `fast_path_problem`)."""


_TRACES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # subclassed model → traced Functional


def graph_of(model: keras.Model) -> Graph:
    """The model's calls in topological order; GraphProblem when it cannot be walked."""
    calls: list[Call] = []
    start, end = _walk(model, calls)
    return Graph(start, end, tuple(calls))


def graph_problem(model: keras.Model) -> str | None:
    try:
        graph_of(model)
    except GraphProblem as problem:
        return str(problem)
    return None


def as_functional(model: keras.Model) -> keras.Model:
    """A model with `inputs`, `outputs` and `layers` over the same layer objects: a subclassed model's
    traced Functional, any other model itself (also when the trace fails)."""
    if _is_graph_model(model):
        return model
    try:
        return _traced(model)
    except GraphProblem:
        return model


def _is_graph_model(model) -> bool:
    """A Sequential or Functional model whose `call` is Keras's own (a subclass may replace it)."""
    owner = next(cls for cls in type(model).__mro__ if "call" in vars(cls))
    return owner.__module__.startswith("keras.") and owner.__name__ in ("Sequential", "Functional")


def _walk(model, calls: list[Call]) -> tuple[Hashable, Hashable]:
    """Append `model`'s calls to `calls`; (key of its input, key of its output)."""
    if isinstance(model, keras.Sequential) and _is_graph_model(model):
        key = start = ("input", id(model))
        for i, layer in enumerate(model.layers):
            out = ("output", id(model), i)
            _append(layer, None, (key,), (out,), calls)
            key = out
        return start, key
    functional = model if _is_graph_model(model) else _traced(model)
    if len(functional.inputs) != 1 or len(functional.outputs) != 1:
        raise GraphProblem(f"{type(model).__name__} model {model.name!r} with several inputs or outputs")
    for depth in sorted(functional._nodes_by_depth, reverse=True):
        for node in functional._nodes_by_depth[depth]:
            if node.is_input or node.operation is None:
                continue
            _append(node.operation, node.arguments, tuple(map(id, node.input_tensors)),
                    tuple(map(id, node.outputs)), calls)
    return id(functional.inputs[0]), id(functional.outputs[0])


def _append(op, arguments, inputs, outputs, calls: list[Call]) -> None:
    """A call, or an inner model's calls between two identities when `op` is a model."""
    if not isinstance(op, keras.Model):
        calls.append(Call(op, arguments, inputs, outputs))
        return
    if len(inputs) != 1 or len(outputs) != 1:
        raise GraphProblem(f"{type(op).__name__} model {op.name!r} called on several inputs or outputs")
    inner = len(calls)
    start, end = _walk(op, calls)
    calls.insert(inner, Call(None, None, inputs, (start,)))
    calls.append(Call(None, None, (end,), outputs))


def _traced(model: keras.Model) -> keras.Model:
    """The Functional model of a subclassed model's `call`, traced once and kept while the model lives."""
    traced = _TRACES.get(model)
    if traced is not None:
        return traced
    shapes = getattr(model, "_build_shapes_dict", None) or {}
    if len(shapes) != 1:
        raise GraphProblem(f"{type(model).__name__} model {model.name!r} (a subclassed model is traced "
                           "from the input shape of its first call: call it once on one input)")
    shape = next(iter(shapes.values()))
    symbolic = keras.Input(batch_shape=(None, *tuple(shape)[1:]))
    kwargs = {"training": True} if getattr(model, "_call_has_training_arg", False) else {}
    try:
        out = model.call(symbolic, **kwargs)
        traced = keras.Model(symbolic, out, name=f"{model.name}_graph")
    except Exception as exc:  # tf ops on symbolic tensors, Python branches on values, several outputs …
        raise GraphProblem(f"{type(model).__name__} model {model.name!r} (its call could not be traced on "
                           f"a symbolic input: {type(exc).__name__})") from None
    _TRACES[model] = traced
    return traced
