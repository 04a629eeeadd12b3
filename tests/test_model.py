from __future__ import annotations

import keras
import numpy as np
import pytest

from dpsgd_cli.training.model import build_model


def test_tutorial_cnn_shapes_and_no_batchnorm():
    model = build_model()
    assert model.output_shape == (None, 10)
    assert [type(layer).__name__ for layer in model.layers] == [
        "Conv2D", "MaxPooling2D", "Conv2D", "MaxPooling2D", "Flatten", "Dense", "Dense"]
    assert model.count_params() == 26010
    assert not any(isinstance(layer, keras.layers.BatchNormalization) for layer in model.layers)


def test_seed_fixes_initial_weights_and_activation_is_configurable():
    a, b, c = build_model(seed=1), build_model(seed=1), build_model(seed=2)
    np.testing.assert_array_equal(a.layers[0].kernel.numpy(), b.layers[0].kernel.numpy())
    assert not np.array_equal(a.layers[0].kernel.numpy(), c.layers[0].kernel.numpy())
    assert build_model(activation="tanh").layers[0].activation.__name__ == "tanh"
    with pytest.raises(ValueError, match="activation"):
        build_model(activation="gelu")
