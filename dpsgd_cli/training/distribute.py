"""DP-SGD on tf.distribute: several devices (`mirrored`) or several processes/hosts (`multi_worker`).

The mechanism is the one the accountant assumes, whatever the number of replicas R:
1. One global Poisson sample per step from the run's key (`sampling.Sampler`, identical in every
   process, since every worker holds the same key: the chief's, broadcast once by `shared_key`).
2. Each chunk of the step (capacity slots, a multiple of R·u, u = examples per clipped unit) is dealt
   into R fixed slices of capacity/R slots, unit by unit, round robin: unit j goes to replica j mod R
   (`deal`). Padding stays padding (mask 0), so every replica runs every step, and every chunk
   (overflow chunks included: their number comes from the shared sampler) on every worker.
3. Each replica clips and sums its slice (`engine.make_gradient_sum`: the same backends as `none`); the
   R clipped sums are all-reduced with SUM (one collective per chunk).
4. After the all-reduce, every replica (every worker) holds the same global sum, and adds the same single
   N(0, σ²C²) draw keyed by (run key, step) to it, divides by the global denominator (the expected batch
   B) and hands the result to the optimizer in cross-replica context (`engine.noisy_gradients`), so
   Keras never all-reduces it again. The noise is thus added once to the global sum, as with `none`.
Therefore (q, σ, steps), the `DpEvent` and ε do not depend on R.

Why noise on the global sum (as jax-privacy) rather than on replica 0 before the all-reduce (as Opacus's
`DistributedDPOptimizer`): the draw then never passes through a collective or Keras's own all-reduce
(inside `strategy.run`, `optimizer.apply` all-reduces with SUM: noise added on every replica would count
R times, σC/R per replica would be √R too little), the division by B happens once, on the total, and
with R = 1 the step is the `none` step operation for operation (bit for bit, tests/test_distribute.py).
The cost: every replica draws the same noise (one Philox pass per replica; small next to the gradients).

Stop decisions are global: the step's loss statistics are all-reduced (a NaN is seen by every worker
at the same step), every worker holds the same weights (hence the same test loss) and runs the same
steps; under `multi_worker` SIGTERM / Ctrl-C only set a flag that each step all-reduces, so every worker
stops after the same step (`KeyboardInterrupt`, as Ctrl-C does with one process). A worker that
disappears makes the others' next collective fail (`collective_errors`: one TrainingError) at the latest
after `distribute.collective_timeout_s`, instead of hanging.

XLA: under a strategy the whole step (all-reduce + optimizer in cross-replica context) is not compiled;
the per-replica clipped sum is, when `jit_compile` (or the planner, for `auto`) says so.
Logical CPU devices (`distribute.cpu_devices`) must be configured before TensorFlow initialises its
devices: `setup` is called first thing by the runner.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dpsgd_cli.config import ExperimentConfig, replace
from dpsgd_cli.errors import ConfigError, TrainingError


@dataclass(frozen=True)
class Distribution:
    """The strategy of this process and what the run records about it. `replicas` is R (over all
    workers); `is_chief`: this process writes the run directory."""

    strategy: Any
    kind: str
    replicas: int
    workers: int
    worker_index: int
    is_chief: bool
    devices: tuple[str, ...]

    def record(self) -> dict[str, Any]:
        """run.yaml's `resolved.distribute` (provenance: ε does not depend on it)."""
        return {"strategy": self.kind, "replicas": self.replicas, "workers": self.workers,
                "devices_per_worker": list(self.devices)}

    def scope(self):
        return self.strategy.scope()

    def capacity(self, capacity: int, unit: int) -> int:
        """The global slots per chunk: `capacity` rounded up to a multiple of R·unit (extra slots are
        padding, mask 0). ConfigError when units would have to be split (microbatches)."""
        step = self.replicas * unit
        if capacity % step and unit > 1:
            raise ConfigError(f"privacy.num_microbatches: {capacity // unit} microbatches per step cannot "
                              f"be dealt to {self.replicas} replicas; choose a multiple of {self.replicas}")
        return step * -(-capacity // step)


_ACTIVE: dict[str, Distribution] = {}  # this process's strategies, by their config
_STOP = {"requested": False}  # multi_worker: SIGTERM/SIGINT seen here; acted on by all workers together


def _request_stop(signum, frame) -> None:
    _STOP["requested"] = True


def _stop_together() -> None:
    """Multi-worker: SIGTERM or Ctrl-C only sets a flag; each step all-reduces the flags of every worker, so
    all stop after the same step (KeyboardInterrupt there, as Ctrl-C does with one process)."""
    import signal

    try:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, _request_stop)
    except ValueError:  # not the main thread: signals stay as they are
        pass


def setup(cfg: ExperimentConfig) -> Distribution | None:
    """Configure the devices and create the strategy of `cfg.distribute` (None for `none`); call it before
    anything else touches TensorFlow (logical CPUs and multi-worker collectives must come first). The same
    config returns the same Distribution. ConfigError for what this process cannot do (devices missing,
    a CPU split after TensorFlow started, a second multi-worker setup, microbatches not dealt evenly)."""
    d = cfg.distribute
    if d.strategy == "none":
        return None
    wanted = json.dumps(dataclasses.asdict(d), sort_keys=True)
    dist = _ACTIVE.get(wanted)
    if dist is None:
        import tensorflow as tf

        split_cpu(d.cpu_devices)
        if d.strategy == "multi_worker" and any(v.kind == "multi_worker" for v in _ACTIVE.values()):
            raise ConfigError("distribute.strategy: this process already joined a multi-worker cluster; "
                              "start a new process for another one")
        dist = mirrored(d.devices) if d.strategy == "mirrored" else _multi_worker(tf, d)
        _ACTIVE[wanted] = dist
        if dist.kind == "multi_worker":
            _stop_together()
    m = cfg.privacy.num_microbatches
    if m is not None and m % dist.replicas:
        raise ConfigError(f"privacy.num_microbatches: {m} must be divisible by the number of replicas "
                          f"({dist.replicas})")
    return dist


def split_cpu(count: int | None) -> None:
    """Make the CPU `count` logical devices (None: leave it); ConfigError once TensorFlow has started."""
    if not count:
        return
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    try:
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * count)
    except RuntimeError:
        have = len(tf.config.list_logical_devices("CPU"))
        if have != count:
            raise ConfigError(f"distribute.cpu_devices: TensorFlow already initialised {have} CPU "
                              f"device(s) in this process; {count} must be set before it starts (a new "
                              "process)") from None


def mirrored(devices: list[str] | None) -> Distribution:
    """A MirroredStrategy over `devices` (e.g. ['CPU:0', 'CPU:1']; None: all GPUs, else all CPUs)."""
    import tensorflow as tf

    if devices:
        known = {short_name(d.name) for d in tf.config.list_logical_devices()}
        missing = [d for d in devices if short_name(d) not in known]
        if missing:
            raise ConfigError(f"distribute.devices: {', '.join(missing)} not found; this process has "
                              f"{', '.join(sorted(known))}")
        chosen = [short_name(d) for d in devices]
    else:
        gpus = tf.config.list_logical_devices("GPU")
        chosen = [short_name(d.name) for d in (gpus or tf.config.list_logical_devices("CPU"))]
    cpu_only = all(d.startswith("CPU") for d in chosen)
    ops = tf.distribute.ReductionToOneDevice() if cpu_only else None  # NCCL (the default) needs GPUs
    strategy = tf.distribute.MirroredStrategy(chosen, cross_device_ops=ops)
    return Distribution(strategy, "mirrored", strategy.num_replicas_in_sync, 1, 0, True, tuple(chosen))


def short_name(name: str) -> str:
    """'/job:localhost/replica:0/task:0/device:CPU:1' or '/device:CPU:1' → 'CPU:1'."""
    return name.rsplit("/", 1)[-1].removeprefix("device:")


def cluster_resolver(cluster: str):
    """TensorFlow's resolver of the cluster this worker is in: from TF_CONFIG (`tf_config`) or from the
    Slurm job step's environment (`slurm`: one task per worker, ports from 8888 on each node, GPUs of a
    node shared evenly by its tasks; a node without nvidia-smi and CUDA_VISIBLE_DEVICES is taken to have
    no GPU). ConfigError if it cannot."""
    import tensorflow as tf

    resolvers = tf.distribute.cluster_resolver
    if cluster == "tf_config":
        if not os.environ.get("TF_CONFIG"):
            raise ConfigError("distribute.cluster: tf_config needs the TF_CONFIG environment variable "
                              "({\"cluster\": {\"worker\": [\"host:port\", ...]}, \"task\": {\"type\": "
                              "\"worker\", \"index\": i}}) in every worker")
        try:
            resolver = resolvers.TFConfigClusterResolver()
            resolver.cluster_spec()
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ConfigError(f"distribute.cluster: TF_CONFIG is not a valid cluster description "
                              f"({exc.__class__.__name__}: {str(exc)[:120]})") from None
        return resolver
    if "SLURM_PROCID" not in os.environ:
        raise ConfigError("distribute.cluster: slurm needs to run inside a Slurm job step (srun), "
                          "SLURM_PROCID is not set")
    no_gpu = shutil.which("nvidia-smi") is None and "CUDA_VISIBLE_DEVICES" not in os.environ
    # TensorFlow's resolver gives each task of a node a port *and* a GPU slot (it zips the two), and
    # fails without nvidia-smi; on a CPU node it gets placeholder slots and leaves CUDA_VISIBLE_DEVICES
    cpu_node = {"gpus_per_node": 1024, "gpus_per_task": 1, "auto_set_gpu": False}
    try:
        return resolvers.SlurmClusterResolver(**(cpu_node if no_gpu else {}))
    except (RuntimeError, ValueError, KeyError, OSError) as exc:
        raise ConfigError(f"distribute.cluster: Slurm's cluster could not be resolved "
                          f"({exc.__class__.__name__}: {str(exc)[:120]})") from None


def _multi_worker(tf, d) -> Distribution:
    resolver = cluster_resolver(d.cluster)
    options = tf.distribute.experimental.CommunicationOptions(timeout_seconds=d.collective_timeout_s)
    strategy = tf.distribute.MultiWorkerMirroredStrategy(cluster_resolver=resolver,
                                                         communication_options=options)
    spec = resolver.cluster_spec().as_dict()
    workers = sum(len(v) for k, v in spec.items() if k in ("chief", "worker"))
    index = int(resolver.task_id or 0) + (1 if "chief" in spec and resolver.task_type == "worker" else 0)
    local = tuple(short_name(v) for v in strategy.extended.worker_devices)
    return Distribution(strategy, "multi_worker", strategy.num_replicas_in_sync, workers, index,
                        bool(strategy.extended.should_checkpoint), local)


def shared_key(dist: Distribution, key):
    """Every worker's copy of the chief's run key (one all-reduce in which only the chief contributes):
    batches and noise must be identical on every worker. The key crosses the cluster's network, like
    the unnoised per-replica sums do: the interconnect must be trusted (docs/distributed.md)."""
    if dist.workers == 1:
        return key
    import tensorflow as tf

    from dpsgd_cli.privacy.run_key import RunKey

    local = len(dist.devices)
    material = np.frombuffer(key.material, np.uint8) if dist.is_chief else np.zeros(16, np.uint8)
    mine = tf.constant(material.astype(np.float32))  # bytes are exact in float32

    @tf.function
    def broadcast():
        def contribute():
            return tf.distribute.get_replica_context().all_reduce("sum", mine)
        return dist.strategy.run(contribute)

    with collective_errors(dist):
        total = dist.strategy.experimental_local_results(broadcast())[0].numpy() / local
    material = np.rint(total).astype(np.uint8).tobytes()
    if dist.is_chief and material != key.material:
        raise TrainingError("distribute: the run key did not survive its broadcast to the workers")
    return RunKey(material, key.mode)


@contextlib.contextmanager
def collective_errors(dist: Distribution):
    """A failed or timed-out collective (a worker lost, unreachable or too slow) as one TrainingError."""
    import tensorflow as tf

    try:
        yield
    except (tf.errors.UnavailableError, tf.errors.DeadlineExceededError, tf.errors.CancelledError,
            tf.errors.AbortedError, tf.errors.InternalError) as exc:
        first = (exc.message or exc.__class__.__name__).strip().splitlines()[0][:160]
        raise TrainingError(f"distribute: a collective across the {dist.workers} workers failed ({first}); "
                            f"a worker was lost or did not answer within distribute.collective_timeout_s"
                            ) from None


def worker_config(dist: Distribution, cfg: ExperimentConfig, resume: bool) -> ExperimentConfig:
    """A non-chief worker's config: its run directory is a private scratch copy (removed at exit), so only
    the chief writes `cfg.run_dir`. On resume the chief's run directory (on a filesystem every worker
    sees) is copied, so the worker restores the same checkpoint."""
    scratch = Path(tempfile.mkdtemp(prefix=f"dpsgd-worker{dist.worker_index}-"))
    atexit.register(shutil.rmtree, scratch, ignore_errors=True)
    if resume:
        if not cfg.run_dir.is_dir():
            raise ConfigError(f"{cfg.run_dir}: not found on worker {dist.worker_index}; resuming a "
                              "multi-worker run needs the run directory on a filesystem every worker sees")
        shutil.copytree(cfg.run_dir, scratch / cfg.name)
    return replace(cfg, output_dir=str(scratch))


def deal(values, replicas: int, unit: int = 1):
    """[capacity] → [R, capacity / R]: unit j (`unit` consecutive slots) goes to replica j mod R, in
    order. A numpy array gives a numpy array (the host's view, for tests), a tensor a tensor (in the
    step); capacity must be a multiple of R·unit."""
    units = values.shape[0] // (replicas * unit)
    if isinstance(values, np.ndarray):
        return values.reshape(units, replicas, unit).transpose(1, 0, 2).reshape(replicas, units * unit)
    import tensorflow as tf

    dealt = tf.reshape(values, [units, replicas, unit])
    return tf.reshape(tf.transpose(dealt, [1, 0, 2]), [replicas, units * unit])


def make_distributed_step(dist: Distribution, model, optimizer, settings, grad_sum_fn=None, forward_fn=None,
                          data=None, *, loss_fn=None):
    """`engine.make_train_step` under `dist`: `step(idx, mask, extra_sums, noise_seed) -> (loss sum, correct,
    count, dropped)` and `chunk_sum(idx, mask) -> global clipped sums`, on global chunks of indices into
    `data` = (x_all, y_all). `settings.jit_compile` compiles the per-replica clipped sum only (see module
    doc). The model and optimizer must have been created under `dist.scope()`."""
    import tensorflow as tf

    from dpsgd_cli.training import engine

    strategy, replicas = dist.strategy, dist.replicas
    variables = model.trainable_variables
    unit = settings.microbatch_size
    x_all, y_all = data
    loss_fn = loss_fn or engine.per_example_loss
    with dist.scope():
        optimizer.build(variables)
    plain = dataclasses.replace(settings, jit_compile=False)
    gradient_sum = engine.make_gradient_sum(model, plain, grad_sum_fn, forward_fn, loss_fn=loss_fn)

    def replica_terms(idx, mask):  # this replica's slice: clipped sums and the step statistics
        x, y = tf.gather(x_all, idx), tf.gather(y_all, idx)
        sums, losses, logits, kept = gradient_sum(x, y, mask)
        return sums, list(engine.step_statistics(losses, logits, y, mask, kept, settings.microbatch_size))

    def replica_sums(idx, mask):
        return gradient_sum(tf.gather(x_all, idx), tf.gather(y_all, idx), mask)[0]

    if settings.jit_compile:
        replica_terms = tf.function(replica_terms, jit_compile=True)
        replica_sums = tf.function(replica_sums, jit_compile=True)

    def own(fn, idx_rows, mask_rows, *flags):
        ctx = tf.distribute.get_replica_context()
        r = ctx.replica_id_in_sync_group
        flags = [tf.identity(f) for f in flags]  # a copy on this replica's device (an input has none)
        return ctx.all_reduce(tf.distribute.ReduceOp.SUM, (fn(idx_rows[r], mask_rows[r]), *flags))

    def local(per_replica):  # every replica holds the same all-reduced values: take this process's first
        return tf.nest.map_structure(lambda v: strategy.experimental_local_results(v)[0], per_replica)

    def step(idx, mask, extra_sums, noise_seed, stop):
        rows = deal(idx, replicas, unit), deal(mask, replicas, unit)
        (sums, stats), stops = local(strategy.run(own, args=(replica_terms, *rows, stop)))
        optimizer.apply(engine.noisy_gradients(variables, settings, sums, extra_sums, noise_seed), variables)
        return tuple(stats), stops

    def chunk_sum(idx, mask):
        rows = deal(idx, replicas, unit), deal(mask, replicas, unit)
        return local(strategy.run(own, args=(replica_sums, *rows)))[0]

    step_graph, chunk_graph = tf.function(step, reduce_retracing=False), tf.function(chunk_sum)
    if dist.workers == 1:  # one process: Ctrl-C / SIGTERM stop it as without tf.distribute
        return (lambda idx, mask, extra, seed: step_graph(idx, mask, extra, seed, np.float32(0))[0],
                chunk_graph)

    def step_together(idx, mask, extra, seed):
        """One step on every worker; the host waits for it (the all-reduced stop flag decides, for every
        worker alike, whether this was the last step)."""
        with collective_errors(dist):
            stats, stops = step_graph(idx, mask, extra, seed, np.float32(_STOP["requested"]))
            stopping = float(stops) > 0
        if stopping:
            raise KeyboardInterrupt
        return stats

    def chunk_together(idx, mask):
        with collective_errors(dist):
            return [v.numpy() for v in chunk_graph(idx, mask)]

    return step_together, chunk_together
