"""Empty and wrong is not success: status / table / plot on a storage without this study's results, --storage under
the rules of storage:, and run --dry-run making the checks the real run makes (exit codes and one-line messages)."""
import pytest
import yaml

from sslray import cli
from sslray.results import ResultsStore, make_row
from sslray.study import load_study

STUDY = {
    "name": "honest",
    "base": {"data": {"crop_size": 32, "batch_size_x": 4, "batch_size_u": 4, "partition": "4",
                      "synthetic": {"size": 32, "num_train": 24, "num_val": 6}},
             "model": {"name": "small", "width": 8}, "train": {"iterations": 4, "eval_every": 2}},
    "grid": {"method.name": ["supervised", "fixmatch"]},
    "seeds": [0],
    "resources": {"workers": 1, "cpus_per_worker": 1, "gpus_per_worker": 0},
}


def write(tmp_path, d, name="study.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(d))
    return str(path)


def run(capsys, *argv):
    rc = cli.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize("command", ["status", "table", "plot"])
def test_mistyped_storage_is_one_line_and_exit_1(tmp_path, capsys, command):
    path = write(tmp_path, STUDY)
    wrong = tmp_path / "run" / "honest"
    rc, out, err = run(capsys, command, path, "--storage", str(wrong))
    assert rc == cli.EXIT_FAILED
    assert out == "" and len(err.strip().splitlines()) == 1
    assert "no results of study 'honest' found" in err and f"{wrong} does not exist" in err


def test_storage_of_another_study_says_what_it_holds(tmp_path, capsys):
    other = load_study(write(tmp_path, {**STUDY, "name": "other", "seeds": [5]}, "other.yaml"))
    storage = tmp_path / "shared"
    t = other.trials()[0]
    ResultsStore(storage).write(make_row("other", t.point, t.config, "ok", {"val/miou": 10.0}, None, 1.0, "cpu"))
    for command in ("status", "table"):
        rc, out, err = run(capsys, command, write(tmp_path, STUDY), "--storage", str(storage))
        assert rc == cli.EXIT_FAILED and out == ""
        assert f"{storage / 'results'} holds 1 row(s) of other trials or studies" in err


@pytest.mark.parametrize("bad, message", [("../elsewhere", "climbs out with '..'"), ("afile", "is a file, not a "
                                                                                              "storage directory")])
@pytest.mark.parametrize("command", ["status", "table", "run"])
def test_storage_on_the_command_line_obeys_the_study_rules(tmp_path, capsys, monkeypatch, bad, message, command):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("not a directory")
    extra = ["--dry-run"] if command == "run" else []
    rc, out, err = run(capsys, command, write(tmp_path, STUDY), "--storage", bad, *extra)
    assert rc == cli.EXIT_USAGE
    assert err.startswith(f"sslray: error: --storage: {bad!r} {message}")
    assert len(err.strip().splitlines()) == 1


def test_study_storage_that_is_a_file_is_refused_at_load(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "results.txt").write_text("x")
    rc, _, err = run(capsys, "status", write(tmp_path, {**STUDY, "storage": "results.txt"}))
    assert rc == cli.EXIT_USAGE and "storage: 'results.txt' is a file" in err


def test_dry_run_prints_plan_checks_and_forecast(tmp_path, capsys):
    path = write(tmp_path, STUDY)
    storage = tmp_path / "store"
    rc, out, err = run(capsys, "run", path, "--storage", str(storage), "--dry-run", "--num-cpus", "2")
    assert rc == cli.EXIT_OK, err
    assert "2 to run, 0 already stored" in out and "nothing of this study is stored" in out
    assert "checks passed: storage usable; one trial fits this machine (2 CPU" in out
    assert "forecast: unknown until a trial of this study has finished" in out
    assert not storage.exists()  # the dry run creates nothing
    study = load_study(path)
    t = study.trials()[0]
    ResultsStore(storage).write(make_row("honest", t.point, t.config, "ok", {"val/miou": 10.0}, None, 600.0, "cpu"))
    rc, out, err = run(capsys, "run", path, "--storage", str(storage), "--dry-run", "--num-cpus", "2")
    assert rc == cli.EXIT_OK
    assert "1 to run, 1 already stored" in out
    assert "forecast: 1 trials x 10.0 min (mean of 1 finished) = 0.17 trial-hours" in out
    assert "0.00 GPU-hours" in out


def test_dry_run_refuses_what_the_real_run_refuses(tmp_path, capsys):
    big = {**STUDY, "resources": {"workers": 1, "cpus_per_worker": 64}}
    rc, out, err = run(capsys, "run", write(tmp_path, big), "--dry-run", "--num-cpus", "2",
                       "--storage", str(tmp_path / "s"))
    assert rc == cli.EXIT_USAGE and out == ""
    assert "resources: one trial needs 64 CPU (1 workers) but the cluster has 2" in err
    (tmp_path / "file").write_text("x")
    rc, out, err = run(capsys, "run", write(tmp_path, STUDY), "--dry-run", "--storage", str(tmp_path / "file" / "s"))
    assert rc == cli.EXIT_USAGE and "is a file, not a directory" in err


def test_dry_run_checks_dataset_roots_on_disk(tmp_path, capsys):
    pascal = {**STUDY, "base": {**STUDY["base"], "data": {"dataset": "pascal", "root": str(tmp_path / "VOC2012"),
                                                         "partition": "92"}}}
    rc, out, err = run(capsys, "run", write(tmp_path, pascal), "--dry-run", "--storage", str(tmp_path / "s"))
    assert rc != cli.EXIT_OK and out == ""
    assert str(tmp_path / "VOC2012") in err and len(err.strip().splitlines()) == 1
