"""Where a study's files live: the one module that knows the storage layout, and the one atomic write.

Layout under a study's storage root (``storage:`` in the study file, or ``--storage``)::

    <root>/results/<trial id>.parquet      one row per finished trial (sslray.results.ResultsStore)
    <root>/history/<trial id>.parquet      one row per evaluation of that trial
    <root>/trials/<trial id>/config.yaml   the resolved config: ``sslray train`` reruns the trial from it
    <root>/trials/<trial id>/checkpoint/   the trainer's checkpoint (state.pt): ``--resume`` continues it
    <root>/trials/<trial id>/splits/       the partition's split files (their sha256 goes into the row)
    <root>/ray_tune/  <root>/ray_train/    Ray Tune's experiment state, Ray Train's runs (workers > 1)
    <root>/wandb/                          W&B offline runs (``wandb sync <root>/wandb/offline-run-*``)
    <root>/plots/                          ``sslray plot``'s default output
    <root>/optuna.db                       a search study's Optuna study (SQLite; ``optuna-dashboard`` opens it)

Every other module asks :class:`StudyStorage` for these paths, so the layout is spelled out here only; a later
object-store backend (``s3://`` through ``pyarrow.fs``) replaces this class's path building and
:func:`atomic_write`, nothing else. Today the root must be a directory every node sees (local disk on one machine,
NFS/EFS on a cluster): :meth:`StudyStorage.check` refuses URIs.

Every file sslray writes goes through :func:`atomic_write`: a temp file in the same directory (name starting with
``.tmp``, which readers of the store skip), flushed and fsynced, then ``os.replace`` onto the final name, so a
reader never sees half a file and a crash leaves at most a temp file; a failed write removes its temp file and
raises ``OSError`` naming the file (``cannot write checkpoint <path>: File too large``).

    storage = StudyStorage("runs/quickstart")
    storage.check("studies/quickstart.yaml")               # ConfigError if it cannot take the study's files
    rerun = storage.write_trial_config(cfg, plugins=[])    # trials/<id>/config.yaml; the command that reruns it
    atomic_write(storage.plots_dir / "x.png", lambda f: fig.savefig(f, format="png"))

Only the standard library is imported here (PyYAML when a config is written): the trainer, the CLI and
``sslray run --dry-run`` use it without pandas or Ray.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

from sslray.atomic import TMP_PREFIX, atomic_write, atomic_write_text  # noqa: F401 - re-exported
from sslray.config import ConfigError

if TYPE_CHECKING:
    from sslray.config import TrialConfig

CHECKPOINT_DIR, CHECKPOINT_FILE = "checkpoint", "state.pt"  # inside a trial's output directory (the trainer's)
SPLITS_DIR = "splits"  # inside a trial's output directory (written by sslray.data.datasets.build_data)
MIN_FREE_BYTES = 100 << 20  # a full disk, caught before the first checkpoint fails; not a size estimate


def checkpoint_dir(out_dir: str | os.PathLike) -> Path:
    """The checkpoint directory of a trial's output directory (``sslray train --out``, or ``trials/<id>``)."""
    return Path(out_dir) / CHECKPOINT_DIR


class StudyStorage:
    """The storage root of one study and every path under it (see the module docstring for the layout)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"StudyStorage({str(self.root)!r})"

    # the layout --------------------------------------------------------------------------------------------

    @property
    def results_dir(self) -> Path:
        return self.root / "results"

    @property
    def history_dir(self) -> Path:
        return self.root / "history"

    @property
    def ray_tune_dir(self) -> Path:
        return self.root / "ray_tune"

    @property
    def ray_train_dir(self) -> Path:
        return self.root / "ray_train"

    @property
    def wandb_dir(self) -> Path:
        return self.root / "wandb"

    @property
    def plots_dir(self) -> Path:
        return self.root / "plots"

    @property
    def optuna_db(self) -> Path:
        """A search study's Optuna study (SQLite, through ``optuna.storages.RDBStorage``). A *local* path on
        purpose: SQLite needs a file system with working locks, so a remote (object-store) root keeps this file
        on local disk or NFS; see :meth:`optuna_url`."""
        return self.root / "optuna.db"

    def optuna_url(self) -> str:
        """The SQLAlchemy URL of :attr:`optuna_db` (``sqlite:////abs/path/optuna.db``), what
        ``optuna.storages.RDBStorage`` and ``optuna-dashboard`` take."""
        return f"sqlite:///{self.optuna_db.resolve()}"

    def result_file(self, trial_id: str) -> Path:
        return self.results_dir / f"{trial_id}.parquet"

    def history_file(self, trial_id: str) -> Path:
        return self.history_dir / f"{trial_id}.parquet"

    def trial_dir(self, trial_id: str) -> Path:
        """``trials/<trial id>``: the trial's output directory (the trainer's ``out_dir``)."""
        return self.root / "trials" / trial_id

    def trial_config(self, trial_id: str) -> Path:
        return self.trial_dir(trial_id) / "config.yaml"

    def checkpoint_file(self, trial_id: str) -> Path:
        return checkpoint_dir(self.trial_dir(trial_id)) / CHECKPOINT_FILE

    def splits_dir(self, trial_id: str) -> Path:
        return self.trial_dir(trial_id) / SPLITS_DIR

    def restored_dir(self, trial_id: str, rank: int) -> Path:
        """Where rank ``rank`` of a Ray Train worker group copies the checkpoint Ray hands it after a failure."""
        return self.trial_dir(trial_id) / f"restored-rank{rank}"

    # questions about a trial --------------------------------------------------------------------------------

    def started(self, trial_id: str) -> bool:
        """A checkpoint is on disk: ``--resume`` continues the trial from it."""
        return self.checkpoint_file(trial_id).exists()

    def split_sha256(self, trial_id: str) -> dict[str, str] | None:
        """sha256 of each split file the trial wrote (None before it wrote any)."""
        d = self.splits_dir(trial_id)
        if not d.is_dir():
            return None
        from sslray.data.splits import file_sha256  # late: the data package imports torch

        return {f: file_sha256(str(d / f)) for f in sorted(os.listdir(d))}

    # writes --------------------------------------------------------------------------------------------------

    def write_trial_config(self, cfg: "TrialConfig", plugins: Iterable[str] = ()) -> str:
        """Store the resolved config at ``trials/<id>/config.yaml``; returns the command that reruns it alone."""
        import yaml

        path = self.trial_config(cfg.trial_id())
        atomic_write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        out = self.trial_dir(cfg.trial_id())
        return f"sslray train {path} --out {out} --resume" + "".join(f" --plugin {m}" for m in plugins)

    def check(self, source: str | None) -> None:
        """Refuse a storage that cannot take the study's files, creating nothing (errors name ``storage`` in
        ``source``): an object-store URI (not supported yet), a file in the way, no write permission, a read-only
        mount, or less than ``MIN_FREE_BYTES`` free. The probe is written (and removed) in the deepest directory
        that exists, where ``makedirs`` would create the root; this works for root too, which ``os.access`` does
        not (root passes every permission check, but not a read-only mount or a full disk)."""
        storage = str(self.root)
        if "://" in storage:
            raise ConfigError(source, "storage", f"{storage}: object-store URIs are not supported yet; use a path "
                                                 "that every node sees (local disk on one machine, NFS/EFS on a "
                                                 "cluster)")
        existing = storage
        while not os.path.lexists(existing):
            existing = os.path.dirname(existing)
        if not os.path.isdir(existing):
            raise ConfigError(source, "storage", f"{storage} cannot be created: {existing} is a file, not a directory")
        probe = os.path.join(existing, f".sslray_write_probe.{os.getpid()}")
        try:
            with open(probe, "w") as f:
                f.write("ok")
            os.remove(probe)
        except OSError as e:
            if os.path.exists(probe):
                os.remove(probe)
            raise ConfigError(source, "storage", f"{storage} is not writable ({existing}: {e.strerror})") from None
        free = shutil.disk_usage(existing).free
        if free < MIN_FREE_BYTES:
            raise ConfigError(source, "storage", f"{storage} has {free >> 20} MiB free; a study needs at least "
                                                 f"{MIN_FREE_BYTES >> 20} MiB for its checkpoints and results")


def study_storage(study: Any, override: str | None = None) -> StudyStorage:
    """The storage of a loaded study: ``override`` (``--storage``) or the study's ``storage``, made absolute (the
    trials on other nodes and processes must not depend on the working directory). URIs are kept as written."""
    root = override or study.storage
    return StudyStorage(root if "://" in root else os.path.abspath(root))
