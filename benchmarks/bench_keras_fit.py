"""Step time of `DPModel.fit` (keras_api) against the CLI's `Trainer` (what `dpsgd train` runs), same model,
batch and sampling, in one process.

Both train the tutorial CNN (fast per-example path) on a slice of Fashion-MNIST with Poisson sampling at
the same expected batch size; epochs of the two alternate (trainer, fit, trainer, fit, …) so that load
from other jobs hits both alike. A step's time is the wall time between two consecutive step callbacks
(`on_step` of the trainer, `on_train_batch_end` of fit), so it includes everything between steps:
sampling, gathering the batch, the compiled step, reading its outputs back, and for fit the Keras metric
update and the callback machinery (verbose=0: no progress bar). The first epoch of each (tracing) is not
counted. Printed: median and 25–75 % range per step, and the CPU model and load average.

    python benchmarks/bench_keras_fit.py [--batch-size 256] [--train-size 2560] [--epochs 4]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import time
import warnings


def _cpu() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines()
                    if line.startswith("Model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--train-size", type=int, default=2560)
    parser.add_argument("--epochs", type=int, default=4, help="timed epochs of each, after one untimed")
    parser.add_argument("--data-dir", default=os.environ.get("DPSGD_DATA_DIR"))
    args = parser.parse_args()

    import keras

    from dpsgd_cli.config import load_config
    from dpsgd_cli.keras_api import DPModel
    from dpsgd_cli.privacy.plan import plan_privacy
    from dpsgd_cli.privacy.run_key import new_run_key
    from dpsgd_cli.training import engine
    from dpsgd_cli.training.data import load_dataset
    from dpsgd_cli.training.model import model_from_config
    from dpsgd_cli.training.trainer import Trainer

    b, n = args.batch_size, args.train_size
    cfg = load_config(None, [f"data.train_size={n}", "data.test_size=100", f"data.batch_size={b}",
                             "training.optimizer=adam", "training.learning_rate=0.001",
                             "privacy.noise_multiplier=1.1", "privacy.l2_norm_clip=1.0"]
                      + ([f"data.data_dir={args.data_dir}"] if args.data_dir else []))
    data = load_dataset("fashion_mnist", args.data_dir, n, 100)
    key = new_run_key(reproducible=False, seed=0, name="bench")
    trainer = Trainer(cfg, data, plan_privacy(cfg, n), key)
    dp_model = DPModel(model_from_config(cfg.model, cfg.seed), l2_norm_clip=1.0, noise_multiplier=1.1)
    dp_model.compile(optimizer=engine.make_optimizer("adam", 0.001),
                     loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])

    times: dict[str, list[float]] = {"trainer": [], "fit": []}
    stamps: list[float] = []

    class Stamp(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            stamps.append(time.perf_counter())

        def on_train_batch_end(self, batch, logs=None):
            stamps.append(time.perf_counter())

    def trainer_epoch(epoch: int) -> list[float]:
        stamps.clear()
        stamps.append(time.perf_counter())
        trainer.train_epoch(epoch, lambda _: stamps.append(time.perf_counter()))
        return [t1 - t0 for t0, t1 in zip(stamps, stamps[1:])]

    def fit_epoch() -> list[float]:
        stamps.clear()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dp_model.fit(data.x_train, data.y_train, epochs=1, batch_size=b, verbose=0, callbacks=[Stamp()])
        return [t1 - t0 for t0, t1 in zip(stamps, stamps[1:])]

    for epoch in range(1, args.epochs + 2):
        step_times = trainer_epoch(epoch), fit_epoch()
        if epoch > 1:
            times["trainer"] += step_times[0]
            times["fit"] += step_times[1]

    print(f"tutorial CNN, Fashion-MNIST n={n}, Poisson batch {b} (capacity {trainer.sampler.capacity}), "
          f"gradient path trainer={trainer.gradient_path} fit={dp_model.gradient_path}, "
          f"jit_compile={trainer.jit_compile}, {args.epochs} timed epochs each, interleaved")
    for name, values in times.items():
        q1, med, q3 = statistics.quantiles(values, n=4)
        print(f"  {name:8s} {med * 1e3:7.1f} ms/step (25–75 %: {q1 * 1e3:.1f}–{q3 * 1e3:.1f}; "
              f"{len(values)} steps)")
    ratio = statistics.median(times["fit"]) / statistics.median(times["trainer"])
    print(f"  fit / trainer = {ratio:.3f}")
    print(f"CPU: {_cpu()}, {os.cpu_count()} logical CPUs; load average {os.getloadavg()}")


if __name__ == "__main__":
    main()
