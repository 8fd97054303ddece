"""How long planning a study takes, and how fast an oversized plan is refused.

Prints JSON: the seconds ``load_study`` takes to validate and plan a grid of N trials (every cell is built and
checked once, then ``study.trials()`` returns the cached plan), with and without a paired axis carrying
``train.epochs``; the seconds to refuse a plan of 2 x 10^9 trials over ``max_trials`` and the peak Python memory
while doing so. Targets (issue 15): 10,000 trials < 2 s, refusal < 1 s with bounded memory.

    python benchmarks/plan.py                 # 10,000 trials
    python benchmarks/plan.py --n 2500 --repeat 5
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sslray.study import load_study  # noqa: E402


def grid_study(n_side: int, paired: bool) -> str:
    axis = "[" + ", ".join(str(round(0.001 * (i + 1), 6)) for i in range(n_side)) + "]"
    if paired:  # the second axis paired with a schedule in epochs (synthetic: 2016 - 32 unlabeled / 8 per step)
        entries = "".join(f"    - {{optim.momentum: {round(0.5 + 0.001 * i, 6)}, train.epochs: {1 + i % 3}}}\n"
                          for i in range(n_side))
        second = f"  optim.momentum:\n{entries}"
    else:
        second = f"  optim.momentum: {axis}\n"
    return (f"name: bench\nmax_trials: {n_side * n_side}\nbase: {{data: {{partition: '32'}}, method: {{name: fixmatch}}, "
            f"train: {{iterations: 10, eval_every: 5}}}}\ngrid:\n  optim.lr: {axis}\n{second}"
            "report: {rows: optim.lr, cols: optim.momentum}\n")


def time_plan(text: str, tmp: Path, repeat: int) -> tuple[float, float, int]:
    """(best wall seconds, best CPU seconds of this process, trials): on a shared machine the CPU time is the
    number that does not depend on the other processes."""
    path = tmp / "s.yaml"
    path.write_text(text)
    best, best_cpu, n = float("inf"), float("inf"), 0
    for _ in range(repeat):
        t0, c0 = time.perf_counter(), time.process_time()
        study = load_study(str(path))
        n = len(study.trials())
        best, best_cpu = min(best, time.perf_counter() - t0), min(best_cpu, time.process_time() - c0)
    return best, best_cpu, n


def time_refusal(tmp: Path) -> tuple[float, float]:
    axis = "[" + ", ".join(str(i + 1) for i in range(1000)) + "]"
    path = tmp / "huge.yaml"
    path.write_text(f"name: huge\ngrid:\n  train.iterations: {axis}\n  train.eval_every: {axis}\n"
                    f"  run.log_every: {axis}\nseeds: [0, 1]\n")
    t0 = time.perf_counter()
    try:
        load_study(str(path))
    except ValueError as e:
        assert "max_trials" in str(e), e
    elapsed = time.perf_counter() - t0
    tracemalloc.start()
    try:
        load_study(str(path))
    except ValueError:
        pass
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return elapsed, peak / 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=10000, help="trials (a square grid: rounded to a square)")
    ap.add_argument("--repeat", type=int, default=3, help="runs per measurement (the best is reported)")
    args = ap.parse_args()
    side = max(1, round(args.n ** 0.5))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        load_study  # warm imports (torch via the method registry) outside the timings
        time_plan(grid_study(2, False), tmp, 1)
        plain_s, plain_cpu, n = time_plan(grid_study(side, False), tmp, args.repeat)
        paired_s, paired_cpu, n_paired = time_plan(grid_study(side, True), tmp, args.repeat)
        refuse_s, refuse_mb = time_refusal(tmp)
    print(json.dumps({
        "benchmark": "plan", "trials": n, "plan_s": round(plain_s, 3), "plan_cpu_s": round(plain_cpu, 3),
        "per_trial_cpu_us": round(1e6 * plain_cpu / n, 1),
        "paired_epochs_trials": n_paired, "paired_epochs_plan_s": round(paired_s, 3),
        "paired_epochs_plan_cpu_s": round(paired_cpu, 3),
        "refuse_trials": 2 * 1000 ** 3, "refuse_s": round(refuse_s, 4), "refuse_peak_mb": round(refuse_mb, 2),
        "targets": {"plan_10000_s": 2.0, "refuse_s": 1.0},
        "python": platform.python_version(), "cpus": os.cpu_count(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }, indent=2))


if __name__ == "__main__":
    main()
