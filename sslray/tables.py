"""Paper tables derived from the results store, never typed by hand.

Rows and columns are dotted config keys (``method.name`` x ``data.partition``) or ``variant`` (an ablation's rows).
A cell is mean +- sample std over seeds with its n; the best mean of each column is bold and the second best
underlined (with three or more rows), and with a baseline row every other row gets a delta column (its mean minus
the baseline's), a paired test over seeds against the baseline (Holm-corrected across the table, marked with a
dagger and listed in a footnote), and optionally a bootstrap CI over validation images::

    table = comparison_table(store.load(), study.trials(unique=False), "method.name", "data.partition",
                             baseline="supervised")
    table = with_significance(table, test="auto", alpha=0.05)
    print(render(table, "markdown"))          # or latex (booktabs), csv, html

| method.name | 16 | Δ 16 |
| --- | ---: | ---: |
| supervised | 32.0 ± 2.0 (n=3) |  |
| fixmatch | <u>36.0 ± 1.0 (n=3)</u>† | +4.0 |
| unimatch | **40.0 ± 2.6 (n=3)**† | +8.0 |

† p < 0.05 against supervised: paired t-test over seeds, two-sided, Holm-corrected over 2 comparisons. Holm p: ...

Cell states: ``ok`` (every planned seed reported), ``partial`` (some failed or are missing: the mean uses the ok
ones, shown as ``(n=2 of 3)``), ``failed`` (no ok seed and at least one failure: ``failed (<reason>)``), ``missing``
(planned, nothing stored yet), ``na`` (the trials ran but the quantity does not apply, e.g. a pseudo-label rate of
a supervised run: ``–``).

Besides the comparison table: :func:`ablation_table` (variants in declared order with what each changes),
:func:`per_class_table` (IoU per class from the stored confusion matrices), :func:`pseudo_table` (mask ratio and
pseudo-label accuracy), :func:`cost_listing` (GPU/CPU-hours per cell with a forecast for what is missing),
:func:`manifest` (what reproduces each trial) and :func:`search_listings` (best configs, Optuna parameter
importances, history of a search study).
"""
from __future__ import annotations

import csv
import dataclasses
import html
import io
import json
import math
import re
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable

from sslray import stats
from sslray.config import ConfigError, load_yaml
from sslray.study import VARIANT, PlannedTrial, cell_label, row_label

if TYPE_CHECKING:
    import pandas as pd

    from sslray.study import Study

FORMATS = ("markdown", "latex", "csv", "html")
REASON_CHARS = 60  # a failure reason is a hint in a table cell; the full text is in the results row
MARK = "†"  # significant against the baseline after Holm's correction
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
    records = _records(df, column)
    row_order, col_order, members = cell_members(df, planned, rows, cols)
    if baseline is not None and baseline not in row_order:
        raise ValueError(f"baseline {baseline!r} is not a row (rows: {', '.join(row_order)})")
    cells = {key: _cell(ids, records, lambda rec: rec.get(column), f"no {column} reported")
             for key, ids in members.items()}
    return Table(row_order, col_order, cells, metric, baseline, rows, cols, agg, mode)


def cell_members(df: "pd.DataFrame", planned: list[PlannedTrial] | None, rows: str,
                 cols: str) -> tuple[list[str], list[str], dict[Key, list[str]]]:
    """(row labels, column labels, (row, col) -> trial ids): from the plan when given, else from ``df``."""
    if planned is not None:
        members = _members_from_plan(planned, rows, cols)
        return _ordered(k[0] for k in members), _ordered(k[1] for k in members), members
    members = _members_from_results(df, _records(df, None), rows, cols)
    return (sorted({k[0] for k in members}, key=_natural_key), sorted({k[1] for k in members}, key=_natural_key),
            members)


def _records(df: "pd.DataFrame", column: str | None) -> dict[str, dict[str, Any]]:
    """trial_id -> its row as a dict; ValueError if ok rows exist but ``column`` does not (a mistyped metric)."""
    if len(df) == 0:
        return {}
    if column is not None and column not in df.columns and (df["status"] == "ok").any():
        metrics = sorted(c for c in df.columns if "/" in c and not c.startswith("val/iou/"))
        raise ValueError(f"no column {column!r} in the results (metric columns: {', '.join(metrics)})")
    return {str(r["trial_id"]): r for r in df.to_dict("records")}


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
    if _is_missing(value):
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


def _cell(ids: list[str], records: dict[str, dict[str, Any]], value: Callable[[dict], Any], absent: str | None) -> Cell:
    """Aggregate the trials ``ids``. ``value(record)`` is the number of one ok trial; when it is missing the trial
    counts as failed with reason ``absent``, or, with ``absent=None``, the quantity does not apply (``na``)."""
    ok, failures, missing, na = [], [], 0, 0
    for tid in ids:
        rec = records.get(tid)
        if rec is None:
            missing += 1
        elif rec.get("status") != "ok":
            failures.append(_text(rec.get("reason")) or "no reason recorded")
        elif _is_missing(v := value(rec)):
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
    return -1 if _is_missing(v) else int(v)


def _notes(failures: list[str], missing: int) -> str:
    parts = [f"{len(failures)} failed: {'; '.join(dict.fromkeys(failures))}"] if failures else []
    return ", ".join(parts + ([f"{missing} missing"] if missing else []))


def _is_missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def _text(v: Any) -> str:
    return "" if _is_missing(v) else str(v)


# --------------------------------------------------------------------------------------------------
# significance, bootstrap, paper numbers


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
        if isinstance(raw, str) and raw:
            d = json.loads(raw)
            out[str(tid)] = (np.asarray(d["inter"], dtype=np.float64), np.asarray(d["union"], dtype=np.float64))
    return out


@dataclass(frozen=True)
class PaperNumbers:
    """Published numbers to print beside reproduced ones: ``numbers[(row, col)]``, in the table's unit."""

    source: str
    metric: str | None
    numbers: dict[Key, float]


def load_paper_numbers(path: str) -> PaperNumbers:
    """Read a paper-numbers YAML file; ConfigError names the file and the key::

        source: UniMatch (CVPR 2023), Table 1          # printed under the table
        metric: val/miou                               # optional; must match the table's metric
        rows:                                          # row label -> column label -> number
          supervised: {92: 45.1, 183: 55.3}
          unimatch: {92: 75.2, 183: 77.2}
    """
    try:
        raw = load_yaml(path)
    except OSError as e:
        raise ConfigError(path, "", f"cannot read file: {e.strerror}") from None
    if not isinstance(raw, dict):
        raise ConfigError(path, "", f"expected a mapping with source, metric and rows, got {type(raw).__name__}")
    for key in raw:
        if key not in ("source", "metric", "rows"):
            raise ConfigError(path, str(key), "unknown key (expected one of: source, metric, rows)")
    source, metric, rows = raw.get("source"), raw.get("metric"), raw.get("rows")
    if not isinstance(source, str) or not source.strip():
        raise ConfigError(path, "source", "required: where the numbers come from (paper, table)")
    if metric is not None and not isinstance(metric, str):
        raise ConfigError(path, "metric", f"expected a metric name like val/miou, got {metric!r}")
    if not isinstance(rows, dict) or not rows:
        raise ConfigError(path, "rows", "expected a mapping of row label -> {column label: number}")
    numbers = {}
    for r, by_col in rows.items():
        if not isinstance(by_col, dict):
            raise ConfigError(path, f"rows.{r}", f"expected a mapping of column label -> number, got {by_col!r}")
        for c, v in by_col.items():
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
                raise ConfigError(path, f"rows.{r}.{c}", f"expected a number, got {v!r}")
            numbers[(cell_label(r), cell_label(c))] = float(v)
    return PaperNumbers(source.strip(), metric, numbers)


def with_paper_numbers(table: Table, paper: PaperNumbers) -> Table:
    """Print ``paper``'s numbers beside the reproduced ones (a ``paper`` column after each column that has any)."""
    if paper.metric is not None and paper.metric != table.metric:
        raise ValueError(f"paper numbers are {paper.metric}, the table shows {table.metric}")
    numbers = {k: v for k, v in paper.numbers.items() if k[0] in table.rows and k[1] in table.cols}
    return dataclasses.replace(table, paper=numbers, paper_source=paper.source)


# --------------------------------------------------------------------------------------------------
# the other tables


def ablation_table(study: "Study", df: "pd.DataFrame", metric: str | None = None, agg: str | None = None,
                   cols: str | None = None) -> Table:
    """One row per variant in declared order (the full method first), each with what it changes and its delta
    against the full method, per column (``report.cols``, e.g. the partition)."""
    if study.ablation is None:
        raise ValueError(f"{study.path}: the study has no ablation section")
    rep = study.report
    cols = cols or (rep.cols if rep.cols != VARIANT else rep.rows)
    table = comparison_table(df, study.trials(unique=False), VARIANT, cols, metric or rep.metric, agg or rep.agg,
                             baseline=study.ablation.baseline)
    notes = {study.ablation.baseline: "(full method)"}
    for label, over in study.ablation.variants.items():
        notes[label] = ", ".join(f"{k}={cell_label(v)}" for k, v in over.items())
    return dataclasses.replace(table, row_notes=notes, title="Ablation")


def per_class_table(df: "pd.DataFrame", planned: list[PlannedTrial] | None, rows: str, cols: str) -> Table:
    """IoU per class (percent, mean +- std over seeds) of the last evaluation, recomputed from the stored confusion
    matrices; one row per (row, col) cell, the classes and mIoU as columns, the best row per class marked."""
    row_order, col_order, members = cell_members(df, planned, rows, cols)
    records = _records(df, None)
    names = [c[len("val/iou/"):] for c in df.columns if c.startswith("val/iou/")]
    ious = {tid: _confusion_iou(rec.get("val/confusion")) for tid, rec in records.items()}
    k = max((len(v) for v in ious.values() if v), default=len(names))
    if len(names) != k:
        names = [str(i) for i in range(k)]
    class_cols = names + ["mIoU"]

    def value_of(name: str) -> Callable[[dict], float | None]:
        j = class_cols.index(name)

        def value(rec):
            iou = ious.get(str(rec["trial_id"]))
            if not iou:
                return None
            return statistics.fmean(iou) if j == len(iou) else iou[j]
        return value

    labels, cells = _cells_per_column(row_order, col_order, members, records, class_cols, value_of,
                                      "no val/confusion stored")
    key = rows if len(col_order) == 1 else f"{rows} / {cols}"
    return Table(labels, class_cols, cells, "val/iou", None, key, "class", "last", "max", title="Per-class IoU")


def _cells_per_column(row_order, col_order, members, records, columns: list[str],
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
                cells[(label, name)] = _cell(members[(r, c)], records, value_of(name), missing)
    return labels, cells


def _confusion_iou(raw: Any) -> list[float] | None:
    """Per-class IoU in percent from a JSON [K][K] confusion matrix (rows = target), as evaluate.ConfusionMatrix."""
    if not isinstance(raw, str) or not raw:
        return None
    m = json.loads(raw)
    k = len(m)
    out = []
    for i in range(k):
        inter = m[i][i]
        union = sum(m[i]) + sum(m[r][i] for r in range(k)) - inter
        out.append(100.0 * inter / (union + 1e-10))
    return out


PSEUDO_COLUMNS = (("mask ratio", "train/mask_ratio", "last"), ("pseudo acc", "train/pseudo_acc", "last"),
                  ("mask ratio (mean)", "train/mask_ratio", "mean"), ("pseudo acc (mean)", "train/pseudo_acc", "mean"))


def pseudo_table(df: "pd.DataFrame", history: "pd.DataFrame", planned: list[PlannedTrial] | None, rows: str,
                 cols: str) -> Table:
    """Pseudo-label quality per cell, in percent: the share of unlabeled pixels above the confidence threshold
    (``train/mask_ratio``) and the accuracy of the pseudo-labels where the truth is known (``train/pseudo_acc``,
    synthetic data and fixtures), at the last evaluation and averaged over all evaluations (from the history).
    Methods without pseudo-labels show ``–``."""
    row_order, col_order, members = cell_members(df, planned, rows, cols)
    records = _records(df, None)
    means: dict[str, dict[str, float]] = defaultdict(dict)
    if len(history):
        for key in ("train/mask_ratio", "train/pseudo_acc"):
            if key in history.columns:
                for tid, v in history.groupby("trial_id")[key].mean().items():
                    if not _is_missing(v):
                        means[str(tid)][key] = float(v)
    spec = {name: (key, how) for name, key, how in PSEUDO_COLUMNS}

    def value_of(name: str) -> Callable[[dict], float | None]:
        key, how = spec[name]

        def value(rec):
            v = rec.get(key) if how == "last" else means[str(rec["trial_id"])].get(key)
            return None if _is_missing(v) else 100.0 * float(v)
        return value

    labels, cells = _cells_per_column(row_order, col_order, members, records, list(spec), value_of, None)
    key = rows if len(col_order) == 1 else f"{rows} / {cols}"
    return Table(labels, [n for n, _, _ in PSEUDO_COLUMNS], cells, "train/mask_ratio", None, key, "quantity",
                 title="Pseudo-label quality (%)", mark_best=False)


# --------------------------------------------------------------------------------------------------
# listings: cost, manifest, search


@dataclass
class Listing:
    """A plain table of text: manifests, costs, search results. ``notes`` print under it."""

    header: list[str]
    rows: list[list[str]]
    title: str | None = None
    notes: list[str] = field(default_factory=list)


def cost_listing(df: "pd.DataFrame", planned: list[PlannedTrial] | None, rows: str, cols: str) -> Listing:
    """GPU- and CPU-hours per cell (every stored trial, failed ones too) and for the table, with a forecast for the
    trials not stored yet: the mean cost of the row's finished trials (all finished trials when the row has none)."""
    row_order, col_order, members = cell_members(df, planned, rows, cols)
    records = _records(df, None)
    finished: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for (r, _), ids in members.items():
        for tid in ids:
            rec = records.get(tid)
            if rec is not None and rec.get("status") == "ok":
                finished[r].append((_hours(rec.get("gpu_hours")), _hours(rec.get("cpu_hours"))))
    everyone = [x for v in finished.values() for x in v]
    body, total = [], [0.0, 0.0, 0.0, 0.0, 0, 0]
    for r in row_order:
        basis = finished.get(r) or everyone
        per_trial = (statistics.fmean(g for g, _ in basis), statistics.fmean(c for _, c in basis)) if basis else None
        for c in col_order:
            ids = members.get((r, c))
            if ids is None:
                continue
            stored = [records[t] for t in ids if t in records]
            gpu = sum(_hours(x.get("gpu_hours")) for x in stored)
            cpu = sum(_hours(x.get("cpu_hours")) for x in stored)
            todo = len(ids) - len(stored)
            f_gpu = f_cpu = None
            if todo == 0:
                f_gpu = f_cpu = 0.0
            elif per_trial is not None:
                f_gpu, f_cpu = per_trial[0] * todo, per_trial[1] * todo
            body.append([r, c, f"{len(stored)}/{len(ids)}", _h(gpu), _h(cpu), _h(f_gpu), _h(f_cpu)])
            total[0] += gpu
            total[1] += cpu
            total[2] = None if f_gpu is None or total[2] is None else total[2] + f_gpu
            total[3] = None if f_cpu is None or total[3] is None else total[3] + f_cpu
            total[4] += len(stored)
            total[5] += len(ids)
    body.append(["total", "", f"{total[4]}/{total[5]}", _h(total[0]), _h(total[1]), _h(total[2]), _h(total[3])])
    notes = ["hours = wall time x GPUs (CPUs) the trial held; forecast = missing trials x the mean cost of the "
             "row's finished trials"]
    return Listing([rows, cols, "trials", "GPU-h", "CPU-h", "forecast GPU-h", "forecast CPU-h"], body,
                   "Cost", notes)


def _hours(v: Any) -> float:
    return 0.0 if _is_missing(v) else float(v)


def _h(v: float | None) -> str:
    return "?" if v is None else f"{v:.3f}"


def manifest(df: "pd.DataFrame", planned: list[PlannedTrial] | None, rows: str, cols: str) -> Listing:
    """What reproduces each trial of each cell: trial id, git sha and dirty flag, split sha256, the exact rerun
    command; package versions as a note when every trial has the same ones, else as a column."""
    row_order, col_order, members = cell_members(df, planned, rows, cols)
    records = _records(df, None)
    versions = {_text(rec.get("versions")) for rec in records.values()}
    same_versions = len(versions) <= 1
    header = [rows, cols, "seed", "status", "trial id", "git sha", "split sha256", "rerun"]
    header += [] if same_versions else ["versions"]
    body = []
    seeds = {t.trial_id: t.seed for t in planned or []}
    for r in row_order:
        for c in col_order:
            for tid in members.get((r, c), []):
                rec = records.get(tid)
                if rec is None:
                    body.append([r, c, str(seeds.get(tid, "")), "missing", tid, "", "", ""] +
                                ([] if same_versions else [""]))
                    continue
                sha = _text(rec.get("git_sha"))
                dirty = rec.get("git_dirty")
                git = f"{sha}{' (dirty)' if dirty is True else ''}" if sha else "unknown (not a git checkout)"
                line = [r, c, _text(rec.get("seed")), _text(rec.get("status")), tid, git,
                        _splits(rec.get("split_sha256")), _text(rec.get("rerun"))]
                body.append(line + ([] if same_versions else [_versions(rec.get("versions"))]))
    notes = [f"package versions (every trial): {_versions(versions.pop())}"] if same_versions and versions else []
    return Listing(header, body, "Reproducibility manifest", notes)


def _splits(raw: Any) -> str:
    if not isinstance(raw, str) or not raw:
        return ""
    return " ".join(f"{k}={v}" for k, v in json.loads(raw).items())


def _versions(raw: Any) -> str:
    if not isinstance(raw, str) or not raw:
        return ""
    return ", ".join(f"{k} {v}" for k, v in json.loads(raw).items() if v is not None)


def search_listings(study: "Study", df: "pd.DataFrame", top: int = 10) -> list[Listing]:
    """A search study's report: the best ``top`` configs, Optuna's parameter importances over the finished trials, and the history (trials in start order with the best-so-far)."""
    s = study.search
    if s is None:
        raise ValueError(f"{study.path}: the study has no search section")
    params = list(s.space)
    df = df[df["study"] == study.name] if len(df) else df
    if len(df) == 0:
        return [Listing(["trial"], [], f"Search {study.name}", ["no stored trials yet"])]
    metric = s.metric
    if metric not in df.columns:
        raise ValueError(f"no column {metric!r} in the results")
    recs = df.to_dict("records")
    order = "started_at" if "started_at" in df.columns else "created_at"
    recs.sort(key=lambda x: (_text(x.get(order)), str(x["trial_id"])))
    scored = [x for x in recs if not _is_missing(x.get(metric))]
    sign = -1.0 if s.mode == "max" else 1.0
    ranked = sorted(scored, key=lambda x: sign * float(x[metric]))[:top]
    best_rows = [[str(i + 1), str(x["trial_id"])[:12], str(x["status"]),
                  *(_param(x.get(f"cfg.{p}")) for p in params), f"{float(x[metric]):.2f}",
                  _text(x.get("iteration"))] for i, x in enumerate(ranked)]
    best = Listing(["rank", "trial", "status", *params, metric, "iteration"], best_rows,
                   f"Best configs ({s.mode} {metric}, {len(scored)} of {len(recs)} trials scored)")
    history_rows, best_so_far = [], None
    for i, x in enumerate(recs):
        v = x.get(metric)
        if not _is_missing(v) and (best_so_far is None or sign * float(v) < sign * best_so_far):
            best_so_far = float(v)
        history_rows.append([str(i + 1), str(x["trial_id"])[:12], str(x["status"]),
                             "" if _is_missing(v) else f"{float(v):.2f}",
                             "" if best_so_far is None else f"{best_so_far:.2f}"])
    history = Listing(["#", "trial", "status", metric, "best so far"], history_rows, "History")
    return [best, _importances(study, recs), history]


def _param(v: Any) -> str:
    if _is_missing(v):
        return ""
    return f"{v:.4g}" if isinstance(v, float) else cell_label(v)


def _importances(study: "Study", recs: list[dict]) -> Listing:
    """Optuna's PED-ANOVA importances (its default evaluator; fANOVA would need scikit-learn) on an in-memory
    Optuna study rebuilt from the finished trials with ``optuna.trial.create_trial``."""
    import optuna

    s = study.search
    dists = {k: _distribution(v) for k, v in s.space.items()}
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # no "A new study created in memory" line in a table
    try:
        ostudy = optuna.create_study(direction="maximize" if s.mode == "max" else "minimize")
    finally:
        optuna.logging.set_verbosity(verbosity)
    for x in recs:
        if x.get("status") != "ok" or _is_missing(x.get(s.metric)):
            continue
        params = {k: _optuna_value(x.get(f"cfg.{k}"), d) for k, d in dists.items()}
        ostudy.add_trial(optuna.trial.create_trial(params=params, distributions=dists, value=float(x[s.metric])))
    title = f"Parameter importances (Optuna PED-ANOVA, {len(ostudy.trials)} finished trials)"
    try:
        imp = optuna.importance.get_param_importances(ostudy,
                                                      evaluator=optuna.importance.PedAnovaImportanceEvaluator())
    except (ValueError, RuntimeError) as e:
        return Listing(["parameter", "importance"], [], title, [f"not computed: {e}"])
    return Listing(["parameter", "importance"], [[k, f"{v:.3f}"] for k, v in imp.items()], title)


def _distribution(spec: dict):
    import optuna.distributions as od

    (kind, args), = spec.items()
    if kind == "uniform":
        return od.FloatDistribution(args[0], args[1])
    if kind == "loguniform":
        return od.FloatDistribution(args[0], args[1], log=True)
    if kind == "int":
        return od.IntDistribution(args[0], args[1], step=args[2] if len(args) > 2 else 1)
    return od.CategoricalDistribution(list(args))


def _optuna_value(v: Any, dist) -> Any:
    import optuna.distributions as od

    if isinstance(dist, od.IntDistribution):
        return int(v)
    if isinstance(dist, od.FloatDistribution):
        return float(v)
    return v.item() if hasattr(v, "item") else v


# --------------------------------------------------------------------------------------------------
# rendering


@dataclass(frozen=True)
class _Style:
    """How one format writes text: escaping, emphasis, the +- sign, signed numbers, the significance mark."""

    esc: Callable[[str], str]
    bold: Callable[[str], str]
    under: Callable[[str], str]
    pm: str
    signed: Callable[[str], str]
    mark: str
    delta_word: str


def render(obj: "Table | Listing", fmt: str) -> str:
    """A table as ``markdown`` (best ``**bold**``, second ``<u>underlined</u>``), ``latex`` (booktabs ``tabular``,
    ``\\textbf`` / ``\\underline``, notes under it), ``html`` (a ``<table>``, notes in ``<p>``) or ``csv`` (one line
    per cell with every number at four decimals: machine-readable). Numbers have one decimal."""
    renderers = {"markdown": _markdown, "csv": _csv, "latex": _latex, "html": _html}
    if fmt not in renderers:
        raise ValueError(f"unknown table format {fmt!r} (expected one of: {', '.join(FORMATS)})")
    if isinstance(obj, Listing):
        return _listing(obj, fmt)
    return renderers[fmt](obj)


def _number(x: float, signed: bool = False) -> str:
    s = f"{x:+.1f}" if signed else f"{x:.1f}"
    if s in ("-0.0", "+0.0"):  # -0.04 rounds to a negative zero; a table should not show a sign there
        return "+0.0" if signed else "0.0"
    return s


def _short(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= REASON_CHARS else text[: REASON_CHARS - 1] + "…"


def _cell_text(table: Table, r: str, c: str, st: _Style, show_n: bool, reasons: bool) -> str:
    cell = table.cells.get((r, c))
    if cell is None:
        return ""
    if cell.mean is None:
        if cell.status == "failed":
            return st.esc(f"failed ({_short(cell.reason or '')})") if reasons else "failed"
        return st.esc("–") if cell.status == "na" else "missing"
    text = f"{_number(cell.mean)}{st.pm}{_number(cell.std)}"
    if show_n or cell.status != "ok":
        text += f" (n={cell.n})" if cell.status == "ok" else f" (n={cell.n} of {cell.planned})"
    if table.mark_best and r in table.best(c):
        text = st.bold(text)
    elif table.mark_best and r in table.second(c):
        text = st.under(text)
    if table.significant(r, c):
        text += st.mark
    if table.baseline is None and (r, c) in table.ci:
        lo, hi = table.ci[(r, c)]
        text += f" [{_number(lo)}, {_number(hi)}]"
    return text


def _delta_text(table: Table, r: str, c: str, st: _Style) -> str:
    d = table.delta(r, c)
    if d is None:
        return ""
    text = st.signed(_number(d, signed=True))
    if (r, c) in table.ci:
        lo, hi = table.ci[(r, c)]
        text += " " + st.signed(f"[{_number(lo, True)}, {_number(hi, True)}]")
    return text


def _grid(table: Table, st: _Style, show_n: bool, reasons: bool) -> tuple[list[str], list[list[str]]]:
    """Header and body: per column the cell, the paper number (if any), the delta (with a baseline); row notes."""
    paper_cols = {c for (_, c) in table.paper}
    header = [st.esc(table.row_key)]
    for c in table.cols:
        header.append(st.esc(c))
        if c in paper_cols:
            header.append(st.esc(f"{c} (paper)"))
        if table.baseline is not None:
            header.append(f"{st.delta_word} {st.esc(c)}")
    if table.row_notes:
        header.append(st.esc(table.notes_header))
    body = []
    for r in table.rows:
        line = [st.esc(r)]
        for c in table.cols:
            line.append(_cell_text(table, r, c, st, show_n, reasons))
            if c in paper_cols:
                p = table.paper.get((r, c))
                line.append("" if p is None else _number(p))
            if table.baseline is not None:
                line.append(_delta_text(table, r, c, st))
        if table.row_notes:
            line.append(st.esc(table.row_notes.get(r, "")))
        body.append(line)
    return header, body


def _footnotes(table: Table, detail: bool) -> list[str]:
    """Plain-text notes: the significance test (with every p-value when ``detail``), the CI, the paper source."""
    out = []
    if table.tests:
        m = len(table.tests)
        used = {t.test for t in table.tests.values()}
        kind = ("paired t-test" if used == {"t"} else "exact Wilcoxon signed-rank test" if used == {"wilcoxon"}
                else f"paired t-test (under {stats.WILCOXON_MIN_N} seeds) or exact Wilcoxon signed-rank test")
        line = (f"{MARK} p < {table.alpha:g} against {table.baseline}: {kind} over seeds, two-sided, Holm-corrected "
                f"over {m} comparison{'s' if m != 1 else ''}")
        if detail:
            parts = [f"{r} @ {c} p={_p(table.p_holm[(r, c)])} (raw {_p(t.p)}, {t.test}, n={t.n})"
                     for (r, c), t in table.tests.items()]
            line += ". Holm p: " + "; ".join(parts)
        if table.untested:
            line += ". Not tested (fewer than 2 paired seeds): " + ", ".join(f"{r} @ {c}" for r, c in table.untested)
        out.append(line + ".")
    elif table.untested:
        out.append(f"No test against {table.baseline}: fewer than 2 paired seeds in every cell.")
    if table.ci_note:
        out.append(table.ci_note + ".")
    if table.paper_source:
        out.append(f"paper: {table.paper_source}.")
    return out + list(table.notes)


def _p(p: float) -> str:
    return "0" if p == 0 else f"{p:.3g}" if p >= 0.001 else f"{p:.1e}"


def _md_esc(text: str) -> str:
    return text.replace("|", "\\|")


_MD = _Style(_md_esc, lambda s: f"**{s}**", lambda s: f"<u>{s}</u>", " ± ", lambda s: s, MARK, "Δ")


def _markdown(table: Table) -> str:
    header, body = _grid(table, _MD, show_n=True, reasons=True)
    lines = [header, ["---"] + ["---:"] * (len(header) - 1)] + body
    if table.row_notes:
        lines[1][-1] = "---"
    out = "\n".join("| " + " | ".join(line) + " |" for line in lines) + "\n"
    if table.title:
        out = f"**{table.title}**\n\n" + out
    notes = _footnotes(table, detail=True)
    return out + ("\n" + "\n".join(notes) + "\n" if notes else "")


def _csv(table: Table) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow([table.row_key, table.col_key, "metric", "mean", "std", "n", "planned", "status", "best", "second",
                "delta", "test", "n_pairs", "p", "p_holm", "significant", "ci_low", "ci_high", "paper", "reason"])
    metric = table.metric if table.agg == "last" else f"best/{table.metric}"
    for r in table.rows:
        for c in table.cols:
            cell = table.cells.get((r, c))
            if cell is None:
                continue
            t, ci = table.tests.get((r, c)), table.ci.get((r, c))
            w.writerow([r, c, metric, _fixed(cell.mean), _fixed(cell.std), cell.n, cell.planned, cell.status,
                        _bool(table.mark_best and r in table.best(c)), _bool(table.mark_best and r in table.second(c)),
                        _fixed(table.delta(r, c)), t.test if t else "", t.n if t else "",
                        _fixed(t.p, 6) if t else "", _fixed(table.p_holm.get((r, c)), 6),
                        _bool(table.significant(r, c)) if t else "", _fixed(ci[0]) if ci else "",
                        _fixed(ci[1]) if ci else "", _fixed(table.paper.get((r, c))), cell.reason or ""])
    return buf.getvalue()


def _bool(b: bool) -> str:
    return "true" if b else "false"


def _fixed(x: float | None, digits: int = 4) -> str:
    return "" if x is None else f"{x:.{digits}f}"


_LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "–": "--",
                  "±": r"$\pm$", "†": r"$^\dagger$", "<": r"$<$", ">": r"$>$"}


def _tex(text: str) -> str:
    return "".join(_LATEX_SPECIAL.get(ch, ch) for ch in text)


_TEX = _Style(_tex, lambda s: f"\\textbf{{{s}}}", lambda s: f"\\underline{{{s}}}", " $\\pm$ ", lambda s: f"${s}$",
              "$^\\dagger$", "$\\Delta$")


def _latex(table: Table) -> str:
    header, body = _grid(table, _TEX, show_n=False, reasons=False)
    what = f"{table.metric} ({'last evaluation' if table.agg == 'last' else 'best evaluation'})"
    marks = "best per column in bold, second underlined" if table.mark_best else "mean +- std over seeds"
    align = "l" + "r" * (len(header) - 1 - bool(table.row_notes)) + ("l" if table.row_notes else "")
    lines = [f"% {table.title + ': ' if table.title else ''}{what}: mean +- std over seeds; {marks}",
             "\\begin{tabular}{" + align + "}", "\\toprule", " & ".join(header) + " \\\\", "\\midrule"]
    lines += [" & ".join(line) + " \\\\" for line in body]
    lines += ["\\bottomrule", "\\end{tabular}"]
    for (r, c), t in table.tests.items():  # the exact numbers stay in the source, out of the printed note
        lines.append(f"% {r} @ {c}: Holm p = {_p(table.p_holm[(r, c)])} (raw {_p(t.p)}, {t.test}, n = {t.n})")
    notes = _footnotes(table, detail=False)
    if notes:
        lines.append("{\\footnotesize " + " \\\\ ".join(_tex(n) for n in notes) + "\\par}")
    return "\n".join(lines) + "\n"


_HTML = _Style(html.escape, lambda s: f"<b>{s}</b>", lambda s: f"<u>{s}</u>", " &plusmn; ", lambda s: s,
               "<sup>&dagger;</sup>", "&Delta;")


def _html(table: Table) -> str:
    header, body = _grid(table, _HTML, show_n=True, reasons=True)
    out = ["<table>"]
    if table.title:
        out.append(f"<caption>{html.escape(table.title)}</caption>")
    out.append("<thead><tr>" + "".join(f"<th>{h}</th>" for h in header) + "</tr></thead>")
    out.append("<tbody>")
    out += ["<tr>" + "".join(f"<td>{x}</td>" for x in line) + "</tr>" for line in body]
    out += ["</tbody>", "</table>"]
    out += [f"<p>{html.escape(n).replace(MARK, '<sup>&dagger;</sup>')}</p>" for n in _footnotes(table, detail=True)]
    return "\n".join(out) + "\n"


def _listing(listing: Listing, fmt: str) -> str:
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(listing.header)
        w.writerows(listing.rows)
        return buf.getvalue()
    if fmt == "markdown":
        lines = [listing.header, ["---"] * len(listing.header)] + listing.rows
        out = "\n".join("| " + " | ".join(_md_esc(x) for x in line) + " |" for line in lines) + "\n"
        out = (f"**{listing.title}**\n\n" if listing.title else "") + out
        return out + ("\n" + "\n".join(listing.notes) + "\n" if listing.notes else "")
    if fmt == "latex":
        lines = [f"% {listing.title}" if listing.title else "%", "\\begin{tabular}{" + "l" * len(listing.header) + "}",
                 "\\toprule", " & ".join(_tex(h) for h in listing.header) + " \\\\", "\\midrule"]
        lines += [" & ".join(_tex(x) for x in row) + " \\\\" for row in listing.rows]
        lines += ["\\bottomrule", "\\end{tabular}"]
        if listing.notes:
            lines.append("{\\footnotesize " + " \\\\ ".join(_tex(n) for n in listing.notes) + "\\par}")
        return "\n".join(lines) + "\n"
    out = ["<table>"] + ([f"<caption>{html.escape(listing.title)}</caption>"] if listing.title else [])
    out.append("<thead><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in listing.header) + "</tr></thead>")
    out += ["<tbody>"] + ["<tr>" + "".join(f"<td>{html.escape(x)}</td>" for x in row) + "</tr>"
                          for row in listing.rows] + ["</tbody>", "</table>"]
    out += [f"<p>{html.escape(n)}</p>" for n in listing.notes]
    return "\n".join(out) + "\n"


def frame(obj: "Table | Listing") -> "pd.DataFrame":
    """The table as plain text cells (no markup), for a ``wandb.Table`` or a notebook."""
    import pandas as pd

    if isinstance(obj, Listing):
        return pd.DataFrame(obj.rows, columns=obj.header)
    plain = _Style(lambda s: s, lambda s: s, lambda s: s, " ± ", lambda s: s, MARK, "Δ")
    header, body = _grid(obj, plain, show_n=True, reasons=True)
    return pd.DataFrame(body, columns=header)

