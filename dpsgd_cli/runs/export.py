"""A copy of a finished run that is safe to publish: what the run's (ε, δ) covers, and nothing else.

Published: run.yaml (config, σ, the privacy statement), metrics.csv with only the covered columns
(`results.COVERED_COLUMNS`: test metrics, ε and the run's settings; never train_loss/train_accuracy,
computed on the private batches without noise, nor elapsed_s, which grows with the secret realised batch
sizes), the final weights, and figures drawn afresh from those covered columns (curves, per-class,
accuracy vs ε). Nothing else found in the run directory is copied: not audit.json (its statistics are
computed on the private training examples without noise), not a figure or table of unknown origin (e.g.
an audit's ROC curve), and never run.key (with it the noise can be subtracted), checkpoint.ckpt (resume
state with the uncovered metrics) or canaries.npz (the canaries' secret inclusion coins).

`include_private=True` (`dpsgd export --include-private`) adds audit.json, the full metrics.csv and every
PNG and CSV of the run directory instead of the drawn figures, and the exported run.yaml then says, in its
privacy statement and under `export`, which files the guarantee does not cover.

The copy is assembled in a temporary folder beside the destination and renamed into place, so an error
leaves no half-written export.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from dpsgd_cli.errors import ConfigError, OutputError, RunDirError
from dpsgd_cli.runs.results import is_covered, write_yaml
from dpsgd_cli.runs.run_dir import (
    AUDIT_FILE,
    FINISHED,
    METRICS_FILE,
    RUN_FILE,
    SEARCH_FILE,
    WEIGHTS_FILE,
    RunDir,
)

FIGURES = "curves.png"  # the drawn figures: curves.png, curves-per-class.png, curves-tradeoff.png
PRIVATE_GLOBS = ("*.png", "*.csv")  # copied as they are only with include_private


def export_run(run_dir: Path, dest: Path, *, allow_reproducible: bool = False,
               include_private: bool = False) -> list[Path]:
    """Write the publishable files of the finished run in `run_dir` to the new folder `dest`; return them.

    Refuses a run trained in reproducible mode unless `allow_reproducible` (its seed, in run.yaml,
    regenerates the noise: publishing it voids the guarantee). `include_private`: add the files ε does
    not cover, and say so in the exported run.yaml (see the module docstring)."""
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
        _assemble(run_dir, doc, staging, include_private)
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


def _assemble(run_dir: Path, doc: dict, staging: Path, include_private: bool) -> None:
    if (run_dir / WEIGHTS_FILE).is_file():
        shutil.copyfile(run_dir / WEIGHTS_FILE, staging / WEIGHTS_FILE)
    if include_private:
        _add_private(run_dir, doc, staging)
        return
    shutil.copyfile(run_dir / RUN_FILE, staging / RUN_FILE)
    if (run_dir / METRICS_FILE).is_file():
        import pandas as pd

        frame = pd.read_csv(run_dir / METRICS_FILE)
        covered = frame[[c for c in frame.columns if is_covered(c)]]
        covered.to_csv(staging / METRICS_FILE, index=False)
        if not covered.empty:
            _draw(run_dir, doc, covered, staging)


def _draw(run_dir: Path, doc: dict, covered, staging: Path) -> None:
    """The run's figures, drawn from the covered columns only."""
    from dpsgd_cli.runs.plots import draw_runs
    from dpsgd_cli.runs.summaries import RunInfo

    draw_runs([RunInfo(run_dir, doc, covered)], [], staging / FIGURES)


def _add_private(run_dir: Path, doc: dict, staging: Path) -> None:
    """audit.json, the full metrics.csv and every PNG/CSV of the run directory, and a run.yaml that names
    them as not covered."""
    names = [AUDIT_FILE] if (run_dir / AUDIT_FILE).is_file() else []
    names += [p.name for pattern in PRIVATE_GLOBS for p in sorted(run_dir.glob(pattern)) if p.is_file()]
    names = sorted(set(names))
    for name in names:
        shutil.copyfile(run_dir / name, staging / name)
    listed = ", ".join(names) or "none"
    doc = {**doc, "export": {"include_private": True, "not_covered": names}}
    doc["privacy_statement"] = (
        f"{doc.get('privacy_statement', '').rstrip()} Exported with --include-private: this copy also holds "
        f"{listed}, which are not covered by the guarantee above (computed from the private training data "
        "without noise: audit statistics, training metrics, timings, or figures and tables drawn from "
        "them), so the (ε, δ) does not hold for the copy as a whole.").lstrip()
    write_yaml(doc, staging / RUN_FILE)
