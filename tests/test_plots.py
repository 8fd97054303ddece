"""Figures from hand-made results: the series each figure carries, and files that open (PNG via PIL, SVG as XML)."""
import xml.etree.ElementTree as ET

import numpy as np
import pandas as pd
import pytest
from matplotlib.container import BarContainer
from PIL import Image

from sslray.plots import (ablation_figure, curves_figure, efficiency_figure, labeled_counts, plot_study, save)
from sslray.study import load_study
from sslray.report import ablation_table, cell_members, comparison_table, study_report

MIOU = {"supervised": {"16": [30.0, 34.0], "64": [40.0, 42.0]}, "unimatch": {"16": [38.0, 40.0], "64": [45.0, 47.0]}}


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    path = tmp_path_factory.mktemp("plots") / "p.yaml"
    path.write_text("name: p\ngrid:\n  method.name: [supervised, unimatch]\n  data.partition: ['16', '64']\n"
                    "seeds: [0, 1]\nreport: {baseline: supervised}\n")
    return load_study(str(path))


@pytest.fixture(scope="module")
def results(study):
    rows, hist = [], []
    for t in study.trials(unique=False):
        m, p = t.config.method.name, t.config.data.partition
        v = MIOU[m][p][t.seed]
        rows.append({"study": "p", "trial_id": t.trial_id, "status": "ok", "seed": t.seed, "variant": None,
                     "cfg.method.name": m, "cfg.data.partition": p, "val/miou": v})
        hist += [{"study": "p", "trial_id": t.trial_id, "iteration": it, "val/miou": v * frac}
                 for it, frac in ((50, 0.5), (100, 1.0))]
    return pd.DataFrame(rows), pd.DataFrame(hist)


def test_efficiency_lines_carry_means_over_labeled_counts(study, results):
    df, _ = results
    table = comparison_table(df, study.trials(unique=False), "method.name", "data.partition")
    labeled = labeled_counts(study.trials(unique=False))
    assert labeled == {"16": 16, "64": 64}
    fig = efficiency_figure(table, labeled)
    ax = fig.axes[0]
    lines = {ln.get_label(): (list(ln.get_xdata()), list(ln.get_ydata())) for ln in ax.get_lines()
             if not ln.get_label().startswith("_")}
    assert {k: v[1] for k, v in lines.items()} == {"Supervised": [32.0, 41.0], "UniMatch": [39.0, 46.0]}
    dodge = 2 ** 0.02  # the two rows' points at one x are pushed apart by 0.04 of an octave
    assert lines["Supervised"][0] == pytest.approx([16 / dodge, 64 / dodge])
    assert lines["UniMatch"][0] == pytest.approx([16 * dodge, 64 * dodge])
    assert ax.get_xscale() == "log" and ax.get_xlabel() == "labeled images" and ax.get_ylabel() == "mIoU (%)"
    band = ax.collections[0].get_paths()[0].vertices  # supervised: mean +- std (2.83 at 16, 1.41 at 64)
    assert band[:, 1].min() == pytest.approx(32.0 - np.std([30, 34], ddof=1))
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["Supervised", "UniMatch"]
    assert ax.get_legend().get_title().get_text() == "method"
    assert "mean ± std over n = 2 seeds" in ax.get_title()


def test_labeled_counts_of_ratios_use_the_synthetic_pool(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("name: r\nbase: {data: {synthetic: {num_train: 100}}}\ngrid: {data.partition: ['1_8', '1_2']}\n")
    assert labeled_counts(load_study(str(path)).trials()) == {"1_8": 13, "1_2": 50}  # rounded up, as splits.py


def test_ablation_bars_with_error_bars(tmp_path):
    path = tmp_path / "a.yaml"
    path.write_text("name: a\nbase: {method: {name: unimatch}}\n"
                    "ablation: {variants: {-fp: {method.terms.u_fp.weight: 0}}}\nseeds: [0, 1]\n")
    study = load_study(str(path))
    values = {"full": [50.0, 52.0], "-fp": [46.0, 47.0]}
    df = pd.DataFrame([{"trial_id": t.trial_id, "status": "ok", "seed": t.seed, "val/miou": values[t.variant][t.seed]}
                       for t in study.trials(unique=False)])
    fig = ablation_figure(ablation_table(study, df))
    ax = fig.axes[0]
    (bars,) = [c for c in ax.containers if isinstance(c, BarContainer)]
    assert [b.get_height() for b in bars] == [51.0, 46.5]
    assert [b.get_hatch() for b in bars] == ["//", ""]  # the full method hatched
    assert [t.get_text() for t in ax.get_xticklabels()] == ["full", "-fp"]
    errs = bars.errorbar.lines[2][0].get_segments()  # the vertical error bar segments: mean +- std
    assert [tuple(np.round(s[:, 1], 3)) for s in errs] == [(49.586, 52.414), (45.793, 47.207)]


def test_curves_one_panel_per_column(study, results):
    df, hist = results
    rows, cols, members = cell_members(df, study.trials(unique=False), "method.name", "data.partition")
    fig = curves_figure(hist, members, rows, cols, "val/miou", "method.name", "data.partition")
    assert [ax.get_title() for ax in fig.axes] == ["labeled images = 16", "labeled images = 64"]
    sup16 = fig.axes[0].get_lines()[0]
    assert sup16.get_label() == "Supervised" and list(sup16.get_xdata()) == [50, 100]
    assert list(sup16.get_ydata()) == [16.0, 32.0]  # mean over seeds at each evaluation


def test_crowded_curves_are_one_collection_with_the_mean_of_each_row():
    """Above CURVES_LEGEND_MAX rows: one LineCollection per panel (a thousand Line2D artists made a 10,000-trial
    ``sslray plot`` slow), each segment the mean over its seeds, no legend, and a title that says so."""
    from matplotlib.collections import LineCollection

    from sslray.plots import CURVES_LEGEND_MAX

    n = CURVES_LEGEND_MAX + 5
    rows = [f"r{i}" for i in range(n)]
    members = {(r, "c"): [f"{r}-s0", f"{r}-s1"] for r in rows}
    hist = pd.DataFrame([{"trial_id": f"r{i}-s{s}", "iteration": it, "val/miou": float(i + s + it)}
                         for i in range(n) for s in (0, 1) for it in (10, 20)])
    fig = curves_figure(hist, members, rows, ["c"], "val/miou", "optim.lr", "")
    ax = fig.axes[0]
    (coll,) = [c for c in ax.collections if isinstance(c, LineCollection)]
    segs = coll.get_segments()
    assert len(segs) == n and not ax.get_lines() and ax.get_legend() is None
    assert [tuple(p) for p in segs[3]] == [(10.0, 13.5), (20.0, 23.5)]  # mean of seeds 0 and 1
    assert f"{n} rows" in fig._suptitle.get_text() and "left out" in fig._suptitle.get_text()


def test_plot_study_writes_png_and_svg_that_open(study, results, tmp_path):
    df, hist = results
    png = plot_study(study, df, hist, str(tmp_path / "png"))
    assert [p.rsplit("/", 1)[1] for p in png] == ["efficiency.png", "curves.png"]  # no ablation in this study
    for p in png:
        with Image.open(p) as im:
            im.verify()
            assert im.format == "PNG"
    svg = plot_study(study, df, hist, str(tmp_path / "svg"), kinds=["efficiency"], fmt="svg")
    root = ET.parse(svg[0]).getroot()
    assert root.tag == "{http://www.w3.org/2000/svg}svg"
    assert len(root.findall(".//{http://www.w3.org/2000/svg}path")) > 10
    again = tmp_path / "again.svg"
    save(efficiency_figure(comparison_table(df, study.trials(unique=False), "method.name", "data.partition"),
                           {"16": 16, "64": 64}, "p: label efficiency"), str(again))
    assert again.read_bytes() == open(svg[0], "rb").read()  # no timestamp: the same results give the same file
    with pytest.raises(ValueError, match="unknown plot format 'gif'"):
        plot_study(study, df, hist, str(tmp_path), fmt="gif")


def test_paper_formats_keep_text_and_png_is_300_dpi(study, results, tmp_path):
    df, hist = results
    out = str(tmp_path / "figs")
    (pdf,) = plot_study(study, df, hist, out, kinds=["efficiency"], fmt="pdf")
    data = open(pdf, "rb").read()
    assert data.startswith(b"%PDF") and b"FontFile2" in data and b"/Type3" not in data  # TrueType (fonttype 42)
    (svg,) = plot_study(study, df, hist, out, kinds=["efficiency"], fmt="svg")
    texts = ["".join(t.itertext()) for t in ET.parse(svg).getroot().iter("{http://www.w3.org/2000/svg}text")]
    assert "labeled images" in texts and "Supervised" in texts  # real text, not glyph outlines
    (png,) = plot_study(study, df, hist, out, kinds=["efficiency"], fmt="png")
    with Image.open(png) as im:
        assert round(im.info["dpi"][0]) == 300


def test_one_partition_says_there_is_no_curve_and_names_are_overridable(tmp_path):
    path = tmp_path / "one.yaml"
    path.write_text("name: one\ngrid:\n  method.name: [supervised, unimatch]\nseeds: [0]\n"
                    "report: {names: {unimatch: UniMatch V1}}\n")
    one = load_study(str(path))
    df = pd.DataFrame([{"study": "one", "trial_id": t.trial_id, "status": "ok", "seed": t.seed,
                        "cfg.method.name": t.config.method.name, "cfg.data.partition": t.config.data.partition,
                        "val/miou": 40.0 if t.config.method.name == "unimatch" else 35.0} for t in one.trials()])
    table = study_report(one, df, sections=["efficiency"])["efficiency"]
    (part,) = table.cols
    ax = efficiency_figure(table, labeled_counts(one.trials())).axes[0]
    assert f"only one partition ({part} labeled images): no curve to draw" in ax.get_title()
    assert "mean ± std over n = 1 seed" in ax.get_title()
    assert [t.get_text() for t in ax.get_xticklabels()] == ["Supervised", "UniMatch V1"]
