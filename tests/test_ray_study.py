"""Studies on a real local Ray instance: smoke end to end, re-runs, resume after a killed driver, Optuna search."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from sslray.config import TrialConfig
from sslray.results import ResultsStore
from sslray.study import load_study

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.ray]

TINY_BASE = {
    "data": {"crop_size": 32, "batch_size_x": 4, "batch_size_u": 4, "partition": "4",
             "synthetic": {"size": 32, "num_train": 24, "num_val": 6}},
    "model": {"name": "small", "width": 8},
    "train": {"iterations": 4, "eval_every": 2},
    "run": {"threads": 1},
}
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_AUTH_MODE": "disabled"}


def sslray(*args, timeout=600, check=True):
    proc = subprocess.run([sys.executable, "-m", "sslray", *args], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=timeout)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def write_study(tmp_path, d, name="study.yaml") -> str:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(d, sort_keys=False))
    return str(p)


def run_in_process(tmp_path, study: dict):
    """run_study in this process on a fresh local Ray instance, shut down afterwards."""
    import ray

    from sslray import ray_adapter

    try:
        return ray_adapter.run_study(load_study(write_study(tmp_path, study)), num_cpus=2, verbose=False)
    finally:
        ray.shutdown()


def test_smoke_end_to_end_then_rerun_skips(tmp_path):
    storage = tmp_path / "store"
    out = sslray("run", "studies/smoke.yaml", "--storage", str(storage), "--num-cpus", "2").stdout
    assert "| supervised |" in out and "| fixmatch |" in out, out
    assert "2 trials run (2 ok, 0 failed)" in out
    df = pd.read_parquet(storage / "results")  # plain pandas reads the store
    assert len(df) == 2 and set(df["status"]) == {"ok"}
    assert set(df["cfg.method.name"]) == {"supervised", "fixmatch"}
    for col in ("trial_id", "val/miou", "best/val/miou", "val/iou/background", "wall_s", "device", "git_sha",
                "split_sha256", "versions", "seed", "val/confusion"):
        assert col in df.columns, col
    planned = {p.trial_id for p in load_study(str(ROOT / "studies/smoke.yaml")).trials()}
    assert set(df["trial_id"]) == planned
    for _, row in df.iterrows():  # the stored rerun command names a config that is the same trial
        cmd = row["rerun"].split()
        assert cmd[:2] == ["sslray", "train"]
        assert TrialConfig.from_yaml(cmd[2]).trial_id() == row["trial_id"]
    mtimes = {p.name: p.stat().st_mtime_ns for p in (storage / "results").iterdir()}

    again = sslray("run", "studies/smoke.yaml", "--storage", str(storage)).stdout
    assert "already in" in again
    assert {p.name: p.stat().st_mtime_ns for p in (storage / "results").iterdir()} == mtimes  # nothing re-run

    status = sslray("status", "studies/smoke.yaml", "--storage", str(storage)).stdout
    assert "2 done, 0 failed, 0 started, 0 missing" in status
    latex = sslray("table", "studies/smoke.yaml", "--storage", str(storage), "--format", "latex").stdout
    assert "\\toprule" in latex and "supervised" in latex


def test_dry_run_prints_plan_without_ray(tmp_path):
    out = sslray("run", "studies/quickstart.yaml", "--storage", str(tmp_path), "--dry-run").stdout
    assert "6 to run, 0 already stored" in out
    assert out.count("method.name=") == 6
    assert not (tmp_path / "ray_tune").exists()


def test_killed_driver_then_resume_runs_only_what_is_missing(tmp_path):
    study = {"name": "resume", "base": {**TINY_BASE, "train": {"iterations": 60, "eval_every": 5}},
             "grid": {"method.name": ["supervised", "fixmatch"]}, "seeds": [0],
             "storage": str(tmp_path / "store")}
    path = write_study(tmp_path, study)
    storage = tmp_path / "store"
    proc = subprocess.Popen([sys.executable, "-m", "sslray", "run", path, "--num-cpus", "1"], cwd=ROOT, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 300
    ckpts: list[Path] = []
    while time.time() < deadline and not ckpts:  # kill once the first trial has checkpointed mid-way
        ckpts = [p for p in storage.glob("trials/*/checkpoint/state.pt")]
        time.sleep(0.2)
    assert ckpts, "no checkpoint appeared"
    first = ckpts[0].parents[1].name
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    subprocess.run(["ray", "stop", "--force"], env=ENV, capture_output=True, timeout=120)
    stored_before = ResultsStore(str(storage)).ids()
    assert first not in stored_before

    out = sslray("status", path).stdout
    assert "started" in out  # the interrupted trial shows its checkpoint
    sslray("run", path, "--resume", "--num-cpus", "1")
    df = ResultsStore(str(storage)).load()
    assert len(df) == 2 and df["trial_id"].is_unique and set(df["status"]) == {"ok"}
    row = df.set_index("trial_id").loc[first]
    assert row["resumed_from"] > 0  # continued from its checkpoint, not from scratch
    assert row["iteration"] == 60


def test_optuna_search_samples_the_declared_space(tmp_path):
    study = {"name": "search", "base": {**TINY_BASE, "method": {"name": "fixmatch"}},
             "search": {"sampler": "random", "num_samples": 3, "metric": "val/miou", "mode": "max", "seed": 1,
                        "space": {"optim.lr": {"loguniform": [1.0e-3, 1.0e-1]},
                                  "method.conf_thresh": {"choice": [0.5, 0.9]}}},
             "storage": str(tmp_path / "store")}
    summary = run_in_process(tmp_path, study)
    assert summary.ran == 3 and summary.ok == 3
    df = ResultsStore(str(tmp_path / "store")).load()
    assert len(df) == 3 and df["trial_id"].is_unique
    assert df["cfg.optim.lr"].between(1e-3, 1e-1).all() and df["cfg.optim.lr"].nunique() == 3
    assert set(df["cfg.method.conf_thresh"]) <= {0.5, 0.9}
    cells = [json.loads(c) for c in df["cell"]]
    assert all("optim.lr" in c for c in cells)


def test_asha_search_stops_trials_and_keeps_rows(tmp_path):
    study = {"name": "asha", "base": {**TINY_BASE, "method": {"name": "supervised"},
                                      "train": {"iterations": 8, "eval_every": 1}},
             "search": {"sampler": "random", "num_samples": 4, "metric": "val/miou", "mode": "max", "seed": 0,
                        "space": {"optim.lr": {"loguniform": [1.0e-4, 1.0e-1]}},
                        "scheduler": {"type": "asha", "grace_period": 1, "reduction_factor": 2}},
             "storage": str(tmp_path / "store")}
    summary = run_in_process(tmp_path, study)
    df = ResultsStore(str(tmp_path / "store")).load()
    # Every sampled trial has a row: finished ones ran all 8 iterations, ASHA-stopped ones say so.
    assert summary.ran >= 1 and len(df) == 4 and df["trial_id"].is_unique
    assert set(df["status"]) <= {"ok", "stopped"} and "stopped" in set(df["status"])
    assert (df.loc[df["status"] == "ok", "iteration"] == 8).all()
    stopped = df[df["status"] == "stopped"]
    assert (stopped["iteration"] < 8).any()  # ASHA cut at least one trial at an early rung
    assert stopped["reason"].str.contains("stopped by the scheduler").all()
