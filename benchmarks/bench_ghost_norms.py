"""Time of the fast path's clipped gradient sum with each per-unit formulation of the tutorial CNN's
convolutions: `materialize` (per-unit kernel gradients, float32) and `ghost` (Gram-matrix norms and one
weighted GEMM, accumulated in float64 so the norm bounds the summed gradient), plus `auto` (the default).

One compiled call of `fastgrad.fast_clipped_gradient_sum` on a fixed random batch, without XLA; the
formulations alternate call by call so that load from other jobs hits them alike. Printed: the median and
25–75 % range per call, the CPU model and the load average. The planner times the same choices on the
device at hand and keeps the fastest; this shows what the float64 accumulation costs the ghost choice.

    python benchmarks/bench_ghost_norms.py [--batch-size 256] [--calls 30]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import time


def _cpu() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
        return (f"{fields['Model name'].strip()} (family {fields['CPU family'].strip()}, "
                f"model {fields['Model'].strip()})")
    except (OSError, KeyError):
        return platform.processor() or "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--calls", type=int, default=30, help="timed calls of each formulation")
    args = parser.parse_args()

    import numpy as np
    import tensorflow as tf

    from dpsgd_cli.training import fastgrad
    from dpsgd_cli.training.model import build_model

    model = build_model(seed=0)
    rng = np.random.default_rng(0)
    x = tf.constant(rng.random((args.batch_size, 28, 28, 1), dtype=np.float32))
    y = tf.constant(rng.integers(0, 10, args.batch_size).astype(np.int32))
    mask = tf.ones([args.batch_size])
    formulations = {
        "auto": None,
        "materialize": {"conv1": {"grads": "materialize"}, "conv2": {"grads": "materialize"}},
        "ghost": {"conv1": {"grads": "ghost"}, "conv2": {"grads": "ghost"}},
    }
    calls = {name: tf.function(lambda x, y, m, f=f: fastgrad.fast_clipped_gradient_sum(model, x, y, m, 1.0,
                                                                                         formulation=f)[0])
             for name, f in formulations.items()}
    for fn in calls.values():  # trace and warm up
        [t.numpy() for t in fn(x, y, mask)]
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(args.calls):
        for name, fn in calls.items():
            start = time.perf_counter()
            [t.numpy() for t in fn(x, y, mask)]
            times[name].append(time.perf_counter() - start)
    print(f"CPU: {_cpu()}; load average {os.getloadavg()[0]:.2f}; batch {args.batch_size}, "
          f"{args.calls} calls each, no XLA")
    for name, values in times.items():
        q1, median, q3 = statistics.quantiles(values, n=4)
        print(f"{name:12s} median {1000 * median:8.1f} ms   (25–75 %: {1000 * q1:.1f}–{1000 * q3:.1f} ms)")


if __name__ == "__main__":
    main()
