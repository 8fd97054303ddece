"""``study_report``: the one route from a study and its stored results to the tables that describe it.

The CLI's ``sslray table`` prints its sections, the W&B summary run logs them (``tracking.log_study``), and the
figures (``plots.plot_study``) draw theirs, so the three cannot drift apart::

    df, history = store.load(), store.load_history()
    report = study_report(study, df, history)                       # {"comparison": Table}
    report = study_report(study, df, history, sections=GRID_SECTIONS)
    report = study_report(study, df, sections=("comparison",), rows="method.name", bootstrap=1000)
    print("\\n".join(render(section, "markdown") for section in report.values()))

Sections of a grid or ablation study: ``comparison`` (the comparison table, or the ablation table when rows are
the variants against the ablation's own baseline; with significance, bootstrap CIs and paper numbers as the
report block or the keyword arguments say), ``per_class``, ``pseudo_labels`` (needs ``history``), ``cost``,
``manifest``, and for the figures ``efficiency`` (rows x partitions, nothing added) and ``ablation``. A search
study always gets ``best_configs``, ``importances`` and ``history`` (or one ``search`` listing before any trial is
stored). Keyword arguments left None take the study's ``report`` block.
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Callable

from sslray.report.aggregate import Listing, Table, comparison_table
from sslray.report.extra import (ablation_table, cost_listing, manifest, per_class_table, pseudo_table,
                                 search_listings)
from sslray.report.significance import with_bootstrap, with_paper_numbers, with_significance
from sslray.study import VARIANT, load_paper_numbers

if TYPE_CHECKING:
    import pandas as pd

    from sslray.study import Study

PARTITION = "data.partition"
GRID_SECTIONS = ("comparison", "per_class", "pseudo_labels", "cost", "manifest")  # what the W&B summary holds
FIGURE_SECTIONS = ("efficiency", "ablation")
SEARCH_SECTIONS = ("best_configs", "importances", "history")


def study_report(study: "Study", df: "pd.DataFrame", history: "pd.DataFrame | None" = None,
                 sections: "tuple[str, ...] | list[str] | None" = None, *, metric: str | None = None,
                 rows: str | None = None, cols: str | None = None, baseline: str | None = None,
                 agg: str | None = None, significance: str | None = None, alpha: float | None = None,
                 bootstrap: int | None = None, paper: str | None = None) -> "dict[str, Table | Listing]":
    """Section name -> Table or Listing, in the order of ``sections`` (default: ``("comparison",)``).

    ``df`` is ``ResultsStore.load()``; ``history`` (``load_history()``) is needed only by ``pseudo_labels``. Raises
    ValueError for an unknown section or one the study cannot have (``ablation`` without an ablation section).
    """
    if study.search is not None:
        listings = search_listings(study, df)
        return {"search": listings[0]} if len(listings) == 1 else dict(zip(SEARCH_SECTIONS, listings))
    rep = study.report
    planned = study.trials(unique=False)
    rows, cols = rows or rep.rows, cols or rep.cols
    metric, agg = metric or rep.metric, agg or rep.agg

    def comparison() -> Table:
        base = baseline or rep.baseline
        if study.ablation is not None and rows == VARIANT and base == study.ablation.baseline:
            table = ablation_table(study, df, metric, agg, cols)
        else:
            table = comparison_table(df, planned, rows, cols, metric, agg, base)
        table = with_significance(table, significance or rep.significance, rep.alpha if alpha is None else alpha)
        n_boot = rep.bootstrap if bootstrap is None else bootstrap
        if n_boot:
            table = with_bootstrap(table, df, n_boot)
        paper_file = paper or rep.paper_numbers
        return with_paper_numbers(table, load_paper_numbers(paper_file)) if paper_file else table

    def pseudo_labels() -> Table:
        if history is None:
            raise ValueError("the pseudo_labels section needs the per-evaluation history (ResultsStore.load_history())")
        return pseudo_table(df, history, planned, rows, cols)

    def efficiency() -> Table:
        lines = rows if cols == PARTITION else cols
        return comparison_table(df, planned, lines, PARTITION, metric, agg)

    builders: dict[str, Callable[[], "Table | Listing"]] = {
        "comparison": comparison, "pseudo_labels": pseudo_labels, "efficiency": efficiency,
        "ablation": lambda: ablation_table(study, df, metric, agg),
        "per_class": lambda: per_class_table(df, planned, rows, cols),
        "cost": lambda: cost_listing(df, planned, rows, cols),
        "manifest": lambda: manifest(df, planned, rows, cols)}
    out = {}
    for name in sections or ("comparison",):
        if name not in builders:
            raise ValueError(f"unknown report section {name!r} (expected one of: {', '.join(builders)})")
        section = builders[name]()
        out[name] = dataclasses.replace(section, names=dict(rep.names)) if isinstance(section, Table) else section
    return out
