"""What a result row holds, readable without the code: Arrow lists/structs for nested data, units in the field
metadata, one wall time, UTC timestamps, history rows with the cell keys; load_results / sslray export across
studies; a plain pandas read keeps every column."""
import datetime
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from sslray import cli, load_results
from sslray.results import ResultsStore, make_row, nested, unit_of
from sslray.study import load_study

SMOKE = Path(__file__).resolve().parent.parent / "studies" / "smoke.yaml"
METRICS = {"iteration": 4, "val/miou": 41.25, "val/iou/background": 90.0, "best/val/miou": 42.0, "best/iteration": 2,
           "train/loss": 0.75, "train/mask_ratio": 0.4, "time/wall_s": 12.5, "val/confusion": [[5, 1], [2, 7]],
           "val/per_image": {"inter": [[1, 2], [3, 4]], "union": [[2, 2], [4, 4]]}}
HISTORY = [{"iteration": 2, "val/miou": 42.0, "time/wall_s": 6.0}, {"iteration": 4, "val/miou": 41.25,
                                                                     "time/wall_s": 12.5}]


def row(t, study="smoke"):
    extra = {"gpus": 0, "cpus": 1, "split_sha256": {"labeled.txt": "ab" * 32, "unlabeled.txt": "cd" * 32},
             "started_at": 1_780_000_000.0, "rerun": "sslray train x.yaml"}
    return make_row(study, t.point, t.config, "ok", METRICS, None, 30.0, "cpu", extra)


@pytest.fixture(scope="module")
def trials():
    return load_study(str(SMOKE)).trials()  # supervised, fixmatch


def test_schema_of_a_result_row(tmp_path, trials):
    store = ResultsStore(tmp_path)
    path = store.write(row(trials[1]), HISTORY)
    schema = pq.read_schema(path)
    assert schema.field("val/confusion").type == pa.list_(pa.list_(pa.int64()))
    assert schema.field("val/per_image").type == pa.struct([("inter", pa.list_(pa.list_(pa.float64()))),
                                                            ("union", pa.list_(pa.list_(pa.float64())))])
    assert pa.types.is_struct(schema.field("versions").type)
    assert schema.field("split_sha256").type == pa.list_(pa.struct([("file", pa.string()), ("sha256", pa.string())]))
    for col in ("created_at", "started_at"):  # one kind of timestamp
        assert schema.field(col).type == pa.timestamp("ms", tz="UTC")
    assert "time/wall_s" not in schema.names and schema.field("wall_s").type == pa.float64()  # one wall time
    meta = {n: schema.field(n).metadata or {} for n in schema.names}
    assert meta["val/miou"][b"unit"] == b"percent (0-100)" and meta["val/iou/background"][b"unit"] == b"percent (0-100)"
    assert meta["train/mask_ratio"][b"unit"] == b"ratio (0-1)" and meta["wall_s"][b"unit"] == b"seconds"
    assert b"null when the trial's method lacks the term" in meta["cfg.method.terms.pcr_x.num_protos"][b"doc"]
    assert b"sslray.schema" in schema.metadata
    assert unit_of("best/val/miou") == ("percent (0-100)", "best val/miou over the evaluations")
    ok = store.load().iloc[0]
    assert nested(ok["val/confusion"]) == [[5, 1], [2, 7]]
    assert nested(ok["val/per_image"]) == {"inter": [[1.0, 2.0], [3.0, 4.0]], "union": [[2.0, 2.0], [4.0, 4.0]]}
    assert nested(ok["split_sha256"]) == {"labeled.txt": "ab" * 32, "unlabeled.txt": "cd" * 32}
    assert ok["started_at"] == pd.Timestamp(datetime.datetime.fromtimestamp(1_780_000_000, datetime.timezone.utc))
    assert nested('{"a": 1}') == {"a": 1}  # stores from before: JSON text reads the same


def test_history_rows_carry_the_cell_keys(tmp_path, trials):
    store = ResultsStore(tmp_path)
    store.write(row(trials[1]), HISTORY)
    hist = store.load_history()
    assert list(hist["time/wall_s"]) == [6.0, 12.5] and "val/confusion" not in hist.columns
    assert set(hist["cfg.method.name"]) == {"fixmatch"} and set(hist["seed"]) == {0}
    assert set(hist["cfg.data.partition"]) == {trials[1].config.data.partition}


def test_plain_pandas_read_keeps_every_column(tmp_path, trials):
    store = ResultsStore(tmp_path)
    store.write(make_row("smoke", trials[0].point, trials[0].config, "failed", None, "nan", 1.0, "cpu"))
    store.write(row(trials[1]), HISTORY)
    plain = pd.read_parquet(tmp_path / "results")
    assert set(plain.columns) == set(store.load().columns)
    assert {"val/per_image", "split_sha256", "started_at", "cfg.method.terms.u_s1.weight"} <= set(plain.columns)


def test_load_results_and_export_across_two_studies(tmp_path, trials, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ResultsStore(tmp_path / "runs" / "smoke").write(row(trials[0]))
    other = yaml.safe_load(SMOKE.read_text()) | {"name": "other", "seeds": [3], "storage": "runs/other"}
    (tmp_path / "other.yaml").write_text(yaml.safe_dump(other))
    t = load_study(str(tmp_path / "other.yaml")).trials()[1]
    ResultsStore(tmp_path / "runs" / "other").write(row(t, "other"), HISTORY)
    df = load_results("runs/*")
    assert sorted(df["study"]) == ["other", "smoke"] and df["storage"].nunique() == 2
    by_file = load_results([str(tmp_path / "other.yaml"), "runs/smoke"])
    assert sorted(by_file["trial_id"]) == sorted(df["trial_id"])
    assert list(load_results("other.yaml", history=True)["iteration"]) == [2, 4]
    with pytest.raises(FileNotFoundError, match="runs/typo"):
        load_results("runs/typo")
    assert cli.main(["export", "runs/*", "--out", "all.parquet"]) == 0
    assert "wrote 2 trial rows of 2 storage(s)" in capsys.readouterr().out
    back = pd.read_parquet("all.parquet")
    assert len(back) == 2 and nested(back["val/confusion"].iloc[0]) == [[5, 1], [2, 7]]
    assert cli.main(["export", "runs/none*", "--out", "x.csv"]) == 1
    assert "no study storage or study file matches" in capsys.readouterr().err
