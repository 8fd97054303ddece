"""Paper tables derived from the results store, never typed by hand.

One entry point, :func:`study_report` (``sections.py``): the CLI's ``sslray table``, the W&B summary run and the
figures all take their tables from it::

    from sslray.report import render, study_report
    for section in study_report(study, store.load(), store.load_history()).values():
        print(render(section, "markdown"))          # or latex (booktabs), csv, html

The parts, one direction (each imports only the ones above it, and ``sslray.study`` for plan types; the study never
imports the report):

* ``aggregate.py``: result rows -> :class:`Cell` (mean +- std over seeds, state) -> :class:`Table`; :class:`Listing`;
  :func:`comparison_table`, :func:`cell_members`;
* ``significance.py``: paired tests against the baseline (Holm), bootstrap CIs, paper numbers beside the cells
  (the paper-numbers file is read by ``sslray.study.load_paper_numbers``, while the study loads);
* ``extra.py``: ablation, per-class IoU, pseudo-label quality, cost, manifest, search listings;
* ``render.py``: markdown / latex / csv / html, and :func:`frame` for ``wandb.Table``;
* ``sections.py``: :func:`study_report`, which sections a study has and what the report block sets.
"""
from sslray.report.aggregate import Cell, Listing, Table, cell_members, comparison_table
from sslray.report.extra import (ablation_table, cost_listing, manifest, per_class_table, pseudo_table,
                                 search_listings)
from sslray.report.render import FORMATS, frame, render
from sslray.report.sections import FIGURE_SECTIONS, GRID_SECTIONS, SEARCH_SECTIONS, study_report
from sslray.report.significance import with_bootstrap, with_paper_numbers, with_significance
from sslray.study import PaperNumbers, load_paper_numbers

__all__ = ["Cell", "Listing", "Table", "cell_members", "comparison_table", "ablation_table", "cost_listing",
           "manifest", "per_class_table", "pseudo_table", "search_listings", "FORMATS", "frame", "render",
           "FIGURE_SECTIONS", "GRID_SECTIONS", "SEARCH_SECTIONS", "study_report", "with_bootstrap",
           "with_paper_numbers", "with_significance", "PaperNumbers", "load_paper_numbers"]
