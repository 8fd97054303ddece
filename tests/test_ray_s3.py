"""A study whose only storage is S3 (a moto server in this process, over HTTP): run, kill the driver, --resume,
status, table, plot; nothing of the study is written to a local store directory (the trial trains in a node-local
scratch directory and uploads its checkpoint, splits and W&B run; Ray Tune's experiment state goes to S3 too).
The same sequence on a local path is tests/test_ray_study.py::test_killed_driver_then_resume_runs_only_what_is_missing.
"""
import os
import subprocess
import sys
import time

import pyarrow.fs as pafs
import pytest

from sslray import cli
from sslray.results import ResultsStore
from sslray.study import load_study
from test_ray_study import ENV, ROOT, TINY_BASE, kill_session, sslray, write_study
from test_store_objects import BUCKET, SECRET, s3  # noqa: F401 - the fixture

pytestmark = [pytest.mark.slow, pytest.mark.ray]


def keys(fs, prefix: str) -> list[str]:
    infos = fs.get_file_info(pafs.FileSelector(prefix, allow_not_found=True, recursive=True))
    return [i.path[len(prefix) + 1:] for i in infos if i.type == pafs.FileType.File]


@pytest.mark.reliability
def test_study_on_s3_run_kill_resume_status_table_plot(tmp_path, s3, capsys, monkeypatch):  # noqa: F811
    root = f"s3://{BUCKET}/ray-study"
    study = {"name": "s3study", "base": {**TINY_BASE, "train": {"iterations": 20, "eval_every": 4}},
             "grid": {"optim.lr": [0.01, 0.02, 0.03]}, "report": {"rows": "optim.lr"}, "seeds": [0],
             "storage": root, "tracking": {"wandb": "offline"}}
    path = write_study(tmp_path, study)
    planned = [t.trial_id for t in load_study(path).trials()]
    scratch = tmp_path / "scratch"
    env = {**ENV, **{k: os.environ[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION",
                                                  "AWS_ENDPOINT_URL")}, "SSLRAY_SCRATCH": str(scratch)}
    monkeypatch.setenv("SSLRAY_SCRATCH", str(tmp_path / "scratch-status"))  # status/plot here: another "node"
    fs = pafs.S3FileSystem(endpoint_override=s3.endpoint.split("://")[1], scheme="http")
    prefix = f"{BUCKET}/ray-study"
    with open(tmp_path / "run.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "sslray", "run", path, "--num-cpus", "1"], cwd=ROOT, env=env,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline, done, started = time.time() + 600, [], []
    while time.time() < deadline and not (done and started):  # kill with one row stored and the next mid-way
        names = keys(fs, prefix)
        done = [n[8:-8] for n in names if n.startswith("results/")]
        started = [n.split("/")[1] for n in names if n.endswith("checkpoint/state.pt") and n.split("/")[1] not in done]
        time.sleep(0.2)
    kill_session(proc.pid)
    proc.wait(timeout=60)
    assert done and started, (tmp_path / "run.log").read_text()[-3000:]
    n_done = len(ResultsStore(root).ids())

    assert cli.main(["status", path]) == 0
    out = capsys.readouterr().out
    assert f"{n_done} done, 0 failed, 1 started, {len(planned) - n_done - 1} missing  ({root})" in out, out
    p = subprocess.run([sys.executable, "-m", "sslray", "run", path, "--resume", "--num-cpus", "1"], cwd=ROOT,
                       env={**env, "SSLRAY_SCRATCH": str(tmp_path / "scratch-2")},  # resumed on "another node"
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert f"{len(planned) - n_done} trials ({n_done} already stored)" in p.stdout
    assert SECRET not in p.stdout + p.stderr
    df = ResultsStore(root).load()
    assert sorted(df["trial_id"]) == sorted(planned) and set(df["status"]) == {"ok"}
    rows = df.set_index("trial_id")
    assert rows.loc[started[0], "resumed_from"] > 0  # continued from the checkpoint in S3, on a fresh scratch dir
    assert SECRET not in df.astype(str).to_csv()

    assert cli.main(["table", path]) == 0 and "0.01" in capsys.readouterr().out
    assert cli.main(["plot", path, "--kind", "curves"]) == 0
    assert capsys.readouterr().out.strip() == f"{root}/plots/curves.png"
    names = keys(fs, prefix)
    for t in planned:
        assert {f"trials/{t}/config.yaml", f"trials/{t}/checkpoint/state.pt", f"results/{t}.parquet",
                f"history/{t}.parquet"} <= set(names)
        assert any(n.startswith(f"trials/{t}/splits/") for n in names)
    assert any(n.startswith("ray_tune/") for n in names)  # Ray's experiment state beside sslray's
    assert any(n.startswith("wandb/offline-run-") for n in names)
    assert "plots/curves.png" in names
    assert not (ROOT / "s3:").exists() and not list(tmp_path.glob("s3*"))


def test_two_nodes_that_share_no_directory_share_only_the_store(tmp_path, s3):  # noqa: F811
    """Two Ray nodes on this machine, each with its own scratch directory (SSLRAY_SCRATCH in the raylet's
    environment): the trials spread over both, and everything they store reaches S3 from either node."""
    import json

    import ray
    from ray.cluster_utils import Cluster

    from sslray import ray_adapter

    if ray.is_initialized():
        ray.shutdown()
    scratch = {n: tmp_path / f"node-{n}" for n in ("a", "b")}
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "resources": {"train_driver": 4},
                                                            "env_vars": {"SSLRAY_SCRATCH": str(scratch["a"])}})
    cluster.add_node(num_cpus=1, env_vars={"SSLRAY_SCRATCH": str(scratch["b"])})
    cluster.wait_for_nodes()
    root = f"s3://{BUCKET}/two-nodes"
    study = {"name": "twonodes", "base": TINY_BASE, "grid": {"method.name": ["supervised", "fixmatch"]},
             "seeds": [0], "storage": root}
    try:
        ray.init(address=cluster.address)
        summary = ray_adapter.run_study(load_study(write_study(tmp_path, study)), address=cluster.address,
                                        verbose=False)
    finally:
        ray.shutdown()
        cluster.shutdown()
    assert summary.ok == 2, summary
    df = ResultsStore(root).load()
    nodes = {json.loads(n)[0] if isinstance(n, str) else list(n)[0] for n in df["nodes"]}
    assert len(nodes) == 2  # one trial on each node
    for t in df["trial_id"]:  # each trial's files are in one node's scratch only, and all of them in S3
        local = [n for n, d in scratch.items() if any(d.glob(f"*/trials/{t}/checkpoint/state.pt"))]
        assert len(local) == 1, local
    assert ResultsStore(root).storage.exists(f"trials/{df['trial_id'][0]}/checkpoint/state.pt")
    assert not (tmp_path / "store").exists()
