"""How fast `dpsgd epsilon` and `dpsgd noise` answer, against a wall-time target per case (`CASES`: 1 s for
ε after 100 epochs by RDP, 5 s for the per-epoch PLD curve, 2 s for σ at a target ε), and the per-epoch
PLD curve.

Each case runs as a whole command in a fresh subprocess (`python -m dpsgd_cli ...`), so interpreter
start-up and every import are included. Wall time is what the targets are about; the subprocess's CPU time
(user + sys) is printed next to it because on a shared machine the wall time also measures everybody
else's load (the load average is printed too).

    python benchmarks/bench_accounting.py [--repeats 3] [--compare-library]

--compare-library also times the straightforward way to get the per-epoch PLD curve with dp-accounting
(compose one epoch's PLD onto the running total, then `get_epsilon_for_delta`, every epoch) and prints
the largest difference from the curve `dpsgd epsilon --per-epoch` prints.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

N, B, SIGMA, DELTA = 60000, 256, 1.1, 1e-5
SETTING = ["--batch-size", str(B), "--dataset-size", str(N)]
CASES = [
    ("dpsgd epsilon, 100 epochs, RDP", 1.0,
     ["epsilon", *SETTING, "--sigma", str(SIGMA), "--epochs", "100", "--accountant", "rdp"]),
    ("dpsgd epsilon --per-epoch, 100 epochs, PLD", 5.0,
     ["epsilon", *SETTING, "--sigma", str(SIGMA), "--epochs", "100", "--accountant", "pld", "--per-epoch",
      "--json"]),
    ("dpsgd noise --target-epsilon 3, 100 epochs, RDP", 2.0,
     ["noise", *SETTING, "--target-epsilon", "3", "--epochs", "100", "--accountant", "rdp"]),
]


def run_command(args: list[str]) -> tuple[float, float, str]:
    """(wall s, child CPU s, stdout) of one `python -m dpsgd_cli args` in a fresh process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "dpsgd_cli", *args], capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        sys.exit(f"failed: dpsgd {' '.join(args)}\n{proc.stderr}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, proc.stdout


def load() -> str:
    one, five, _ = os.getloadavg()
    return f"load average {one:.1f} (1 min), {five:.1f} (5 min) on {os.cpu_count()} CPUs"


def startup() -> None:
    code = ("import sys, time; t = time.perf_counter(); import dpsgd_cli.cli; "
            "print(time.perf_counter() - t, *(m in sys.modules for m in ('tensorflow', 'dp_accounting', "
            "'pandas')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    seconds, tf, dpa, pd = out.split()
    print(f"start-up: `import dpsgd_cli.cli` takes {float(seconds):.2f} s; imports tensorflow: {tf}, "
          f"dp_accounting: {dpa}, pandas: {pd}")
    wall, cpu, _ = run_command(["--help"])
    print(f"          `dpsgd --help` (interpreter + CLI start-up, no work): {wall:.2f} s wall, "
          f"{cpu:.2f} s CPU")


def library_curve(steps: list[int]) -> tuple[list[float], float]:
    """dp-accounting's PLD, composed epoch by epoch (the block of each epoch length built once)."""
    from dp_accounting.pld import privacy_loss_distribution

    start = time.perf_counter()
    one = privacy_loss_distribution.from_gaussian_mechanism(SIGMA, sampling_prob=B / N,
                                                            value_discretization_interval=1e-4)
    blocks, total, curve, done = {}, None, [], 0
    for k in steps:
        block = blocks.setdefault(k - done, one.self_compose(k - done))
        total = block if total is None else total.compose(block)
        curve.append(total.get_epsilon_for_delta(DELTA))
        done = k
    return curve, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="runs per case (median reported)")
    parser.add_argument("--compare-library", action="store_true",
                        help="also time dp-accounting's epoch-by-epoch composition (slow)")
    args = parser.parse_args()
    print(load())
    startup()
    print()
    curve_json = None
    for name, target, cmd in CASES:
        runs = [run_command(cmd) for _ in range(args.repeats)]
        walls, cpus = [r[0] for r in runs], [r[1] for r in runs]
        wall = statistics.median(walls)
        verdict = "ok" if wall < target else "OVER"
        print(f"{name}: {wall:.2f} s wall (median of {len(runs)}; min {min(walls):.2f}), "
              f"{statistics.median(cpus):.2f} s CPU; target < {target:g} s wall: {verdict}")
        if "--per-epoch" in cmd:
            curve_json = json.loads(runs[-1][2])
    print(load())

    print("\nper-epoch ε (PLD), n 60000, B 256, σ 1.1, δ 1e-5, Poisson: ⌈E·n/B⌉ steps")
    rows = curve_json["per_epoch"]
    shown = [r for r in rows if r["epoch"] in (1, 2, 5) or r["epoch"] % 10 == 0]
    print("  " + "  ".join(f"E{r['epoch']:g}:{r['epsilon_pld']:.4f}" for r in shown))

    from dpsgd_cli.privacy import accounting

    steps = [r["steps"] for r in rows]
    import dp_accounting.pld  # noqa: F401  (its import time is in the command's timing, not this one)

    start, cpu = time.perf_counter(), time.process_time()
    accounting.epsilon_curve(SIGMA, B / N, steps, DELTA, "pld")
    print(f"  the curve alone, in process (step PLD built, 100 compositions, 100 ε): "
          f"{time.perf_counter() - start:.2f} s wall, {time.process_time() - cpu:.2f} s CPU")

    tutorial = json.loads(run_command(["epsilon", *SETTING, "--sigma", str(SIGMA), "--epochs", "60",
                                       "--accountant", "all", "--json"])[2])
    print(f"\nTF Privacy tutorial setting (n 60000, B 256, σ 1.1, 60 epochs = {tutorial['steps']} steps, "
          f"δ 1e-5): ε = {tutorial['epsilon_rdp']:.4f} (RDP), {tutorial['epsilon_pld']:.4f} (PLD)")

    if args.compare_library:
        reference, seconds = library_curve(steps)
        ours = [r["epsilon_pld"] for r in rows]
        worst = max(abs(a - b) / b for a, b in zip(ours, reference))
        print(f"\ndp-accounting composing epoch by epoch: {seconds:.1f} s for the same curve (in process, "
              f"imports excluded); largest relative difference from ours: {worst:.1e}")


if __name__ == "__main__":
    main()
