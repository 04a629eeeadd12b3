"""A copy of a finished run that is safe to publish: what the run's (ε, δ) covers, and nothing else.

Published: run.yaml (config, σ, the privacy statement), metrics.csv without `train_loss` and
`train_accuracy` (computed on the private batches without noise, so not covered by ε), the final
weights, PNG plots (they draw test metrics and ε only) and audit.json. Never published: `run.key` (with it
the noise can be subtracted), `checkpoint.ckpt` (resume state, holds the uncovered train metrics),
`canaries.npz` (copies of training images and their secret inclusion coins), and any other file.

The copy is assembled in a temporary folder beside the destination and renamed into place, so an error
leaves no half-written export.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from dpsgd_cli.errors import ConfigError, OutputError, RunDirError
from dpsgd_cli.runs.run_dir import (
    AUDIT_FILE,
    FINISHED,
    METRICS_FILE,
    RUN_FILE,
    SEARCH_FILE,
    WEIGHTS_FILE,
    RunDir,
)

COPIED = (RUN_FILE, WEIGHTS_FILE, AUDIT_FILE)
UNCOVERED_COLUMNS = ("train_loss", "train_accuracy")


def export_run(run_dir: Path, dest: Path, *, allow_reproducible: bool = False) -> list[Path]:
    """Write the publishable files of the finished run in `run_dir` to the new folder `dest`; return them.

    Refuses a run trained in reproducible mode unless `allow_reproducible` (its seed, in run.yaml,
    regenerates the noise: publishing it voids the guarantee)."""
    run_dir, dest = Path(run_dir), Path(dest)
    searches = [p for p in run_dir.resolve().parents if (p / SEARCH_FILE).is_file()]
    if searches:
        raise ConfigError(f"{run_dir}: is a trial of the private hyperparameter search in {searches[0]}, "
                          "whose ε covers only the search's publication; export that folder instead")
    doc = _finished_run(run_dir)
    if (doc.get("config", {}).get("privacy", {}) or {}).get("reproducible") and not allow_reproducible:
        raise ConfigError(f"{run_dir}: trained in reproducible mode (privacy.reproducible: true): its seed "
                          f"in {RUN_FILE} regenerates the noise and the batches, so publishing it voids the "
                          "privacy guarantee; retrain in the default (secret) mode, or pass "
                          "--allow-reproducible if the seed is not secret anyway")
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise OutputError(f"{dest}: exists and is not an empty folder; choose a new destination")
    if dest.resolve().is_relative_to(run_dir.resolve()):
        raise OutputError(f"{dest}: is inside the run directory; choose a folder outside it")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.export."))
    except OSError as exc:
        raise OutputError(f"{dest}: cannot create ({exc.strerror or exc.__class__.__name__})") from None
    try:
        _assemble(run_dir, staging)
        if dest.exists():
            dest.rmdir()
        staging.rename(dest)
    except OSError as exc:
        raise OutputError(f"{dest}: cannot write the export "
                          f"({exc.strerror or exc.__class__.__name__})") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return sorted(dest.iterdir())


def _finished_run(run_dir: Path) -> dict:
    doc = RunDir(run_dir).document()
    if doc.get("status") != FINISHED:
        raise RunDirError(f"{run_dir}: the run is not finished; export a finished run")
    return doc


def _assemble(run_dir: Path, staging: Path) -> None:
    import pandas as pd

    for name in COPIED:
        if (run_dir / name).is_file():
            shutil.copyfile(run_dir / name, staging / name)
    for png in sorted(run_dir.glob("*.png")):
        shutil.copyfile(png, staging / png.name)
    if (run_dir / METRICS_FILE).is_file():
        frame = pd.read_csv(run_dir / METRICS_FILE)
        kept = frame.drop(columns=[c for c in UNCOVERED_COLUMNS if c in frame.columns])
        kept.to_csv(staging / METRICS_FILE, index=False)
