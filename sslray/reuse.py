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

import pandas as pd

from sslray.results import ResultsStore
from sslray.storage import StudyStorage

if TYPE_CHECKING:
    from sslray.study import PlannedTrial


def reuse_trials(planned: Iterable["PlannedTrial"], source: str | os.PathLike, into: StudyStorage,
                 study: str) -> list[str]:
    """Copy the ``ok`` rows of ``source`` whose ids this study plans and lacks; returns the ids taken."""
    src_root = os.path.abspath(source)
    if not os.path.isdir(src_root):
        raise FileNotFoundError(f"--reuse-from {source}: no such directory")
    src, dst = ResultsStore(StudyStorage(src_root)), ResultsStore(into)
    if os.path.samefile(src.root, dst.root) if dst.root.exists() else False:
        return []
    wanted = {p.trial_id for p in planned} - dst.ids()
    rows = src.load()
    if not len(rows):
        return []
    rows = rows[(rows["status"] == "ok") & rows["trial_id"].isin(wanted)]
    taken = []
    for row in rows.to_dict("records"):
        tid = row["trial_id"]
        history = _history(src, tid)
        row = {k: (None if _missing(v) else _plain(v)) for k, v in row.items()}
        row.update({"reused_study": row.get("study"), "reused_from": src_root, "study": study})
        dst.write(row, [{k: None if _missing(v) else _plain(v) for k, v in h.items() if k not in ("study", "trial_id")}
                        for h in history])
        taken.append(tid)
    return taken


def _history(store: ResultsStore, trial_id: str) -> list[dict]:
    path = store.storage.history_file(trial_id)
    return pd.read_parquet(path).to_dict("records") if path.exists() else []


def _missing(v) -> bool:
    try:
        return v is None or bool(pd.isna(v))
    except (TypeError, ValueError):
        return False


def _plain(v):
    return v.item() if hasattr(v, "item") and not isinstance(v, (str, bytes)) else v
