"""The store on any pyarrow filesystem: local paths and a real S3 server (moto's server mode, over HTTP).

Snapshots (a compacted copy of many rows) must only ever save reads: rows of changed objects are read again,
concurrent compactions lose nothing, an unreadable snapshot is skipped and reported. Object-store faults (wrong
endpoint, no bucket, server gone) fail in one line that names the object and carries no credential.
"""
import dataclasses
import os
import uuid
from types import SimpleNamespace

import pyarrow.fs as pafs
import pytest

from sslray import cli, results
from sslray.config import ConfigError
from sslray.results import ResultsStore, make_row
from sslray.storage import SNAPSHOTS, StoreIOError, StudyStorage
from sslray.study import load_study
from test_results import SMOKE

SECRET = "sEcReT-0123456789-do-not-print"
BUCKET = "sslray-test"


def start_moto():
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    return server, f"http://{host}:{port}"


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server in this process; credentials and endpoint in the environment, as a user would set them."""
    server, endpoint = start_moto()
    env = {"AWS_ACCESS_KEY_ID": "AKIATESTKEYID", "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": endpoint}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    host = endpoint.split("://")[1]
    pafs.S3FileSystem(endpoint_override=host, scheme="http", allow_bucket_creation=True).create_dir(BUCKET)
    yield SimpleNamespace(server=server, endpoint=endpoint)
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    server.stop()


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "store")
    request.getfixturevalue("s3")
    return f"s3://{BUCKET}/{uuid.uuid4().hex[:8]}/study"


@pytest.fixture(scope="module")
def trial():
    return load_study(str(SMOKE)).trials()[0]


def row(trial, seed, status="ok", miou=40.0):
    cfg = dataclasses.replace(trial.config, seed=seed)
    metrics = {"iteration": 4, "val/miou": miou} if status == "ok" else None
    return make_row("smoke", trial.point, cfg, status, metrics, None if status == "ok" else "boom", 1.0, "cpu")


def snapshots(store: ResultsStore, kind="results") -> list[str]:
    return [i.base_name for i in store.storage.list_files(f"{SNAPSHOTS}/{kind}")]


def test_snapshot_serves_unchanged_rows_and_newer_objects_are_read(root, trial, monkeypatch):
    monkeypatch.setattr(results, "COMPACT_MIN", 3)
    store = ResultsStore(root)
    rows = [row(trial, 0, "failed")] + [row(trial, s) for s in (1, 2, 3)]
    for r in rows:
        store.write(r, [{"iteration": 2, "val/miou": 1.0}])
    first = store.load()
    assert store.stats == {"objects": 4, "from_snapshots": 0, "read_one_by_one": 4, "snapshots": 0}
    assert len(snapshots(store)) == 1
    store.write(row(trial, 4))  # newer than the snapshot
    store.write(row(trial, 0, "ok", miou=55.0))  # the failed trial re-run: its object changed
    again = ResultsStore(root)
    df = again.load()
    assert again.stats["from_snapshots"] == 3 and again.stats["read_one_by_one"] == 2
    assert len(df) == 5 and set(df["status"]) == {"ok"} and df["trial_id"].is_unique
    assert df.set_index("trial_id").loc[rows[0]["trial_id"], "val/miou"] == 55.0
    assert list(df["trial_id"]) == sorted(df["trial_id"])
    assert set(first.columns) <= set(df.columns) and not any(c.startswith("_object.") for c in df.columns)
    hist = again.load_history()  # the re-run has no history: the failed attempt's history is gone
    assert len(hist) == 3 and rows[0]["trial_id"] not in set(hist["trial_id"])
    plain = ResultsStore(root, snapshots=False).load()
    assert plain.sort_index(axis=1).equals(df.sort_index(axis=1))  # snapshots change speed, never rows


def test_concurrent_compactions_lose_and_duplicate_nothing(root, trial):
    import threading

    for s in range(4):
        ResultsStore(root).write(row(trial, s))
    barrier = threading.Barrier(3)
    errors = []

    def compact():
        try:
            barrier.wait()
            ResultsStore(root).compact()
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=compact) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    store = ResultsStore(root)
    df = store.load()
    assert len(df) == 4 and df["trial_id"].is_unique and store.stats["read_one_by_one"] == 0
    store.load()
    assert len(snapshots(store)) == 1  # several snapshots are merged into one by the next load


def test_truncated_snapshot_is_ignored_and_reported(root, trial, capsys):
    store = ResultsStore(root)
    for s in range(3):
        store.write(row(trial, s))
    store.compact()
    (name,) = snapshots(store)
    key = f"{SNAPSHOTS}/results/{name}"
    data = store.storage.read_bytes(key)
    store.storage.write_object(key, lambda f: f.write(data[: len(data) // 2]))
    again = ResultsStore(root)
    assert len(again.load()) == 3 and again.stats["read_one_by_one"] == 3
    assert len(again.notes) == 1 and again.notes[0].startswith(f"{store.storage.display(key)}: unreadable snapshot")


def test_cli_reports_a_truncated_snapshot_in_one_line(tmp_path, trial, capsys):
    storage = tmp_path / "store"
    store = ResultsStore(storage)
    store.write(row(trial, 0))
    store.compact()
    snap = next((storage / SNAPSHOTS / "results").iterdir())
    snap.write_bytes(snap.read_bytes()[:100])
    assert cli.main(["status", str(SMOKE), "--storage", str(storage)]) == 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert err.startswith(f"sslray: warning: {snap}: unreadable snapshot ignored (its rows are read from the trial "
                          "objects): "), err


# --------------------------------------------------------------------------------------------------
# object-store faults: one line, the object named, no credential


def test_wrong_endpoint_or_bucket_is_refused_in_one_line_without_secrets(s3, monkeypatch):
    with pytest.raises(ConfigError) as e:
        StudyStorage("s3://no-such-bucket-sslray/p").check("study.yaml")
    assert str(e.value).startswith("study.yaml: storage: s3://no-such-bucket-sslray/p cannot be written: ")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    with pytest.raises(ConfigError) as e2:
        StudyStorage(f"s3://{BUCKET}/p").check("study.yaml")
    with pytest.raises(ConfigError) as e3:
        StudyStorage(f"s3://AKIATESTKEYID:{SECRET}@{BUCKET}/p").check("study.yaml")
    assert "credentials in the storage URI are refused" in str(e3.value)
    with pytest.raises(ConfigError, match="unknown option 'secret_key'"):
        StudyStorage(f"s3://{BUCKET}/p?secret_key={SECRET}").check("study.yaml")
    for err in (e, e2, e3):
        text = str(err.value)
        assert "\n" not in text and SECRET not in text and "AKIATESTKEYID" not in text, text


def test_store_server_gone_fails_in_one_line_naming_the_object_and_keeps_rows(s3, trial, monkeypatch, capsys):
    server, endpoint = start_moto()
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    host = endpoint.split("://")[1]
    pafs.S3FileSystem(endpoint_override=host, scheme="http", allow_bucket_creation=True).create_dir(BUCKET)
    root = f"s3://{BUCKET}/gone"
    store = ResultsStore(root)
    store.write(row(trial, 0))
    server.stop()
    r = row(trial, 1)
    with pytest.raises(StoreIOError) as e:
        ResultsStore(root).write(r)
    text = str(e.value)
    assert text.startswith(f"cannot read {root}/results/{r['trial_id']}.parquet: ") and "\n" not in text
    assert SECRET not in text
    code = cli.main(["status", str(SMOKE), "--storage", root])
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1 and err.startswith(f"sslray: error: StoreIOError: cannot list "
                                                                        f"{root}/results: ") and SECRET not in err
    from moto.server import ThreadedMotoServer

    port = int(endpoint.rsplit(":", 1)[1])
    again = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)  # the same server, back
    again.start()
    try:
        assert list(ResultsStore(root).load()["trial_id"]) == [row(trial, 0)["trial_id"]]  # nothing stored lost
        ResultsStore(root).write(r)  # the retry writes again, whole
        assert len(ResultsStore(root).load()) == 2
    finally:
        again.stop()
