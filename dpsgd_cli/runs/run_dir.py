"""The run directory: what it holds, and whether a run may be started in it, replace it or resume it.

A run directory holds run.yaml (config, status, versions), run.key (the secret key, 0600),
metrics.csv, checkpoint.ckpt and, once finished, the model weights; `RunDir` names them all and is the
one reader of run.yaml and of the checkpoint. Everything here reads only, except `prepare_run_dir`, which
empties the directory for a new run after `check_run_dir` allowed it.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dpsgd_cli.config import ExperimentConfig, config_from_dict, replace
from dpsgd_cli.errors import ConfigError, OutputError, RunDirError
from dpsgd_cli.privacy.run_key import KEY_FILE
from dpsgd_cli.runs import checkpoint
from dpsgd_cli.runs.results import read_yaml

RUN_FILE = "run.yaml"
METRICS_FILE = "metrics.csv"
WEIGHTS_FILE = "model.weights.h5"
CANARIES_FILE = "canaries.npz"
AUDIT_FILE = "audit.json"
FINISHED = "finished"
SEARCH_FILE = "search.yaml"  # marks a private hyperparameter search's folder (experiment.tune)


@dataclass(frozen=True)
class RunDir:
    """One run directory: the names of its files and the one way each is read.

    `document()` reads run.yaml (every failure one RunDirError naming the file), `config()` the config it
    records, placed at this directory (so a moved run still works), `checkpoint()` the checkpoint,
    verified once per version of the file in this process, however many readers ask."""

    path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    @property
    def run_file(self) -> Path:
        return self.path / RUN_FILE

    @property
    def metrics_file(self) -> Path:
        return self.path / METRICS_FILE

    @property
    def weights_file(self) -> Path:
        return self.path / WEIGHTS_FILE

    @property
    def key_file(self) -> Path:
        return self.path / KEY_FILE

    @property
    def checkpoint_file(self) -> Path:
        return checkpoint.path_in(self.path)

    @property
    def canaries_file(self) -> Path:
        return self.path / CANARIES_FILE

    @property
    def audit_file(self) -> Path:
        return self.path / AUDIT_FILE

    def has_run_file(self) -> bool:
        return self.run_file.is_file()

    def document(self) -> dict[str, Any]:
        """run.yaml as a mapping; RunDirError if it is missing, unreadable or not a run description."""
        if not self.has_run_file():
            raise RunDirError(f"{self.path}: not a run directory (no {RUN_FILE})")
        try:
            doc = read_yaml(self.run_file)
        except Exception as exc:  # yaml, I/O and decoding errors come in many types
            raise RunDirError(f"{self.run_file}: unreadable ({exc.__class__.__name__})") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("config"), dict):
            raise RunDirError(f"{self.run_file}: not a dpsgd run description (no config)")
        return doc

    def status(self) -> str:
        return str(self.document().get("status", "unknown"))

    def config(self) -> ExperimentConfig:
        """The recorded config, with output_dir and name pointing at this directory."""
        try:
            cfg = config_from_dict(self.document()["config"])
            return replace(cfg, output_dir=str(self.path.parent), name=self.path.name)
        except ConfigError as exc:
            raise RunDirError(f"{self.run_file}: its config no longer loads ({exc})") from None

    def checkpoint(self) -> checkpoint.Checkpoint | None:
        """The verified checkpoint, or None; RunDirError if damaged (verified once per file version)."""
        try:
            stat = os.stat(self.checkpoint_file)
        except FileNotFoundError:
            return None
        except OSError:
            return checkpoint.load(self.path)  # let the loader say what is wrong
        version = (str(self.checkpoint_file.resolve()), stat.st_ino, stat.st_mtime_ns, stat.st_size)
        if _VERIFIED.get("version") != version:
            _VERIFIED.clear()
            _VERIFIED.update(version=version, checkpoint=checkpoint.load(self.path))
        return _VERIFIED["checkpoint"]


_VERIFIED: dict[str, Any] = {}  # the last checkpoint verified in this process, by file version


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
    rd = RunDir(run_dir)
    has_doc, has_ckpt = rd.has_run_file(), rd.checkpoint_file.is_file()
    if not (has_doc or has_ckpt):
        return None
    status, epochs, problem = "unreadable", None, None
    if has_doc:
        try:
            doc = rd.document()
            status = str(doc.get("status", "unknown"))
            epochs = int(doc["config"]["training"]["epochs"])
        except RunDirError:
            status, problem = "unreadable", f"{RUN_FILE} is unreadable"
        except Exception as exc:  # a run.yaml of the wrong shape
            status, problem = "unreadable", f"{RUN_FILE} is unreadable ({exc.__class__.__name__})"
    epochs_done = None
    try:
        ckpt = rd.checkpoint()
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
    _check_resumable_dir(Path(run_dir))
    try:
        return RunDir(run_dir).config()
    except RunDirError as exc:
        raise RunDirError(f"{exc}; cannot resume") from None
