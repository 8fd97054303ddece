"""Is semi-supervision measurably useful on the synthetic default? Prints JSON.

Runs ``sslray train CONFIG --set method.name=M --set seed=S`` for every method x seed at equal iterations
(two processes at a time, one torch thread each: on 2 cores this beats one process with 2 threads), then
reports the final validation mIoU per run, mean +- std per method, and each method's gain over supervised.

    python benchmarks/ssl_gap.py                                   # configs/synthetic_gap.yaml, 3 x 3 runs
    python benchmarks/ssl_gap.py --methods supervised fixmatch --seeds 0 1 --jobs 2
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_one(config: str, method: str, seed: int, out_root: Path, extra: list[str]) -> dict:
    out = out_root / f"{method}-seed{seed}"
    cmd = [sys.executable, "-m", "sslray", "train", config, "--set", f"method.name={method}", "--set", f"seed={seed}",
           "--set", "run.threads=1", "--out", str(out), "--quiet"]
    for e in extra:
        cmd += ["--set", e]
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if proc.returncode != 0:
        return {"method": method, "seed": seed, "status": "failed", "error": proc.stderr.strip().splitlines()[-1:]}
    s = json.loads((out / "summary.json").read_text())
    m = s["metrics"]
    return {"method": method, "seed": seed, "status": "ok", "miou": m["val/miou"], "best_miou": m["best/val/miou"],
            "iou": {k.split("/", 2)[2]: v for k, v in m.items() if k.startswith("val/iou/")},
            "mask_ratio": m.get("train/mask_ratio"), "pseudo_acc": m.get("train/pseudo_acc"),
            "step_s": m["time/step_s"], "wall_s": time.time() - t0}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/synthetic_gap.yaml")
    p.add_argument("--methods", nargs="+", default=["supervised", "fixmatch", "unimatch"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--out", default="runs/ssl_gap")
    p.add_argument("--set", dest="extra", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args(argv)
    out_root = Path(args.out).resolve()
    t0 = time.time()
    jobs = [(m, s) for s in args.seeds for m in args.methods]
    with ThreadPoolExecutor(args.jobs) as pool:
        runs = list(pool.map(lambda ms: run_one(args.config, ms[0], ms[1], out_root, args.extra), jobs))
    summary = {}
    for m in args.methods:
        vals = [r["miou"] for r in runs if r["method"] == m and r["status"] == "ok"]
        summary[m] = {"n": len(vals), "mean": statistics.mean(vals) if vals else None,
                      "std": statistics.stdev(vals) if len(vals) > 1 else 0.0}
    base = summary.get("supervised", {}).get("mean")
    gains = {m: summary[m]["mean"] - base for m in args.methods
             if m != "supervised" and base is not None and summary[m]["mean"] is not None}
    result = {"benchmark": "ssl_gap", "config": args.config, "overrides": args.extra, "seeds": args.seeds,
              "summary": summary, "gain_over_supervised": gains, "wall_s": time.time() - t0, "runs": runs}
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
