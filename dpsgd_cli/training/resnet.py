"""A small residual network for 28×28×1 images, DP-friendly: GroupNorm (each example normalised by its own
statistics) instead of BatchNorm, a Functional Keras model that the fast per-example path walks as a graph.

`small_resnet` (a `model.builder`: "dpsgd_cli.training.resnet:small_resnet"):
stem Conv w@3×3 stride 2 'same' (28×28 → 14×14), then `blocks` pre-activation residual blocks
(GroupNorm → activation → Conv 3×3 → GroupNorm → activation → Conv 3×3, added to the block's input; the
second block doubles the channels and halves the grid with stride 2, its shortcut a 1×1 convolution of the
normalised input), GroupNorm → activation → global average pooling → Dense `num_classes` (logits).
With the defaults (w = 16, 3 blocks, 4 groups, relu): 14×14×16 → 7×7×32, 38 410 weights.
"""

from __future__ import annotations

import keras


def small_resnet(input_shape=(28, 28, 1), num_classes: int = 10, width: int = 16, blocks: int = 3,
                 groups: int = 4, activation: str = "relu") -> keras.Model:
    """The un-compiled model; initial weights follow Keras's global seed (`build_from_builder` sets it)."""
    inputs = keras.Input(shape=tuple(input_shape))
    h = keras.layers.Conv2D(width, 3, strides=2, padding="same", name="stem")(inputs)
    channels = width
    for i in range(blocks):
        downsample = i == 1
        h = _block(h, channels * 2 if downsample else channels, 2 if downsample else 1, groups, activation,
                   f"block{i + 1}")
        channels = channels * 2 if downsample else channels
    h = keras.layers.GroupNormalization(groups, name="head_norm")(h)
    h = keras.layers.Activation(activation, name="head_act")(h)
    h = keras.layers.GlobalAveragePooling2D(name="pool")(h)
    return keras.Model(inputs, keras.layers.Dense(num_classes, name="logits")(h), name="small_resnet")


def _block(h, filters: int, stride: int, groups: int, activation: str, name: str):
    """Pre-activation residual block (He et al. 2016's v2 ordering, GroupNorm for BatchNorm)."""
    y = keras.layers.GroupNormalization(groups, name=f"{name}_norm1")(h)
    y = keras.layers.Activation(activation, name=f"{name}_act1")(y)
    shortcut = h
    if stride != 1 or h.shape[-1] != filters:
        shortcut = keras.layers.Conv2D(filters, 1, strides=stride, name=f"{name}_project")(y)
    y = keras.layers.Conv2D(filters, 3, strides=stride, padding="same", name=f"{name}_conv1")(y)
    y = keras.layers.GroupNormalization(groups, name=f"{name}_norm2")(y)
    y = keras.layers.Activation(activation, name=f"{name}_act2")(y)
    y = keras.layers.Conv2D(filters, 3, padding="same", name=f"{name}_conv2")(y)
    return keras.layers.Add(name=f"{name}_add")([shortcut, y])
