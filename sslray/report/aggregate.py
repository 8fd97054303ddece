"""Aggregation: result rows -> table cells (mean +- sample std over seeds, with each cell's state).

A :class:`Table` is rows x cols of :class:`Cell`; rows and columns are labels along dotted config keys
(``method.name`` x ``data.partition``) or ``variant``. Cells and their order come from the study's plan
(``study.trials(unique=False)``) when given, else from the results' ``cfg.<key>`` columns::

    table = comparison_table(store.load(), study.trials(unique=False), "method.name", "data.partition",
                             baseline="supervised")
    table.cells[("fixmatch", "16")]   # Cell(mean=36.0, std=1.0, n=3, status="ok", planned=3, ok=((0, id, 35.0), ...))

Cell states: ``ok`` (every planned seed reported), ``partial`` (some failed or are missing: the mean uses the ok
ones), ``failed`` (no ok seed and at least one failure, with the reasons), ``missing`` (planned, nothing stored),
``na`` (the trials ran but the quantity does not apply, e.g. a pseudo-label rate of a supervised run).
:class:`Listing` is the other shape a report section takes: plain rows of text (manifest, cost, search).
"""
from __future__ import annotations

import math
import re
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping

from sslray import stats
from sslray.study import VARIANT, PlannedTrial, cell_label, row_label

if TYPE_CHECKING:
    import pandas as pd

Key = tuple[str, str]


@dataclass(frozen=True)
class Cell:
    """One table cell: ``mean``/``std`` over the ``n`` ok seeds (None without any), of ``planned`` trials.

    ``ok`` lists ``(seed, trial_id, value)`` of the trials behind the mean, for paired tests and bootstraps.
    """

    mean: float | None
    std: float | None
    n: int
    status: str  # ok | partial | failed | missing | na
    reason: str | None = None
    planned: int = 0
    ok: tuple[tuple[int, str, float], ...] = ()

    def by_seed(self) -> dict[int, float]:
        return {seed: v for seed, _, v in self.ok}


@dataclass
class Table:
    """A rows x cols table of cells plus what the renderers print beside them (all optional)."""

    rows: list[str]
    cols: list[str]
    cells: dict[Key, Cell]
    metric: str
    baseline: str | None
    row_key: str = "method.name"
    col_key: str = "data.partition"
    agg: str = "last"
    mode: str = "max"
    title: str | None = None
    mark_best: bool = True
    tests: dict[Key, stats.TestResult] = field(default_factory=dict)
    p_holm: dict[Key, float] = field(default_factory=dict)
    alpha: float = 0.05
    untested: list[Key] = field(default_factory=list)  # cells against the baseline with fewer than 2 paired seeds
    ci: dict[Key, tuple[float, float]] = field(default_factory=dict)
    ci_note: str | None = None
    paper: dict[Key, float] = field(default_factory=dict)
    paper_source: str | None = None
    row_notes: dict[str, str] = field(default_factory=dict)
    notes_header: str = "changes"
    notes: list[str] = field(default_factory=list)
    names: dict[str, str] = field(default_factory=dict)  # display names overriding sslray.report.names
    keyed_header: bool = True  # column headers "<metric>, <col key>: <value>" (False: the values alone)

    def _means(self, col: str) -> dict[str, float]:
        cells = {r: self.cells.get((r, col)) for r in self.rows}
        return {r: c.mean for r, c in cells.items() if c is not None and c.mean is not None}

    def _ranked(self, col: str) -> list[float]:
        return sorted(set(self._means(col).values()), reverse=self.mode == "max")

    def best(self, col: str) -> list[str]:
        """Rows holding the best mean of ``col`` (all of them on an exact tie)."""
        ranked = self._ranked(col)
        return [r for r, m in self._means(col).items() if m == ranked[0]] if ranked else []

    def second(self, col: str) -> list[str]:
        """Rows holding the next-best distinct mean of ``col``; none with fewer than three rows with a mean (with
        two, "second" is just "last") or when two rows tie for the best (competition ranking: 1, 1, 3)."""
        means, ranked = self._means(col), self._ranked(col)
        if len(means) < 3 or len(ranked) < 2 or len(self.best(col)) > 1:  # a tie for first leaves no second
            return []
        return [r for r, m in means.items() if m == ranked[1]]

    def delta(self, row: str, col: str) -> float | None:
        """``mean(row) - mean(baseline)`` in ``col``; None for the baseline itself or when either has no mean."""
        if self.baseline is None or row == self.baseline:
            return None
        base, cell = self.cells.get((self.baseline, col)), self.cells.get((row, col))
        if base is None or cell is None or base.mean is None or cell.mean is None:
            return None
        return cell.mean - base.mean

    def significant(self, row: str, col: str) -> bool:
        p = self.p_holm.get((row, col))
        return p is not None and p < self.alpha


@dataclass
class Listing:
    """A plain table of text: manifests, costs, search results. ``notes`` print under it."""

    header: list[str]
    rows: list[list[str]]
    title: str | None = None
    notes: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------------------
# building


def comparison_table(df: "pd.DataFrame", planned: list[PlannedTrial] | None, rows: str, cols: str,
                     metric: str = "val/miou", agg: str = "last", baseline: str | None = None,
                     mode: str = "max") -> Table:
    """The rows x cols table of ``metric`` from result rows ``df`` (``ResultsStore.load()``).

    With ``planned`` (pass ``study.trials(unique=False)``, so that a trial shared by two cells counts in both) the
    cells and their order come from the plan, rows of ``df`` outside it are ignored, and planned trials without a
    row are ``missing``. Without it, cells come from ``df``'s ``cfg.<key>`` / ``variant`` columns, sorted
    (numbers and ``a_b`` ratios by value). ``agg="best"`` reads the ``best/<metric>`` columns.
    """
    if agg not in ("last", "best"):
        raise ValueError(f"agg must be 'last' or 'best', got {agg!r}")
    if mode not in ("max", "min"):
        raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
    column = metric if agg == "last" else f"best/{metric}"
    records = records_by_id(df, column, ("status", "reason", "seed", column, "platform"))
    row_order, col_order, members = cell_members(df, planned, rows, cols)
    if baseline is not None and baseline not in row_order:
        raise ValueError(f"baseline {baseline!r} is not a row (rows: {', '.join(row_order)})")
    cells = {key: aggregate(ids, records, lambda rec: rec.get(column), f"no {column} reported")
             for key, ids in members.items()}
    notes = platform_notes(records, {tid for ids in members.values() for tid in ids})
    return Table(row_order, col_order, cells, metric, baseline, rows, cols, agg, mode, notes=notes)


def platform_notes(records: Mapping[str, Mapping[str, Any]], ids: Iterable[str]) -> list[str]:
    """One line when the table's stored trials ran on more than one numerics platform (``platform`` column: torch
    build, CPU kernels, threads, GPU): the same config and seed is not bit-identical across them, so a row-to-row
    gap may be partly the machine's (issue 11 measured up to 8 mIoU at one seed on the synthetic default)."""
    counts: dict[str, int] = defaultdict(int)
    unknown = 0
    for tid in ids:
        rec = records.get(tid)
        if rec is not None:
            p = text_of(rec.get("platform"))
            counts[p] += bool(p)
            unknown += not p
    counts.pop("", None)
    parts = ", ".join(f"{n} on {p!r}" for p, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
    where = "sslray table --manifest lists which trial ran where."
    if len(counts) > 1:
        more = f", and {unknown} stored without a platform" if unknown else ""
        return [f"Trials from {len(counts)} platforms ({parts}{more}): one config and seed gives different numbers "
                f"on each; {where}"]
    if counts and unknown:
        return [f"{unknown} trial(s) stored without a platform (before sslray recorded it) beside {parts}: if they "
                f"ran elsewhere, one config and seed gives different numbers there; {where}"]
    return []


def cell_members(df: "pd.DataFrame", planned: list[PlannedTrial] | None, rows: str,
                 cols: str) -> tuple[list[str], list[str], dict[Key, list[str]]]:
    """(row labels, column labels, (row, col) -> trial ids): from the plan when given, else from ``df``."""
    if planned is not None:
        members = _members_from_plan(planned, rows, cols)
        return _ordered(k[0] for k in members), _ordered(k[1] for k in members), members
    members = _members_from_results(df, records_by_id(df, None), rows, cols)
    return (sorted({k[0] for k in members}, key=_natural_key), sorted({k[1] for k in members}, key=_natural_key),
            members)


def records_by_id(df: "pd.DataFrame", column: str | None,
                  keep: Iterable[str] | None = None) -> dict[str, dict[str, Any]]:
    """trial_id -> its row as a dict (only the columns in ``keep`` that exist, when given); ValueError if ok rows
    exist but ``column`` does not (a mistyped metric)."""
    if len(df) == 0:
        return {}
    if column is not None and column not in df.columns and (df["status"] == "ok").any():
        metrics = sorted(c for c in df.columns if "/" in c and not c.startswith("val/iou/"))
        raise ValueError(f"no column {column!r} in the results (metric columns: {', '.join(metrics)})")
    if keep is not None:
        df = df[["trial_id", *dict.fromkeys(c for c in keep if c in df.columns and c != "trial_id")]]
    from sslray.results import row_dicts

    return {str(r["trial_id"]): r for r in row_dicts(df)}



def _members_from_plan(planned: list[PlannedTrial], rows: str, cols: str) -> dict[Key, list[str]]:
    """(row, col) -> distinct trial ids; ValueError if a cell holds two different trials with the same seed (an axis
    of the study that is neither rows nor cols: averaging those would pass configs off as seeds)."""
    members: dict[Key, list[str]] = defaultdict(list)
    seeds: dict[Key, dict[int, PlannedTrial]] = defaultdict(dict)
    for t in planned:
        key = (row_label(t, rows), row_label(t, cols))
        other = seeds[key].setdefault(t.seed, t)
        if other.trial_id != t.trial_id:
            raise ValueError(f"cell ({key[0]}, {key[1]}) holds two trials with seed {t.seed} ({other.point} and "
                             f"{t.point}): choose rows/cols that cover every varied axis, or pass a slice of the "
                             "plan")
        if t.trial_id not in members[key]:
            members[key].append(t.trial_id)
    return dict(members)


def _members_from_results(df: "pd.DataFrame", records: dict, rows: str, cols: str) -> dict[Key, list[str]]:
    columns = [VARIANT if key == VARIANT else f"cfg.{key}" for key in (rows, cols)]
    for c in columns:
        if records and c not in df.columns:
            raise ValueError(f"no column {c!r} in the results")
    members: dict[Key, list[str]] = defaultdict(list)
    seeds: dict[Key, set] = defaultdict(set)
    for tid, rec in records.items():
        key = (_label(rec[columns[0]]), _label(rec[columns[1]]))
        seed = rec.get("seed")
        if seed is not None and seed in seeds[key]:
            raise ValueError(f"cell ({key[0]}, {key[1]}) holds two trials with seed {seed}: choose rows/cols that "
                             "cover every varied config key, or pass a slice of the results")
        seeds[key].add(seed)
        members[key].append(tid)
    return dict(members)


def _label(value: Any) -> str:
    if is_missing(value):
        return ""
    return cell_label(value)


def _ordered(labels: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(labels))


def _natural_key(label: str) -> tuple:
    """Numbers by value (``"16" < "128"``), ``a_b`` ratios by value (``"1_16" < "1_8"``), then text."""
    m = re.fullmatch(r"(\d+)_(\d+)", label)
    if m and int(m.group(2)):
        return (0, int(m.group(1)) / int(m.group(2)), label)
    try:
        return (0, float(label), label)
    except ValueError:
        return (1, 0.0, label)


def aggregate(ids: list[str], records: dict[str, dict[str, Any]], value: Callable[[dict], Any],
              absent: str | None) -> Cell:
    """Aggregate the trials ``ids``. ``value(record)`` is the number of one ok trial; when it is missing the trial
    counts as failed with reason ``absent``, or, with ``absent=None``, the quantity does not apply (``na``)."""
    ok, failures, missing, na = [], [], 0, 0
    for tid in ids:
        rec = records.get(tid)
        if rec is None:
            missing += 1
        elif rec.get("status") != "ok":
            failures.append(text_of(rec.get("reason")) or "no reason recorded")
        elif is_missing(v := value(rec)):
            if absent is None:
                na += 1
            else:
                failures.append(absent)
        else:
            ok.append((_seed(rec.get("seed")), tid, float(v)))
    notes = _notes(failures, missing)
    values = [v for _, _, v in ok]
    if values:
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        status = "ok" if len(values) + na == len(ids) and not failures and not missing else "partial"
        return Cell(statistics.fmean(values), std, len(values), status, notes or None, len(ids), tuple(ok))
    if failures:
        return Cell(None, None, 0, "failed", "; ".join(dict.fromkeys(failures)), len(ids))
    if na:
        return Cell(None, None, 0, "na", notes or None, len(ids))
    return Cell(None, None, 0, "missing", None, len(ids))


def _seed(v: Any) -> int:
    return -1 if is_missing(v) else int(v)


def _notes(failures: list[str], missing: int) -> str:
    parts = [f"{len(failures)} failed: {'; '.join(dict.fromkeys(failures))}"] if failures else []
    return ", ".join(parts + ([f"{missing} missing"] if missing else []))


def is_missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def text_of(v: Any) -> str:
    return "" if is_missing(v) else str(v)


def cells_per_column(row_order, col_order, members, records, columns: list[str],
                      value_of: Callable[[str], Callable[[dict], float | None]], missing: str | None):
    """Tables whose rows are the study's cells and whose columns are quantities: one row label per (row, col)
    cell with trials, each column aggregated over the cell's trials with ``value_of(column)``."""
    labels, cells = [], {}
    for r in row_order:
        for c in col_order:
            if (r, c) not in members:
                continue
            label = r if len(col_order) == 1 else f"{r} / {c}"
            labels.append(label)
            for name in columns:
                cells[(label, name)] = aggregate(members[(r, c)], records, value_of(name), missing)
    return labels, cells
