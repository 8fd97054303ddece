"""Weights & Biases: one run per trial, one summary run per study; offline unless the user configured W&B.

What lands where (``<storage>`` is the study's storage)::

    <storage>/wandb/offline-run-<time>-<run id>/run-<run id>.wandb    one per trial and one per study summary
    wandb sync <storage>/wandb/offline-run-*                           upload later (after ``wandb login``)

* **Trial runs** are written where the trial trains: in the Ray trial actor (one worker) or on rank 0 of the Ray
  Train workers (several), never on other ranks (Ray's ``setup_wandb`` does not restrict V2 workers to rank 0).
  group = study name, job type = method name, name = trial name, config = the resolved trial config (plus the
  study, trial id, cell, git state), one ``log`` per evaluation at ``step = iteration``, and the final metrics,
  status and failure reason in the summary. The run id is derived from (study, trial id), so a trial retried after
  a crash continues the same W&B run.
* **The study summary run** (job type ``summary``) holds the tables as ``wandb.Table``, taken from
  ``sslray.report.study_report`` exactly as ``sslray table`` prints them (comparison or ablation with significance,
  bootstrap CIs and paper numbers as the report block says, per-class IoU, pseudo-label quality, cost, manifest;
  for a search: best configs, importances, history), and the figures of :mod:`sslray.plots` as images.

Mode: the ``WANDB_MODE`` environment variable (as W&B users expect: the environment wins), else ``tracking: {wandb:
offline | online | disabled}`` in the study file, else ``offline`` (no network, no account); an unknown
``WANDB_MODE`` is refused in one line before anything starts. ``disabled`` never imports wandb.

Trial runs log the training metrics every ``run.log_every`` iterations and the evaluation metrics at every
evaluation (one step per iteration). The summary run has one id per study (``run_id(study, "summary")``): a
re-run of ``sslray run`` writes the same run again (``wandb sync`` updates it) instead of adding one. Its tables
have numeric columns (mean, std, n, delta, p) beside the formatted cell, so they sort and chart in the W&B UI.

Secrets: nothing sslray logs comes from the environment. Config and summary keys that look like credentials
(``api_key``, ``token``, ``secret``, ``password``) are dropped and any value containing the current
``WANDB_API_KEY`` is redacted; W&B's own environment metadata (host, program, arguments), git and code capture,
console capture and system-metrics sampling are switched off.
"""
from __future__ import annotations

import hashlib
import os
import re
import sys
from typing import TYPE_CHECKING, Any, Callable, Mapping

if TYPE_CHECKING:
    import pandas as pd

    from sslray.config import TrialConfig
    from sslray.study import Study

SECRET_KEY = re.compile(r"api[_-]?key|token|secret|passw(or)?d|credential", re.IGNORECASE)
REDACTED = "<redacted>"
_ENV_MODES = {"offline": "offline", "dryrun": "offline", "online": "online", "run": "online",
              "disabled": "disabled"}


def settings_for(study: "Study", storage: str) -> dict[str, Any] | None:
    """The JSON-able tracking settings a study's trials carry (None: tracking off). ``storage`` is the study's root:
    W&B writes its run files under ``<dir>/wandb``, which is ``StudyStorage.wandb_dir``. Raises ConfigError for an
    unknown ``WANDB_MODE``."""
    mode = env_mode() or study.tracking.wandb or "offline"
    if mode == "disabled":
        return None
    return {"mode": mode, "project": study.tracking.project, "entity": study.tracking.entity,
            "dir": _local_dir(storage)}


def _local_dir(storage: str) -> str:
    """Where W&B writes: the storage root, or (object store) this node's scratch copy of it; a trial's offline
    run is uploaded to ``<storage>/wandb/`` when the trial ends (sslray.ray_adapter)."""
    from sslray.storage import StudyStorage

    layout = StudyStorage(storage)
    return str(layout.local_dir("")) if layout.remote else os.path.abspath(storage)


def env_mode() -> str | None:
    """``WANDB_MODE`` (``WANDB_DISABLED=true`` too) as offline / online / disabled; None when unset. An unknown mode
    is a ConfigError naming the variable (W&B itself would fail later, inside every trial)."""
    if os.environ.get("WANDB_DISABLED", "").lower() in ("true", "1", "yes"):
        return "disabled"
    raw = os.environ.get("WANDB_MODE", "").strip()
    if not raw:
        return None
    if raw.lower() not in _ENV_MODES:
        from sslray.config import ConfigError

        raise ConfigError("environment", "WANDB_MODE", f"expected one of {', '.join(_ENV_MODES)}, got {raw!r}")
    return _ENV_MODES[raw.lower()]


def run_id(study: str, trial_id: str) -> str:
    """A stable W&B run id per (study, trial): a retried trial continues its run, and the same trial in two
    studies stays two runs."""
    return hashlib.sha256(f"{study}/{trial_id}".encode()).hexdigest()[:16]


def _wandb_settings():
    import wandb

    return wandb.Settings(silent=True, console="off", save_code=False, disable_git=True, disable_job_creation=True,
                          x_disable_stats=True, x_disable_meta=True, x_save_requirements=False)


def _init(settings: Mapping[str, Any], **kwargs):
    import wandb

    os.makedirs(settings["dir"], exist_ok=True)
    return wandb.init(project=settings["project"], entity=settings.get("entity"), mode=settings["mode"],
                      dir=settings["dir"], reinit="finish_previous", settings=_wandb_settings(), **kwargs)


def scrub(obj: Any, secret: str | None = None) -> Any:
    """``obj`` without credential-like keys, with any string containing ``secret`` (default: the current
    ``WANDB_API_KEY``) redacted; nested dicts and lists are walked."""
    secret = secret if secret is not None else os.environ.get("WANDB_API_KEY") or None
    if isinstance(obj, Mapping):
        return {k: scrub(v, secret) for k, v in obj.items() if not SECRET_KEY.search(str(k))}
    if isinstance(obj, (list, tuple)):
        return [scrub(v, secret) for v in obj]
    if isinstance(obj, str) and secret and secret in obj:
        return REDACTED
    return obj


def _scalars(metrics: Mapping[str, Any]) -> dict[str, float]:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


class TrialRun:
    """The W&B run of one trial, on the process that reports its metrics (rank 0)."""

    def __init__(self, run):
        self.run = run

    @classmethod
    def start(cls, settings: Mapping[str, Any] | None, study: str, cfg: "TrialConfig",
              cell: Mapping[str, Any] | None = None) -> "TrialRun | None":
        """Open the trial's run; None when ``settings`` is None (tracking off) or W&B cannot start (say, online
        without credentials: reported on stderr, the trial trains anyway, its results are stored as always).
        Costs about a second (wandb's service process), once per trial, outside the training loop."""
        if settings is None:
            return None
        from sslray.results import git_state

        sha, dirty = git_state()
        config = {**cfg.to_dict(), "sslray": {"study": study, "trial_id": cfg.trial_id(), "cell": dict(cell or {}),
                                              "git_sha": sha, "git_dirty": dirty}}
        try:
            run = _init(settings, group=study, job_type=cfg.method.name, name=cfg.name,
                        id=run_id(study, cfg.trial_id()), resume="allow", config=scrub(config))
        except Exception as e:  # noqa: BLE001 - wandb raises many types; tracking must not cost the trial
            print(f"sslray: W&B run of trial {cfg.short_id()} not started ({type(e).__name__}: {e}); training "
                  "without it", file=sys.stderr)
            return None
        return cls(run)

    def log(self, metrics: Mapping[str, Any]) -> None:
        """One evaluation's scalar metrics at ``step = metrics["iteration"]``."""
        step = metrics.get("iteration")
        self.run.log(_scalars(metrics), step=int(step) if step is not None else None)

    def reporter(self, inner: Callable[[dict, "str | None"], None]) -> Callable[[dict, "str | None"], None]:
        """A trainer reporter that logs to this run, then calls ``inner`` (Tune / Train reporting)."""
        def report(metrics: dict, checkpoint: str | None) -> None:
            self.log(metrics)
            inner(metrics, checkpoint)
        return report

    def pause(self) -> None:
        """Close the run between turns (a seed of a search configuration in lockstep under ASHA): the next turn
        resumes the same run (same id, ``resume="allow"``)."""
        self.run.finish(exit_code=0)

    def finish(self, status: str, metrics: Mapping[str, Any] | None, reason: str | None) -> None:
        """Final scalar metrics, status and reason into the summary; exit code 1 marks a failed run."""
        summary = {**_scalars(metrics or {}), "status": status}
        if reason:
            summary["reason"] = reason
        self.run.summary.update(scrub(summary))
        self.run.finish(exit_code=0 if status == "ok" else 1)


def log_study(study: "Study", storage: str, settings: Mapping[str, Any] | None) -> str | None:
    """Write the study summary run (tables and figures from the results store); returns its run directory, None
    when tracking is off. A failure here is reported on stderr and does not fail the study: results are stored."""
    if settings is None:
        return None
    try:
        return _log_study(study, storage, settings)
    except Exception as e:  # noqa: BLE001 - tracking is a copy of stored results; never lose a study over it
        print(f"sslray: W&B summary run not written: {type(e).__name__}: {e}", file=sys.stderr)
        return None


def _log_study(study: "Study", storage: str, settings: Mapping[str, Any]) -> str:
    import wandb

    from sslray import plots
    from sslray.report.render import numeric_frame
    from sslray.results import ResultsStore
    from sslray.storage import StudyStorage

    store = ResultsStore(storage)
    df, history = store.load(), store.load_history()
    named = study_tables(study, df, history)
    figures: list[str] = []
    if study.search is None:
        try:
            layout = StudyStorage(storage)
            figures = plots.plot_study(study, df, history, str(layout.local_dir("plots")))
            layout.publish_dir(layout.local_dir("plots"), "plots")
        except ValueError as e:  # e.g. a ratio partition of a dataset whose split files are not written yet
            print(f"sslray: figures left out of the W&B summary run: {e}", file=sys.stderr)
    run = _init(settings, group=study.name, job_type="summary", name=f"{study.name}-summary",
                id=run_id(study.name, "summary"), resume="allow",  # one summary run per study: re-runs update it
                config=scrub({"study": study.name, "study_file": os.path.abspath(study.path)}))
    run.log({f"tables/{name}": wandb.Table(dataframe=numeric_frame(t)) for name, t in named.items()}
            | {f"plots/{os.path.splitext(os.path.basename(p))[0]}": wandb.Image(p) for p in figures})
    counts = df["status"].value_counts().to_dict() if len(df) else {}
    run.summary.update({"trials": int(len(df)), **{f"trials_{k}": int(v) for k, v in counts.items()},
                        "gpu_hours": _total(df, "gpu_hours"), "cpu_hours": _total(df, "cpu_hours")})
    run.finish()
    return run.dir


def study_tables(study: "Study", df: "pd.DataFrame", history: "pd.DataFrame") -> dict[str, Any]:
    """name -> Table or Listing: what the summary run holds, from ``sslray.report.study_report`` (the same route
    as ``sslray table``): every grid section (comparison, per-class, pseudo-labels, cost, manifest) or the search
    listings."""
    from sslray.report import GRID_SECTIONS, study_report

    return study_report(study, df, history, GRID_SECTIONS)


def _total(df: "pd.DataFrame", column: str) -> float:
    return float(df[column].fillna(0).sum()) if column in df.columns and len(df) else 0.0
