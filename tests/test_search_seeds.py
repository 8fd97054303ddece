"""Searches on a real local Ray instance with a real Optuna study in the study's storage: every sampled
configuration runs every seed and the searcher is told the mean; a driver killed mid-search continues the same
Optuna study."""
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml

from sslray.config import ConfigError
from sslray.results import ResultsStore
from sslray.storage import StudyStorage
from sslray.study import load_study

ROOT = Path(__file__).resolve().parents[1]
TINY_BASE = {
    "data": {"crop_size": 32, "batch_size_x": 4, "batch_size_u": 4, "partition": "4",
             "synthetic": {"size": 32, "num_train": 24, "num_val": 6}},
    "model": {"name": "small", "width": 8},
    "method": {"name": "supervised"},
    "train": {"iterations": 2, "eval_every": 2},
    "run": {"threads": 1},
}
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_AUTH_MODE": "disabled"}


def search_study(tmp_path, num_samples: int, seeds=(0, 1), base=None, **search) -> str:
    d = {"name": "seeded", "base": base or TINY_BASE, "seeds": list(seeds), "storage": str(tmp_path / "store"),
         "search": {"sampler": "random", "num_samples": num_samples, "metric": "val/miou", "mode": "max", "seed": 3,
                    "space": {"optim.lr": {"loguniform": [1.0e-3, 1.0e-1]}}, **search}}
    p = tmp_path / "study.yaml"
    p.write_text(yaml.safe_dump(d, sort_keys=False))
    return str(p)


def optuna_history(tmp_path) -> list[tuple[int, str, dict, float | None]]:
    url = StudyStorage(tmp_path / "store").optuna_url()
    trials = optuna.load_study(study_name="seeded", storage=url).trials
    return [(t.number, t.state.name, dict(t.params), t.value) for t in trials]


def test_asha_with_several_seeds_needs_checkpoints_and_one_worker(tmp_path):
    path = search_study(tmp_path, 2, scheduler={"type": "asha"})
    assert load_study(path).search.scheduler["type"] == "asha"  # allowed: the seeds run in lockstep
    d = yaml.safe_load(open(path))
    d["base"]["run"]["checkpoint"] = False
    open(path, "w").write(yaml.safe_dump(d))
    with pytest.raises(ConfigError, match="base.run.checkpoint: ASHA with 2 seeds per configuration needs checkpoints"):
        load_study(path)
    d["base"]["run"]["checkpoint"] = True
    d["resources"] = {"workers": 2}
    open(path, "w").write(yaml.safe_dump(d))
    with pytest.raises(ConfigError, match="search.scheduler: ASHA with 2 seeds .* resources.workers = 2"):
        load_study(path)


def _tune_results(store: Path) -> list[list[dict]]:
    """Every Tune trial's reported results, in order (Tune's own result.json lines)."""
    return [[json.loads(line) for line in f.read_text().splitlines() if line.strip()]
            for f in sorted((store / "ray_tune").glob("*/*/result.json"))]


@pytest.mark.slow
@pytest.mark.ray
def test_asha_compares_the_mean_over_seeds_and_stores_stopped_seeds(tmp_path):
    """ASHA with 2 seeds: one Tune trial per configuration, whose result at each evaluation is the mean of its two
    seeds' history rows there; a configuration ASHA stops gets a stopped row per seed. ``train/lr`` (poly decay of
    the sampled lr) is the metric so that which configuration ASHA stops does not hang on float noise."""
    import ray

    from sslray import ray_adapter

    base = {**TINY_BASE, "train": {"iterations": 3, "eval_every": 1}}
    path = search_study(tmp_path, 3, base=base, metric="train/lr",
                        scheduler={"type": "asha", "grace_period": 1, "reduction_factor": 2})
    try:
        ray_adapter.run_study(load_study(path), num_cpus=1, verbose=False)
    finally:
        ray.shutdown()
    store = ResultsStore(str(tmp_path / "store"))
    df, hist = store.load(), store.load_history()
    assert len(df) == 6 and df["trial_id"].is_unique and set(df["status"]) <= {"ok", "stopped"}
    runs = _tune_results(tmp_path / "store")
    assert len(runs) == 3  # one Tune trial per configuration, not one per seed
    stopped = 0
    for results in runs:
        lr = results[0]["config"]["params"]["optim.lr"]
        rows = df[df["cfg.optim.lr"] == lr]
        assert sorted(rows["seed"]) == [0, 1] and rows["status"].nunique() == 1
        for r in results:
            it = r["iteration"]
            if rows["status"].iloc[0] == "ok":  # each seed's stored history at this evaluation
                seeds = hist[hist["trial_id"].isin(rows["trial_id"]) & (hist["iteration"] == it)]
                assert len(seeds) == 2
            else:
                seeds = rows  # a stopped seed's row holds its metrics at the last evaluation reported
            for m in ("val/miou", "train/loss", "train/lr"):
                assert r[m] == pytest.approx(statistics.fmean(seeds[m])), (lr, it, m)
        if rows["status"].iloc[0] == "stopped":
            stopped += 1
            assert results[-1]["iteration"] < 3 and (rows["iteration"] == results[-1]["iteration"]).all()
            assert rows["reason"].str.contains("stopped by the scheduler after").all()
        else:
            assert results[-1]["iteration"] == 3 and results[-1]["sslray_status"] == "ok"
    assert stopped >= 1
    # Optuna holds one value per configuration: the final mean
    values = [h[3] for h in optuna_history(tmp_path)]
    assert len(values) == 3


def _count_complete(url: str) -> int:
    try:
        return sum(t.state.name == "COMPLETE" for t in optuna.load_study(study_name="seeded", storage=url).trials)
    except (KeyError, Exception):  # no study (or no database) yet
        return 0


@pytest.mark.slow
@pytest.mark.ray
def test_a_killed_search_driver_resumes_the_same_optuna_study_with_one_mean_per_configuration(tmp_path):
    """One test for both (each start of Ray costs ~20 s here): seeds in a search, and a search that resumes."""
    from sslray.report import render, study_report

    path = search_study(tmp_path, 3)
    url = StudyStorage(tmp_path / "store").optuna_url()
    log = open(tmp_path / "driver.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "sslray", "run", path, "--num-cpus", "1"], cwd=ROOT, env=ENV,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 400
        while _count_complete(url) < 1 and time.time() < deadline and proc.poll() is None:
            time.sleep(0.5)
        assert proc.poll() is None, "the driver ended before it could be killed: " + \
            (tmp_path / "driver.log").read_text()[-3000:]
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray it started, mid-search
        proc.wait(30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()
    before = optuna_history(tmp_path)
    done_before = [h for h in before if h[1] == "COMPLETE"]
    assert 1 <= len(done_before) < 3

    out = subprocess.run([sys.executable, "-m", "sslray", "run", path, "--resume", "--num-cpus", "1"], cwd=ROOT,
                         env=ENV, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    after = optuna_history(tmp_path)
    assert after[:len(before)][0][:3] == before[0][:3]  # the same study, continued: old trials kept
    done_after = [h for h in after if h[1] == "COMPLETE"]
    assert all(h in done_after for h in done_before)  # what the sampler knew is still there, unchanged
    assert len(done_after) == 3  # num_samples counts the configurations completed before the kill
    lrs = [h[2]["params/optim.lr"] for h in done_after]
    assert len(set(lrs)) == 3  # nothing sampled twice
    # every configuration ran both seeds (a configuration cut by the kill: its seeds resumed or came from the
    # store), and the Optuna study holds one value per configuration: the mean of its seeds
    df = ResultsStore(str(tmp_path / "store")).load()
    assert len(df) == 6 and df["trial_id"].is_unique and set(df["status"]) == {"ok"}
    for _, _, params, value in done_after:
        rows = df[df["cfg.optim.lr"] == params["params/optim.lr"]]
        assert sorted(rows["seed"]) == [0, 1] and value == pytest.approx(statistics.fmean(rows["val/miou"]))
    table = render(study_report(load_study(path), df)["best_configs"], "markdown")
    assert "mean +- std over 2 seeds: the mean is what the searcher optimised" in table
    assert f"{rows['val/miou'].mean():.2f} +- {rows['val/miou'].std():.2f}" in table
