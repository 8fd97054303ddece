"""``sslray run --reuse-from DIR``: finished trials of another study's storage with the same trial id are copied,
with provenance, instead of trained again (real Parquet stores; the run needs no Ray when everything is reused)."""
import pandas as pd
import pyarrow.parquet as pq
import yaml

from sslray import cli
from sslray.results import ResultsStore, make_row
from sslray.reuse import reuse_trials
from sslray.storage import StudyStorage
from sslray.study import load_study

BASE = {"model": {"width": 8}, "train": {"iterations": 4, "eval_every": 2}}


def _study(tmp_path, name: str, seeds) -> str:
    p = tmp_path / f"{name}.yaml"
    p.write_text(yaml.safe_dump({"name": name, "base": BASE, "grid": {"method.name": ["supervised"]},
                                 "seeds": list(seeds), "report": {"rows": "method.name"}}))
    return str(p)


def _store_trials(study, root, statuses) -> None:
    store = ResultsStore(root)
    for t, status in zip(study.trials(), statuses):
        metrics = {"val/miou": 40.0 + t.seed, "iteration": 4, "val/confusion": [[3, 1], [0, 5]]} \
            if status == "ok" else None
        row = make_row(study.name, t.point, t.config, status, metrics, None if status == "ok" else "boom", 1.0, "cpu")
        store.write(row, [{"iteration": 2, "val/miou": 30.0}, {"iteration": 4, "val/miou": 40.0 + t.seed}]
                    if status == "ok" else None)


def test_reuse_takes_ok_rows_with_the_same_id_and_says_where_from(tmp_path):
    old = load_study(_study(tmp_path, "old", [0, 1, 2]))
    _store_trials(old, tmp_path / "old_store", ["ok", "failed", "ok"])
    new = load_study(_study(tmp_path, "new", [0, 1]))  # another study: seeds 0 and 1 are the same trials
    taken = reuse_trials(new.trials(), tmp_path / "old_store", StudyStorage(tmp_path / "new_store"), "new")
    assert taken == [new.trials()[0].trial_id]  # seed 1 failed there: trained again here, not copied
    df = ResultsStore(tmp_path / "new_store").load()
    assert list(df["study"]) == ["new"] and list(df["reused_study"]) == ["old"]
    assert list(df["reused_from"]) == [str((tmp_path / "old_store").resolve())]
    assert list(df["val/miou"]) == [40.0]
    copied = pq.read_table(StudyStorage(tmp_path / "new_store").result_file(taken[0]))
    original = pq.read_table(StudyStorage(tmp_path / "old_store").result_file(taken[0]))
    assert copied.column("val/confusion").to_pylist() == [[[3, 1], [0, 5]]]  # nested values keep their type
    assert copied.schema.field("val/miou").metadata == original.schema.field("val/miou").metadata  # units kept
    hist = pd.read_parquet(StudyStorage(tmp_path / "new_store").history_file(taken[0]))
    assert list(hist["val/miou"]) == [30.0, 40.0] and set(hist["study"]) == {"new"}
    # taken again: nothing (already here)
    assert reuse_trials(new.trials(), tmp_path / "old_store", StudyStorage(tmp_path / "new_store"), "new") == []


def test_run_reuse_from_fills_the_study_without_training(tmp_path, capsys):
    old = load_study(_study(tmp_path, "old", [0, 1]))
    _store_trials(old, tmp_path / "old_store", ["ok", "ok"])
    path = _study(tmp_path, "new", [0, 1])
    argv = ["run", path, "--storage", str(tmp_path / "new_store"), "--reuse-from", str(tmp_path / "old_store")]
    assert cli.main(argv + ["--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "2 trial(s) would be reused" in out and not (tmp_path / "new_store").exists()
    assert cli.main(argv) == 0  # everything reused: the run trains nothing (no Ray started)
    out = capsys.readouterr().out
    assert "reused 2 finished trial(s)" in out and "| supervised |" in out
    assert len(ResultsStore(tmp_path / "new_store").load()) == 2
    assert cli.main(["run", path, "--reuse-from", str(tmp_path / "nowhere"), "--dry-run"]) != 0
    assert "--reuse-from: no such directory" in capsys.readouterr().err
