"""Release what TensorFlow's gradient registry keeps of a run's traced graphs once the run is over.

Each trace of a graph that uses `tf.custom_gradient` — Keras' optimizer does, through the replica
context's `all_reduce` in `apply`; so does the fast path's max pooling — registers a gradient function
under a fresh name ("CustomGradient-N") in a process-wide registry and never removes it. The function's
closure holds tensors of the traced graph, the graph holds what it captured, and a training step captures
the training set on the device: without this, every run in one process (a search's trials, a sweep's
points) kept its whole training set alive — about 0.9 GB per ScatterNet trial on Fashion-MNIST — and
every `DPModel.fit` its traced step. Both run inside `released_custom_gradients()`.

`released_custom_gradients()` removes the entries added while its block ran. Safe once the block's graphs
are traced: a registered gradient is only looked up while a graph that uses it is being differentiated
(at trace time), never when a traced function runs. It assumes one block at a time per process (runs,
sweep points and search trials run one after another): a block ending while another thread traces would
remove that thread's new entries too. If a TensorFlow release stores the registry differently, the block
does nothing (the memory is then kept, as before).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

PREFIX = "CustomGradient-"


def _registry() -> dict | None:
    """TensorFlow's gradient registry (name → entry), or None when this TensorFlow stores it elsewhere."""
    from tensorflow.python.framework import ops

    entries = getattr(getattr(ops, "_gradient_registry", None), "_registry", None)
    return entries if isinstance(entries, dict) else None


def custom_gradient_count() -> int:
    """How many custom-gradient functions the registry holds now (0 when it cannot be read)."""
    entries = _registry()
    return 0 if entries is None else sum(1 for name in entries if str(name).startswith(PREFIX))


@contextlib.contextmanager
def released_custom_gradients() -> Iterator[None]:
    """Remove, when the block ends (also by an exception), the custom-gradient functions registered in it."""
    entries = _registry()
    before = set(entries) if entries is not None else set()
    try:
        yield
    finally:
        if entries is not None:
            for name in [n for n in entries if n not in before and str(n).startswith(PREFIX)]:
                entries.pop(name, None)
