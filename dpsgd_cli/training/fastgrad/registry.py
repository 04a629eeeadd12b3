"""Layer type → `LayerRule`: which layers the fast path handles, and how (`register` adds one)."""

from __future__ import annotations

import keras

from dpsgd_cli.training.fastgrad.base import LayerRule
from dpsgd_cli.training.fastgrad.conv import Conv2DRule
from dpsgd_cli.training.fastgrad.dense import DenseRule
from dpsgd_cli.training.fastgrad.depthwise import DepthwiseConv2DRule, SeparableConv2DRule
from dpsgd_cli.training.fastgrad.embedding import EmbeddingRule
from dpsgd_cli.training.fastgrad.merge import (
    ConcatenateRule,
    ElementwiseOpRule,
    MergeRule,
    elementwise_op_types,
)
from dpsgd_cli.training.fastgrad.normalization import NormRule
from dpsgd_cli.training.fastgrad.pooling import MaxPool2DRule

REGISTRY: dict[type, LayerRule] = {
    keras.layers.Dense: DenseRule(),
    keras.layers.Conv2D: Conv2DRule(),
    keras.layers.DepthwiseConv2D: DepthwiseConv2DRule(),
    keras.layers.SeparableConv2D: SeparableConv2DRule(),
    keras.layers.Embedding: EmbeddingRule(),
    keras.layers.MaxPooling2D: MaxPool2DRule(),
    keras.layers.GroupNormalization: NormRule(),
    keras.layers.LayerNormalization: NormRule(),
    **{layer_type: LayerRule() for layer_type in (
        keras.layers.AveragePooling2D, keras.layers.Flatten, keras.layers.Activation, keras.layers.ReLU,
        keras.layers.Rescaling,
        keras.layers.Reshape, keras.layers.Dropout, keras.layers.ZeroPadding2D,
        keras.layers.GlobalAveragePooling2D, keras.layers.GlobalMaxPooling2D,
        keras.layers.GlobalAveragePooling1D, keras.layers.GlobalMaxPooling1D)},
    **{layer_type: MergeRule() for layer_type in (
        keras.layers.Add, keras.layers.Subtract, keras.layers.Multiply, keras.layers.Average,
        keras.layers.Maximum, keras.layers.Minimum)},
    keras.layers.Concatenate: ConcatenateRule(),
    **{op_type: ElementwiseOpRule() for op_type in elementwise_op_types()},
}


def register(layer_type: type, rule: LayerRule) -> None:
    """Put `layer_type` on the fast path with `rule` (replacing any rule it had)."""
    REGISTRY[layer_type] = rule


def rule_for(layer) -> LayerRule | None:
    """The registered rule for `layer`'s type (or, for rules that allow it, a base type), else None."""
    for cls in type(layer).__mro__:
        rule = REGISTRY.get(cls)
        if rule is not None:
            return rule.for_layer(layer) if cls is type(layer) or rule.subclasses else None
    return None

