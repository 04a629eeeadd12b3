"""Step-time benchmark: non-private vs DP-SGD steps, measured in one process, one run.

For each batch size, `jit_compile` setting and gradient path it builds a fresh model and the compiled step
from `engine.make_train_step` (the very step `dpsgd train` uses), then records:
- `compile_s`: wall time of the first call (tracing + compilation + one step); dpsgd's steps are called
  through their one concrete function, as the trainer calls them (`Trainer`), the plain step as a user
  calls a `tf.function`;
- `step_s`: median wall time of `steps` further calls (after `warmup` untimed ones), each call forced to
  finish (its outputs read back), on a fixed random batch of 28×28×1 inputs, every slot a real example;
  the rows' calls are interleaved (round i times call i of every row, in a fresh random order after a
  short pause: `_time_interleaved`), so load from other jobs on a shared machine falls on all rows alike;
- `examples_per_s` = batch / step_s, and `ratio` = step_s / step_s of the non-private row with the same
  batch size and jit setting;
- `peak_rss_mb`: the process's peak resident memory while the row ran, minus its resident memory just
  before (sampled every 2 ms; TensorFlow keeps no allocator statistics on CPU). An approximation: memory
  the allocator cached from earlier rows is reused and not counted again.
Paths: `plain` (the floor: the step a TensorFlow user writes without dpsgd — `tf.GradientTape` under
`tf.function`, the mean loss of the same Keras model, Keras SGD; no mask, no metrics, no noise input: the
bench's reference for what a non-private step costs), `nonprivate` (dpsgd's non-private step from
`engine.make_train_step`: plain Keras forward/backward of the masked loss sum, with the step's running
statistics), `nonprivate_fast` (the same, through
fastgrad's forward formulation: patches + matmul for the first convolution, stride-1 max pooling by
shifted slices — what `dpsgd train` uses without privacy), `vectorized_map` (per-example gradients with
tf.vectorized_map, the general path), `fast` (fastgrad: per-example gradients of Dense and Conv2D from
layer inputs and output gradients). All DP rows clip per example (microbatches = batch). Ratios are given
to both non-private rows: `ratio_to_nonprivate` (the Keras step) and `ratio_to_nonprivate_fast` (the
cost of privacy alone on one formulation).

Planned rows (`PLANNED_PATHS`): `nonprivate_planned` and `planned` (DP) run the step `dpsgd train` runs,
as `planner.plan_step` chose it for this device (formulation per layer and XLA; cached, see `planner`);
`plan` describes the choice. `ratio_to_fastest_nonprivate` = step_s / the fastest non-private row (the
plain TensorFlow step or any of dpsgd's, any XLA setting) of the same batch size: the honest cost of
privacy; `ratio_to_plain` = step_s / the fastest `plain` row of the same batch size (for dpsgd's
non-private rows: what dpsgd adds to a plain step).

Memory rows (`memory_rows`, batch 1024 by default): each path's step in a fresh process, so no memory
cached by another row's allocator is reused: `peak_mb` = the peak resident memory while the step is built,
compiled and run `steps` times, minus the resident memory just before (TensorFlow imported, any plan
already made); `ratio_to_nonprivate` divides by the smallest `peak_mb` of the non-private rows (the plain
TensorFlow step and the Keras step).

Layer rows (`layer_rows`): what privacy costs per layer, the measured limit of the fast path. For each
weight layer of the tutorial CNN, its share of the step timed alone (`planner.layer_work`, on fixed random
inputs and output-gradients at `batch_size` slots, XLA off): non-private (`choice` native: its forward, the
gradient to its input unless it is the first weight layer, and its weight gradients, as the Keras step
computes them) and under every DP formulation (its forward, input gradient, per-example squared norms and
the weighted sum of its per-example gradients), plus the step's one noise draw (`engine.gaussian_noise`
over all trainable variables); all interleaved like the step rows. A DP step cannot be faster than the
non-private step plus, per layer, its fastest DP formulation minus its non-private work, plus the noise
(elementwise work and the clip factors aside).

Device rows (`device_rows`): the DP step (fast path, XLA off, SGD) under tf.distribute's
MirroredStrategy with R = 1, 2, … devices (GPUs if any, else logical CPUs: `distribute.split_cpu` must
have run before TensorFlow started), on one fixed global batch dealt into R slices; `examples_per_s` =
batch / step_s. Logical CPUs share the same cores, so on a CPU the point is that it runs, not speed.

Whole-epoch rows (`epoch_rows`): one full epoch of Fashion-MNIST (60,000 examples, Poisson sampling,
batch 256) through `Trainer.train_epoch`, DP and non-private, each after an untimed first epoch (tracing),
timed epochs of the two alternating; `epoch_s` the median wall time of an epoch, `examples_per_s` =
60,000 / epoch_s, `step_s` = epoch_s / steps, `eval_s` the test set evaluation and ε by both accountants
after it.
"""

from __future__ import annotations

import json
import random
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from dpsgd_cli.privacy.run_key import new_run_key

PATHS = ("plain", "nonprivate", "nonprivate_fast", "vectorized_map", "fast")
NONPRIVATE_PATHS = ("plain", "nonprivate", "nonprivate_fast", "nonprivate_planned")
PLANNED_PATHS = ("nonprivate_planned", "planned")
SETTLE_S = 0.002  # pause before each timed call (see `_time_interleaved`)


@dataclass(frozen=True, kw_only=True)
class BenchCase:
    path: str
    batch_size: int
    jit_compile: bool | None  # None: the planner's choice (planned paths)
    capacity: int | None = None  # slots of the compiled step; > batch_size models Poisson padding


def _rss_mb() -> float:
    with open("/proc/self/statm") as handle:
        pages = int(handle.read().split()[1])
    import os

    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


class _PeakRss:
    """Samples resident memory in a thread; `peak - start` is what the measured block added."""

    def __enter__(self) -> _PeakRss:
        self.start = self.peak = _rss_mb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, _rss_mb())

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_mb())


def plain_step(model, optimizer, jit_compile: bool):
    """The floor the bench divides by: `step(x, y) -> mean loss`, one `tf.GradientTape` step of the mean
    softmax cross-entropy under `tf.function`, applied by `optimizer` — nothing else."""
    import tensorflow as tf

    variables = model.trainable_variables
    optimizer.build(variables)

    def step(x, y):
        with tf.GradientTape() as tape:
            logits = model(x, training=True)
            loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=logits))
        optimizer.apply(tape.gradient(loss, variables), variables)
        return loss

    return tf.function(step, jit_compile=jit_compile)


def _build_step(case: BenchCase, seed: int):
    import keras
    import tensorflow as tf

    from dpsgd_cli.training import engine, fastgrad
    from dpsgd_cli.training.model import build_model

    model = build_model(seed=seed)
    zeros = [tf.zeros_like(v) for v in model.trainable_variables]
    if case.path == "plain":
        jit = bool(case.jit_compile)
        step = plain_step(model, keras.optimizers.SGD(0.01), jit)
        return (lambda x, y, mask, extra, noise_seed: (step(x, y),)), zeros, jit, None, step
    private = case.path not in NONPRIVATE_PATHS
    step_plan = None
    if case.path in PLANNED_PATHS:
        from dpsgd_cli.training import planner

        step_plan = planner.plan_step(model, capacity=case.capacity or case.batch_size, private=private)
        grad_fn, forward_fn = step_plan.functions(private)
        jit = step_plan.jit_compile
    else:
        grad_fn = {"vectorized_map": engine.vmap_clipped_gradient_sum,
                   "fast": fastgrad.fast_clipped_gradient_sum}.get(case.path)
        forward_fn = fastgrad.forward if case.path == "nonprivate_fast" else None
        jit = case.jit_compile
    settings = engine.StepSettings(private=private, noise_multiplier=1.1, l2_norm_clip=1.0, microbatch_size=1,
                                   denominator=float(case.batch_size), jit_compile=jit)
    step_fn, _ = engine.make_train_step(model, keras.optimizers.SGD(0.01), settings, grad_fn, forward_fn)
    return step_fn, zeros, jit, step_plan, step_fn


def _prepare(case: BenchCase, warmup: int, seed: int) -> tuple[dict[str, Any], Callable[[int], None]]:
    """Build and compile one case, run its warm-up calls; (row without timings, timed call)."""
    import tensorflow as tf

    capacity = case.capacity or case.batch_size
    rng = np.random.default_rng(seed)
    x = tf.constant(rng.random((capacity, 28, 28, 1), dtype=np.float32))
    y = tf.constant(rng.integers(0, 10, size=capacity).astype(np.int32))
    mask = np.zeros(capacity, np.float32)
    mask[:case.batch_size] = 1.0
    mask = tf.constant(mask)
    key = new_run_key(reproducible=False, seed=seed)
    with _PeakRss() as memory:
        step_fn, zeros, jit, step_plan, traced = _build_step(case, seed)
        start = time.perf_counter()
        if case.path != "plain":  # called as the trainer calls it: its one concrete function
            step_fn = step_fn.get_concrete_function(x, y, mask, zeros, key.noise_seed(0))

        def call(i: int) -> None:
            [float(v) for v in step_fn(x, y, mask, zeros, key.noise_seed(i))]

        call(0)
        compile_s = time.perf_counter() - start
        for i in range(warmup):
            call(i + 1)
    row = {"path": case.path, "batch_size": case.batch_size, "capacity": capacity, "jit_compile": jit,
           "compile_s": compile_s, "peak_rss_mb": memory.peak - memory.start,
           "traces": lambda: traced.experimental_get_tracing_count()}
    if step_plan is not None:
        row.update(plan=step_plan.describe(), planning_s=step_plan.planning_s)
    return row, call


def run_case(case: BenchCase, *, steps: int = 30, warmup: int = 3, seed: int = 0) -> dict[str, Any]:
    """Measure one configuration alone (see the module docstring for the fields)."""
    return run_benchmark([case], steps=steps, warmup=warmup, seed=seed)[0]


def planned_cases(batch_sizes: Iterable[int] = (64, 256, 1024),
                  paths: Iterable[str] = PLANNED_PATHS) -> list[BenchCase]:
    """The planner's non-private and DP steps per batch size (capacity = batch)."""
    return [BenchCase(path=p, batch_size=b, jit_compile=None) for b in batch_sizes for p in paths]


def default_cases(batch_sizes: Iterable[int] = (64, 256, 1024), jit: Iterable[bool] = (False, True),
                  paths: Iterable[str] = PATHS, poisson_capacity: bool = True) -> list[BenchCase]:
    """Every (batch, jit, path) row; plus, per batch and jit, the fast path at the Poisson capacity."""
    from dpsgd_cli.privacy.sampling import poisson_capacity as capacity_for

    cases = []
    for batch in batch_sizes:
        for jit_compile in jit:
            cases += [BenchCase(path=p, batch_size=batch, jit_compile=jit_compile) for p in paths]
            if poisson_capacity and "fast" in paths:
                cases.append(BenchCase(path="fast", batch_size=batch, jit_compile=jit_compile,
                                       capacity=capacity_for(batch, 60000)))
    return cases


def run_benchmark(cases: list[BenchCase], *, steps: int = 30, warmup: int = 3, seed: int = 0,
                  on_row: Callable[[dict[str, Any]], None] | None = None,
                  on_compiled: Callable[[dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
    """Measure every case in this process, interleaved: all cases are built and compiled first, then each
    of the `steps` rounds times one call of every case, so a change in the machine's load (other jobs on
    a shared CPU) hits every row alike and the ratios stay fair. Adds each row's ratios (`add_ratios`)."""
    prepared = []
    for case in cases:
        row, call = _prepare(case, warmup, seed)
        prepared.append((row, call, []))
        if on_compiled:
            on_compiled(row)
    _time_interleaved(prepared, steps, warmup)
    rows = []
    for row, _, times in prepared:
        step_s = statistics.median(times)
        row.update(step_s=step_s, examples_per_s=row["batch_size"] / step_s, traces=row["traces"]())
        rows.append(row)
        if on_row:
            on_row(row)
    add_ratios(rows)
    return rows


def _fastest(rows: list[dict[str, Any]], paths: Iterable[str]) -> dict[int, float]:
    """Per batch size, the smallest step_s among step rows of `paths` at capacity = batch."""
    fastest: dict[int, float] = {}
    for r in rows:
        if r["path"] in paths and r["capacity"] == r["batch_size"]:
            fastest[r["batch_size"]] = min(r["step_s"], fastest.get(r["batch_size"], float("inf")))
    return fastest


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """ratio_to_nonprivate(_fast): to that path's row of the same batch and XLA setting;
    ratio_to_fastest_nonprivate: to the fastest non-private step row (plain TensorFlow or dpsgd's) of the
    same batch size; ratio_to_plain: to the fastest plain TensorFlow step row of the same batch size."""
    for name in ("nonprivate", "nonprivate_fast"):
        baseline = {(r["batch_size"], r["jit_compile"]): r["step_s"] for r in rows
                    if r["path"] == name and r["capacity"] == r["batch_size"]}
        for row in rows:
            base = baseline.get((row["batch_size"], row["jit_compile"]))
            row[f"ratio_to_{name}"] = row["step_s"] / base if base else float("nan")
    for column, paths in (("ratio_to_fastest_nonprivate", NONPRIVATE_PATHS), ("ratio_to_plain", ("plain",))):
        fastest = _fastest(rows, paths)
        for row in rows:
            base = fastest.get(row["batch_size"]) if not row["path"].startswith("epoch") else None
            row[column] = row["step_s"] / base if base else float("nan")


def epoch_rows(batch_size: int = 256, data_dir: str | None = None, seed: int = 0,
               train_size: int | None = None, rounds: int = 2) -> list[dict[str, Any]]:
    """Whole-epoch rows (see the module docstring), non-private and DP: both trainers are built and train
    an untimed first epoch, then `rounds` timed epochs each, alternating (median reported).
    `train_size`: the first examples only (tests)."""
    import os

    from dpsgd_cli.config import config_from_dict
    from dpsgd_cli.privacy.plan import plan_privacy
    from dpsgd_cli.privacy.sampling import steps_in_epoch
    from dpsgd_cli.training.data import load_dataset
    from dpsgd_cli.training.trainer import Trainer

    data_dir = data_dir or os.environ.get("DPSGD_DATA_DIR") or None
    dataset = load_dataset("fashion_mnist", data_dir, train_size, 1000 if train_size else None)
    trainers, first_s = [], []
    for private in (False, True):
        privacy = {"enabled": private, "noise_multiplier": 1.1 if private else None}
        cfg = config_from_dict({"name": "bench_epoch", "seed": seed, "privacy": privacy,
                                "data": {"batch_size": batch_size, "sampling": "poisson"}})
        trainer = Trainer(cfg, dataset, plan_privacy(cfg, len(dataset.y_train)),
                          new_run_key(reproducible=False, seed=seed))
        start = time.perf_counter()
        trainer.train_epoch(1, None)
        first_s.append(time.perf_counter() - start)
        trainers.append(trainer)
    epoch_s: list[list[float]] = [[], []]
    for r in range(rounds):
        for trainer, times in zip(trainers, epoch_s):
            start = time.perf_counter()
            trainer.train_epoch(2 + r, None)
            times.append(time.perf_counter() - start)
    rows = []
    for trainer, first, times in zip(trainers, first_s, epoch_s):
        start = time.perf_counter()
        trainer.evaluate()
        trainer._epsilons()
        eval_s = time.perf_counter() - start
        seconds = statistics.median(times)
        steps = steps_in_epoch(2, batch_size, trainer.n, "poisson")
        private = trainer.cfg.privacy.enabled
        rows.append({"path": "epoch_dp" if private else "epoch_nonprivate", "batch_size": batch_size,
                     "capacity": trainer.sampler.capacity, "jit_compile": trainer.jit_compile,
                     "compile_s": first - seconds, "step_s": seconds / steps,
                     "examples_per_s": len(dataset.y_train) / seconds, "epoch_s": seconds, "eval_s": eval_s,
                     "plan": trainer.step_plan.describe()})
    rows[1]["ratio_to_epoch_nonprivate"] = rows[1]["epoch_s"] / rows[0]["epoch_s"]
    return rows


MEMORY_PATHS = ("plain", "nonprivate", "nonprivate_planned", "planned", "fast")


def memory_rows(batch_size: int = 1024, paths: Iterable[str] = MEMORY_PATHS, steps: int = 3,
                seed: int = 0) -> list[dict[str, Any]]:
    """Peak memory of each path's step at `batch_size`, each in its own process (see the module docstring)."""
    rows = []
    for path in paths:
        code = (f"from dpsgd_cli.training.bench import _memory_child; "
                f"_memory_child({path!r}, {batch_size}, {steps}, {seed})")
        for _ in range(2):  # a first run may only make (and cache) the plan
            done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
            row = json.loads(done.stdout.strip().splitlines()[-1])
            if "peak_mb" in row:
                rows.append(row)
                break
    nonprivate = [r["peak_mb"] for r in rows if r["path"] in ("memory_plain", "memory_nonprivate")]
    base = min(nonprivate, default=None)
    for row in rows:
        row["ratio_to_nonprivate"] = row["peak_mb"] / base if base else float("nan")
    return rows


def _memory_child(path: str, batch_size: int, steps: int, seed: int) -> None:
    """Run in a fresh process by `memory_rows`: prints one JSON row."""
    import tensorflow as tf

    case = BenchCase(path=path, batch_size=batch_size, jit_compile=None if path in PLANNED_PATHS else False)
    if path in PLANNED_PATHS:  # plan first (or read the cache), so planning is not counted
        from dpsgd_cli.training import planner
        from dpsgd_cli.training.model import build_model

        plan = planner.plan_step(build_model(seed=seed), capacity=batch_size, private=path == "planned")
        if plan.source not in ("cache", f"default ({planner.OFF_ENV}=off)"):
            print(json.dumps({"planned": plan.describe()}))  # measuring took memory: measure in a new process
            return
    rng = np.random.default_rng(seed)
    x = tf.constant(rng.random((batch_size, 28, 28, 1), dtype=np.float32))
    y = tf.constant(rng.integers(0, 10, size=batch_size).astype(np.int32))
    mask = tf.ones([batch_size])
    key = new_run_key(reproducible=False, seed=seed)
    with _PeakRss() as memory:
        step_fn, zeros, jit, step_plan, _ = _build_step(case, seed)
        for i in range(steps):
            [float(v) for v in step_fn(x, y, mask, zeros, key.noise_seed(i))]
    row = {"path": f"memory_{path}", "batch_size": batch_size, "jit_compile": jit,
           "peak_mb": round(memory.peak - memory.start, 1), "start_mb": round(memory.start, 1)}
    if step_plan is not None:
        row["plan"] = step_plan.describe()
    print(json.dumps(row))

def device_rows(replica_counts: Iterable[int], batch_size: int = 256, *, steps: int = 30, warmup: int = 3,
                seed: int = 0) -> list[dict[str, Any]]:
    """One row per replica count (see the module docstring), timed interleaved like `run_benchmark`."""
    import keras
    import tensorflow as tf

    from dpsgd_cli.training import distribute, engine, fastgrad
    from dpsgd_cli.training.model import build_model

    gpus = [d.name for d in tf.config.list_logical_devices("GPU")]
    available = gpus or [d.name for d in tf.config.list_logical_devices("CPU")]
    rng = np.random.default_rng(seed)
    data = (tf.constant(rng.random((batch_size, 28, 28, 1), dtype=np.float32)),
            tf.constant(rng.integers(0, 10, size=batch_size).astype(np.int32)))
    key = new_run_key(reproducible=False, seed=seed)
    prepared = []
    for replicas in replica_counts:
        if replicas > len(available):
            raise ValueError(f"{replicas} devices asked, {len(available)} available")
        dist = distribute.mirrored(available[:replicas])
        capacity = dist.capacity(batch_size, 1)
        idx = np.arange(capacity) % batch_size
        mask = (np.arange(capacity) < batch_size).astype(np.float32)
        with dist.scope():
            model = build_model(seed=seed)
            optimizer = keras.optimizers.SGD(0.01)
        settings = engine.StepSettings(private=True, noise_multiplier=1.1, l2_norm_clip=1.0,
                                       microbatch_size=1, denominator=float(batch_size), jit_compile=False)
        step_fn, _ = distribute.make_distributed_step(dist, model, optimizer, settings,
                                                      fastgrad.fast_clipped_gradient_sum, data=data)
        zeros = [tf.zeros_like(v) for v in model.trainable_variables]

        def call(i: int, step_fn=step_fn, zeros=zeros, idx=idx, mask=mask) -> None:
            [float(v) for v in step_fn(idx, mask, zeros, key.noise_seed(i))]

        start = time.perf_counter()
        call(0)
        compile_s = time.perf_counter() - start
        for i in range(warmup):
            call(i + 1)
        names = ",".join(distribute.short_name(d) for d in available[:replicas])
        prepared.append(({"path": f"mirrored_{replicas}", "replicas": replicas, "batch_size": batch_size,
                          "capacity": capacity, "jit_compile": False, "compile_s": compile_s,
                          "devices": names}, call, []))
    _time_interleaved(prepared, steps, warmup)
    rows = []
    for row, _, times in prepared:
        row["step_s"] = statistics.median(times)
        row["examples_per_s"] = batch_size / row["step_s"]
        rows.append(row)
    return rows


def layer_rows(batch_size: int = 256, *, steps: int = 30, warmup: int = 3, seed: int = 0
               ) -> list[dict[str, Any]]:
    """Per-layer rows (see the module docstring): `path` 'layer', `layer`, `choice`, `private`, `step_s`;
    the noise row has layer 'noise'."""
    import tensorflow as tf

    from dpsgd_cli.training import engine, fastgrad, planner
    from dpsgd_cli.training.model import build_model

    model = build_model(seed=seed)
    shapes = planner.layer_shapes(model, batch_size)
    prepared, first = [], True
    for layer in model.layers:
        rule = fastgrad.rule_for(layer)
        if not (rule and rule.weighted):
            continue
        options = [({"forward": "native"}, False)]
        options += [(c, True) for c in fastgrad.formulation_choices(layer, first, private=True)]
        for choice, private in options:
            work = planner.layer_work(layer, choice, shapes[layer.name], batch_size, private, first, 1, False)
            prepared.append(({"path": "layer", "layer": layer.name, "choice": "/".join(choice.values()),
                              "private": private, "batch_size": batch_size}, work, []))
        first = False
    variables = model.trainable_variables
    seed_tensor = tf.constant([1, 2], tf.int64)
    noise = tf.function(lambda: tf.add_n([tf.reduce_sum(n) for n in engine.gaussian_noise(
        variables, 1.0, seed_tensor)]))
    values = sum(v.shape.num_elements() for v in variables)
    prepared.append(({"path": "layer", "layer": "noise", "choice": f"{values} values", "private": True,
                      "batch_size": batch_size}, noise, []))
    calls = []
    for row, work, times in prepared:
        for _ in range(1 + warmup):
            float(work())
        calls.append((row, lambda i, work=work: float(work()), times))
    _time_interleaved(calls, steps, warmup)
    rows = []
    for row, _, times in calls:
        rows.append({**row, "step_s": statistics.median(times)})
    return rows


def layer_limits(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per layer of `layer_rows`: non-private ms, the fastest DP formulation and its ms, and the
    difference (what privacy costs in that layer at least); the noise draw as its own entry."""
    out = []
    for name in dict.fromkeys(r["layer"] for r in rows):
        mine = [r for r in rows if r["layer"] == name]
        base = next((r["step_s"] for r in mine if not r["private"]), 0.0)
        best = min((r for r in mine if r["private"]), key=lambda r: r["step_s"])
        out.append({"layer": name, "nonprivate_ms": 1000 * base, "dp_choice": best["choice"],
                    "dp_ms": 1000 * best["step_s"], "extra_ms": 1000 * (best["step_s"] - base)})
    return out


def _time_interleaved(prepared: list[tuple[dict, Any, list[float]]], steps: int, warmup: int) -> None:
    """Round i times one call (step number warmup + 1 + i) of every prepared row, appending seconds to
    the row's list: load from other jobs falls on all rows alike. Each round takes the rows in a fresh
    random order (seeded), after a pause of SETTLE_S, so no row always follows the same one: a call leaves
    thread pools spinning for a while (measured: a graph step right after an XLA step took 1.8× its
    time), which would otherwise bill one row for its neighbour."""
    order = list(range(len(prepared)))
    shuffle = random.Random(0).shuffle
    for i in range(steps):
        shuffle(order)
        for j in order:
            _, call, times = prepared[j]
            time.sleep(SETTLE_S)
            start = time.perf_counter()
            call(warmup + 1 + i)
            times.append(time.perf_counter() - start)
