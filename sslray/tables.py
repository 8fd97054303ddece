"""Comparison tables derived from the results store, never typed by hand.

Rows and columns are dotted config keys (``method.name`` x ``data.partition``) or ``variant`` (an ablation's rows).
A cell is mean +- sample std over seeds with its n; the best mean of each column is marked, and with a baseline
row every other row gets a delta column per column (its mean minus the baseline's)::

    table = comparison_table(store.load(), study.trials(unique=False), "method.name", "data.partition",
                             baseline="supervised")
    print(render(table, "markdown"))

| method.name | 16 | Δ 16 |
| --- | ---: | ---: |
| supervised | 32.0 ± 2.0 (n=3) |  |
| fixmatch | **36.0 ± 1.0 (n=3)** | +4.0 |

Cell states: ``ok`` (every planned seed reported), ``partial`` (some failed or are missing: the mean uses the ok
ones, shown as ``(n=2 of 3)``), ``failed`` (no ok seed and at least one failure: ``failed (<reason>)``), ``missing``
(planned, nothing stored yet).
"""
from __future__ import annotations

import csv
import io
import math
import re
import statistics
from collections import defaultdict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable

from sslray.study import VARIANT, PlannedTrial, cell_label, row_label

if TYPE_CHECKING:
    import pandas as pd

FORMATS = ("markdown", "csv", "latex")
REASON_CHARS = 60  # a failure reason is a hint in a table cell; the full text is in the results row


@dataclass(frozen=True)
class Cell:
    """One table cell: ``mean``/``std`` over the ``n`` ok seeds (None without any), of ``planned`` trials."""

    mean: float | None
    std: float | None
    n: int
    status: str  # ok | partial | failed | missing
    reason: str | None = None
    planned: int = 0


@dataclass
class Table:
    rows: list[str]
    cols: list[str]
    cells: dict[tuple[str, str], Cell]
    metric: str
    baseline: str | None
    row_key: str = "method.name"
    col_key: str = "data.partition"
    agg: str = "last"
    mode: str = "max"

    def best(self, col: str) -> list[str]:
        """Rows holding the best mean of ``col`` (all of them on an exact tie)."""
        means = {r: self.cells[(r, col)].mean for r in self.rows if (r, col) in self.cells}
        means = {r: m for r, m in means.items() if m is not None}
        if not means:
            return []
        target = max(means.values()) if self.mode == "max" else min(means.values())
        return [r for r, m in means.items() if m == target]

    def delta(self, row: str, col: str) -> float | None:
        """``mean(row) - mean(baseline)`` in ``col``; None for the baseline itself or when either has no mean."""
        if self.baseline is None or row == self.baseline:
            return None
        base, cell = self.cells.get((self.baseline, col)), self.cells.get((row, col))
        if base is None or cell is None or base.mean is None or cell.mean is None:
            return None
        return cell.mean - base.mean


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
    if planned is not None:
        members = _members_from_plan(planned, rows, cols)
        row_order, col_order = _ordered(k[0] for k in members), _ordered(k[1] for k in members)
    else:
        members = _members_from_results(df, records, rows, cols)
        row_order = sorted({k[0] for k in members}, key=_natural_key)
        col_order = sorted({k[1] for k in members}, key=_natural_key)
    if baseline is not None and baseline not in row_order:
        raise ValueError(f"baseline {baseline!r} is not a row (rows: {', '.join(row_order)})")
    cells = {key: _cell(ids, records, column) for key, ids in members.items()}
    return Table(row_order, col_order, cells, metric, baseline, rows, cols, agg, mode)


def _records(df: "pd.DataFrame", column: str) -> dict[str, dict[str, Any]]:
    """trial_id -> its row as a dict; ValueError if ok rows exist but ``column`` does not (a mistyped metric)."""
    if len(df) == 0:
        return {}
    if column not in df.columns and (df["status"] == "ok").any():
        metrics = sorted(c for c in df.columns if "/" in c)
        raise ValueError(f"no column {column!r} in the results (metric columns: {', '.join(metrics)})")
    return {str(r["trial_id"]): r for r in df.to_dict("records")}


def _members_from_plan(planned: list[PlannedTrial], rows: str, cols: str) -> dict[tuple[str, str], list[str]]:
    """(row, col) -> distinct trial ids; ValueError if a cell holds two different trials with the same seed (an axis
    of the study that is neither rows nor cols: averaging those would pass configs off as seeds)."""
    members: dict[tuple[str, str], list[str]] = defaultdict(list)
    seeds: dict[tuple[str, str], dict[int, PlannedTrial]] = defaultdict(dict)
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


def _members_from_results(df: "pd.DataFrame", records: dict, rows: str, cols: str) -> dict[tuple[str, str], list[str]]:
    columns = [VARIANT if key == VARIANT else f"cfg.{key}" for key in (rows, cols)]
    for c in columns:
        if records and c not in df.columns:
            raise ValueError(f"no column {c!r} in the results")
    members: dict[tuple[str, str], list[str]] = defaultdict(list)
    seeds: dict[tuple[str, str], set] = defaultdict(set)
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
    if value is None or (isinstance(value, float) and math.isnan(value)):
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


def _cell(ids: list[str], records: dict[str, dict[str, Any]], column: str) -> Cell:
    values, failures, missing = [], [], 0
    for tid in ids:
        rec = records.get(tid)
        if rec is None:
            missing += 1
        elif rec.get("status") != "ok":
            failures.append(_text(rec.get("reason")) or "no reason recorded")
        elif _is_missing(rec.get(column)):
            failures.append(f"no {column} reported")
        else:
            values.append(float(rec[column]))
    notes = _notes(failures, missing)
    if values:
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        status = "ok" if len(values) == len(ids) else "partial"
        return Cell(statistics.fmean(values), std, len(values), status, notes or None, len(ids))
    if failures:
        return Cell(None, None, 0, "failed", "; ".join(dict.fromkeys(failures)), len(ids))
    return Cell(None, None, 0, "missing", None, len(ids))


def _notes(failures: list[str], missing: int) -> str:
    parts = [f"{len(failures)} failed: {'; '.join(dict.fromkeys(failures))}"] if failures else []
    return ", ".join(parts + ([f"{missing} missing"] if missing else []))


def _is_missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def _text(v: Any) -> str:
    return "" if _is_missing(v) else str(v)


# --------------------------------------------------------------------------------------------------
# rendering


def render(table: Table, fmt: str) -> str:
    """The table as ``markdown`` (best in ``**bold**``), ``csv`` (one line per cell, machine-readable) or ``latex``
    (booktabs ``tabular``, best in ``\\textbf{}``). Numbers have one decimal (CSV: four)."""
    renderers = {"markdown": _markdown, "csv": _csv, "latex": _latex}
    if fmt not in renderers:
        raise ValueError(f"unknown table format {fmt!r} (expected one of: {', '.join(FORMATS)})")
    return renderers[fmt](table)


def _header(table: Table, delta_word: str, esc) -> list[str]:
    out = [esc(table.row_key)]
    for c in table.cols:
        out += [esc(c)] + ([f"{delta_word} {esc(c)}"] if table.baseline is not None else [])
    return out


def _body(table: Table, esc, cell_text, delta_text) -> list[list[str]]:
    """Rows of rendered cells: ``esc`` escapes labels, ``cell_text(cell, is_best)`` and ``delta_text(delta)``
    format the numbers."""
    best = {c: set(table.best(c)) for c in table.cols}
    out = []
    for r in table.rows:
        line = [esc(r)]
        for c in table.cols:
            cell = table.cells.get((r, c))
            line.append("" if cell is None else cell_text(cell, r in best[c]))
            if table.baseline is not None:
                d = table.delta(r, c)
                line.append("" if d is None else delta_text(d))
        out.append(line)
    return out


def _number(x: float, signed: bool = False) -> str:
    s = f"{x:+.1f}" if signed else f"{x:.1f}"
    if s == "-0.0":  # -0.04 rounds to a negative zero; a table should not show a sign there
        return "+0.0" if signed else "0.0"
    return s


def _cell_text(cell: Cell, pm: str) -> str:
    """``45.1 ± 0.3 (n=3)``-style text for a cell with a mean, ``failed (...)`` / ``missing`` otherwise."""
    if cell.mean is None:
        return "missing" if cell.status == "missing" else f"failed ({_short(cell.reason or '')})"
    n = f"n={cell.n}" if cell.status == "ok" else f"n={cell.n} of {cell.planned}"
    return f"{_number(cell.mean)}{pm}{_number(cell.std)} ({n})"


def _short(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= REASON_CHARS else text[: REASON_CHARS - 1] + "…"


def _markdown(table: Table) -> str:
    def esc(text: str) -> str:
        return text.replace("|", "\\|")

    def cell(c: Cell, best: bool) -> str:
        text = esc(_cell_text(c, " ± "))
        return f"**{text}**" if best else text

    header = _header(table, "Δ", esc)
    lines = [header, ["---"] + ["---:"] * (len(header) - 1)]
    lines += _body(table, esc, cell, lambda d: _number(d, signed=True))
    return "\n".join("| " + " | ".join(line) + " |" for line in lines) + "\n"


def _csv(table: Table) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow([table.row_key, table.col_key, "metric", "mean", "std", "n", "planned", "status", "best", "delta",
                "reason"])
    metric = table.metric if table.agg == "last" else f"best/{table.metric}"
    for r in table.rows:
        best = {c for c in table.cols if r in table.best(c)}
        for c in table.cols:
            cell = table.cells.get((r, c))
            if cell is None:
                continue
            w.writerow([r, c, metric, _fixed(cell.mean), _fixed(cell.std), cell.n, cell.planned, cell.status,
                        "true" if c in best else "false", _fixed(table.delta(r, c)), cell.reason or ""])
    return buf.getvalue()


def _fixed(x: float | None) -> str:
    return "" if x is None else f"{x:.4f}"


_LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def _tex(text: str) -> str:
    return "".join(_LATEX_SPECIAL.get(ch, ch) for ch in text)


def _latex(table: Table) -> str:
    def cell(c: Cell, best: bool) -> str:
        if c.mean is None:  # a paper table shows the state; the reason is in markdown and the results row
            return c.status
        text = f"{_number(c.mean)} $\\pm$ {_number(c.std)}"
        text = f"\\textbf{{{text}}}" if best else text
        return text if c.status == "ok" else f"{text} (n={c.n} of {c.planned})"

    header = _header(table, "$\\Delta$", _tex)
    body = _body(table, _tex, cell, lambda d: f"${_number(d, signed=True)}$")
    what = f"{table.metric} ({'last evaluation' if table.agg == 'last' else 'best evaluation'})"
    lines = [f"% {what}: mean +- std over seeds; best per column in bold",
             "\\begin{tabular}{l" + "r" * (len(header) - 1) + "}", "\\toprule",
             " & ".join(header) + " \\\\", "\\midrule"]
    lines += [" & ".join(line) + " \\\\" for line in body]
    lines += ["\\bottomrule", "\\end{tabular}"]
    return "\n".join(lines) + "\n"
