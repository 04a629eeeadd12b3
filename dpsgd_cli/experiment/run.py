"""One experiment, end to end: `run(cfg) -> RunResult`. Wires sampling, the DP step and accounting.

The privacy event accounted is derived here from the very numbers the step uses (σ, C, microbatch size,
sampling rate, steps actually taken), never re-typed. This module never prints; progress goes to callbacks.

Nothing finished is lost: after every epoch the run writes `checkpoint.ckpt` (see `checkpoint`), then
metrics.csv, so metrics.csv never holds an epoch the checkpoint lacks. `run(cfg, resume=True)` continues
from that checkpoint: sampling is keyed by (run key, epoch) and noise by (run key, step), and the key is
read back from the run's 0600 `run.key` (see `run_key`), so with the weights, the optimizer state and the
privacy ledger restored (replaying the steps each recorded epoch executed) the resumed run
repeats the uninterrupted one exactly, ε included.

Trackers (`tracking.*`: TensorBoard, MLflow) get what `runs.trackers.tracked_metrics` allows after each
epoch's metrics.csv, and the statement, run.yaml and plots at the end; their run ids are kept in run.yaml so
a resume continues them.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dpsgd_cli.config import ExperimentConfig, flatten, release_bounds, resolve_aliases
from dpsgd_cli.errors import DpsgdError, RunDirError
from dpsgd_cli.privacy.plan import PrivacyPlan, plan_privacy
from dpsgd_cli.privacy.run_key import RunKey, load_run_key, new_run_key, save_run_key
from dpsgd_cli.privacy.sampling import steps_after_epochs
from dpsgd_cli.privacy.statement import COVERAGE, privacy_statement
from dpsgd_cli.runs import checkpoint, trackers
from dpsgd_cli.runs.results import EpochRecord, write_metrics, write_yaml
from dpsgd_cli.runs.run_dir import (
    FINISHED,
    METRICS_FILE,
    RUN_FILE,
    WEIGHTS_FILE,
    RunDir,
    check_run_dir,
    prepare_run_dir,
)
from dpsgd_cli.training import augmentation, distribute, feature_norm, features
from dpsgd_cli.training.data import Dataset, data_fingerprint, load_config_data
from dpsgd_cli.training.graph_registry import released_custom_gradients
from dpsgd_cli.training.trainer import StepCallback, Trainer, library_versions

EpochCallback = Callable[[EpochRecord], None]
# Keys of the config that may differ between a checkpoint and run.yaml: where the run lives and where the
# data are read from (the data themselves are compared by fingerprint).
# So are the distribute.* keys: the mechanism and ε do not depend on them (a run may resume on other devices).
_RELOCATABLE = ("name", "output_dir", "data.data_dir", "data.path", "distribute.strategy",
                "distribute.devices", "distribute.cpu_devices", "distribute.cluster",
                "distribute.collective_timeout_s")


@dataclass
class RunResult:
    """What `run` returns; the same is on disk in `run_dir` (metrics.csv, run.yaml).

    Attributes:
        run_dir: the run's directory.
        records: one `EpochRecord` (a mapping keyed by metrics.csv's columns: epoch, test_accuracy,
            epsilon_rdp, epsilon_pld, …) per finished epoch. train_loss and train_accuracy are computed on
            the private batches without noise and are not covered by ε.
        statement: the privacy guarantee in words: ε, δ and what they assume and cover.
        noise_multiplier: σ as trained (calibrated when the config gives a target ε); None if non-private.
        data: what the run trained on (run.yaml's `resolved.data`: source, what one record is, n, shapes,
            classes).
        tracking: the trackers' run ids (run.yaml's `tracking`).
    """

    run_dir: Path
    records: list[EpochRecord] = field(default_factory=list)
    statement: str = ""
    noise_multiplier: float | None = None
    data: dict[str, Any] = field(default_factory=dict)
    tracking: dict[str, str] = field(default_factory=dict)


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C (or SIGTERM via the CLI) stopped a run; the epochs finished before it are saved."""

    def __init__(self, run_dir: Path, epochs_done: int, epochs: int):
        super().__init__(f"{run_dir}: interrupted after {epochs_done} of {epochs} epochs")
        self.run_dir, self.epochs_done, self.epochs = run_dir, epochs_done, epochs


def run(cfg: ExperimentConfig, *, on_step: StepCallback | None = None,
        on_epoch: EpochCallback | None = None, overwrite: bool = False, resume: bool = False,
        run_key: RunKey | None = None, tracking_parent: str | None = None) -> RunResult:
    """Train `cfg` (what `dpsgd train` does, without the terminal) and write run.key (0600), metrics.csv,
    run.yaml and a checkpoint per epoch under `cfg.run_dir`.

    Args:
        cfg: the experiment, from `load_config`.
        on_step: called every few steps with a dict (epoch, step_in_epoch, steps_in_epoch, train_loss,
            train_accuracy: the last two from the private batches, not covered by ε).
        on_epoch: called with each epoch's `EpochRecord` once it is saved.
        overwrite: replace an existing run directory.
        resume: continue the unfinished run in `cfg.run_dir` from its checkpoint and run.key (`cfg` must be
            the one it was started with: see `resume_config`).
        run_key: the key of a new run (default: a fresh secret key, or the reproducible one when
            `privacy.reproducible` is true).
        tracking_parent: the MLflow run this one is a child of (a sweep's points).

    Returns:
        A `RunResult`: the run directory, one record per epoch, σ and the privacy statement.

    Raises:
        RunDirError: the run directory exists (without `overwrite`) or cannot be resumed.
        ConfigError, DataError: bad input, data a built-in model cannot take, or a tracker that cannot
            start, before anything is written.
        TrainingError: a non-finite loss (the last checkpoint and metrics.csv stay as they were).
        RunInterrupted: Ctrl-C; the finished epochs are saved.
    """
    trackers.require_packages(cfg)
    dist = distribute.setup(cfg)  # first: devices and collectives are set up before TensorFlow starts
    if dist is not None and not dist.is_chief:  # only the chief writes cfg.run_dir
        cfg = distribute.worker_config(dist, cfg, resume)
    run_dir = cfg.run_dir
    check_run_dir(run_dir, overwrite=overwrite, resume=resume)
    ckpt = RunDir(run_dir).checkpoint() if resume else None
    key = load_run_key(run_dir) if resume else run_key or new_run_key(
        reproducible=cfg.privacy.reproducible, seed=cfg.seed)
    if dist is not None:  # every worker samples and draws noise with the chief's key
        key = distribute.shared_key(dist, key)
    _check_key_mode(key, cfg, run_dir)
    dataset = load_config_data(cfg)
    real_examples = len(dataset.y_train)
    from dpsgd_cli.training.model import check_fits, model_from_config

    check_fits(None, dataset.input_shape, cfg.data.augmentation)
    # a builder's errors and a model that cannot take the data come before the run dir changes
    model = model_from_config(cfg.model, cfg.seed, dataset.input_shape, dataset.num_classes)
    data_facts = _data_facts(dataset, real_examples)
    canary_set = None
    if cfg.privacy.canaries:
        from dpsgd_cli.audit import canaries

        dataset, canary_set = canaries.add_canaries(dataset, cfg.privacy.canaries, cfg.seed, key)
    recorded_sigma = ckpt.state.get("noise_multiplier") if ckpt and cfg.privacy.target_epsilon else None
    plan = plan_privacy(cfg, real_examples, noise_multiplier=recorded_sigma)
    fingerprint = data_fingerprint(dataset)
    if ckpt:
        _check_continues(ckpt, cfg, plan, fingerprint)
    recorded = RunDir(run_dir).document().get("tracking") if resume else None
    # only the chief (or the one process) tracks: the other workers train the same run
    tracked = (trackers.open_trackers(cfg, run_dir, recorded=recorded, parent_run_id=tracking_parent)
               if dist is None or dist.is_chief else trackers.Trackers())
    result = RunResult(run_dir=run_dir, noise_multiplier=plan.noise_multiplier, data=data_facts,
                       tracking=dict(tracked.ids))
    try:
        with released_custom_gradients():  # else each run in one process keeps its training set alive
            _run_stages(cfg, plan, key, ckpt, dataset, real_examples, canary_set, fingerprint, model,
                        resume, overwrite, result, tracked, on_step, on_epoch)
    except RunInterrupted:
        tracked.close("interrupted")
        raise
    except BaseException:
        tracked.close("failed")
        raise
    tracked.close("finished")
    return result


def _run_stages(cfg: ExperimentConfig, plan: PrivacyPlan, key: RunKey, ckpt, dataset: Dataset,
                real_examples: int, canary_set, fingerprint: str, model, resume: bool, overwrite: bool,
                result: RunResult, tracked: trackers.Trackers, on_step, on_epoch) -> None:
    """From the run directory on: prepare it, build the trainer, train, write the final files."""
    run_dir = result.run_dir
    if resume:
        checkpoint.remove_temporaries(run_dir)
    else:
        prepare_run_dir(run_dir, overwrite)
        save_run_key(key, run_dir)
        write_yaml(_run_document(cfg, plan, None, "running", result), run_dir / RUN_FILE)
    if canary_set is not None:  # deterministic in (seed, key): a resumed run writes the same file again
        from dpsgd_cli.audit import canaries

        canaries.save_canaries(canary_set, run_dir)
    tail = len(dataset.y_train) - real_examples  # the canaries: their features are not cached
    images = dataset.x_train
    if features.needs_features(cfg.model.architecture):  # ScatterNet: train on cached features
        dataset = features.prepare(dataset, cfg.model.architecture, uncached_tail=tail)
    dataset = augmentation.with_views(dataset, images, cfg.data.augmentation, cfg.model.architecture,
                                      uncached_tail=tail)
    feature_stats = None
    if cfg.model.feature_norm == "private_stats":  # released from the key's noise: the same on a resume
        # with the very noise multipliers the plan accounts (none for a non-private twin)
        dataset, feature_stats = feature_norm.apply(dataset, release_bounds(cfg), plan.releases, key,
                                                    dataset_size=plan.dataset_size)
    trainer = Trainer(cfg, dataset, plan, key, fingerprint, model)
    trainer.feature_stats = feature_stats
    if ckpt:
        trainer.restore(ckpt, checkpoint.path_in(run_dir))
        result.records = [EpochRecord.from_row(r) for r in ckpt.records]
        write_metrics(result.records, run_dir / METRICS_FILE)  # as the checkpoint has it
    doc = _run_document(cfg, plan, trainer, "running", result)
    write_yaml(doc, run_dir / RUN_FILE)
    tracked.start(trackers.hyperparameters(cfg, doc["resolved"]), result.records)

    def after_epoch(record: EpochRecord) -> None:
        tracked.log_epoch(record)
        if on_epoch:
            on_epoch(record)

    _train_epochs(cfg, trainer, plan, result, on_step, after_epoch, ckpt.elapsed_s if ckpt else 0.0)
    trainer.save_weights(run_dir / WEIGHTS_FILE)
    result.statement = _statement(cfg, trainer)
    write_yaml(_run_document(cfg, plan, trainer, FINISHED, result), run_dir / RUN_FILE)
    tracked.finish(result.statement, run_dir)


def _statement(cfg: ExperimentConfig, trainer: Trainer) -> str:
    """The run's privacy statement; it says so when the training metrics went to a tracker."""
    note = trackers.coverage_note(cfg)
    if not cfg.privacy.enabled:
        return NONPRIVATE_STATEMENT
    facts = trainer.facts()
    if note:
        facts = dataclasses.replace(facts, coverage=f"{facts.coverage or COVERAGE} {note}")
    return privacy_statement(facts)


def _data_facts(dataset: Dataset, real_examples: int) -> dict[str, Any]:
    """run.yaml's `resolved.data`: the source, what one record is, n (the training records the loader
    returned, after data.train_size; canaries not counted), the test records, the input shape, the
    classes."""
    return {"source": dataset.name, "record": dataset.record, "train_records": real_examples,
            "test_records": len(dataset.y_test), "input_shape": list(dataset.input_shape),
            "num_classes": dataset.num_classes, "class_names": list(dataset.class_names)}


def _train_epochs(cfg, trainer: Trainer, plan: PrivacyPlan, result: RunResult, on_step, on_epoch,
                  elapsed_before: float) -> None:
    """Epochs after those in `result.records`: train, evaluate, checkpoint, then metrics.csv."""
    run_dir, epochs = result.run_dir, cfg.training.epochs
    start = time.perf_counter() - elapsed_before
    try:
        for epoch in range(len(result.records) + 1, epochs + 1):
            train_stats = trainer.train_epoch(epoch, on_step)
            elapsed = time.perf_counter() - start
            record = EpochRecord.from_row(trainer.epoch_row(epoch, train_stats, elapsed))
            checkpoint.save(run_dir, checkpoint.Checkpoint(*trainer.snapshot(epoch, [*result.records, record],
                                                                             elapsed)))
            result.records.append(record)
            write_metrics(result.records, run_dir / METRICS_FILE)
            if on_epoch:
                on_epoch(record)
    except KeyboardInterrupt:
        # Ctrl-C may land between the checkpoint and metrics.csv: what is saved is what the checkpoint holds
        try:
            saved = RunDir(run_dir).checkpoint()
        except RunDirError:
            saved = None
        result.records = [EpochRecord.from_row(r) for r in saved.records] if saved else []
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
    stored, current = flatten(resolve_aliases(ckpt.state.get("config") or {})), flatten(cfg.to_dict())
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


RANDOMNESS = {
    False: "secret: noise, batches and canary coins from a 128-bit key drawn from OS entropy, kept only in "
           "run.key (mode 0600; never share it)",
    True: "reproducible: noise, batches and canary coins derived from seed (and a sweep point's name; "
          "privacy.reproducible: true); whoever knows it can regenerate the noise, so ε holds only while "
          "seed and config stay secret",
}


def _check_key_mode(key: RunKey, cfg: ExperimentConfig, run_dir: Path) -> None:
    """The key's mode must be what `privacy.reproducible` asks for (a resumed run keeps its mode)."""
    wanted = "reproducible" if cfg.privacy.reproducible else "secret"
    if key.mode != wanted:
        raise RunDirError(f"{run_dir}: the run key is {key.mode} but privacy.reproducible is "
                          f"{str(cfg.privacy.reproducible).lower()}; a run keeps the mode it started with")


NONPRIVATE_STATEMENT = ("No differential privacy: privacy.enabled is false (non-private baseline: "
                        "no clipping, no noise).")


def _plan_record(step_plan, folded=()) -> dict[str, Any]:
    """The step's plan for run.yaml: the layers applied once to the training set (`fold`), the
    formulation of each layer, how it was decided, and the timings."""
    record = {"formulation": step_plan.formulation, "chunk_size": step_plan.chunk_size,
              "source": step_plan.source}
    if folded:
        record["applied_once"] = [layer.name for layer in folded]
    if step_plan.source == "measured":
        record.update({"planning_s": step_plan.planning_s, "step_ms": step_plan.step_ms})
    return record


def _run_document(cfg, plan: PrivacyPlan, trainer: Trainer | None, status: str, result: RunResult | None):
    doc: dict[str, Any] = {
        "status": status,
        "config": cfg.to_dict(),
        "randomness": RANDOMNESS[cfg.privacy.reproducible],
        "resolved": {
            "noise_multiplier": plan.noise_multiplier,
            "accounting_noise_multiplier": plan.accounting_noise_multiplier,
            "sampling_rate": plan.sampling_rate,
            "microbatch_size": plan.microbatch_size,
            "total_steps": plan.total_steps,
        },
        "versions": library_versions(),
    }
    if result is not None and result.data:
        doc["resolved"]["data"] = dict(result.data)
    if result is not None and result.tracking:
        doc["tracking"] = dict(result.tracking)
    if trainer is not None:
        doc["resolved"].update({"dataset_size": trainer.n, "capacity": trainer.sampler.capacity,
                                "jit_compile": trainer.jit_compile, "gradient_path": trainer.gradient_path,
                                "plan": _plan_record(trainer.step_plan, trainer.folded)})
        doc["resolved"]["distribute"] = trainer.distribution_record()
        if trainer.feature_stats is not None:  # the released statistics (covered by ε: publishable)
            doc["resolved"]["feature_norm"] = {"releases": list(plan.releases), **trainer.feature_stats}
        if trainer.resumed_at:
            doc["resumed_at_epochs"] = list(trainer.resumed_at)
    if result is not None and status != FINISHED:
        doc["epochs_done"] = len(result.records)
    if status == FINISHED and result is not None and result.records:
        last = result.records[-1]
        doc["final"] = {k: last[k] for k in ("epoch", "step", "test_accuracy", "epsilon_rdp", "epsilon_pld")}
        doc["privacy_statement"] = result.statement
    return doc


