"""Choose the training step's formulation by timing it on the device at hand.

Like FFTW's planner or cuDNN's autotuner: TensorFlow's kernels are fast or slow depending on the device
(CPU model, thread count, oneDNN, GPU) and on XLA, so which formulation of each layer is fastest is
measured, never assumed. Every formulation the planner may choose is tested equal to the per-example
GradientTape reference (tests/test_fastgrad.py): a plan changes speed only, never what is computed.

How a plan is made, for one model, capacity (slots per step), private or not, microbatch size. Every
timing is a race (`_race`): candidates are called in rounds, in a fresh random order each round, and a
candidate stops being timed once it is clearly slower than the leader (after its first call: more than
`PRUNE`× slower; after `MIN_CALLS` calls: even its fastest call slower than the leader's median), so
clear losers cost two or three calls and only close candidates get the full count.
1. Without XLA, for each layer with a choice (`fastgrad.formulation_choices`: Conv2D/Dense forward native
   or patches × matmul; per-unit gradients materialized, ghost norms, the batch as the groups of one
   grouped convolution or, for one input channel, the depthwise-convolution trick; depthwise kernels
   folded or from patches; stride-1 max pooling native or shifted slices), the layer's own work in
   the step is timed alone for each candidate at the full capacity (its forward, the gradient to its
   input, its per-unit norms and weighted sum; non-private: its forward and gradients). Per-unit norms
   needing more than `ARITHMETIC_PRUNE`× the multiply-adds of the layer's other choice are not timed
   (`_arithmetic_prune`: e.g. Gram matrices over a first convolution's 196 output positions).
2. The fastest choice per layer makes one whole-step candidate (non-private: the plain Keras step is one
   too); the whole steps are built as `engine.make_train_step` builds them and raced; the fastest wins.
3. Memory: a private step may run its per-example work in sequential passes of fewer slots
   (`engine.chunked_gradient_sum`; per-example intermediates then exist for one pass at a time). Without
   XLA, step 1 is repeated at each pass size (`chunk_sizes`: the capacity, then halves down to
   `MIN_CHUNK`; a layer's best formulation changes with the size; choices more than `PRUNE`× slower at
   the full capacity are not tried again) and each size is a whole-step candidate; candidates within
   `TIE`× of the fastest count as equally fast and the smallest pass wins (`choose`).
4. The default step (what `DPSGD_PLANNER=off` runs) is one more whole-step candidate, so a plan is never
   slower than not planning by more than the timing noise.
5. XLA (`training.jit_compile: auto`): each XLA compile costs seconds (3 s for the tutorial CNN's
   non-private step, 7 s for its private one, on a loaded 2-core CPU), so XLA is first tried once: the
   model's default non-private step under XLA (built from the formulations XLA handles well: patches,
   shifted slices; the work every step shares), compiled in a background thread while the main thread
   traces the steps without XLA, then raced against the best of those (a private plan: against the Keras
   non-private step). Only if it comes within `XLA_GATE`× are the layers chosen under XLA too, at a probe
   batch (`PROBE`; some kernels are pathological under XLA on some devices: on one AMD EPYC, XLA's
   depthwise filter gradient took 33 s per call at batch 288), and the XLA candidates raced against the
   best step without it. Passes are not tried under XLA (it schedules memory itself) unless
   `training.chunk_size` fixes them.
`DPSGD_PLANNER=off` skips measuring (the default formulation, XLA off unless forced): for tests and CI.
The plan is cached as JSON under `$DPSGD_PLAN_CACHE`, else `$XDG_CACHE_HOME/dpsgd`, else `~/.cache/dpsgd`,
keyed by (device, oneDNN switch and thread pools, TensorFlow version, model signature, capacity, private,
microbatch size, XLA setting, gradient path, pass sizes), so later runs reuse it — unless other processes
used more than `BUSY` of the CPUs while it was timed and a later run finds them idle (`others_share`):
then it is timed again. `training.plan` in the config fixes formulations by hand, `training.chunk_size`
the pass size and `training.jit_compile: true/false` XLA; what is left is measured.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import random
import statistics
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dpsgd_cli.atomic import atomic_write_text
from dpsgd_cli.errors import ConfigError

CACHE_ENV = "DPSGD_PLAN_CACHE"
OFF_ENV = "DPSGD_PLANNER"  # "off": no measuring; the default formulation, XLA off unless forced (tests, CI)
CACHE_FILE = "plans.json"
PLAN_VERSION = 4  # bumped when a formulation is added or its implementation changes: cached plans lack it
PROBE = 16  # examples per call when probing a candidate under XLA
PRUNE = 3.0  # drop a candidate whose first timed call exceeds this multiple of the best one's
PROBE_CALLS = 3  # timed calls per layer candidate at the probe batch (at most)
LAYER_CALLS = 5  # timed calls per layer candidate at full capacity (at most)
STEP_CALLS = 5  # timed calls per whole-step candidate (at most)
MIN_CALLS = 2  # timed calls before a candidate can be found clearly slower than the leader
SETTLE_S = 0.002  # pause before each timed call (see `_race`)
ARITHMETIC_PRUNE = 8.0  # per-example norms needing this multiple of another choice's multiply-adds: not timed
GATE, GATE_BASE = "nonprivate default xla", "nonprivate keras graph"  # the XLA gate's two steps
XLA_GATE = 1.5  # XLA's layers are chosen only if the gate's XLA step is within this factor of its baseline
MIN_CHUNK = 128  # smallest pass the planner tries (smaller passes pay per-op overhead for little memory)
BUSY, QUIET = 0.25, 0.1  # other processes' CPU share: a plan timed above BUSY is timed again below QUIET
QUIET_SAMPLE_S = 0.5  # how long a cached busy plan's machine is watched before deciding it is quiet
TIE = 1.05  # whole steps within this factor of the fastest count as equally fast: the least memory wins


@dataclass(frozen=True)
class StepPlan:
    """What the step runs: `gradient_path` ('fast', 'vectorized_map' or, non-private, 'keras'),
    `jit_compile`, `formulation` ({layer: choice} for the fast path, else {}), `chunk_size` (a private
    step's per-example work runs in sequential passes of this many slots, 0 = one pass over the capacity:
    `engine.chunked_gradient_sum`); `source` says how it was
    decided ('measured', 'cache', 'config'), `planning_s` how long measuring took, `step_ms` the
    whole-step candidates' median milliseconds (what the choice was made on), `layer_ms` the per-layer
    candidates' (per XLA setting: at full capacity without XLA, at the probe batch with XLA)."""

    gradient_path: str
    jit_compile: bool
    formulation: dict[str, dict[str, str]] = field(default_factory=dict)
    chunk_size: int = 0
    source: str = "measured"
    planning_s: float = 0.0
    step_ms: dict[str, float] = field(default_factory=dict)
    layer_ms: dict[str, Any] = field(default_factory=dict)
    others: float = -1.0  # the share of the CPUs other processes used while it was measured (-1: unknown)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def functions(self, private: bool):
        """(grad_sum_fn, forward_fn) for `engine.make_train_step`."""
        from dpsgd_cli.training import engine, fastgrad

        if not private:
            fast = self.gradient_path == "fast"
            return None, (fastgrad.make_forward_fn(self.formulation) if fast else None)
        fn = (engine.vmap_clipped_gradient_sum if self.gradient_path == "vectorized_map"
              else fastgrad.make_grad_sum_fn(self.formulation))
        return (engine.chunked_gradient_sum(fn, self.chunk_size) if self.chunk_size else fn), None

    def describe(self) -> str:
        """One line: XLA, path, passes, and each layer's choice."""
        layers = ", ".join(f"{name} {'/'.join(choice.values())}" for name, choice in self.formulation.items())
        passes = f", passes of {self.chunk_size}" if self.chunk_size else ""
        return (f"{self.gradient_path}, XLA {'on' if self.jit_compile else 'off'}{passes}"
                + (f": {layers}" if layers else "") + f" ({self.source})")


def cache_dir() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "dpsgd"


def device_description() -> str:
    """The CPU model and thread count, and any GPU's name: what makes kernels fast or slow."""
    import tensorflow as tf

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpus = []
    for gpu in tf.config.list_physical_devices("GPU"):
        details = tf.config.experimental.get_device_details(gpu)
        gpus.append(details.get("device_name", gpu.name))
    return f"{cpu} × {os.cpu_count()} threads" + (f"; GPU {', '.join(gpus)}" if gpus else "")


def runtime_settings() -> dict[str, Any]:
    """What else changes which kernels run, beside the device: TensorFlow's oneDNN switch (the environment
    variable; unset = the build's default) and its thread pools (0 = TensorFlow's default)."""
    import tensorflow as tf

    return {"TF_ENABLE_ONEDNN_OPTS": os.environ.get("TF_ENABLE_ONEDNN_OPTS", "default"),
            "intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads(),
            "inter_op_threads": tf.config.threading.get_inter_op_parallelism_threads()}


def model_signature(model) -> list:
    """Layer names, types, shapes and the configuration that changes the work (not initial weights: each
    layer rule's `signature_keys`), and for a model that is not Sequential its wiring."""
    import keras

    from dpsgd_cli.training import fastgrad

    rows = []
    for layer in model.layers:
        config, rule = layer.get_config(), fastgrad.rule_for(layer)
        keys = rule.signature_keys if rule else fastgrad.SIGNATURE_KEYS
        rows.append([type(layer).__name__, layer.name, list(layer.output.shape[1:]),
                     {k: config[k] for k in keys if k in config}])
    signature = [list(model.inputs[0].shape[1:]), rows]
    if not isinstance(model, keras.Sequential):
        try:
            signature.append(fastgrad.graph_signature(model))
        except fastgrad.GraphProblem:
            signature.append(None)
    return signature


def validate_formulation(model, formulation: dict, private: bool) -> dict[str, dict[str, str]]:
    """`training.plan` checked against the model: known layer names, choices the layer offers."""
    if not isinstance(formulation, dict):
        raise ConfigError(f"training.plan: must be auto or a mapping of layer names to choices, "
                          f"got {formulation!r}")
    options = _layer_options(model, private=True)
    allowed_private = {name: choices for name, choices in options}
    out = {}
    for name, choice in formulation.items():
        if name not in allowed_private:
            raise ConfigError(f"training.plan.{name}: no such layer with a choice; layers: "
                              f"{', '.join(allowed_private) or 'none'}")
        if not isinstance(choice, dict) or not any(
                all(c.get(k) == v for k, v in choice.items()) for c in allowed_private[name]):
            shown = "; ".join(", ".join(f"{k}: {v}" for k, v in c.items()) for c in allowed_private[name])
            raise ConfigError(f"training.plan.{name}: {choice!r} is not one of: {shown}")
        out[name] = {k: v for k, v in choice.items() if private or k == "forward"}
    return out


def _layer_options(model, private: bool) -> list[tuple[str, list[dict[str, str]]]]:
    from dpsgd_cli.training import fastgrad

    out = []
    for layer, first in fastgrad.layers_in_order(model):
        choices = fastgrad.formulation_choices(layer, first, private)
        if choices:
            out.append((layer.name, choices))
    return out


def plan_step(model, *, capacity: int, private: bool, microbatch_size: int = 1, jit_compile: Any = "auto",
              gradient_path: str = "auto", formulation: Any = "auto", chunk_size: Any = "auto",
              use_cache: bool = True) -> StepPlan:
    """The plan for this model's step at `capacity` slots (see the module docstring).

    `jit_compile`: 'auto' (measure) or True/False (forced). `gradient_path`: 'auto', 'fast' or
    'vectorized_map' (training.gradient_path). `formulation`: 'auto' or {layer: choice} (training.plan).
    `chunk_size`: 'auto' (measure) or slots per pass of a private step (training.chunk_size; ≥ capacity
    means one pass)."""
    import tensorflow as tf

    from dpsgd_cli.training import fastgrad

    supported = fastgrad.supports_fast_path(model)
    if gradient_path == "fast" and not supported:
        fastgrad.choose_gradient_sum_fn(model, "fast")  # raises the ConfigError naming the layer
    model = fastgrad.as_functional(model)  # a subclassed model: its traced graph over the same layers
    fast = supported and gradient_path != "vectorized_map"
    fixed = validate_formulation(model, formulation, private) if formulation != "auto" else None
    if fixed is not None and not fast:
        raise ConfigError("training.plan: formulations need the fast path (training.gradient_path: auto "
                          "or fast, and a model of Dense, Conv2D and weightless layers)")
    jit_modes = (False, True) if jit_compile == "auto" else (bool(jit_compile),)
    sizes = chunk_sizes(capacity, microbatch_size) if chunk_size == "auto" else [int(chunk_size)]
    sizes = [0 if size >= capacity else size for size in sizes] if private else [0]
    if os.environ.get(OFF_ENV, "").lower() == "off":
        formulation = {**fastgrad.default_formulation(model), **(fixed or {})} if fast else {}
        if fast and not private:
            formulation = {name: {"forward": c["forward"]} for name, c in formulation.items()}
        path = "fast" if fast else ("vectorized_map" if private else "keras")
        chunk = sizes[0] if chunk_size != "auto" else 0
        return StepPlan(path, jit_modes[0], formulation, chunk, source=f"default ({OFF_ENV}=off)")
    key = json.dumps({"v": PLAN_VERSION, "device": device_description(), "runtime": runtime_settings(),
                      "tensorflow": tf.__version__,
                      "model": model_signature(model), "capacity": capacity, "private": private,
                      "microbatch_size": microbatch_size, "jit": list(jit_modes), "fast": fast,
                      "formulation": fixed, "chunks": sizes}, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:24]
    if use_cache:
        cached = _read_cache().get(digest)
        if cached:
            try:
                plan = StepPlan(**{**cached, "source": "cache"})
                if plan.others <= BUSY or not 0 <= _others_now() < QUIET:
                    return plan
            except TypeError:
                pass
    before, start = cpu_times(), time.perf_counter()
    logger = tf.get_logger()
    level = logger.level
    logger.setLevel("ERROR")  # each candidate is its own tf.function: TF's retracing warnings are expected
    try:
        plan = _measure(model, capacity, private, microbatch_size, jit_modes, fast, fixed, sizes)
    finally:
        logger.setLevel(level)
    decided = fixed is not None and len(jit_modes) == 1 and len(sizes) == 1
    seconds = time.perf_counter() - start
    plan = StepPlan(**{**plan.to_dict(), "planning_s": round(seconds, 2),
                       "source": "config" if decided else "measured",
                       "others": round(others_share(before, cpu_times(), seconds), 3)})
    if use_cache:
        _write_cache(digest, plan.to_dict())
    return plan


def cpu_times() -> tuple[float, float] | None:
    """(CPU-seconds all CPUs were busy since boot, CPU-seconds this process has used), or None where
    /proc/stat is missing (not Linux)."""
    try:
        ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return None
    idle = ticks[3] + ticks[4]  # idle, iowait; the others: user nice system irq softirq steal
    return (sum(ticks) - idle) / os.sysconf("SC_CLK_TCK"), sum(os.times()[:4])


def others_share(before: tuple[float, float] | None, after: tuple[float, float] | None,
                 seconds: float) -> float:
    """The share of the machine's CPUs (0 to 1) that other processes (and the hypervisor's steal) used
    between two `cpu_times` samples `seconds` apart; -1 if unknown. Other jobs change which formulation
    wins (under contention, passes small enough to stay in cache do), so a plan timed on a busy machine
    (above BUSY) is timed again when a later run finds the machine quiet (below QUIET)."""
    if before is None or after is None or seconds <= 0:
        return -1.0
    busy = (after[0] - before[0]) - (after[1] - before[1])
    return min(1.0, max(0.0, busy / ((os.cpu_count() or 1) * seconds)))


def _others_now() -> float:
    before, start = cpu_times(), time.perf_counter()
    time.sleep(QUIET_SAMPLE_S)
    return others_share(before, cpu_times(), time.perf_counter() - start)


def _read_cache() -> dict[str, Any]:
    try:
        data = json.loads((cache_dir() / CACHE_FILE).read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_cache(digest: str, plan: dict[str, Any]) -> None:
    """Best effort: a cache that cannot be written only means planning again next time."""
    try:
        folder = cache_dir()
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(folder / CACHE_FILE, json.dumps({**_read_cache(), digest: plan}, indent=1))
    except OSError:
        pass


def chunk_sizes(capacity: int, microbatch_size: int = 1) -> list[int]:
    """Pass sizes the planner tries for a private step: the capacity, then halves (whole microbatches)
    down to MIN_CHUNK slots."""
    sizes, parts = [capacity], 2
    while True:
        size = -(-capacity // parts // microbatch_size) * microbatch_size
        if size < MIN_CHUNK or size >= sizes[-1]:
            return sizes
        sizes.append(size)
        parts *= 2


def _measure(model, capacity, private, microbatch_size, jit_modes, fast, fixed, sizes) -> StepPlan:
    """Steps 1–5 of the module docstring; for a private step, each candidate formulation is also tried
    in passes of each of `sizes` slots (0 = the capacity), its layers chosen at that size."""
    layer_ms: dict[str, Any] = {}
    steps = _Steps(model, capacity, private, microbatch_size)
    if not fast:
        path = "vectorized_map" if private else "keras"
        candidates = {_name(path, "xla" if jit else "graph", size): StepPlan(path, jit, chunk_size=size)
                      for jit in jit_modes for size in sizes}
        return _decide(steps, candidates, layer_ms)
    if False not in jit_modes:  # XLA forced
        xla = _fast_candidates(model, capacity, private, microbatch_size, True, fixed, sizes, layer_ms)
        return _decide(steps, xla, layer_ms)
    gate, gate_steps = None, steps
    if True in jit_modes and fixed is None:
        # XLA or not: an XLA compile costs seconds, so XLA is first tried once, on the model's default
        # non-private step (built from the formulations XLA handles well; the work every step shares, and
        # half the compile of a private step), compiled in the background while the steps without XLA are
        # traced, then raced against the Keras step (private) or the best step without XLA (non-private)
        if private:
            gate_steps = _Steps(model, capacity, False, microbatch_size)
        gate = {GATE: _default_plan(model, False, jit=True)}
        gate_steps.start(gate)
    graph = _fast_candidates(model, capacity, private, microbatch_size, False, fixed, sizes, layer_ms,
                             before_timing=gate_steps.wait)
    if fixed is None:
        _add_default(graph, model, private)
    if True not in jit_modes:
        return _decide(steps, graph, layer_ms)
    if gate is None:  # the config fixes the formulation: its step with and without XLA
        xla = _fast_candidates(model, capacity, private, microbatch_size, True, fixed, sizes, layer_ms)
        return _decide(steps, {**graph, **xla}, layer_ms)
    if private:
        step_ms = steps.race(graph) if len(graph) > 1 else {}
        step_ms.update(gate_steps.race({GATE_BASE: StepPlan("keras", False), **gate}))
        baseline = step_ms[GATE_BASE]
    else:
        step_ms = steps.race({**graph, **gate})
    best = (choose({name: step_ms[name] for name in graph}, _slots(graph, capacity)) if len(graph) > 1
            else next(iter(graph)))
    if step_ms[GATE] > XLA_GATE * (baseline if private else step_ms[best]):
        return StepPlan(**{**graph[best].to_dict(), "step_ms": step_ms, "layer_ms": layer_ms})
    xla = _fast_candidates(model, capacity, private, microbatch_size, True, fixed, sizes, layer_ms)
    final = {best: graph[best], **({} if private else gate), **xla}
    step_ms.update(steps.race(final))
    chosen = choose({name: step_ms[name] for name in final}, _slots(final, capacity))
    return StepPlan(**{**final[chosen].to_dict(), "step_ms": step_ms, "layer_ms": layer_ms})


def _fast_candidates(model, capacity, private, microbatch_size, jit, fixed, sizes, layer_ms,
                     before_timing=None):
    """The fast path's whole-step candidates at one XLA setting: the layers' fastest formulations (or the
    config's), per pass size; non-private, also the plain Keras step. Records per-layer timings."""
    from dpsgd_cli.training import fastgrad

    tag, candidates = ("xla" if jit else "graph"), {}
    if not private:
        if fixed is not None:
            chosen = {**fastgrad.default_formulation(model), **fixed}
        else:
            chosen, layer_ms[tag] = _fastest_per_layer(model, capacity, private, microbatch_size, jit,
                                                       full=not jit, before_timing=before_timing)
        chosen = {name: {"forward": c["forward"]} for name, c in chosen.items()}
        if fastgrad.make_forward_fn(chosen) is not None:
            candidates[f"fast {tag}"] = StepPlan("fast", jit, chosen)
        if fixed is None or fastgrad.make_forward_fn(chosen) is None:
            candidates[f"keras {tag}"] = StepPlan("keras", jit)
        return candidates
    # under XLA the probe alone chooses the layers, and passes are tried only when the config fixes them
    # (XLA schedules memory itself); without XLA, layers are timed at each pass size, candidates that were
    # more than PRUNE× slower at the full capacity left out
    keep = None
    for size in (sizes if not jit or len(sizes) == 1 else [0]):
        if fixed is not None:
            chosen = {**fastgrad.default_formulation(model), **fixed}
        else:
            chosen, layer_ms[_name("", tag, size).strip()] = _fastest_per_layer(
                model, size or capacity, private, microbatch_size, jit, full=not jit, keep=keep,
                before_timing=before_timing)
            keep = keep or {name: set(ms) for name, ms in layer_ms[_name("", tag, size).strip()].items()}
        candidates[_name("fast", tag, size)] = StepPlan("fast", jit, chosen, size)
    return candidates


def _decide(steps: _Steps, candidates: dict[str, StepPlan], layer_ms) -> StepPlan:
    """The fastest of `candidates` (`choose`), raced as whole steps unless there is only one."""
    if len(candidates) == 1:
        return StepPlan(**{**next(iter(candidates.values())).to_dict(), "layer_ms": layer_ms})
    step_ms = steps.race(candidates)
    best = choose(step_ms, _slots(candidates, steps.capacity))
    return StepPlan(**{**candidates[best].to_dict(), "step_ms": step_ms, "layer_ms": layer_ms})


def _slots(candidates: dict[str, StepPlan], capacity: int) -> dict[str, int]:
    return {name: plan.chunk_size or capacity for name, plan in candidates.items()}


def choose(step_ms: dict[str, float], slots_per_pass: dict[str, int]) -> str:
    """The candidate to run: among those within TIE× of the fastest median (equally fast, given the
    timing noise), the one with the fewest slots per pass (the least memory), then the fastest."""
    fastest = min(step_ms.values())
    return min((name for name, ms in step_ms.items() if ms <= TIE * fastest),
               key=lambda name: (slots_per_pass[name], step_ms[name]))


def _default_plan(model, private: bool, jit: bool = False) -> StepPlan:
    """The step `DPSGD_PLANNER=off` runs: each rule's default formulation in one pass (non-private: the
    default forward, or the Keras step when it is all native)."""
    from dpsgd_cli.training import fastgrad

    default = fastgrad.default_formulation(model)
    if not private:
        default = {name: {"forward": c["forward"]} for name, c in default.items()}
        if fastgrad.make_forward_fn(default) is None:
            return StepPlan("keras", jit)
    return StepPlan("fast", jit, default)


def _add_default(candidates: dict[str, StepPlan], model, private: bool) -> None:
    """The step `DPSGD_PLANNER=off` runs (each rule's default, one pass, XLA off) competes too, unless a
    candidate already is it: layers timed alone can mislead (a loaded machine, kernels that interact), and
    then the plan is still no slower than not planning."""
    plan = _default_plan(model, private)
    if plan.gradient_path == "keras":
        return  # all native: the Keras step, already a candidate
    if all((c.gradient_path, c.jit_compile, c.formulation, c.chunk_size)
           != ("fast", False, plan.formulation, 0) for c in candidates.values()):
        candidates["default graph"] = plan


def _name(path: str, tag: str, size: int) -> str:
    return f"{path} {tag}" + (f" passes of {size}" if size else "")


def layer_shapes(model, capacity: int) -> dict[str, tuple[int, ...]]:
    """Each (single-input) layer's input shape at `capacity` examples."""
    from dpsgd_cli.training import fastgrad

    return {name: (capacity, *shape) for name, shape in fastgrad.layer_input_shapes(model).items()}


def _fastest_per_layer(model, capacity, private, microbatch_size, jit, full: bool, keep=None,
                       before_timing=None):
    """Each layer's fastest formulation, timed alone. `full` (without XLA, where a candidate compiles in
    a fraction of a second): every candidate at the full capacity, raced (`_race`: one that is more than
    PRUNE× slower after its first call, or clearly slower after MIN_CALLS, stops being timed); `keep`
    ({layer: choice labels}) limits a layer to those choices. Otherwise (XLA: each compile costs about a
    second) only at the probe batch, where a pathological kernel also shows cheaply. Every candidate is
    compiled (a first call) before `before_timing()` runs and any is timed. Returns (formulation,
    {layer: {choice: ms}} of the deciding timings: candidates within PRUNE× of the best)."""
    from dpsgd_cli.training import fastgrad

    chosen, timings = fastgrad.default_formulation(model), {}
    shapes = layer_shapes(model, capacity)
    firsts = {layer.name: first for layer, first in fastgrad.layers_in_order(model)}
    batch = capacity if full else min(PROBE, capacity)
    layers = []
    for name, choices in _layer_options(model, private):
        layer = model.get_layer(name)
        if keep is not None and name in keep:
            choices = [c for c in choices if "/".join(c.values()) in keep[name]] or choices
        choices = _arithmetic_prune(layer, shapes[name], choices)
        works = [layer_work(layer, c, shapes[name], batch, private, firsts[name], microbatch_size, jit)
                 for c in choices]
        for work in works:
            float(work())  # trace and compile now
        layers.append((name, choices, works))
    if before_timing:
        before_timing()
    for name, choices, works in layers:
        ms = _race(works, LAYER_CALLS if full else PROBE_CALLS, margin=1.0)
        kept = [i for i, t in enumerate(ms) if t <= PRUNE * min(ms)]
        best = min(kept, key=ms.__getitem__)
        chosen[name] = choices[best]
        timings[name] = {"/".join(choices[i].values()): round(ms[i], 3) for i in kept}
    return chosen, timings


def _multiply_adds(layer, shape, grads: str) -> float | None:
    """Multiply-adds per example of a Dense or Conv2D layer's per-example norms and weighted sum under
    `grads` ('materialize' or 'ghost'), by `kernel.prefer_ghost`'s model: materializing costs T·p·c + 2·p·c,
    ghost norms T²(p+c+1) (p + c for one row) plus the weighted sum's T·p·c, with T output positions, p the
    kernel's inputs, c its outputs. None for any other layer or choice."""
    kernel = getattr(layer, "kernel", None)
    if grads not in ("materialize", "ghost") or kernel is None or len(kernel.shape) not in (2, 4):
        return None
    p, c = float(np.prod(kernel.shape[:-1])), float(kernel.shape[-1])
    out = layer.compute_output_shape(shape)
    t = float(np.prod(out[1:-1])) if len(out) > 2 else 1.0
    if grads == "materialize":
        return t * p * c + 2 * p * c
    return (p + c if t == 1 else t * t * (p + c + 1)) + t * p * c


def _arithmetic_prune(layer, shape, choices: list[dict[str, str]]) -> list[dict[str, str]]:
    """`choices` without those whose per-example norms need more than ARITHMETIC_PRUNE× the multiply-adds
    of another choice of the same layer (e.g. Gram matrices of 196 output positions in a first Conv2D):
    not worth a compile and a timing."""
    costs = [_multiply_adds(layer, shape, c.get("grads", "")) for c in choices]
    known = [cost for cost in costs if cost is not None]
    if not known:
        return choices
    return [c for c, cost in zip(choices, costs) if cost is None or cost <= ARITHMETIC_PRUNE * min(known)]


def layer_work(layer, choice, shape, batch, private, first, microbatch_size, jit):
    """A compiled call doing one layer's share of the step under `choice`, on fixed random inputs: a weight
    layer's forward, gradient to its input (unless `first`) and per-unit terms with their weighted sum
    (non-private: its gradients); any other layer's forward and gradient to its input."""
    import tensorflow as tf

    from dpsgd_cli.training import fastgrad

    rng = np.random.default_rng(0)
    a = tf.constant(rng.random((batch, *shape[1:]), dtype=np.float32))
    rule = fastgrad.rule_for(layer)
    if rule.weighted:
        out_shape = layer.compute_output_shape((batch, *shape[1:]))
        dz = tf.constant(rng.normal(size=out_shape).astype(np.float32))
        k = microbatch_size if batch % microbatch_size == 0 else 1
        units = batch // k
        weights = tf.constant(rng.random(units, dtype=np.float32))

        def work():
            with tf.GradientTape(watch_accessed_variables=not private) as tape:
                tape.watch(a)
                z, aux = rule.pre_activation(layer, a, choice)
            if not private:  # the first layer's input needs no gradient
                targets = ([] if first else [a]) + list(layer.trainable_variables)
                grads = tape.gradient(z, targets, output_gradients=dz)
                return tf.add_n([tf.reduce_sum(g) for g in grads if g is not None])
            out = [] if first else [tf.reduce_sum(tape.gradient(z, a, output_gradients=dz))]
            sq, term = rule.unit_terms(layer, a, aux, dz, units, k, choice)
            out += [tf.reduce_sum(sq)] + [tf.reduce_sum(s) for s in rule.weighted_sums(layer, term, weights)]
            return tf.add_n(out)
    else:
        up = tf.constant(rng.normal(size=(batch, *layer.compute_output_shape(shape)[1:])).astype(np.float32))

        def work():
            with tf.GradientTape() as tape:
                tape.watch(a)
                h = rule.forward(layer, a, choice)
            return tf.reduce_sum(tape.gradient(h, a, output_gradients=up))
    return tf.function(work, jit_compile=jit, autograph=False)  # rule code: no tensor-dependent Python


def _race(fns, calls: int, margin: float) -> list[float]:
    """Median milliseconds per call of each function (one untimed first call each), the calls of a round
    interleaved in a fresh random order after a pause of SETTLE_S (a call leaves thread pools spinning for
    a while: the same function always following another would be billed for it). A candidate stops being
    timed when, after the first round, it took more than PRUNE× the fastest, or, after MIN_CALLS rounds,
    even its fastest call is slower than `margin`× the leader's median (the leader: the smallest median):
    clearly slower, more calls would not change the choice. Its median is then over the calls it had."""
    for fn in fns:
        float(fn())
    times: list[list[float]] = [[] for _ in fns]
    alive = list(range(len(fns)))
    shuffle = random.Random(0).shuffle
    for done in range(1, calls + 1):
        if len(alive) < 2 and done > 1:
            break
        shuffle(alive)
        for i in alive:
            time.sleep(SETTLE_S)
            start = time.perf_counter()
            float(fns[i]())
            times[i].append(time.perf_counter() - start)
        leader = min(statistics.median(times[i]) for i in alive)
        if done == 1:
            alive = [i for i in alive if times[i][0] <= PRUNE * leader]
        elif done >= MIN_CALLS:
            alive = [i for i in alive if min(times[i]) <= margin * leader]
    return [1000 * statistics.median(t) for t in times]


class _Steps:
    """The whole-step candidates of one planning, built as `engine.make_train_step` builds them, each once
    (a candidate raced again is not rebuilt), on fixed random inputs. `start` compiles candidates in a
    background thread: an XLA compile (seconds, mostly on one core) then overlaps the tracing the main
    thread does meanwhile; `wait` joins it, and every race waits first, so nothing is timed while a
    compile runs."""

    def __init__(self, model, capacity: int, private: bool, microbatch_size: int):
        import tensorflow as tf

        self.model, self.capacity, self.private = model, capacity, private
        self.microbatch_size = microbatch_size
        rng = np.random.default_rng(0)
        shape = (capacity, *model.inputs[0].shape[1:])
        if "int" in str(model.inputs[0].dtype):  # token ids: spread over the first layer's vocabulary
            vocabulary = getattr(model.layers[0], "input_dim", 2)
            x = tf.constant(rng.integers(0, vocabulary, shape), model.inputs[0].dtype)
        else:
            x = tf.constant(rng.random(shape, dtype=np.float32))
        y = tf.constant(rng.integers(0, model.outputs[0].shape[-1], capacity).astype(np.int32))
        self.data = (x, y, tf.ones([capacity]), tf.constant([1, 2], tf.int64))
        self.calls: dict[str, Any] = {}
        self.pending: set[str] = set()  # being compiled in the background
        self.threads: list[threading.Thread] = []
        self.errors: list[BaseException] = []

    def _call(self, plan: StepPlan):
        """A function running one step of `plan` on a fresh clone of the model (built, not yet traced),
        traced without autograph: the same graph (the step's code has no Python control flow on tensor
        values, and autograph does not convert Keras layers' `call`), several times faster to trace."""
        import keras
        import tensorflow as tf

        from dpsgd_cli.training import engine

        clone = keras.models.clone_model(self.model)
        settings = engine.StepSettings(private=self.private, noise_multiplier=1.0, l2_norm_clip=1.0,
                                       microbatch_size=self.microbatch_size, denominator=float(self.capacity),
                                       jit_compile=plan.jit_compile)
        step, _ = engine.make_train_step(clone, keras.optimizers.SGD(1e-6), settings,
                                         *plan.functions(self.private), autograph=False)
        zeros = [tf.zeros_like(v) for v in clone.trainable_variables]
        x, y, mask, seed = self.data
        return lambda: step(x, y, mask, zeros, seed)[0]

    def start(self, candidates: dict[str, StepPlan]) -> None:
        """Build `candidates` now and compile them (a first call) in a background thread."""
        calls = {name: self._call(plan) for name, plan in candidates.items()}
        self.pending |= set(calls)

        def compile_all() -> None:
            try:
                for name, call in calls.items():
                    float(call())
                    self.calls[name] = call
            except BaseException as exc:  # re-raised by `wait`, in the planning thread
                self.errors.append(exc)

        thread = threading.Thread(target=compile_all, daemon=True)
        thread.start()
        self.threads.append(thread)

    def wait(self) -> None:
        """Join the background compiles; raise what one of them raised."""
        for thread in self.threads:
            thread.join()
        self.threads.clear()
        self.pending.clear()
        if self.errors:
            raise self.errors.pop(0)

    def race(self, candidates: dict[str, StepPlan]) -> dict[str, float]:
        """Median ms per whole step of each candidate, raced with margin TIE: one clearly slower than
        TIE× the leader could not be chosen (`choose`)."""
        for name, plan in candidates.items():
            if name not in self.calls and name not in self.pending:
                call = self._call(plan)
                float(call())  # trace and compile now, beside any background compile
                self.calls[name] = call
        self.wait()
        times = _race([self.calls[name] for name in candidates], STEP_CALLS, margin=TIE)
        return {name: round(ms, 2) for name, ms in zip(candidates, times)}
