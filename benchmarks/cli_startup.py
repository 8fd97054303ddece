"""How long the light commands take to start and finish: ``sslray --version``, ``--help``, ``list methods``,
``validate``, ``status`` and ``table`` of studies/quickstart.yaml (nothing stored), each as a fresh process.

Prints JSON: per command the median and minimum wall time over ``--repeat`` runs, and which of torch, torchvision
and Ray the command imported (``-X importtime``). Target: ``status`` under 1.5 s. ``--src DIR`` times another
checkout (e.g. the main branch before the change) with the same commands, for a before/after pair.

    python benchmarks/cli_startup.py --repeat 5 > benchmarks/results/cli_startup.json
    python benchmarks/cli_startup.py --src /path/to/old/checkout
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "torchvision", "ray")


def commands(storage: str) -> dict[str, list[str]]:
    study = ["studies/quickstart.yaml", "--storage", storage]
    return {"--version": ["--version"], "--help": ["--help"], "list methods": ["list", "methods"],
            "validate": ["validate", "studies/quickstart.yaml"], "status": ["status", *study],
            "table": ["table", *study]}


def run_once(src: Path, args: list[str]) -> tuple[float, list[str]]:
    env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "sslray", *args], cwd=src, env=env,
                          capture_output=True, text=True)
    wall = time.perf_counter() - t0
    imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time")}
    return wall, [m for m in HEAVY if m in imported]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--src", default=str(ROOT), help="checkout to time (default: this one)")
    args = ap.parse_args()
    src = Path(args.src).resolve()
    out: dict = {"src": str(src), "python": sys.version.split()[0], "cpus": os.cpu_count(), "repeat": args.repeat,
                 "commands": {}}
    with tempfile.TemporaryDirectory() as tmp:  # an empty storage under tmp (the status/table exit code is ignored)
        storage = os.path.join(tmp, "quickstart")
        for name, argv in commands(storage).items():
            runs = [run_once(src, argv) for _ in range(args.repeat)]
            walls = [w for w, _ in runs]
            out["commands"][name] = {"median_s": round(statistics.median(walls), 3), "min_s": round(min(walls), 3),
                                     "imports": runs[0][1]}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
