"""StudyStorage and the one atomic write; the commands that must work without Ray; the trial spec a Ray trial gets."""
import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sslray import cli
from sslray.results import ResultsStore, make_row
from sslray.storage import StudyStorage, atomic_write, atomic_write_text
from sslray.study import load_study

ROOT = Path(__file__).resolve().parents[1]
TINY_BASE = {"data": {"crop_size": 32, "batch_size_x": 4, "batch_size_u": 4, "partition": "4",
                      "synthetic": {"size": 32, "num_train": 24, "num_val": 6}},
             "model": {"name": "small", "width": 8}, "train": {"iterations": 4, "eval_every": 2},
             "run": {"threads": 1}}


def write_study(tmp_path, d, name="study.yaml") -> str:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(d, sort_keys=False))
    return str(p)


def test_layout_is_built_in_one_place(tmp_path):
    s = StudyStorage(tmp_path)
    tid = "ab" * 32
    assert s.result_file(tid) == tmp_path / "results" / f"{tid}.parquet"
    assert s.history_file(tid) == tmp_path / "history" / f"{tid}.parquet"
    assert s.trial_config(tid) == tmp_path / "trials" / tid / "config.yaml"
    assert s.checkpoint_file(tid) == tmp_path / "trials" / tid / "checkpoint" / "state.pt"
    assert [s.ray_tune_dir, s.ray_train_dir, s.wandb_dir, s.plots_dir] == [
        tmp_path / d for d in ("ray_tune", "ray_train", "wandb", "plots")]
    assert ResultsStore(tmp_path).path(tid) == s.result_file(tid)
    assert not s.started(tid) and s.split_sha256(tid) is None


def test_atomic_write_keeps_the_old_file_when_a_write_fails(tmp_path):
    path = tmp_path / "d" / "x.json"
    atomic_write_text(path, "old")

    def half_then_fail(f):
        f.write(b"ne")
        raise RuntimeError("writer broke")

    with pytest.raises(RuntimeError, match="writer broke"):
        atomic_write(path, half_then_fail)
    assert path.read_text() == "old" and os.listdir(path.parent) == ["x.json"]  # no temp file left

    def disk_full(f):
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError, match=rf"^\[Errno {errno.ENOSPC}\] cannot write summary {path}: No space left"):
        atomic_write(path, disk_full, what="summary")
    assert path.read_text() == "old" and os.listdir(path.parent) == ["x.json"]


def test_dry_run_and_status_do_not_import_ray(tmp_path):
    """``sslray run --dry-run`` and ``sslray status`` read the study and the store only: no Ray in the process."""
    path = write_study(tmp_path, {"name": "noray", "base": TINY_BASE, "seeds": [0, 1],
                                  "storage": str(tmp_path / "store")})
    code = ("import sys; from sslray.cli import main; "
            f"assert main(['run', {path!r}, '--dry-run']) == 0; "
            f"assert main(['status', {path!r}]) == 1; "  # nothing stored yet: one line, exit 1
            "assert 'ray' not in sys.modules, sorted(m for m in sys.modules if m.startswith('ray'))[:5]")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "2 to run, 0 already stored" in proc.stdout and "no results of study 'noray' found" in proc.stderr
    assert not (tmp_path / "store").exists()  # planning creates nothing


def test_status_with_set_shows_the_trials_of_a_run_with_set(tmp_path, capsys):
    """A study run with --set has other trial ids than the file alone; status --set finds them."""
    store = tmp_path / "store"
    path = write_study(tmp_path, {"name": "withset", "base": TINY_BASE, "seeds": [0, 1], "storage": str(store)})
    over = ["train.iterations=6"]
    for t in load_study(path, over).trials():
        ResultsStore(store).write(make_row("withset", t.point, t.config, "ok", {"val/miou": 10.0}, None, 1.0, "cpu"))
    assert cli.main(["status", path, "--set", over[0]]) == 0
    assert "2 done, 0 failed, 0 started, 0 missing" in capsys.readouterr().out
    assert cli.main(["status", path]) == 1  # without it: other ids, none stored, and status says so
    assert "holds 2 row(s) of other trials or studies" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["run", "status", "table", "plot"])
def test_every_study_command_takes_the_shared_arguments(command):
    args = cli._parser().parse_args([command, "s.yaml", "--storage", "d", "--set", "a.b=1", "--plugin", "m"])
    assert (args.study, args.storage, args.overrides, args.plugins) == ("s.yaml", "d", ["a.b=1"], ["m"])


def test_a_search_trial_spec_resolves_without_the_study_file(tmp_path):
    """Search trials get the study's base dict (with --set) in their TrialSpec: the file may be gone on the node."""
    pytest.importorskip("ray")
    from sslray import ray_adapter

    path = write_study(tmp_path, {"name": "srch", "base": {**TINY_BASE, "method": {"name": "fixmatch"}},
                                  "search": {"sampler": "random", "num_samples": 2,
                                             "space": {"optim.lr": {"loguniform": [1.0e-3, 1.0e-1]}}}})
    study = load_study(path, ["train.iterations=6"])
    spec = ray_adapter._search_setup(study, ray_adapter.TrialSpec(study=study.name, storage=str(tmp_path)), 1)[0]
    spec = spec["sslray"]
    os.remove(path)
    cfg, cell = spec.resolve({"optim.lr": 0.01})
    assert cfg == study.trial_from_params({"optim.lr": 0.01}, 0) and cfg.train.iterations == 6
    assert cell == {"optim.lr": 0.01, "seed": 0}
    assert repr(spec) == "TrialSpec(srch search)"  # Tune names trial directories after it
