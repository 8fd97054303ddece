"""The tables beside the comparison: ablation (variants with what each changes), per-class IoU (from the stored
confusion matrices), pseudo-label quality, cost (GPU/CPU-hours with a forecast), the reproducibility manifest, and
a search study's best configs, Optuna parameter importances and history::

    ablation_table(study, df)                             # Table: variant rows, delta against the full method
    per_class_table(df, planned, "method.name", "data.partition")
    pseudo_table(df, history, planned, rows, cols)        # history: ResultsStore.load_history()
    cost_listing(df, planned, rows, cols); manifest(df, planned, rows, cols)   # Listings
    search_listings(study, df)                            # [best configs, importances, history]
"""
from __future__ import annotations

import dataclasses
import statistics
from collections import defaultdict
from typing import TYPE_CHECKING, Any, Callable

from sslray.report.aggregate import (Listing, Table, cell_members, cells_per_column, comparison_table, is_missing,
                                     records_by_id, text_of)
from sslray.results import nested
from sslray.study import VARIANT, PlannedTrial, cell_label

if TYPE_CHECKING:
    import pandas as pd

    from sslray.study import Study


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
    notes = {study.ablation.baseline: "baseline (changes nothing)"}
    for label, over in study.ablation.variants.items():
        notes[label] = ", ".join(f"{k}={cell_label(v)}" for k, v in over.items())
    return dataclasses.replace(table, row_notes=notes, title="Ablation")


def per_class_table(df: "pd.DataFrame", planned: list[PlannedTrial] | None, rows: str, cols: str) -> Table:
    """IoU per class (percent, mean +- std over seeds) of the last evaluation, recomputed from the stored confusion
    matrices; one row per (row, col) cell, the classes and mIoU as columns, the best row per class marked."""
    row_order, col_order, members = cell_members(df, planned, rows, cols)
    records = records_by_id(df, None)
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

    labels, cells = cells_per_column(row_order, col_order, members, records, class_cols, value_of,
                                      "no val/confusion stored")
    key = rows if len(col_order) == 1 else f"{rows} / {cols}"
    return Table(labels, class_cols, cells, "val/iou", None, key, "class", "last", "max", title="Per-class IoU",
                 keyed_header=False)


def _confusion_iou(raw: Any) -> list[float] | None:
    """Per-class IoU in percent from a [K][K] confusion matrix (rows = target), as evaluate.ConfusionMatrix: an Arrow
    list of lists, or JSON text in stores from before issue 17."""
    m = nested(raw)
    if not m:
        return None
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
    records = records_by_id(df, None)
    means: dict[str, dict[str, float]] = defaultdict(dict)
    if len(history):
        for key in ("train/mask_ratio", "train/pseudo_acc"):
            if key in history.columns:
                for tid, v in history.groupby("trial_id")[key].mean().items():
                    if not is_missing(v):
                        means[str(tid)][key] = float(v)
    spec = {name: (key, how) for name, key, how in PSEUDO_COLUMNS}

    def value_of(name: str) -> Callable[[dict], float | None]:
        key, how = spec[name]

        def value(rec):
            v = rec.get(key) if how == "last" else means[str(rec["trial_id"])].get(key)
            return None if is_missing(v) else 100.0 * float(v)
        return value

    labels, cells = cells_per_column(row_order, col_order, members, records, list(spec), value_of, None)
    key = rows if len(col_order) == 1 else f"{rows} / {cols}"
    return Table(labels, [n for n, _, _ in PSEUDO_COLUMNS], cells, "train/mask_ratio", None, key, "quantity",
                 title="Pseudo-label quality (%)", mark_best=False, keyed_header=False)


# --------------------------------------------------------------------------------------------------
# listings: cost, manifest, search


def cost_listing(df: "pd.DataFrame", planned: list[PlannedTrial] | None, rows: str, cols: str) -> Listing:
    """GPU- and CPU-hours per cell (every stored trial, failed ones too) and for the table, with a forecast for the
    trials not stored yet: the mean cost of the row's finished trials (all finished trials when the row has none)."""
    row_order, col_order, members = cell_members(df, planned, rows, cols)
    records = records_by_id(df, None)
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
    return 0.0 if is_missing(v) else float(v)


def _h(v: float | None) -> str:
    return "?" if v is None else f"{v:.3f}"


def manifest(df: "pd.DataFrame", planned: list[PlannedTrial] | None, rows: str, cols: str) -> Listing:
    """What reproduces each trial of each cell: trial id, git sha and dirty flag, split sha256, the exact rerun
    command; package versions and the numerics platform (torch build, CPU kernels, threads, GPU) as a note when
    every trial has the same ones, else as a column."""
    row_order, col_order, members = cell_members(df, planned, rows, cols)
    records = records_by_id(df, None)
    shared = {"versions": {_versions(rec.get("versions")) for rec in records.values()},
              "platform": {text_of(rec.get("platform")) for rec in records.values()}}
    varying = [k for k, values in shared.items() if len(values) > 1]
    header = [rows, cols, "seed", "status", "trial id", "git sha", "split sha256", "rerun"] + varying
    body = []
    seeds = {t.trial_id: t.seed for t in planned or []}
    for r in row_order:
        for c in col_order:
            for tid in members.get((r, c), []):
                rec = records.get(tid)
                if rec is None:
                    body.append([r, c, str(seeds.get(tid, "")), "missing", tid, "", "", ""] + [""] * len(varying))
                    continue
                sha = text_of(rec.get("git_sha"))
                dirty = rec.get("git_dirty")
                git = f"{sha}{' (dirty)' if dirty is True else ''}" if sha else "unknown (not a git checkout)"
                line = [r, c, text_of(rec.get("seed")), text_of(rec.get("status")), tid, git,
                        _splits(rec.get("split_sha256")), text_of(rec.get("rerun"))]
                per = {"versions": _versions(rec.get("versions")), "platform": text_of(rec.get("platform")) or "unknown"}
                body.append(line + [per[k] for k in varying])
    notes = [f"{'package versions' if k == 'versions' else 'platform'} (every trial): {values.pop()}"
             for k, values in shared.items() if k not in varying and values and next(iter(values))]
    return Listing(header, body, "Reproducibility manifest", notes)


def _splits(raw: Any) -> str:
    return " ".join(f"{k}={v}" for k, v in (nested(raw) or {}).items())


def _versions(raw: Any) -> str:
    return ", ".join(f"{k} {v}" for k, v in (nested(raw) or {}).items() if v is not None)


def search_listings(study: "Study", df: "pd.DataFrame", top: int = 10) -> list[Listing]:
    """A search study's report: the best ``top`` configs, Optuna's parameter importances over the finished trials,
    and the history (trials in start order with the best-so-far); one "no stored trials yet" listing before any."""
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
    recs.sort(key=lambda x: (text_of(x.get(order)), str(x["trial_id"])))
    scored = [x for x in recs if not is_missing(x.get(metric))]
    sign = -1.0 if s.mode == "max" else 1.0
    if len(study.seeds) > 1:
        return [_best_seeded(study, recs, top), _importances(study, recs), _history(recs, metric, sign)]
    ranked = sorted(scored, key=lambda x: sign * float(x[metric]))[:top]
    best_rows = [[str(i + 1), str(x["trial_id"])[:12], str(x["status"]),
                  *(_param(x.get(f"cfg.{p}")) for p in params), f"{float(x[metric]):.2f}",
                  text_of(x.get("iteration"))] for i, x in enumerate(ranked)]
    best = Listing(["rank", "trial", "status", *params, metric, "iteration"], best_rows,
                   f"Best configs ({s.mode} {metric}, {len(scored)} of {len(recs)} trials scored)")
    history_rows, best_so_far = [], None
    for i, x in enumerate(recs):
        v = x.get(metric)
        if not is_missing(v) and (best_so_far is None or sign * float(v) < sign * best_so_far):
            best_so_far = float(v)
        history_rows.append([str(i + 1), str(x["trial_id"])[:12], str(x["status"]),
                             "" if is_missing(v) else f"{float(v):.2f}",
                             "" if best_so_far is None else f"{best_so_far:.2f}"])
    history = Listing(["#", "trial", "status", metric, "best so far"], history_rows, "History")
    return [best, _importances(study, recs), history]


def _history(recs: list[dict], metric: str, sign: float) -> Listing:
    rows, best = [], None
    for i, x in enumerate(recs):
        v = x.get(metric)
        if not is_missing(v) and (best is None or sign * float(v) < sign * best):
            best = float(v)
        rows.append([str(i + 1), str(x["trial_id"])[:12], str(x["status"]), "" if is_missing(v) else f"{float(v):.2f}",
                     "" if best is None else f"{best:.2f}"])
    return Listing(["#", "trial", "status", metric, "best so far"], rows, "History")


def _best_seeded(study: "Study", recs: list[dict], top: int) -> Listing:
    """The best configurations of a search whose every configuration runs each seed: one row per configuration
    (its parameters), ranked by the mean over seeds, which is the value the searcher was told."""
    import statistics

    s = study.search
    params = list(s.space)
    groups: dict[tuple, list[dict]] = {}
    for x in recs:
        groups.setdefault(tuple(_param(x.get(f"cfg.{p}")) for p in params), []).append(x)
    sign = -1.0 if s.mode == "max" else 1.0
    scored = []
    for key, rows in groups.items():
        values = [float(x[s.metric]) for x in rows if x.get("status") == "ok" and not is_missing(x.get(s.metric))]
        if values:
            std = statistics.stdev(values) if len(values) > 1 else 0.0
            scored.append((statistics.fmean(values), std, len(values), len(rows), key))
    scored.sort(key=lambda t: sign * t[0])
    body = [[str(i + 1), *key, f"{m:.2f} +- {sd:.2f}", f"{n}/{len(study.seeds)}"]
            for i, (m, sd, n, _, key) in enumerate(scored[:top])]
    title = (f"Best configs ({s.mode} {s.metric}, mean +- std over {len(study.seeds)} seeds: the mean is what the "
             f"searcher optimised; {len(scored)} of {len(groups)} configurations scored)")
    return Listing(["rank", *params, f"{s.metric} (mean +- std)", "seeds"], body, title)


def _param(v: Any) -> str:
    if is_missing(v):
        return ""
    return f"{v:.4g}" if isinstance(v, float) else cell_label(v)


def _importances(study: "Study", recs: list[dict]) -> Listing:
    """Optuna's PED-ANOVA importances (its default evaluator; fANOVA would need scikit-learn) on an in-memory
    Optuna study rebuilt from the finished trials with ``optuna.trial.create_trial``."""
    import optuna

    s = study.search
    dists = {k: d.optuna() for k, d in s.space.items()}
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # no "A new study created in memory" line in a table
    try:
        ostudy = optuna.create_study(direction="maximize" if s.mode == "max" else "minimize")
    finally:
        optuna.logging.set_verbosity(verbosity)
    for x in recs:
        if x.get("status") != "ok" or is_missing(x.get(s.metric)):
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


def _optuna_value(v: Any, dist) -> Any:
    import optuna.distributions as od

    if isinstance(dist, od.IntDistribution):
        return int(v)
    if isinstance(dist, od.FloatDistribution):
        return float(v)
    return v.item() if hasattr(v, "item") else v
