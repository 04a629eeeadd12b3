"""The CNN of TensorFlow Privacy's MNIST tutorial, built with Keras 3.

No BatchNorm: it mixes statistics across the examples of a batch, so one example's
influence would not be confined to its own gradient and per-example clipping would not bound it.
"""

from __future__ import annotations

import keras

ARCHITECTURES = ("tfp_cnn", "tanh_cnn", "scatter_linear", "scatter_cnn", "scatter_cnn_wide")
ACTIVATIONS = ("relu", "tanh")
INPUT_SHAPE = (28, 28, 1)
NUM_CLASSES = 10


def build_model(architecture: str = "tfp_cnn", activation: str = "relu", seed: int = 0) -> keras.Model:
    """Return the un-compiled CNN; outputs are logits over 10 classes for 28×28×1 inputs in [0, 1].

    Layers: Conv 16@8×8 stride 2 'same', MaxPool 2 stride 1, Conv 32@4×4 stride 2 'valid',
    MaxPool 2 stride 1, Flatten, Dense 32, Dense 10. Initialisers are seeded by `seed`.
    """
    if architecture != "tfp_cnn" and architecture in ARCHITECTURES:  # issue 15: the best published recipes
        from dpsgd_cli.recipe_models import build_recipe_model

        return build_recipe_model(architecture, activation, seed)
    if architecture not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {architecture!r}; allowed: {', '.join(ARCHITECTURES)}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; allowed: {', '.join(ACTIVATIONS)}")

    def init(offset: int) -> keras.initializers.Initializer:
        return keras.initializers.GlorotUniform(seed=seed * 100 + offset)

    return keras.Sequential(
        [
            keras.Input(shape=INPUT_SHAPE),
            keras.layers.Conv2D(16, 8, strides=2, padding="same", activation=activation,
                                kernel_initializer=init(1), name="conv1"),
            keras.layers.MaxPooling2D(2, strides=1, name="pool1"),
            keras.layers.Conv2D(32, 4, strides=2, padding="valid", activation=activation,
                                kernel_initializer=init(2), name="conv2"),
            keras.layers.MaxPooling2D(2, strides=1, name="pool2"),
            keras.layers.Flatten(name="flatten"),
            keras.layers.Dense(32, activation=activation, kernel_initializer=init(3), name="dense1"),
            keras.layers.Dense(NUM_CLASSES, kernel_initializer=init(4), name="logits"),
        ],
        name=architecture,
    )
