"""A model's leading weightless per-example layers are applied to the training set once (`fold`): the step
on the rest of the model, fed the folded rows, gives the per-example gradient sums of the whole model (a
GradientTape loop over examples), and a run with folding trains the same weights as one without."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf
from test_recipe_models import _batch, _loop_reference

from dpsgd_cli.training import fastgrad, fold
from dpsgd_cli.training.model import build_model

SCATTER = ("scatter_linear", "scatter_pointwise", "scatter_cnn_16_32")


def test_only_leading_weightless_per_example_normalization_is_folded():
    model = build_model("scatter_pointwise", "tanh", seed=0)
    folded, rest = fold.split(model)
    assert [layer.name for layer in folded] == ["group_norm"]
    assert [v is w for v, w in zip(rest.trainable_variables, model.trainable_variables)] == [True] * 4
    assert len(rest.trainable_variables) == len(model.trainable_variables)
    for kept in (build_model("tfp_cnn", seed=0), build_model("tanh_cnn", seed=0)):
        assert fold.split(kept) == ([], kept)
    inputs = keras.Input((7, 7, 81))
    for first in (keras.layers.GroupNormalization(27),  # affine: γ and β are trained
                  keras.layers.BatchNormalization(),  # batch statistics
                  keras.layers.Dropout(0.5)):  # random in training
        model = keras.Sequential([inputs, first, keras.layers.Flatten(), keras.layers.Dense(10)])
        assert fold.split(model)[0] == []
    functional = keras.Model(inputs, keras.layers.Dense(10)(keras.layers.Flatten()(
        keras.layers.GroupNormalization(27, center=False, scale=False)(inputs))))
    assert fold.split(functional) == ([], functional)  # Sequential models only


@pytest.mark.parametrize("architecture", SCATTER)
def test_the_rest_on_folded_rows_equals_the_whole_model_per_example_loop(architecture):
    model = build_model(architecture, "tanh", seed=2)
    x, y, mask = _batch(architecture)
    clip, expected = _loop_reference(model, x, y, mask)
    folded, rest = fold.split(model)
    assert folded
    rows = tf.constant(fold.apply(folded, x.numpy()))
    sums, _, logits, _ = tf.function(lambda x, y, m: fastgrad.fast_clipped_gradient_sum(
        rest, x, y, m, clip))(rows, y, mask)
    for s, e, v in zip(sums, expected, model.trainable_variables):
        np.testing.assert_allclose(s, e, rtol=1e-4, atol=1e-6 * max(1.0, np.abs(e).max()), err_msg=v.path)
    np.testing.assert_allclose(logits, model(x), rtol=1e-4, atol=1e-5)


def test_apply_handles_views_and_batches(monkeypatch):
    monkeypatch.setattr(fold, "FOLD_BATCH", 5)  # several batches, the last one short
    model = build_model("scatter_linear", seed=0)
    folded, _ = fold.split(model)
    x = np.random.default_rng(1).random((6, 3, 7, 7, 81), dtype=np.float32)  # 6 examples × 3 views
    out = fold.apply(folded, x)
    assert out.shape == x.shape and out.dtype == np.float32
    for view in range(3):
        np.testing.assert_allclose(out[:, view], folded[0](x[:, view]).numpy(), rtol=1e-5, atol=1e-6)
    assert fold.apply([], x) is x


@pytest.mark.slow
def test_a_run_with_folding_trains_the_weights_of_a_run_without(data_dir, tmp_path, monkeypatch):
    from dpsgd_cli.config import load_config
    from dpsgd_cli.experiment import run as runner
    from dpsgd_cli.runs.run_dir import RunDir

    monkeypatch.setenv("DPSGD_CACHE_DIR", str(tmp_path / "cache"))
    weights, records = {}, {}
    for name, split in (("folded", fold.split), ("whole", lambda model: ([], model))):
        monkeypatch.setattr(fold, "split", split)
        cfg = load_config(None, [f"data.data_dir={data_dir}", "data.train_size=512", "data.test_size=100",
                                 "data.batch_size=128", "training.epochs=2", "training.learning_rate=4",
                                 "model.architecture=scatter_pointwise", "privacy.noise_multiplier=1.0",
                                 "privacy.l2_norm_clip=0.1", "privacy.reproducible=true",
                                 f"output_dir={tmp_path}", f"name={name}"])
        result = runner.run(cfg)
        plan = RunDir(result.run_dir).document()["resolved"]["plan"]
        assert plan.get("applied_once") == (["group_norm"] if name == "folded" else None)
        weights[name] = [w.copy() for w in _final_weights(result.run_dir, cfg)]
        records[name] = result.records
    for a, b in zip(weights["folded"], weights["whole"]):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5)
    for a, b in zip(records["folded"], records["whole"]):  # the test split evaluated through the fold too
        assert a["test_accuracy"] == pytest.approx(b["test_accuracy"], abs=1e-3)
        assert a["test_loss"] == pytest.approx(b["test_loss"], rel=1e-4)
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)


def _final_weights(run_dir, cfg):
    from dpsgd_cli.audit import membership

    return membership.load_model(membership.load_run(run_dir)).get_weights()
