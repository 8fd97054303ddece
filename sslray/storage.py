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
    <root>/snapshots/results/<id>.parquet  compacted copies of many result rows (a cache; see sslray.results)
    <root>/snapshots/history/<id>.parquet  the same for history rows
    <root>/optuna.db                       a search study's Optuna study (SQLite; ``optuna-dashboard`` opens it)

Every other module asks :class:`StudyStorage` for these paths, so the layout is spelled out here only. The root
is a local path, ``file://``, ``s3://bucket/prefix`` or ``gs://bucket/prefix``: every object of the store is read
and written through a ``pyarrow.fs`` filesystem (:attr:`StudyStorage.fs`, :meth:`StudyStorage.write_object`,
:meth:`StudyStorage.read_bytes`, :meth:`StudyStorage.list_files`), the same one Ray Tune and Ray Train get as
``storage_filesystem``. On an object store a trial trains in a node-local scratch directory
(:meth:`StudyStorage.local_trial_dir`) and uploads its checkpoint, split files and W&B run; nodes share nothing but
the store. Credentials come from the environment only and are never printed (:func:`redact`).

Every local file sslray writes goes through :func:`atomic_write`: a temp file in the same directory (name starting with
``.tmp``, which readers of the store skip), flushed and fsynced, then ``os.replace`` onto the final name, so a
reader never sees half a file and a crash leaves at most a temp file; a failed write removes its temp file and
raises ``OSError`` naming the file (``cannot write checkpoint <path>: File too large``).

    storage = StudyStorage("runs/quickstart")
    storage.check("studies/quickstart.yaml")               # ConfigError if it cannot take the study's files
    rerun = storage.write_trial_config(cfg, plugins=[])    # trials/<id>/config.yaml; the command that reruns it
    atomic_write(storage.plots_dir / "x.png", lambda f: fig.savefig(f, format="png"))

Only the standard library is imported at module level (pyarrow.fs when the filesystem is first used, PyYAML when a
config is written): the trainer, the CLI and ``sslray run --dry-run`` use it without pandas or Ray.
"""
from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Callable, Iterable

from sslray.atomic import TMP_PREFIX, atomic_write, atomic_write_text  # noqa: F401 - re-exported
from sslray.config import ConfigError

if TYPE_CHECKING:
    import pyarrow.fs

    from sslray.config import TrialConfig

CHECKPOINT_DIR, CHECKPOINT_FILE = "checkpoint", "state.pt"  # inside a trial's output directory (the trainer's)
SPLITS_DIR = "splits"  # inside a trial's output directory (written by sslray.data.datasets.build_data)
MIN_FREE_BYTES = 100 << 20  # a full disk, caught before the first checkpoint fails; not a size estimate
RESULTS, HISTORY, SNAPSHOTS = "results", "history", "snapshots"  # prefixes of the store's rows (relative keys)
OBJECT_SCHEMES = ("s3", "gs", "gcs")
SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID", "GOOGLE_APPLICATION_CREDENTIALS")


class StoreIOError(OSError):
    """A read or write of the store that failed (object store unreachable, permission, missing bucket); the message
    names the object and never carries a credential."""


def uri_scheme(root: str) -> str | None:
    """``s3`` of ``s3://bucket/x``; None for a plain path."""
    m = re.match(r"([A-Za-z][A-Za-z0-9+.-]*)://", str(root))
    return m.group(1).lower() if m else None


def display_uri(uri: str) -> str:
    """``uri`` without credentials (``user:secret@``) or query (``?endpoint_override=...``): safe to print."""
    m = re.match(r"([A-Za-z][A-Za-z0-9+.-]*://)(?:[^/@?]*@)?([^?#]*)", str(uri))
    return m.group(1) + m.group(2) if m else str(uri)


def redact(text: str) -> str:
    """``text`` with every credential this process knows replaced by ``***``: the secret environment variables and
    ``user:secret@`` parts of URIs."""
    for name in SECRET_ENV:
        value = os.environ.get(name)
        if value and len(value) >= 4:
            text = text.replace(value, "***")
    return re.sub(r"(://)[^/@\s]*:[^/@\s]*@", r"\1***@", text)


# URI query keys passed to the filesystem; anything else (a secret_key=...) is refused
S3_OPTIONS = {"endpoint_override": str, "region": str, "scheme": str, "connect_timeout": float,
              "request_timeout": float, "force_virtual_addressing": lambda v: v.lower() == "true"}
GCS_OPTIONS = {"endpoint_override": str, "scheme": str, "project_id": str, "default_bucket_location": str,
               "anonymous": lambda v: v.lower() == "true"}


def open_filesystem(uri: str) -> "tuple[pyarrow.fs.FileSystem, str]":
    """(pyarrow filesystem, root as its path) of a storage root: a local path, ``file://``, ``s3://bucket/prefix``
    or ``gs://bucket/prefix``. Options come from the URI's query (``?endpoint_override=host:9000&scheme=http``) or
    the environment (``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``, ``STORAGE_EMULATOR_HOST`` for GCS); credentials
    only from the environment / the SDKs' own configuration, never from the URI."""
    import urllib.parse

    import pyarrow.fs as pafs

    scheme = uri_scheme(uri)
    if scheme not in OBJECT_SCHEMES:
        local = uri[7:] if scheme == "file" else uri
        return pafs.LocalFileSystem(), os.path.abspath(local)
    parts = urllib.parse.urlsplit(uri)
    shown = display_uri(uri)
    if "@" in parts.netloc:
        raise ConfigError(None, "storage", f"{shown}: credentials in the storage URI are refused; set them in the "
                                           "environment (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, or the GCS "
                                           "default credentials)")
    if not parts.netloc:
        raise ConfigError(None, "storage", f"{shown}: no bucket (expected {scheme}://bucket/prefix)")
    allowed = S3_OPTIONS if scheme == "s3" else GCS_OPTIONS
    opts: dict[str, Any] = {}
    for k, v in urllib.parse.parse_qsl(parts.query):
        if k not in allowed:
            raise ConfigError(None, "storage", f"{shown}: unknown option {k!r} in the storage URI (expected one of: "
                                               f"{', '.join(allowed)}; credentials go in the environment)")
        opts[k] = allowed[k](v)
    base = f"{parts.netloc}/{parts.path.strip('/')}".rstrip("/")
    if scheme == "s3":
        endpoint = opts.pop("endpoint_override", None) or os.environ.get("AWS_ENDPOINT_URL_S3") or \
            os.environ.get("AWS_ENDPOINT_URL")
        if endpoint and "://" in endpoint and "scheme" not in opts:
            opts["scheme"], endpoint = endpoint.split("://", 1)
        opts.setdefault("connect_timeout", 5.0)
        opts.setdefault("request_timeout", 30.0)
        # allow_delayed_open: an object smaller than one part goes in one PutObject (no multipart upload)
        fs = pafs.S3FileSystem(endpoint_override=endpoint, allow_delayed_open=True,
                               retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=3), **opts)
    else:
        endpoint = opts.pop("endpoint_override", None) or os.environ.get("STORAGE_EMULATOR_HOST")
        if endpoint and "://" in endpoint and "scheme" not in opts:
            opts["scheme"], endpoint = endpoint.split("://", 1)
        fs = pafs.GcsFileSystem(endpoint_override=endpoint, **opts)
    return fs, base


def checkpoint_dir(out_dir: str | os.PathLike) -> Path:
    """The checkpoint directory of a trial's output directory (``sslray train --out``, or ``trials/<id>``)."""
    return Path(out_dir) / CHECKPOINT_DIR


class StudyStorage:
    """The storage root of one study and every path under it (see the module docstring for the layout)."""

    def __init__(self, root: "str | os.PathLike | StudyStorage"):
        if isinstance(root, StudyStorage):
            root = root.uri
        self.uri = str(root)
        scheme = uri_scheme(self.uri)
        self.remote = scheme in OBJECT_SCHEMES
        if scheme not in (None, "file", *OBJECT_SCHEMES):
            raise ConfigError(None, "storage", f"{display_uri(self.uri)}: unsupported scheme {scheme!r} (expected "
                                               "a path, file://, s3:// or gs://)")
        # local: a Path (every caller may build paths under it); an object store: the URI without credentials or
        # query, for messages and for the rows (the store's objects are read and written through self.fs)
        self.root: Any = display_uri(self.uri) if self.remote else Path(self.uri[7:] if scheme == "file" else root)
        self._fs: "pyarrow.fs.FileSystem | None" = None
        self._base = "" if self.remote else str(self.root)

    def __repr__(self) -> str:
        return f"StudyStorage({str(self.root)!r})"

    def __reduce__(self):  # to a Ray worker: the URI only (the filesystem is rebuilt there from the environment)
        return (StudyStorage, (self.uri,))

    # the filesystem (pyarrow.fs): every read and write of the store's objects -----------------------------

    @property
    def fs(self) -> "pyarrow.fs.FileSystem":
        if self._fs is None:
            self._fs, self._base = open_filesystem(self.uri)
        return self._fs

    @property
    def base(self) -> str:
        """The root as a path of :attr:`fs` (``bucket/prefix`` on an object store)."""
        self.fs
        return self._base

    def key(self, rel: str) -> str:
        """The :attr:`fs` path of ``rel`` (a ``/``-separated key relative to the root)."""
        return f"{self.base.rstrip('/')}/{rel}" if self.base else rel

    def display(self, rel: str) -> str:
        """``rel`` as messages name it: the local path, or the URI without credentials."""
        return str(self.root / rel) if not self.remote else f"{str(self.root).rstrip('/')}/{rel}"

    def list_files(self, rel_dir: str) -> "list[pyarrow.fs.FileInfo]":
        """The entries directly under ``rel_dir`` (none when it does not exist), one listing call."""
        import pyarrow.fs as pafs

        if not self.remote:
            d = self.root / rel_dir
            if not d.is_dir():
                return []
        with self._errors("list", rel_dir):
            return self.fs.get_file_info(pafs.FileSelector(self.key(rel_dir), allow_not_found=True))

    def read_bytes(self, rel: str) -> bytes:
        if not self.remote:
            return (self.root / rel).read_bytes()
        with self._errors("read", rel):
            with self.fs.open_input_stream(self.key(rel)) as f:
                return f.read()

    def exists(self, rel: str) -> bool:
        if not self.remote:
            return (self.root / rel).exists()
        import pyarrow.fs as pafs

        with self._errors("read", rel):
            return self.fs.get_file_info(self.key(rel)).type != pafs.FileType.NotFound

    def write_object(self, rel: str, write: "Callable[[IO[bytes]], Any]", what: str = "") -> str:
        """Write ``rel`` once, complete: locally :func:`atomic_write` (temp + fsync + rename); on an object store
        the bytes are built in memory and sent in one PUT (there is no rename), so a reader sees no object or the
        whole object. Returns the display name."""
        if not self.remote:
            return str(atomic_write(self.root / rel, write, what))
        buf = io.BytesIO()
        write(buf)
        with self._errors("write", rel, what):
            with self.fs.open_output_stream(self.key(rel)) as out:
                out.write(buf.getvalue())
        return self.display(rel)

    def delete(self, rel: str, missing_ok: bool = True) -> None:
        import pyarrow.fs as pafs

        if not self.remote:
            p = self.root / rel
            if p.exists() or not missing_ok:
                p.unlink()
            return
        with self._errors("delete", rel):
            try:
                self.fs.delete_file(self.key(rel))
            except FileNotFoundError:
                if not missing_ok:
                    raise
            except OSError as e:
                if not (missing_ok and self.fs.get_file_info(self.key(rel)).type == pafs.FileType.NotFound):
                    raise e

    def upload_dir(self, local: str | os.PathLike, rel: str) -> None:
        """Copy a local directory tree to ``rel`` (object by object; each written once, complete)."""
        local = Path(local)
        for p in sorted(local.rglob("*")):
            if p.is_file() and not p.name.startswith(TMP_PREFIX):
                data = p.read_bytes()
                self.write_object(f"{rel}/{p.relative_to(local).as_posix()}", lambda f, d=data: f.write(d))

    def download_dir(self, rel: str, local: str | os.PathLike) -> int:
        """Copy every object under ``rel`` into the local directory ``local``; returns how many."""
        import pyarrow.fs as pafs

        with self._errors("list", rel):
            infos = self.fs.get_file_info(pafs.FileSelector(self.key(rel), allow_not_found=True, recursive=True))
        n = 0
        prefix = self.key(rel).rstrip("/") + "/"
        for info in infos:
            if info.type == pafs.FileType.File:
                sub = info.path[len(prefix):]
                atomic_write(Path(local) / sub, lambda f, s=sub: f.write(self.read_bytes(f"{rel}/{s}")))
                n += 1
        return n

    @contextlib.contextmanager
    def _errors(self, verb: str, rel: str, what: str = ""):
        """A failed object-store call as :class:`StoreIOError`: one line naming the object, credentials removed."""
        try:
            yield
        except FileNotFoundError:
            raise
        except (OSError, RuntimeError, ValueError) as e:
            if isinstance(e, StoreIOError):
                raise
            reason = redact(str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__)
            raise StoreIOError(f"cannot {verb} {what + ' ' if what else ''}{self.display(rel)}: {reason}") from None

    # the layout --------------------------------------------------------------------------------------------

    def _path(self, rel: str) -> Any:
        """A local Path under the root, or (object store) the object's URI as a string."""
        return self.root / rel if not self.remote else self.display(rel)

    @property
    def results_dir(self) -> Path:
        return self._path(RESULTS)

    @property
    def history_dir(self) -> Path:
        return self._path(HISTORY)

    @property
    def ray_tune_dir(self) -> Path:
        return self._path("ray_tune")

    @property
    def ray_train_dir(self) -> Path:
        return self._path("ray_train")

    @property
    def wandb_dir(self) -> Path:
        return self._path("wandb")

    @property
    def plots_dir(self) -> Path:
        return self._path("plots")

    @staticmethod
    def result_key(trial_id: str) -> str:
        return f"{RESULTS}/{trial_id}.parquet"

    @staticmethod
    def history_key(trial_id: str) -> str:
        return f"{HISTORY}/{trial_id}.parquet"

    @staticmethod
    def snapshot_dir(kind: str) -> str:
        """``snapshots/results`` or ``snapshots/history``: compacted copies of many rows (see sslray.results)."""
        return f"{SNAPSHOTS}/{kind}"

    @property
    def optuna_db(self) -> Path:
        """A search study's Optuna study (SQLite, through ``optuna.storages.RDBStorage``). A *local* path on
        purpose: SQLite needs a file system with working locks, so a remote (object-store) root keeps this file
        on local disk or NFS: on an object store it lies in this driver's scratch directory (:meth:`local_dir`), so
        such a search resumes from the same driver machine; see :meth:`optuna_url`."""
        return self.local_dir("optuna") / "optuna.db" if self.remote else self.root / "optuna.db"

    def optuna_url(self) -> str:
        """The SQLAlchemy URL of :attr:`optuna_db` (``sqlite:////abs/path/optuna.db``), what
        ``optuna.storages.RDBStorage`` and ``optuna-dashboard`` take."""
        return f"sqlite:///{self.optuna_db.resolve()}"

    def result_file(self, trial_id: str) -> Path:
        return self._path(self.result_key(trial_id))

    def history_file(self, trial_id: str) -> Path:
        return self._path(self.history_key(trial_id))

    @staticmethod
    def trial_key(trial_id: str) -> str:
        return f"trials/{trial_id}"

    def trial_dir(self, trial_id: str) -> Path:
        """``trials/<trial id>``: the trial's output directory (the trainer's ``out_dir``; on an object store the
        trial trains in a local scratch directory and uploads it, see :meth:`local_trial_dir`)."""
        return self._path(self.trial_key(trial_id))

    def trial_config(self, trial_id: str) -> Path:
        return self._path(f"{self.trial_key(trial_id)}/config.yaml")

    def checkpoint_file(self, trial_id: str) -> Path:
        return self._path(f"{self.trial_key(trial_id)}/{CHECKPOINT_DIR}/{CHECKPOINT_FILE}")

    def splits_dir(self, trial_id: str) -> Path:
        return self._path(f"{self.trial_key(trial_id)}/{SPLITS_DIR}")

    def restored_dir(self, trial_id: str, rank: int) -> Path:
        """Where rank ``rank`` of a Ray Train worker group copies the checkpoint Ray hands it after a failure."""
        return self.trial_dir(trial_id) / f"restored-rank{rank}"

    # questions about a trial --------------------------------------------------------------------------------

    def started(self, trial_id: str) -> bool:
        """A checkpoint is on disk: ``--resume`` continues the trial from it."""
        return self.exists(f"{self.trial_key(trial_id)}/{CHECKPOINT_DIR}/{CHECKPOINT_FILE}")

    def split_sha256(self, trial_id: str) -> dict[str, str] | None:
        """sha256 of each split file the trial wrote (None before it wrote any)."""
        d = self.local_trial_dir(trial_id) / SPLITS_DIR
        if not d.is_dir():
            return None
        from sslray.data.splits import file_sha256  # late: the data package imports torch

        return {f: file_sha256(str(d / f)) for f in sorted(os.listdir(d))}

    # writes --------------------------------------------------------------------------------------------------

    def write_trial_config(self, cfg: "TrialConfig", plugins: Iterable[str] = ()) -> str:
        """Store the resolved config at ``trials/<id>/config.yaml``; returns the command that reruns it alone."""
        import yaml

        text = yaml.safe_dump(cfg.to_dict(), sort_keys=False).encode("utf-8")
        self.write_object(f"{self.trial_key(cfg.trial_id())}/config.yaml", lambda f: f.write(text), "trial config")
        path, out = self.trial_config(cfg.trial_id()), self.trial_dir(cfg.trial_id())
        return f"sslray train {path} --out {out} --resume" + "".join(f" --plugin {m}" for m in plugins)

    # a trial on an object store: train in a local directory, upload it ---------------------------------------

    def local_trial_dir(self, trial_id: str) -> Path:
        """Where the trial's files are written while it trains: ``trials/<id>`` itself on a local root; on an
        object store a scratch directory on this node (``$SSLRAY_SCRATCH``, default the system temp dir),
        filled from the store by :meth:`pull_trial` and copied back by :meth:`push_trial`."""
        return self.local_dir(self.trial_key(trial_id))

    def local_dir(self, rel: str) -> Path:
        """``rel`` as a local directory: under the root when it is local; on an object store under this node's
        scratch directory (``$SSLRAY_SCRATCH``, default ``<temp>/sslray-scratch``, one subdirectory per store),
        whose files :meth:`publish_dir` uploads."""
        if not self.remote:
            return self.root / rel
        import hashlib
        import tempfile

        scratch = os.environ.get("SSLRAY_SCRATCH") or os.path.join(tempfile.gettempdir(), "sslray-scratch")
        return Path(scratch) / hashlib.sha256(self.uri.encode()).hexdigest()[:12] / rel

    def publish_dir(self, local: str | os.PathLike, rel: str) -> str:
        """Object store: upload the local directory ``local`` (say, the plots, a W&B offline run) to ``rel``;
        returns where it now is (the display name; the local path for a local root)."""
        if self.remote:
            self.upload_dir(local, rel)
            return self.display(rel)
        return str(local)

    def pull_trial(self, trial_id: str) -> Path:
        """Object store: copy the trial's stored checkpoint into :meth:`local_trial_dir` when this node has none
        (``--resume`` on another node); returns the local directory."""
        local = self.local_trial_dir(trial_id)
        if self.remote and not (local / CHECKPOINT_DIR / CHECKPOINT_FILE).exists():
            self.download_dir(f"{self.trial_key(trial_id)}/{CHECKPOINT_DIR}", local / CHECKPOINT_DIR)
        return local

    def push_trial(self, trial_id: str) -> None:
        """Object store: upload the trial's checkpoint and split files (config.yaml is written directly)."""
        if not self.remote:
            return
        local = self.local_trial_dir(trial_id)
        for sub in (CHECKPOINT_DIR, SPLITS_DIR):
            if (local / sub).is_dir():
                self.upload_dir(local / sub, f"{self.trial_key(trial_id)}/{sub}")

    def check(self, source: str | None) -> None:
        """Refuse a storage that cannot take the study's files, creating nothing (errors name ``storage`` in
        ``source``): an object store that cannot be reached or written (wrong endpoint, no bucket, no permission:
        a probe object is written and removed), a file in the way, no write permission, a read-only
        mount, or less than ``MIN_FREE_BYTES`` free. The probe is written (and removed) in the deepest directory
        that exists, where ``makedirs`` would create the root; this works for root too, which ``os.access`` does
        not (root passes every permission check, but not a read-only mount or a full disk)."""
        storage = str(self.root)
        if self.remote:
            return self._check_remote(source)
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


    def _check_remote(self, source: str | None) -> None:
        probe = f".sslray_write_probe.{os.getpid()}"
        try:
            self.fs
            self.write_object(probe, lambda f: f.write(b"ok"))
            self.delete(probe)
        except ConfigError as e:
            raise ConfigError(source, "storage", e.message) from None
        except OSError as e:
            raise ConfigError(source, "storage", f"{self.root} cannot be written: {redact(str(e))}") from None


def study_storage(study: Any, override: str | None = None) -> StudyStorage:
    """The storage of a loaded study: ``override`` (``--storage``) or the study's ``storage``, made absolute (the
    trials on other nodes and processes must not depend on the working directory). URIs are kept as written."""
    root = override or study.storage
    return StudyStorage(root if "://" in root else os.path.abspath(root))
