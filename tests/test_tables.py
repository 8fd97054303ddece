"""Comparison tables from hand-made results: exact means, stds, best marks, deltas, states and renderings."""
import math

import pandas as pd
import pytest

from sslray.study import load_study
from sslray.tables import comparison_table, render

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
        "| method.name | 16 | Δ 16 | 64 | Δ 64 |\n"
        "| --- | ---: | ---: | ---: | ---: |\n"
        "| supervised | **32.0 ± 2.0 (n=3)** |  | 40.5 ± 0.7 (n=2 of 3) |  |\n"
        "| fixmatch | failed (non-finite loss) |  | **45.0 ± 1.7 (n=3)** | +4.5 |\n"
        "| unimatch | missing |  | **45.0 ± 0.0 (n=1 of 3)** | +4.5 |\n")


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


@pytest.fixture()
def full_table(planned):
    return comparison_table(results(planned), planned, "method.name", "data.partition", baseline="supervised")


def test_markdown(full_table):
    assert render(full_table, "markdown") == (
        "| method.name | 16 | Δ 16 | 64 | Δ 64 |\n"
        "| --- | ---: | ---: | ---: | ---: |\n"
        "| supervised | 32.0 ± 2.0 (n=3) |  | 41.0 ± 1.0 (n=3) |  |\n"
        "| fixmatch | 36.0 ± 1.0 (n=3) | +4.0 | **45.0 ± 1.7 (n=3)** | +4.0 |\n"
        "| unimatch | **40.0 ± 2.6 (n=3)** | +8.0 | **45.0 ± 1.0 (n=3)** | +4.0 |\n")


def test_csv(full_table):
    assert render(full_table, "csv") == (
        "method.name,data.partition,metric,mean,std,n,planned,status,best,delta,reason\n"
        "supervised,16,val/miou,32.0000,2.0000,3,3,ok,false,,\n"
        "supervised,64,val/miou,41.0000,1.0000,3,3,ok,false,,\n"
        "fixmatch,16,val/miou,36.0000,1.0000,3,3,ok,false,4.0000,\n"
        "fixmatch,64,val/miou,45.0000,1.7321,3,3,ok,true,4.0000,\n"
        "unimatch,16,val/miou,40.0000,2.6458,3,3,ok,true,8.0000,\n"
        "unimatch,64,val/miou,45.0000,1.0000,3,3,ok,true,4.0000,\n")


def test_latex(full_table):
    assert render(full_table, "latex") == (
        "% val/miou (last evaluation): mean +- std over seeds; best per column in bold\n"
        "\\begin{tabular}{lrrrr}\n"
        "\\toprule\n"
        "method.name & 16 & $\\Delta$ 16 & 64 & $\\Delta$ 64 \\\\\n"
        "\\midrule\n"
        "supervised & 32.0 $\\pm$ 2.0 &  & 41.0 $\\pm$ 1.0 &  \\\\\n"
        "fixmatch & 36.0 $\\pm$ 1.0 & $+4.0$ & \\textbf{45.0 $\\pm$ 1.7} & $+4.0$ \\\\\n"
        "unimatch & \\textbf{40.0 $\\pm$ 2.6} & $+8.0$ & \\textbf{45.0 $\\pm$ 1.0} & $+4.0$ \\\\\n"
        "\\bottomrule\n"
        "\\end{tabular}\n")


def test_latex_escapes_labels(planned):
    df = results(planned)
    df = df[df["cfg.data.partition"] == "16"].assign(**{"cfg.data.partition": "1_8"})
    table = comparison_table(df, None, "method.name", "data.partition")
    assert "method.name & 1\\_8 \\\\" in render(table, "latex")


def test_unknown_format(full_table):
    with pytest.raises(ValueError, match=r"unknown table format 'html' \(expected one of: markdown, csv, latex\)"):
        render(full_table, "html")
