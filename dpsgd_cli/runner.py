"""One experiment, end to end: `run(cfg) -> RunResult`. Wires sampling, the DP step and accounting.

The privacy event accounted is derived here from the very numbers the step uses (σ, C, microbatch size,
sampling rate, steps actually taken), never re-typed. This module never prints; progress goes to callbacks.

Nothing finished is lost: after every epoch the run writes `checkpoint.ckpt` (see `checkpoint`), then
metrics.csv, so metrics.csv never holds an epoch the checkpoint lacks. `run(cfg, resume=True)` continues
from that checkpoint: sampling is keyed by (seed, epoch) and noise by (seed, step), so with the weights,
the optimizer state and the privacy ledger restored (replayed epoch by epoch, as the first attempt
advanced it) the resumed run repeats the uninterrupted one exactly, ε included.
"""

from __future__ import annotations

import hashlib
import math
import platform
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dpsgd_cli import __version__, accounting, checkpoint
from dpsgd_cli.config import (
    ExperimentConfig,
    config_from_dict,
    flatten,
    replace,
    resolved_data_dir,
)
from dpsgd_cli.data import Dataset, load_dataset
from dpsgd_cli.errors import ConfigError, DpsgdError, OutputError, RunDirError, TrainingError
from dpsgd_cli.privacy_plan import PrivacyPlan, plan_privacy
from dpsgd_cli.privacy_statement import PrivacyFacts, privacy_statement
from dpsgd_cli.results import read_yaml, write_metrics, write_yaml
from dpsgd_cli.sampling import Sampler, steps_after_epochs, steps_in_epoch

StepCallback = Callable[[dict[str, Any]], None]
EpochCallback = Callable[[dict[str, Any]], None]
EVAL_BATCH = 1000
RUN_FILE = "run.yaml"
METRICS_FILE = "metrics.csv"
WEIGHTS_FILE = "model.weights.h5"
FINISHED = "finished"
# Keys of the config that may differ between a checkpoint and run.yaml: where the run lives and where the
# data are read from (the data themselves are compared by fingerprint).
_RELOCATABLE = ("name", "output_dir", "data.data_dir")


@dataclass
class RunResult:
    run_dir: Path
    records: list[dict[str, Any]] = field(default_factory=list)
    statement: str = ""
    noise_multiplier: float | None = None


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C (or SIGTERM via the CLI) stopped a run; the epochs finished before it are saved."""

    def __init__(self, run_dir: Path, epochs_done: int, epochs: int):
        super().__init__(f"{run_dir}: interrupted after {epochs_done} of {epochs} epochs")
        self.run_dir, self.epochs_done, self.epochs = run_dir, epochs_done, epochs


# ------------------------------------------------------------------------------------------------
# The run directory: what it holds, whether it may be started, replaced or resumed
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RunDirState:
    """What a run directory holds: `status` from run.yaml (running, interrupted, failed, finished;
    'unreadable' if run.yaml cannot be read), epochs done per the checkpoint (None: no usable checkpoint)
    and planned. `problem` says why the checkpoint or run.yaml is unusable, if it is."""

    status: str
    epochs_done: int | None
    epochs: int | None
    problem: str | None = None

    @property
    def progress(self) -> str:
        done = 0 if self.epochs_done is None else self.epochs_done
        return f"epoch {done} of {self.epochs if self.epochs is not None else '?'}"


def inspect_run_dir(run_dir: Path) -> RunDirState | None:
    """The state of the run in `run_dir`, or None if it holds no dpsgd run (no run.yaml, no checkpoint)."""
    run_dir = Path(run_dir)
    has_doc, has_ckpt = (run_dir / RUN_FILE).is_file(), checkpoint.exists(run_dir)
    if not (has_doc or has_ckpt):
        return None
    status, epochs, problem = "unreadable", None, None
    if has_doc:
        try:
            doc = read_yaml(run_dir / RUN_FILE)
            status = str(doc.get("status", "unknown"))
            epochs = int(doc["config"]["training"]["epochs"])
        except Exception as exc:  # yaml, I/O and shape errors come in many types
            status, problem = "unreadable", f"{RUN_FILE} is unreadable ({exc.__class__.__name__})"
    epochs_done = None
    try:
        ckpt = checkpoint.load(run_dir)
        epochs_done = ckpt.epochs_done if ckpt else 0
        epochs = epochs if epochs is not None or ckpt is None else ckpt.state.get("epochs")
    except RunDirError as exc:
        problem = problem or str(exc)
    return RunDirState(status, epochs_done, epochs, problem)


def check_run_dir(run_dir: Path, *, overwrite: bool = False, resume: bool = False) -> None:
    """Refuse, with a message that says what to pass instead, to start a run over an existing one
    (unless `overwrite`), to resume what is not an unfinished run, or to delete what is not a run.
    Reads only; changes nothing."""
    run_dir = Path(run_dir)
    if overwrite and resume:
        raise ConfigError("--resume and --overwrite exclude each other: --resume continues the run, "
                          "--overwrite deletes it and starts again")
    if resume:
        _check_resumable_dir(run_dir)
        return
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(f"{run_dir}: exists and is not a directory; choose another --name or output_dir")
    if not run_dir.is_dir() or not any(run_dir.iterdir()):
        return
    state = inspect_run_dir(run_dir)
    if state is None:
        raise RunDirError(f"{run_dir}: holds files that are not a dpsgd run (no {RUN_FILE}); "
                          "refusing to touch them: choose another --name or output_dir")
    if overwrite:
        return
    if state.status == FINISHED:
        raise RunDirError(f"{run_dir}: holds a finished run ({state.epochs} epochs); pass --overwrite to "
                          "replace it, or choose another --name")
    if state.epochs_done is None:
        raise RunDirError(f"{run_dir}: holds an unfinished run that cannot be resumed ({state.problem}); "
                          "pass --overwrite to start it again, or choose another --name")
    if state.status == "failed":
        raise RunDirError(f"{run_dir}: holds a failed run ({state.progress} finished; its {RUN_FILE} says "
                          f"why): pass --resume {run_dir} to retry from there, or --overwrite to start over")
    raise RunDirError(f"{run_dir}: holds an unfinished run ({state.progress}): pass --resume {run_dir} to "
                      "continue it, or --overwrite to start over")


def _check_resumable_dir(run_dir: Path) -> None:
    if not run_dir.is_dir():
        raise RunDirError(f"{run_dir}: no such run directory to resume")
    state = inspect_run_dir(run_dir)
    if state is None or not (run_dir / RUN_FILE).is_file():
        raise RunDirError(f"{run_dir}: not a dpsgd run directory (no {RUN_FILE}); nothing to resume")
    if state.status == FINISHED:
        raise RunDirError(f"{run_dir}: the run is finished ({state.epochs} epochs); nothing to resume "
                          "(to train it again pass --overwrite instead of --resume)")
    if state.problem:
        raise RunDirError(state.problem if state.problem.startswith(str(run_dir))
                          else f"{run_dir}: {state.problem}; cannot resume")


def prepare_run_dir(run_dir: Path, overwrite: bool) -> None:
    """Refuse to clobber an existing run unless `overwrite` (see `check_run_dir`); then create the
    directory, empty."""
    check_run_dir(run_dir, overwrite=overwrite)
    try:
        if run_dir.is_dir() and any(run_dir.iterdir()):
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
    except (OSError, ValueError) as exc:
        raise OutputError(f"{run_dir}: cannot create the run directory "
                          f"({getattr(exc, 'strerror', None) or exc.__class__.__name__})") from None


def resume_config(run_dir: Path) -> ExperimentConfig:
    """The config a run in `run_dir` was started with (from its run.yaml), placed at `run_dir` (so a
    moved or renamed run directory resumes where it now is)."""
    run_dir = Path(run_dir)
    _check_resumable_dir(run_dir)
    path = run_dir / RUN_FILE
    try:
        raw = read_yaml(path).get("config")
        cfg = config_from_dict(raw)
        return replace(cfg, output_dir=str(run_dir.parent), name=run_dir.name)
    except ConfigError as exc:
        raise RunDirError(f"{path}: its config no longer loads ({exc})") from None
    except Exception as exc:  # yaml and I/O errors come in many types
        raise RunDirError(f"{path}: unreadable ({exc.__class__.__name__}); cannot resume") from None


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    def installed(package: str) -> str:
        try:
            return version(package)
        except PackageNotFoundError:
            return "not installed"

    return {"dpsgd": __version__, "python": platform.python_version(),
            **{name: installed(name) for name in ("tensorflow", "keras", "dp-accounting", "numpy")}}


def data_fingerprint(dataset: Dataset) -> str:
    """SHA-256 over the arrays a run trains and evaluates on (a resumed run must see the same data)."""
    digest = hashlib.sha256()
    for array in (dataset.x_train, dataset.y_train, dataset.x_test, dataset.y_test):
        digest.update(f"{array.dtype}{array.shape}".encode())
        digest.update(np.ascontiguousarray(array).data)
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------------
def run(cfg: ExperimentConfig, *, on_step: StepCallback | None = None,
        on_epoch: EpochCallback | None = None, overwrite: bool = False, resume: bool = False) -> RunResult:
    """Train `cfg` and write metrics.csv, run.yaml and a checkpoint per epoch under `cfg.run_dir`.

    `resume`: continue the unfinished run in `cfg.run_dir` from its checkpoint (`cfg` must be the one it
    was started with: see `resume_config`). Raises RunInterrupted on Ctrl-C, TrainingError on a
    non-finite loss (the last checkpoint and metrics.csv stay as they were)."""
    run_dir = cfg.run_dir
    check_run_dir(run_dir, overwrite=overwrite, resume=resume)
    ckpt = checkpoint.load(run_dir) if resume else None
    dataset = load_dataset(cfg.data.dataset, resolved_data_dir(cfg), cfg.data.train_size, cfg.data.test_size)
    canary_set = None
    if cfg.privacy.canaries:
        from dpsgd_cli import canaries

        dataset, canary_set = canaries.add_canaries(dataset, cfg.privacy.canaries, cfg.seed)
    recorded_sigma = ckpt.state.get("noise_multiplier") if ckpt and cfg.privacy.target_epsilon else None
    plan = plan_privacy(cfg, len(dataset.y_train), noise_multiplier=recorded_sigma)
    fingerprint = data_fingerprint(dataset)
    if ckpt:
        _check_continues(ckpt, cfg, plan, fingerprint)
    if resume:
        checkpoint.remove_temporaries(run_dir)
    else:
        prepare_run_dir(run_dir, overwrite)
        write_yaml(_run_document(cfg, plan, None, "running", None), run_dir / RUN_FILE)
    if canary_set is not None:  # deterministic in the seed: a resumed run writes the same file again
        canaries.save_canaries(canary_set, run_dir)
    trainer = _Trainer(cfg, dataset, plan, fingerprint)
    result = RunResult(run_dir=run_dir, noise_multiplier=plan.noise_multiplier)
    if ckpt:
        trainer.restore(ckpt)
        result.records = list(ckpt.records)
        write_metrics(result.records, run_dir / METRICS_FILE)  # as the checkpoint has it
    write_yaml(_run_document(cfg, plan, trainer, "running", result), run_dir / RUN_FILE)
    _train_epochs(cfg, trainer, plan, result, on_step, on_epoch, ckpt.elapsed_s if ckpt else 0.0)
    trainer.save_weights(run_dir / WEIGHTS_FILE)
    facts = trainer.facts()
    result.statement = privacy_statement(facts) if cfg.privacy.enabled else NONPRIVATE_STATEMENT
    write_yaml(_run_document(cfg, plan, trainer, FINISHED, result), run_dir / RUN_FILE)
    return result


def _train_epochs(cfg, trainer: _Trainer, plan: PrivacyPlan, result: RunResult, on_step, on_epoch,
                  elapsed_before: float) -> None:
    """Epochs after those in `result.records`: train, evaluate, checkpoint, then metrics.csv."""
    run_dir, epochs = result.run_dir, cfg.training.epochs
    start = time.perf_counter() - elapsed_before
    try:
        for epoch in range(len(result.records) + 1, epochs + 1):
            train_stats = trainer.train_epoch(epoch, on_step)
            elapsed = time.perf_counter() - start
            record = trainer.epoch_record(epoch, train_stats, elapsed)
            checkpoint.save(run_dir, trainer.snapshot(epoch, [*result.records, record], elapsed))
            result.records.append(record)
            write_metrics(result.records, run_dir / METRICS_FILE)
            if on_epoch:
                on_epoch(record)
    except KeyboardInterrupt:
        # Ctrl-C may land between the checkpoint and metrics.csv: what is saved is what the checkpoint holds
        try:
            saved = checkpoint.load(run_dir)
        except RunDirError:
            saved = None
        result.records = list(saved.records) if saved else []
        _record_stop(cfg, plan, trainer, result, "interrupted", None)
        raise RunInterrupted(run_dir, len(result.records), epochs) from None
    except DpsgdError as exc:
        done = len(result.records)
        kept = (f"; epochs 1–{done} are kept in {run_dir} (checkpoint and metrics.csv)" if done
                else "; no epoch had finished")
        _record_stop(cfg, plan, trainer, result, "failed", f"{exc}{kept}")
        raise type(exc)(f"{exc}{kept}") from None


def _record_stop(cfg, plan, trainer, result, status: str, error: str | None) -> None:
    """Best effort: mark run.yaml interrupted or failed and make metrics.csv hold the finished epochs
    (the checkpoint already holds them)."""
    doc = _run_document(cfg, plan, trainer, status, result)
    if error:
        doc["error"] = error
    try:
        if result.records:
            write_metrics(result.records, result.run_dir / METRICS_FILE)
        write_yaml(doc, result.run_dir / RUN_FILE)
    except (DpsgdError, KeyboardInterrupt):
        pass


def _check_continues(ckpt: checkpoint.Checkpoint, cfg: ExperimentConfig, plan: PrivacyPlan,
                     fingerprint: str) -> None:
    """The checkpoint must belong to this config and these data, else resuming would not continue it."""
    where = checkpoint.path_in(cfg.run_dir)
    stored, current = flatten(ckpt.state.get("config") or {}), flatten(cfg.to_dict())
    changed = sorted(k for k in stored.keys() | current.keys()
                     if k not in _RELOCATABLE and stored.get(k) != current.get(k))
    if changed:
        raise RunDirError(f"{where}: was written with a different config than {RUN_FILE} now holds "
                          f"({', '.join(changed)}); resuming would not continue the same run")
    if ckpt.state.get("noise_multiplier") != plan.noise_multiplier:
        raise RunDirError(f"{where}: trained with σ = {ckpt.state.get('noise_multiplier')}, but the config "
                          f"now resolves to σ = {plan.noise_multiplier}; cannot resume")
    if ckpt.state.get("data_fingerprint") != fingerprint:
        raise RunDirError(f"{where}: the dataset differs from the one the run started with; resume it "
                          "with the same data (data.data_dir / DPSGD_DATA_DIR)")
    b, n, sampling = cfg.data.batch_size, int(ckpt.state.get("dataset_size", -1)), cfg.data.sampling
    if ckpt.epochs_done > cfg.training.epochs or n < b or \
            ckpt.steps_done != steps_after_epochs(ckpt.epochs_done, b, n, sampling):
        raise RunDirError(f"{where}: its epochs/steps counters are inconsistent with the config; "
                          "cannot resume")


NONPRIVATE_STATEMENT = ("No differential privacy: privacy.enabled is false (non-private baseline: "
                        "no clipping, no noise).")


def _run_document(cfg, plan: PrivacyPlan, trainer: _Trainer | None, status: str, result: RunResult | None):
    doc: dict[str, Any] = {
        "status": status,
        "config": cfg.to_dict(),
        "resolved": {
            "noise_multiplier": plan.noise_multiplier,
            "accounting_noise_multiplier": plan.accounting_noise_multiplier,
            "sampling_rate": plan.sampling_rate,
            "microbatch_size": plan.microbatch_size,
            "total_steps": plan.total_steps,
        },
        "versions": library_versions(),
    }
    if trainer is not None:
        doc["resolved"].update({"dataset_size": trainer.n, "capacity": trainer.sampler.capacity,
                                "jit_compile": trainer.jit_compile, "gradient_path": trainer.gradient_path})
        if trainer.resumed_at:
            doc["resumed_at_epochs"] = list(trainer.resumed_at)
    if result is not None and status != FINISHED:
        doc["epochs_done"] = len(result.records)
    if status == FINISHED and result is not None and result.records:
        last = result.records[-1]
        doc["final"] = {k: last[k] for k in ("epoch", "step", "test_accuracy", "epsilon_rdp", "epsilon_pld")}
        doc["privacy_statement"] = result.statement
    return doc


class _Trainer:
    """Holds the model, the compiled step, the sampler and the privacy ledger of one run."""

    def __init__(self, cfg: ExperimentConfig, dataset: Dataset, plan: PrivacyPlan, fingerprint: str = ""):
        import keras
        import tensorflow as tf

        from dpsgd_cli import engine
        from dpsgd_cli.model import build_model

        self.tf = tf
        self.cfg, self.data, self.plan = cfg, dataset, plan
        self.n = len(dataset.y_train)
        keras.utils.set_random_seed(cfg.seed)
        self.sampler = Sampler(sampling=cfg.data.sampling, batch_size=cfg.data.batch_size,
                               dataset_size=self.n, seed=cfg.seed)
        self.model = build_model(cfg.model.architecture, cfg.model.activation, seed=cfg.seed)
        self.optimizer = engine.make_optimizer(cfg.training.optimizer, cfg.training.learning_rate,
                                               cfg.training.momentum)
        private = cfg.privacy.enabled
        grad_fn, forward_fn, self.gradient_path = engine.choose_gradient_path(
            self.model, cfg.training.gradient_path, private)
        self.jit_compile = engine.resolve_jit_compile(cfg.training.jit_compile, private=private,
                                                      gradient_path=self.gradient_path)
        settings = engine.StepSettings(
            private=private, noise_multiplier=plan.noise_multiplier, l2_norm_clip=cfg.privacy.l2_norm_clip,
            microbatch_size=plan.microbatch_size,
            denominator=float(cfg.data.batch_size // plan.microbatch_size),
            noise_seed=cfg.seed, jit_compile=self.jit_compile)
        self.step_fn, self.chunk_fn = engine.make_train_step(self.model, self.optimizer, settings, grad_fn,
                                                             forward_fn)
        self.predict = tf.function(lambda x: self.model(x, training=False), jit_compile=self.jit_compile)
        self.zeros = [tf.zeros_like(v) for v in self.model.trainable_variables]
        self.ledger = accounting.PrivacyLedger(plan.accounting_noise_multiplier or 0.0, plan.sampling_rate,
                                               cfg.privacy.delta)
        self.steps_done = 0
        self.fingerprint = fingerprint
        self.versions = library_versions()
        self.resumed_at: list[int] = []

    def train_epoch(self, epoch: int, on_step: StepCallback | None) -> dict[str, float]:
        tf = self.tf
        total = steps_in_epoch(epoch, self.cfg.data.batch_size, self.n, self.cfg.data.sampling)
        loss_sum = correct = count = 0.0
        for i, batch in enumerate(self.sampler.epoch(epoch), start=1):
            (idx, mask), *overflow = batch.chunks
            extra = self.zeros
            if overflow:
                parts = [self.chunk_fn(self.data.x_train[j], self.data.y_train[j], m) for j, m in overflow]
                extra = [tf.add_n(list(p)) for p in zip(*parts)]
            out = self.step_fn(self.data.x_train[idx], self.data.y_train[idx], mask, extra,
                               tf.constant(batch.step, tf.int64))
            step_loss, step_correct, step_count = (float(v) for v in out)
            if overflow:  # the overflow chunks' examples are trained on but not in the running stats
                step_count = float(mask.sum())
            if not math.isfinite(step_loss):
                raise TrainingError(f"loss is {step_loss} at epoch {epoch}, step {batch.step + 1}: training "
                                    f"diverged; lower training.learning_rate "
                                    f"(now {self.cfg.training.learning_rate:g})")
            loss_sum, correct, count = loss_sum + step_loss, correct + step_correct, count + step_count
            self.steps_done = batch.step + 1
            if on_step:
                on_step({"epoch": epoch, "step_in_epoch": i, "steps_in_epoch": total,
                         "train_loss": loss_sum / max(count, 1), "train_accuracy": correct / max(count, 1)})
        if self.cfg.privacy.enabled:
            self.ledger.advance(total)
        return {"train_loss": loss_sum / max(count, 1), "train_accuracy": correct / max(count, 1)}

    def evaluate(self) -> dict[str, Any]:
        """Test loss, accuracy and per-class accuracy on the whole test split."""
        from dpsgd_cli.engine import per_example_loss

        x, y = self.data.x_test, self.data.y_test
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
                     for k in range(10)}
        return {"test_loss": float(losses.mean()), "test_accuracy": float(hits.mean()), **per_class}

    def epoch_record(self, epoch: int, train_stats: dict[str, float], elapsed: float) -> dict[str, Any]:
        private = self.cfg.privacy.enabled
        return {
            "epoch": epoch, "step": self.steps_done, **train_stats, **self.evaluate(),
            **self._epsilons(),
            "delta": self.cfg.privacy.delta,
            "noise_multiplier": self.plan.noise_multiplier if private else 0.0,
            "l2_norm_clip": self.cfg.privacy.l2_norm_clip if private else math.inf,
            "batch_size": self.cfg.data.batch_size,
            "learning_rate": self.cfg.training.learning_rate,
            "elapsed_s": round(elapsed, 3),
        }

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
            epsilon_rdp=self.ledger.epsilon("rdp"), epsilon_pld=self.ledger.epsilon("pld"))

    def snapshot(self, epoch: int, records: list[dict[str, Any]], elapsed: float) -> checkpoint.Checkpoint:
        """The checkpoint after `epoch`; TrainingError if the weights or the test loss are not finite (a
        diverged model is never checkpointed over the last good one)."""
        weights = self.model.get_weights()
        loss = records[-1]["test_loss"]
        finite_weights = all(np.isfinite(w).all() for w in weights)
        if not finite_weights or not math.isfinite(loss):
            what = "the weights became non-finite" if not finite_weights else f"the test loss is {loss}"
            raise TrainingError(f"{what} after epoch {epoch} (step {self.steps_done}): training diverged; "
                                f"lower training.learning_rate (now {self.cfg.training.learning_rate:g})")
        state = {
            "epochs_done": epoch, "epochs": self.cfg.training.epochs, "steps_done": self.steps_done,
            "ledger_steps": self.ledger.steps, "elapsed_s": elapsed, "records": records,
            "config": self.cfg.to_dict(), "noise_multiplier": self.plan.noise_multiplier,
            "dataset_size": self.n, "data_fingerprint": self.fingerprint,
            "model_variables": [v.path for v in self.model.weights],
            "optimizer_variables": self._optimizer_names(), "resumed_at": self.resumed_at,
            "versions": self.versions,
        }
        return checkpoint.Checkpoint(state, weights, [v.numpy() for v in self.optimizer.variables])

    def restore(self, ckpt: checkpoint.Checkpoint) -> None:
        """Load the weights and optimizer state of `ckpt` and replay the privacy ledger to its step."""
        where = checkpoint.path_in(self.cfg.run_dir)
        self._assign(where, "model", self.model.weights, [v.path for v in self.model.weights],
                     ckpt.model_weights, ckpt.state.get("model_variables"))
        self._assign(where, "optimizer", self.optimizer.variables, self._optimizer_names(),
                     ckpt.optimizer_variables, ckpt.state.get("optimizer_variables"))
        b, sampling = self.cfg.data.batch_size, self.cfg.data.sampling
        for epoch in range(1, ckpt.epochs_done + 1):  # the ledger calls of the first attempt, in order
            if self.cfg.privacy.enabled:
                self.ledger.advance(steps_in_epoch(epoch, b, self.n, sampling))
            replayed = self._epsilons()
        self.steps_done = ckpt.steps_done
        if self.cfg.privacy.enabled and ckpt.records:
            recorded = {k: ckpt.records[-1][k] for k in replayed}
            if self.ledger.steps != ckpt.state.get("ledger_steps") or not all(
                    math.isclose(replayed[k], recorded[k], rel_tol=1e-9) for k in replayed):
                raise RunDirError(f"{where}: replaying the privacy ledger to step {self.ledger.steps} gives "
                                  f"{replayed}, but the run recorded {recorded}; cannot resume")
        self.resumed_at = [*ckpt.state.get("resumed_at", []), ckpt.epochs_done]

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
        try:
            self.model.save_weights(tmp)
            tmp.replace(path)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise OutputError(f"{path}: cannot write ({exc.strerror or exc.__class__.__name__})") from None
