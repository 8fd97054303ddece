"""Paper figures derived from the results store (matplotlib, PNG or SVG)::

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
from sslray.report.sections import PARTITION
from sslray.storage import SPLITS_DIR, StudyStorage, atomic_write
from sslray.study import VARIANT

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure

    from sslray.study import PlannedTrial, Study

KINDS = ("efficiency", "ablation", "curves")
PLOT_FORMATS = ("png", "svg")


def _figure(width: float = 5.0, height: float = 3.6) -> "Figure":
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _ylabel(metric: str) -> str:
    return {"val/miou": "mIoU (%)", "val/pixel_acc": "pixel accuracy (%)"}.get(metric, metric)


def efficiency_figure(table: Table, labeled: dict[str, int], title: str | None = None) -> "Figure":
    """Mean of each row against the number of labeled images of each column (``labeled[col]``), seed std band.

    ``table`` has methods as rows and partitions as columns (``comparison_table(..., cols="data.partition")``).
    Each line's label is its row; cells without a mean are left out of the line.
    """
    fig = _figure()
    ax = fig.add_subplot()
    for r in table.rows:
        pts = sorted((labeled[c], cell.mean, cell.std) for c in table.cols
                     if (cell := table.cells.get((r, c))) is not None and cell.mean is not None)
        if not pts:
            continue
        xs, means, stds = zip(*pts)
        (line,) = ax.plot(xs, means, marker="o", label=r)
        if len(xs) > 1:
            ax.fill_between(xs, [m - s for m, s in zip(means, stds)], [m + s for m, s in zip(means, stds)],
                            color=line.get_color(), alpha=0.2, linewidth=0)
        else:
            ax.errorbar(xs, means, yerr=stds, color=line.get_color(), capsize=4, linestyle="none")
    xs = sorted(set(labeled[c] for c in table.cols))
    if xs and xs[-1] >= 4 * xs[0]:
        ax.set_xscale("log", base=2)
    ax.set_xticks(xs, [str(x) for x in xs])
    ax.minorticks_off()
    ax.set_xlabel("labeled images")
    ax.set_ylabel(_ylabel(table.metric))
    ax.grid(alpha=0.3)
    if ax.get_lines():
        ax.legend(title=table.row_key)
    ax.set_title(title or f"label efficiency ({'mean' if table.agg == 'last' else 'best'} +- std over seeds)",
                 fontsize=10)
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
    ax.set_xticks(range(len(table.rows)), table.rows, rotation=20 if len(table.rows) > 4 else 0)
    ax.set_ylabel(_ylabel(table.metric))
    ax.grid(axis="y", alpha=0.3)
    if len(table.cols) > 1:
        ax.legend(title=table.col_key)
    means = [c.mean for c in table.cells.values() if c.mean is not None]
    if means:  # bars start at the axis: zoom to the data so differences of a point or two are visible
        lo, hi = min(means), max(means)
        pad = max(hi - lo, 1.0)
        ax.set_ylim(max(0.0, lo - 1.5 * pad), hi + 0.75 * pad)
    ax.set_title(title or f"ablation ({table.baseline} hatched; mean +- std over seeds)", fontsize=10)
    return fig


def curves_figure(history: "pd.DataFrame", members: dict[tuple[str, str], list[str]], rows: list[str],
                  cols: list[str], metric: str = "val/miou", row_key: str = "", col_key: str = "") -> "Figure":
    """``metric`` over iterations: one panel per column, one line per row (at each evaluated iteration the mean
    over the seeds that reached it), +- std band. ``members`` maps (row, col) to trial ids (``cell_members``)."""
    fig = _figure(max(4.5, 3.6 * len(cols)), 3.4)
    axes = fig.subplots(1, max(len(cols), 1), sharey=True, squeeze=False)[0]
    by_trial: dict[str, dict[int, float]] = defaultdict(dict)
    if len(history) and metric in history.columns:
        for tid, it, v in zip(history["trial_id"], history["iteration"], history[metric]):
            if v == v and it == it:  # not NaN
                by_trial[str(tid)][int(it)] = float(v)
    for ax, c in zip(axes, cols):
        for r in rows:
            series = [by_trial[t] for t in members.get((r, c), []) if by_trial.get(t)]
            if not series:
                continue
            its = sorted({i for s in series for i in s})
            vals = [[s[i] for s in series if i in s] for i in its]
            means = [statistics.fmean(v) for v in vals]
            stds = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in vals]
            (line,) = ax.plot(its, means, label=r)
            ax.fill_between(its, [m - s for m, s in zip(means, stds)], [m + s for m, s in zip(means, stds)],
                            color=line.get_color(), alpha=0.2, linewidth=0)
        ax.set_title(f"{col_key} = {c}" if col_key else c, fontsize=10)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(_ylabel(metric))
    if any(ax.get_lines() for ax in axes):
        axes[0].legend(title=row_key or None)
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
            fig = curves_figure(history, members, rows, cols, metric, rep.rows, rep.cols)
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
    with matplotlib.rc_context({"svg.hashsalt": "sslray"}):
        atomic_write(path, lambda f: fig.savefig(f, format=fmt, dpi=150, metadata=metadata))
    return path
