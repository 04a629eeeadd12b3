"""One experiment, end to end: `run(cfg) -> RunResult`. Wires sampling, the DP step and accounting.

The privacy event accounted is derived here from the very numbers the step uses (σ, C, microbatch size,
sampling rate, steps actually taken), never re-typed. This module never prints; progress goes to callbacks.
"""

from __future__ import annotations

import math
import platform
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dpsgd_cli import __version__, accounting
from dpsgd_cli.config import ExperimentConfig, microbatch_size, resolved_data_dir
from dpsgd_cli.data import Dataset, load_dataset
from dpsgd_cli.errors import ConfigError, RunDirError, TrainingError
from dpsgd_cli.results import write_metrics, write_yaml
from dpsgd_cli.sampling import Sampler, steps_after_epochs, steps_in_epoch

StepCallback = Callable[[dict[str, Any]], None]
EpochCallback = Callable[[dict[str, Any]], None]
EVAL_BATCH = 1000


@dataclass
class RunResult:
    run_dir: Path
    records: list[dict[str, Any]] = field(default_factory=list)
    statement: str = ""
    noise_multiplier: float | None = None


@dataclass(frozen=True)
class PrivacyPlan:
    """The privacy parameters of a run, resolved before training starts."""

    noise_multiplier: float
    accounting_noise_multiplier: float
    sampling_rate: float
    total_steps: int
    microbatch_size: int


def plan_privacy(cfg: ExperimentConfig, dataset_size: int) -> PrivacyPlan:
    """Resolve σ (calibrating it from `target_epsilon` if asked) and the accounting parameters."""
    b, n = cfg.data.batch_size, dataset_size
    if b > n:
        raise ConfigError(f"data.batch_size: {b} is larger than the {n} training examples")
    total = steps_after_epochs(cfg.training.epochs, b, n, cfg.data.sampling)
    k = microbatch_size(cfg)
    sigma = cfg.privacy.noise_multiplier
    if cfg.privacy.enabled and sigma is None:
        sigma = accounting.calibrate_noise_multiplier(cfg.privacy.target_epsilon, cfg.privacy.delta, b / n,
                                                      total, accountant="pld", microbatch_size=k)
    sigma = 0.0 if sigma is None else sigma
    return PrivacyPlan(sigma, accounting.accounting_noise_multiplier(sigma, k), b / n, total, k)


def prepare_run_dir(run_dir: Path, overwrite: bool) -> None:
    """Refuse to clobber an existing run unless `overwrite`; then create the directory."""
    if run_dir.exists() and any(run_dir.iterdir()):
        if not overwrite:
            raise RunDirError(f"{run_dir}: already holds a run; pass --overwrite to replace it "
                              "(or choose another name)")
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    def installed(package: str) -> str:
        try:
            return version(package)
        except PackageNotFoundError:
            return "not installed"

    return {"dpsgd": __version__, "python": platform.python_version(),
            **{name: installed(name) for name in ("tensorflow", "keras", "dp-accounting", "numpy")}}


def run(cfg: ExperimentConfig, *, on_step: StepCallback | None = None,
        on_epoch: EpochCallback | None = None, overwrite: bool = False) -> RunResult:
    """Train `cfg` and write metrics.csv and run.yaml under `cfg.run_dir`; return the records."""
    dataset = load_dataset(cfg.data.dataset, resolved_data_dir(cfg), cfg.data.train_size, cfg.data.test_size)
    canary_set = None
    if cfg.privacy.canaries:
        from dpsgd_cli import canaries

        dataset, canary_set = canaries.add_canaries(dataset, cfg.privacy.canaries, cfg.seed)
    plan = plan_privacy(cfg, len(dataset.y_train))
    run_dir = cfg.run_dir
    prepare_run_dir(run_dir, overwrite)
    if canary_set is not None:
        canaries.save_canaries(canary_set, run_dir)
    trainer = _Trainer(cfg, dataset, plan)
    result = RunResult(run_dir=run_dir, noise_multiplier=plan.noise_multiplier)
    write_yaml(_run_document(cfg, plan, trainer, "running", None), run_dir / "run.yaml")
    start = time.perf_counter()
    for epoch in range(1, cfg.training.epochs + 1):
        train_stats = trainer.train_epoch(epoch, on_step)
        record = trainer.epoch_record(epoch, train_stats, time.perf_counter() - start)
        result.records.append(record)
        write_metrics(result.records, run_dir / "metrics.csv")
        if on_epoch:
            on_epoch(record)
    trainer.save_weights(run_dir / "model.weights.h5")
    facts = trainer.facts()
    result.statement = accounting.privacy_statement(facts) if cfg.privacy.enabled else NONPRIVATE_STATEMENT
    write_yaml(_run_document(cfg, plan, trainer, "finished", result), run_dir / "run.yaml")
    return result


NONPRIVATE_STATEMENT = ("No differential privacy: privacy.enabled is false (non-private baseline: "
                        "no clipping, no noise).")


def _run_document(cfg, plan: PrivacyPlan, trainer: _Trainer, status: str, result: RunResult | None):
    doc: dict[str, Any] = {
        "status": status,
        "config": cfg.to_dict(),
        "resolved": {
            "noise_multiplier": plan.noise_multiplier,
            "accounting_noise_multiplier": plan.accounting_noise_multiplier,
            "sampling_rate": plan.sampling_rate,
            "dataset_size": trainer.n,
            "microbatch_size": plan.microbatch_size,
            "capacity": trainer.sampler.capacity,
            "total_steps": plan.total_steps,
            "jit_compile": trainer.jit_compile,
            "gradient_path": trainer.gradient_path,
        },
        "versions": library_versions(),
    }
    if result is not None and result.records:
        last = result.records[-1]
        doc["final"] = {k: last[k] for k in ("epoch", "step", "test_accuracy", "epsilon_rdp", "epsilon_pld")}
        doc["privacy_statement"] = result.statement
    return doc


class _Trainer:
    """Holds the model, the compiled step, the sampler and the privacy ledger of one run."""

    def __init__(self, cfg: ExperimentConfig, dataset: Dataset, plan: PrivacyPlan):
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
        self.jit_compile = engine.resolve_jit_compile(cfg.training.jit_compile)
        private = cfg.privacy.enabled
        grad_fn, self.gradient_path = engine.choose_gradient_sum_fn(self.model, cfg.training.gradient_path,
                                                                    private)
        settings = engine.StepSettings(
            private=private, noise_multiplier=plan.noise_multiplier, l2_norm_clip=cfg.privacy.l2_norm_clip,
            microbatch_size=plan.microbatch_size,
            denominator=float(cfg.data.batch_size // plan.microbatch_size),
            noise_seed=cfg.seed, jit_compile=self.jit_compile)
        self.step_fn, self.chunk_fn = engine.make_train_step(self.model, self.optimizer, settings, grad_fn)
        self.predict = tf.function(lambda x: self.model(x, training=False), jit_compile=self.jit_compile)
        self.zeros = [tf.zeros_like(v) for v in self.model.trainable_variables]
        self.ledger = accounting.PrivacyLedger(plan.accounting_noise_multiplier or 0.0, plan.sampling_rate,
                                               cfg.privacy.delta)
        self.steps_done = 0

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
                raise TrainingError(f"loss is {step_loss} at epoch {epoch}, step {batch.step}: training "
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
            "epsilon_rdp": self.ledger.epsilon("rdp") if private else math.inf,
            "epsilon_pld": self.ledger.epsilon("pld") if private else math.inf,
            "delta": self.cfg.privacy.delta,
            "noise_multiplier": self.plan.noise_multiplier if private else 0.0,
            "l2_norm_clip": self.cfg.privacy.l2_norm_clip if private else math.inf,
            "batch_size": self.cfg.data.batch_size,
            "learning_rate": self.cfg.training.learning_rate,
            "elapsed_s": round(elapsed, 3),
        }

    def facts(self) -> accounting.PrivacyFacts:
        return accounting.PrivacyFacts(
            noise_multiplier=self.plan.noise_multiplier,
            accounting_noise_multiplier=self.plan.accounting_noise_multiplier,
            l2_norm_clip=self.cfg.privacy.l2_norm_clip, sampling_rate=self.plan.sampling_rate,
            steps=self.ledger.steps, delta=self.cfg.privacy.delta, sampling=self.cfg.data.sampling,
            microbatch_size=self.plan.microbatch_size,
            epsilon_rdp=self.ledger.epsilon("rdp"), epsilon_pld=self.ledger.epsilon("pld"))

    def save_weights(self, path: Path) -> None:
        tmp = path.with_name(".tmp." + path.name)
        self.model.save_weights(tmp)
        tmp.replace(path)
