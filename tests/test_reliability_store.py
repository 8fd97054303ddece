"""Reliability suite, the results store and storage: concurrent writers, a writer killed mid-write, bad files in the
store through the CLI, storage that cannot be written or is full. Real processes and real files; no Ray started.
"""
import os
import resource
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from sslray import cli
from sslray.results import ResultsStore, StoreError, make_row
from sslray.study import load_study

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "studies" / "smoke.yaml"
pytestmark = pytest.mark.reliability
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}

# A writer process: waits for <go>, then stores rows for the given trial ids (hand-built rows: the store's rules, not
# make_row's, are under test, and the processes start without importing torch).
WRITER = textwrap.dedent("""
    import os, sys, time
    from sslray.results import ResultsStore
    root, go, ready, value, *ids = sys.argv[1:]
    open(ready, "w").close()
    while not os.path.exists(go):
        time.sleep(0.001)
    store = ResultsStore(root)
    for tid in ids:
        history = [{"iteration": i, "val/miou": float(i)} for i in range(1, 2001)]
        try:
            store.write({"study": "conc", "trial_id": tid, "status": "ok", "val/miou": float(value)}, history)
        except Exception as e:  # a second writer of the same id may find it stored: that is the rule, not a crash
            print(f"{tid}: {type(e).__name__}: {e}", flush=True)
""")


def hex_id(i: int) -> str:
    return f"{i:064x}"


def start_writers(tmp_path, jobs: list[tuple[str, list[str]]]) -> list[subprocess.Popen]:
    """One process per (value, trial ids) job, all released at the same instant."""
    go = tmp_path / "go"
    procs, ready = [], []
    for n, (value, ids) in enumerate(jobs):
        ready.append(tmp_path / f"ready{n}")
        procs.append(subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path / "store"), str(go), str(ready[-1]),
                                       value, *ids], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    deadline = time.time() + 300
    while not all(r.exists() for r in ready) and time.time() < deadline:
        time.sleep(0.01)
    go.touch()
    return procs


def assert_whole_files_only(store_root: Path) -> None:
    for sub in ("results", "history"):
        names = os.listdir(store_root / sub) if (store_root / sub).exists() else []
        assert [n for n in names if n.startswith(".tmp")] == [], names


@pytest.mark.slow
def test_trials_finishing_at_the_same_moment_all_land_whole(tmp_path):
    ids = [hex_id(i) for i in range(1, 7)]
    jobs = [("1", ids[0:2]), ("2", ids[2:4]), ("3", ids[4:6]), ("4", [ids[0]])]  # the last one races for ids[0]
    for p in start_writers(tmp_path, jobs):
        out, _ = p.communicate(timeout=300)
        assert p.returncode == 0, out
        assert out == "" or "only failed trials may be overwritten" in out, out
    store = ResultsStore(tmp_path / "store")
    df = store.load()
    assert sorted(df["trial_id"]) == ids  # one row per trial, none lost, none twice
    assert df.set_index("trial_id").loc[ids[0], "val/miou"] in (1.0, 4.0)  # one writer's row, whole
    hist = store.load_history()
    assert len(hist) == 6 * 2000 and not hist.duplicated(["trial_id", "iteration"]).any()
    assert_whole_files_only(tmp_path / "store")


def test_writer_killed_in_the_middle_of_a_write_leaves_whole_files(tmp_path):
    """The second write stops half-way through its bytes (the Parquet writer is cut mid-file) and the process is
    SIGKILLed there: the store keeps the first row, ignores the half temp file, and reads nothing half-written."""
    root, marker = tmp_path / "store", tmp_path / "mid-write"
    code = textwrap.dedent(f"""
        import io, os, time
        import sslray.results as R
        store = R.ResultsStore({str(root)!r})
        row = {{"study": "crash", "status": "ok", "val/miou": 1.0}}
        store.write({{**row, "trial_id": {hex_id(1)!r}}})
        real = R.pq.write_table
        def half_then_hang(table, f, **kw):
            buf = io.BytesIO()
            real(table, buf, **kw)
            data = buf.getvalue()
            f.write(data[: len(data) // 2])
            f.flush()
            open({str(marker)!r}, "w").close()
            time.sleep(600)
        R.pq.write_table = half_then_hang
        store.write({{**row, "trial_id": {hex_id(2)!r}}})
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], env=ENV)
    deadline = time.time() + 300
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert marker.exists(), "the writer never reached the middle of its write"
    names = sorted(os.listdir(root / "results"))
    assert names[0].startswith(".tmp") and names[1:] == [f"{hex_id(1)}.parquet"], names  # the half file is a temp
    df = ResultsStore(root).load()
    assert list(df["trial_id"]) == [hex_id(1)]  # the finished row, and nothing of the half one


# --------------------------------------------------------------------------------------------------
# bad files in a study's store, through the commands that read it


@pytest.fixture()
def smoke_store(tmp_path):
    """The smoke study with its first trial stored (a made-up, well-formed row)."""
    trials = load_study(str(SMOKE)).trials()
    store = ResultsStore(tmp_path / "store")
    store.write(make_row("smoke", trials[0].point, trials[0].config, "ok", {"iteration": 4, "val/miou": 40.0}, None,
                         1.0, "cpu"))
    return tmp_path / "store", trials


def bad_truncated(store_dir: Path, trials) -> Path:
    good = store_dir / "results" / f"{trials[0].trial_id}.parquet"
    bad = store_dir / "results" / f"{trials[1].trial_id}.parquet"
    data = good.read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    return bad


def bad_foreign(store_dir: Path, trials) -> Path:
    bad = store_dir / "results" / "results-backup.csv"
    bad.write_text("trial_id,val/miou\n")
    return bad


def bad_wrong_trial(store_dir: Path, trials) -> Path:
    good = store_dir / "results" / f"{trials[0].trial_id}.parquet"
    bad = store_dir / "results" / f"{trials[1].trial_id}.parquet"
    shutil.copy(good, bad)  # a row copied under another trial's name
    return bad


def bad_empty_history(store_dir: Path, trials) -> Path:
    bad = store_dir / "history" / f"{trials[0].trial_id}.parquet"
    bad.parent.mkdir(parents=True, exist_ok=True)
    bad.write_bytes(b"")
    return bad


@pytest.mark.parametrize("plant", [bad_truncated, bad_foreign, bad_wrong_trial])
@pytest.mark.parametrize("command", [["status"], ["table"], ["run", "--dry-run"], ["run"]])
def test_bad_result_file_is_reported_by_name_by_every_command(smoke_store, plant, command, capsys):
    import ray

    store_dir, trials = smoke_store
    bad = plant(store_dir, trials)
    before = sorted(p.relative_to(store_dir) for p in store_dir.rglob("*"))
    code = cli.main([command[0], str(SMOKE), "--storage", str(store_dir), *command[1:]])
    out, err = capsys.readouterr()
    assert code == 1, out + err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"sslray: error: StoreError: {bad}: "), err
    assert not ray.is_initialized()  # run stopped before starting anything
    assert sorted(p.relative_to(store_dir) for p in store_dir.rglob("*")) == before


def test_bad_history_file_is_reported_by_name(smoke_store):
    store_dir, trials = smoke_store
    bad = bad_empty_history(store_dir, trials)
    with pytest.raises(StoreError, match=rf"^{bad}: not a readable Parquet file"):
        ResultsStore(store_dir).load_history()


def test_leftover_temp_file_of_a_crashed_writer_is_ignored(smoke_store, capsys):
    store_dir, trials = smoke_store
    (store_dir / "results" / ".tmpk2j3h4.parquet").write_bytes(b"PAR1 half a file")
    assert cli.main(["status", str(SMOKE), "--storage", str(store_dir)]) == 0
    assert "1 done, 0 failed, 0 started, 1 missing" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------------
# storage that cannot be written, or is full


def write_study(tmp_path, storage) -> str:
    d = yaml.safe_load(SMOKE.read_text())
    d["storage"] = str(storage)
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(d))
    return str(path)


def unwritable_dir(tmp_path) -> Path:
    """A directory this process cannot create files in: chmod 555 where that binds (not root), else /sys, where
    even root cannot create files."""
    d = tmp_path / "readonly"
    d.mkdir()
    d.chmod(0o555)
    try:
        (d / "probe").write_text("x")
    except OSError:
        return d
    (d / "probe").unlink()
    d.chmod(0o755)
    return Path("/sys")


def run_cli_expecting_usage_error(args, capsys) -> str:
    import ray

    code = cli.main(args)
    out, err = capsys.readouterr()
    assert code == 2, out + err
    assert not ray.is_initialized()
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize("where", ["under_a_file", "not_writable"])
def test_unusable_storage_is_refused_before_anything_starts(tmp_path, where, capsys):
    if where == "under_a_file":
        (tmp_path / "a-file").write_text("not a directory")
        storage, reason = tmp_path / "a-file" / "store", "is a file, not a directory"
    else:
        storage = unwritable_dir(tmp_path) / "sslray-store"
        reason = "is not writable"
    path = write_study(tmp_path, storage)
    listing = sorted(tmp_path.rglob("*"))
    line = run_cli_expecting_usage_error(["run", path], capsys)
    assert line.startswith(f"sslray: error: {path}: storage: {storage}") and reason in line, line
    assert not storage.exists() and sorted(tmp_path.rglob("*")) == listing  # nothing created, no probe left


def test_full_disk_is_refused_before_anything_starts(tmp_path, monkeypatch, capsys):
    import shutil as real_shutil

    usage = real_shutil.disk_usage(tmp_path)
    monkeypatch.setattr(real_shutil, "disk_usage", lambda p: usage._replace(free=10 << 20))  # what a full disk says
    storage = tmp_path / "store"
    path = write_study(tmp_path, storage)
    line = run_cli_expecting_usage_error(["run", path], capsys)
    assert line == (f"sslray: error: {path}: storage: {storage} has 10 MiB free; a study needs at least 100 MiB for "
                    "its checkpoints and results")
    assert not storage.exists()


def _limit_file_size(limit: int):
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


@pytest.mark.slow
def test_disk_filling_up_during_training_leaves_no_partial_file(tmp_path):
    """RLIMIT_FSIZE makes every write past 64 KiB fail with EFBIG, as a full disk fails them with ENOSPC: the split
    files fit, the checkpoint (~170 KB) does not."""
    cfg = {"data": {"crop_size": 32, "batch_size_x": 4, "batch_size_u": 4, "partition": "4",
                    "synthetic": {"size": 32, "num_train": 24, "num_val": 6}},
           "model": {"name": "small", "width": 8}, "train": {"iterations": 2, "eval_every": 2}, "run": {"threads": 1}}
    (tmp_path / "trial.yaml").write_text(yaml.safe_dump(cfg))
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "sslray", "train", str(tmp_path / "trial.yaml"), "--out", str(out),
                           "--quiet"], env=ENV, capture_output=True, text=True, timeout=600,
                          preexec_fn=_limit_file_size(64 << 10))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    ckpt = out / "checkpoint" / "state.pt"
    assert proc.stderr.strip() == f"sslray: error: OSError: [Errno 27] cannot write checkpoint {ckpt}: File too large"
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert files == ["splits/labeled.txt", "splits/unlabeled.txt"], files  # no temp file, no half checkpoint


def test_store_write_on_a_full_disk_names_the_file_and_leaves_nothing(tmp_path):
    code = textwrap.dedent(f"""
        from sslray.results import ResultsStore
        row = {{"study": "full", "trial_id": {hex_id(7)!r}, "status": "ok", "val/miou": 1.0}}
        history = [{{"iteration": i, "val/miou": float(i), "note": "x" * 40}} for i in range(20000)]
        ResultsStore({str(tmp_path / 'store')!r}).write(row, history)
    """)
    proc = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True, timeout=300,
                          preexec_fn=_limit_file_size(64 << 10))
    assert proc.returncode == 1
    hist = tmp_path / "store" / "history" / f"{hex_id(7)}.parquet"
    assert proc.stderr.strip().splitlines()[-1] == f"OSError: [Errno 27] cannot write {hist}: File too large"
    assert [p for p in (tmp_path / "store").rglob("*") if p.is_file()] == []
