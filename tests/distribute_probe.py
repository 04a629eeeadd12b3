"""Run by tests/test_distribute.py in a fresh process (logical CPU devices must be configured before
TensorFlow starts): `python tests/distribute_probe.py MODE[+MODE] DATA_DIR`, prints one JSON line.

Modes:
- `equivalence`: 4 logical CPUs; epoch 1 (3 Poisson steps, padding, an overflow step) of `none` and of
  mirrored with 1, 2 and 4 replicas, for several (gradient path, optimizer, XLA) cases; the weights'
  max |difference| to `none` per replica count, and whether R = 1 is bit-identical. Then, under
  `padding`: one all-padding step (mask 0) of the SGD trainers (`none`, 2 and 4 replicas): the weight
  change against the regenerated noise −lr·N(0, σ²C²)/B.
- `plan`: the SHA-256 of epochs 1–2's dealt indices and masks for 4 replicas (numpy only).
"""

from __future__ import annotations

import hashlib
import json
import sys

import numpy as np

from dpsgd_cli.config import config_from_dict
from dpsgd_cli.privacy.plan import plan_privacy
from dpsgd_cli.privacy.run_key import new_run_key
from dpsgd_cli.privacy.sampling import Sampler
from dpsgd_cli.training import distribute

TRAIN, BATCH, CAPACITY = 96, 32, 32  # 3 steps per epoch; capacity 32 < Poisson batches now and then


def config(data_dir: str, replicas: int | None, *, path="fast", optimizer="sgd", lr=0.05, jit=False,
           seed=0):
    dist = {"strategy": "mirrored", "cpu_devices": 4 if (replicas or 0) > 1 else None,
            "devices": [f"CPU:{i}" for i in range(replicas)]} if replicas else {}
    return config_from_dict({
        "name": "probe", "seed": seed,
        "data": {"data_dir": data_dir, "train_size": TRAIN, "test_size": 100, "batch_size": BATCH},
        "training": {"epochs": 1, "optimizer": optimizer, "learning_rate": lr, "gradient_path": path,
                     "jit_compile": jit, "physical_batch_size": CAPACITY},
        "privacy": {"noise_multiplier": 1.0, "l2_norm_clip": 1.0, "reproducible": True},
        "distribute": dist})


def chosen_seed() -> tuple[int, list[int]]:
    """The first seed whose epoch 1 has a padded step and an overflow step (more than one chunk)."""
    for seed in range(100):
        sampler = Sampler(sampling="poisson", batch_size=BATCH, dataset_size=TRAIN,
                          key=new_run_key(reproducible=True, seed=seed), max_capacity=CAPACITY)
        chunks = [len(b.chunks) for b in sampler.epoch(1)]
        padded = [b.size % CAPACITY != 0 for b in sampler.epoch(1)]
        if max(chunks) > 1 and any(p for p, c in zip(padded, chunks) if c == 1):
            return seed, chunks
    raise RuntimeError("no seed with a padded and an overflow step")


def trainer(cfg, dataset):
    from dpsgd_cli.training.trainer import Trainer

    return Trainer(cfg, dataset, plan_privacy(cfg, len(dataset.y_train)),
                   new_run_key(reproducible=True, seed=cfg.seed))


def equivalence(data_dir: str) -> dict:
    """Per case, each trainer trains epoch 1; SGD trainers then take one all-padding step (`padding`)."""
    from dpsgd_cli.training.data import load_dataset

    distribute.setup(config(data_dir, 4))  # the 4 logical CPUs, before TensorFlow starts
    dataset = load_dataset("fashion_mnist", data_dir, TRAIN, 100)
    seed, chunks = chosen_seed()
    out = {"seed": seed, "chunks": chunks, "cases": [], "padding": {}}
    # (path, optimizer, lr, XLA, replica counts); the reference is `none` without XLA: under XLA
    # tf.random.stateless_normal draws other (equally distributed) numbers than TensorFlow's kernel, and
    # the distributed step compiles the clipped sum only, drawing its noise outside XLA
    cases = [("fast", "sgd", 0.05, False, (1, 2, 4)), ("vectorized_map", "adam", 0.01, False, (1, 2, 4)),
             ("fast", "sgd", 0.05, True, (2,))]  # XLA compiles once per device: 2 show it works
    references = {}
    for path, optimizer, lr, jit, counts in cases:
        weights = {}
        for replicas in (None, *counts):
            if replicas is None and (path, optimizer) in references:
                weights[None] = references[path, optimizer]
                continue
            t = trainer(config(data_dir, replicas, path=path, optimizer=optimizer, lr=lr,
                               jit=jit and replicas is not None, seed=seed), dataset)
            stats = t.train_epoch(1, None)
            weights[replicas] = ([w.copy() for w in t.model.get_weights()], stats, t.steps_done,
                                 t.ledger.steps, t.sampler.capacity, t.jit_compile)
            if optimizer == "sgd" and not jit and replicas != 1:
                out["padding"][str(replicas or "none")] = padding_step(t, lr)
        base = references[path, optimizer] = weights.pop(None)
        case = {"path": path, "optimizer": optimizer, "lr": lr, "jit": jit, "steps": base[2],
                "weight_scale": max(float(np.abs(w).max()) for w in base[0]), "results": {}}
        for replicas, (ws, stats, steps, ledger, capacity, used_jit) in weights.items():
            case["results"][str(replicas)] = {
                "max_diff": max(float(np.abs(a - b).max()) for a, b in zip(ws, base[0])),
                "identical": all(np.array_equal(a, b) for a, b in zip(ws, base[0])),
                "loss_diff": abs(stats["train_loss"] - base[1]["train_loss"]),
                "steps": steps, "ledger_steps": ledger, "capacity": capacity, "jit": used_jit}
        case["none_ledger_steps"] = base[3]
        out["cases"].append(case)
    return out


def padding_step(t, lr: float, step: int = 7) -> dict:
    """One all-padding step (mask 0) of trainer `t` (SGD, learning rate `lr`): its weight change against
    the regenerated noise, −lr·N(0, σ²C²)/B with σ = C = 1."""
    import tensorflow as tf

    from dpsgd_cli.training import engine

    before = [v.numpy().copy() for v in t.model.trainable_variables]
    capacity = t.sampler.capacity
    idx, mask = np.zeros(capacity, np.int64), np.zeros(capacity, np.float32)
    t.step_fn(idx, mask, t.zeros, t.key.noise_seed(step))
    noise = engine.gaussian_noise(t.model.trainable_variables, 1.0 * 1.0, tf.constant(t.key.noise_seed(step)))
    expected = [-lr * n.numpy() / BATCH for n in noise]
    change = [v.numpy() - b for v, b in zip(t.model.trainable_variables, before)]
    return {"max_error": max(float(np.abs(c - e).max()) for c, e in zip(change, expected)),
            "max_change": max(float(np.abs(c).max()) for c in change),
            "ratio": float(sum(np.vdot(c, e) for c, e in zip(change, expected))
                           / sum(np.vdot(e, e) for e in expected))}


def plan(_: str) -> dict:
    sampler = Sampler(sampling="poisson", batch_size=BATCH, dataset_size=TRAIN,
                      key=new_run_key(reproducible=True, seed=3), max_capacity=CAPACITY)
    digest = hashlib.sha256()
    for epoch in (1, 2):
        for batch in sampler.epoch(epoch):
            for idx, mask in batch.chunks:
                digest.update(distribute.deal(idx, 4).tobytes() + distribute.deal(mask, 4).tobytes())
    return {"digest": digest.hexdigest()}


if __name__ == "__main__":
    modes, data = sys.argv[1].split("+"), sys.argv[2]  # e.g. equivalence+padding: one TensorFlow start
    run = {"equivalence": equivalence, "plan": plan}
    print("RESULT " + json.dumps({mode: run[mode](data) for mode in modes}))
