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

from sslray import cli
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


def kill_session(sid: int) -> None:
    """SIGKILL every process of the session ``sid`` (the driver started with start_new_session, and the Ray processes
    it started): only what this test started, unlike ``ray stop``, which stops every Ray process on the host."""
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as f:
                session = int(f.read().rsplit(")", 1)[1].split()[3])
            if session == sid:
                os.kill(int(entry), signal.SIGKILL)
        except (OSError, IndexError, ValueError):
            continue


@pytest.mark.reliability
def test_killed_driver_then_resume_runs_only_what_is_missing(tmp_path, capsys):
    study = {"name": "resume", "base": {**TINY_BASE, "train": {"iterations": 60, "eval_every": 5}},
             "grid": {"optim.lr": [0.01, 0.02, 0.03]}, "report": {"rows": "optim.lr"}, "seeds": [0],
             "storage": str(tmp_path / "store")}
    path = write_study(tmp_path, study)
    storage = tmp_path / "store"
    planned = [t.trial_id for t in load_study(path).trials()]
    with open(tmp_path / "run.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "sslray", "run", path, "--num-cpus", "1"], cwd=ROOT, env=ENV,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 600
    done: list[str] = []
    started: list[str] = []
    while time.time() < deadline and not (done and started):  # kill with one trial stored and the next mid-way
        done = [p.stem for p in storage.glob("results/*.parquet") if not p.name.startswith(".")]  # not temp files
        started = [p.parents[1].name for p in storage.glob("trials/*/checkpoint/state.pt")
                   if p.parents[1].name not in done]
        time.sleep(0.05)
    kill_session(proc.pid)
    proc.wait(timeout=60)
    assert done and started, (tmp_path / "run.log").read_text()[-3000:]
    stored_before = ResultsStore(str(storage)).ids()
    assert started[0] not in stored_before and set(done) <= stored_before
    mtimes = {p.name: p.stat().st_mtime_ns for p in storage.glob("results/*.parquet") if not p.name.startswith(".")}

    assert cli.main(["status", path]) == 0
    before = capsys.readouterr().out
    n_done = len(stored_before)
    assert f"{n_done} done, 0 failed, 1 started, {len(planned) - n_done - 1} missing" in before, before
    assert f"started  {started[0][:12]}" in before  # the interrupted trial shows its checkpoint
    out = sslray("run", path, "--resume", "--num-cpus", "1").stdout
    assert f"{len(planned) - n_done} trials ({n_done} already stored)" in out  # only what is missing runs
    assert cli.main(["status", path]) == 0
    after = capsys.readouterr().out
    assert f"{len(planned)} done, 0 failed, 0 started, 0 missing" in after, after
    df = ResultsStore(str(storage)).load()
    assert sorted(df["trial_id"]) == sorted(planned) and set(df["status"]) == {"ok"}  # none lost, none twice
    assert {p.name: p.stat().st_mtime_ns for p in storage.glob("results/*.parquet") if p.name in mtimes} == mtimes
    rows = df.set_index("trial_id")
    assert rows.loc[started[0], "resumed_from"] > 0  # continued from its checkpoint, not from scratch
    assert (rows["iteration"] == 60).all()
    hist = ResultsStore(str(storage)).load_history()
    assert not hist.duplicated(["trial_id", "iteration"]).any()


@pytest.mark.reliability
def test_ctrl_c_says_what_is_unfinished_exits_130_and_the_same_command_continues(tmp_path):
    """Ctrl-C (SIGINT to the driver's process group, as a terminal sends it): Tune stops gracefully and returns
    from fit as if done, so the run must say itself that trials are unfinished, exit 130, keep every stored row,
    and the same command must run only what is missing (not Tune's ``Tuner.restore`` advice)."""
    study = {"name": "ctrlc", "base": {**TINY_BASE, "train": {"iterations": 60, "eval_every": 5}},
             "grid": {"optim.lr": [0.01, 0.02, 0.03]}, "report": {"rows": "optim.lr"}, "seeds": [0],
             "storage": str(tmp_path / "store")}
    path = write_study(tmp_path, study)
    storage = tmp_path / "store"
    with open(tmp_path / "out.log", "w") as out, open(tmp_path / "err.log", "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "sslray", "run", path, "--num-cpus", "1"], cwd=ROOT, env=ENV,
                                stdout=out, stderr=err, start_new_session=True)
    deadline, done = time.time() + 600, []
    try:
        while time.time() < deadline and not done and proc.poll() is None:  # interrupt with one trial stored
            done = [p.stem for p in storage.glob("results/*.parquet") if not p.name.startswith(".")]
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGINT)
        rc = proc.wait(timeout=120)
    finally:
        kill_session(proc.pid)  # Ray's processes of this session, whatever the driver left
    stdout, stderr = (tmp_path / "out.log").read_text(), (tmp_path / "err.log").read_text()
    assert done, stdout[-3000:] + stderr[-3000:]
    stored = ResultsStore(str(storage)).ids("ok")
    assert rc == 130, (rc, stdout[-3000:], stderr[-3000:])
    unfinished = 3 - len(stored)
    assert unfinished >= 1 and set(done) <= stored
    assert f"{len(stored)} trials run ({len(stored)} ok, 0 failed), {unfinished} not finished" in stdout, stdout
    assert f"sslray: interrupted: {unfinished} of 3 trials not finished; the same 'sslray run' command" in stderr
    again = sslray("run", path, "--num-cpus", "1").stdout
    assert f"{unfinished} trials ({len(stored)} already stored)" in again, again
    assert "not finished" not in again
    df = ResultsStore(str(storage)).load()
    assert len(df) == 3 and df["trial_id"].is_unique and set(df["status"]) == {"ok"}


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


def test_search_trials_run_after_the_study_file_is_gone(tmp_path):
    """The driver reads the study once; its trials carry the base dict (with --set), so no node needs the file."""
    import ray

    from sslray import ray_adapter

    path = write_study(tmp_path, {"name": "gone", "base": {**TINY_BASE, "method": {"name": "supervised"}},
                                  "search": {"sampler": "random", "num_samples": 1, "seed": 0,
                                             "space": {"optim.lr": {"loguniform": [1.0e-3, 1.0e-1]}}},
                                  "storage": str(tmp_path / "store")})
    study = load_study(path, ["train.iterations=2"])
    os.remove(path)
    try:
        summary = ray_adapter.run_study(study, num_cpus=1, verbose=False)
    finally:
        ray.shutdown()
    df = ResultsStore(str(tmp_path / "store")).load()
    assert summary.ok == 1 and list(df["status"]) == ["ok"] and list(df["iteration"]) == [2]


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
