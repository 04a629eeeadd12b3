"""The machine a measurement ran on, so a timing is never quoted without it.

`cpu_info` reads the CPU's model name, family and model number (what `lscpu` shows as "Model name",
"CPU family", "Model") from /proc/cpuinfo, else from `lscpu`, else from the platform module; a field no
source gives is "unknown" (e.g. family and model on ARM or macOS). `tensorflow_settings` gives what changes
which kernels run: the TensorFlow and Keras versions, whether oneDNN is on (the build's default, switched
by TF_ENABLE_ONEDNN_OPTS), the thread pools (0 = TensorFlow's default: one thread per core) and XLA's
flags. Importing this module does not import TensorFlow; `tensorflow_settings` does.
"""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path
from typing import Any

UNKNOWN = "unknown"
# /proc/cpuinfo keys and lscpu labels of the three CPU fields
_CPUINFO_KEYS = {"model name": "cpu_model_name", "cpu family": "cpu_family", "model": "cpu_model"}
_LSCPU_KEYS = {"Model name": "cpu_model_name", "CPU family": "cpu_family", "Model": "cpu_model"}


def _parse(lines: list[str], keys: dict[str, str]) -> dict[str, str]:
    """The first value of each key in `key: value` lines."""
    out: dict[str, str] = {}
    for line in lines:
        name, sep, value = line.partition(":")
        field = keys.get(name.strip())
        if sep and field and field not in out and value.strip():
            out[field] = value.strip()
    return out


def cpu_info(cpuinfo: Path = Path("/proc/cpuinfo")) -> dict[str, str]:
    """{cpu_model_name, cpu_family, cpu_model, cpu_threads}; "unknown" for what the machine does not say."""
    found: dict[str, str] = {}
    try:
        found = _parse(cpuinfo.read_text().splitlines(), _CPUINFO_KEYS)
    except OSError:
        pass
    if len(found) < len(_CPUINFO_KEYS):
        try:
            done = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10,
                                  env={**os.environ, "LC_ALL": "C"})
            found = {**_parse(done.stdout.splitlines(), _LSCPU_KEYS), **found}
        except (OSError, subprocess.SubprocessError):
            pass
    name = found.get("cpu_model_name") or platform.processor() or platform.machine() or UNKNOWN
    return {"cpu_model_name": name, "cpu_family": found.get("cpu_family", UNKNOWN),
            "cpu_model": found.get("cpu_model", UNKNOWN), "cpu_threads": str(os.cpu_count() or UNKNOWN)}


def tensorflow_settings() -> dict[str, Any]:
    """{tensorflow, keras, onednn ('on'/'off'/'unknown'), TF_ENABLE_ONEDNN_OPTS (as set, or 'default'),
    intra_op_threads, inter_op_threads, TF_XLA_FLAGS (as set, or '')}."""
    import keras
    import tensorflow as tf

    try:  # the build's answer, which follows TF_ENABLE_ONEDNN_OPTS
        from tensorflow.python.util import _pywrap_util_port

        onednn = "on" if _pywrap_util_port.IsMklEnabled() else "off"
    except (ImportError, AttributeError):
        onednn = UNKNOWN
    return {"tensorflow": tf.__version__, "keras": keras.__version__, "onednn": onednn,
            "TF_ENABLE_ONEDNN_OPTS": os.environ.get("TF_ENABLE_ONEDNN_OPTS", "default"),
            "intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads(),
            "inter_op_threads": tf.config.threading.get_inter_op_parallelism_threads(),
            "TF_XLA_FLAGS": os.environ.get("TF_XLA_FLAGS", "")}


def machine_row() -> dict[str, Any]:
    """`cpu_info` and `tensorflow_settings` in one flat record (CSV columns)."""
    return {**cpu_info(), **tensorflow_settings()}


def describe(row: dict[str, Any]) -> list[str]:
    """Two lines for the top of a benchmark's output: the CPU, then TensorFlow's settings."""
    cpu = (f"CPU: {row['cpu_model_name']} (family {row['cpu_family']}, model {row['cpu_model']}), "
           f"{row['cpu_threads']} threads, {platform.machine() or UNKNOWN}")
    threads = ", ".join(f"{k.split('_')[0]}-op threads {row[k] or 'default'}"
                        for k in ("intra_op_threads", "inter_op_threads"))
    tf = (f"TensorFlow {row['tensorflow']}, Keras {row['keras']}, oneDNN {row['onednn']} "
          f"(TF_ENABLE_ONEDNN_OPTS {row['TF_ENABLE_ONEDNN_OPTS']}), {threads}, "
          f"TF_XLA_FLAGS {row['TF_XLA_FLAGS'] or 'unset'}")
    return [cpu, tf]
