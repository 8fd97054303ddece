"""Significance against the baseline row, bootstrap CIs over validation images, and published numbers beside
the reproduced ones; each takes a :class:`~sslray.report.aggregate.Table` and returns an annotated copy::

    table = with_significance(table, test="auto", alpha=0.05)   # paired over seeds, Holm across the table
    table = with_bootstrap(table, store.load(), n_boot=1000)     # CIs of the delta (or of the mean)
    table = with_paper_numbers(table, load_paper_numbers(path))  # the loader lives beside the study loader

The tests themselves (paired t, exact Wilcoxon, Holm, percentile bootstrap) are :mod:`sslray.stats`.
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from sslray import stats
from sslray.report.aggregate import Cell, Table
from sslray.results import nested

if TYPE_CHECKING:
    import pandas as pd

    from sslray.study import PaperNumbers


def with_significance(table: Table, test: str = "auto", alpha: float = 0.05) -> Table:
    """Paired tests of every row against the baseline row in each column, over the seeds both have.

    ``test``: ``t`` (paired t-test), ``wilcoxon`` (exact signed-rank), ``auto`` (Wilcoxon from
    ``stats.WILCOXON_MIN_N`` pairs on, t below: see :mod:`sslray.stats`), or ``none``. The p-values are Holm-adjusted
    across the whole table (every tested cell is one hypothesis) and a cell is marked when its adjusted p is below
    ``alpha``. Cells with fewer than two paired seeds are listed as untested. Without a baseline: unchanged.
    """
    if test not in stats.TESTS:
        raise ValueError(f"significance test must be one of {', '.join(stats.TESTS)}; got {test!r}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha!r}")
    if test == "none" or table.baseline is None:
        return table
    tests, untested = {}, []
    for c in table.cols:
        base = table.cells.get((table.baseline, c))
        for r in table.rows:
            cell = table.cells.get((r, c))
            if r == table.baseline or cell is None or cell.mean is None or base is None or base.mean is None:
                continue
            a, b = cell.by_seed(), base.by_seed()
            common = sorted(set(a) & set(b))
            if len(common) < 2:
                untested.append((r, c))
                continue
            tests[(r, c)] = stats.paired_test([a[s] for s in common], [b[s] for s in common], test)
    keys = list(tests)
    adjusted = dict(zip(keys, stats.holm([tests[k].p for k in keys])))
    return dataclasses.replace(table, tests=tests, p_holm=adjusted, alpha=alpha, untested=untested)


def with_bootstrap(table: Table, df: "pd.DataFrame", n_boot: int = 1000, confidence: float = 0.95,
                   seed: int = 0) -> Table:
    """Percentile CIs over validation images from the stored per-image counts (``val/per_image``).

    Each resample draws the validation images with replacement, once for the whole table, and recomputes every
    trial's mIoU on it (dataset-level intersection over union, as the metric itself); a cell's value is the mean
    over its seeds. With a baseline the CI is that of the delta (so it is paired by image), else of the cell
    mean. Only ``val/miou`` of the last evaluation has per-image counts.
    """
    if table.metric != "val/miou" or table.agg != "last":
        raise ValueError("bootstrap CIs need --metric val/miou and --agg last: per-image counts are stored for the "
                         "last evaluation's mIoU only")
    if n_boot < 1:
        raise ValueError(f"bootstrap needs at least 1 resample, got {n_boot}")
    import numpy as np

    counts = _per_image_counts(df)
    if not counts:
        return dataclasses.replace(table, notes=table.notes + [
            "bootstrap: no per-image statistics stored (trials from before sslray stored val/per_image)"])
    sizes = {v[0].shape[0] for v in counts.values()}
    if len(sizes) != 1:
        raise ValueError(f"bootstrap: trials were validated on different numbers of images ({sorted(sizes)})")
    n_images = sizes.pop()
    weights = stats.resample_weights(n_images, n_boot, seed)

    def samples(cell: Cell | None):
        if cell is None or not cell.ok or any(tid not in counts for _, tid, _ in cell.ok):
            return None
        return np.mean([stats.bootstrap_miou(*counts[tid], weights) for _, tid, _ in cell.ok], axis=0)

    per_cell = {k: samples(cell) for k, cell in table.cells.items()}
    ci = {}
    for (r, c), s in per_cell.items():
        if s is None:
            continue
        if table.baseline is None:
            ci[(r, c)] = stats.percentile_ci(s, confidence)
        elif r != table.baseline and per_cell.get((table.baseline, c)) is not None:
            ci[(r, c)] = stats.percentile_ci(s - per_cell[(table.baseline, c)], confidence)
    what = f"of the delta against {table.baseline}" if table.baseline else "of the mean over seeds"
    note = (f"[lo, hi]: {confidence:.0%} bootstrap CI {what} over the {n_images} validation images "
            f"({n_boot} resamples, seed {seed}; seeds averaged within each resample)")
    return dataclasses.replace(table, ci=ci, ci_note=note)


def _per_image_counts(df: "pd.DataFrame") -> dict[str, tuple[Any, Any]]:
    """trial_id -> (inter [N, K], union [N, K]) float arrays from the ``val/per_image`` JSON column."""
    import numpy as np

    if "val/per_image" not in df.columns:
        return {}
    out = {}
    for tid, raw in zip(df["trial_id"], df["val/per_image"]):
        d = nested(raw)  # an Arrow struct of lists, or JSON text in stores from before issue 17
        if d:
            out[str(tid)] = (np.asarray(d["inter"], dtype=np.float64), np.asarray(d["union"], dtype=np.float64))
    return out


def with_paper_numbers(table: Table, paper: PaperNumbers) -> Table:
    """Print ``paper``'s numbers beside the reproduced ones (a ``paper`` column after each column that has any)."""
    if paper.metric is not None and paper.metric != table.metric:
        raise ValueError(f"paper numbers are {paper.metric}, the table shows {table.metric}")
    numbers = {k: v for k, v in paper.numbers.items() if k[0] in table.rows and k[1] in table.cols}
    return dataclasses.replace(table, paper=numbers, paper_source=paper.source)
