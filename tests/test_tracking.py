"""W&B tracking with the real wandb library, offline: runs are written under the storage and read back from their
.wandb files; no secret reaches them; disabled tracking never imports wandb."""
import glob
import json
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sslray import tracking
from sslray.config import ConfigError, TrialConfig
from sslray.results import ResultsStore, make_row
from sslray.study import load_study

ROOT = Path(__file__).resolve().parents[1]
SECRET = "0123456789abcdef0123456789abcdef01234567"  # looks like a W&B API key (40 hex)


def records(path):
    """The protobuf records of a .wandb file: a 7-byte header (":W&B", magic, version), then LevelDB-log blocks of
    32 KiB holding [crc32c 4, length 2, type 1] + payload chunks (type 1 full, 2 first, 3 middle, 4 last)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", data[:7]
    pos, buf, block = 7, b"", 32768
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is zero padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if len(chunk) < length:  # the writer is still at it: the last record is not complete yet
            return
        if kind == 0:
            continue
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind in (1, 4):
            r = pb.Record()
            r.ParseFromString(buf)
            yield r


def read_run(run_dir, timeout=60.0):
    """run record, config dict, history rows (by step), merged summary and exit code of one offline run.

    ``run.finish()`` returns before wandb-core has flushed the last records (history, summary, exit) to the .wandb
    file; on a loaded machine a read right after it saw a truncated run (the KeyError of the flaky read-back test).
    The exit record is written last, so the file is read again until it holds one."""
    (path,) = glob.glob(os.path.join(run_dir, "run-*.wandb"))
    deadline = time.monotonic() + timeout
    while True:
        out = _read_records(path)
        if out["exit_code"] is not None or time.monotonic() > deadline:
            return out
        time.sleep(0.2)


def _read_records(path):
    out = {"history": {}, "summary": {}, "exit_code": None, "config": {}}
    for r in records(path):
        kind = r.WhichOneof("record_type")
        if kind == "run":
            out["run"] = r.run
            out["config"].update({u.key: json.loads(u.value_json) for u in r.run.config.update})
        elif kind == "config":
            out["config"].update({u.key: json.loads(u.value_json) for u in r.config.update})
        elif kind == "history":
            row = {"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in r.history.item}
            out["history"][row.get("_step")] = row
        elif kind == "summary":
            out["summary"].update({"/".join(u.nested_key) or u.key: json.loads(u.value_json)
                                   for u in r.summary.update})
        elif kind == "exit":
            out["exit_code"] = r.exit.exit_code
    return out


def offline_runs(storage):
    return sorted(glob.glob(os.path.join(str(storage), "wandb", "offline-run-*")))


@pytest.fixture()
def wandb_env(tmp_path, monkeypatch):
    """wandb's own caches under tmp_path, and an API key in the environment that must never be written."""
    for var in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home" / var.lower()))
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_API_KEY", SECRET)
    return tmp_path


def assert_no_secret(directory):
    for p in Path(directory).rglob("*"):
        if p.is_file():
            assert SECRET.encode() not in p.read_bytes(), p


def tiny_config(method="fixmatch", seed=0):
    return TrialConfig.from_dict({"name": f"s-{method}-{seed}", "seed": seed, "method": {"name": method}})


def test_trial_runs_offline_read_back(wandb_env):
    storage = wandb_env / "store"
    settings = {"mode": "offline", "project": "sslray", "entity": None, "dir": str(storage)}
    cfg = tiny_config()
    run = tracking.TrialRun.start(settings, "s", cfg, {"method.name": "fixmatch", "seed": 0})
    report = run.reporter(lambda m, ck: None)
    for it, miou in ((2, 10.0), (4, 12.5)):  # arrays in the metrics (confusion, per-image) are not logged
        report({"iteration": it, "val/miou": miou, "train/loss": 1.0 / it, "val/confusion": [[1, 0], [0, 1]],
                "val/per_image": {"inter": [[1]], "union": [[1]]}}, None)
    run.finish("ok", {"val/miou": 12.5, "best/val/miou": 12.5, "history": [{"iteration": 2}]}, None)
    failed = tracking.TrialRun.start(settings, "s", tiny_config("supervised"))
    failed.finish("failed", None, "non-finite loss at iteration 3")

    runs = offline_runs(storage)
    assert len(runs) == 2
    ok = read_run(next(r for r in runs if r.endswith(tracking.run_id("s", cfg.trial_id()))))
    assert (ok["run"].run_group, ok["run"].job_type, ok["run"].display_name) == ("s", "fixmatch", "s-fixmatch-0")
    assert ok["run"].run_id == tracking.run_id("s", cfg.trial_id())
    assert ok["config"]["data"]["partition"] == cfg.data.partition and ok["config"]["seed"] == 0
    assert ok["config"]["sslray"]["trial_id"] == cfg.trial_id()
    assert ok["config"]["sslray"]["cell"] == {"method.name": "fixmatch", "seed": 0}
    assert sorted(ok["history"]) == [2, 4] and ok["history"][4]["val/miou"] == 12.5
    assert not any("val/confusion" in h or "val/per_image" in h for h in ok["history"].values())
    assert ok["summary"]["status"] == "ok" and ok["summary"]["best/val/miou"] == 12.5 and ok["exit_code"] == 0
    bad = read_run(next(r for r in runs if not r.endswith(tracking.run_id("s", cfg.trial_id()))))
    assert bad["summary"]["status"] == "failed" and bad["summary"]["reason"].startswith("non-finite")
    assert bad["exit_code"] == 1 and bad["run"].job_type == "supervised"
    assert_no_secret(storage)
    sync = subprocess.run([sys.executable, "-m", "wandb", "sync", "--dry-run", *runs], capture_output=True,
                          text=True, timeout=120)
    assert "Would sync 2 run(s)" in sync.stdout + sync.stderr  # sync-ready as written


def test_study_summary_run_holds_tables_and_plots(wandb_env):
    path = wandb_env / "s.yaml"
    storage = wandb_env / "store"
    path.write_text(f"name: s\ngrid: {{method.name: [supervised, fixmatch]}}\nseeds: [0, 1]\n"
                    f"report: {{baseline: supervised}}\nstorage: {storage}\n")
    study = load_study(str(path))
    store = ResultsStore(storage)
    for i, t in enumerate(study.trials()):
        metrics = {"iteration": 4, "val/miou": 30.0 + 5 * (t.config.method.name == "fixmatch") + i,
                   "val/confusion": [[3, 1], [1, 3]]}
        store.write(make_row("s", t.point, t.config, "ok", metrics, None, 36.0, "cpu", {"cpus": 1}),
                    [{"iteration": 2, "val/miou": 20.0}, {"iteration": 4, "val/miou": metrics["val/miou"]}])
    run_dir = tracking.log_study(study, str(storage), tracking.settings_for(study, str(storage)))
    (summary_run,) = offline_runs(storage)
    assert run_dir.startswith(summary_run)
    media = Path(summary_run) / "files" / "media"
    (comparison,) = (media / "table" / "tables").glob("comparison_*.table.json")
    table = json.loads(comparison.read_text())
    assert table["columns"] == ["method.name", "data.partition", "mean", "std", "n", "planned", "status", "delta",
                                "p_holm", "significant", "cell"]
    # trials in plan order (seed-major) scored 30, 35 + 1, 30 + 2, 35 + 3: supervised 31, fixmatch 37
    rows = {row[0]: dict(zip(table["columns"], row)) for row in table["data"]}
    assert list(rows) == ["supervised", "fixmatch"]
    assert (rows["fixmatch"]["mean"], rows["fixmatch"]["n"], rows["fixmatch"]["delta"]) == (37.0, 2, 6.0)  # numbers
    assert rows["fixmatch"]["cell"].startswith("37.0 ± 1.4 (n=2)")
    assert rows["supervised"]["delta"] is None or rows["supervised"]["delta"] != rows["supervised"]["delta"]  # NaN
    cost = json.loads(next((media / "table" / "tables").glob("cost_*.table.json")).read_text())
    assert isinstance(dict(zip(cost["columns"], cost["data"][0]))["CPU-h"], float)
    assert {p.name.split("_")[0] for p in (media / "table" / "tables").glob("*.json")} == {
        "comparison", "per", "pseudo", "cost", "manifest"}
    assert {p.name.split("_")[0] for p in (media / "images" / "plots").glob("*.png")} == {"efficiency", "curves"}
    read = read_run(summary_run)
    assert read["run"].job_type == "summary" and read["summary"]["trials"] == 4 and read["summary"]["trials_ok"] == 4
    assert read["summary"]["cpu_hours"] == pytest.approx(4 * 36.0 / 3600)
    assert read["run"].run_id == tracking.run_id("s", "summary")
    tracking.log_study(study, str(storage), tracking.settings_for(study, str(storage)))  # a re-run of sslray run
    again = [read_run(r)["run"].run_id for r in offline_runs(storage)]
    assert again == [tracking.run_id("s", "summary")] * 2  # the same W&B run, written again: sync updates it
    assert_no_secret(storage)


def test_summary_tables_are_the_tables_sslray_table_prints(tmp_path, capsys):
    """W&B's comparison comes from the same study_report as ``sslray table``: paper numbers and the ablation
    baseline rule included (it used to rebuild the table itself and left the paper column out)."""
    from sslray import cli
    from sslray.report import render

    (tmp_path / "paper.yaml").write_text("source: Some paper, Table 1\nrows:\n  supervised: {16: 30.5}\n")
    path = tmp_path / "s.yaml"
    path.write_text(f"name: s\ngrid: {{method.name: [supervised, fixmatch]}}\nseeds: [0, 1]\n"
                    f"report: {{baseline: supervised, paper_numbers: paper.yaml}}\nstorage: {tmp_path / 'store'}\n")
    study = load_study(str(path))
    store = ResultsStore(tmp_path / "store")
    for i, t in enumerate(study.trials()):
        metrics = {"iteration": 4, "val/miou": 30.0 + 5 * (t.config.method.name == "fixmatch") + i}
        store.write(make_row("s", t.point, t.config, "ok", metrics, None, 1.0, "cpu", {"cpus": 1}),
                    [{"iteration": 4, "val/miou": metrics["val/miou"]}])
    named = tracking.study_tables(study, store.load(), store.load_history())
    assert list(named) == ["comparison", "per_class", "pseudo_labels", "cost", "manifest"]
    assert cli.main(["table", str(path), "--format", "csv"]) == 0
    assert capsys.readouterr().out == render(named["comparison"], "csv") + "\n"
    assert named["comparison"].paper == {("supervised", "16"): 30.5}


def test_mode_resolution_and_validation(tmp_path, monkeypatch):
    path = tmp_path / "s.yaml"
    path.write_text("name: s\n")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_DISABLED", raising=False)
    study = load_study(str(path))
    assert tracking.settings_for(study, str(tmp_path))["mode"] == "offline"  # the default: no account needed
    monkeypatch.setenv("WANDB_MODE", "online")
    assert tracking.settings_for(study, str(tmp_path))["mode"] == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert tracking.settings_for(study, str(tmp_path)) is None
    path.write_text("name: s\ntracking: {wandb: offline, project: papers}\n")  # the environment wins (as in W&B)
    assert tracking.settings_for(load_study(str(path)), str(tmp_path)) is None
    monkeypatch.delenv("WANDB_MODE")
    s = tracking.settings_for(load_study(str(path)), str(tmp_path))
    assert (s["mode"], s["project"], s["dir"]) == ("offline", "papers", str(tmp_path))
    monkeypatch.setenv("WANDB_MODE", "sometimes")
    with pytest.raises(ConfigError, match=r"^environment: WANDB_MODE: expected one of offline, dryrun, online, run, "
                                          r"disabled, got 'sometimes'$"):
        tracking.settings_for(load_study(str(path)), str(tmp_path))
    monkeypatch.delenv("WANDB_MODE")
    path.write_text("name: s\ntracking: {wandb: sometimes}\n")
    with pytest.raises(ConfigError, match=r"s\.yaml: tracking\.wandb: expected one of \['offline', 'online', "):
        load_study(str(path))
    path.write_text("name: s\ntracking: {api_key: x}\n")
    with pytest.raises(ConfigError, match=r"tracking\.api_key: unknown key"):
        load_study(str(path))


def test_scrub_drops_credentials_and_redacts_the_key(monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", SECRET)
    d = {"data": {"root": f"/x/{SECRET}"}, "api_key": "a", "nested": [{"auth_token": 1, "ok": 2}], "lr": 0.1}
    assert tracking.scrub(d) == {"data": {"root": tracking.REDACTED}, "nested": [{"ok": 2}], "lr": 0.1}


def test_disabled_tracking_never_imports_wandb(monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # any "import wandb" now raises ImportError
    assert tracking.TrialRun.start(None, "s", TrialConfig()) is None
    assert tracking.log_study(None, ".", None) is None


@pytest.mark.slow
@pytest.mark.ray
def test_smoke_study_on_ray_writes_runs_tables_and_figures(tmp_path, capsys):
    """studies/smoke.yaml on a real local Ray: one W&B run per trial (written in the trial actor) plus the summary
    run, and the table / plot commands on the finished results."""
    from PIL import Image

    from sslray.cli import main

    storage = tmp_path / "store"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_AUTH_MODE": "disabled", "WANDB_API_KEY": SECRET,
           "WANDB_CACHE_DIR": str(tmp_path / "cache"), "WANDB_DATA_DIR": str(tmp_path / "data")}
    env.pop("WANDB_MODE", None)
    proc = subprocess.run([sys.executable, "-m", "sslray", "run", "studies/smoke.yaml", "--storage", str(storage),
                           "--num-cpus", "2"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    runs = [read_run(r) for r in offline_runs(storage)]
    assert sorted(r["run"].job_type for r in runs) == ["fixmatch", "summary", "supervised"]
    for r in runs:
        if r["run"].job_type != "summary":
            assert r["run"].run_group == "smoke" and sorted(r["history"]) == [2, 4] and r["summary"]["status"] == "ok"
    assert_no_secret(storage)

    smoke = str(ROOT / "studies" / "smoke.yaml")
    capsys.readouterr()
    assert main(["table", smoke, "--storage", str(storage), "--format", "latex"]) == 0
    assert "\\toprule" in capsys.readouterr().out
    assert main(["table", smoke, "--storage", str(storage), "--per-class", "--manifest", "--format", "html"]) == 0
    out = capsys.readouterr().out
    assert "<caption>Per-class IoU</caption>" in out and "sslray train " in out and "config.yaml" in out
    assert main(["plot", smoke, "--storage", str(storage), "--out", str(tmp_path / "figs")]) == 0
    paths = capsys.readouterr().out.split()
    assert [os.path.basename(p) for p in paths] == ["efficiency.png", "curves.png"]
    with Image.open(paths[0]) as im:
        assert im.format == "PNG" and im.size[0] > 300


def test_unknown_wandb_mode_is_refused_before_the_run(tmp_path, monkeypatch, capsys):
    from sslray import cli

    path = tmp_path / "s.yaml"
    path.write_text(f"name: s\nstorage: {tmp_path / 'store'}\n")
    monkeypatch.setenv("WANDB_MODE", "ofline")
    assert cli.main(["run", str(path), "--dry-run"]) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert err.startswith("sslray: error: environment: WANDB_MODE: expected one of") and len(err.splitlines()) == 1


def test_training_metrics_are_logged_every_log_every(wandb_env):
    """The trainer's on_log hook: train/* every run.log_every iterations, val/* at the evaluations only."""
    from sslray.trainer import fit

    cfg = TrialConfig.from_dict({
        "name": "logs", "method": {"name": "fixmatch"}, "model": {"name": "small", "width": 8},
        "data": {"crop_size": 32, "batch_size_x": 2, "batch_size_u": 2, "partition": "4",
                 "synthetic": {"size": 32, "num_train": 12, "num_val": 2}},
        "train": {"iterations": 6, "eval_every": 3}, "run": {"log_every": 1, "threads": 1}})
    storage = wandb_env / "store"
    settings = {"mode": "offline", "project": "sslray", "entity": None, "dir": str(storage)}
    run = tracking.TrialRun.start(settings, "s", cfg)
    fit(cfg, reporter=run.reporter(lambda m, ck: None), out_dir=str(wandb_env / "out"), on_log=run.log)
    run.finish("ok", None, None)
    (run_dir,) = offline_runs(storage)
    history = read_run(run_dir)["history"]
    assert sorted(history) == [1, 2, 3, 4, 5, 6]
    assert all("train/loss" in history[i] and "train/lr" in history[i] for i in history)
    assert [i for i in history if "val/miou" in history[i]] == [3, 6]
