"""Paper tables from hand-made results: exact means, stds, best/second marks, deltas, states, significance,
bootstrap CIs, paper numbers, ablation / per-class / pseudo-label / cost / manifest / search tables, renderings."""
import json
import math
import re
from html.parser import HTMLParser

import numpy as np
import pandas as pd
import pytest

from sslray.config import ConfigError
from sslray.results import make_row
from sslray.study import load_study
from sslray.report import (ablation_table, comparison_table, cost_listing, frame, load_paper_numbers, manifest,
                           per_class_table, pseudo_table, render, search_listings, with_bootstrap,
                           with_paper_numbers, with_significance)

# method -> partition -> val/miou of seeds 0, 1, 2
MIOU = {
    "supervised": {"16": [30.0, 32.0, 34.0], "64": [40.0, 41.0, 42.0]},  # 32 +- 2, 41 +- 1
    "fixmatch": {"16": [35.0, 36.0, 37.0], "64": [44.0, 44.0, 47.0]},  # 36 +- 1, 45 +- sqrt(3)
    "unimatch": {"16": [38.0, 39.0, 43.0], "64": [44.0, 45.0, 46.0]},  # 40 +- sqrt(7), 45 +- 1 (ties fixmatch)
}


@pytest.fixture(scope="module")
def planned(tmp_path_factory):
    path = tmp_path_factory.mktemp("study") / "t.yaml"
    path.write_text("name: t\ngrid:\n  method.name: [supervised, fixmatch, unimatch]\n"
                    "  data.partition: [\"16\", \"64\"]\nseeds: [0, 1, 2]\n")
    return load_study(str(path)).trials(unique=False)


def results(planned, drop=(), fail=None):
    """One row per planned trial; ``drop`` (method, partition, seed) rows are absent, ``fail`` maps them to reasons."""
    fail = fail or {}
    rows = []
    for t in planned:
        m, p = t.config.method.name, t.config.data.partition
        key = (m, p, t.seed)
        if key in drop:
            continue
        v = MIOU[m][p][t.seed]
        rows.append({"study": "t", "trial_id": t.trial_id, "status": "failed" if key in fail else "ok",
                     "reason": fail.get(key), "variant": None, "seed": t.seed, "cfg.method.name": m,
                     "cfg.data.partition": p, "val/miou": math.nan if key in fail else v,
                     "best/val/miou": math.nan if key in fail else v + 1.0})
    return pd.DataFrame(rows)


def test_means_stds_best_and_deltas(planned):
    table = comparison_table(results(planned), planned, "method.name", "data.partition", baseline="supervised")
    assert table.rows == ["supervised", "fixmatch", "unimatch"] and table.cols == ["16", "64"]
    cells = {k: (c.mean, round(c.std, 6), c.n, c.status) for k, c in table.cells.items()}
    assert cells == {
        ("supervised", "16"): (32.0, 2.0, 3, "ok"), ("supervised", "64"): (41.0, 1.0, 3, "ok"),
        ("fixmatch", "16"): (36.0, 1.0, 3, "ok"), ("fixmatch", "64"): (45.0, round(math.sqrt(3), 6), 3, "ok"),
        ("unimatch", "16"): (40.0, round(math.sqrt(7), 6), 3, "ok"), ("unimatch", "64"): (45.0, 1.0, 3, "ok")}
    assert table.best("16") == ["unimatch"] and table.best("64") == ["fixmatch", "unimatch"]
    assert [table.delta(r, c) for r in table.rows for c in table.cols] == [None, None, 4.0, 4.0, 8.0, 4.0]


def test_agg_best_reads_best_columns(planned):
    table = comparison_table(results(planned), planned, "method.name", "data.partition", agg="best",
                             baseline="supervised")
    assert table.cells[("supervised", "16")].mean == 33.0 and table.delta("unimatch", "16") == 8.0


def test_single_seed_has_zero_std(planned):
    one = [t for t in planned if t.seed == 0]
    cell = comparison_table(results(planned), one, "method.name", "data.partition").cells[("fixmatch", "64")]
    assert (cell.mean, cell.std, cell.n) == (44.0, 0.0, 1)


def test_missing_failed_and_partial_cells(planned):
    df = results(planned, drop={("supervised", "64", 2), ("unimatch", "64", 2)} |
                 {("unimatch", "16", s) for s in range(3)},
                 fail={("fixmatch", "16", s): "non-finite loss" for s in range(3)} |
                      {("unimatch", "64", 0): "worker died"})
    table = comparison_table(df, planned, "method.name", "data.partition", baseline="supervised")
    sup64, fix16, uni16, uni64 = (table.cells[k] for k in [("supervised", "64"), ("fixmatch", "16"),
                                                           ("unimatch", "16"), ("unimatch", "64")])
    assert (sup64.mean, round(sup64.std, 6), sup64.n, sup64.planned, sup64.status, sup64.reason) == (
        40.5, round(math.sqrt(0.5), 6), 2, 3, "partial", "1 missing")
    assert (fix16.mean, fix16.status, fix16.reason) == (None, "failed", "non-finite loss")
    assert (uni16.mean, uni16.status, uni16.n) == (None, "missing", 0)
    assert (uni64.mean, uni64.std, uni64.n, uni64.status, uni64.reason) == (
        45.0, 0.0, 1, "partial", "1 failed: worker died, 1 missing")
    assert table.best("16") == ["supervised"] and table.delta("fixmatch", "16") is None
    assert render(table, "markdown") == (
        "| method | mIoU (%), labeled images: 16 | Δ 16 | mIoU (%), labeled images: 64 | Δ 64 |\n"
        "| --- | ---: | ---: | ---: | ---: |\n"
        "| supervised | **32.0 ± 2.0 (n=3)** | baseline | 40.5 ± 0.7 (n=2 of 3) | baseline |\n"
        "| fixmatch | failed (non-finite loss) |  | **45.0 ± 1.7 (n=3)** | +4.5 |\n"
        "| unimatch | missing |  | **45.0 (n=1 of 3)** | +4.5 |\n")  # one seed: no \"± 0.0\"


def test_rows_outside_the_plan_are_ignored(planned):
    df = results(planned)
    stray = df.iloc[[0]].assign(trial_id="f" * 64, **{"val/miou": 99.0})
    table = comparison_table(pd.concat([df, stray]), planned, "method.name", "data.partition")
    assert table.cells[("supervised", "16")].mean == 32.0


def test_without_a_plan_cells_come_from_the_results_sorted(planned):
    df = results(planned)
    table = comparison_table(df, None, "method.name", "data.partition", baseline="supervised")
    assert table.rows == ["fixmatch", "supervised", "unimatch"] and table.cols == ["16", "64"]
    assert table.cells[("unimatch", "16")].mean == 40.0 and table.delta("fixmatch", "64") == 4.0


def test_unknown_metric_and_baseline_are_errors(planned):
    with pytest.raises(ValueError, match=r"no column 'val/mIoU' in the results"):
        comparison_table(results(planned), planned, "method.name", "data.partition", metric="val/mIoU")
    with pytest.raises(ValueError, match=r"baseline 'mt' is not a row \(rows: supervised, fixmatch, unimatch\)"):
        comparison_table(results(planned), planned, "method.name", "data.partition", baseline="mt")


def test_ablation_rows_are_variants(tmp_path):
    path = tmp_path / "a.yaml"
    path.write_text("name: a\nbase: {method: {name: unimatch}}\n"
                    "ablation: {variants: {-fp: {method.terms.u_fp.weight: 0}}}\nseeds: [0, 1]\n")
    study = load_study(str(path))
    planned = study.trials(unique=False)
    df = pd.DataFrame([{"trial_id": t.trial_id, "status": "ok", "val/miou": 50.0 + i} for i, t in enumerate(planned)])
    r = study.report
    table = comparison_table(df, planned, r.rows, r.cols, r.metric, r.agg, r.baseline)
    assert table.rows == ["full", "-fp"] and table.cols == ["16"]
    assert table.cells[("full", "16")].mean == 51.0 and table.delta("-fp", "16") == 1.0



def test_ablation_table_lists_what_each_variant_changes(tmp_path):
    path = tmp_path / "a.yaml"
    path.write_text("name: a\nbase: {method: {name: unimatch}}\n"
                    "ablation: {variants: {-fp: {method.terms.u_fp.weight: 0}, -s2: {method.terms.u_s2.weight: 0}}}\n"
                    "seeds: [0, 1]\n")
    study = load_study(str(path))
    values = {"full": [50.0, 52.0], "-fp": [47.0, 48.0], "-s2": [49.0, 52.0]}
    df = pd.DataFrame([{"trial_id": t.trial_id, "status": "ok", "seed": t.seed,
                        "val/miou": values[t.variant][t.seed]} for t in study.trials(unique=False)])
    table = ablation_table(study, df)
    assert table.rows == ["full", "-fp", "-s2"] and table.baseline == "full"  # declared order, full method first
    assert [table.delta(r, "16") for r in table.rows] == [None, -3.5, -0.5]
    assert render(table, "markdown") == (
        "**Ablation**\n\n"
        "| variant | mIoU (%), labeled images: 16 | Δ 16 | changes |\n"
        "| --- | ---: | ---: | --- |\n"
        "| full | **51.0 ± 1.4 (n=2)** | baseline | baseline (changes nothing) |\n"
        "| -fp | 47.5 ± 0.7 (n=2) | -3.5 | method.terms.u_fp.weight=0 |\n"
        "| -s2 | <u>50.5 ± 2.1 (n=2)</u> | -0.5 | method.terms.u_s2.weight=0 |\n")


@pytest.fixture()
def full_table(planned):
    return comparison_table(results(planned), planned, "method.name", "data.partition", baseline="supervised")


def test_markdown(full_table):
    # 16: unimatch best, fixmatch second; 64: fixmatch and unimatch tie for best, so nobody is second (1, 1, 3)
    assert full_table.second("16") == ["fixmatch"] and full_table.second("64") == []
    assert render(full_table, "markdown") == (
        "| method | mIoU (%), labeled images: 16 | Δ 16 | mIoU (%), labeled images: 64 | Δ 64 |\n"
        "| --- | ---: | ---: | ---: | ---: |\n"
        "| supervised | 32.0 ± 2.0 (n=3) | baseline | 41.0 ± 1.0 (n=3) | baseline |\n"
        "| fixmatch | <u>36.0 ± 1.0 (n=3)</u> | +4.0 | **45.0 ± 1.7 (n=3)** | +4.0 |\n"
        "| unimatch | **40.0 ± 2.6 (n=3)** | +8.0 | **45.0 ± 1.0 (n=3)** | +4.0 |\n")


def test_paired_t_significance_is_holm_corrected_and_marked(full_table, planned):
    # differences against supervised per seed: fixmatch 16 [5, 4, 3] (t = 4 / (1 / sqrt 3), df 2: p = 0.0202),
    # unimatch 16 [8, 7, 9] (p = 0.00517), fixmatch 64 [4, 3, 5] (p = 0.0202), unimatch 64 [4, 4, 4] (p = 0)
    table = with_significance(full_table, "auto", alpha=0.05)  # 3 seeds: auto is the t-test
    raw = {k: round(t.p, 5) for k, t in table.tests.items()}
    assert raw == {("fixmatch", "16"): 0.0202, ("unimatch", "16"): 0.00517, ("fixmatch", "64"): 0.0202,
                   ("unimatch", "64"): 0.0}
    holm = {k: round(p, 4) for k, p in table.p_holm.items()}  # sorted p x (4, 3, 2, 1), running max
    assert holm == {("fixmatch", "16"): 0.0404, ("unimatch", "16"): 0.0155, ("fixmatch", "64"): 0.0404,
                    ("unimatch", "64"): 0.0}
    assert {t.test for t in table.tests.values()} == {"t"}
    assert render(table, "markdown") == (
        "| method | mIoU (%), labeled images: 16 | Δ 16 | mIoU (%), labeled images: 64 | Δ 64 |\n"
        "| --- | ---: | ---: | ---: | ---: |\n"
        "| supervised | 32.0 ± 2.0 (n=3) | baseline | 41.0 ± 1.0 (n=3) | baseline |\n"
        "| fixmatch | <u>36.0 ± 1.0 (n=3)</u>† | +4.0 | **45.0 ± 1.7 (n=3)**† | +4.0 |\n"
        "| unimatch | **40.0 ± 2.6 (n=3)**† | +8.0 | **45.0 ± 1.0 (n=3)**† | +4.0 |\n"
        "\n"
        "† p < 0.05 against supervised: paired t-test over seeds, two-sided, Holm-corrected over 4 comparisons. "
        "Holm p: fixmatch @ 16 p=0.0404 (raw 0.0202, t, n=3); "
        "unimatch @ 16 p=0.0155 (raw 0.00517, t, n=3); fixmatch @ 64 p=0.0404 (raw 0.0202, t, n=3); "
        "unimatch @ 64 p=0 (raw 0, t, n=3).\n")
    df16 = results(planned)
    only16 = comparison_table(df16[df16["cfg.data.partition"] == "16"], None, "method.name", "data.partition",
                              baseline="supervised")
    none = render(with_significance(only16, "t", alpha=0.01), "markdown")  # Holm p 0.0103, 0.0202: no mark
    assert "†" not in none and none.endswith("No difference against supervised is significant at p < 0.01 (paired "
                                             "test over seeds, Holm-corrected over 2 comparisons).\n")
    strict = with_significance(full_table, "t", alpha=0.01)
    assert [k for k in strict.tests if strict.significant(*k)] == [("unimatch", "64")]
    assert with_significance(full_table, "none").tests == {}


def test_wilcoxon_from_six_seeds_and_untested_cells():
    rows = []
    for seed in range(6):
        rows.append({"method": "supervised", "seed": seed, "v": 40.0 + seed})
        rows.append({"method": "fixmatch", "seed": seed, "v": 42.0 + seed + 0.1 * seed})  # always ahead: W+ = 21
        rows.append({"method": "unimatch", "seed": seed, "v": 41.0 + seed if seed == 0 else math.nan})
    df = pd.DataFrame([{"study": "w", "trial_id": f"{i:064x}", "status": "ok" if r["v"] == r["v"] else "failed",
                        "reason": None, "variant": None, "seed": r["seed"], "cfg.method.name": r["method"],
                        "cfg.data.partition": "16", "val/miou": r["v"]} for i, r in enumerate(rows)])
    table = with_significance(comparison_table(df, None, "method.name", "data.partition", baseline="supervised"))
    (key, test), = table.tests.items()
    assert key == ("fixmatch", "16") and (test.test, test.n, test.statistic) == ("wilcoxon", 6, 21.0)
    assert test.p == 2 / 64  # exact: the all-positive sign pattern and its mirror out of 2^6
    assert table.untested == [("unimatch", "16")]
    assert render(table, "markdown").endswith(
        "† p < 0.05 against supervised: exact Wilcoxon signed-rank test over seeds, two-sided, Holm-corrected over "
        "1 comparison. Holm p: fixmatch @ 16 p=0.0312 (raw 0.0312, wilcoxon, n=6). Not tested (fewer than 2 paired "
        "seeds): unimatch @ 16.\n")


def test_bootstrap_ci_over_validation_images():
    rng = np.random.default_rng(0)
    n, k = 40, 3
    union = rng.integers(50, 100, (n, k))
    base_inter = (union * rng.uniform(0.3, 0.6, (n, k))).astype(int)
    better_inter = np.minimum(union, base_inter + 10)  # better on every image
    rows = []
    for i, (method, seed, inter) in enumerate([("supervised", 0, base_inter), ("supervised", 1, base_inter),
                                               ("fixmatch", 0, better_inter), ("fixmatch", 1, better_inter)]):
        miou = 100 * np.mean(inter.sum(0) / (union.sum(0) + 1e-10))
        rows.append({"study": "b", "trial_id": f"{i:064x}", "status": "ok", "seed": seed, "cfg.method.name": method,
                     "cfg.data.partition": "16", "val/miou": miou, "best/val/miou": miou,
                     "val/per_image": json.dumps({"inter": inter.tolist(), "union": union.tolist()})})
    df = pd.DataFrame(rows)
    base = comparison_table(df, None, "method.name", "data.partition", baseline="supervised")
    table = with_bootstrap(base, df, n_boot=300)
    lo, hi = table.ci[("fixmatch", "16")]
    delta = base.delta("fixmatch", "16")
    assert 0 < lo < delta < hi  # every image improved: the paired CI excludes 0 and brackets the point delta
    assert with_bootstrap(base, df, n_boot=300).ci == table.ci  # seeded
    text = render(table, "markdown")
    assert f"+{delta:.1f} [+{lo:.1f}, +{hi:.1f}]" in text
    assert "95% bootstrap CI of the delta against supervised over the 40 validation images (300 resamples" in text
    unpaired = with_bootstrap(comparison_table(df, None, "method.name", "data.partition"), df, n_boot=300)
    assert set(unpaired.ci) == {("supervised", "16"), ("fixmatch", "16")}
    with pytest.raises(ValueError, match="need --metric val/miou and --agg last"):
        with_bootstrap(comparison_table(df, None, "method.name", "data.partition", agg="best"), df)


def test_paper_numbers_beside_reproduced(tmp_path, planned, full_table):
    paper = tmp_path / "paper.yaml"
    paper.write_text("source: Some paper (2023), Table 1\nmetric: val/miou\n"
                     "rows:\n  supervised: {16: 30.5}\n  unimatch: {16: 42.0}\n")
    table = with_paper_numbers(full_table, load_paper_numbers(str(paper)))
    assert render(table, "markdown").splitlines()[:3] == [
        "| method | mIoU (%), labeled images: 16 | 16 (paper) | Δ 16 | mIoU (%), labeled images: 64 | Δ 64 |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
        "| supervised | 32.0 ± 2.0 (n=3) | 30.5 | baseline | 41.0 ± 1.0 (n=3) | baseline |"]
    assert render(table, "markdown").endswith("\npaper: Some paper (2023), Table 1.\n")
    study = tmp_path / "s.yaml"
    study.write_text("name: s\ngrid: {method.name: [supervised, unimatch]}\n"
                     "report: {baseline: supervised, paper_numbers: paper.yaml}\n")
    assert load_study(str(study)).report.paper_numbers == str(paper)  # resolved next to the study file
    paper.write_text("source: x\nrows:\n  unimatch: {16: high}\n")
    with pytest.raises(ConfigError, match=re.escape(f"{paper}: rows.unimatch.16: expected a number, got 'high'")):
        load_study(str(study))
    study.write_text("name: s\nreport: {paper_numbers: nope.yaml}\n")
    with pytest.raises(ConfigError, match=r"s\.yaml: report\.paper_numbers: no such file"):
        load_study(str(study))


def test_per_class_iou_from_confusion_matrices(planned):
    df = results(planned)
    df["val/iou/bg"], df["val/iou/fg"] = 0.0, 0.0  # the stored names; values are recomputed from the matrices
    # rows = target: class bg IoU = 5 / (6 + 7 - 5) = 62.5, fg = 7 / (9 + 8 - 7) = 70; seed 2 gets a perfect matrix
    df["val/confusion"] = [json.dumps([[5, 1], [2, 7]] if s != 2 else [[4, 0], [0, 4]]) for s in df["seed"]]
    one = [t for t in planned if t.config.data.partition == "16"]
    table = per_class_table(df, one, "method.name", "data.partition")
    assert table.rows == ["supervised", "fixmatch", "unimatch"] and table.cols == ["bg", "fg", "mIoU"]
    cell = table.cells[("fixmatch", "bg")]
    assert cell.mean == pytest.approx((62.5 + 62.5 + 100) / 3) and cell.n == 3
    assert table.cells[("fixmatch", "mIoU")].mean == pytest.approx((66.25 + 66.25 + 100) / 3)
    both = per_class_table(df, planned, "method.name", "data.partition")
    assert both.rows[:2] == ["supervised / 16", "supervised / 64"]


def test_pseudo_label_quality_table(planned):
    df = results(planned)
    ssl = df["cfg.method.name"] != "supervised"
    df["train/mask_ratio"] = np.where(ssl, 0.5, np.nan)
    df["train/pseudo_acc"] = np.where(ssl, 0.9, np.nan)
    hist = pd.DataFrame([{"study": "t", "trial_id": tid, "iteration": it, "train/mask_ratio": r,
                          "train/pseudo_acc": 0.8}
                         for tid, is_ssl in zip(df["trial_id"], ssl) if is_ssl for it, r in ((5, 0.2), (10, 0.5))])
    one = [t for t in planned if t.config.data.partition == "16"]
    table = pseudo_table(df, hist, one, "method.name", "data.partition")
    assert table.cols == ["mask ratio", "pseudo acc", "mask ratio (mean)", "pseudo acc (mean)"]
    assert [table.cells[("fixmatch", c)].mean for c in table.cols] == pytest.approx([50.0, 90.0, 35.0, 80.0])
    assert table.cells[("supervised", "mask ratio")].status == "na"
    lines = render(table, "markdown").splitlines()
    assert lines[4] == "| supervised | – | – | – | – |" and "**" not in lines[5]


def test_cost_per_cell_and_forecast(planned):
    df = results(planned, drop={("fixmatch", "64", 2)} | {("unimatch", "64", s) for s in range(3)})
    df["gpu_hours"] = np.where(df["cfg.method.name"] == "fixmatch", 0.5, 0.25)
    df["cpu_hours"] = 4 * df["gpu_hours"]
    listing = cost_listing(df, planned, "method.name", "data.partition")
    rows = {(r[0], r[1]): r[2:] for r in listing.rows}
    assert rows[("fixmatch", "64")] == ["2/3", "1.000", "4.000", "0.500", "2.000"]  # one missing x 0.5 GPU-h
    assert rows[("unimatch", "64")] == ["0/3", "0.000", "0.000", "0.750", "3.000"]  # three missing x 0.25
    # spent: supervised 6 x 0.25 + fixmatch 5 x 0.5 + unimatch 3 x 0.25 = 4.75 GPU-h (x 4 CPU-h)
    assert rows[("total", "")] == ["14/18", "4.750", "19.000", "1.250", "5.000"]


def test_manifest_lists_what_reproduces_each_trial(planned, tmp_path):
    store_rows = []
    for t in planned[:2]:
        row = make_row("t", t.point, t.config, "ok", {"val/miou": 40.0}, None, 60.0, "cpu",
                       {"split_sha256": {"labeled.txt": "ab" * 32}, "rerun": f"sslray train {t.trial_id[:6]}.yaml"})
        store_rows.append(row)
    df = pd.DataFrame(store_rows)
    listing = manifest(df, planned, "method.name", "data.partition")
    stored = [r for r in listing.rows if r[3] == "ok"]
    assert len(stored) == 2 and len(listing.rows) == len({t.trial_id for t in planned})
    first = stored[0]
    assert first[4] == planned[0].trial_id and first[6] == "labeled.txt=" + "ab" * 32
    assert first[7] == f"sslray train {planned[0].trial_id[:6]}.yaml"
    assert first[5] == "unknown (not a git checkout)" or re.fullmatch(r"[0-9a-f]{40}( \(dirty\))?", first[5])
    assert listing.notes[0].startswith("package versions (every trial): ") and "torch 2." in listing.notes[0]
    assert {r[3] for r in listing.rows} == {"ok", "missing"}


def test_rows_say_their_platform_and_a_table_mixing_platforms_says_so(planned):
    """Issue 11: the PCR ablation's seed 0 moved by up to 8 mIoU between two sessions' machines (same trial ids,
    same code): a row records what sets its arithmetic, and a table built from two platforms says it is."""
    import torch  # noqa: F401 - a trial's process has it; the row reads it from sys.modules

    row = make_row("t", planned[0].point, planned[0].config, "ok", {"val/miou": 40.0}, None, 60.0, "cpu")
    assert re.fullmatch(r"torch 2\.\S+; cpu \S* ?\(.+\); threads \d+(; gpu .+)?", row["platform"]), row["platform"]
    df = results(planned)
    one = comparison_table(df.assign(platform=row["platform"]), planned, "method.name", "data.partition")
    assert one.notes == [] and "platforms" not in render(one, "markdown")
    assert manifest(df.assign(platform=row["platform"]), planned, "method.name", "data.partition").notes[-1] == \
        f"platform (every trial): {row['platform']}"
    df["platform"] = row["platform"]
    df.loc[df.index[-1], "platform"] = None  # a row stored before the column existed
    assert comparison_table(df, planned, "method.name", "data.partition").notes == [
        f"1 trial(s) stored without a platform (before sslray recorded it) beside {len(df) - 1} on "
        f"{row['platform']!r}: if they ran elsewhere, one config and seed gives different numbers there; sslray "
        "table --manifest lists which trial ran where."]
    df.loc[df.index[:3], "platform"] = "torch 2.15.0+cu132; cpu AVX2 (x); threads 1"
    mixed = comparison_table(df, planned, "method.name", "data.partition")
    assert mixed.notes == [
        f"Trials from 2 platforms ({len(df) - 4} on {row['platform']!r}, 3 on 'torch 2.15.0+cu132; cpu AVX2 (x); "
        "threads 1', and 1 stored without a platform): one config and seed gives different numbers on each; "
        "sslray table --manifest lists which trial ran where."]
    assert mixed.notes[0] in render(mixed, "markdown")
    listing = manifest(df, planned, "method.name", "data.partition")
    assert listing.header[-1] == "platform" and not any(n.startswith("platform") for n in listing.notes)
    assert {r[-1] for r in listing.rows} >= {row["platform"], "unknown"}


def test_search_best_configs_importances_and_history(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("name: s\nbase: {method: {name: fixmatch}}\n"
                    "search: {num_samples: 12, space: {optim.lr: {loguniform: [0.001, 0.1]}, "
                    "method.conf_thresh: {choice: [0.8, 0.95]}}}\n")
    study = load_study(str(path))
    rng = np.random.default_rng(0)
    lrs = np.exp(rng.uniform(np.log(1e-3), np.log(1e-1), 12))
    rows = [{"study": "s", "trial_id": f"{i:064x}", "status": "ok" if i != 3 else "stopped",
             "created_at": f"2026-01-01T00:00:{i:02d}+00:00", "cfg.optim.lr": lr,
             "cfg.method.conf_thresh": [0.8, 0.95][i % 2], "val/miou": 30 + 100 * lr + 0.01 * (i % 2),
             "iteration": 100} for i, lr in enumerate(lrs)]
    best, importances, history = search_listings(study, pd.DataFrame(rows), top=3)
    assert [r[0] for r in best.rows] == ["1", "2", "3"] and best.header[3:5] == ["optim.lr", "method.conf_thresh"]
    assert float(best.rows[0][5]) == pytest.approx(max(r["val/miou"] for r in rows), abs=0.01)
    imp = {r[0]: float(r[1]) for r in importances.rows}
    assert set(imp) == {"optim.lr", "method.conf_thresh"} and imp["optim.lr"] > 0.9  # lr drives the metric
    assert "11 finished trials" in importances.title  # the stopped trial is not a finished Optuna trial
    so_far = [float(r[4]) for r in history.rows]
    assert so_far == sorted(so_far) and len(history.rows) == 12


def test_latex(full_table):
    table = with_significance(full_table, "t")
    assert render(table, "latex") == (
        "% val/miou (last evaluation): mean +- std over seeds; best per column in bold, second underlined\n"
        "\\begin{tabular}{lrrrr}\n"
        "\\toprule\n"
        "method & mIoU (\\%), labeled images: 16 & $\\Delta$ 16 & mIoU (\\%), labeled images: 64 & $\\Delta$ 64 \\\\\n"
        "\\midrule\n"
        "supervised & 32.0 $\\pm$ 2.0 & baseline & 41.0 $\\pm$ 1.0 & baseline \\\\\n"
        "fixmatch & \\underline{36.0 $\\pm$ 1.0}$^\\dagger$ & $+4.0$ & \\textbf{45.0 $\\pm$ 1.7}$^\\dagger$ & $+4.0$ \\\\\n"
        "unimatch & \\textbf{40.0 $\\pm$ 2.6}$^\\dagger$ & $+8.0$ & \\textbf{45.0 $\\pm$ 1.0}$^\\dagger$ & $+4.0$ \\\\\n"
        "\\bottomrule\n"
        "\\end{tabular}\n"
        "% fixmatch @ 16: Holm p = 0.0404 (raw 0.0202, t, n = 3)\n"
        "% unimatch @ 16: Holm p = 0.0155 (raw 0.00517, t, n = 3)\n"
        "% fixmatch @ 64: Holm p = 0.0404 (raw 0.0202, t, n = 3)\n"
        "% unimatch @ 64: Holm p = 0 (raw 0, t, n = 3)\n"
        "{\\footnotesize $^\\dagger$ p $<$ 0.05 against supervised: paired t-test over seeds, two-sided, "
        "Holm-corrected over 4 comparisons.\\par}\n")


def test_csv(full_table):
    lines = render(with_significance(full_table, "t"), "csv").splitlines()
    assert lines[0] == ("method.name,data.partition,metric,mean,std,n,planned,status,best,second,delta,test,n_pairs,"
                        "p,p_holm,significant,ci_low,ci_high,paper,reason")
    assert lines[1] == "supervised,16,val/miou,32.0000,2.0000,3,3,ok,false,false,,,,,,,,,,"
    assert lines[3] == "fixmatch,16,val/miou,36.0000,1.0000,3,3,ok,false,true,4.0000,t,3,0.020204,0.040408,true,,,,"
    assert lines[6] == "unimatch,64,val/miou,45.0000,1.0000,3,3,ok,true,false,4.0000,t,3,0.000000,0.000000,true,,,,"


class _Tags(HTMLParser):
    def __init__(self):
        super().__init__()
        self.stack, self.cells = [], []

    def handle_starttag(self, tag, attrs):
        self.stack.append(tag)

    def handle_endtag(self, tag):
        assert self.stack.pop() == tag, f"unbalanced </{tag}>"

    def handle_data(self, data):
        if self.stack and self.stack[-1] in ("td", "b", "u"):
            self.cells.append(data)


def test_html_is_balanced_and_marks_best(full_table):
    text = render(with_significance(full_table, "t"), "html")
    parser = _Tags()
    parser.feed(text)
    assert parser.stack == []
    assert "<td><b>40.0 &plusmn; 2.6 (n=3)</b><sup>&dagger;</sup></td>" in text
    assert "<td><u>36.0 &plusmn; 1.0 (n=3)</u><sup>&dagger;</sup></td>" in text
    assert "<th>&Delta; 16</th>" in text and "<p><sup>&dagger;</sup> p &lt; 0.05 against supervised" in text


def test_frame_is_plain_text(full_table):
    f = frame(with_significance(full_table, "t"))
    assert list(f.columns) == ["method", "mIoU (%), labeled images: 16", "Δ 16", "mIoU (%), labeled images: 64", "Δ 64"]
    assert f.iloc[2, 1] == "40.0 ± 2.6 (n=3)†"


def test_latex_escapes_labels(planned):
    df = results(planned)
    df = df[df["cfg.data.partition"] == "16"].assign(**{"cfg.data.partition": "1_8"})
    table = comparison_table(df, None, "method.name", "data.partition")
    assert "method & mIoU (\\%), labeled images: 1\\_8 \\\\" in render(table, "latex")


def test_unknown_format(full_table):
    with pytest.raises(ValueError, match=r"unknown table format 'xls' \(expected one of: markdown, latex, csv, html\)"):
        render(full_table, "xls")
