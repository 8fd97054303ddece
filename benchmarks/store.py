"""How long the results store takes to load, against the number of stored trials, on local disk and on S3.

For each trial count (1k, 10k) and backend (a local directory; a moto S3 server in this process, reached over
HTTP like any endpoint) the benchmark writes one synthetic row and a two-evaluation history per trial through
the store's own API (``ResultsStore.write``), then times:

- ``load_per_object``: ``ResultsStore(snapshots=False).load()``: one read per trial object (the old read path);
- ``load_first`` / ``load``: the first load (reads the objects once and writes the snapshot) and the next one
  (the snapshot plus the newer objects: what every command sees);
- ``status`` / ``table`` / ``dry_run`` (``--resume`` planning) / ``plot``: the commands as separate processes
  (Python start and imports included), on the compacted store.

``--before PATH`` times the load of the code at PATH (a checkout of sslray before this change, e.g.
``git archive <commit> sslray | tar -x -C PATH``) on the local store, up to ``--before-max`` trials; larger
counts are extrapolated linearly from the largest measured one and marked so.

    python benchmarks/store.py                                    # 1k and 10k, local and s3
    python benchmarks/store.py --counts 1000 --backends local --before /tmp/sslray-before
    python benchmarks/store.py --counts 10000 --dir /tmp/st --cli-only --repeat 3   # the commands on a kept store

``--dir`` keeps the studies and local stores in DIR (``store<n>.yaml``, ``local<n>/``); ``--cli-only`` times only
the commands on stores already there (written by an earlier run with the same ``--dir``).
"""
from __future__ import annotations

import argparse
import json
import resource
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sslray.results import ResultsStore, make_row  # noqa: E402
from sslray.study import load_study  # noqa: E402

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
HISTORY = [{"iteration": 2, "val/miou": 40.0, "train/loss": 0.9}, {"iteration": 4, "val/miou": 41.0}]


def write_study(tmp: Path, n: int, storage: str) -> Path:
    """A grid of n trials (n/10 learning rates x 10 seeds) on the smoke study's base."""
    smoke = yaml.safe_load((ROOT / "studies" / "smoke.yaml").read_text())
    lrs = [round(0.001 + 1e-6 * i, 7) for i in range(n // 10)]
    d = {"name": f"store{n}", "base": smoke["base"], "grid": {"method.name": ["supervised"], "optim.lr": lrs},
         "seeds": list(range(10)), "storage": storage, "max_trials": max(n, 5000), "report": {"rows": "optim.lr", "cols": "method.name"}}
    path = tmp / f"store{n}.yaml"
    path.write_text(yaml.safe_dump(d))
    return path


def fill(study_path: Path, storage: str) -> float:
    """One row + history per trial, through ResultsStore.write (threads: object stores are latency-bound)."""
    study = load_study(str(study_path))
    store = ResultsStore(storage)

    def one(i_t):
        i, t = i_t
        metrics = {"iteration": 4, "val/miou": 30.0 + (i % 97) / 10, "best/val/miou": 41.0, "train/loss": 0.7}
        store.write(make_row(study.name, t.point, t.config, "ok", metrics, None, 1.0, "cpu"), HISTORY)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(8 if "://" in storage else 2) as pool:
        list(pool.map(one, enumerate(study.trials())))
    return time.perf_counter() - t0


def timed(fn) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


REPEAT = 1  # --repeat: each command's time is the median of this many runs


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def cli_time(args: list[str]) -> tuple[float, float]:
    """(wall, CPU) seconds of ``sslray ARGS``, medians over REPEAT runs; the CPU time (user + system of the
    process) is what a loaded machine distorts least."""
    times, cpus = [], []
    for _ in range(REPEAT):
        t0, c0 = time.perf_counter(), _children_cpu()
        p = subprocess.run([sys.executable, "-m", "sslray", *args], cwd=ENV["PYTHONPATH"], env=ENV, capture_output=True, text=True)
        if p.returncode != 0:
            raise RuntimeError(f"sslray {' '.join(args)} failed: {p.stderr.strip()[-500:]}")
        times.append(time.perf_counter() - t0)
        cpus.append(_children_cpu() - c0)
    return round(statistics.median(times), 3), round(statistics.median(cpus), 3)


def cli_times(study: Path, storage: str, plots: Path) -> dict:
    """The four commands as separate processes (Python start and imports included), median of REPEAT runs."""
    common = ["--storage", storage]
    commands = {"status": ["status"], "table": ["table"], "dry_run": ["run", "--dry-run"],
                "plot": ["plot", "--out", str(plots)]}
    out = {}
    for name, (cmd, *extra) in commands.items():
        out[f"{name}_s"], out[f"{name}_cpu_s"] = cli_time([cmd, str(study), *common, *extra])
    return out


def before_load(before: Path, storage: str) -> float:
    code = ("import time,sys; from sslray.results import ResultsStore; t=time.perf_counter(); "
            f"n=len(ResultsStore({storage!r}).load()); print(time.perf_counter()-t, n)")
    p = subprocess.run([sys.executable, "-c", code], env={**ENV, "PYTHONPATH": str(before)}, capture_output=True,
                       text=True, check=True, cwd=before)
    return round(float(p.stdout.split()[0]), 3)


def measure(tmp: Path, n: int, storage: str, args) -> dict:
    study = write_study(tmp, n, storage)
    out: dict = {"trials": n, "write_s": round(fill(study, storage), 2)}
    out["load_per_object_s"] = round(timed(lambda: ResultsStore(storage, snapshots=False).load())[0], 3)
    store = ResultsStore(storage)
    out["load_first_s"] = round(timed(store.load)[0], 3)
    out["load_history_first_s"] = round(timed(store.load_history)[0], 3)
    t, df = timed(ResultsStore(storage).load)
    out["load_s"], out["rows"] = round(t, 3), len(df)
    out["load_history_s"] = round(timed(ResultsStore(storage).load_history)[0], 3)
    out.update(cli_times(study, storage, tmp / f"plots{n}"))
    if args.before and "://" not in storage:
        if n <= args.before_max:
            out["before_load_s"] = before_load(args.before, storage)
        else:
            out["before_load_s_extrapolated"] = None  # filled in from the largest measured count
    return out


def s3_server():
    from moto.server import ThreadedMotoServer

    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench-secret", AWS_DEFAULT_REGION="us-east-1")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    os.environ["AWS_ENDPOINT_URL"] = f"http://{host}:{port}"
    ENV.update({k: os.environ[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION",
                                           "AWS_ENDPOINT_URL")})
    import pyarrow.fs as pafs

    pafs.S3FileSystem(endpoint_override=f"{host}:{port}", scheme="http", allow_bucket_creation=True).create_dir("bench")
    return server


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--counts", type=int, nargs="+", default=[1000, 10000])
    ap.add_argument("--backends", nargs="+", default=["local", "s3"], choices=["local", "s3"])
    ap.add_argument("--before", type=Path, help="a checkout of the old sslray package (its parent directory)")
    ap.add_argument("--before-max", type=int, default=1000)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--repeat", type=int, default=1, help="median of this many runs of each command")
    ap.add_argument("--dir", type=Path, help="keep the studies and local stores here (default: a temporary dir)")
    ap.add_argument("--cli-only", action="store_true", help="time only the commands on the stores in --dir")
    ap.add_argument("--code", type=Path, help="run the commands with the sslray checkout at CODE (a before)")
    args = ap.parse_args()
    if args.code:
        ENV["PYTHONPATH"] = str(args.code.resolve())
    global REPEAT
    REPEAT = args.repeat
    if args.cli_only:
        if args.dir is None:
            ap.error("--cli-only needs --dir")
        runs = [{"backend": "local", "trials": n, "repeat": args.repeat,
                 **cli_times(args.dir / f"store{n}.yaml", str(args.dir / f"local{n}"), args.dir / f"plots{n}")}
                for n in args.counts]
        text = json.dumps({"machine": f"{os.cpu_count()} CPUs (shared)", "runs": runs}, indent=2)
        print(text)
        if args.out:
            args.out.write_text(text + "\n")
        return
    results: dict = {"machine": f"{os.cpu_count()} CPUs (shared)", "runs": []}
    server = s3_server() if "s3" in args.backends else None
    try:
        with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
            tmp = str(args.dir) if args.dir else tmp
            for backend in args.backends:
                for n in args.counts:
                    storage = f"{tmp}/local{n}" if backend == "local" else f"s3://bench/store{n}"
                    r = {"backend": backend, **measure(Path(tmp), n, storage, args)}
                    print(json.dumps(r), file=sys.stderr)
                    results["runs"].append(r)
    finally:
        if server is not None:
            server.stop()
    measured = [r for r in results["runs"] if "before_load_s" in r]
    if measured:
        ref = max(measured, key=lambda r: r["trials"])
        for r in results["runs"]:
            if "before_load_s_extrapolated" in r:
                r["before_load_s_extrapolated"] = round(ref["before_load_s"] * r["trials"] / ref["trials"], 1)
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
