"""Reliability suite, faults on real Ray: a SIGKILLed trial worker, a diverging trial, a lost node, secrets.

One ``sslray run`` (a real CLI process, local Ray) is shared by most tests here: a two-cell study whose method
comes from a ``--plugin`` module, run with fake cloud and W&B credentials in its environment. While it runs, the
Tune trial actor training the healthy cell is SIGKILLed right after its first checkpoint; the other cell has
``optim.lr: 1e30`` and diverges. The tests then read what that run left behind. The lost-node test builds its own
three-node cluster on this machine. The killed-driver test lives in test_ray_study.py
(``test_killed_driver_then_resume_runs_only_what_is_missing``, marked ``reliability`` there).
"""
import copy
import glob
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from sslray import cli
from sslray.config import TrialConfig
from sslray.results import ResultsStore

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.reliability, pytest.mark.ray, pytest.mark.slow]

PLUGIN = "sslray_reliability_plugin"
PLUGIN_SOURCE = '''"""A --plugin module for the reliability suite: one method preset, and a trace of every process importing it."""
import copy
import os

_marker = os.environ.get("SSLRAY_PLUGIN_MARKER")
if _marker:
    with open(_marker, "a") as f:
        f.write(f"{os.getpid()}\\n")


def register():
    from sslray.methods import METHOD_PRESETS

    METHOD_PRESETS["reliability_fixmatch"] = {**copy.deepcopy(METHOD_PRESETS["fixmatch"]), "conf_thresh": 0.7}
'''
TINY = {"data": {"crop_size": 32, "batch_size_x": 4, "batch_size_u": 4, "partition": "4",
                 "synthetic": {"size": 32, "num_train": 24, "num_val": 6}},
        "model": {"name": "small", "width": 8}, "run": {"threads": 1}}
ITERATIONS, EVAL_EVERY = 60, 10
HEALTHY_LR, DIVERGING_LR = 0.01, 1.0e30


def write_plugin(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{PLUGIN}.py").write_text(PLUGIN_SOURCE)
    return directory


def descendants(root: int) -> list[int]:
    """Pids of every process below ``root`` (from /proc), so that only processes this test started are touched."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    out, stack = [], [root]
    while stack:
        for child in children.get(stack.pop(), []):
            out.append(child)
            stack.append(child)
    return out


def kill_tree(root: int) -> None:
    """SIGKILL ``root`` and every process below it (what a test started, nothing else)."""
    for pid in [*descendants(root), root]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


@pytest.fixture(scope="module")
def plugin_registered():
    """The plugin's preset in this process too (status/table/reference fit), removed again afterwards."""
    from sslray import config
    from sslray.methods import METHOD_PRESETS

    saved = copy.deepcopy(METHOD_PRESETS)
    plugin_dir = write_plugin(Path(tempfile.mkdtemp(prefix="sslray-plugin-")))
    sys.path.insert(0, str(plugin_dir))
    config.load_plugins([PLUGIN])
    yield PLUGIN
    METHOD_PRESETS.clear()
    METHOD_PRESETS.update(saved)
    config._PLUGINS_LOADED.discard(PLUGIN)
    sys.modules.pop(PLUGIN, None)
    sys.path.remove(str(plugin_dir))
    shutil.rmtree(plugin_dir)


@pytest.fixture(scope="module")
def faulty_run(tmp_path_factory):
    """Run the two-cell study through ``sslray run`` and SIGKILL the healthy cell's trial actor mid-way."""
    d = tmp_path_factory.mktemp("faults")
    plugin_dir = write_plugin(d / "plugin")
    storage = d / "store"
    study = {"name": "faults",
             "base": {**TINY, "method": {"name": "reliability_fixmatch"},
                      "train": {"iterations": ITERATIONS, "eval_every": EVAL_EVERY}},
             "grid": {"optim.lr": [HEALTHY_LR, DIVERGING_LR]},
             "report": {"rows": "optim.lr", "cols": "method.name"},
             "storage": str(storage)}
    path = d / "study.yaml"
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    fake = {"WANDB_API_KEY": "wandbfake" + secrets.token_hex(20),
            "AWS_ACCESS_KEY_ID": "AKIAFAKE" + secrets.token_hex(6).upper(),
            "AWS_SECRET_ACCESS_KEY": "awsfake" + secrets.token_hex(16),
            "AWS_SESSION_TOKEN": "awstokenfake" + secrets.token_hex(24)}
    ray_tmp = tempfile.mkdtemp(prefix="rr", dir="/tmp")  # Ray's session logs, kept short for its unix sockets
    env = {**os.environ, **fake, "OMP_NUM_THREADS": "1", "RAY_AUTH_MODE": "disabled", "RAY_TMPDIR": ray_tmp,
           "PYTHONPATH": os.pathsep.join([str(plugin_dir), str(ROOT)]), "SSLRAY_PLUGIN_MARKER": str(d / "imports")}
    env.pop("RAY_LOGGER_LEVEL", None)  # the test must see what sslray sets, not what the caller had
    out, err = d / "stdout.txt", d / "stderr.txt"
    with open(out, "w") as fo, open(err, "w") as fe:
        proc = subprocess.Popen([sys.executable, "-m", "sslray", "run", str(path), "--num-cpus", "1",
                                 "--plugin", PLUGIN], cwd=d, env=env, stdout=fo, stderr=fe,
                                start_new_session=True)
    killed, stored_at_kill, deadline = None, None, time.time() + 900
    try:
        while proc.poll() is None and time.time() < deadline:
            # only the healthy cell ever checkpoints: the diverging one fails before its first evaluation
            if killed is None and glob.glob(str(storage / "trials/*/checkpoint/state.pt")):
                actors = [p for p in descendants(proc.pid) if cmdline(p).startswith("ray::ImplicitFunc")]
                if actors:
                    stored_at_kill = sorted(p.name for p in storage.glob("results/*"))  # temp files too
                    os.kill(actors[0], signal.SIGKILL)
                    killed = actors[0]
            time.sleep(0.05)
    finally:
        if proc.poll() is None:  # past the deadline: stop the CLI and the Ray processes it started, nothing else
            kill_tree(proc.pid)
        proc.wait(timeout=60)
    written = sorted(p.name for p in d.iterdir())  # the run's working directory: what it wrote outside the storage
    yield SimpleNamespace(path=str(path), storage=storage, returncode=proc.returncode, stdout=out.read_text(),
                          stderr=err.read_text(), killed=killed, stored_at_kill=stored_at_kill, fake=fake,
                          ray_tmp=ray_tmp, dir=d, imports=(d / "imports").read_text().split() if (d / "imports").exists() else [],
                          written=written)
    shutil.rmtree(ray_tmp, ignore_errors=True)


def rows_by_lr(storage) -> dict[float, dict]:
    df = ResultsStore(storage).load()
    assert df["trial_id"].is_unique, df["trial_id"]
    return {float(r["cfg.optim.lr"]): r for r in df.to_dict("records")}


def test_sigkilled_trial_worker_resumes_from_its_checkpoint(faulty_run, plugin_registered):
    from sslray.trainer import fit

    assert faulty_run.killed is not None, faulty_run.stdout[-3000:] + faulty_run.stderr[-3000:]
    assert faulty_run.stored_at_kill == [], "the kill must land before the healthy trial stored its row"
    assert "ActorDiedError" in faulty_run.stdout + faulty_run.stderr  # Tune saw the actor die and retried the trial
    rows = rows_by_lr(faulty_run.storage)
    assert sorted(rows) == [HEALTHY_LR, DIVERGING_LR]  # exactly one row per trial, none lost or doubled
    row = rows[HEALTHY_LR]
    assert row["status"] == "ok" and row["iteration"] == ITERATIONS
    assert 0 < row["resumed_from"] < ITERATIONS and row["resumed_from"] % EVAL_EVERY == 0  # from a checkpoint
    hist = ResultsStore(faulty_run.storage).load_history()
    hist = hist[hist["trial_id"] == row["trial_id"]]
    assert list(hist["iteration"]) == list(range(EVAL_EVERY, ITERATIONS + 1, EVAL_EVERY))  # no evaluation twice

    # the uninterrupted run: the trial's stored config trained from scratch in this process, without Ray
    config_path = faulty_run.storage / "trials" / row["trial_id"] / "config.yaml"
    cfg = TrialConfig.from_yaml(str(config_path))
    assert cfg.trial_id() == row["trial_id"]
    assert row["rerun"].endswith(f"--plugin {PLUGIN}")  # the stored rerun command names the plugin it needs
    ref = fit(cfg, out_dir=str(faulty_run.dir / "uninterrupted"))
    for key in ("val/miou", "best/val/miou", "val/pixel_acc", "train/loss"):
        assert row[key] == pytest.approx(ref[key], rel=1e-5, abs=1e-6), key


def test_diverging_trial_fails_at_once_and_the_study_goes_on(faulty_run, plugin_registered, capsys):
    rows = rows_by_lr(faulty_run.storage)
    bad = rows[DIVERGING_LR]
    assert bad["status"] == "failed"
    m = re.fullmatch(r"non-finite loss at iteration (\d+): term '(\w+)' = (nan|inf|-inf)", bad["reason"])
    assert m, bad["reason"]
    assert int(m.group(1)) < EVAL_EVERY  # stopped at once, not at the end of the trial
    assert not (faulty_run.storage / "trials" / bad["trial_id"] / "checkpoint").exists()
    assert rows[HEALTHY_LR]["status"] == "ok"  # the study went on
    assert faulty_run.returncode == 1  # a failed trial: exit 1, not a crash
    assert "2 trials run (1 ok, 1 failed)" in faulty_run.stdout
    assert re.search(r"1e\+30 .*failed \(non-finite loss at iteration", faulty_run.stdout)  # run's table

    assert cli.main(["status", faulty_run.path, "--plugin", PLUGIN]) == 0
    status = capsys.readouterr().out
    assert "1 done, 1 failed, 0 started, 0 missing" in status
    failed_line = next(line for line in status.splitlines() if line.startswith("failed"))
    assert "optim.lr=1e+30" in failed_line and bad["reason"] in failed_line
    assert cli.main(["table", faulty_run.path, "--plugin", PLUGIN, "--format", "csv"]) == 0
    table = capsys.readouterr().out
    assert re.search(r"1e\+30.*failed", table) and "non-finite loss" in table, table


def test_plugin_is_imported_by_the_driver_and_the_trials_only(faulty_run):
    pids = set(faulty_run.imports)
    assert len(pids) >= 3, pids  # the CLI, the first trial actor and the one that replaced the killed actor
    assert str(faulty_run.killed) in pids


def test_the_run_writes_nothing_outside_its_storage(faulty_run):
    assert faulty_run.written == ["imports", "plugin", "stderr.txt", "stdout.txt", "store", "study.yaml"]
    assert {"history", "ray_tune", "results", "trials", "wandb"} <= {p.name for p in faulty_run.storage.iterdir()}


def test_secrets_in_the_environment_land_in_no_output(faulty_run):
    """Every file the run wrote (results, history, configs, checkpoints, Tune state, W&B offline runs), its stdout
    and stderr, and Ray's own session logs: none holds a credential value from the environment."""
    files = [p for p in Path(faulty_run.storage).rglob("*") if p.is_file()]
    files += [p for p in Path(faulty_run.ray_tmp).rglob("*") if p.is_file() and not p.is_socket()]
    assert any(p.suffix == ".parquet" for p in files) and any(p.name == "config.yaml" for p in files)
    assert any("runtime_env_agent" in p.name for p in files)  # Ray's logs are in the scan
    assert any(p.suffix == ".wandb" for p in files)  # and the W&B offline run files
    leaks = []
    for p in files:
        try:
            data = p.read_bytes()
        except OSError:
            continue
        leaks += [f"{p}: {name}" for name, value in faulty_run.fake.items() if value.encode() in data]
    for name, value in faulty_run.fake.items():
        if value in faulty_run.stdout or value in faulty_run.stderr:
            leaks.append(f"stdout/stderr: {name}")
    assert leaks == []


# --------------------------------------------------------------------------------------------------
# a lost node


@pytest.fixture()
def three_node_cluster():
    """A head that runs no trials (0 CPUs, the driver resource) and two 1-CPU worker nodes, on this machine."""
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "resources": {"train_driver": 4}})
    workers = [cluster.add_node(num_cpus=1) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    yield cluster, workers
    ray.shutdown()
    cluster.shutdown()


def test_lost_node_trials_are_retried_on_another(tmp_path, three_node_cluster):
    import ray

    from sslray import ray_adapter
    from sslray.study import load_study

    cluster, workers = three_node_cluster
    storage = tmp_path / "store"
    iterations = 100  # long enough that both trials are mid-way together even when one actor starts late
    study = {"name": "nodeloss", "base": {**TINY, "method": {"name": "fixmatch"},
                                          "train": {"iterations": iterations, "eval_every": EVAL_EVERY}},
             "seeds": [0, 1], "storage": str(storage)}
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    lost = {}

    def lose_a_node():  # once both trials (one per worker node) have checkpointed and neither has finished
        deadline = time.time() + 600
        while time.time() < deadline:
            started = glob.glob(str(storage / "trials/*/checkpoint/state.pt"))
            if len(started) == 2:
                lost["stored"] = list(storage.glob("results/*"))  # also a row being written (temp file)
                lost["node"] = workers[0].node_id
                cluster.remove_node(workers[0], allow_graceful=False)  # SIGKILL of raylet, workers, object store
                return
            time.sleep(0.05)

    killer = threading.Thread(target=lose_a_node, daemon=True)
    killer.start()
    summary = ray_adapter.run_study(load_study(str(path)), address=cluster.address, verbose=False)
    killer.join(timeout=60)
    assert lost.get("node") and lost["stored"] == [], lost
    deadline = time.time() + 120  # the GCS marks a node dead after missed health checks, maybe after the run ends
    while lost["node"] in {n["NodeID"] for n in ray.nodes() if n["Alive"]} and time.time() < deadline:
        time.sleep(0.5)
    assert lost["node"] not in {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    assert summary.ok == 2 and summary.failed == 0, summary
    df = ResultsStore(storage).load()
    assert len(df) == 2 and df["trial_id"].is_unique and set(df["status"]) == {"ok"}
    assert (df["iteration"] == iterations).all()
    survivor = workers[1].node_id
    for nodes in df["nodes"]:
        assert json.loads(nodes) == [survivor]  # both finished on the node that is left
    assert sorted(df["resumed_from"] > 0) == [False, True]  # the lost node's trial went on from its checkpoint
