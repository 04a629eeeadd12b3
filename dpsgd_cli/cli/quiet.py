"""Keep TensorFlow's C++ start-up lines out of the terminal unless asked for (`--verbose`, DPSGD_VERBOSE=1).

`import tensorflow` prints its start-up notices (the oneDNN notice, "Could not find cuda drivers",
`cpu_feature_guard`) through absl before TensorFlow reads TF_CPP_MIN_LOG_LEVEL, and prints some of them
twice in the same process: once from `libtensorflow_framework`/`libtensorflow_cc` (loaded first), and
again when the profiler plugin `_pywrap_profiler_plugin.so` is loaded, which links its own static copy of
the same start-up code. The first device query then logs "failed call to cuInit" on a machine without
a GPU. No environment variable silences the
first group, so `install()` points file descriptor 2 at /dev/null while TensorFlow is imported and
its physical devices are listed, and restores it at once: every later line on stderr (our one-line
errors, TensorFlow's C++ errors) reaches the terminal as before. TensorFlow's Python logger (its
"WARNING:tensorflow:" lines about retracing or loops it could not vectorize) is set to errors only.

Only the command line uses this (it owns the terminal); importing `dpsgd_cli` as a library changes
nothing in the process.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.machinery import ModuleSpec
from types import ModuleType

VERBOSE_ENV = "DPSGD_VERBOSE"
# 2 = TensorFlow's C++ code logs errors only (0 all, 1 no INFO, 2 no WARNING, 3 no ERROR); a value the
# user set is kept.
QUIET_LOG_LEVEL = "2"


def verbose_requested() -> bool:
    """Whether the environment asks for TensorFlow's own log lines (DPSGD_VERBOSE=1/true/yes/on)."""
    return os.environ.get(VERBOSE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def install() -> None:
    """Quiet TensorFlow for the rest of this process: set TF_CPP_MIN_LOG_LEVEL (unless set), its Python
    logger to errors, and silence stderr while TensorFlow is first imported and lists its devices (not
    if it is imported already). Calling it again is harmless."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", QUIET_LOG_LEVEL)
    logging.getLogger("tensorflow").setLevel(logging.ERROR)  # the logger tf.get_logger() returns
    if "tensorflow" in sys.modules or any(isinstance(f, _QuietTensorFlowFinder) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _QuietTensorFlowFinder())


@contextmanager
def stderr_silenced() -> Iterator[None]:
    """Point file descriptor 2 (what C++ code writes to) at /dev/null inside the block, then restore it."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, 2)
        finally:
            os.close(devnull)
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


class _QuietTensorFlowFinder(importlib.abc.MetaPathFinder):
    """Finds the top-level `tensorflow` package through the other finders and wraps its loader; removes
    itself from sys.meta_path on first use, so it acts once."""

    def find_spec(self, fullname: str, path: object = None, target: object = None) -> ModuleSpec | None:
        if fullname != "tensorflow":
            return None
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        spec.loader = _QuietLoader(spec.loader)
        return spec


class _QuietLoader(importlib.abc.Loader):
    """Runs TensorFlow's own loader with stderr silenced, then lists the physical devices (the first
    device query, which logs cuInit's failure on a machine without a GPU) before stderr is restored.
    Listing physical devices does not initialise the runtime: logical devices can still be configured."""

    def __init__(self, loader: importlib.abc.Loader) -> None:
        self.loader = loader

    def create_module(self, spec: ModuleSpec) -> ModuleType | None:
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        # TensorFlow sees its own loader, as without this wrapper
        module.__loader__ = self.loader
        if module.__spec__ is not None:
            module.__spec__.loader = self.loader
        with stderr_silenced():
            self.loader.exec_module(module)
            module.config.list_physical_devices()
