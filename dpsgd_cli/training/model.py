"""The models `dpsgd train` trains: the CNN of TensorFlow Privacy's MNIST tutorial, built with Keras 3,
the recipes of `recipe_models`, a small MLP, or any Keras model returned by a builder function named in the
config (`model.builder`). Each is built for the data's input shape and number of classes; `check_fits`
says in one line when a built-in model cannot take the data.

No BatchNorm: it mixes statistics across the examples of a batch, so one example's
influence would not be confined to its own gradient and per-example clipping would not bound it.
`check_dp_model` refuses such layers in any model (builders and `keras_api` alike).
"""

from __future__ import annotations

import importlib
from typing import Any

import keras

from dpsgd_cli.config import ACTIVATIONS, ARCHITECTURES, PIXEL_ARCHITECTURES
from dpsgd_cli.errors import ConfigError
from dpsgd_cli.labels import NUM_CLASSES

INPUT_SHAPE = (28, 28, 1)  # the built-in datasets' images
MLP_WIDTH = 128  # hidden units of the built-in mlp


def build_model(architecture: str = "tfp_cnn", activation: str = "relu", seed: int = 0,
                group_norm: bool = True, input_shape: tuple[int, ...] = INPUT_SHAPE,
                num_classes: int = NUM_CLASSES) -> keras.Model:
    """Return the un-compiled model; outputs are logits over `num_classes` classes for inputs of
    `input_shape` (pixels in [0, 1] for the CNNs; the scatter_* recipes take 28×28×1 images only).

    tfp_cnn: Conv 16@8×8 stride 2 'same', MaxPool 2 stride 1, Conv 32@4×4 stride 2 'valid',
    MaxPool 2 stride 1, Flatten, Dense 32, Dense K. mlp: Flatten, Dense 128, Dense K. Initialisers are
    seeded by `seed`.
    """
    if architecture not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {architecture!r}; allowed: {', '.join(ARCHITECTURES)}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; allowed: {', '.join(ACTIVATIONS)}")
    if architecture not in ("tfp_cnn", "mlp"):  # the best published recipes
        from dpsgd_cli.training.recipe_models import build_recipe_model

        return build_recipe_model(architecture, activation, seed, group_norm=group_norm,
                                  image_shape=input_shape, num_classes=num_classes)

    def init(offset: int) -> keras.initializers.Initializer:
        return keras.initializers.GlorotUniform(seed=seed * 100 + offset)

    if architecture == "mlp":
        return keras.Sequential([
            keras.Input(shape=input_shape),
            keras.layers.Flatten(name="flatten"),
            keras.layers.Dense(MLP_WIDTH, activation=activation, kernel_initializer=init(1), name="dense1"),
            keras.layers.Dense(num_classes, kernel_initializer=init(2), name="logits"),
        ], name=architecture)
    return keras.Sequential(
        [
            keras.Input(shape=input_shape),
            keras.layers.Conv2D(16, 8, strides=2, padding="same", activation=activation,
                                kernel_initializer=init(1), name="conv1"),
            keras.layers.MaxPooling2D(2, strides=1, name="pool1"),
            keras.layers.Conv2D(32, 4, strides=2, padding="valid", activation=activation,
                                kernel_initializer=init(2), name="conv2"),
            keras.layers.MaxPooling2D(2, strides=1, name="pool2"),
            keras.layers.Flatten(name="flatten"),
            keras.layers.Dense(32, activation=activation, kernel_initializer=init(3), name="dense1"),
            keras.layers.Dense(num_classes, kernel_initializer=init(4), name="logits"),
        ],
        name=architecture,
    )


def input_standardization(mean: float, std: float) -> keras.layers.Rescaling:
    """x ↦ (x − mean) / std with fixed constants (`model.input_mean`, `model.input_std`), as Keras's own
    weightless `Rescaling` (scale 1/std, offset −mean/std): a function of each example alone, so it changes
    no sensitivity; registered as weightless in `fastgrad.REGISTRY`, so the fast path passes through it."""
    return keras.layers.Rescaling(1.0 / std, offset=-mean / std, name="input_standardization")


def model_from_config(model_cfg: Any, seed: int, input_shape: tuple[int, ...] = INPUT_SHAPE,
                      num_classes: int = NUM_CLASSES) -> keras.Model:
    """The un-compiled model of a config's `model` section for data of `input_shape` (one input, before
    any feature transform) and `num_classes` classes: `model.builder` if given, else the built-in
    `model.architecture`. Raises ConfigError (one line) for a builder that cannot be used or a built-in
    model that cannot take the data (`check_fits`)."""
    if not getattr(model_cfg, "builder", None):
        check_fits(model_cfg.architecture, input_shape)
        keras.utils.set_random_seed(seed)
        model = build_model(model_cfg.architecture, model_cfg.activation, seed=seed,
                            group_norm=getattr(model_cfg, "feature_norm", "group_norm") == "group_norm",
                            input_shape=input_shape, num_classes=num_classes)
        mean, std = getattr(model_cfg, "input_mean", 0.0), getattr(model_cfg, "input_std", 1.0)
        if (mean, std) != (0.0, 1.0):
            model = keras.Sequential([keras.Input(shape=input_shape), input_standardization(mean, std),
                                      *model.layers], name=model.name)
        return model
    return build_from_builder(model_cfg.builder, seed, input_shape, num_classes)


MIN_SIDE = {"tfp_cnn": 13, "tanh_cnn": 16}  # the smallest image side each CNN's layers leave ≥ 1×1


def check_fits(architecture: str | None, input_shape: tuple[int, ...], augmentation: str = "none") -> None:
    """ConfigError (one line) unless the built-in `architecture` (None: a builder's model, checked by
    calling it) and `data.augmentation` can take inputs of `input_shape`: the ScatterNet recipes need
    28×28×1 images (their features are of that size), the pixel CNNs images H×W×C of at least `MIN_SIDE`,
    mirror views images; mlp takes any shape."""
    shown = "×".join(map(str, input_shape))
    is_image = len(input_shape) == 3
    if augmentation != "none" and not is_image:
        raise ConfigError(f"data.augmentation: {augmentation} mirrors images, but the data's inputs are "
                          f"of shape {shown}, not images H×W×C; use data.augmentation: none")
    if architecture is None:
        return
    if architecture.startswith("scatter") and tuple(input_shape) != INPUT_SHAPE:
        raise ConfigError(f"model.architecture: {architecture} needs 28×28×1 grayscale images (its "
                          f"ScatterNet features are computed for that size); the data's inputs are "
                          f"{shown}; use tfp_cnn, tanh_cnn, mlp or a model.builder")
    if architecture in PIXEL_ARCHITECTURES:
        side = MIN_SIDE[architecture]
        if not is_image:
            raise ConfigError(f"model.architecture: {architecture} is a CNN for images H×W×C; the data's "
                              f"inputs are of shape {shown} (e.g. a CSV's features); use mlp or a "
                              "model.builder")
        if min(input_shape[:2]) < side:
            raise ConfigError(f"model.architecture: {architecture} needs images of at least {side}×{side}; "
                              f"the data's are {shown}; use mlp or a model.builder")


def load_builder(spec: str):
    """The function named by `spec` ("package.module:function"); ConfigError if it cannot be imported."""
    module_name, _, attr = spec.partition(":")
    where = f"model.builder: {spec!r}"
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # ImportError, or whatever the module raises while importing
        raise ConfigError(f"{where}: cannot import module {module_name!r} ({_one_line(exc)}); is it on "
                          "PYTHONPATH or installed?") from None
    fn = module
    for part in attr.split("."):
        fn = getattr(fn, part, None)
        if fn is None:
            raise ConfigError(f"{where}: module {module_name!r} has no attribute {attr!r}") from None
    if not callable(fn):
        raise ConfigError(f"{where}: {attr!r} is a {type(fn).__name__}, not a function")
    return fn


def build_from_builder(spec: str, seed: int, input_shape: tuple[int, ...] = INPUT_SHAPE,
                       num_classes: int = NUM_CLASSES) -> keras.Model:
    """Call the builder as `fn(input_shape=input_shape, num_classes=num_classes)` and check the model.

    Keras' layer-name counters are reset first (`keras.backend.clear_session`) so the variable names, which
    the checkpoint records, are the same in every process (a resumed run, a sweep's tenth point), and the
    global seed is set to `seed` (initial weights)."""
    fn = load_builder(spec)
    keras.backend.clear_session(free_memory=False)
    keras.utils.set_random_seed(seed)
    try:
        model = fn(input_shape=tuple(input_shape), num_classes=num_classes)
    except Exception as exc:
        raise ConfigError(f"model.builder: {spec!r} raised {_one_line(exc)}") from None
    check_dp_model(model, f"model.builder: {spec!r}", input_shape=tuple(input_shape), num_classes=num_classes)
    return model


def check_dp_model(model: Any, where: str, *, input_shape: tuple[int, ...] | None = None,
                   num_classes: int | None = None) -> None:
    """ConfigError unless `model` is a Keras model that DP-SGD can train: no layer mixing examples
    (BatchNormalization), and, when given, logits of `num_classes` classes for inputs of `input_shape`."""
    if not isinstance(model, keras.Model):
        raise ConfigError(f"{where}: returned {type(model).__name__} {str(model)[:40]!r}, not a Keras "
                          "model (keras.Model, e.g. keras.Sequential)")
    problem = batch_mixing_layer(model)
    if problem:
        raise ConfigError(f"{where}: {problem}")
    if input_shape is None:
        return
    try:
        out = model(keras.ops.zeros((2, *input_shape)), training=False)
    except Exception as exc:
        raise ConfigError(f"{where}: the model does not accept inputs of shape {input_shape} "
                          f"({_one_line(exc)})") from None
    if tuple(out.shape) != (2, num_classes):
        raise ConfigError(f"{where}: the model's output has shape {tuple(out.shape)[1:]} per example; "
                          f"expected ({num_classes},), the logits of {num_classes} classes")
    last = model.layers[-1] if getattr(model, "layers", None) else None
    if getattr(last, "activation", None) is keras.activations.softmax:
        raise ConfigError(f"{where}: the last layer applies softmax; return logits (no activation on the "
                          "last layer): the loss is softmax cross-entropy from logits")


def check_embedding_ids(model: keras.Model, x: Any, where: str) -> None:
    """ConfigError (one line) when an Embedding layer that reads the model's input directly would get an id
    outside [0, input_dim) from `x` (a numpy array of examples): checked before training, on any device
    (a GPU's gather returns zeros for such ids instead of failing; the fast path also drops their units)."""
    import numpy as np

    inputs = [id(t) for t in (getattr(model, "inputs", None) or [])]
    layers = list(getattr(model, "layers", None) or [])
    for i, layer in enumerate(layers):
        if not isinstance(layer, keras.layers.Embedding):
            continue
        try:
            reads_input = (i == 0 and isinstance(model, keras.Sequential)) or id(layer.input) in inputs
        except (AttributeError, ValueError):  # a layer called more than once has no single input
            reads_input = False
        if not reads_input or not len(x):
            continue
        ids = np.asarray(x)
        low, high, vocab = ids.min(), ids.max(), layer.input_dim
        if low < 0 or high >= vocab:
            bad = low if low < 0 else high
            raise ConfigError(f"{where}: Embedding layer {layer.name!r} takes ids in [0, {vocab}), but the "
                              f"data hold {bad:g}; map them into the vocabulary (e.g. an out-of-vocabulary "
                              "id) before training")


def batch_mixing_layer(model: keras.Model) -> str | None:
    """Why `model` breaks per-example clipping (a phrase), or None. BatchNormalization normalizes each
    example with statistics of the whole batch, so one example moves every other example's gradient and
    clipping each gradient no longer bounds its influence."""
    for layer in model._flatten_layers(include_self=False, recursive=True):
        if isinstance(layer, keras.layers.BatchNormalization):
            return (f"layer {layer.name!r} is BatchNormalization, which normalizes each example with "
                    "statistics of the whole batch, so one example changes every other example's "
                    "gradient and per-example clipping no longer bounds its influence; use "
                    "keras.layers.GroupNormalization (or LayerNormalization) instead")
    return None


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:160]}" if text else type(exc).__name__
