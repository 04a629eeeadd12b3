"""Atomic file writes: a crash leaves either the old file or the new one, never half of one.

The data goes to a temporary file in the target's directory, is flushed and fsynced, gets the usual
permissions (0666 less the umask; mkstemp would leave 0600) or the `mode` asked for (0600 for a secret),
and is renamed over the target; the
directory is then fsynced so the rename itself survives a power loss.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from dpsgd_cli.errors import OutputError


def atomic_write_bytes(path: str | Path, data: bytes, mode: int | None = None) -> None:
    """Replace `path` with `data` atomically, with permissions `mode` (default 0666 less the umask).
    The permissions are set before any byte is written. Raises OutputError on I/O failure."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            os.chmod(tmp, (0o666 & ~_umask()) if mode is None else mode)
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        _fsync_dir(path.parent)
    except OSError as exc:
        raise OutputError(f"{path}: cannot write ({exc.strerror or exc.__class__.__name__})") from None


def atomic_write_text(path: str | Path, text: str, mode: int | None = None) -> None:
    """`atomic_write_bytes` of `text` encoded as UTF-8."""
    atomic_write_bytes(path, text.encode("utf-8"), mode)


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def _fsync_dir(folder: Path) -> None:
    """Make a rename durable (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
