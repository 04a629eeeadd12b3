"""dpsgd: differentially private SGD experiments in TensorFlow (Keras 3), with honest privacy accounting.

The public Python API::

    import dpsgd_cli

    cfg = dpsgd_cli.load_config("configs/quickstart.yaml", ["training.epochs=1"])
    result = dpsgd_cli.run(cfg)                    # what `dpsgd train` does, without the terminal
    print(result.records[-1]["test_accuracy"], result.statement)

    dpsgd_cli.epsilon(1.1, epochs=60, batch_size=256, dataset_size=60_000)         # `dpsgd epsilon`
    dpsgd_cli.noise_multiplier(1.0, epochs=60, batch_size=256, dataset_size=60_000)  # `dpsgd noise`

    dp_model = dpsgd_cli.DPModel(keras_model, l2_norm_clip=1.0, noise_multiplier=1.1)  # your own model

Each name is imported on first use (PEP 562), so `import dpsgd_cli` loads neither TensorFlow nor
dp-accounting: `epsilon` and `noise_multiplier` never need TensorFlow; `DPModel` and `run` import it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = [
    "DPModel",
    "DpsgdError",
    "ExperimentConfig",
    "RunResult",
    "epsilon",
    "load_config",
    "noise_multiplier",
    "run",
]

# public name → the module that defines it
_HOMES = {
    "DPModel": "dpsgd_cli.keras_api",
    "DpsgdError": "dpsgd_cli.errors",
    "ExperimentConfig": "dpsgd_cli.config",
    "RunResult": "dpsgd_cli.experiment.run",
    "epsilon": "dpsgd_cli.privacy.answer",
    "load_config": "dpsgd_cli.config",
    "noise_multiplier": "dpsgd_cli.privacy.answer",
    "run": "dpsgd_cli.experiment.run",
}

if TYPE_CHECKING:  # for type checkers and editors; at run time `__getattr__` imports on first use
    from dpsgd_cli.config import ExperimentConfig, load_config
    from dpsgd_cli.errors import DpsgdError
    from dpsgd_cli.experiment.run import RunResult, run
    from dpsgd_cli.keras_api import DPModel
    from dpsgd_cli.privacy.answer import epsilon, noise_multiplier


def __getattr__(name: str) -> Any:
    """Import a public name from its module the first time it is asked for (PEP 562)."""
    if name not in _HOMES:
        raise AttributeError(f"module 'dpsgd_cli' has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOMES[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
