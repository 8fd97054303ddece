"""Study files that say what papers need: paired grid axes, ``train.epochs`` as UniMatch counts them, and plans
that are refused before they are expanded when they exceed ``max_trials``."""
import time
import tracemalloc

import pytest

from sslray import cli
from sslray.study import load_study
from test_study import error_of, write

HEAD = "name: t\nbase: {model: {width: 8}, train: {iterations: 20, eval_every: 10}}\n"
PAIRED = HEAD + """grid:
  method.name: [supervised, fixmatch]
  data.partition:
    - {data.partition: "16", train.iterations: 40}
    - {data.partition: "32", train.iterations: 80, optim: {lr: 0.02}}
seeds: [0, 1]
report: {rows: method.name, cols: data.partition}
"""




# --------------------------------------------------------------------------------------------------
# paired axes


def test_paired_axis_carries_each_values_settings_and_keeps_the_partition_as_the_column(tmp_path, capsys):
    study = load_study(write(tmp_path, PAIRED))
    trials = study.trials()
    assert len(trials) == 2 * 2 * 2 and study.plan_size() == 8
    assert study.grid == {"method.name": ["supervised", "fixmatch"], "data.partition": ["16", "32"]}
    for t in trials:  # the point is the column value alone; the entry's other keys are in the config
        assert set(t.point) == {"method.name", "data.partition"}
        part = t.point["data.partition"]
        assert t.config.train.iterations == {"16": 40, "32": 80}[part]
        assert t.config.optim.lr == {"16": 0.01, "32": 0.02}[part]
    assert [t.point["data.partition"] for t in trials[:4]] == ["16", "32", "16", "32"]
    assert cli.main(["run", write(tmp_path, PAIRED), "--dry-run", "--storage", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    assert "table cols: data.partition (2): 16, 32" in out and "table rows: method.name (2)" in out


def test_paired_entries_without_other_keys_plan_the_same_trials_as_a_plain_grid(tmp_path):
    plain = load_study(write(tmp_path, HEAD + "grid:\n  data.partition: ['16', '32']\n  optim.lr: [0.01, 0.02]\n"
                                              "report: {rows: optim.lr, cols: data.partition}\n", "a.yaml"))
    paired = load_study(write(tmp_path, HEAD + "grid:\n  data.partition: ['16', {data.partition: '32'}]\n"
                                               "  optim.lr: [0.01, 0.02]\n"
                                               "report: {rows: optim.lr, cols: data.partition}\n", "b.yaml"))
    assert [t.trial_id for t in plain.trials()] == [t.trial_id for t in paired.trials()]
    assert [t.config.name for t in plain.trials()] == [t.config.name for t in paired.trials()]


def test_paired_axis_composes_with_an_ablation_whose_variant_applies_last(tmp_path):
    text = HEAD + """grid:
  data.partition:
    - {data.partition: "16", optim.lr: 0.02}
    - {data.partition: "32", optim.lr: 0.03}
ablation:
  baseline: full
  variants:
    low_lr: {optim.lr: 0.001}
seeds: [0, 1, 2]
report: {rows: variant, cols: data.partition}
"""
    trials = load_study(write(tmp_path, text)).trials()
    assert len(trials) == 3 * 2 * 2
    lr = {(t.point["data.partition"], t.variant): t.config.optim.lr for t in trials}
    assert lr == {("16", "full"): 0.02, ("32", "full"): 0.03, ("16", "low_lr"): 0.001, ("32", "low_lr"): 0.001}


@pytest.mark.parametrize("grid, message", [
    ("  data.partition: [{optim.lr: 0.02}]\n",
     "grid.data.partition[0]: a paired entry sets the axis key itself, e.g. {data.partition: <value>, <other key>: "
     "<value>}; got {'optim.lr': 0.02}"),
    ("  data.partition: [{data.partition: '16', optim.lr: 0.02}]\n  optim.lr: [0.1]\n",
     "grid.data.partition[0].optim.lr: is also set by the grid axis optim.lr; one key, one axis"),
    ("  data.partition: [{data.partition: '16', optim.lr: 0.02}]\n  method.name: [{method.name: fixmatch, "
     "optim.lr: 0.1}]\n",
     "grid.method.name[0].optim.lr: is also set by the grid axis data.partition; one key, one axis"),
    ("  data.partition: [{data.partition: '16', optim.lr: fast}]\n",
     "grid.data.partition[0].optim.lr: expected a number, got 'fast'"),
    ("  data.partition: [{data.partition: '16', optim.bogus: 1}]\n",
     "grid.data.partition[0].optim.bogus: unknown config key (optim has: lr, head_lr_mult, momentum, weight_decay, "
     "poly_power"),
    ("  data.partition: ['16', {data.partition: '16', optim.lr: 0.02}]\n", "grid.data.partition: lists '16' twice"),
])
def test_bad_paired_axis_is_one_line(tmp_path, grid, message):
    path = write(tmp_path, HEAD + "grid:\n" + grid + "report: {cols: data.partition}\n")
    assert error_of(path).startswith(f"{path}: {message}")


def test_set_overrides_a_paired_entrys_key(tmp_path):
    study = load_study(write(tmp_path, PAIRED), ["train.iterations=5", "train.eval_every=5"])
    assert {t.config.train.iterations for t in study.trials()} == {5}
    assert {t.config.optim.lr for t in study.trials()} == {0.01, 0.02}


# --------------------------------------------------------------------------------------------------
# train.epochs


def _epochs_study(tmp_path, train: str, extra: str = "", base_extra: str = "") -> str:
    return write(tmp_path, f"name: t\nbase: {{model: {{width: 8}}, data: {{partition: '33'{base_extra}}}, "
                           f"method: {{name: fixmatch}}, train: {train}}}\n{extra}")


def test_epochs_count_unimatchs_unlabeled_loader(tmp_path):
    # synthetic pool 2016, 33 labeled -> 1983 unlabeled; batch 8, drop_last: 247 iterations an epoch on one GPU
    c = load_study(_epochs_study(tmp_path, "{epochs: 3}", "grid: {method.name: [fixmatch]}\n")).trials()[0].config
    assert (c.train.iterations, c.train.eval_every) == (3 * 247, 247)
    # UniMatch's 4 GPUs of 2 images: DistributedSampler pads to ceil(1983 / 4) = 496 per GPU -> 248 an epoch
    c = load_study(_epochs_study(tmp_path, "{epochs: 3, epoch_gpus: 4, eval_every: 100}",
                                 "grid: {method.name: [fixmatch]}\n")).trials()[0].config
    assert (c.train.iterations, c.train.eval_every) == (3 * 248, 100)


def test_epochs_of_supervised_count_the_labeled_loader_unless_told(tmp_path):
    # supervised.py: len(trainloader) over the 33 labeled images, batch 8 -> 4 an epoch
    study = load_study(_epochs_study(tmp_path, "{epochs: 10}", "grid: {method.name: [supervised, fixmatch]}\n"
                                                               "report: {rows: method.name}\n"))
    assert [t.config.train.iterations for t in study.trials()] == [40, 2470]
    study = load_study(_epochs_study(tmp_path, "{epochs: 10, epoch_over: unlabeled}",
                                     "grid: {method.name: [supervised]}\n"))
    assert study.trials()[0].config.train.iterations == 2470


def test_epochs_from_split_files_then_published_counts(tmp_path):
    splits = tmp_path / "splits" / "pascal" / "mine"
    splits.mkdir(parents=True)
    (splits / "labeled.txt").write_text("".join(f"JPEGImages/{i}.jpg SegmentationClass/{i}.png\n" for i in range(9)))
    (splits / "unlabeled.txt").write_text("".join(f"JPEGImages/u{i}.jpg\n" for i in range(100)) + "\n")
    text = (f"name: t\nbase: {{data: {{dataset: pascal, root: /nowhere, splits_dir: {tmp_path / 'splits'}, "
            "partition: mine}, method: {name: fixmatch}, train: {epochs: 2}}\n")
    assert load_study(write(tmp_path, text)).base.train.iterations == 2 * (100 // 8)
    # no split file for 183: the published UniMatch count (10,399 unlabeled), 80 epochs on 4 GPUs = 104,000
    text = text.replace("partition: mine", "partition: '183'").replace("{epochs: 2}", "{epochs: 80, epoch_gpus: 4}")
    assert load_study(write(tmp_path, text)).base.train.iterations == 104000


@pytest.mark.parametrize("train, extra, message", [
    ("{epochs: 2, iterations: 100}", "",
     "base.train.epochs: train.epochs and train.iterations are exclusive (the epochs set the iterations); write one"),
    ("{epochs: 0}", "", "base.train.epochs: expected an integer >= 1, got 0"),
    ("{epochs: 2, epoch_over: images}", "",
     "base.train.epoch_over: expected one of auto, unlabeled, labeled, got 'images'"),
    ("{epoch_gpus: 4}", "", "base.train.epoch_gpus: only means something with train.epochs"),
    ("{epochs: 2, epoch_gpus: 3}", "", "base.train.epoch_gpus: 3 GPUs do not divide data.batch_size_u = 8"),
    ("{iterations: 20, eval_every: 10}", "grid:\n  data.partition: [{data.partition: '16', train.epochs: 2, "
                                         "train.iterations: 5}]\n",
     "grid.data.partition[0].train.epochs: train.epochs and train.iterations are exclusive"),
])
def test_bad_epochs_are_one_line(tmp_path, train, extra, message):
    path = _epochs_study(tmp_path, train, extra + ("report: {cols: data.partition}\n" if extra else ""))
    assert error_of(path).startswith(f"{path}: {message}")


def test_a_later_place_may_give_the_length_the_other_way(tmp_path):
    path = _epochs_study(tmp_path, "{epochs: 3}", "grid:\n  data.partition:\n    - {data.partition: '33'}\n"
                                                  "    - {data.partition: '16', train.iterations: 50}\n"
                                                  "report: {cols: data.partition}\n")
    assert [t.config.train.iterations for t in load_study(path).trials()] == [3 * 247, 50]
    assert {t.config.train.iterations for t in load_study(path, ["train.iterations=7"]).trials()} == {7}
    assert error_of(path, ["train.iterations=7", "train.epochs=2"]).endswith(
        "train.epochs: train.epochs and train.iterations are exclusive (the epochs set the iterations); write one")


# --------------------------------------------------------------------------------------------------
# bounded plans


def _huge(tmp_path, n: int = 1000, extra: str = "") -> str:
    axis = ", ".join(str(round(0.001 * (i + 1), 6)) for i in range(n))
    return write(tmp_path, HEAD + f"grid:\n  optim.lr: [{axis}]\n  optim.momentum: [{axis}]\n"
                                  f"  optim.weight_decay: [{axis}]\nseeds: [0, 1]\n{extra}")


def test_an_oversized_plan_is_refused_at_once_with_its_axis_sizes(tmp_path, capsys):
    path = _huge(tmp_path)
    t0 = time.perf_counter()
    message = error_of(path)
    elapsed = time.perf_counter() - t0
    tracemalloc.start()
    error_of(path)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert message == (f"{path}: max_trials: the plan has 2,000,000,000 trials (seeds 2 x grid.optim.lr 1,000 x "
                       "grid.optim.momentum 1,000 x grid.optim.weight_decay 1,000), more than max_trials = 5,000; "
                       "shrink an axis or raise max_trials in the study")
    assert elapsed < 1.0 and peak < 50e6  # generous: refused before anything is built or expanded
    for argv in (["validate", path], ["run", path, "--dry-run"]):
        assert cli.main(argv) != 0
        assert "max_trials: the plan has 2,000,000,000 trials" in capsys.readouterr().err


def test_max_trials_is_settable_and_planning_ten_thousand_trials_is_quick(tmp_path):
    axis = "[" + ", ".join(str(0.001 * (i + 1)) for i in range(100)) + "]"
    text = (HEAD + f"max_trials: 10000\ngrid:\n  optim.lr: {axis}\n  optim.momentum: {axis}\n"
            "report: {rows: optim.lr, cols: optim.momentum}\n")
    t0 = time.perf_counter()
    study = load_study(write(tmp_path, text))
    trials = study.trials()
    elapsed = time.perf_counter() - t0
    assert len(trials) == study.plan_size() == 10000 and len({t.trial_id for t in trials}) == 10000
    assert elapsed < 20  # generous (2 shared cores); benchmarks/plan.py measures it (< 2 s on its own)
    assert error_of(write(tmp_path, text.replace("10000", "9999"), "b.yaml")).endswith(
        "more than max_trials = 9,999; shrink an axis or raise max_trials in the study")
    assert "max_trials: expected an integer >= 1, got 0" in error_of(write(tmp_path, text.replace("10000", "0"),
                                                                             "c.yaml"))
