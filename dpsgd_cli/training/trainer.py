"""One run's training state: the model, the compiled DP step, the sampler and the privacy ledger.

`Trainer` trains an epoch, evaluates on the test split, records ε, and hands its state out (weights,
optimizer variables, a JSON-able state) and takes it back; the orchestrator writes the files.
Importing this module does not import TensorFlow; creating a `Trainer` does.
"""

from __future__ import annotations

import contextlib
import math
import platform
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from dpsgd_cli import __version__
from dpsgd_cli.config import ExperimentConfig, release_bounds, views_per_example
from dpsgd_cli.errors import OutputError, RunDirError, TrainingError
from dpsgd_cli.privacy import accounting
from dpsgd_cli.privacy.plan import PrivacyPlan
from dpsgd_cli.privacy.run_key import RunKey
from dpsgd_cli.privacy.sampling import Batch, Sampler, steps_in_epoch
from dpsgd_cli.privacy.statement import PrivacyFacts
from dpsgd_cli.training.data import Dataset

StepCallback = Callable[[dict[str, Any]], None]
EVAL_BATCH = 1000  # test examples per forward pass in `evaluate`
PROGRESS_EVERY = 20  # steps between `on_step` calls (each reads the running statistics from the device)
STATS = 4  # a step's statistics: loss sum, correct, count, dropped units (`engine.step_statistics`)


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    def installed(package: str) -> str:
        try:
            return version(package)
        except PackageNotFoundError:
            return "not installed"

    return {"dpsgd": __version__, "python": platform.python_version(),
            **{name: installed(name) for name in ("tensorflow", "keras", "dp-accounting", "numpy")}}


def take_step(step_fn, chunk_fn, zeros, x_train: np.ndarray, y_train: np.ndarray, batch: Batch,
              noise_seed: np.ndarray) -> tuple[tuple[float, float, float, float], Any]:
    """Run the compiled DP step (`engine.make_train_step`) on one sampled `batch` of `x_train`/`y_train`.

    An oversized Poisson batch's overflow chunks are summed by `chunk_fn` and added before the noise, so
    no sampled example is dropped. Returns the step's statistics (`engine.step_statistics`: loss sum,
    correct, count, dropped units) over the first chunk's real examples (the overflow chunks' examples
    are trained on but not in these running statistics), and the step's further outputs (the first
    chunk's logits with `return_logits`, else an empty tuple)."""
    from dpsgd_cli.training.engine import overflow_sums

    (idx, mask), *overflow = batch.chunks
    extra = overflow_sums(chunk_fn, [(x_train[j], y_train[j], m) for j, m in overflow], zeros)
    out = step_fn(x_train[idx], y_train[idx], mask, extra, noise_seed)
    return tuple(float(v) for v in out[:STATS]), tuple(out[STATS:])


class Trainer:
    """Holds the model, the compiled step, the sampler and the privacy ledger of one run."""

    def __init__(self, cfg: ExperimentConfig, dataset: Dataset, plan: PrivacyPlan, key: RunKey,
                 fingerprint: str = "", model=None):
        """`key`: the run's key (secret or reproducible), which keys the batches and the noise. `model`:
        the un-compiled model of `cfg` (`model.model_from_config`), built here when not given."""
        import keras
        import tensorflow as tf

        from dpsgd_cli.training import distribute, engine, features, fold, planner, recipes
        from dpsgd_cli.training.model import INPUT_SHAPE, model_from_config

        self.tf = tf
        self.cfg, self.data, self.plan = cfg, dataset, plan
        self.n = plan.dataset_size  # n of q = B/n (counts all canaries; see privacy_plan)
        self.key = key
        self.sampler = Sampler(sampling=cfg.data.sampling, batch_size=cfg.data.batch_size,
                               dataset_size=self.n, population=len(dataset.y_train), key=key,
                               max_capacity=cfg.training.physical_batch_size)
        # the model's data: the images' shape (ScatterNet models: the 28×28×1 images their features come from)
        shape = INPUT_SHAPE if features.needs_features(cfg.model.architecture) else dataset.input_shape
        build = (cfg.model, cfg.seed, shape, dataset.num_classes)
        self.model = plain = model if model is not None else model_from_config(*build)
        # tf.distribute: R replicas each take capacity / R slots of every chunk
        self.distribution = distribute.setup(cfg)
        replicas = self.distribution.replicas if self.distribution else 1
        if self.distribution:
            self.sampler.capacity = self.distribution.capacity(self.sampler.capacity, plan.microbatch_size)
        keras.utils.set_random_seed(cfg.seed)  # not secret (initial weights are seeded in model_from_config)
        with self.distribution.scope() if self.distribution else contextlib.nullcontext():
            if self.distribution:  # the same initial weights, in variables mirrored over the replicas
                weights, self.model = self.model.get_weights(), model_from_config(*build)
                self.model.set_weights(weights)
            self.optimizer = engine.make_optimizer(cfg.training.optimizer,
                                                   recipes.learning_rate(cfg, plan.total_steps),
                                                   cfg.training.momentum, **recipes.optimizer_options(cfg))
            # leading weightless per-example layers (a ScatterNet model's GroupNorm) run once over the
            # training set, not in every step: the step trains the rest, on the same variables
            self.folded, step_model = fold.split(self.model)
        _, plain_rest = fold.split(plain)
        private = cfg.privacy.enabled
        views = views_per_example(cfg)  # the step's model sees K rows per example
        self.step_plan = planner.plan_step(
            plain_rest, capacity=self.sampler.capacity // replicas * views,
            private=private, microbatch_size=plan.microbatch_size * views,
            jit_compile=cfg.training.jit_compile, gradient_path=cfg.training.gradient_path,
            formulation=cfg.training.plan, chunk_size=cfg.training.chunk_size)
        grad_fn, forward_fn = self.step_plan.functions(private)
        self.gradient_path, self.jit_compile = self.step_plan.gradient_path, self.step_plan.jit_compile
        settings = engine.StepSettings(
            private=private, noise_multiplier=plan.noise_multiplier, l2_norm_clip=cfg.privacy.l2_norm_clip,
            microbatch_size=plan.microbatch_size,
            denominator=float(cfg.data.batch_size // plan.microbatch_size), jit_compile=self.jit_compile,
            views=views)
        # the training set (each example's K views) stays on the device; the step gathers its batch from
        # the sampler's indices
        x_train = dataset.x_train if views == 1 else dataset.train_views
        if x_train is None or (views > 1 and x_train.shape[:2] != (len(dataset.y_train), views)):
            raise TrainingError(f"data.augmentation: {cfg.data.augmentation} needs the training set's "
                                f"{views} views per example (augmentation.with_views)")
        on_device = (tf.constant(fold.apply(self.folded, x_train)), tf.constant(dataset.y_train))
        if self.distribution:
            self.step_fn, self.chunk_fn = distribute.make_distributed_step(
                self.distribution, step_model, self.optimizer, settings, grad_fn, forward_fn, data=on_device)
        else:  # the loss is engine.per_example_loss: no Python control flow for autograph to convert,
            # and tracing without it takes a fraction of the time
            step_fn, self.chunk_fn = engine.make_train_step(
                step_model, self.optimizer, settings, grad_fn, forward_fn, data=on_device, autograph=False)
            # its one concrete function, traced now and called directly: each call then skips matching its
            # arguments (four, one a list of 8+ tensors) to a trace, a fixed cost per step
            capacity = self.sampler.capacity
            self.step_fn = step_fn.get_concrete_function(
                tf.TensorSpec([capacity], tf.int64), tf.TensorSpec([capacity], tf.float32),
                [tf.TensorSpec(v.shape, v.dtype) for v in self.model.trainable_variables],
                tf.TensorSpec([2], tf.int64))
        # the test split through the same folded layers, once (the rest of the model evaluates it)
        self.x_eval = fold.apply(self.folded, dataset.x_test)
        self.predict = tf.function(lambda x: step_model(x, training=False),
                                   jit_compile=self.jit_compile and not self.distribution)
        self.zeros = [tf.zeros_like(v) for v in self.model.trainable_variables]
        # the ledger composes the event the engine states for the step it runs
        self.step_event = settings.dp_event(plan.sampling_rate) if private else None
        self.ledger = (accounting.PrivacyLedger.for_event(self.step_event, cfg.privacy.delta,
                                                          releases=plan.releases) if private
                       else accounting.PrivacyLedger(0.0, plan.sampling_rate, cfg.privacy.delta))
        self.steps_done = 0
        self.feature_stats: dict[str, list[float]] | None = None  # model.feature_norm's release (runner)
        self.fingerprint = fingerprint
        self.versions = library_versions()
        self.resumed_at: list[int] = []
        # (provenance) the strategy and replica count from each epoch on; a resume may change them
        self.distribution_history = [{"from_epoch": 1, **self._distribution()}]

    def _distribution(self) -> dict[str, Any]:
        if self.distribution is None:
            return {"strategy": "none", "replicas": 1, "workers": 1}
        return {k: v for k, v in self.distribution.record().items() if k != "devices_per_worker"}

    def distribution_record(self) -> dict[str, Any]:
        """run.yaml's `resolved.distribute`: this process's strategy, R and, if a resume changed them, the
        history (from which epoch on which R ran). ε does not depend on them."""
        record = self.distribution.record() if self.distribution else {**self._distribution()}
        if len(self.distribution_history) > 1:
            record["history"] = list(self.distribution_history)
        return record

    def train_epoch(self, epoch: int, on_step: StepCallback | None) -> dict[str, float]:
        """Train one epoch. The step's statistics stay on the device and are read in one transfer every
        `PROGRESS_EVERY` steps (for `on_step`) and at the end, so the host never waits for each step. A
        unit with a non-finite gradient norm or loss is dropped from its step and counted
        (`train_nonfinite_units`); a step that dropped every real unit it had (or whose loss sum is not
        finite) stops the run with TrainingError at the end of the epoch, naming the first such step.
        The ledger composes each step that ran."""
        from dpsgd_cli.training.engine import overflow_sums

        tf = self.tf
        total = steps_in_epoch(epoch, self.cfg.data.batch_size, self.n, self.cfg.data.sampling)
        rows, pending, steps = [], [], []

        def read() -> np.ndarray:  # [steps so far, STATS]: loss sum, correct, count, dropped units
            if pending:
                flat = tf.stack([t for out in pending for t in out]).numpy().astype(np.float64)
                rows.append(flat.reshape(-1, STATS))
                pending.clear()
            return np.concatenate(rows) if rows else np.zeros((0, STATS))

        for i, batch in enumerate(self.sampler.epoch(epoch), start=1):
            (idx, mask), *overflow = batch.chunks  # the overflow chunks' examples are not in the stats
            extra = overflow_sums(self.chunk_fn, overflow, self.zeros)
            pending.append(self.step_fn(idx, mask, extra, self.key.noise_seed(batch.step)))
            self._account(1)  # the ledger composes the steps that ran, not a formula
            steps.append(batch.step)
            self.steps_done = batch.step + 1
            if on_step and (i % PROGRESS_EVERY == 0 or i == total):
                loss_sum, correct, count, _ = read().sum(axis=0)
                on_step({"epoch": epoch, "step_in_epoch": i, "steps_in_epoch": total,
                         "train_loss": loss_sum / max(count, 1), "train_accuracy": correct / max(count, 1)})
        table = read()
        bad = np.flatnonzero(~np.isfinite(table[:, 0]) | ((table[:, 2] == 0) & (table[:, 3] > 0)))
        if bad.size:
            what = (f"loss is {table[bad[0], 0]}" if not np.isfinite(table[bad[0], 0]) else
                    f"every example's gradient or loss was non-finite ({table[bad[0], 3]:g} units dropped)")
            raise TrainingError(f"{what} at epoch {epoch}, step {steps[bad[0]] + 1}: training diverged; "
                                f"lower training.learning_rate (now {self.cfg.training.learning_rate:g})")
        loss_sum, correct, count, dropped = (float(v) for v in table.sum(axis=0))
        return {"train_loss": loss_sum / max(count, 1), "train_accuracy": correct / max(count, 1),
                "train_nonfinite_units": dropped}

    def _account(self, steps: int) -> None:
        """Compose `steps` executed steps into the privacy ledger (private runs only)."""
        if self.cfg.privacy.enabled:
            self.ledger.advance(steps)

    def evaluate(self) -> dict[str, Any]:
        """Test loss, accuracy and per-class accuracy on the whole test split (of the averaged weights
        when `training.ema_decay` is set)."""
        from dpsgd_cli.training.recipes import averaged_weights

        with averaged_weights(self.model, self.optimizer):
            return self._evaluate()

    def _evaluate(self) -> dict[str, Any]:
        from dpsgd_cli.training.engine import per_example_loss

        x, y = self.x_eval, self.data.y_test
        logits = []
        for start in range(0, len(y), EVAL_BATCH):
            chunk = x[start:start + EVAL_BATCH]
            pad = EVAL_BATCH - len(chunk)
            if pad:
                chunk = np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]), chunk.dtype)])
            logits.append(self.predict(chunk).numpy()[:EVAL_BATCH - pad])
        logits = np.concatenate(logits)
        losses = per_example_loss(logits, y).numpy()
        hits = logits.argmax(axis=1) == y
        per_class = {f"test_accuracy_class_{k}": float(hits[y == k].mean()) if (y == k).any() else math.nan
                     for k in range(self.data.num_classes)}
        return {"test_loss": float(losses.mean()), "test_accuracy": float(hits.mean()), **per_class}

    def epoch_row(self, epoch: int, train_stats: dict[str, float], elapsed: float) -> dict[str, Any]:
        """The metrics of `epoch` by column name (the columns of `runs.results.EpochRecord`)."""
        private = self.cfg.privacy.enabled
        return dict({
            "epoch": epoch, "step": self.steps_done, **train_stats, **self.evaluate(),
            **self._epsilons(),
            "delta": self.cfg.privacy.delta,
            "noise_multiplier": self.plan.noise_multiplier if private else 0.0,
            "l2_norm_clip": self.cfg.privacy.l2_norm_clip if private else math.inf,
            "batch_size": self.cfg.data.batch_size,
            "learning_rate": self.cfg.training.learning_rate,
            "elapsed_s": round(elapsed, 3),
        })

    def _epsilons(self) -> dict[str, float]:
        """ε so far by each accountant (inf for a non-private run)."""
        private = self.cfg.privacy.enabled
        return {f"epsilon_{a}": self.ledger.epsilon(a) if private else math.inf for a in ("rdp", "pld")}

    def facts(self) -> PrivacyFacts:
        return PrivacyFacts(
            noise_multiplier=self.plan.noise_multiplier,
            accounting_noise_multiplier=self.plan.accounting_noise_multiplier,
            l2_norm_clip=self.cfg.privacy.l2_norm_clip, sampling_rate=self.plan.sampling_rate,
            steps=self.ledger.steps, delta=self.cfg.privacy.delta, sampling=self.cfg.data.sampling,
            microbatch_size=self.plan.microbatch_size,
            epsilon_rdp=self.ledger.epsilon("rdp"), epsilon_pld=self.ledger.epsilon("pld"),
            randomness=self.key.mode, views=views_per_example(self.cfg), releases=self.plan.releases,
            release_bounds=release_bounds(self.cfg) if self.plan.releases else (), record=self.data.record)

    def snapshot(self, epoch: int, records: list[Mapping[str, Any]], elapsed: float
                 ) -> tuple[dict[str, Any], list[np.ndarray], list[np.ndarray]]:
        """(state, model weights, optimizer variables) after `epoch`, what a checkpoint holds; `records`:
        the metrics rows so far. TrainingError if the weights or the test loss are not finite (a diverged
        model is never checkpointed over the last good one)."""
        weights = self.model.get_weights()
        loss = records[-1]["test_loss"]
        finite_weights = all(np.isfinite(w).all() for w in weights)
        if not finite_weights or not math.isfinite(loss):
            what = "the weights became non-finite" if not finite_weights else f"the test loss is {loss}"
            raise TrainingError(f"{what} after epoch {epoch} (step {self.steps_done}): training diverged; "
                                f"lower training.learning_rate (now {self.cfg.training.learning_rate:g})")
        state = {
            "epochs_done": epoch, "epochs": self.cfg.training.epochs, "steps_done": self.steps_done,
            "ledger_steps": self.ledger.steps, "elapsed_s": elapsed, "records": [dict(r) for r in records],
            "config": self.cfg.to_dict(), "noise_multiplier": self.plan.noise_multiplier,
            "dataset_size": self.n, "data_fingerprint": self.fingerprint,
            "model_variables": [v.path for v in self.model.weights],
            "optimizer_variables": self._optimizer_names(), "resumed_at": self.resumed_at,
            "distribution_history": self.distribution_history,
            "versions": self.versions,
        }
        return state, weights, [v.numpy() for v in self.optimizer.variables]

    def restore(self, ckpt: Any, where: Path) -> None:
        """Load the weights and optimizer state of `ckpt` (`runs.checkpoint.Checkpoint`, read from the file
        `where`, named in errors) and replay the privacy ledger to its step."""
        self._assign(where, "model", self.model.weights, [v.path for v in self.model.weights],
                     ckpt.model_weights, ckpt.state.get("model_variables"))
        self._assign(where, "optimizer", self.optimizer.variables, self._optimizer_names(),
                     ckpt.optimizer_variables, ckpt.state.get("optimizer_variables"))
        done = 0
        for record in ckpt.records:  # the steps the first attempt executed, epoch by epoch, as recorded
            self._account(int(record["step"]) - done)
            done = int(record["step"])
            replayed = self._epsilons()
        self.steps_done = ckpt.steps_done
        if self.cfg.privacy.enabled and ckpt.records:
            recorded = {k: ckpt.records[-1][k] for k in replayed}
            if self.ledger.steps != ckpt.state.get("ledger_steps") or not all(
                    math.isclose(replayed[k], recorded[k], rel_tol=1e-9) for k in replayed):
                raise RunDirError(f"{where}: replaying the privacy ledger to step {self.ledger.steps} gives "
                                  f"{replayed}, but the run recorded {recorded}; cannot resume")
        self.resumed_at = [*ckpt.state.get("resumed_at", []), ckpt.epochs_done]
        history = list(ckpt.state.get("distribution_history") or [{"from_epoch": 1, "strategy": "none",
                                                                     "replicas": 1, "workers": 1}])
        now = self._distribution()
        if {k: v for k, v in history[-1].items() if k != "from_epoch"} != now:
            history.append({"from_epoch": ckpt.epochs_done + 1, **now})
        self.distribution_history = history

    @staticmethod
    def _assign(where: Path, what: str, variables, names, arrays, stored_names) -> None:
        shapes = [tuple(v.shape) for v in variables]
        if stored_names != names or [a.shape for a in arrays] != shapes:
            raise RunDirError(f"{where}: its {what} variables do not match the {what} this config builds; "
                              "cannot resume")
        for variable, array in zip(variables, arrays):
            variable.assign(array)

    def _optimizer_names(self) -> list[str]:
        """Optimizer variable paths without the optimizer's own (instance-numbered) name."""
        return [v.path.split("/", 1)[-1] for v in self.optimizer.variables]

    def save_weights(self, path: Path) -> None:
        tmp = path.with_name(".tmp." + path.name)
        from dpsgd_cli.training.recipes import averaged_weights

        try:
            with averaged_weights(self.model, self.optimizer):
                self.model.save_weights(tmp)
            tmp.replace(path)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise OutputError(f"{path}: cannot write ({exc.strerror or exc.__class__.__name__})") from None
