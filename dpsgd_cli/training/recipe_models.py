"""The models of the best published DP-SGD recipes on (Fashion-)MNIST (Tramèr & Boneh 2021).

* `tanh_cnn`: the end-to-end CNN of Papernot et al. 2021 / Tramèr & Boneh 2021 on 28×28 pixels: Conv
  16@8×8 stride 2 (zero padding 2), MaxPool 2 stride 1, Conv 32@4×4 stride 2, MaxPool 2 stride 1, Dense 32,
  Dense 10, tanh throughout (the TF Privacy tutorial CNN up to the first padding: 2 instead of 'same').
* `scatter_linear`: ScatterNet features [7, 7, 81] → GroupNorm(27 groups, no affine) → Dense 10.
* `scatter_pointwise`: the features → GroupNorm(27, no affine) → Conv 64@1×1 (the same small layer at every
  position of the 7×7 grid, 5 248 weights) → Dense 10 on the 7×7×64 outputs; `activation` (tanh in the
  configs). 36 618 weights, fewer than `scatter_linear`'s 39 700, but no longer linear in the features.
* `scatter_cnn_16_32` / `scatter_cnn_32_64` / `scatter_cnn_64_128`: the features → GroupNorm(27, no affine)
  → Conv c1@3×3 stride 2 'same' → Conv c2@3×3 'same' → Dense 32 → Dense 10, tanh; the name gives (c1, c2).
  `scatter_cnn_16_32` has the widths of Tramèr & Boneh's ScatterNet CNN for (Fashion-)MNIST.

ScatterNet models take precomputed scattering features as input (`features.prepare`): the transform is
weightless and stays outside the gradient tape. GroupNorm without γ, β normalises each example by its own
statistics (no mixing across examples, unlike BatchNorm) and has no weights, so every model here is a
Sequential of Dense/Conv2D and weightless layers and takes fastgrad's per-example path. Weights are
initialised like PyTorch's defaults (uniform ±1/√fan_in), biases at zero; seeded by `seed`.
"""

from __future__ import annotations

import keras

from dpsgd_cli.training.scattering import ScatteringParams

NUM_CLASSES = 10
GROUPS = 27  # Tramèr & Boneh's GroupNorm groups over the 81 scattering channels
POINTWISE_WIDTH = 64  # channels of scatter_pointwise's 1×1 convolution
WIDTHS = {"scatter_cnn_16_32": (16, 32), "scatter_cnn_32_64": (32, 64), "scatter_cnn_64_128": (64, 128)}


def input_shape(architecture: str, image_shape: tuple[int, ...] = (28, 28, 1)) -> tuple[int, ...]:
    """The model's input: the ScatterNet features of 28×28×1 images, or the images themselves."""
    return ScatteringParams().output_shape if architecture.startswith("scatter") else tuple(image_shape)


def build_recipe_model(architecture: str, activation: str = "tanh", seed: int = 0,
                       group_norm: bool = True, image_shape: tuple[int, ...] = (28, 28, 1),
                       num_classes: int = NUM_CLASSES) -> keras.Model:
    """`tanh_cnn` is tanh whatever `activation` says; the ScatterNet CNNs use `activation`. `group_norm`
    false: a ScatterNet model without its GroupNorm (its features come normalised, `feature_norm`).
    `image_shape`: the images' shape (`tanh_cnn` takes any H×W×C; the ScatterNet models 28×28×1);
    `num_classes`: K logits."""

    def init(offset: int) -> keras.initializers.Initializer:
        return keras.initializers.VarianceScaling(1.0 / 3.0, "fan_in", "uniform", seed=seed * 100 + offset)

    def conv(filters, size, stride, padding, offset, name, act):
        return keras.layers.Conv2D(filters, size, strides=stride, padding=padding, activation=act,
                                   kernel_initializer=init(offset), name=name)

    def dense(units, offset, name, act=None):
        return keras.layers.Dense(units, activation=act, kernel_initializer=init(offset), name=name)

    layers: list = [keras.Input(shape=input_shape(architecture, image_shape))]
    norm = [_group_norm()] if group_norm else []
    if architecture == "tanh_cnn":
        layers += [keras.layers.ZeroPadding2D(2, name="pad1"), conv(16, 8, 2, "valid", 1, "conv1", "tanh"),
                   keras.layers.MaxPooling2D(2, strides=1, name="pool1"),
                   conv(32, 4, 2, "valid", 2, "conv2", "tanh"),
                   keras.layers.MaxPooling2D(2, strides=1, name="pool2"),
                   keras.layers.Flatten(name="flatten"),
                   dense(32, 3, "dense1", "tanh"), dense(num_classes, 4, "logits")]
    elif architecture == "scatter_linear":
        layers += [*norm, keras.layers.Flatten(name="flatten"), dense(num_classes, 1, "logits")]
    elif architecture == "scatter_pointwise":
        layers += [*norm, conv(POINTWISE_WIDTH, 1, 1, "same", 1, "conv1", activation),
                   keras.layers.Flatten(name="flatten"), dense(num_classes, 2, "logits")]
    elif architecture in WIDTHS:
        c1, c2 = WIDTHS[architecture]
        layers += [*norm, conv(c1, 3, 2, "same", 1, "conv1", activation),
                   conv(c2, 3, 1, "same", 2, "conv2", activation), keras.layers.Flatten(name="flatten"),
                   dense(32, 3, "dense1", activation), dense(num_classes, 4, "logits")]
    else:
        raise ValueError(f"unknown architecture {architecture!r}")
    return keras.Sequential(layers, name=architecture)


def _group_norm() -> keras.layers.Layer:
    return keras.layers.GroupNormalization(GROUPS, axis=-1, epsilon=1e-5, center=False, scale=False,
                                           name="group_norm")
