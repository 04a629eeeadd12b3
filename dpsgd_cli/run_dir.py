"""The run directory: what it holds, and whether a run may be started in it, replace it or resume it.

A run directory holds run.yaml (config, status, versions), metrics.csv, checkpoint.ckpt and, once finished,
the model weights. Everything here reads only, except `prepare_run_dir`, which empties the directory for a
new run after `check_run_dir` allowed it.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from dpsgd_cli import checkpoint
from dpsgd_cli.config import ExperimentConfig, config_from_dict, replace
from dpsgd_cli.errors import ConfigError, OutputError, RunDirError
from dpsgd_cli.results import read_yaml

RUN_FILE = "run.yaml"
METRICS_FILE = "metrics.csv"
WEIGHTS_FILE = "model.weights.h5"
FINISHED = "finished"


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
