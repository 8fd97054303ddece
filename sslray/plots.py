"""Paper figures derived from the results store (matplotlib: PNG at 300 dpi, or SVG and PDF with real text)::

    sslray plot studies/quickstart.yaml                       # every figure that applies, into <storage>/plots
    sslray plot studies/x.yaml --kind efficiency --format svg --out figs/

* **efficiency**: ``val/miou`` against the number of labeled images, one line per method (the report's rows), a
  band of +- one std over seeds (error bars where a method has one partition);
* **ablation**: one bar per ablation variant (per column, grouped), error bars = std over seeds, the full method
  hatched;
* **curves**: the metric over training iterations, one panel per column (partition), one line per row with the
  seed band, from the per-evaluation history.

The tables behind the efficiency and ablation figures come from ``sslray.report.study_report`` (sections
``efficiency`` and ``ablation``), the same route as ``sslray table`` and the W&B summary run.

Each ``*_figure`` function returns a ``matplotlib.figure.Figure`` built without pyplot (no global state, no
display: the Agg canvas renders it), so callers and tests can inspect its lines, bars and labels before saving.
"""
from __future__ import annotations

import os
import statistics
from collections import defaultdict
from typing import TYPE_CHECKING, Any

from sslray.report import Table, cell_members, study_report
from sslray.report.names import display, metric_label
from sslray.report.sections import PARTITION
from sslray.storage import SPLITS_DIR, StudyStorage, atomic_write
from sslray.study import VARIANT

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure

    from sslray.study import PlannedTrial, Study

KINDS = ("efficiency", "ablation", "curves")
PLOT_FORMATS = ("png", "svg", "pdf")
# Paper settings: text stays text in SVG and PDF (TrueType, editable and searchable), PNG at 300 dpi.
RC = {"svg.fonttype": "none", "pdf.fonttype": 42, "ps.fonttype": 42, "svg.hashsalt": "sslray"}
PNG_DPI = 300


def _figure(width: float = 5.0, height: float = 3.6) -> "Figure":
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _ylabel(table_or_metric: "Table | str") -> str:
    if isinstance(table_or_metric, str):
        return metric_label(table_or_metric)
    return metric_label(table_or_metric.metric, table_or_metric.agg, table_or_metric.names)


def _seeds(table: Table) -> str:
    """``n = 3 seeds`` (or ``n = 2-3 seeds``) over the cells with a mean: what the error bars are taken over."""
    ns = sorted({cell.n for cell in table.cells.values() if cell.mean is not None})
    if not ns:
        return "no seeds"
    span = str(ns[0]) if len(ns) == 1 else f"{ns[0]}-{ns[-1]}"
    return f"n = {span} seed{'s' if ns[-1] != 1 else ''}"


def _spread(table: Table) -> str:
    return f"{'mean' if table.agg == 'last' else 'best'} ± std over {_seeds(table)}"


def efficiency_figure(table: Table, labeled: dict[str, int], title: str | None = None) -> "Figure":
    """Mean of each row against the number of labeled images of each column (``labeled[col]``), seed std band.

    ``table`` has methods as rows and partitions as columns (``comparison_table(..., cols="data.partition")``).
    Each line's label is its row's display name (``sslray.report.names``, ``report.names``); the points of the rows
    at one x are dodged sideways (by a few percent of an octave) so their error bars do not overlap. With one
    partition there is no curve to draw: :func:`single_partition_figure` says so.
    """
    xs_all = sorted(set(labeled[c] for c in table.cols))
    if len(xs_all) < 2:
        return single_partition_figure(table, labeled, title)
    fig = _figure()
    ax = fig.add_subplot()
    log = xs_all[-1] >= 4 * xs_all[0]
    n_rows = max(len(table.rows), 1)
    for i, r in enumerate(table.rows):
        pts = sorted((labeled[c], cell.mean, cell.std) for c in table.cols
                     if (cell := table.cells.get((r, c))) is not None and cell.mean is not None)
        if not pts:
            continue
        offset = (i - (n_rows - 1) / 2) * 0.04  # dodge: log2 units on a log axis, a share of the span otherwise
        span = xs_all[-1] - xs_all[0]
        xs = [x * 2 ** offset if log else x + offset * span * 0.5 for x, _, _ in pts]
        means, stds = [m for _, m, _ in pts], [sd for _, _, sd in pts]
        (line,) = ax.plot(xs, means, marker="o", label=display(r, table.names))
        ax.fill_between(xs, [m - sd for m, sd in zip(means, stds)], [m + sd for m, sd in zip(means, stds)],
                        color=line.get_color(), alpha=0.15, linewidth=0)
        ax.errorbar(xs, means, yerr=stds, color=line.get_color(), capsize=3, linestyle="none")
    if log:
        ax.set_xscale("log", base=2)
    ax.set_xticks(xs_all, [str(x) for x in xs_all])
    ax.minorticks_off()
    ax.set_xlabel("labeled images")
    ax.set_ylabel(_ylabel(table))
    ax.grid(alpha=0.3)
    if ax.get_lines():
        ax.legend(title=display(table.row_key, table.names), fontsize=8)
    ax.set_title(f"{title or 'label efficiency'}\n{_spread(table)} (bars and band)", fontsize=9)
    return fig


def single_partition_figure(table: Table, labeled: dict[str, int], title: str | None = None) -> "Figure":
    """One partition: each row's mean with its error bar side by side, and a title that says why there is no
    curve (a label-efficiency curve needs two or more partitions)."""
    fig = _figure()
    ax = fig.add_subplot()
    c = table.cols[0] if table.cols else None
    shown = [(r, cell) for r in table.rows
             if c is not None and (cell := table.cells.get((r, c))) is not None and cell.mean is not None]
    for i, (r, cell) in enumerate(shown):
        ax.errorbar([i], [cell.mean], yerr=[cell.std], marker="o", capsize=4, linestyle="none",
                    label=display(r, table.names))
    ax.set_xticks(range(len(shown)), [display(r, table.names) for r, _ in shown],
                  rotation=20 if len(shown) > 4 else 0)
    ax.set_xlim(-0.6, max(len(shown) - 0.4, 0.6))
    ax.set_ylabel(_ylabel(table))
    ax.grid(axis="y", alpha=0.3)
    n = labeled.get(c, c) if c is not None else "?"
    ax.set_title(f"{title or 'label efficiency'}\nonly one partition ({n} labeled images): no curve to draw\n"
                 f"{_spread(table)}", fontsize=9)
    return fig


def ablation_figure(table: Table, title: str | None = None) -> "Figure":
    """One bar per row (variant) and column, grouped by column; error bars = std over seeds; the baseline row
    hatched. Bars of cells without a mean are absent; each bar container is labelled with its column."""
    fig = _figure(max(4.0, 1.0 + 0.8 * len(table.rows) * len(table.cols)), 3.6)
    ax = fig.add_subplot()
    width = 0.8 / max(len(table.cols), 1)
    for j, c in enumerate(table.cols):
        xs, means, stds, hatches = [], [], [], []
        for i, r in enumerate(table.rows):
            cell = table.cells.get((r, c))
            if cell is None or cell.mean is None:
                continue
            xs.append(i + (j - (len(table.cols) - 1) / 2) * width)
            means.append(cell.mean)
            stds.append(cell.std)
            hatches.append("//" if r == table.baseline else "")
        bars = ax.bar(xs, means, width=width * 0.95, yerr=stds, capsize=3, label=c)
        for bar, hatch in zip(bars, hatches):
            bar.set_hatch(hatch)
    ax.set_xticks(range(len(table.rows)), [display(r, table.names) for r in table.rows],
                  rotation=20 if len(table.rows) > 4 else 0)
    ax.set_ylabel(_ylabel(table))
    ax.grid(axis="y", alpha=0.3)
    if len(table.cols) > 1:
        ax.legend(title=display(table.col_key, table.names), fontsize=8)
    means = [c.mean for c in table.cells.values() if c.mean is not None]
    if means:  # bars start at the axis: zoom to the data so differences of a point or two are visible
        lo, hi = min(means), max(means)
        pad = max(hi - lo, 1.0)
        ax.set_ylim(max(0.0, lo - 1.5 * pad), hi + 0.75 * pad)
    ax.set_title(f"{title or 'ablation'}\n{display(table.baseline or '', table.names)} (baseline) hatched\n"
                 f"error bars: {_spread(table)}", fontsize=9)
    return fig


CURVES_LEGEND_MAX = 30  # rows of a curves figure with a legend and std bands


def curves_figure(history: "pd.DataFrame", members: dict[tuple[str, str], list[str]], rows: list[str],
                  cols: list[str], metric: str = "val/miou", row_key: str = "", col_key: str = "",
                  names: dict[str, str] | None = None) -> "Figure":
    """``metric`` over iterations: one panel per column, one line per row (at each evaluated iteration the mean
    over the seeds that reached it), +- std band. ``members`` maps (row, col) to trial ids (``cell_members``).
    Above ``CURVES_LEGEND_MAX`` rows the legend and the bands are left out (and the title says so): a thousand
    entries name nothing, and drawing them took most of a 10,000-trial ``sslray plot``."""
    crowded = len(rows) > CURVES_LEGEND_MAX
    fig = _figure(max(4.5, 3.6 * len(cols)), 3.4)
    axes = fig.subplots(1, max(len(cols), 1), sharey=True, squeeze=False)[0]
    by_trial: dict[str, dict[int, float]] = defaultdict(dict)
    if len(history) and metric in history.columns:
        for tid, it, v in zip(history["trial_id"], history["iteration"], history[metric]):
            if v == v and it == it:  # not NaN
                by_trial[str(tid)][int(it)] = float(v)
    for ax, c in zip(axes, cols):
        crowd: list[list[tuple[int, float]]] = []  # crowded: one LineCollection, not a thousand Line2D artists
        for r in rows:
            series = [by_trial[t] for t in members.get((r, c), []) if by_trial.get(t)]
            if not series:
                continue
            its = sorted({i for s in series for i in s})
            vals = [[s[i] for s in series if i in s] for i in its]
            means = [statistics.fmean(v) for v in vals]
            if crowded:
                crowd.append(list(zip(its, means)))
                continue
            stds = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in vals]
            (line,) = ax.plot(its, means, label=display(r, names))
            ax.fill_between(its, [m - s for m, s in zip(means, stds)], [m + s for m, s in zip(means, stds)],
                            color=line.get_color(), alpha=0.2, linewidth=0)
        if crowd:
            import matplotlib
            from matplotlib.collections import LineCollection

            cycle = [p["color"] for p in matplotlib.rcParams["axes.prop_cycle"]]
            ax.add_collection(LineCollection(crowd, colors=[cycle[i % len(cycle)] for i in range(len(crowd))],
                                             linewidths=1.0))
            ax.autoscale_view()
        ax.set_title(f"{display(col_key, names)} = {c}" if col_key else c, fontsize=10)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(_ylabel(metric))
    if any(ax.get_lines() for ax in axes) and not crowded:
        axes[0].legend(title=display(row_key, names) if row_key else None, fontsize=8)
    fig.suptitle(f"mean over the seeds of {len(rows)} rows\n(legend and ± std bands left out above "
                 f"{CURVES_LEGEND_MAX} rows)" if crowded else "mean ± std over the seeds that reached each evaluation (band)", fontsize=9)
    return fig


def labeled_counts(planned: "list[PlannedTrial]", storage: str | None = None) -> dict[str, int]:
    """Partition label -> number of labeled images: the count itself (``"92"``), for a ratio (``"1_8"``) of the
    synthetic dataset its pool size times the ratio, else the line count of a stored ``splits/labeled.txt`` of any
    trial with that partition."""
    from sslray.data.splits import parse_partition_spec

    by_part: dict[str, list] = defaultdict(list)
    for t in planned:
        by_part[t.config.data.partition].append(t)
    out: dict[str, int] = {}
    for part, trials in by_part.items():
        cfg = trials[0].config
        if part.isdigit():
            out[part] = int(part)
        elif cfg.data.dataset == "synthetic":
            out[part] = parse_partition_spec(part, cfg.data.synthetic.num_train)
        else:
            layout = StudyStorage(storage or "")
            keys = [f"{layout.trial_key(t.trial_id)}/{SPLITS_DIR}/labeled.txt" for t in trials]
            found = next((k for k in keys if layout.exists(k)), None)
            if found is None:
                raise ValueError(f"partition {part!r}: its number of labeled images is known once one of its trials "
                                 f"has written {layout.display(keys[0])}")
            text = layout.read_bytes(found).decode("utf-8")
            out[part] = sum(1 for line in text.splitlines() if line.strip())
    return out


def applicable(study: "Study") -> list[str]:
    """The kinds that make sense for ``study``: efficiency when partitions are a table axis, ablation with an
    ablation section, curves always."""
    rep = study.report
    kinds = []
    if PARTITION in (rep.rows, rep.cols) and VARIANT not in (rep.rows, rep.cols):
        kinds.append("efficiency")
    if study.ablation is not None:
        kinds.append("ablation")
    return kinds + ["curves"]


def plot_study(study: "Study", df: "pd.DataFrame", history: "pd.DataFrame", out_dir: str,
               kinds: list[str] | None = None, fmt: str = "png", storage: str | None = None,
               metric: str | None = None, agg: str | None = None) -> list[str]:
    """Write each figure of ``kinds`` (default: :func:`applicable`) as ``<out_dir>/<kind>.<fmt>``; returns paths."""
    if fmt not in PLOT_FORMATS:
        raise ValueError(f"unknown plot format {fmt!r} (expected one of: {', '.join(PLOT_FORMATS)})")
    if study.search is not None:
        raise ValueError(f"{study.path}: plots need a grid or ablation study; a search has no table cells")
    kinds = kinds or applicable(study)
    rep = study.report
    metric, agg = metric or rep.metric, agg or rep.agg
    planned = study.trials(unique=False)
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for kind in kinds:
        if kind == "efficiency":
            table = study_report(study, df, sections=["efficiency"], metric=metric, agg=agg)["efficiency"]
            fig = efficiency_figure(table, labeled_counts(planned, storage), f"{study.name}: label efficiency")
        elif kind == "ablation":
            table = study_report(study, df, sections=["ablation"], metric=metric, agg=agg)["ablation"]
            fig = ablation_figure(table, f"{study.name}: ablation")
        elif kind == "curves":
            rows, cols, members = cell_members(df, planned, rep.rows, rep.cols)
            fig = curves_figure(history, members, rows, cols, metric, rep.rows, rep.cols, dict(rep.names))
        else:
            raise ValueError(f"unknown plot kind {kind!r} (expected one of: {', '.join(KINDS)})")
        path = os.path.join(out_dir, f"{kind}.{fmt}")
        save(fig, path)
        paths.append(path)
    return paths


def save(fig: "Figure", path: str) -> str:
    """Write ``fig`` atomically (:func:`sslray.storage.atomic_write`) in the format of ``path``'s extension."""
    import matplotlib

    fmt = os.path.splitext(path)[1].lstrip(".")
    metadata: dict[str, Any] = {"Software": "sslray"} if fmt == "png" else {"Creator": "sslray"}
    if fmt == "svg":
        metadata["Date"] = None  # with a fixed id salt: a re-plot of the same results gives the same bytes
    if fmt == "pdf":
        metadata["CreationDate"] = None
    with matplotlib.rc_context(RC):
        atomic_write(path, lambda f: fig.savefig(f, format=fmt, dpi=PNG_DPI, metadata=metadata))
    return path
