"""Checkpoints: what a run needs to continue exactly where it stopped, in one file written atomically.

`<run_dir>/checkpoint.ckpt` holds, after the last finished epoch: the model weights, the optimizer
variables (Keras 3 `optimizer.variables`: iteration count, learning rate, slots), and a JSON state (epochs
and steps done — which key the sampler (seed, epoch) and the noise (seed, step) — the metrics records so
far, the time spent, the config and the resolved σ it was trained with, a fingerprint of the data).

Layout: MAGIC | payload length (8 bytes, big-endian) | SHA-256 of the payload (32 bytes) | payload, where
the payload is an uncompressed .npz archive (`state` JSON text, `model_000`…, `optimizer_000`…). The
length and digest make any truncation or flipped byte a clear `RunDirError` instead of a silent resume.

Atomic: written to a temporary name in the run directory, fsynced, then renamed over the previous
checkpoint (and the directory fsynced), so the file on disk is always the last complete one.
No TensorFlow here: arrays in, arrays out.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dpsgd_cli.atomic import atomic_write_bytes
from dpsgd_cli.errors import OutputError, RunDirError

FILENAME = "checkpoint.ckpt"
FORMAT_VERSION = 1
MAGIC = b"DPSGD-CHECKPOINT\n"
_HEADER = len(MAGIC) + 8 + 32


@dataclass
class Checkpoint:
    """A run's state after `state['epochs_done']` epochs; see the module docstring."""

    state: dict[str, Any]
    model_weights: list[np.ndarray] = field(default_factory=list)
    optimizer_variables: list[np.ndarray] = field(default_factory=list)

    @property
    def epochs_done(self) -> int:
        return self.state["epochs_done"]

    @property
    def steps_done(self) -> int:
        return self.state["steps_done"]

    @property
    def records(self) -> list[dict[str, Any]]:
        return self.state["records"]

    @property
    def elapsed_s(self) -> float:
        return self.state["elapsed_s"]


def path_in(run_dir: Path) -> Path:
    return Path(run_dir) / FILENAME


def exists(run_dir: Path) -> bool:
    return path_in(run_dir).is_file()


def save(run_dir: Path, ckpt: Checkpoint) -> Path:
    """Write `ckpt` atomically as `run_dir/checkpoint.ckpt`; OutputError on I/O failure."""
    path = path_in(run_dir)
    arrays = {"state": np.array(json.dumps({"format": FORMAT_VERSION, **ckpt.state}, allow_nan=True))}
    arrays.update({f"model_{i:03d}": np.asarray(w) for i, w in enumerate(ckpt.model_weights)})
    arrays.update({f"optimizer_{i:03d}": np.asarray(v) for i, v in enumerate(ckpt.optimizer_variables)})
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    payload = buffer.getvalue()
    blob = MAGIC + len(payload).to_bytes(8, "big") + hashlib.sha256(payload).digest() + payload
    try:
        atomic_write_bytes(path, blob)
    except OutputError as exc:
        raise OutputError(f"{exc}; the previous checkpoint is kept") from None
    return path


def load(run_dir: Path) -> Checkpoint | None:
    """The checkpoint in `run_dir`, or None if there is none; RunDirError if it is truncated or corrupt."""
    path = path_in(run_dir)
    try:
        blob = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise RunDirError(f"{path}: cannot read the checkpoint ({exc.strerror or exc.__class__.__name__})") \
            from None
    payload = _verified_payload(path, blob)
    try:
        with np.load(io.BytesIO(payload), allow_pickle=False) as archive:
            state = json.loads(str(archive["state"]))
            model = [archive[k] for k in sorted(archive.files) if k.startswith("model_")]
            optimizer = [archive[k] for k in sorted(archive.files) if k.startswith("optimizer_")]
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, json.JSONDecodeError) as exc:
        raise _corrupt(path, f"unreadable archive: {exc.__class__.__name__}") from None
    _check_state(path, state)
    return Checkpoint(state=state, model_weights=model, optimizer_variables=optimizer)


def remove_temporaries(run_dir: Path) -> None:
    """Delete temporary files a killed process left in `run_dir` (checkpoint, metrics, run.yaml, weights)."""
    for tmp in Path(run_dir).glob(".*"):
        if tmp.is_file() and (tmp.name.endswith(".tmp") or tmp.name.startswith(".tmp.")):
            tmp.unlink(missing_ok=True)


def _verified_payload(path: Path, blob: bytes) -> bytes:
    if len(blob) < _HEADER:
        if MAGIC.startswith(blob[:len(MAGIC)]):
            raise _corrupt(path, f"truncated ({len(blob)} bytes, shorter than the header)")
        raise _corrupt(path, "not a dpsgd checkpoint")
    if not blob.startswith(MAGIC):
        raise _corrupt(path, "not a dpsgd checkpoint (bad header)")
    length = int.from_bytes(blob[len(MAGIC):len(MAGIC) + 8], "big")
    digest, payload = blob[len(MAGIC) + 8:_HEADER], blob[_HEADER:]
    if len(payload) != length:
        what = "truncated" if len(payload) < length else "has trailing bytes"
        raise _corrupt(path, f"{what} ({len(payload)} of {length} payload bytes)")
    if hashlib.sha256(payload).digest() != digest:
        raise _corrupt(path, "checksum mismatch")
    return payload


def _check_state(path: Path, state: Any) -> None:
    """The JSON state must have the fields `Checkpoint` promises, with consistent values."""
    def ok_int(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= 0

    if not isinstance(state, dict):
        raise _corrupt(path, "state is not a mapping")
    if state.get("format") != FORMAT_VERSION:
        raise _corrupt(path, f"format {state.get('format')!r}, this dpsgd reads format {FORMAT_VERSION}")
    if not (ok_int(state.get("epochs_done")) and ok_int(state.get("steps_done"))):
        raise _corrupt(path, "epochs_done / steps_done missing or invalid")
    records, elapsed = state.get("records"), state.get("elapsed_s")
    if not isinstance(records, list) or len(records) != state["epochs_done"] or not all(
            isinstance(r, dict) and r.get("epoch") == i for i, r in enumerate(records, start=1)):
        raise _corrupt(path, "its metrics records do not match its epochs_done")
    if not isinstance(elapsed, (int, float)) or not math.isfinite(elapsed) or elapsed < 0:
        raise _corrupt(path, "elapsed_s missing or invalid")


def _corrupt(path: Path, why: str) -> RunDirError:
    return RunDirError(f"{path}: checkpoint is corrupt ({why}); this run cannot be resumed from it — "
                       "start it again with --overwrite")
