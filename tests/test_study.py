"""Study files: every shipped study validates, plans expand as documented, and bad files fail with one exact line."""
from pathlib import Path

import pandas as pd
import pytest

from sslray.config import ConfigError, TrialConfig
from sslray.methods import list_methods, list_terms
from sslray.study import MAX_FILE_BYTES, load_study

STUDY_DIR = Path(__file__).resolve().parent.parent / "studies"
STUDIES = sorted(STUDY_DIR.glob("*.yaml"))
HEAD = "name: t\nbase: {model: {width: 8}}\n"


def write(tmp_path, text: str, name: str = "s.yaml") -> str:
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def error_of(path: str, overrides=()) -> str:
    with pytest.raises(ConfigError) as e:
        load_study(path, overrides)
    return str(e.value)


# --------------------------------------------------------------------------------------------------
# shipped studies


@pytest.mark.parametrize("path", STUDIES, ids=lambda p: p.name)
def test_fast_plan_equals_a_full_build_of_every_trial(path):
    """Planning builds each cell once and derives the other seeds (and row_label reads fields off the config):
    the configs, ids, points and labels must be those of building every trial in full (ids key stored results)."""
    from sslray.config import get_dotted
    from sslray.study import cell_label, row_label

    study = load_study(str(path))
    fast = study.trials(unique=False)
    full = [study._plan(cell, seed) for seed in study.seeds for cell in study._cells()]
    assert [(t.trial_id, t.config, t.point, t.variant, t.seed) for t in fast] == \
        [(t.trial_id, t.config, t.point, t.variant, t.seed) for t in full]
    assert all(t.trial_id == t.config.trial_id() for t in fast)
    for key in {study.report.rows, study.report.cols} - {"variant"}:
        assert [row_label(t, key) for t in fast] == [cell_label(get_dotted(t.config.to_dict(), key)) for t in fast]


def test_studies_exist():
    assert {p.name for p in STUDIES} >= {"quickstart.yaml", "smoke.yaml"}


@pytest.mark.parametrize("path", STUDIES, ids=lambda p: p.name)
def test_every_study_file_validates_and_opens_with_its_run_command(path):
    study = load_study(str(path))
    assert path.read_text().splitlines()[0].startswith(f"# sslray run studies/{path.name}")
    trials = study.trials()
    assert trials or study.search is not None
    assert len({t.trial_id for t in trials}) == len(trials)
    assert all(t.config.name.startswith(study.name + "-") for t in trials)


def test_quickstart_plan():
    study = load_study(str(STUDY_DIR / "quickstart.yaml"))
    trials = study.trials()
    assert [(t.point["method.name"], t.seed) for t in trials] == [
        ("supervised", 0), ("fixmatch", 0), ("unimatch", 0), ("supervised", 1), ("fixmatch", 1), ("unimatch", 1)]
    assert {t.config.data.partition for t in trials} == {"32"}
    assert study.report.baseline == "supervised" and study.storage == "runs/quickstart"


# --------------------------------------------------------------------------------------------------
# plan expansion


def test_grid_expands_seeds_outermost_with_stable_distinct_ids(tmp_path):
    path = write(tmp_path, HEAD + "grid:\n  method.name: [supervised, fixmatch, unimatch]\n"
                                  "  data.partition: [16, \"64\"]\nseeds: [0, 1, 2]\n")
    trials = load_study(path).trials()
    assert len(trials) == 18 and len({t.trial_id for t in trials}) == 18
    assert trials[0].point == {"method.name": "supervised", "data.partition": "16"}  # 16 read as a string
    assert [t.seed for t in trials] == [0] * 6 + [1] * 6 + [2] * 6
    assert trials[1].config.name == "t-supervised-64-s0" and trials[-1].config.name == "t-unimatch-64-s2"
    assert all(t.trial_id == t.config.trial_id() and t.config.seed == t.seed for t in trials)
    assert [t.trial_id for t in load_study(path).trials()] == [t.trial_id for t in trials]


def test_ablation_expands_baseline_and_variants(tmp_path):
    path = write(tmp_path, "name: t\nbase: {method: {name: unimatch}}\n"
                 "ablation:\n  variants:\n    \"-fp\": {method.terms.u_fp.weight: 0}\n"
                 "    \"+mse\": {method: {terms: {u_mse: {weight: 100}}}}\nseeds: [0, 1]\n")
    study = load_study(path)
    trials = study.trials()
    assert [(t.variant, t.seed) for t in trials] == [
        ("full", 0), ("-fp", 0), ("+mse", 0), ("full", 1), ("-fp", 1), ("+mse", 1)]
    assert trials[1].config.method.terms["u_fp"].weight == 0.0
    assert trials[2].config.method.terms["u_mse"].weight == 100.0 and "u_mse" not in trials[0].config.method.terms
    assert trials[1].point == {"variant": "-fp"} and trials[1].config.name == "t--fp-s0"
    assert study.report.rows == "variant" and study.report.baseline == "full"  # the ablation defaults


def test_base_term_settings_cannot_silently_add_a_term_to_a_variants_method(tmp_path):
    """Issue 11's PCR ablation trap: base.method.terms.pcr_x/pcr_u settings (no weight) re-added both prototype
    terms at weight 1 to the pcr_base variant, whose row then trained PCR bit for bit. Refused, naming the variant
    and the term; writing the weight (0 here) says what is meant and leaves the terms out."""
    text = ("name: t\nbase:\n  method:\n    name: pcr\n    terms: {pcr_x: {warmup_frac: 0.2}, pcr_u: {warmup_frac: 0.2}}\n"
            "ablation:\n  variants:\n    pcr_base: {method.name: pcr_base%s}\n")
    msg = error_of(write(tmp_path, text % ""))
    assert msg.startswith(f"{tmp_path / 's.yaml'}: ablation.variants.pcr_base.method.name: ")
    assert "method.terms.pcr_x: is not a term of method 'pcr_base'" in msg
    assert "write method.terms.pcr_x.weight (0 to leave it out)" in msg
    fixed = text % ", method.terms.pcr_x.weight: 0, method.terms.pcr_u.weight: 0"
    trials = load_study(write(tmp_path, fixed, "fixed.yaml")).trials()
    base_cfg = trials[1].config.method
    assert trials[1].variant == "pcr_base" and base_cfg.name == "pcr_base"
    assert base_cfg.terms["pcr_x"].weight == 0 and base_cfg.terms["pcr_u"].weight == 0
    plain = TrialConfig.from_dict({"method": {"name": "pcr_base"}}).method
    assert {n for n, t in base_cfg.terms.items() if t.weight > 0} == {n for n, t in plain.terms.items() if t.weight > 0}


def test_a_term_the_preset_lacks_is_added_only_with_its_weight():
    with pytest.raises(ConfigError, match=r"^method\.terms\.u_fp: is not a term of method 'fixmatch' \(its terms: "):
        TrialConfig.from_dict({"method": {"name": "fixmatch", "terms": {"u_fp": {}}}})
    added = TrialConfig.from_dict({"method": {"name": "fixmatch", "terms": {"u_fp": {"weight": 0.5}}}}).method
    assert added.terms["u_fp"].weight == 0.5
    # a term the preset has takes settings alone; an unknown name keeps the error that lists every term
    assert TrialConfig.from_dict({"method": {"name": "unimatch", "terms": {"u_fp": {}}}}).method.terms["u_fp"].weight
    with pytest.raises(ConfigError, match=r"^method\.terms\.u_fpp: unknown loss term"):
        TrialConfig.from_dict({"method": {"name": "fixmatch", "terms": {"u_fpp": {"conf": 1}}}})


def test_three_varied_axes_load_and_tables_refuse_mixed_cells(tmp_path):
    from sslray.report import comparison_table

    path = write(tmp_path, HEAD + "grid: {method.name: [supervised, fixmatch], optim.lr: [0.1, 0.2], "
                                  "data.partition: [\"16\", \"64\"]}\n")
    trials = load_study(path).trials(unique=False)
    assert len(trials) == 8
    with pytest.raises(ValueError, match=r"cell \(supervised, 16\) holds two trials with seed 0"):
        comparison_table(pd.DataFrame(), trials, "method.name", "data.partition")
    lr01 = [t for t in trials if t.config.optim.lr == 0.1]
    assert len(comparison_table(pd.DataFrame(), lr01, "method.name", "data.partition").cells) == 4


def test_grid_times_ablation(tmp_path):
    path = write(tmp_path, "name: t\nbase: {method: {name: unimatch}}\ngrid: {data.partition: [\"16\", \"1_8\"]}\n"
                           "ablation: {baseline: all, variants: {-fp: {method.terms.u_fp.weight: 0}, "
                           "-s2: {method.terms.u_s2.weight: 0}}}\n")
    trials = load_study(path).trials()
    assert [(t.point["data.partition"], t.variant) for t in trials] == [
        ("16", "all"), ("16", "-fp"), ("16", "-s2"), ("1_8", "all"), ("1_8", "-fp"), ("1_8", "-s2")]
    assert len({t.trial_id for t in trials}) == 6


def test_duplicate_trials_are_removed_keeping_the_first(tmp_path):
    # run.* is not part of the trial id: both threads values are the same trial
    path = write(tmp_path, HEAD + "grid: {run.threads: [1, 2]}\nseeds: [0, 1]\n")
    study = load_study(path)
    assert [t.config.run.threads for t in study.trials()] == [1, 1]
    assert len(study.trials(unique=False)) == 4


def test_keys_written_under_base_method_apply_to_every_method(tmp_path):
    path = write(tmp_path, "name: t\nbase: {method: {name: unimatch, conf_thresh: 0.8}}\n"
                           "grid: {method.name: [fixmatch, unimatch]}\n")
    fix, uni = (t.config.method for t in load_study(path).trials())
    assert fix.conf_thresh == uni.conf_thresh == 0.8
    assert set(fix.terms) == {"x", "u_s1"} and set(uni.terms) == {"x", "u_s1", "u_s2", "u_fp"}


def test_overrides_apply_to_base(tmp_path):
    path = write(tmp_path, HEAD + "grid: {method.name: [supervised, fixmatch]}\n")
    study = load_study(path, ["optim.lr=0.2", "train.iterations=7"])
    assert all(t.config.optim.lr == 0.2 and t.config.train.iterations == 7 for t in study.trials())
    assert study.base.model.width == 8
    assert error_of(path, ["optim.lrr=1"]) == (
        f"{path} (--set): optim.lrr: unknown config key (optim has: lr, head_lr_mult, momentum, weight_decay, "
        "poly_power, optimizer)")
    assert error_of(path, ["method.name=unimatch"]) == (
        f"{path} (--set): method.name: is a grid axis of this study; the grid sets it")
    assert error_of(path, ["optim.lr=fast"]) == f"{path} (--set): optim.lr: expected a number, got 'fast'"


# --------------------------------------------------------------------------------------------------
# search


SEARCH = ("name: s\nbase: {method: {name: unimatch}, train: {iterations: 100, eval_every: 10}}\n"
          "search:\n  num_samples: 4\n  scheduler: {type: asha}\n  space:\n"
          "    optim.lr: {loguniform: [1.0e-4, 1.0e-1]}\n    method.terms.u_fp.weight: {uniform: [0.0, 1.0]}\n"
          "    method.conf_thresh: {choice: [0.9, 0.95]}\n    data.batch_size_u: {int: [4, 16, 4]}\n")


def test_search_study(tmp_path):
    study = load_study(write(tmp_path, SEARCH))
    s = study.search
    assert (s.sampler, s.num_samples, s.metric, s.mode, s.seed) == ("tpe", 4, "val/miou", "max", 0)
    assert s.scheduler == {"type": "asha", "grace_period": 1, "reduction_factor": 2, "brackets": 1, "max_t": 10}
    assert study.search_space()["data.batch_size_u"] == {"int": [4, 16, 4]}
    assert study.trials() == []
    cfg = study.trial_from_params({"optim.lr": 0.01, "method.terms.u_fp.weight": 0.3, "data.batch_size_u": 8}, 3)
    assert (cfg.optim.lr, cfg.method.terms["u_fp"].weight, cfg.data.batch_size_u, cfg.seed) == (0.01, 0.3, 8, 3)
    assert cfg.name == f"s-{cfg.short_id()}" and cfg.method.terms["u_s1"].weight == 0.25
    with pytest.raises(ConfigError, match=r"s\.yaml: search\.space\.optim\.lr: expected a number, got 'x'"):
        study.trial_from_params({"optim.lr": "x"}, 0)


# --------------------------------------------------------------------------------------------------
# bad files: (text, the exact message after "<file>: ")

BAD = [
    (HEAD + "bogus: 1\n",
     "bogus: unknown key (expected one of: name, base, grid, ablation, seeds, search, resources, report, storage, "
     "tracking, max_trials)"),
    ("base: {}\n", "name: required: the study name ([A-Za-z0-9_.-]+, used in paths)"),
    ("name: a b\n", "name: expected [A-Za-z0-9_.-]+ not starting with '.' (used in paths), got 'a b'"),
    ("name: ..\n", "name: expected [A-Za-z0-9_.-]+ not starting with '.' (used in paths), got '..'"),
    ("name: t\nbase: {optim: {lrr: 1}}\n",
     "base.optim.lrr: unknown key (expected one of: lr, head_lr_mult, momentum, weight_decay, poly_power, optimizer)"),
    ("name: t\nbase: {seed: 3}\n", "base.seed: set seeds with the top-level 'seeds' list"),
    (HEAD + "grid: {optim.lrr: [1]}\n",
     "grid.optim.lrr: unknown config key (optim has: lr, head_lr_mult, momentum, weight_decay, poly_power, optimizer)"),
    (HEAD + "grid: {optim.lr: [0.1, fast]}\n", "grid.optim.lr: expected a number, got 'fast'"),
    (HEAD + "grid: {optim.lr: 0.1}\n", "grid.optim.lr: expected a non-empty list of values, got 0.1"),
    (HEAD + "grid: {optim.lr: []}\n", "grid.optim.lr: expected a non-empty list of values, got []"),
    (HEAD + "grid: {method.name: [fixmatch, fixmatch]}\n", "grid.method.name: lists 'fixmatch' twice"),
    (HEAD + "grid: {method.name: [supervised, nomethod]}\n",
     f"grid.method.name: unknown method 'nomethod' (expected one of: {', '.join(list_methods())})"),
    (HEAD + "grid: {data.partition: [\"16\", \"5000\"]}\n",
     "grid.data.partition: partition '5000': labeled count must be in 1..2016 (the pool size), got 5000"),
    ("name: t\nbase: {data: {partition: 1_0}}\n",
     "base.data.partition: partition '1_0': expected a count ('16'), a ratio ('1_8') or a fraction ('0.125')"),
    (HEAD + "grid: {seed: [1, 2]}\n", "grid.seed: set seeds with the top-level 'seeds' list"),
    (HEAD + "grid: {method.terms.u_fpp.weight: [0]}\n",
     f"grid.method.terms.u_fpp.weight: unknown loss term 'u_fpp' (known: {', '.join(list_terms())})"),
    (HEAD + "ablation: {variants: {-fp: {method.terms.u_fp.weight: -1}}}\n",
     "ablation.variants.-fp.method.terms.u_fp.weight: expected a non-negative weight, got -1.0"),
    (HEAD + "ablation: {variants: {-fp: {}}}\n",
     "ablation.variants.-fp: expected a non-empty mapping of dotted key -> value, got {}"),
    (HEAD + "ablation: {baseline: full, variants: {full: {optim.lr: 1}}}\n",
     "ablation.variants.full: has the baseline's label"),
    (HEAD + "grid: {optim.lr: [0.1, 0.2]}\nablation: {variants: {fast: {optim.lr: 1}}}\n",
     "ablation.variants.fast.optim.lr: is also a grid axis; a variant may not change it"),
    (HEAD + "ablation: {variant: {}}\n", "ablation.variant: unknown key (expected one of: baseline, variants)"),
    (HEAD + "seeds: []\n", "seeds: expected a non-empty list of non-negative integers, got []"),
    (HEAD + "seeds: [0, -1]\n", "seeds: expected non-negative integers, got -1"),
    (HEAD + "seeds: [0, 1, 0]\n", "seeds: 0 is listed twice"),
    (HEAD + "grid: {optim.lr: [0.1]}\nsearch: {num_samples: 2, space: {optim.lr: {uniform: [0.1, 0.2]}}}\n",
     "search: cannot be combined with grid: a search samples its own configs (put fixed values in base, one study "
     "per setting)"),
    (HEAD + "ablation: {variants: {a: {optim.lr: 1}}}\nsearch: {num_samples: 2, space: {optim.lr: "
            "{uniform: [0.1, 0.2]}}}\n",
     "search: cannot be combined with ablation: a search samples its own configs (put fixed values in base, one "
     "study per setting)"),
    (HEAD + "search: {num_samples: 2, space: {optim.lr: {loguniform: [0, 1]}}}\n",
     "search.space.optim.lr.loguniform: expected [low, high] with 0 < low < high"),
    (HEAD + "search: {num_samples: 2, space: {optim.lr: {uniform: [0.2, 0.1]}}}\n",
     "search.space.optim.lr.uniform: expected [low, high] with low < high"),
    (HEAD + "search: {num_samples: 2, space: {optim.lr: {normal: [0, 1]}}}\n",
     "search.space.optim.lr: expected one distribution, e.g. {uniform: [low, high]} (uniform, loguniform, int, "
     "choice), got {'normal': [0, 1]}"),
    (HEAD + "search: {num_samples: 2, space: {data.batch_size_u: {uniform: [4, 16]}}}\n",
     "search.space.data.batch_size_u.uniform: data.batch_size_u is an integer; use int or choice"),
    (HEAD + "search: {num_samples: 2, space: {data.batch_size_u: {int: [4, 16, 0]}}}\n",
     "search.space.data.batch_size_u.int: expected [low, high] or [low, high, step] integers with low < high and "
     "step >= 1"),
    (HEAD + "search: {num_samples: 2, space: {method.conf_thresh: {choice: [0.9, 1.5]}}}\n",
     "search.space.method.conf_thresh.choice: expected a value in [0, 1], got 1.5"),
    (HEAD + "search: {num_samples: 2, space: {method.terms.u_fp.weight: {uniform: [0, 1]}}}\n",
     "search.space.method.terms.u_fp.weight: loss term u_fp is not in the base method 'supervised' (its terms: x); "
     "add it to base.method.terms first"),
    (HEAD + "search: {num_samples: 2, space: {optim: {uniform: [0, 1]}}}\n",
     "search.space.optim: is a config section; search a single value"),
    (HEAD + "search: {num_samples: 2, space: {optim.lrr: {uniform: [0, 1]}}}\n",
     "search.space.optim.lrr: unknown config key (optim has: lr, head_lr_mult, momentum, weight_decay, poly_power, optimizer)"),
    (HEAD + "search: {sampler: bayes, num_samples: 2, space: {optim.lr: {uniform: [0.1, 0.2]}}}\n",
     "search.sampler: expected one of ['tpe', 'gp', 'random', 'grid', 'bruteforce'], got 'bayes'"),
    (HEAD + "search: {sampler: grid, num_samples: 2, space: {optim.lr: {uniform: [0.1, 0.2]}}}\n",
     "search.sampler: grid enumerates values: optim.lr needs a distribution of type choice"),
    (HEAD + "search: {sampler: bruteforce, num_samples: 2, space: {optim.lr: {uniform: [0.1, 0.2]}}}\n",
     "search.sampler: bruteforce enumerates values: optim.lr needs a distribution of type int or choice"),
    (HEAD + "search: {num_samples: 0, space: {optim.lr: {uniform: [0.1, 0.2]}}}\n",
     "search.num_samples: expected an integer >= 1, got 0"),
    (HEAD + "search: {num_samples: 2, mode: maximize, space: {optim.lr: {uniform: [0.1, 0.2]}}}\n",
     "search.mode: expected one of ['max', 'min'], got 'maximize'"),
    (HEAD + "search: {num_samples: 2, scheduler: {grace: 1}, space: {optim.lr: {uniform: [0.1, 0.2]}}}\n",
     "search.scheduler.grace: unknown key (expected one of: type, grace_period, reduction_factor, brackets, max_t)"),
    (HEAD + "search: {num_samples: 2, scheduler: {reduction_factor: 1}, space: {optim.lr: {uniform: [0.1, 0.2]}}}\n",
     "search.scheduler.reduction_factor: expected a number > 1, got 1"),
    (HEAD + "search: {num_samples: 2, scheduler: {grace_period: 9}, space: {optim.lr: {uniform: [0.1, 0.2]}}}\n",
     "search.scheduler.grace_period: 9 is more than max_t = 4 evaluations"),
    (HEAD + "resources: {workers: 0}\n", "resources.workers: expected an integer >= 1, got 0"),
    (HEAD + "resources: {gpus_per_worker: -1}\n", "resources.gpus_per_worker: expected a number >= 0, got -1"),
    (HEAD + "resources: {gpus: 1}\n",
     "resources.gpus: unknown key (expected one of: workers, cpus_per_worker, gpus_per_worker, placement)"),
    (HEAD + "report: {rows: method.nme}\n",
     "report.rows: unknown config key (method has: name, teacher, conf_thresh, global_div, mix_source, strong_dropout, terms)"),
    (HEAD + "report: {rows: variant}\n", "report.rows: 'variant' needs an ablation section"),
    (HEAD + "report: {cols: data.aug}\n",
     "report.cols: is a config section; expected a single value (or 'variant')"),
    (HEAD + "report: {agg: mean}\n", "report.agg: expected one of ['last', 'best'], got 'mean'"),
    (HEAD + "grid: {method.name: [supervised, fixmatch]}\nreport: {baseline: mt}\n",
     "report.baseline: 'mt' is not a row (rows: supervised, fixmatch)"),
    (HEAD + "grid: {method.name: [supervised, fixmatch]}\nablation: {variants: {a: {optim.lr: 1}}}\n",
     "report: method.name varies in this study but is neither report.rows nor report.cols (variant x "
     "data.partition); its cells would average different configs"),
    (HEAD + "storage: 5\n", "storage: expected a path or URI (a non-empty string), got 5"),
    # numbers outside the range where they mean something (issue 12)
    ("name: t\nbase: {optim: {momentum: 1.5}}\n", "base.optim.momentum: expected a value in [0, 1], got 1.5"),
    ("name: t\nbase: {model: {aspp_rates: [6, 0, 18]}}\n",
     "base.model.aspp_rates[1]: expected dilation rates >= 1, got 0"),
    ("name: t\nbase: {data: {aug: {jitter: [0.5, -0.1, 0.5, 0.25]}}}\n",
     "base.data.aug.jitter[1]: expected non-negative jitter strengths, got -0.1"),
    ("name: t\nbase: {data: {aug: {jitter: [0.5, 0.5, 0.5, 0.7]}}}\n",
     "base.data.aug.jitter[3]: expected a hue jitter in [0, 0.5], got 0.7"),
    (HEAD + "grid: {optim.momentum: [0.9, 2]}\n", "grid.optim.momentum: expected a value in [0, 1], got 2"),
    ("name: t\nbase: {model: {name: unet}}\n",
     "base.model.name: expected one of ['small', 'deeplabv3plus', 'dpt'], got 'unet'"),
    ("- name: t\n", "<root>: expected a mapping at the top level, got list"),
    ("# nothing\n", "<root>: the file is empty (a study needs at least a name)"),
    ("name: t\nname: u\n", "<root>: invalid YAML: line 2, column 1: duplicate key 'name'"),
]


@pytest.mark.parametrize("text, message", BAD, ids=[m.split(":")[0] + f"-{i}" for i, (_, m) in enumerate(BAD)])
def test_bad_study_is_one_exact_line(tmp_path, text, message):
    path = write(tmp_path, text)
    assert error_of(path) == f"{path}: {message}"


def test_yaml_syntax_error_names_the_file(tmp_path):
    path = write(tmp_path, "name: t\nbase: {model: [\n")
    assert error_of(path).startswith(f"{path}: <root>: invalid YAML: line ")


def test_non_utf8_file_is_a_config_error(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_bytes(b"name: t\xff\n")
    assert error_of(str(path)) == f"{path}: <root>: not UTF-8 text (byte 7)"


def test_oversized_file_is_refused_before_parsing(tmp_path):
    path = write(tmp_path, HEAD + "#" * MAX_FILE_BYTES + "\n")
    size = Path(path).stat().st_size
    assert error_of(path) == (f"{path}: <root>: file is {size} bytes; study files are limited to 1048576 bytes "
                              "(1 MiB)")


def test_alias_bomb_is_refused(tmp_path):
    # 6 levels of 10 aliases each expand to 10^6 values from a few hundred bytes
    lines = ["l0: &l0 [a, a, a, a, a, a, a, a, a, a]"]
    lines += [f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 10) + "]" for i in range(1, 6)]
    path = write(tmp_path, "\n".join(lines) + "\nname: t\n")
    assert error_of(path) == (f"{path}: <root>: more than 100000 values after expanding YAML aliases; refusing to "
                              "load (nested anchors multiply)")


def test_small_aliases_are_fine(tmp_path):
    path = write(tmp_path, "name: t\nbase: {data: {aug: {scale: &s [0.5, 2.0], blur_sigma: *s}}}\n")
    assert load_study(path).base.data.aug.blur_sigma == (0.5, 2.0)


def test_trial_config_of_a_cell_round_trips(tmp_path):
    t = load_study(write(tmp_path, HEAD + "grid: {method.name: [fixmatch]}\n")).trials()[0]
    assert TrialConfig.from_dict(t.config.to_dict()) == t.config
