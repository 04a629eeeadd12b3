"""Step time of a model given by a builder (default: the small GroupNorm ResNet, a Functional graph): the DP
step against non-private steps, at one batch size, in one process.

Rows (each its own freshly built model, the same seed; 28×28×1 random inputs, every slot a real example):
- `plain_tf` / `plain_tf_xla`: the floor — a plain TensorFlow step (`tf.GradientTape` under `tf.function`,
  mean softmax cross-entropy, SGD), XLA off / on;
- `nonprivate`: dpsgd's non-private step as `dpsgd train` runs it (`planner.plan_step`, `engine`);
- `dp`: dpsgd's DP step as `dpsgd train` runs it (planned: per-example clipping on the fast path, noise);
- `dp_default`: the DP step with the fast path's default formulation, XLA off (`DPSGD_PLANNER=off`);
- `dp_vmap` (with --vmap): the DP step by tf.vectorized_map, XLA off (the general path, for reference).
Each row is compiled and warmed up first; then `--steps` rounds each time one call of every row
(interleaved, so load from other jobs falls on all rows alike); the median is reported. Printed first: the
CPU (`lscpu` model name, family, model), TensorFlow and its oneDNN switch, the load average before and
after. Ratios: each row / the fastest non-private row, and DP / dpsgd's non-private step.

    python benchmarks/bench_graph_model.py [--batch-size 256] [--steps 30] [--builder module:function]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import time
from pathlib import Path


def _cpu() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    except OSError:
        return "unknown CPU"
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    get = {k.strip(): v.strip() for k, v in fields.items()}.get
    return f"{get('Model name', '?')} (family {get('CPU family', '?')}, model {get('Model', '?')})"


def _load() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=30, help="timed rounds (median reported)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--builder", default="dpsgd_cli.training.resnet:small_resnet",
                        help='"module:function" building the model, or "tfp_cnn" (the tutorial CNN)')
    parser.add_argument("--vmap", action="store_true", help="add the tf.vectorized_map DP row")
    args = parser.parse_args()
    print(f"CPU: {_cpu()}; load average before: {_load()}", flush=True)

    import keras
    import numpy as np
    import tensorflow as tf

    from dpsgd_cli.labels import NUM_CLASSES
    from dpsgd_cli.privacy.run_key import new_run_key
    from dpsgd_cli.training import engine, fastgrad, planner
    from dpsgd_cli.training.model import INPUT_SHAPE, build_model, load_builder

    onednn = os.environ.get("TF_ENABLE_ONEDNN_OPTS", "default")
    print(f"TensorFlow {tf.__version__}, TF_ENABLE_ONEDNN_OPTS={onednn}, batch {args.batch_size}, "
          f"model {args.builder}", flush=True)

    def build() -> keras.Model:
        keras.utils.set_random_seed(0)
        if args.builder == "tfp_cnn":
            return build_model(seed=0)
        return load_builder(args.builder)(input_shape=INPUT_SHAPE, num_classes=NUM_CLASSES)

    b = args.batch_size
    rng = np.random.default_rng(0)
    x = tf.constant(rng.random((b, *INPUT_SHAPE), dtype=np.float32))
    y = tf.constant(rng.integers(0, NUM_CLASSES, b).astype(np.int32))
    mask = tf.ones([b])
    key = new_run_key(reproducible=False, seed=0)
    probe = build()
    print(f"{probe.count_params()} weights; fast path: {fastgrad.fast_path_problem(probe) or 'supported'}")

    def plain(jit: bool):
        model, optimizer = build(), keras.optimizers.SGD(0.01)
        variables = model.trainable_variables
        optimizer.build(variables)

        @tf.function(jit_compile=jit)
        def step(x, y):
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean(engine.per_example_loss(model(x, training=True), y))
            optimizer.apply(tape.gradient(loss, variables), variables)
            return loss

        return lambda i: float(step(x, y)), "GradientTape step"

    def dpsgd(private: bool, plan=None):
        model = build()
        plan = plan or planner.plan_step(model, capacity=b, private=private)
        settings = engine.StepSettings(private=private, noise_multiplier=1.0, l2_norm_clip=1.0,
                                       microbatch_size=1, denominator=float(b), jit_compile=plan.jit_compile)
        step, _ = engine.make_train_step(model, keras.optimizers.SGD(0.01), settings,
                                         *plan.functions(private))
        zeros = [tf.zeros_like(v) for v in model.trainable_variables]
        described = plan.describe() + (f", planned in {plan.planning_s:.1f} s" if plan.planning_s else "")
        return lambda i: [float(t) for t in step(x, y, mask, zeros, key.noise_seed(i))], described

    rows = {"plain_tf": lambda: plain(False), "plain_tf_xla": lambda: plain(True),
            "nonprivate": lambda: dpsgd(False), "dp": lambda: dpsgd(True),
            "dp_default": lambda: dpsgd(True, planner.StepPlan(
                "fast", False, fastgrad.default_formulation(probe), source="default formulation"))}
    if args.vmap:
        rows["dp_vmap"] = lambda: dpsgd(True, planner.StepPlan("vectorized_map", False, source="reference"))
    calls, notes = {}, {}
    for name, make in rows.items():
        start = time.perf_counter()
        calls[name], notes[name] = make()
        for i in range(1 + args.warmup):
            calls[name](i)
        print(f"built {name} in {time.perf_counter() - start:.1f} s: {notes[name]}", flush=True)
    times = {name: [] for name in calls}
    for i in range(args.steps):
        for name, call in calls.items():
            start = time.perf_counter()
            call(i)
            times[name].append(time.perf_counter() - start)
    ms = {name: 1000 * statistics.median(t) for name, t in times.items()}
    floor = min(ms[name] for name in ("plain_tf", "plain_tf_xla", "nonprivate"))
    print(f"\n{'row':<14}{'ms/step':>9}{'examples/s':>12}{'÷ fastest non-private':>23}")
    for name, value in ms.items():
        print(f"{name:<14}{value:9.2f}{1000 * b / value:12.0f}{value / floor:23.2f}")
    print(f"\nDP / dpsgd non-private = {ms['dp'] / ms['nonprivate']:.2f}; DP / fastest non-private = "
          f"{ms['dp'] / floor:.2f}; load average after: {_load()}")


if __name__ == "__main__":
    main()
