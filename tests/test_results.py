"""The Parquet results store: round trip, atomic writes, plain pandas reads, bad files named, overwrite rules."""
import json
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import pandas as pd
import pytest

from sslray.results import ResultsStore, StoreError, make_row, nested
from sslray.study import load_study

SMOKE = Path(__file__).resolve().parent.parent / "studies" / "smoke.yaml"
METRICS = {"iteration": 4, "val/miou": 41.25, "val/iou/background": 90.0, "val/iou/stripes": 12.5,
           "best/val/miou": 42.0, "best/iteration": 2, "train/loss": 0.75, "val/confusion": [[5, 1], [2, 7]]}
HISTORY = [{"iteration": 2, "val/miou": 42.0, "train/loss": 0.9}, {"iteration": 4, "val/miou": 41.25}]


@pytest.fixture(scope="module")
def trials():
    return load_study(str(SMOKE)).trials()  # supervised, fixmatch


def ok_row(t, miou=41.25):
    extra = {"gpus": 0.5, "cpus": 2, "split_sha256": {"labeled": "ab", "unlabeled": "cd"},
             "rerun": "sslray run studies/smoke.yaml --resume"}
    return make_row("smoke", t.point, t.config, "ok", {**METRICS, "val/miou": miou}, None, 7200.0, "cuda:0", extra)


def failed_row(t, reason="non-finite loss at iteration 3: term 'u_s1' = nan"):
    return make_row("smoke", t.point, t.config, "failed", None, reason, 3.0, "cpu")


def test_round_trip(tmp_path, trials):
    store = ResultsStore(tmp_path)
    path = store.write(ok_row(trials[0]), HISTORY)
    store.write(failed_row(trials[1]))
    assert path == str(tmp_path / "results" / f"{trials[0].trial_id}.parquet")
    df = store.load().set_index("trial_id")
    ok, failed = df.loc[trials[0].trial_id], df.loc[trials[1].trial_id]
    assert (ok["status"], ok["study"], ok["seed"]) == ("ok", "smoke", 0) and pd.isna(ok["reason"])
    assert (ok["val/miou"], ok["best/iteration"], ok["cfg.method.name"], ok["cfg.model.width"]) == (
        41.25, 2, "supervised", 8)
    assert json.loads(ok["cfg.data.aug.scale"]) == [0.5, 2.0] and nested(ok["val/confusion"]) == [[5, 1], [2, 7]]
    assert json.loads(ok["cell"]) == {"method.name": "supervised"}
    assert (ok["gpu_hours"], ok["cpu_hours"], ok["device"]) == (1.0, 4.0, "cuda:0")
    assert nested(ok["split_sha256"]) == {"labeled": "ab", "unlabeled": "cd"}
    assert ok["rerun"] == "sslray run studies/smoke.yaml --resume"
    assert set(ok["versions"]) >= {"torch", "torchvision", "ray", "optuna", "pandas", "pyarrow", "sslray"}
    assert pd.isna(ok["git_sha"]) or re.fullmatch(r"[0-9a-f]{40}", ok["git_sha"])
    assert isinstance(ok["created_at"], pd.Timestamp) and str(ok["created_at"].tz) == "UTC"
    assert failed["status"] == "failed" and failed["reason"].startswith("non-finite loss")
    assert pd.isna(failed["val/miou"]) and pd.isna(failed["gpu_hours"])
    assert store.ids() == {t.trial_id for t in trials}
    assert store.ids("failed") == {trials[1].trial_id} and store.has(trials[0].trial_id)
    hist = store.load_history()
    assert list(hist["iteration"]) == [2, 4] and list(hist["val/miou"]) == [42.0, 41.25]
    assert hist["train/loss"].iloc[0] == 0.9 and pd.isna(hist["train/loss"].iloc[1])
    assert set(hist["trial_id"]) == {trials[0].trial_id}


def test_plain_pandas_reads_the_directory_with_every_column(tmp_path, trials):
    store = ResultsStore(tmp_path)
    store.write(failed_row(trials[0]))  # a failed supervised trial may well be the first file
    store.write(ok_row(trials[1]), HISTORY)
    plain = pd.read_parquet(tmp_path / "results")
    assert len(plain) == 2 and set(plain.columns) == set(store.load().columns)
    assert {"val/iou/stripes", "cfg.method.terms.u_s1.weight", "train/loss/u_s1"} <= set(plain.columns)
    assert len(pd.read_parquet(tmp_path / "history")) == 2


def test_writes_leave_no_temp_files(tmp_path, trials):
    store = ResultsStore(tmp_path)
    for t in trials:
        store.write(ok_row(t), HISTORY)
    for sub in ("results", "history"):
        assert sorted(os.listdir(tmp_path / sub)) == sorted(f"{t.trial_id}.parquet" for t in trials)


def test_temp_files_of_a_crashed_writer_are_ignored(tmp_path, trials):
    store = ResultsStore(tmp_path)
    store.write(ok_row(trials[0]))
    (tmp_path / "results" / ".tmpab12cd.parquet").write_bytes(b"PAR1 half a file")
    assert len(store.load()) == 1


def test_truncated_file_is_reported_by_name(tmp_path, trials):
    store = ResultsStore(tmp_path)
    good = Path(store.write(ok_row(trials[0])))
    bad = tmp_path / "results" / f"{trials[1].trial_id}.parquet"
    data = good.read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(StoreError, match=rf"^{re.escape(str(bad))}: not a readable Parquet file"):
        store.load()


def test_foreign_file_is_reported_by_name(tmp_path, trials):
    store = ResultsStore(tmp_path)
    store.write(ok_row(trials[0]))
    (tmp_path / "results" / "notes.txt").write_text("hello")
    with pytest.raises(StoreError, match=r"results/notes\.txt: not a results file \(expected <trial id>\.parquet\)"):
        store.load()


def test_parquet_without_required_columns_is_reported(tmp_path, trials):
    store = ResultsStore(tmp_path)
    bad = tmp_path / "results" / f"{'0' * 64}.parquet"
    bad.parent.mkdir(parents=True)
    pd.DataFrame({"val/miou": [1.0]}).to_parquet(bad)
    with pytest.raises(StoreError) as e:
        store.load()
    assert str(e.value) == f"{bad}: missing required column(s) study, trial_id, status"


def test_file_whose_trial_id_is_not_its_name_is_reported(tmp_path, trials):
    store = ResultsStore(tmp_path)
    good = Path(store.write(ok_row(trials[0])))
    copy = good.with_name(f"{'f' * 64}.parquet")
    copy.write_bytes(good.read_bytes())
    with pytest.raises(StoreError, match=re.escape(f"{copy}: expected one row for trial ffffffffffff")):
        store.load()


def test_failed_trial_may_be_overwritten_ok_trial_not(tmp_path, trials):
    store = ResultsStore(tmp_path)
    store.write(failed_row(trials[0]), [{"iteration": 2, "val/miou": 1.0}])
    store.write(ok_row(trials[0], miou=50.0))  # the re-run succeeded
    assert store.load()["val/miou"].tolist() == [50.0]
    assert len(store.load_history()) == 0  # the failed attempt's history went with it
    with pytest.raises(StoreError, match=r"already stored with status 'ok'; only failed trials may be overwritten"):
        store.write(ok_row(trials[0], miou=60.0))
    assert store.load()["val/miou"].tolist() == [50.0]


def test_concurrent_writers_both_land(tmp_path, trials):
    store = ResultsStore(tmp_path)
    barrier, errors = threading.Barrier(2), []

    def work(t):
        try:
            barrier.wait()
            store.write(ok_row(t), HISTORY)
        except Exception as e:  # noqa: BLE001 - reported by the assert below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(t,)) for t in trials]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert errors == [] and store.ids() == {t.trial_id for t in trials}


def test_empty_store_loads_empty(tmp_path):
    store = ResultsStore(tmp_path / "nothing")
    assert len(store.load()) == 0 and store.ids() == set() and not store.has("0" * 64)


def test_bad_rows_are_refused(tmp_path, trials):
    with pytest.raises(ValueError, match="status must be one of"):
        make_row("smoke", trials[0].point, trials[0].config, "done", None, None, 1.0, "cpu")
    row = ok_row(trials[0])
    with pytest.raises(ValueError, match="trial_id must be 64 lowercase hex digits"):
        ResultsStore(tmp_path).write({**row, "trial_id": "../escape"})


def test_results_module_does_not_import_ray():
    code = ("import sys, sslray.results, sslray.report, sslray.study; sslray.results.package_versions(); "
            "assert 'ray' not in sys.modules, 'ray imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
