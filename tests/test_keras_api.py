"""keras_api.DPModel against independent references: the CLI trainer (same config and key), a per-example
GradientTape loop plus the noise regenerated from the key, dp-accounting called directly; the docs example
runs; bad arguments are one-line ConfigErrors."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import dp_accounting
import keras
import numpy as np
import pandas as pd
import pytest
import tensorflow as tf
from dp_accounting import pld, rdp

from dpsgd_cli.config import load_config
from dpsgd_cli.errors import ConfigError
from dpsgd_cli.keras_api import DPModel
from dpsgd_cli.privacy.plan import plan_privacy
from dpsgd_cli.privacy.run_key import load_run_key, new_run_key, save_run_key
from dpsgd_cli.training import engine
from dpsgd_cli.training.data import load_dataset
from dpsgd_cli.training.model import model_from_config
from dpsgd_cli.training.trainer import Trainer

DOCS = Path(__file__).resolve().parent.parent / "docs" / "keras.md"  # "Migrating from TensorFlow Privacy"


def _weights(model) -> np.ndarray:
    return np.concatenate([v.numpy().ravel() for v in model.trainable_variables])


def _small_model(seed: int = 0, extra: keras.layers.Layer | None = None, inputs: int = 6, classes: int = 3):
    keras.utils.set_random_seed(seed)
    layers = [keras.Input((inputs,)), keras.layers.Dense(8, activation="tanh")]
    if extra is not None:
        layers.append(extra)
    return keras.Sequential([*layers, keras.layers.Dense(classes)])


def _sparse_ce():
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


@pytest.mark.slow
@pytest.mark.parametrize("sampling,microbatches", [("poisson", None), ("shuffle", 16)])
def test_fit_equals_the_cli_trainer_with_the_same_config_and_key(data_dir, sampling, microbatches):
    """One epoch (10 Poisson steps, or 9 shuffled batches) of the tutorial CNN on 600 Fashion-MNIST
    images: DPModel.fit and the CLI's Trainer, same config and reproducible key, end with the same
    weights and the same ε."""
    cfg = load_config(None, [f"data.data_dir={data_dir}", "data.train_size=600", "data.test_size=100",
                             "data.batch_size=64", f"data.sampling={sampling}", "training.epochs=1",
                             "training.optimizer=momentum", "training.learning_rate=0.05",
                             "privacy.noise_multiplier=1.1", "privacy.l2_norm_clip=0.8",
                             f"privacy.num_microbatches={'null' if microbatches is None else microbatches}",
                             "privacy.reproducible=true", "seed=3"])
    data = load_dataset("fashion_mnist", data_dir, 600, 100)
    key = new_run_key(reproducible=True, seed=cfg.seed)
    trainer = Trainer(cfg, data, plan_privacy(cfg, 600), key)
    train_stats = trainer.train_epoch(1, None)

    model = model_from_config(cfg.model, cfg.seed)
    dp_model = DPModel(model, l2_norm_clip=0.8, noise_multiplier=1.1, num_microbatches=microbatches,
                       sampling=sampling, run_key=key, log_train_metrics=True)
    dp_model.compile(optimizer=engine.make_optimizer("momentum", 0.05, 0.9), loss=_sparse_ce(),
                     metrics=["accuracy"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        history = dp_model.fit(data.x_train, data.y_train, epochs=1, batch_size=64, verbose=0)

    assert dp_model.gradient_path == trainer.gradient_path == "fast"
    assert dp_model.steps_done == trainer.steps_done == {"poisson": 10, "shuffle": 9}[sampling]
    np.testing.assert_allclose(_weights(model), _weights(trainer.model), rtol=1e-5, atol=1e-6)
    assert not np.allclose(_weights(model), _weights(model_from_config(cfg.model, cfg.seed)))  # it trained
    # Keras' metrics count the real examples only, as the trainer's running statistics do
    assert history.history["accuracy"][-1] == pytest.approx(train_stats["train_accuracy"], rel=1e-6)
    assert history.history["loss"][-1] == pytest.approx(train_stats["train_loss"], rel=1e-6)
    facts = trainer.facts()
    assert history.history["epsilon_pld"][-1] == pytest.approx(facts.epsilon_pld, rel=1e-12)
    assert history.history["epsilon_rdp"][-1] == pytest.approx(facts.epsilon_rdp, rel=1e-12)


@pytest.mark.slow
def test_unsupported_layer_trains_through_vectorized_map_and_equals_a_tape_loop():
    """A UnitNormalization layer (no fast rule) keeps the model off the fast path: fit says so once and uses
    tf.vectorized_map. With q = 1 (every example in the one step) and SGD at rate 1, the update must be
    (Σ_i clip(g_i) from a GradientTape loop + the noise regenerated from the key) / B."""
    n, sigma = 16, 0.7
    rng = np.random.default_rng(1)
    x = rng.normal(size=(n, 6)).astype(np.float32)
    y = rng.integers(0, 3, size=n).astype(np.int32)
    model = _small_model(seed=2, extra=keras.layers.UnitNormalization())
    before = [v.numpy() for v in model.trainable_variables]

    per_example = []
    for i in range(n):
        with tf.GradientTape() as tape:
            loss = _sparse_ce()(y[i:i + 1], model(x[i:i + 1], training=True))
        per_example.append([g.numpy() for g in tape.gradient(loss, model.trainable_variables)])
    norms = [np.sqrt(sum((g.astype(np.float64) ** 2).sum() for g in grads)) for grads in per_example]
    clip = float(np.median(norms))  # half the examples are clipped
    loop_sum = [sum(grads[j] * min(1.0, clip / norm) for grads, norm in zip(per_example, norms))
                for j in range(len(before))]

    key = new_run_key(reproducible=True, seed=5, label="vmap-test")
    dp_model = DPModel(model, l2_norm_clip=clip, noise_multiplier=sigma, run_key=key)
    dp_model.compile(optimizer=keras.optimizers.SGD(1.0), loss=_sparse_ce())
    with pytest.warns(UserWarning, match="vectorized_map.*UnitNormalization") as caught:
        dp_model.fit(x, y, epochs=2, batch_size=n, verbose=0)
    assert sum("vectorized_map" in str(w.message) for w in caught) == 1  # said once, not per epoch
    assert dp_model.gradient_path == "vectorized_map" and dp_model.steps_done == 2

    # replay the first step on a fresh copy, from the reference sum and the key's noise
    noise = engine.gaussian_noise(model.trainable_variables, sigma * clip, key.noise_seed(0))
    expected = [w - (s + z.numpy()) / n for w, s, z in zip(before, loop_sum, noise)]
    again = _small_model(seed=2, extra=keras.layers.UnitNormalization())
    dp_again = DPModel(again, l2_norm_clip=clip, noise_multiplier=sigma, run_key=key)
    dp_again.compile(optimizer=keras.optimizers.SGD(1.0), loss=_sparse_ce())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dp_again.fit(x, y, epochs=1, batch_size=n, verbose=0)
    for got, want in zip(again.trainable_variables, expected):
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-6)
    without_noise = [w - s / n for w, s in zip(before, loop_sum)]
    assert not all(np.allclose(g.numpy(), w, atol=1e-3) for g, w in zip(again.trainable_variables,
                                                                         without_noise))


def _library_epsilon(sigma: float, q: float, steps: int, delta: float, accountant: str) -> float:
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps)
    acc = rdp.RdpAccountant() if accountant == "rdp" else pld.PLDAccountant()
    return float(acc.compose(event).get_epsilon(delta))


@pytest.mark.slow
def test_epsilon_in_the_epoch_logs_equals_dp_accounting_and_reaches_csv_logger(tmp_path):
    n, b, sigma, delta = 300, 30, 1.0, 1e-5
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(n, 6)).astype(np.float32), rng.integers(0, 3, size=n)
    dp_model = DPModel(_small_model(), l2_norm_clip=1.0, noise_multiplier=sigma, delta=delta)
    dp_model.compile(optimizer="adam", loss=_sparse_ce(), metrics=["accuracy"])
    csv = tmp_path / "log.csv"
    history = dp_model.fit(x, y, epochs=2, batch_size=b, verbose=0,
                           callbacks=[keras.callbacks.CSVLogger(csv)])
    assert dp_model.steps_done == 20
    for accountant in ("rdp", "pld"):
        logged = history.history[f"epsilon_{accountant}"]
        expected = [_library_epsilon(sigma, b / n, steps, delta, accountant) for steps in (10, 20)]
        np.testing.assert_allclose(logged, expected, rtol=1e-6)
        np.testing.assert_allclose(pd.read_csv(csv)[f"epsilon_{accountant}"], expected, rtol=1e-6)
    assert not {"loss", "accuracy"} & set(history.history)  # un-noised: not in the logs by default
    statement = dp_model.privacy_statement()
    assert "for 20 steps" in statement and "q = 0.1" in statement and "secret 128-bit key" in statement
    assert "memory of the Python process" in statement and "held only these and ε" in statement


@pytest.mark.slow
def test_target_epsilon_stops_before_the_epoch_that_would_exceed_it():
    n, b, sigma, delta = 300, 30, 1.0, 1e-5
    after_one, after_two = (_library_epsilon(sigma, b / n, s, delta, "pld") for s in (10, 20))
    target = (after_one + after_two) / 2
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(n, 6)).astype(np.float32), rng.integers(0, 3, size=n)
    dp_model = DPModel(_small_model(), l2_norm_clip=1.0, noise_multiplier=sigma, delta=delta,
                       target_epsilon=target)
    dp_model.compile(optimizer="sgd", loss=_sparse_ce())
    with pytest.warns(UserWarning, match="stopped before epoch 2"):
        history = dp_model.fit(x, y, epochs=5, batch_size=b, verbose=0)
    assert len(history.history["epsilon_pld"]) == 1 and dp_model.steps_done == 10
    assert dp_model.epsilon("pld") == pytest.approx(after_one, rel=1e-6) and after_one <= target
    with pytest.warns(UserWarning, match="stopped before epoch 2"):  # a second fit takes no step either
        dp_model.fit(x, y, epochs=1, batch_size=b, verbose=0)
    assert dp_model.steps_done == 10


@pytest.mark.slow
def test_a_tf_data_dataset_is_materialized_and_sampled_like_the_arrays():
    n, b = 120, 20
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(n, 6)).astype(np.float32), rng.integers(0, 3, size=n).astype(np.int32)
    key = new_run_key(reproducible=True, seed=1, label="dataset")
    results = []
    for source in ("arrays", "dataset"):
        model = _small_model(seed=7)
        dp_model = DPModel(model, l2_norm_clip=1.0, noise_multiplier=1.0, run_key=key)
        dp_model.compile(optimizer="sgd", loss=_sparse_ce())
        if source == "arrays":
            dp_model.fit(x, y, epochs=1, batch_size=b, verbose=0)
        else:
            with pytest.warns(UserWarning, match="materialized .* 120 examples.*batching is ignored"):
                dp_model.fit(tf.data.Dataset.from_tensor_slices((x, y)).batch(b), epochs=1, verbose=0)
        results.append(_weights(model))
    np.testing.assert_allclose(results[0], results[1], rtol=1e-6, atol=1e-7)


def test_default_key_is_secret_and_two_models_draw_different_noise():
    a = DPModel(_small_model(), l2_norm_clip=1.0, noise_multiplier=1.0)
    b = DPModel(_small_model(), l2_norm_clip=1.0, noise_multiplier=1.0)
    assert a._run_key.mode == "secret" and not np.array_equal(a._run_key.noise_seed(0),
                                                              b._run_key.noise_seed(0))
    c = DPModel(_small_model(), l2_norm_clip=1.0, noise_multiplier=1.0, reproducible_seed=4)
    d = DPModel(_small_model(), l2_norm_clip=1.0, noise_multiplier=1.0, reproducible_seed=4)
    assert c._run_key.mode == "reproducible" and c._run_key == d._run_key


@pytest.mark.parametrize("kwargs,message", [
    (dict(l2_norm_clip=0.0), "l2_norm_clip"),
    (dict(noise_multiplier=-1.0), "noise_multiplier"),
    (dict(sampling="random"), "sampling"),
    (dict(delta=1.0), "delta"),
    (dict(gradient_path="fastest"), "gradient_path"),
])
def test_bad_arguments_are_one_line_config_errors(kwargs, message):
    args = dict(l2_norm_clip=1.0, noise_multiplier=1.0) | kwargs
    with pytest.raises(ConfigError, match=message) as info:
        DPModel(_small_model(), **args)
    assert "\n" not in str(info.value)


def test_batch_normalization_is_refused_with_the_reason():
    model = _small_model(extra=keras.layers.BatchNormalization(name="bn"))
    with pytest.raises(ConfigError, match="'bn' is BatchNormalization.*statistics of the whole batch.*"
                                          "GroupNormalization"):
        DPModel(model, l2_norm_clip=1.0, noise_multiplier=1.0)


def test_microbatches_need_shuffle_and_fit_needs_compile():
    x, y = np.zeros((40, 6), np.float32), np.zeros(40, np.int32)
    dp_model = DPModel(_small_model(), l2_norm_clip=1.0, noise_multiplier=1.0, num_microbatches=5)
    with pytest.raises(ConfigError, match="compile"):
        dp_model.fit(x, y, batch_size=10)
    dp_model.compile(optimizer="sgd", loss=_sparse_ce())
    with pytest.raises(ConfigError, match="sampling='shuffle'"):
        dp_model.fit(x, y, batch_size=10)
    with pytest.raises(ConfigError, match="validation_split"):
        dp_model.fit(x, y, batch_size=10, validation_split=0.1)
    with pytest.raises(ConfigError, match="only through fit"):  # no way around the clipping and noise
        dp_model.train_on_batch(x[:10], y[:10])


def _docs_example() -> str:
    text = DOCS.read_text(encoding="utf-8")
    block = re.search(r"## Migrating from TensorFlow Privacy.*?```python\n(.*?)```", text, re.S).group(1)
    assert "EPOCHS = 60\n" in block and "TRAIN_SIZE = None" in block
    return block


@pytest.mark.slow
def test_docs_example_runs(data_dir, monkeypatch, capsys):
    """docs/keras.md's "Migrating from TensorFlow Privacy" example, as written, on 2000 images, one epoch."""
    monkeypatch.setenv("DPSGD_DATA_DIR", data_dir)
    code = _docs_example().replace("EPOCHS = 60\n", "EPOCHS = 1\n").replace("TRAIN_SIZE = None",
                                                                              "TRAIN_SIZE = 2000")
    namespace: dict = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exec(compile(code, str(DOCS), "exec"), namespace)
    dp_model = namespace["dp_model"]
    history = dp_model.history.history
    assert dp_model.steps_done == 8 and dp_model.gradient_path == "fast"
    assert 0 < history["epsilon_pld"][-1] < history["epsilon_rdp"][-1] < 10
    assert 0.0 <= history["val_accuracy"][-1] <= 1.0
    out = capsys.readouterr().out
    assert "-DP by the PLD accountant" in out and "q = 0.125" in out


@pytest.mark.slow
def test_a_text_model_with_an_embedding_fits_on_the_fast_path():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 30, (96, 12)).astype(np.int32)
    y = (x[:, 0] % 3).astype(np.int32)
    model = keras.Sequential([keras.Input((12,), dtype="int32"), keras.layers.Embedding(30, 8),
                              keras.layers.GlobalAveragePooling1D(), keras.layers.Dense(3)])
    dp_model = DPModel(model, l2_norm_clip=1.0, noise_multiplier=1.0)
    dp_model.compile(optimizer=keras.optimizers.SGD(0.5), loss=_sparse_ce())
    before = model.get_weights()[0].copy()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dp_model.fit(x, y, epochs=1, batch_size=32, verbose=0)
    assert not [w for w in caught if "vectorized_map" in str(w.message)]
    assert dp_model.gradient_path == "fast" and dp_model.steps_done > 0
    assert not np.allclose(model.get_weights()[0], before)


def _residual_model(seed: int, extra: keras.layers.Layer | None = None) -> keras.Model:
    """A Functional model: Dense → (Dense → GroupNorm) added back → [extra] → Dense; a shared Dense too."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((6,))
    h = keras.layers.Dense(8, activation="tanh")(inputs)
    shared = keras.layers.Dense(8, activation="tanh")
    r = keras.layers.GroupNormalization(2)(shared(shared(h)))
    h = keras.layers.Add()([h, r])
    if extra is not None:
        h = extra(h)
    return keras.Model(inputs, keras.layers.Dense(3)(h))


def test_a_functional_model_fits_on_the_fast_path_and_equals_a_tape_loop():
    """No "slower" warning: the fast path. With q = 1 and SGD at rate 1 the update is (Σ_i clip(g_i) from a
    GradientTape loop + the noise regenerated from the key) / B, as for the vectorized_map path above."""
    n, sigma = 16, 0.7
    rng = np.random.default_rng(3)
    x = rng.normal(size=(n, 6)).astype(np.float32)
    y = rng.integers(0, 3, size=n).astype(np.int32)
    model = _residual_model(seed=4)
    before = [v.numpy() for v in model.trainable_variables]
    per_example = []
    for i in range(n):
        with tf.GradientTape() as tape:
            loss = _sparse_ce()(y[i:i + 1], model(x[i:i + 1], training=True))
        per_example.append([g.numpy() for g in tape.gradient(loss, model.trainable_variables)])
    norms = [np.sqrt(sum((g.astype(np.float64) ** 2).sum() for g in grads)) for grads in per_example]
    clip = float(np.median(norms))
    loop_sum = [sum(grads[j] * min(1.0, clip / norm) for grads, norm in zip(per_example, norms))
                for j in range(len(before))]

    key = new_run_key(reproducible=True, seed=6, label="functional-test")
    dp_model = DPModel(model, l2_norm_clip=clip, noise_multiplier=sigma, run_key=key)
    dp_model.compile(optimizer=keras.optimizers.SGD(1.0), loss=_sparse_ce())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dp_model.fit(x, y, epochs=1, batch_size=n, verbose=0)
    assert not [w for w in caught if "slower" in str(w.message) or "vectorized_map" in str(w.message)]
    assert dp_model.gradient_path == "fast" and dp_model.steps_done == 1
    noise = engine.gaussian_noise(model.trainable_variables, sigma * clip, key.noise_seed(0))
    for got, w, s, z in zip(model.trainable_variables, before, loop_sum, noise):
        np.testing.assert_allclose(got.numpy(), w - (s + z.numpy()) / n, rtol=1e-5, atol=1e-6)


class _LogKeys(keras.callbacks.Callback):
    """Records the keys of every log a callback is handed."""

    def __init__(self):
        super().__init__()
        self.seen: set[str] = set()

    def on_train_batch_end(self, batch, logs=None):
        self.seen |= set(logs or {})

    def on_epoch_end(self, epoch, logs=None):
        self.seen |= set(logs or {})

    def on_train_end(self, logs=None):
        self.seen |= set(logs or {})


@pytest.mark.slow
def test_callbacks_see_only_covered_values_unless_training_metrics_are_asked_for():
    """By default the fit logs (callbacks, History, progress bar) hold ε and validation metrics only: the
    training loss and metrics, computed on the private batches without noise, could otherwise drive early
    stopping or a learning-rate change, and the released weights would depend on them."""
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(64, 6)).astype(np.float32), rng.integers(0, 3, size=64).astype(np.int32)
    seen = {}
    for asked in (False, True):
        dp_model = DPModel(_small_model(seed=1), l2_norm_clip=1.0, noise_multiplier=1.0,
                           log_train_metrics=asked)
        dp_model.compile(optimizer="sgd", loss=_sparse_ce(), metrics=["accuracy"])
        keys = _LogKeys()
        history = dp_model.fit(x, y, epochs=2, batch_size=16, verbose=0, callbacks=[keys],
                               validation_data=(x[:16], y[:16]))
        seen[asked] = (keys.seen, set(history.history), dp_model.privacy_statement())
    logs, history_keys, statement = seen[False]
    assert logs == history_keys == {"epsilon_rdp", "epsilon_pld", "val_loss", "val_accuracy"}
    assert "log_train_metrics" not in statement
    logs, history_keys, statement = seen[True]
    assert {"loss", "accuracy", "nonfinite_units"} <= logs and {"loss", "accuracy"} <= history_keys
    for words in ("log_train_metrics=True", "not covered", "EarlyStopping", "ReduceLROnPlateau",
                  "restore_best_weights"):
        assert words in statement, words


@pytest.mark.slow
def test_one_overflowing_example_is_dropped_from_the_step_and_counted():
    """x[5] = 1e38 overflows float32 (its logits, loss and gradient are NaN). With q = 1 and SGD at
    rate 1, the update must be (Σ_{i≠5} clip(g_i) from a GradientTape loop + the key's noise) / B: the
    example is left out, nothing else changes, and `nonfinite_units` counts it."""
    n, sigma, clip = 16, 0.5, 0.1
    rng = np.random.default_rng(3)
    x = rng.normal(size=(n, 32)).astype(np.float32)
    x[5] = 1e38
    y = rng.integers(0, 3, size=n).astype(np.int32)

    def relu_model():
        keras.utils.set_random_seed(4)
        wide = keras.initializers.RandomNormal(stddev=1.0, seed=4)  # 1e38·Σw overflows to ±∞, then NaN
        return keras.Sequential([keras.Input((32,)), keras.layers.Dense(8, "relu", kernel_initializer=wide),
                                 keras.layers.Dense(3)])

    model = relu_model()
    before = [v.numpy() for v in model.trainable_variables]
    loop_sum = [np.zeros_like(w, dtype=np.float64) for w in before]
    for i in range(n):
        with tf.GradientTape() as tape:
            loss = _sparse_ce()(y[i:i + 1], model(x[i:i + 1], training=True))
        grads = [g.numpy() for g in tape.gradient(loss, model.trainable_variables)]
        if i == 5:  # the example really overflows: its squared norm is not a float32 number
            with np.errstate(over="ignore", invalid="ignore"):
                assert not np.isfinite(sum(np.square(g).sum(dtype=np.float32) for g in grads))
            continue
        grads = [g.astype(np.float64) for g in grads]
        norm = np.sqrt(sum((g ** 2).sum() for g in grads))
        loop_sum = [s + g * min(1.0, clip / norm) for s, g in zip(loop_sum, grads)]
    key = new_run_key(reproducible=True, seed=6, label="overflow")
    dp_model = DPModel(model, l2_norm_clip=clip, noise_multiplier=sigma, run_key=key)
    dp_model.compile(optimizer=keras.optimizers.SGD(1.0), loss=_sparse_ce())
    dp_model.fit(x, y, epochs=1, batch_size=n, verbose=0)
    assert dp_model.nonfinite_units == 1
    noise = engine.gaussian_noise(model.trainable_variables, sigma * clip, key.noise_seed(0))
    for got, w, s, z in zip(model.trainable_variables, before, loop_sum, noise):
        np.testing.assert_allclose(got.numpy(), w - (s + z.numpy()) / n, rtol=1e-5, atol=1e-6)


def test_an_unsupported_functional_model_says_so_once_and_uses_vectorized_map():
    model = _residual_model(seed=5, extra=keras.layers.UnitNormalization(name="unit"))
    dp_model = DPModel(model, l2_norm_clip=1.0, noise_multiplier=1.0)
    dp_model.compile(optimizer=keras.optimizers.SGD(0.1), loss=_sparse_ce())
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(32, 6)).astype(np.float32), rng.integers(0, 3, 32).astype(np.int32)
    with pytest.warns(UserWarning, match=r"vectorized_map \(slower\).*UnitNormalization layer 'unit'"):
        dp_model.fit(x, y, epochs=1, batch_size=16, verbose=0)
    assert dp_model.gradient_path == "vectorized_map"


def test_a_subclassed_model_with_a_static_graph_fits_on_the_fast_path():
    class Residual(keras.Model):
        def __init__(self):
            super().__init__()
            self.a, self.b = keras.layers.Dense(8, activation="tanh"), keras.layers.Dense(8)
            self.logits = keras.layers.Dense(3)

        def call(self, x, training=None):
            h = self.a(x)
            return self.logits(h + self.b(h))

    model = Residual()
    model(tf.zeros((1, 6)))
    before = _weights(model)
    dp_model = DPModel(model, l2_norm_clip=1.0, noise_multiplier=1.0)
    dp_model.compile(optimizer=keras.optimizers.SGD(0.1), loss=_sparse_ce())
    rng = np.random.default_rng(2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dp_model.fit(rng.normal(size=(32, 6)).astype(np.float32), rng.integers(0, 3, 32).astype(np.int32),
                     epochs=1, batch_size=16, verbose=0)
    assert not [w for w in caught if "vectorized_map" in str(w.message)]
    assert dp_model.gradient_path == "fast" and not np.allclose(_weights(model), before)


def test_a_key_a_run_directory_used_or_another_model_holds_is_refused(tmp_path):
    """Two trainings with one key share their noise and batches, while each statement says "secret": a
    run's run.key (or a secret key another DPModel already trains with) is refused, in one line."""
    save_run_key(new_run_key(reproducible=False, seed=0), tmp_path)
    used = load_run_key(tmp_path)
    with pytest.raises(ConfigError, match=r"run_key: .*run\.key.*already drew") as info:
        DPModel(_small_model(), l2_norm_clip=1.0, noise_multiplier=1.0, run_key=used)
    assert "\n" not in str(info.value) and used.material.hex() not in str(info.value)
    fresh = new_run_key(reproducible=False, seed=0)
    DPModel(_small_model(), l2_norm_clip=1.0, noise_multiplier=1.0, run_key=fresh)
    with pytest.raises(ConfigError, match="run_key: .*another DPModel"):
        DPModel(_small_model(), l2_norm_clip=1.0, noise_multiplier=1.0, run_key=fresh)
    # reproducible keys are the stated research opt-in: the same key twice is how a run is repeated
    seeded = new_run_key(reproducible=True, seed=3, label="twice")
    for _ in range(2):
        DPModel(_small_model(), l2_norm_clip=1.0, noise_multiplier=1.0, run_key=seeded)


def test_embedding_ids_outside_the_vocabulary_are_refused_before_training():
    """A clear one-line error before the first step, from dpsgd's own check (a GPU's gather would accept
    the ids silently; the CPU's error would come from inside the step)."""
    model = keras.Sequential([keras.Input((5,), dtype="int32"), keras.layers.Embedding(10, 4, name="words"),
                              keras.layers.GlobalAveragePooling1D(), keras.layers.Dense(3)])
    x = np.random.default_rng(0).integers(0, 10, (40, 5)).astype(np.int32)
    y = np.zeros(40, np.int32)
    for bad in (10, -1):
        x_bad = x.copy()
        x_bad[17, 2] = bad
        dp_model = DPModel(model, l2_norm_clip=1.0, noise_multiplier=1.0)
        dp_model.compile(optimizer="sgd", loss=_sparse_ce())
        with pytest.raises(ConfigError, match=rf"'words'.*\[0, 10\).*{bad}") as info:
            dp_model.fit(x_bad, y, batch_size=8, epochs=1, verbose=0)
        assert "\n" not in str(info.value) and dp_model.steps_done == 0
