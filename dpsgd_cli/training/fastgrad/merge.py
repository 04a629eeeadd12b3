"""Fast-path rules of the weightless layers and operations that join branches of a graph: `Add`,
`Subtract`, `Multiply`, `Average`, `Maximum`, `Minimum`, `Concatenate` (not along the batch axis), and the
element-wise Keras operations a subclassed model's `call` makes of `x + y`, `x - y`, `x * y`,
`keras.ops.relu`, `keras.ops.sigmoid` and `keras.ops.tanh`. Each combines the values of one example
only, so the per-example terms of the layers around them stay each example's own."""

from __future__ import annotations

from dpsgd_cli.training.fastgrad.base import LayerRule


class MergeRule(LayerRule):
    """An element-wise merge layer: called as Keras calls it (the driver passes its list of inputs)."""


class ConcatenateRule(MergeRule):
    def problem(self, layer):
        inputs = layer.input if isinstance(layer.input, (list, tuple)) else [layer.input]
        if layer.axis % len(inputs[0].shape) == 0:
            return "concatenates across examples (axis 0)"
        return super().problem(layer)


class ElementwiseOpRule(LayerRule):
    """A weightless element-wise Keras operation (not a layer): the driver calls it on its arguments."""

    def problem(self, layer):
        return None


def elementwise_op_types() -> list[type]:
    """The operation classes Keras records for `x + y`, `x - y`, `x * y`, relu, sigmoid and tanh on symbolic
    tensors (from Keras's own modules; any missing in this Keras version is left out)."""
    from keras.src.ops import nn, numpy

    names = [(numpy, "Add"), (numpy, "Subtract"), (numpy, "Multiply"), (numpy, "Tanh"), (nn, "Relu"),
             (nn, "Sigmoid")]
    return [getattr(module, name) for module, name in names if hasattr(module, name)]
