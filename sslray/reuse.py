"""Reuse across studies: take finished trials from another study's storage instead of training them again.

A trial id is the sha256 of everything that defines the trial (``TrialConfig.trial_id``), so a trial of this
study with the same id as an ``ok`` trial stored elsewhere would train the same thing. ``sslray run --reuse-from
DIR`` copies such rows (and their per-evaluation history) into this study's store before anything runs, with
provenance in two columns: ``reused_from`` (the other storage root) and ``reused_study`` (the study that trained
it); ``study`` becomes this study's name, so tables read the row like any other::

    taken = reuse_trials(study.trials(), "runs/voc_classic", StudyStorage("runs/voc_all"), study.name)

Only ``ok`` rows are taken (a failed or stopped trial is trained again), and a trial already in this study's
store is left alone. Reading the other store goes through :class:`sslray.results.ResultsStore`, so a damaged
file there is a StoreError naming it, and nothing of this study's store is touched by a failed read.
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Iterable

import pyarrow as pa
import pyarrow.parquet as pq

from sslray.results import ResultsStore
from sslray.storage import StudyStorage, atomic_write

if TYPE_CHECKING:
    from sslray.study import PlannedTrial


def reuse_trials(planned: Iterable["PlannedTrial"], source: str | os.PathLike, into: StudyStorage,
                 study: str) -> list[str]:
    """Copy the ``ok`` rows of ``source`` whose ids this study plans and lacks; returns the ids taken. The files
    are copied as Arrow tables (every column keeps its type and unit metadata), with ``study`` replaced and the
    provenance columns added; history first, then the row (a row file means the trial is complete)."""
    src_root = os.path.abspath(source)
    if not os.path.isdir(src_root):
        raise FileNotFoundError(f"--reuse-from {source}: no such directory")
    src, dst = ResultsStore(StudyStorage(src_root)), ResultsStore(into)
    if dst.root.exists() and os.path.samefile(src.root, dst.root):
        return []
    wanted = {p.trial_id for p in planned} - dst.ids()
    taken = []
    for tid in sorted(wanted & src.ids("ok")):
        history = src.storage.history_file(tid)
        if history.exists():
            _copy(history, into.history_file(tid), study, None)
        _copy(src.path(tid), into.result_file(tid), study, src_root)
        taken.append(tid)
    return taken


def _copy(path, dst, study: str, reused_from: str | None) -> None:
    """One store file with its ``study`` column set to ``study`` (and, for a row, the provenance columns)."""
    table = pq.read_table(path)
    n = table.num_rows
    old = table.column("study")
    i = table.schema.get_field_index("study")
    table = table.set_column(i, table.schema.field(i), pa.array([study] * n, pa.string()))
    if reused_from is not None:
        for name, values in (("reused_from", [reused_from] * n), ("reused_study", old.to_pylist())):
            if name in table.column_names:
                table = table.drop_columns([name])
            table = table.append_column(pa.field(name, pa.string()), pa.array(values, pa.string()))
    dst.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(dst, lambda f: pq.write_table(table, f))
