"""The results store: one Parquet file per finished trial, the truth for ``--resume``, ``status`` and tables.

Files under a study's storage root (paths from :class:`sslray.storage.StudyStorage`, the one owner of the layout)::

    <root>/results/<trial_id>.parquet   one row: status, the flattened config, final/best metrics, provenance
    <root>/history/<trial_id>.parquet   one row per evaluation (the trainer's ``FitResult.history``)

Files are written with :meth:`sslray.storage.StudyStorage.write_object` (locally a ``.tmp`` name in the same
directory, fsync, rename; on an object store one complete PUT), so a reader never sees half a file and a crash
leaves at most an ignored temp file. Loads also merge ``snapshots/`` (compacted, fingerprinted copies of many rows;
see :class:`ResultsStore`), so a study of 10,000 trials loads in about a second. ``pandas.read_parquet(<root>/results)`` works
without sslray because every file writes each column with the same Arrow type (see :func:`arrow_type`); note that
a plain directory read takes its column *set* from the first file, so per-class columns of a dataset that only
later files have are dropped there. :meth:`ResultsStore.load` reads the files one by one and keeps every column.
:func:`plan` splits a study's trials into those to run and those already stored (``sslray run``, ``--dry-run``).

    store = ResultsStore("runs/quickstart")
    store.write(make_row("quickstart", t.point, t.config, "ok", result.metrics, None, wall_s, "cpu"), result.history)
    df = store.load()
    todo, skipped = plan(study, "runs/quickstart")
"""
from __future__ import annotations

import dataclasses
import datetime
import functools
import importlib.metadata
import json
import os
import platform
import re
import subprocess
import sys
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from sslray.config import TrialConfig, flatten
from sslray.storage import HISTORY, RESULTS, TMP_PREFIX, StoreIOError, StudyStorage, redact

if TYPE_CHECKING:
    from sslray.study import PlannedTrial, Study

REQUIRED = ("study", "trial_id", "status")
HISTORY_REQUIRED = ("study", "trial_id")
STATUSES = ("ok", "failed", "stopped")  # stopped: ended early by a scheduler (ASHA)
TRIAL_FILE = re.compile(r"[0-9a-f]{64}\.parquet")
# Metric columns every row has (None when not reported), plus train/loss/<term> for every registered term and
# val/iou/<class> for the dataset's classes: a plain directory read takes its columns from the first file, which may
# be a failed trial or a supervised one, and must still see the columns of the others.
# The trial's own wall time is the row's ``wall_s`` (the trainer's ``time/wall_s`` stays in the history only).
STANDARD_METRICS = ("iteration", "val/miou", "val/pixel_acc", "val/confusion", "best/val/miou", "best/iteration",
                    "train/loss", "train/lr", "train/mask_ratio", "train/pseudo_acc", "time/step_s",
                    "time/images_per_s", "mem/peak_mb", "resumed_from", "val/per_image",
                    "val_ema/miou", "val_ema/pixel_acc", "best/val_ema/miou", "best_ema/iteration")  # eval_model: both
ROW_ONLY_IN_HISTORY = ("time/wall_s",)
# Arrays of the final evaluation (Arrow lists / structs): in the row, never in the history files.
ARRAY_METRICS = ("val/confusion", "val/per_image")
VERSIONED_PACKAGES = ("torch", "torchvision", "ray", "optuna", "pandas", "pyarrow", "wandb", "sslray")
# What a history row carries besides its metrics: the keys a table or plot groups by (plus the cell's own keys).
HISTORY_KEYS = ("seed", "variant", "cfg.method.name", "cfg.data.partition", "cfg.data.dataset", "cfg.model.name")
_COUNTS = pa.list_(pa.list_(pa.float64()))
NESTED_TYPES: dict[str, pa.DataType] = {
    "val/confusion": pa.list_(pa.list_(pa.int64())),  # [K][K] pixel counts, rows = target class
    "val/per_image": pa.struct([("inter", _COUNTS), ("union", _COUNTS)]),  # [N][K] per validation image
    "versions": pa.struct([(name, pa.string()) for name in VERSIONED_PACKAGES]),
    "split_sha256": pa.list_(pa.struct([("file", pa.string()), ("sha256", pa.string())])),
}
TIMESTAMP = pa.timestamp("ms", tz="UTC")  # Parquet keeps ms (it has no second unit)
# Units and meaning of the columns, stored as Parquet field metadata ("unit", "doc") and shown in the README.
UNITS: dict[str, tuple[str, str]] = {
    "val/miou": ("percent (0-100)", "mean IoU over classes at the last evaluation"),
    "best/val/miou": ("percent (0-100)", "best val/miou over the evaluations"),
    "val/pixel_acc": ("percent (0-100)", "pixel accuracy at the last evaluation"),
    "val/iou/": ("percent (0-100)", "IoU of one class at the last evaluation"),
    "train/mask_ratio": ("ratio (0-1)", "share of unlabeled pixels above the confidence threshold"),
    "train/pseudo_acc": ("ratio (0-1)", "accuracy of the confident pseudo-labels (synthetic ground truth)"),
    "train/loss": ("loss", "total loss, running mean since the previous report"),
    "train/loss/": ("loss", "one term's unweighted loss; null when the trial's method lacks the term"),
    "cfg.method.terms.": ("", "a loss term's setting; null when the trial's method lacks the term"),
    "train/lr": ("learning rate", "of the backbone group"),
    "time/step_s": ("seconds", "mean time of one training iteration"),
    "time/images_per_s": ("images per second", "labeled + unlabeled images trained on"),
    "mem/peak_mb": ("MiB", "peak accelerator (or host) memory"),
    "wall_s": ("seconds", "the trial's wall time, start to stored row"),
    "gpu_hours": ("hours", "wall_s x GPUs the trial held"), "cpu_hours": ("hours", "wall_s x CPUs the trial held"),
    "created_at": ("UTC timestamp", "when the row was written"),
    "started_at": ("UTC timestamp", "when the trial started"),
    "val/confusion": ("pixels", "confusion matrix [K][K], rows = target class"),
    "val/per_image": ("pixels", "intersection and union per validation image and class, [N][K] each"),
    "split_sha256": ("", "sha256 of each split file the trial read"),
    "versions": ("", "installed package versions"),
    "platform": ("", "what sets the floating-point kernels: torch build, CPU kernel level and model, threads, GPU"),
}

# Columns whose Arrow type does not follow from the value (it may be None in one file and set in another).
FIXED_TYPES: dict[str, pa.DataType] = {
    "study": pa.string(), "trial_id": pa.string(), "status": pa.string(), "reason": pa.string(),
    "variant": pa.string(), "cell": pa.string(), "seed": pa.int64(), "iteration": pa.int64(),
    "resumed_from": pa.int64(),
    "best/iteration": pa.int64(), "wall_s": pa.float64(), "device": pa.string(), "gpu_hours": pa.float64(),
    "cpu_hours": pa.float64(), "git_sha": pa.string(), "git_dirty": pa.bool_(), "rerun": pa.string(),
    "platform": pa.string(), "created_at": TIMESTAMP, "started_at": TIMESTAMP, **NESTED_TYPES,
}
EXTRA_KEYS = ("gpus", "cpus", "split_sha256", "rerun")


class StoreError(RuntimeError):
    """A results file that cannot be trusted (unreadable, foreign, inconsistent) or a forbidden overwrite; the
    message starts with the file's path."""


# --------------------------------------------------------------------------------------------------
# rows


def make_row(study: str, planned_cell: Mapping[str, Any], config: TrialConfig, status: str,
             metrics: Mapping[str, Any] | None, reason: str | None, wall_s: float, device: str,
             extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The result row of one trial, every value a JSON-able scalar.

    ``planned_cell`` is the PlannedTrial's ``point`` (stored as JSON in ``cell``; its ``"variant"`` also fills the
    ``variant`` column). ``extra`` may carry ``gpus`` and ``cpus`` (totals used by the trial, for ``gpu_hours`` /
    ``cpu_hours``; None when not given), ``split_sha256`` (dict, stored as JSON), ``rerun`` (the command that
    reproduces the trial); other keys are stored as columns of their own.
    """
    if status not in STATUSES:
        raise ValueError(f"status must be one of {STATUSES}, got {status!r}")
    extra = dict(extra or {})
    git_sha, git_dirty = git_state()
    row: dict[str, Any] = {
        "study": study, "trial_id": config.trial_id(), "status": status, "reason": reason,
        "variant": planned_cell.get("variant"), "cell": json.dumps(dict(planned_cell), sort_keys=True, default=str),
        "seed": config.seed,
    }
    row.update(_config_columns(config))
    row.update({k: None for k in _standard_metrics(config)})
    row.update({k: _nested(k, v) if k in NESTED_TYPES else _scalar(v) for k, v in (metrics or {}).items()
                if k not in ROW_ONLY_IN_HISTORY})
    row.update({
        "wall_s": float(wall_s), "device": device,
        "gpu_hours": _hours(wall_s, extra.get("gpus")), "cpu_hours": _hours(wall_s, extra.get("cpus")),
        "git_sha": git_sha, "git_dirty": git_dirty,
        "split_sha256": _nested("split_sha256", extra.get("split_sha256")),
        "versions": package_versions(),
        "platform": numerics_platform(),
        "created_at": datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0),
        "started_at": _timestamp(extra.pop("started_at", None)),  # in every row: a plain read keeps the column
        "rerun": extra.get("rerun"),
    })
    for k, v in extra.items():
        if k not in EXTRA_KEYS:
            if k in row:
                raise ValueError(f"extra key {k!r} would overwrite the row's own column")
            row[k] = _timestamp(v) if k == "started_at" else _scalar(v)
    return row


def _timestamp(v: Any) -> datetime.datetime | None:
    """A UTC datetime from a datetime, a unix time or an ISO string (the one kind of timestamp rows hold)."""
    if v is None or isinstance(v, datetime.datetime):
        return v
    if isinstance(v, str):
        return datetime.datetime.fromisoformat(v)
    return datetime.datetime.fromtimestamp(float(v), datetime.timezone.utc)


def _nested(column: str, v: Any) -> Any:
    """A value of a NESTED_TYPES column as Arrow takes it: JSON text decoded, a {file: sha256} dict as a list of
    records, arrays as lists."""
    v = nested(v)
    if v is None:
        return None
    if column == "split_sha256":
        return [{"file": str(f), "sha256": str(h)} for f, h in sorted(dict(v).items())]
    if column == "val/confusion":
        return [[int(x) for x in r] for r in v]
    if column == "val/per_image":
        return {k: [[float(x) for x in r] for r in v[k]] for k in ("inter", "union")}
    return v


def nested(v: Any) -> Any:
    """A nested result value as plain Python, whatever wrote it: JSON text (stores from before issue 17), Arrow
    lists/structs as pandas returns them (numpy arrays of arrays, dicts), a split list of {file, sha256} records
    (returned as a {file: sha256} dict); None / NaN as None."""
    import numpy as np

    if v is None or (isinstance(v, float) and v != v):
        return None
    if isinstance(v, str):
        return json.loads(v) if v else None
    if isinstance(v, np.ndarray):
        v = v.tolist()
    if isinstance(v, dict):
        return {k: nested(x) if isinstance(x, (np.ndarray, list, dict)) else x for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        items = [nested(x) if isinstance(x, (np.ndarray, list, tuple, dict)) else x for x in v]
        if items and all(isinstance(x, dict) and set(x) == {"file", "sha256"} for x in items):
            return {x["file"]: x["sha256"] for x in items}
        return items
    return v


def _config_columns(config: TrialConfig) -> dict[str, Any]:
    """``cfg.<dotted key>`` for every config field, and for every field of every registered loss term (None when
    the method lacks the term), so that all rows share one column set."""
    from sslray.methods import TERMS  # late: the registry imports torch

    out = {f"cfg.{k}": _scalar(v) for k, v in flatten(config.to_dict()).items()}
    for name, term in TERMS.items():
        for f in dataclasses.fields(term.config_cls):
            out.setdefault(f"cfg.method.terms.{name}.{f.name}", None)
    return out


def _standard_metrics(config: TrialConfig) -> list[str]:
    from sslray.data.datasets import DATASETS
    from sslray.methods import TERMS

    spec = DATASETS.get(config.data.dataset)
    classes = spec.class_names if spec else ()
    return [*STANDARD_METRICS, *(f"train/loss/{t}" for t in TERMS), *(f"val/iou/{c}" for c in classes)]


def _scalar(v: Any) -> Any:
    """A Parquet-friendly scalar: numpy/torch scalars unwrapped, lists/tuples/dicts as JSON strings."""
    if hasattr(v, "item") and not isinstance(v, (str, bytes, list, tuple, dict)):
        v = v.item()
    if isinstance(v, (list, tuple, dict)):
        return json.dumps(list(v) if isinstance(v, tuple) else v)
    return v


def _hours(wall_s: float, units: Any) -> float | None:
    return None if units is None else float(wall_s) / 3600.0 * float(units)


@functools.lru_cache(maxsize=1)
def git_state() -> tuple[str | None, bool | None]:
    """(HEAD sha, dirty) of the checkout sslray is imported from; (None, None) outside a git checkout (a wheel, a
    Ray working_dir copy). Cached: it describes the code this process loaded, and it does not change mid-run."""
    repo = Path(__file__).resolve().parent.parent
    if not (repo / ".git").exists():
        return None, None
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=10,
                             check=True).stdout.strip()
        porcelain = subprocess.run(["git", "status", "--porcelain"], cwd=repo, capture_output=True, text=True,
                                   timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None, None
    return sha or None, bool(porcelain.strip())


def numerics_platform() -> str | None:
    """What decides the trial's floating-point arithmetic beside the config: the torch build, the CPU kernel level
    torch dispatched to and the CPU model, torch's thread count and the GPU, e.g. ``torch 2.14.1+cu130; cpu AVX512
    (Intel(R) Xeon(R) Processor); threads 1``. The same trial id on two platforms is not bit-identical (issue 11: the
    PCR ablation's seed 0 moved by up to 8 mIoU between two sessions' machines), so tables say when they mix them.
    None where torch was never imported (the row of a process that trained nothing): importing it here would
    cost the light commands seconds."""
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    parts = [f"torch {torch.__version__}"]
    try:
        parts.append(f"cpu {torch.backends.cpu.get_cpu_capability()} ({_cpu_model()})")
    except (AttributeError, RuntimeError):
        parts.append(f"cpu ({_cpu_model()})")
    parts.append(f"threads {torch.get_num_threads()}")
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        parts.append(f"gpu {torch.cuda.get_device_name()}")
    return "; ".join(parts)


@functools.lru_cache(maxsize=1)
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


@functools.lru_cache(maxsize=1)
def package_versions() -> dict[str, str | None]:
    """Installed versions from package metadata: nothing is imported (importing ray here would break the rule that
    only ray_adapter does)."""
    out = {}
    for name in VERSIONED_PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def arrow_type(column: str, value: Any) -> pa.DataType:
    """The Arrow type of a column, the same in every file: fixed for provenance columns, from the dataclass
    annotation for ``cfg.*`` (so ``data.crop_size: None`` is still int64), and from the value otherwise, with numbers
    as float64 (an int metric in one file and a float in another would not concatenate) and None as float64."""
    if column in FIXED_TYPES:
        return FIXED_TYPES[column]
    if column.startswith("cfg."):
        t = _config_arrow_type(column[4:])
        if t is not None:
            return t
    if isinstance(value, bool):
        return pa.bool_()
    if isinstance(value, str):
        return pa.string()
    return pa.float64()


_CONFIG_TYPES: dict[str, pa.DataType] = {}  # a config key's type never changes once it resolves (plugins only add)


def _config_arrow_type(key: str) -> pa.DataType | None:
    t = _CONFIG_TYPES.get(key)
    if t is None:
        t = _CONFIG_TYPES[key] = _resolve_config_arrow_type(key)  # type: ignore[assignment]
        if t is None:
            del _CONFIG_TYPES[key]
    return t


def _resolve_config_arrow_type(key: str) -> pa.DataType | None:
    from sslray.config import ConfigError
    from sslray.study import field_type, unwrap_optional

    try:
        t = unwrap_optional(field_type(key))
    except ConfigError:
        return None
    return {bool: pa.bool_(), int: pa.int64(), float: pa.float64()}.get(t, pa.string())


def _to_table(rows: list[Mapping[str, Any]], source: str) -> pa.Table:
    """Rows with possibly different keys -> one table (missing values null), typed by :func:`arrow_type`."""
    columns = list(dict.fromkeys(k for r in rows for k in r))
    arrays = {}
    for col in columns:
        values = [r.get(col) for r in rows]
        sample = next((v for v in values if v is not None), None)
        t = arrow_type(col, sample)
        try:
            arrays[col] = pa.array([_coerce(v, t) for v in values], type=t)
        except (pa.ArrowException, TypeError, ValueError) as e:
            raise ValueError(f"{source}: column {col!r}: cannot store {sample!r} as {t} ({e})") from None
    fields = [pa.field(c, arrays[c].type, metadata=_field_metadata(c)) for c in columns]
    return pa.Table.from_arrays(list(arrays.values()), schema=pa.schema(fields, metadata=SCHEMA_METADATA))


SCHEMA_METADATA = {b"sslray.schema": b"results/2: one row per trial (history: one per evaluation); field metadata "
                                     b"'unit' and 'doc' per column; README 'Loading results'"}


def unit_of(column: str) -> tuple[str, str] | None:
    """(unit, doc) of a result column (exact name, else the longest prefix entry ending in '/' or '.')."""
    if column in UNITS:
        return UNITS[column]
    prefixes = [k for k in UNITS if k.endswith(("/", ".")) and column.startswith(k)]
    return UNITS[max(prefixes, key=len)] if prefixes else None


def _field_metadata(column: str) -> dict[bytes, bytes] | None:
    u = unit_of(column)
    return None if u is None else {b"unit": u[0].encode(), b"doc": u[1].encode()}


def _coerce(v: Any, t: pa.DataType) -> Any:
    if v is None:
        return None
    if pa.types.is_floating(t) and isinstance(v, (int, float)) and not isinstance(v, bool):
        return float(v)
    if pa.types.is_integer(t) and isinstance(v, float) and v.is_integer():
        return int(v)
    return v


# --------------------------------------------------------------------------------------------------
# the store


SIZE_COL, MTIME_COL = "_object.size", "_object.mtime_ns"  # in snapshots: the trial object each row came from
COMPACT_MIN = 50  # rows read one object at a time before a load writes a snapshot (bounds a load to ~50 reads)
READ_THREADS = 16  # parallel object reads on an object store (latency-bound)


class ResultsStore:
    """Parquet rows of one study under ``root`` (a local directory, a URI, or a :class:`StudyStorage`).

    The truth is one immutable object per finished trial (``results/<id>.parquet``, ``history/<id>.parquet``).
    A load lists those two prefixes (one listing each: name, size and mtime of every object) and the snapshots
    (``snapshots/results/``, ``snapshots/history/``): Parquet files holding the rows of many trials, each row
    tagged with the size and mtime of the object it was copied from. A row of a snapshot is used only while its
    object is still listed with that size and mtime; every other trial is read from its own object. So a
    snapshot is only a cache: a missing, stale, truncated or concurrently deleted one costs reads, never rows.

    When a load read at least :data:`COMPACT_MIN` objects one by one (or found several snapshots), it writes a new
    snapshot under a unique name (a fresh uuid: two drivers compacting at once write two snapshots, both valid)
    and then deletes the snapshots it merged; a reader that loses a deleted snapshot falls back to the objects.
    A snapshot that cannot be read is skipped and reported in :attr:`notes` (the CLI prints them on stderr).
    """

    def __init__(self, root: "str | os.PathLike | StudyStorage", snapshots: bool = True):
        self.storage = root if isinstance(root, StudyStorage) else StudyStorage(root)
        self.root = self.storage.root
        self.results_dir = self.storage.results_dir
        self.history_dir = self.storage.history_dir
        self.snapshots = snapshots
        self.notes: list[str] = []
        self.stats: dict[str, int] = {}

    def path(self, trial_id: str) -> Path:
        return self.storage.result_file(trial_id)

    def write(self, row: Mapping[str, Any], history: list[Mapping[str, Any]] | None = None) -> str:
        """Store one trial's row (and its per-evaluation history); returns the row object's name.

        A trial id may be written again only if its stored status is ``failed`` (re-running a failure); anything
        else raises StoreError. The history goes first: a row object means the trial is complete. Each object is
        written once, complete (:meth:`StudyStorage.write_object`), under a name only this trial writes.
        """
        trial_id = _check_row(row)
        key = self.storage.result_key(trial_id)
        # Check-then-replace is not atomic across processes; it need not be: one trial id has one writer at a time.
        if self.storage.exists(key):
            status = str(self._read(key, REQUIRED, True).column("status")[0])
            if status != "failed":
                raise StoreError(f"{self.storage.display(key)}: trial {trial_id[:12]} is already stored with status "
                                 f"{status!r}; only failed trials may be overwritten")
        hist_key = self.storage.history_key(trial_id)
        if history:
            # the row's metric columns, so that every history file has them too (see STANDARD_METRICS)
            metric_keys = {k: None for k in row if ("/" in k or k == "iteration") and k not in ARRAY_METRICS}
            metric_keys.update({k: None for k in ROW_ONLY_IN_HISTORY})
            keys = {k: row.get(k) for k in (*HISTORY_KEYS, *_cell_columns(row)) if k in row}
            rows = [{"study": row["study"], "trial_id": trial_id, **keys, **metric_keys,
                     **{k: _scalar(v) for k, v in h.items() if k not in ARRAY_METRICS}} for h in history]
            self._write_table(_to_table(rows, self.storage.display(hist_key)), hist_key)
        elif self.storage.exists(hist_key):
            self.storage.delete(hist_key)  # the failed attempt's history does not belong to this one
        return self._write_table(_to_table([row], self.storage.display(key)), key)

    def has(self, trial_id: str) -> bool:
        return self.storage.exists(self.storage.result_key(trial_id))

    def ids(self, status: str | None = None, df: pd.DataFrame | None = None) -> set[str]:
        """Stored trial ids, optionally only those with ``status`` (of ``df`` when given: one load, many asks)."""
        df = self.load() if df is None else df
        if status is not None:
            df = df[df["status"] == status]
        return set(df["trial_id"])

    def load(self) -> pd.DataFrame:
        """Every stored row (sorted by trial id); StoreError names the first bad object. Empty store: no rows."""
        return self._load(RESULTS, REQUIRED, one_row=True)

    def load_history(self) -> pd.DataFrame:
        """Every stored per-evaluation row, with ``study`` and ``trial_id`` columns."""
        return self._load(HISTORY, HISTORY_REQUIRED, one_row=False)

    def compact(self) -> None:
        """Write snapshots of every row now (whatever the number of trials read one by one)."""
        for kind, req, one in ((RESULTS, REQUIRED, True), (HISTORY, HISTORY_REQUIRED, False)):
            self._load(kind, req, one, force_compact=True)

    # loading -------------------------------------------------------------------------------------------------

    def _load(self, kind: str, required: tuple[str, ...], one_row: bool, force_compact: bool = False) -> pd.DataFrame:
        listing = self._listing(kind)
        snap_tables, merged = self._from_snapshots(kind, listing) if self.snapshots else ([], [])
        covered = set().union(*(set(t.column("trial_id").to_pylist()) for t in snap_tables)) if snap_tables else set()
        todo = [tid for tid in listing if tid not in covered]
        fresh = self._read_many(kind, todo, listing, required, one_row)
        self.stats = {"objects": len(listing), "from_snapshots": len(covered), "read_one_by_one": len(todo),
                      "snapshots": len(merged)}
        tables = snap_tables + fresh
        if not tables:
            return pd.DataFrame({c: pd.Series(dtype=object) for c in required})
        table = _concat_tables(tables)
        if self.snapshots and (force_compact or len(todo) >= COMPACT_MIN or len(merged) > 1):
            self._write_snapshot(kind, table, merged)
        df = table.drop_columns([c for c in (SIZE_COL, MTIME_COL) if c in table.column_names]).to_pandas()
        return df.sort_values("trial_id", kind="stable", ignore_index=True)

    def _listing(self, kind: str) -> dict[str, tuple[int, int]]:
        """trial id -> (size, mtime_ns) of every ``<64 hex>.parquet`` under ``kind``, sorted by id; anything else
        (but temp files) is a StoreError, because a stray entry there is either a bug or a copy mistake, and tables
        must never silently skip data."""
        infos = sorted(self.storage.list_files(kind), key=lambda i: i.base_name)
        foreign = [i.base_name for i in infos if not i.base_name.startswith(TMP_PREFIX)
                   and not (TRIAL_FILE.fullmatch(i.base_name) and i.is_file)]
        if foreign:
            raise StoreError(f"{self.storage.display(f'{kind}/{foreign[0]}')}: not a results file (expected <trial "
                             f"id>.parquet); foreign entries: {', '.join(foreign)}")
        return {i.base_name[: -len(".parquet")]: (i.size, i.mtime_ns) for i in infos
                if TRIAL_FILE.fullmatch(i.base_name)}

    def _from_snapshots(self, kind: str, listing: dict[str, tuple[int, int]]) -> tuple[list[pa.Table], list[str]]:
        """The rows of the snapshots whose objects are unchanged (newest snapshot first; each trial from one
        snapshot only), and the snapshot keys read."""
        snap_dir = self.storage.snapshot_dir(kind)
        infos = [i for i in self.storage.list_files(snap_dir)
                 if i.is_file and i.base_name.endswith(".parquet") and not i.base_name.startswith(TMP_PREFIX)]
        infos.sort(key=lambda i: (-(i.mtime_ns or 0), i.base_name))
        tables, merged, taken = [], [], set()
        for info in infos:
            key = f"{snap_dir}/{info.base_name}"
            try:
                table = pq.read_table(pa.BufferReader(self.storage.read_bytes(key)))
                ids = table.column("trial_id").to_pylist()
                sizes, mtimes = table.column(SIZE_COL).to_pylist(), table.column(MTIME_COL).to_pylist()
            except FileNotFoundError:  # deleted by a concurrent compaction after the listing: its rows are elsewhere
                continue
            except (pa.ArrowException, OSError, KeyError) as e:
                self.notes.append(f"{self.storage.display(key)}: unreadable snapshot ignored (its rows are read "
                                  f"from the trial objects): {_first_line(e)}")
                continue
            merged.append(key)
            good = {t for t, s, m in zip(ids, sizes, mtimes) if t not in taken and listing.get(t) == (s, m)}
            if good:
                mask = pa.array([t in good for t in ids], type=pa.bool_())
                tables.append(table.filter(mask))
                taken |= good
        return tables, merged

    def _read_many(self, kind: str, ids: list[str], listing: dict[str, tuple[int, int]],
                   required: tuple[str, ...], one_row: bool) -> list[pa.Table]:
        keys = [f"{kind}/{tid}.parquet" for tid in ids]

        def read(key_tid):
            key, tid = key_tid
            t = self._read(key, required, one_row)
            size, mtime = listing[tid]
            n = t.num_rows
            t = t.append_column(SIZE_COL, pa.array([size] * n, pa.int64()))
            return t.append_column(MTIME_COL, pa.array([mtime] * n, pa.int64()))

        pairs = list(zip(keys, ids))
        if self.storage.remote and len(pairs) > 1:
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(READ_THREADS) as pool:
                return list(pool.map(read, pairs))
        return [read(p) for p in pairs]

    def _read(self, key: str, required: tuple[str, ...], one_row: bool) -> pa.Table:
        """A store object as a table, or StoreError naming it: unreadable or truncated Parquet, a required column
        missing, or (``one_row``, result objects) anything but exactly one row whose trial_id is the object's name."""
        name = self.storage.display(key)
        try:
            if self.storage.remote:
                table = pq.read_table(pa.BufferReader(self.storage.read_bytes(key)))
            else:
                table = pq.ParquetFile(self.storage.root / key).read()
        except StoreIOError:
            raise
        except (pa.ArrowException, OSError) as e:
            raise StoreError(f"{name}: not a readable Parquet file ({_first_line(e)})") from None
        missing = [c for c in required if c not in table.column_names]
        if missing:
            raise StoreError(f"{name}: missing required column(s) {', '.join(missing)}")
        trial_id = key.rsplit("/", 1)[-1][: -len(".parquet")]
        if one_row:
            found = table.column("trial_id").to_pylist()
            if len(found) != 1 or found[0] != trial_id:
                raise StoreError(f"{name}: expected one row for trial {trial_id[:12]}, found {len(found)} row(s) with "
                                 f"trial_id {sorted(set(map(str, found)))}")
        return table

    def _write_table(self, table: pa.Table, key: str) -> str:
        return self.storage.write_object(key, lambda f: pq.write_table(table, f))

    def _write_snapshot(self, kind: str, table: pa.Table, merged: list[str]) -> None:
        """Write ``table`` (every row, with the object each came from) as a new snapshot, then drop the merged
        ones. Best effort: a read-only or unreachable store keeps its old snapshots and loses nothing."""
        key = f"{self.storage.snapshot_dir(kind)}/{uuid.uuid4().hex}.parquet"
        try:
            self._write_table(table, key)
            for old in merged:
                self.storage.delete(old)
        except OSError as e:
            self.notes.append(f"{self.storage.display(key)}: snapshot not written ({_first_line(e)})")


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return redact(text.splitlines()[0]) if text else type(e).__name__


def _concat_tables(tables: list[pa.Table]) -> pa.Table:
    """One table of rows whose column sets (and, from other sslray versions, types) may differ."""
    try:  # most objects share one schema: the plain concatenation is several times faster
        return pa.concat_tables(tables)
    except pa.ArrowInvalid:
        pass
    try:
        return pa.concat_tables(tables, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
        frames = [t.to_pandas() for t in tables]
        return pa.Table.from_pandas(pd.concat(frames, ignore_index=True, sort=False), preserve_index=False)


def _check_row(row: Mapping[str, Any]) -> str:
    for key in REQUIRED:
        if not isinstance(row.get(key), str):
            raise ValueError(f"a result row needs a string {key!r}, got {row.get(key)!r}")
    if not TRIAL_FILE.fullmatch(row["trial_id"] + ".parquet"):
        raise ValueError(f"trial_id must be 64 lowercase hex digits (a sha256), got {row['trial_id']!r}")
    if row["status"] not in STATUSES:
        raise ValueError(f"status must be one of {STATUSES}, got {row['status']!r}")
    for k, v in row.items():
        if k in NESTED_TYPES or isinstance(FIXED_TYPES.get(k), pa.TimestampType):
            continue
        if not (v is None or isinstance(v, (str, bool, int, float))):
            raise ValueError(f"result column {k!r} must hold a scalar (use make_row), got {type(v).__name__}")
    return row["trial_id"]


def _cell_columns(row: Mapping[str, Any]) -> list[str]:
    """``cfg.<key>`` of each key of the trial's cell (the grid point: what the study varies)."""
    try:
        cell = json.loads(row.get("cell") or "{}")
    except (TypeError, ValueError):
        return []
    return [f"cfg.{k}" for k in cell if k not in ("variant", "seed")]


def plan(study: "Study", storage: "str | os.PathLike | StudyStorage", retry_failed: bool = False,
         stored: "pd.DataFrame | None" = None) -> "tuple[list[PlannedTrial], list[PlannedTrial]]":
    """(to run, skipped) of a grid / ablation study: trials whose id is already stored are skipped (failed ones too,
    unless ``retry_failed``). Reads only the store (``stored``: its rows, when the caller has loaded them):
    ``sslray run --dry-run`` plans without Ray."""
    store = ResultsStore(storage)
    df = store.load() if stored is None else stored
    done = store.ids("ok", df) | (set() if retry_failed else store.ids("failed", df))
    planned = study.trials()
    return [p for p in planned if p.trial_id not in done], [p for p in planned if p.trial_id in done]


def row_dicts(df: "pd.DataFrame") -> list[dict[str, Any]]:
    """``df.to_dict("records")`` (nulls of extension columns as None), built column by column: several times
    faster on the store's wide frames (a 10,000-trial store has hundreds of columns)."""
    cols = []
    for c in df.columns:
        values = df[c].tolist()
        if pd.api.types.is_extension_array_dtype(df[c].dtype):
            values = [None if v is pd.NA else v for v in values]
        cols.append(values)
    names = list(df.columns)
    return [dict(zip(names, row)) for row in zip(*cols)]


def _concat(frames: list[pd.DataFrame], required: tuple[str, ...]) -> pd.DataFrame:
    if not frames:
        return pd.DataFrame({c: pd.Series(dtype=object) for c in required})
    return pd.concat(frames, ignore_index=True, sort=False)


# --------------------------------------------------------------------------------------------------
# reading across studies


def load_results(paths: "str | os.PathLike | list[str | os.PathLike]", history: bool = False) -> pd.DataFrame:
    """One tidy DataFrame (one row per trial, or per evaluation with ``history``) across studies.

    ``paths``: study storage directories, study YAML files (their ``storage:``), or glob patterns of either (``runs/*``),
    one or a list. Every store is read with :class:`ResultsStore` (the same checks as ``sslray table``); a
    ``storage`` column says where each row came from. Columns are the union over the stores (null where a store
    lacks one); units and meaning are in the Parquet field metadata (:func:`unit_of`) and the README. A pattern or
    path that matches nothing is a FileNotFoundError (never an empty frame by mistake).
    """
    import glob

    frames = []
    for root in _storage_roots([paths] if isinstance(paths, (str, os.PathLike)) else list(paths), glob):
        store = ResultsStore(root)
        df = store.load_history() if history else store.load()
        if len(df):
            frames.append(df.assign(storage=str(root)))
    if not frames:
        return _concat([], HISTORY_REQUIRED if history else REQUIRED).assign(storage=pd.Series(dtype=object))
    return pd.concat(frames, ignore_index=True, sort=False)


def _storage_roots(paths: list, glob) -> list[Path]:
    roots: list[Path] = []
    for p in map(str, paths):
        if "://" in p and not p.startswith("file://"):  # an object-store root: read as it is
            roots.append(p)  # type: ignore[arg-type]
            continue
        matches = sorted(glob.glob(p)) if glob.has_magic(p) else [p]
        if not matches or not all(os.path.exists(m) for m in matches):
            raise FileNotFoundError(f"{p}: no study storage or study file matches")
        for m in matches:
            if os.path.isfile(m) and m.endswith((".yaml", ".yml")):
                from sslray.storage import study_storage
                from sslray.study import load_study

                roots.append(study_storage(load_study(m)).root)
            elif os.path.isdir(m):
                roots.append(Path(m).resolve())
            else:
                raise FileNotFoundError(f"{m}: neither a study storage directory nor a study YAML file")
    return list(dict.fromkeys(roots))
