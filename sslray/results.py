"""The results store: one Parquet file per finished trial, the truth for ``--resume``, ``status`` and tables.

Files under a study's storage root (paths from :class:`sslray.storage.StudyStorage`, the one owner of the layout)::

    <root>/results/<trial_id>.parquet   one row: status, the flattened config, final/best metrics, provenance
    <root>/history/<trial_id>.parquet   one row per evaluation (the trainer's ``FitResult.history``)

Files are written with :func:`sslray.storage.atomic_write` (a ``.tmp`` name in the same directory, fsync, rename),
so a reader never sees half a file and a crash leaves at most an ignored temp file. ``pandas.read_parquet(<root>/results)`` works
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
import re
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from sslray.config import TrialConfig, flatten
from sslray.storage import TMP_PREFIX, StudyStorage, atomic_write

if TYPE_CHECKING:
    from sslray.study import PlannedTrial, Study

REQUIRED = ("study", "trial_id", "status")
HISTORY_REQUIRED = ("study", "trial_id")
STATUSES = ("ok", "failed", "stopped")  # stopped: ended early by a scheduler (ASHA)
TRIAL_FILE = re.compile(r"[0-9a-f]{64}\.parquet")
# Metric columns every row has (None when not reported), plus train/loss/<term> for every registered term and
# val/iou/<class> for the dataset's classes: a plain directory read takes its columns from the first file, which may
# be a failed trial or a supervised one, and must still see the columns of the others.
STANDARD_METRICS = ("iteration", "val/miou", "val/pixel_acc", "val/confusion", "best/val/miou", "best/iteration",
                    "train/loss", "train/lr", "train/mask_ratio", "train/pseudo_acc", "time/step_s",
                    "time/images_per_s", "time/wall_s", "mem/peak_mb", "resumed_from", "val/per_image",
                    "val_ema/miou", "val_ema/pixel_acc", "best/val_ema/miou", "best_ema/iteration")  # eval_model: both
# JSON-encoded arrays of the final evaluation: in the row, never in the history files.
ARRAY_METRICS = ("val/confusion", "val/per_image")
VERSIONED_PACKAGES = ("torch", "torchvision", "ray", "optuna", "pandas", "pyarrow", "wandb", "sslray")

# Columns whose Arrow type does not follow from the value (it may be None in one file and set in another).
FIXED_TYPES: dict[str, pa.DataType] = {
    "study": pa.string(), "trial_id": pa.string(), "status": pa.string(), "reason": pa.string(),
    "variant": pa.string(), "cell": pa.string(), "seed": pa.int64(), "iteration": pa.int64(),
    "resumed_from": pa.int64(),
    "best/iteration": pa.int64(), "wall_s": pa.float64(), "device": pa.string(), "gpu_hours": pa.float64(),
    "cpu_hours": pa.float64(), "git_sha": pa.string(), "git_dirty": pa.bool_(), "split_sha256": pa.string(),
    "versions": pa.string(), "created_at": pa.string(), "rerun": pa.string(), "val/confusion": pa.string(),
    "val/per_image": pa.string(),
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
    row.update({k: _scalar(v) for k, v in (metrics or {}).items()})
    row.update({
        "wall_s": float(wall_s), "device": device,
        "gpu_hours": _hours(wall_s, extra.get("gpus")), "cpu_hours": _hours(wall_s, extra.get("cpus")),
        "git_sha": git_sha, "git_dirty": git_dirty,
        "split_sha256": _json_or_none(extra.get("split_sha256")),
        "versions": json.dumps(package_versions(), sort_keys=True),
        "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "rerun": extra.get("rerun"),
    })
    for k, v in extra.items():
        if k not in EXTRA_KEYS:
            if k in row:
                raise ValueError(f"extra key {k!r} would overwrite the row's own column")
            row[k] = _scalar(v)
    return row


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


def _json_or_none(v: Any) -> str | None:
    return None if v is None else v if isinstance(v, str) else json.dumps(v, sort_keys=True)


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


def _config_arrow_type(key: str) -> pa.DataType | None:
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
    return pa.table(arrays)


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


class ResultsStore:
    """Parquet rows of one study under ``root`` (a local directory, or a :class:`StudyStorage`)."""

    def __init__(self, root: "str | os.PathLike | StudyStorage"):
        self.storage = root if isinstance(root, StudyStorage) else StudyStorage(root)
        self.root = self.storage.root
        self.results_dir = self.storage.results_dir
        self.history_dir = self.storage.history_dir

    def path(self, trial_id: str) -> Path:
        return self.storage.result_file(trial_id)

    def write(self, row: Mapping[str, Any], history: list[Mapping[str, Any]] | None = None) -> str:
        """Store one trial's row (and its per-evaluation history); returns the row file's path.

        A trial id may be written again only if its stored status is ``failed`` (re-running a failure); anything
        else raises StoreError. The history goes first: a row file means the trial is complete.
        """
        trial_id = _check_row(row)
        dst = self.path(trial_id)
        # Check-then-replace is not atomic across processes; it need not be: one trial id has one writer at a time.
        if dst.exists():
            status = self._stored_status(dst)
            if status != "failed":
                raise StoreError(f"{dst}: trial {trial_id[:12]} is already stored with status {status!r}; "
                                 "only failed trials may be overwritten")
        hist_dst = self.storage.history_file(trial_id)
        if history:
            # the row's metric columns, so that every history file has them too (see STANDARD_METRICS)
            metric_keys = {k: None for k in row if ("/" in k or k == "iteration") and k not in ARRAY_METRICS}
            rows = [{"study": row["study"], "trial_id": trial_id, **metric_keys,
                     **{k: _scalar(v) for k, v in h.items()}} for h in history]
            _atomic_write(_to_table(rows, str(hist_dst)), hist_dst)
        elif hist_dst.exists():
            hist_dst.unlink()  # the failed attempt's history does not belong to this one
        _atomic_write(_to_table([row], str(dst)), dst)
        return str(dst)

    def has(self, trial_id: str) -> bool:
        return self.path(trial_id).exists()

    def ids(self, status: str | None = None) -> set[str]:
        """Stored trial ids, optionally only those with ``status``."""
        df = self.load()
        if status is not None:
            df = df[df["status"] == status]
        return set(df["trial_id"])

    def load(self) -> pd.DataFrame:
        """Every stored row (sorted by trial id); StoreError names the first bad file. Empty store: no rows."""
        frames = [_read_checked(p, REQUIRED, one_row=True) for p in _trial_files(self.results_dir)]
        return _concat(frames, REQUIRED)

    def load_history(self) -> pd.DataFrame:
        """Every stored per-evaluation row, with ``study`` and ``trial_id`` columns."""
        frames = [_read_checked(p, HISTORY_REQUIRED, one_row=False) for p in _trial_files(self.history_dir)]
        return _concat(frames, HISTORY_REQUIRED)

    def _stored_status(self, path: Path) -> str:
        return str(_read_checked(path, REQUIRED, one_row=True)["status"].iloc[0])


def _check_row(row: Mapping[str, Any]) -> str:
    for key in REQUIRED:
        if not isinstance(row.get(key), str):
            raise ValueError(f"a result row needs a string {key!r}, got {row.get(key)!r}")
    if not TRIAL_FILE.fullmatch(row["trial_id"] + ".parquet"):
        raise ValueError(f"trial_id must be 64 lowercase hex digits (a sha256), got {row['trial_id']!r}")
    if row["status"] not in STATUSES:
        raise ValueError(f"status must be one of {STATUSES}, got {row['status']!r}")
    for k, v in row.items():
        if not (v is None or isinstance(v, (str, bool, int, float))):
            raise ValueError(f"result column {k!r} must hold a scalar (use make_row), got {type(v).__name__}")
    return row["trial_id"]


def _atomic_write(table: pa.Table, dst: Path) -> None:
    atomic_write(dst, lambda f: pq.write_table(table, f))


def plan(study: "Study", storage: "str | os.PathLike | StudyStorage",
         retry_failed: bool = False) -> "tuple[list[PlannedTrial], list[PlannedTrial]]":
    """(to run, skipped) of a grid / ablation study: trials whose id is already stored are skipped (failed ones too,
    unless ``retry_failed``). Reads only the store: ``sslray run --dry-run`` plans without Ray."""
    store = ResultsStore(storage)
    done = store.ids("ok") | (set() if retry_failed else store.ids("failed"))
    planned = study.trials()
    return [p for p in planned if p.trial_id not in done], [p for p in planned if p.trial_id in done]


def _trial_files(directory: Path) -> list[Path]:
    """``<64 hex>.parquet`` files of ``directory``, sorted; anything else (but temp files) is a StoreError, because
    a stray file there is either a bug or a copy mistake, and tables must never silently skip data."""
    if not directory.is_dir():
        return []
    names = sorted(os.listdir(directory))
    foreign = [n for n in names if not n.startswith(TMP_PREFIX) and not TRIAL_FILE.fullmatch(n)]
    if foreign:
        raise StoreError(f"{directory / foreign[0]}: not a results file (expected <trial id>.parquet); "
                         f"foreign entries: {', '.join(foreign)}")
    return [directory / n for n in names if TRIAL_FILE.fullmatch(n)]


def _read_checked(path: Path, required: tuple[str, ...], one_row: bool) -> pd.DataFrame:
    """A store file as a DataFrame, or StoreError naming it: unreadable or truncated Parquet, a required column
    missing, or (``one_row``, result files) anything but exactly one row whose trial_id is the file's name."""
    try:
        table = pq.ParquetFile(path).read()
    except (pa.ArrowException, OSError) as e:
        raise StoreError(f"{path}: not a readable Parquet file ({e})") from None
    missing = [c for c in required if c not in table.column_names]
    if missing:
        raise StoreError(f"{path}: missing required column(s) {', '.join(missing)}")
    df = table.to_pandas()
    trial_id = path.name[: -len(".parquet")]
    if one_row and (len(df) != 1 or df["trial_id"].iloc[0] != trial_id):
        raise StoreError(f"{path}: expected one row for trial {trial_id[:12]}, found {len(df)} row(s) with "
                         f"trial_id {sorted(set(map(str, df['trial_id'])))}")
    return df


def _concat(frames: list[pd.DataFrame], required: tuple[str, ...]) -> pd.DataFrame:
    if not frames:
        return pd.DataFrame({c: pd.Series(dtype=object) for c in required})
    return pd.concat(frames, ignore_index=True, sort=False)
