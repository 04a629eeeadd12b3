"""The models `dpsgd train` trains: the CNN of TensorFlow Privacy's MNIST tutorial, built with Keras 3,
or any Keras model returned by a builder function named in the config (`model.builder`).

No BatchNorm: it mixes statistics across the examples of a batch, so one example's
influence would not be confined to its own gradient and per-example clipping would not bound it.
`check_dp_model` refuses such layers in any model (builders and `keras_api` alike).
"""

from __future__ import annotations

import importlib
from typing import Any

import keras

from dpsgd_cli.config import ACTIVATIONS, ARCHITECTURES
from dpsgd_cli.errors import ConfigError
from dpsgd_cli.labels import NUM_CLASSES

INPUT_SHAPE = (28, 28, 1)


def build_model(architecture: str = "tfp_cnn", activation: str = "relu", seed: int = 0,
                group_norm: bool = True) -> keras.Model:
    """Return the un-compiled CNN; outputs are logits over 10 classes for 28×28×1 inputs in [0, 1].

    Layers: Conv 16@8×8 stride 2 'same', MaxPool 2 stride 1, Conv 32@4×4 stride 2 'valid',
    MaxPool 2 stride 1, Flatten, Dense 32, Dense 10. Initialisers are seeded by `seed`.
    """
    if architecture != "tfp_cnn" and architecture in ARCHITECTURES:  # the models of the published recipes
        from dpsgd_cli.training.recipe_models import build_recipe_model

        return build_recipe_model(architecture, activation, seed, group_norm=group_norm)
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


def input_standardization(mean: float, std: float) -> keras.layers.Rescaling:
    """x ↦ (x − mean) / std with fixed constants (`model.input_mean`, `model.input_std`), as Keras's own
    weightless `Rescaling` (scale 1/std, offset −mean/std): a function of each example alone, so it changes
    no sensitivity; registered as weightless in `fastgrad.REGISTRY`, so the fast path passes through it."""
    return keras.layers.Rescaling(1.0 / std, offset=-mean / std, name="input_standardization")


def model_from_config(model_cfg: Any, seed: int) -> keras.Model:
    """The un-compiled model of a config's `model` section: `model.builder` if given, else the built-in
    `model.architecture`. Raises ConfigError (one line) for a builder that cannot be used."""
    if not getattr(model_cfg, "builder", None):
        keras.utils.set_random_seed(seed)
        model = build_model(model_cfg.architecture, model_cfg.activation, seed=seed,
                            group_norm=getattr(model_cfg, "feature_norm", "group_norm") == "group_norm")
        mean, std = getattr(model_cfg, "input_mean", 0.0), getattr(model_cfg, "input_std", 1.0)
        if (mean, std) != (0.0, 1.0):
            model = keras.Sequential([keras.Input(shape=INPUT_SHAPE), input_standardization(mean, std),
                                      *model.layers], name=model.name)
        return model
    return build_from_builder(model_cfg.builder, seed)


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


def build_from_builder(spec: str, seed: int) -> keras.Model:
    """Call the builder as `fn(input_shape=INPUT_SHAPE, num_classes=NUM_CLASSES)` and check the model.

    Keras' layer-name counters are reset first (`keras.backend.clear_session`) so the variable names, which
    the checkpoint records, are the same in every process (a resumed run, a sweep's tenth point), and the
    global seed is set to `seed` (initial weights)."""
    fn = load_builder(spec)
    keras.backend.clear_session(free_memory=False)
    keras.utils.set_random_seed(seed)
    try:
        model = fn(input_shape=INPUT_SHAPE, num_classes=NUM_CLASSES)
    except Exception as exc:
        raise ConfigError(f"model.builder: {spec!r} raised {_one_line(exc)}") from None
    check_dp_model(model, f"model.builder: {spec!r}", input_shape=INPUT_SHAPE, num_classes=NUM_CLASSES)
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
