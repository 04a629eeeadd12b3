"""Apply a model's leading weightless normalization layers to the training set once, not at every step.

A ScatterNet model starts with a GroupNormalization without centre or scale: no weights, and each
example's output depends on that example alone. It is then a fixed transform of each example, like the
scattering features before it, so the trainer can apply it to the training set once (`apply`) and train
the rest of the model (`split`) on the result: the same variables, the same per-example gradients, the
same clipping and noise; one example still moves one row of the training set. On 2 CPU cores that layer
was about 60 % of the ScatterNet step at batch 8192 (forward 185 ms of 305 ms). The test split is folded
once too, for the per-epoch evaluation; every saved or exported model is the whole model (its variables
are the same), so nothing published changes.

Only layers that are per-example in training and in inference, and weightless, are folded:
GroupNormalization and LayerNormalization without centre and scale. BatchNormalization (batch
statistics), Dropout or augmentation layers (random in training) never are.
"""

from __future__ import annotations

from typing import Any

import numpy as np

FOLD_BATCH = 4096  # examples per forward pass when applying the folded layers


def foldable(layer: Any) -> bool:
    """A weightless layer whose output for one example depends on that example alone, in training and
    in inference alike."""
    import keras

    normalization = isinstance(layer, keras.layers.GroupNormalization | keras.layers.LayerNormalization)
    return normalization and not layer.weights


def split(model: Any) -> tuple[list[Any], Any]:
    """(the leading foldable layers, the model of the remaining layers sharing their variables). For a
    Sequential model with at least one foldable leading layer; otherwise ([], model)."""
    import keras

    if not isinstance(model, keras.Sequential):
        return [], model
    layers = list(model.layers)
    k = 0
    while k < len(layers) - 1 and foldable(layers[k]):
        k += 1
    if k == 0:
        return [], model
    rest = keras.Sequential([keras.Input(shape=layers[k - 1].output.shape[1:]), *layers[k:]],
                            name=f"{model.name}_after_{layers[k - 1].name}")
    return layers[:k], rest


def apply(layers: list[Any], x: np.ndarray) -> np.ndarray:
    """`layers` applied to `x` [N, *input] (or [N, K, *input]: K views per example), in float32, in
    batches of FOLD_BATCH; x unchanged when `layers` is empty."""
    if not layers:
        return x
    import tensorflow as tf

    @tf.function(autograph=False, reduce_retracing=True)
    def forward(batch):
        for layer in layers:
            batch = layer(batch, training=True)
        return batch

    input_rank = len(layers[0].input.shape) - 1
    lead = x.shape[: x.ndim - input_rank]
    flat = x.reshape(-1, *x.shape[x.ndim - input_rank:])
    # written chunk by chunk into one array: no list of chunks and no concatenated copy of them
    result = np.empty((len(flat), *layers[-1].output.shape[1:]), np.float32)
    for i in range(0, len(flat), FOLD_BATCH):
        result[i:i + FOLD_BATCH] = forward(tf.constant(flat[i:i + FOLD_BATCH])).numpy()
    return result.reshape(*lead, *result.shape[1:])
