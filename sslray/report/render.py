"""Renderers: a Table or Listing as ``markdown``, ``latex`` (booktabs), ``csv`` (machine-readable) or ``html``,
and :func:`frame` (plain-text cells as a DataFrame, for ``wandb.Table`` or a notebook)::

    print(render(table, "markdown"))

| method.name | 16 | Δ 16 |
| --- | ---: | ---: |
| supervised | 32.0 ± 2.0 (n=3) |  |
| fixmatch | <u>36.0 ± 1.0 (n=3)</u>† | +4.0 |
| unimatch | **40.0 ± 2.6 (n=3)**† | +8.0 |

† p < 0.05 against supervised: paired t-test over seeds, two-sided, Holm-corrected over 2 comparisons. Holm p: ...

The best mean of each column is bold and the second best underlined (with three or more rows); partial cells show
``(n=2 of 3)``, failed ones ``failed (<reason>)``, cells where the quantity does not apply ``–``.
"""
from __future__ import annotations

import csv
import html
import io
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from sslray import stats
from sslray.report.aggregate import Listing, Table
from sslray.report.names import display, metric_label

if TYPE_CHECKING:
    import pandas as pd

FORMATS = ("markdown", "latex", "csv", "html")
REASON_CHARS = 60  # a failure reason is a hint in a table cell; the full text is in the results row
MARK = "†"  # significant against the baseline after Holm's correction


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


def _marks(table: Table) -> dict[str, tuple[set[str], set[str]]]:
    """Column -> (rows holding its best mean, rows holding the second): once per column, not once per cell (a
    1,000-row table asked each cell's column for its ranking again)."""
    return {c: (set(table.best(c)), set(table.second(c))) for c in table.cols}


def _cell_text(table: Table, r: str, c: str, st: _Style, show_n: bool, reasons: bool,
               marks: dict[str, tuple[set[str], set[str]]] | None = None) -> str:
    cell = table.cells.get((r, c))
    if cell is None:
        return ""
    if cell.mean is None:
        if cell.status == "failed":
            return st.esc(f"failed ({_short(cell.reason or '')})") if reasons else "failed"
        return st.esc("–") if cell.status == "na" else "missing"
    # one seed has no spread: the mean alone (n=1 says why), never "± 0.0"
    text = _number(cell.mean) if cell.n == 1 else f"{_number(cell.mean)}{st.pm}{_number(cell.std)}"
    if show_n or cell.status != "ok":
        text += f" (n={cell.n})" if cell.status == "ok" else f" (n={cell.n} of {cell.planned})"
    best, second = (marks or _marks(table))[c] if table.mark_best else ((), ())
    if r in best:
        text = st.bold(text)
    elif r in second:
        text = st.under(text)
    if table.significant(r, c):
        text += st.mark
    if table.baseline is None and (r, c) in table.ci:
        lo, hi = table.ci[(r, c)]
        text += f" [{_number(lo)}, {_number(hi)}]"
    return text


def _delta_text(table: Table, r: str, c: str, st: _Style) -> str:
    d = table.delta(r, c)
    if r == table.baseline and table.cells.get((r, c)) is not None:
        return "baseline"
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
    header = [st.esc(display(table.row_key, table.names))]
    for c in table.cols:
        header.append(st.esc(_col_header(table, c)))
        if c in paper_cols:
            header.append(st.esc(f"{c} (paper)"))
        if table.baseline is not None:
            header.append(f"{st.delta_word} {st.esc(c)}")
    if table.row_notes:
        header.append(st.esc(table.notes_header))
    body, marks = [], _marks(table)
    for r in table.rows:
        line = [st.esc(r)]
        for c in table.cols:
            line.append(_cell_text(table, r, c, st, show_n, reasons, marks))
            if c in paper_cols:
                p = table.paper.get((r, c))
                line.append("" if p is None else _number(p))
            if table.baseline is not None:
                line.append(_delta_text(table, r, c, st))
        if table.row_notes:
            line.append(st.esc(table.row_notes.get(r, "")))
        body.append(line)
    return header, body


def _col_header(table: Table, c: str) -> str:
    """``mIoU (%), labeled images: 32``: what the cells hold and which column value they are."""
    if not table.keyed_header:
        return c
    return f"{metric_label(table.metric, table.agg, table.names)}, {display(table.col_key, table.names)}: {c}"


def _footnotes(table: Table, detail: bool) -> list[str]:
    """Plain-text notes: the significance test (with every p-value when ``detail``), the CI, the paper source."""
    out = []
    marked = any(table.significant(r, c) for (r, c) in table.tests)
    if table.tests and not marked:  # no cell carries the mark: no mark to explain, only that the test ran
        m = len(table.tests)
        out.append(f"No difference against {table.baseline} is significant at p < {table.alpha:g} (paired test over "
                   f"seeds, Holm-corrected over {m} comparison{'s' if m != 1 else ''}).")
    elif table.tests:
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
    marks = _marks(table)
    for r in table.rows:
        for c in table.cols:
            cell = table.cells.get((r, c))
            if cell is None:
                continue
            t, ci = table.tests.get((r, c)), table.ci.get((r, c))
            w.writerow([r, c, metric, _fixed(cell.mean), _fixed(cell.std), cell.n, cell.planned, cell.status,
                        _bool(table.mark_best and r in marks[c][0]), _bool(table.mark_best and r in marks[c][1]),
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


def numeric_frame(obj: "Table | Listing") -> "pd.DataFrame":
    """A table for a W&B Table or a notebook: numbers as numbers so they sort and chart. A Table is one row per
    cell (row, column, mean, std, n, planned, status, delta, p_holm, significant) plus the formatted ``cell`` text
    as ``sslray table`` prints it; a Listing keeps its columns, those that parse as numbers converted."""
    import pandas as pd

    if isinstance(obj, Listing):
        df = pd.DataFrame(obj.rows, columns=obj.header)
        for col in df.columns:
            given = df[col].replace({"": None, "?": None})
            converted = pd.to_numeric(given, errors="coerce")
            if converted.notna().sum() and converted.notna().sum() == given.notna().sum():  # every value a number
                df[col] = converted
        return df
    plain = _Style(lambda s: s, lambda s: s, lambda s: s, " ± ", lambda s: s, MARK, "Δ")
    records, marks = [], _marks(obj)
    for r in obj.rows:
        for c in obj.cols:
            cell = obj.cells.get((r, c))
            if cell is None:
                continue
            records.append({obj.row_key: r, obj.col_key: c, "mean": cell.mean, "std": cell.std, "n": cell.n,
                            "planned": cell.planned, "status": cell.status, "delta": obj.delta(r, c),
                            "p_holm": obj.p_holm.get((r, c)), "significant": bool(obj.significant(r, c)),
                            "cell": _cell_text(obj, r, c, plain, True, True, marks)})
    return pd.DataFrame.from_records(records)
