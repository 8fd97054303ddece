"""Reliability on the Ray Train path: a DDP trial (2 workers, gloo) one of whose Train workers is SIGKILLed
mid-trial is retried from its last checkpoint with the whole worker group restarted, and ends as one ok row.

One ``sslray run`` CLI process (local Ray, 2 CPUs); the test kills the rank-1 worker process (``ray::RayTrainWorker``,
found among the CLI's own descendants) right after the trial's first checkpoint, then watches a fresh pair of
workers appear and the survivor of the old group go.
"""
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from test_reliability_faults import cmdline, descendants, kill_tree

from sslray.results import ResultsStore

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.reliability, pytest.mark.ray, pytest.mark.slow]
ITERATIONS, EVAL_EVERY = 30, 10


def _train_workers(root: int) -> list[int]:
    return sorted(p for p in descendants(root) if cmdline(p).startswith("ray::RayTrainWorker"))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return cmdline(pid) != ""


def test_killed_ddp_worker_restarts_the_group_from_the_checkpoint(tmp_path):
    storage = tmp_path / "store"
    study = {"name": "ddpfault",
             "base": {"data": {"crop_size": 32, "batch_size_x": 4, "batch_size_u": 4, "partition": "4",
                               "synthetic": {"size": 32, "num_train": 24, "num_val": 6}},
                      "model": {"name": "small", "width": 8}, "method": {"name": "fixmatch"},
                      "train": {"iterations": ITERATIONS, "eval_every": EVAL_EVERY}, "run": {"threads": 1}},
             "seeds": [0], "resources": {"workers": 2, "cpus_per_worker": 1}, "storage": str(storage)}
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    ray_tmp = tempfile.mkdtemp(prefix="rd", dir="/tmp")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_AUTH_MODE": "disabled", "RAY_TMPDIR": ray_tmp,
           "PYTHONPATH": str(ROOT)}
    out = tmp_path / "out.txt"
    with open(out, "w") as fo:
        proc = subprocess.Popen([sys.executable, "-m", "sslray", "run", str(path), "--num-cpus", "2"], cwd=tmp_path,
                                env=env, stdout=fo, stderr=subprocess.STDOUT, start_new_session=True)
    killed, old_group, later, deadline = None, [], set(), time.time() + 600
    try:
        while proc.poll() is None and time.time() < deadline:
            workers = _train_workers(proc.pid)
            if killed is None and list(storage.glob("trials/*/checkpoint/state.pt")) and len(workers) == 2:
                old_group = workers
                killed = workers[1]
                os.kill(killed, signal.SIGKILL)
            elif killed is not None:
                later.update(w for w in workers if w not in old_group)
            time.sleep(0.05)
    finally:
        if proc.poll() is None:  # past the deadline: stop what this test started, nothing else
            kill_tree(proc.pid)
        proc.wait(timeout=60)
    text = out.read_text()
    assert killed is not None, text[-3000:]
    assert proc.returncode == 0, text[-3000:]
    assert len(later) >= 2, (old_group, later)  # a whole new worker group, not only a replacement of rank 1
    assert not any(_alive(p) for p in old_group)  # the survivor of the old group was restarted too
    df = ResultsStore(storage).load()
    assert len(df) == 1
    row = df.iloc[0]
    assert row["status"] == "ok" and row["world_size"] == 2 and row["iteration"] == ITERATIONS
    assert 0 < row["resumed_from"] < ITERATIONS and row["resumed_from"] % EVAL_EVERY == 0  # from a checkpoint
    hist = ResultsStore(storage).load_history()
    assert list(hist["iteration"]) == list(range(EVAL_EVERY, ITERATIONS + 1, EVAL_EVERY))  # no evaluation twice
