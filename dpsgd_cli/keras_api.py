"""Bring your own Keras 3 model: DP-SGD through `compile` + `fit`, on the engine `dpsgd train` uses.

    from dpsgd_cli import DPModel

    dp_model = DPModel(model, l2_norm_clip=1.0, noise_multiplier=1.1)   # TF Privacy's names
    dp_model.compile(optimizer=keras.optimizers.SGD(0.15),
                     loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    history = dp_model.fit(x_train, y_train, epochs=60, batch_size=250, validation_data=(x_test, y_test))
    print(dp_model.privacy_statement())

Public names: `DPModel` (a `keras.Model` wrapping yours; its weights are your model's weights) and
`KEY_LOCATION` / `COVERAGE` (what its privacy statement says about the key and the covered outputs).

What `fit` does, and where each part lives (nothing here re-implements clipping, noise or accounting):
* batches: `sampling.Sampler`. Poisson sampling at q = batch_size / n by default (each example joins each
  step independently; fixed-capacity padded batches, nothing dropped), or shuffled fixed batches when
  `sampling="shuffle"` is asked for (then flagged: the Poisson ε is optimistic for shuffling). Keras'
  own `shuffle=` argument of `fit` is ignored. Data: arrays, or a finite `tf.data.Dataset` of (x, y)
  examples (batched or not), which is materialized to arrays (Poisson sampling needs random access).
* the step: `engine.make_train_step` — per-example (or per-microbatch, TF Privacy semantics) gradients of
  the compiled loss, clipped to `l2_norm_clip`, masked, summed, one N(0, (σC)²) draw keyed by the run key
  and the step, divided by the expected batch size (or the number of microbatches), then the compiled
  optimizer. The fast per-example path (`fastgrad`: Sequential, Functional and subclassed models with a
  static graph, docs/models.md) when every layer is supported, else `tf.vectorized_map` (a warning says
  so once).
* randomness: `run_key`. A fresh secret 128-bit key from OS entropy per DPModel, held only in memory; a
  reproducible key only when asked (`reproducible_seed=`), for research and tests. A key passed as
  `run_key=` is refused when a run directory's run.key holds it (that run drew its noise and batches from
  it) or, secret, when another DPModel of this process trains with it; the statement then names it as
  supplied by the caller.
* ε: `accounting.PrivacyLedger`, one step at a time as steps are taken; `epsilon_rdp` and `epsilon_pld`
  join the epoch logs (progress bar, History, CSVLogger, TensorBoard). `target_epsilon=` stops `fit`
  before an epoch whose steps would take ε past it. `privacy_statement()` says what ε assumes and covers.
* the logs that callbacks read (and History, the progress bar) hold only what ε covers: ε and the
  validation metrics (computed from the weights). `loss`, the compiled training metrics and
  `nonfinite_units` are computed on the private batches without noise; a callback acting on them
  (EarlyStopping, ReduceLROnPlateau, restore_best_weights) would make the released weights depend on
  them. They join the logs only with `DPModel(log_train_metrics=True)`, and the statement then says so.
* a unit whose gradient norm or loss is not finite is left out of its step (`engine.clipped_sum`) and
  counted in `nonfinite_units`.
"""

from __future__ import annotations

import hashlib
import math
import warnings
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from dpsgd_cli.errors import ConfigError, TrainingError
from dpsgd_cli.privacy import accounting
from dpsgd_cli.privacy.run_key import RunKey, new_run_key
from dpsgd_cli.privacy.sampling import SAMPLINGS, Sampler, steps_in_epoch
from dpsgd_cli.privacy.statement import PrivacyFacts, privacy_statement
from dpsgd_cli.training import engine, fastgrad, planner
from dpsgd_cli.training.graph_registry import released_custom_gradients
from dpsgd_cli.training.model import check_dp_model, check_embedding_ids
from dpsgd_cli.training.trainer import take_step

__all__ = ["COVERAGE", "KEY_LOCATION", "DPModel"]

KEY_LOCATION = "the memory of the Python process that trained the model, never written anywhere,"
COVERAGE = ("It covers the model weights after every epoch and at the end, and what is computed from them "
            "alone (validation loss and metrics); the fit logs that callbacks, History and the progress bar "
            "read held only these and ε.")
COVERAGE_WITH_TRAIN_METRICS = (
    "It covers the model weights after every epoch and at the end, and what is computed from them alone "
    "(validation loss and metrics). The fit logs also held the training loss, metrics and nonfinite_units "
    "(log_train_metrics=True): they are computed on the private batches without noise and are not covered; "
    "any decision a callback took on them — stopping early (EarlyStopping), changing the learning rate "
    "(ReduceLROnPlateau), or choosing which weights to keep (restore_best_weights, "
    "ModelCheckpoint(save_best_only=True)) — made the weights depend on them, and such weights are not "
    "covered either.")
_REPRODUCIBLE_LABEL = "dpsgd.keras_api"
_MAX_DATASET_BYTES = 4 * 2**30
_UNSUPPORTED_FIT_ARGS = {"validation_split": 0.0, "sample_weight": None, "class_weight": None,
                         "steps_per_epoch": None, "initial_epoch": 0}


class DPModel(keras.Model):
    """Your Keras model, trained by `fit` with DP-SGD. Compile it as usual (any Keras optimizer; any loss
    whose per-example values depend on that example only, e.g. `SparseCategoricalCrossentropy(
    from_logits=True)`; metrics), then `fit(x, y, epochs=, batch_size=, validation_data=, callbacks=)`;
    `privacy_statement()` then says what ε assumes and covers. Names follow TensorFlow Privacy.

    The wrapped model is `dp_model.model`; it shares its variables, so save or use either one.

    Args:
        model: an un-trained or pre-trained `keras.Model` whose outputs the loss reads (e.g. logits).
        l2_norm_clip: C, the L2 norm each example's (or microbatch's) gradient is clipped to.
        noise_multiplier: σ; the noise added to the clipped sum has std σ·C.
        num_microbatches: None = per-example clipping; M clips the mean gradient of each of M microbatches
            (TF Privacy's semantics, accounted with σ/2); M < batch_size needs `sampling="shuffle"`.
        delta: δ of the ε reported.
        sampling: "poisson" (each example joins each step with probability q = batch_size / n: what the
            analysis assumes) or "shuffle" (fixed shuffled batches; the Poisson ε is then optimistic).
        target_epsilon: stop `fit` before an epoch whose steps would take ε past it.
        target_accountant: "pld" or "rdp", the accountant `target_epsilon` is checked with.
        reproducible_seed: derive the key of the noise and the batches from this seed instead of OS
            entropy (research and tests: the ε then holds only while the seed stays secret).
        run_key: an explicit `run_key.RunKey` that no other training used — never a run directory's
            run.key (refused: it would replay that run's noise and batches); not with `reproducible_seed`.
        gradient_path: "auto", "fast" or "vectorized_map", as in the CLI config.
        jit_compile: "auto", True or False, as in the CLI config.
        log_train_metrics: put the training loss and metrics (computed on the private batches without
            noise) into the logs callbacks read; the statement then says they, and any weights a callback
            chose by them, are not covered. Default False: callbacks see validation metrics and ε only.
        name: the Keras name (default "dp_<model name>").

    Returns:
        A `keras.Model`; `fit` returns Keras' History with `epsilon_rdp` and `epsilon_pld` per epoch.

    Raises:
        ConfigError: an argument out of range, or a layer that mixes examples (e.g. BatchNormalization).
    """

    def __init__(self, model: keras.Model, *, l2_norm_clip: float, noise_multiplier: float,
                 num_microbatches: int | None = None, delta: float = 1e-5, sampling: str = "poisson",
                 target_epsilon: float | None = None, target_accountant: str = "pld",
                 reproducible_seed: int | None = None, run_key: RunKey | None = None,
                 gradient_path: str = "auto", jit_compile: Any = "auto", log_train_metrics: bool = False,
                 name: str | None = None):
        check_dp_model(model, "DPModel(model)")
        _check(0 < l2_norm_clip < math.inf, f"l2_norm_clip: must be > 0 and finite, got {l2_norm_clip}")
        _check(0 <= noise_multiplier < math.inf, f"noise_multiplier: must be ≥ 0, got {noise_multiplier}")
        _check(num_microbatches is None or num_microbatches >= 1,
               f"num_microbatches: must be ≥ 1 or None (per-example), got {num_microbatches}")
        _check(0 < delta < 1, f"delta: must be in (0, 1), got {delta}")
        _check(sampling in SAMPLINGS, f"sampling: must be one of {', '.join(SAMPLINGS)}, got {sampling!r}")
        _check(target_epsilon is None or 0 < target_epsilon, f"target_epsilon: must be > 0, got "
               f"{target_epsilon}")
        _check(target_accountant in accounting.ACCOUNTANTS, f"target_accountant: must be one of "
               f"{', '.join(accounting.ACCOUNTANTS)}, got {target_accountant!r}")
        _check(gradient_path in fastgrad.GRADIENT_PATHS, f"gradient_path: must be one of "
               f"{', '.join(fastgrad.GRADIENT_PATHS)}, got {gradient_path!r}")
        _check(jit_compile in ("auto", True, False), f"jit_compile: must be 'auto', True or False, got "
               f"{jit_compile!r}")
        _check(run_key is None or reproducible_seed is None, "give reproducible_seed or run_key, not both")
        super().__init__(name=name or f"dp_{model.name}")
        self.model = model
        self.built = model.built
        self.l2_norm_clip = float(l2_norm_clip)
        self.noise_multiplier = float(noise_multiplier)
        self.num_microbatches = num_microbatches
        self.delta = float(delta)
        self.sampling = sampling
        self.target_epsilon = target_epsilon
        self.target_accountant = target_accountant
        self.gradient_path_setting = gradient_path
        self.jit_compile_setting = jit_compile
        self.log_train_metrics = bool(log_train_metrics)
        self.nonfinite_units = 0  # units left out of their step for a non-finite gradient norm or loss
        self._reproducible_from = ("the seed passed as DPModel(reproducible_seed=…)"
                                   if reproducible_seed is not None else "the run_key given to DPModel")
        self._key_origin = None
        if run_key is None:
            run_key = new_run_key(reproducible=reproducible_seed is not None, seed=reproducible_seed or 0,
                                  label=_REPRODUCIBLE_LABEL)
        else:
            _claim(run_key)
            self._key_origin = "the run_key passed to DPModel" if run_key.mode == "secret" else None
        self._run_key = run_key
        self._plan: tuple[int, int, int] | None = None  # (n, batch_size, microbatch size) of the first fit
        self._step: tuple[Any, Any, list[Any]] | None = None  # (step_fn, chunk_fn, zeros), built by fit
        self.ledger: accounting.PrivacyLedger | None = None
        self.epochs_done = 0
        self.steps_done = 0
        self.gradient_path: str | None = None
        self.stopped_reason: str | None = None

    def call(self, inputs, training=None):
        return self.model(inputs, training=training)

    def train_step(self, data):
        raise ConfigError("DPModel trains only through fit(): Keras' train_step would skip the clipping, "
                          "the noise and the accounting")

    def train_on_batch(self, *args, **kwargs):
        raise ConfigError("DPModel trains only through fit(): train_on_batch would skip the clipping, the "
                          "noise and the accounting (and a batch you choose is not Poisson-sampled)")

    # ------------------------------------------------------------------------------------------------
    # fit

    def fit(self, x=None, y=None, batch_size=None, epochs=1, verbose="auto", callbacks=None,
            validation_data=None, shuffle=True, validation_freq=1, validation_batch_size=None, **kwargs):
        """Train with DP-SGD for `epochs` epochs (an epoch is ⌈n/batch_size⌉ Poisson steps, or ⌊n/batch_size⌋
        shuffled batches), continuing the step count, the key streams and ε of earlier `fit` calls.
        Returns the `History`. `shuffle` is ignored: sampling is the DPModel's `sampling`."""
        for arg, default in _UNSUPPORTED_FIT_ARGS.items():
            if arg in kwargs and kwargs.pop(arg) != default:
                raise ConfigError(f"fit({arg}=…) is not supported by DPModel (the batches are sampled for "
                                  "the privacy analysis); leave it at its default")
        if kwargs:
            raise TypeError(f"fit() got unexpected arguments: {', '.join(kwargs)}")
        if getattr(self, "optimizer", None) is None or getattr(self, "loss", None) is None:
            raise ConfigError("DPModel: call compile(optimizer=…, loss=…) before fit")
        x, y, batch_size = self._as_arrays(x, y, batch_size)
        n, b, _ = self._prepare(x, y, batch_size or 32)
        verbose = 1 if verbose == "auto" else int(verbose)
        first_steps = steps_in_epoch(self.epochs_done + 1, b, n, self.sampling)
        cbs = keras.callbacks.CallbackList(callbacks, add_history=True, add_progbar=verbose != 0,
                                           model=self, verbose=verbose, epochs=epochs, steps=first_steps)
        self.stop_training = False
        self.stopped_reason = None
        cbs.on_train_begin()
        # else TensorFlow's gradient registry keeps this fit's traced step alive after the model is gone
        with released_custom_gradients():
            logs: dict[str, float] = {}
            for epoch in range(epochs):
                steps = steps_in_epoch(self.epochs_done + 1, b, n, self.sampling)
                if self._would_exceed_target(steps):
                    break
                cbs.on_epoch_begin(epoch)
                train_logs = self._train_epoch(x, y, cbs)
                logs = dict(train_logs) if self.log_train_metrics else {}
                logs.update({f"epsilon_{a}": self.epsilon(a) for a in accounting.ACCOUNTANTS})
                if validation_data is not None and (epoch + 1) % validation_freq == 0:
                    logs.update({f"val_{k}": float(v) for k, v in self._validate(
                        validation_data, validation_batch_size).items()})
                cbs.on_epoch_end(epoch, logs)
                if self.stop_training:
                    break
            cbs.on_train_end(logs)
        return self.history

    def _train_epoch(self, x: np.ndarray, y: np.ndarray, cbs) -> dict[str, float]:
        """One epoch's steps; returns the training statistics (private: the logs get them only with
        `log_train_metrics`)."""
        (step_fn, chunk_fn, zeros), ledger = self._fitted()
        self.reset_metrics()
        self.epochs_done += 1
        loss_sum = count = dropped = 0.0
        logs: dict[str, float] = {}
        for i, batch in enumerate(self._sampler.epoch(self.epochs_done)):
            if batch.step != self.steps_done:
                raise RuntimeError(f"step numbering out of order ({batch.step} != {self.steps_done})")
            cbs.on_train_batch_begin(i)
            (step_loss, _, step_count, step_dropped), (logits, kept) = take_step(
                step_fn, chunk_fn, zeros, x, y, batch, self._run_key.noise_seed(batch.step))
            self._update_metrics(y[batch.chunks[0][0]], logits, kept)
            self.steps_done += 1
            ledger.advance(1)  # accounted as soon as taken
            self.nonfinite_units += int(step_dropped)
            if not math.isfinite(step_loss) or (step_count == 0 and step_dropped > 0):
                what = f"loss is {step_loss}" if not math.isfinite(step_loss) else \
                    "every example's gradient or loss was non-finite"
                raise TrainingError(f"{what} at step {batch.step + 1}: training diverged; lower the "
                                    "learning rate")
            loss_sum, count, dropped = loss_sum + step_loss, count + step_count, dropped + step_dropped
            logs = {"loss": loss_sum / max(count, 1.0), **self._metric_results(), "nonfinite_units": dropped}
            cbs.on_train_batch_end(i, logs if self.log_train_metrics else {})
        return logs

    def _metric_results(self) -> dict[str, float]:
        results = self.get_metrics_result()
        return {k: float(v) for k, v in results.items() if k != "loss"}

    def _validate(self, validation_data, batch_size) -> dict[str, Any]:
        if isinstance(validation_data, tf.data.Dataset):
            return self.evaluate(validation_data, verbose=0, return_dict=True)
        x_val, y_val = validation_data[:2]
        return self.evaluate(x_val, y_val, batch_size=batch_size or 256, verbose=0, return_dict=True)

    def _would_exceed_target(self, steps: int) -> bool:
        """True (and `stopped_reason` set, a warning given) when the next `steps` steps would take ε past
        `target_epsilon`."""
        if self.target_epsilon is None:
            return False
        _, ledger = self._fitted()
        ahead = ledger.epsilon(self.target_accountant, ledger.steps + steps)
        if ahead <= self.target_epsilon:
            return False
        self.stopped_reason = (
            f"stopped before epoch {self.epochs_done + 1}: its {steps} steps would bring ε "
            f"({self.target_accountant}) to {ahead:.4g} > target_epsilon {self.target_epsilon:g}; "
            f"ε after {ledger.steps} steps is {ledger.epsilon(self.target_accountant):.4g}")
        warnings.warn(self.stopped_reason, stacklevel=3)
        return True

    # ------------------------------------------------------------------------------------------------
    # privacy

    def epsilon(self, accountant: str = "pld") -> float:
        """ε spent so far by `accountant` ("rdp" or "pld") at `delta`; 0 before the first step."""
        return 0.0 if self.ledger is None else self.ledger.epsilon(accountant)

    def privacy_facts(self) -> PrivacyFacts:
        _, ledger = self._fitted()
        if self._plan is None:
            raise ConfigError("DPModel: no training yet; call fit first")
        n, b, k = self._plan
        return PrivacyFacts(
            noise_multiplier=self.noise_multiplier,
            accounting_noise_multiplier=ledger.noise_multiplier, l2_norm_clip=self.l2_norm_clip,
            sampling_rate=b / n, steps=ledger.steps, delta=self.delta, sampling=self.sampling,
            microbatch_size=k, epsilon_rdp=self.epsilon("rdp"), epsilon_pld=self.epsilon("pld"),
            source="run", randomness=self._run_key.mode, key_location=KEY_LOCATION,
            coverage=COVERAGE_WITH_TRAIN_METRICS if self.log_train_metrics else COVERAGE,
            reproducible_from=self._reproducible_from, key_origin=self._key_origin)

    def _fitted(self) -> tuple[tuple[Any, Any, list[Any]], accounting.PrivacyLedger]:
        """The compiled step and the privacy ledger that `fit` sets up; ConfigError before the first fit."""
        if self._step is None or self.ledger is None:
            raise ConfigError("DPModel: no training yet; call fit first")
        return self._step, self.ledger

    def privacy_statement(self) -> str:
        """The (ε, δ) guarantee of the training so far in words, with every assumption it rests on."""
        return privacy_statement(self.privacy_facts())

    # ------------------------------------------------------------------------------------------------
    # set-up

    def _prepare(self, x: np.ndarray, y: np.ndarray, batch_size: int) -> tuple[int, int, int]:
        """Check the sizes; on the first fit build the sampler, the ledger and the compiled step. Returns
        (n, batch size, microbatch size)."""
        n = len(x)
        _check(1 <= batch_size <= n, f"batch_size: must be in [1, {n}] (the training examples), got "
               f"{batch_size}")
        m = self.num_microbatches
        if m is not None:
            _check(batch_size % m == 0, f"num_microbatches: {m} does not divide batch_size {batch_size}")
            _check(self.sampling == "shuffle" or m == batch_size,
                   f"num_microbatches: {m} < batch_size {batch_size} needs fixed-size batches: pass "
                   "sampling='shuffle' to DPModel, or num_microbatches=None (per-example clipping)")
        k = 1 if m is None else batch_size // m
        plan = (n, batch_size, k)
        check_embedding_ids(self.model, x, "fit(x)")
        if self._plan is not None:
            _check(plan == self._plan, f"fit: this DPModel accounts n = {self._plan[0]} examples in batches "
                   f"of {self._plan[1]}; fit again with the same numbers, or wrap the model in a new DPModel "
                   "(and add the ε of both)")
            return plan
        self._sampler = Sampler(sampling=self.sampling, batch_size=batch_size, dataset_size=n,
                                key=self._run_key)
        if self.sampling == "shuffle":
            warnings.warn("sampling='shuffle': fixed-size shuffled batches; the ε reported uses the Poisson "
                          "analysis, an optimistic assumption for shuffling (Chua et al., 2024)",
                          stacklevel=3)
        self._build_step(x[:2], y[:2], batch_size, k)
        self._plan = plan
        return plan

    def _build_step(self, x0: np.ndarray, y0: np.ndarray, batch_size: int, k: int) -> None:
        step_plan = planner.plan_step(self.model, capacity=self._sampler.capacity, private=True,
                                      microbatch_size=k, jit_compile=self.jit_compile_setting,
                                      gradient_path=self.gradient_path_setting)
        grad_fn, _ = step_plan.functions(private=True)
        self.gradient_path, jit = step_plan.gradient_path, step_plan.jit_compile
        if self.gradient_path == "vectorized_map":
            why = fastgrad.fast_path_problem(self.model)
            if why:
                warnings.warn(f"DPModel: per-example gradients by tf.vectorized_map (slower): the fast path "
                              f"does not support {why}", stacklevel=4)
        settings = engine.StepSettings(
            private=True, noise_multiplier=self.noise_multiplier, l2_norm_clip=self.l2_norm_clip,
            microbatch_size=k, denominator=float(batch_size // k), jit_compile=jit)
        q = batch_size / self._sampler.dataset_size
        self.ledger = accounting.PrivacyLedger.for_event(settings.dp_event(q), self.delta)  # the step's event
        loss_fn = per_example_loss_fn(self.loss)
        self.compute_metrics(x0, y0, self.model(x0, training=False))
        self.reset_metrics()  # the metrics' variables now exist, outside any tf.function

        def update_metrics(labels, logits, mask):
            """Keras metrics (unweighted by design) on the kept examples only: padded slots and the
            examples of dropped units left out."""
            real = mask > 0
            self.compute_metrics(None, tf.boolean_mask(labels, real), tf.boolean_mask(logits, real))
            return tf.constant(0)

        self._update_metrics = tf.function(update_metrics)  # never XLA: the real examples vary in number
        step_fn, chunk_fn = engine.make_train_step(self.model, self.optimizer, settings, grad_fn,
                                                   loss_fn=loss_fn, return_logits=True)
        self._step = (step_fn, chunk_fn, [tf.zeros_like(v) for v in self.model.trainable_variables])

    def _as_arrays(self, x, y, batch_size):
        """(x, y, batch_size) as numpy arrays; a `tf.data.Dataset` of (x, y) is materialized."""
        if isinstance(x, tf.data.Dataset):
            _check(y is None, "fit: give y inside the dataset (elements (x, y)), not as a separate argument")
            x, y, found = _materialize(x, _input_rank(self.model))
            batch_size = batch_size or found
        _check(x is not None and y is not None, "fit: give x and y (arrays), or a tf.data.Dataset of (x, y)")
        x, y = np.asarray(x), np.asarray(y)
        _check(len(x) == len(y), f"fit: x has {len(x)} examples but y has {len(y)}")
        if x.dtype.kind == "f" and x.dtype != np.float32:
            x = x.astype(np.float32)
        return x, y, batch_size


_CLAIMED_KEYS: set[str] = set()  # digests of the secret keys DPModels of this process train with


def _claim(key: RunKey) -> None:
    """Refuse a key a run directory already used, or a secret key another DPModel already holds: two
    trainings with one key share their noise and batches, while each statement says the key is secret."""
    if key.origin is not None:
        raise ConfigError(f"run_key: this is the key in {key.origin}; that run already drew its noise and "
                          "batches from it, and a model trained with it would share them; pass no run_key "
                          "(a fresh secret key), or reproducible_seed= for a reproducible run")
    if key.mode != "secret":
        return  # reproducible: the stated research opt-in (the statement says what it depends on)
    digest = hashlib.sha256(b"dpsgd DPModel key\0" + key.material).hexdigest()
    if digest in _CLAIMED_KEYS:
        raise ConfigError("run_key: another DPModel already trains with this secret key; the two would share "
                          "their noise and batches: pass no run_key (a fresh secret key) to each model")
    _CLAIMED_KEYS.add(digest)


def per_example_loss_fn(loss) -> engine.LossFn:
    """`engine.LossFn` (logits, labels) -> [batch] from the loss given to `compile`: a Keras `Loss` (its
    unreduced `call`), a loss name or a function `fn(y_true, y_pred)`; extra axes are averaged."""
    if isinstance(loss, (list, tuple, dict)):
        raise ConfigError("DPModel: compile with one loss (a model with one output)")
    obj = keras.losses.get(loss) if isinstance(loss, str) else loss
    per_example = obj.call if isinstance(obj, keras.losses.Loss) else obj
    if not callable(per_example):
        raise ConfigError(f"DPModel: compile(loss={loss!r}) is not a loss")

    def loss_fn(logits, labels):
        values = tf.convert_to_tensor(per_example(labels, logits))
        if values.shape.rank and values.shape.rank > 1:
            values = tf.reduce_mean(values, axis=list(range(1, values.shape.rank)))
        return tf.cast(values, tf.float32)

    return loss_fn


def _input_rank(model: keras.Model) -> int | None:
    inputs = getattr(model, "inputs", None)
    try:
        return len(inputs[0].shape) - 1 if inputs else None
    except (TypeError, IndexError, AttributeError):
        return None


def _materialize(dataset: tf.data.Dataset, example_rank: int | None):
    """(x, y, batch size found or None) from a finite dataset of (x, y) examples or batches."""
    if dataset.cardinality() == tf.data.INFINITE_CARDINALITY:
        raise ConfigError("fit: the tf.data.Dataset is infinite (a .repeat()?); Poisson sampling needs the "
                          "n examples it samples from: pass a finite dataset")
    spec = dataset.element_spec
    _check(isinstance(spec, tuple) and len(spec) == 2, "fit: the tf.data.Dataset must yield (x, y) pairs")
    shape = spec[0].shape
    batched = (shape.rank == example_rank + 1) if example_rank is not None else (
        shape.rank is not None and shape.rank > 0 and shape[0] is None)
    found = None
    if batched:
        first = next(iter(dataset.take(1)), None)
        found = None if first is None else int(first[0].shape[0])
        dataset = dataset.unbatch()
    xs, ys, size = [], [], 0
    for xb, yb in dataset.batch(4096).as_numpy_iterator():
        size += xb.nbytes + yb.nbytes
        if size > _MAX_DATASET_BYTES:
            raise ConfigError(f"fit: the tf.data.Dataset holds more than {_MAX_DATASET_BYTES / 2**30:g} GiB; "
                              "DPModel materializes it in memory for Poisson sampling: pass arrays")
        xs.append(xb)
        ys.append(yb)
    _check(bool(xs), "fit: the tf.data.Dataset is empty")
    x, y = np.concatenate(xs), np.concatenate(ys)
    ignored = "; its batching is ignored" if batched else ""
    warnings.warn(f"DPModel: materialized the tf.data.Dataset into arrays of {len(x)} examples (Poisson "
                  f"sampling draws from all n at q = batch_size / n){ignored}", stacklevel=4)
    return x, y, found


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)
