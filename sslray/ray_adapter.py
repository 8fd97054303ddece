"""Everything sslray does with Ray, in one module (Ray's API moves; nothing else imports it).

    sslray run studies/quickstart.yaml                        # a local Ray instance on this machine
    sslray run studies/x.yaml --address auto --storage /nfs/sslray   # an existing cluster (ray up cluster.yaml)

Shape of a run (Ray 2.60, Train V2; the measured traps are in ../shared/ray.md):

* One Tune trial per planned trial; the Tune trial function (:func:`trial_driver`) is the trial's driver. Its
  one argument is a frozen :class:`TrialSpec` built by ``sslray run``: the resolved config for a grid or
  ablation trial, the study's base dict for a search (``OptunaSearch`` adds the sampled dotted ``params``), plus
  storage, resources, plugins and tracking. ``TrialSpec.resolve`` builds the TrialConfig on the node without
  reading the study file (it need not exist there).
* ``resources.workers == 1``: the trial trains inside the Tune trial actor itself (plain Tune, actors reused
  between trials). Ray Train would add a controller, a worker group, a placement group and a 2 s-paced
  teardown for nothing: a single worker has no one to all-reduce with. Retries are Tune's
  ``FailureConfig``; the trainer resumes from its own checkpoint in the trial directory.
* ``resources.workers > 1``: the driver builds a ``ray.train.torch.TorchTrainer`` (gloo on CPU, nccl on GPU)
  whose workers run the shared trainer under DDP; rank 0 reports metrics with a checkpoint through
  ``TuneReportCallback``. The driver holds only a ``train_driver`` custom resource, so drivers never starve
  their own workers (the Tune + Train deadlock), and ``max_concurrent_trials`` is derived from what the
  workers need.
* A search runs :func:`search_driver` (one Tune trial per sampled configuration, every seed of the study, the
  mean over seeds told to Optuna); with ASHA and several seeds the seeds take turns per evaluation
  (:func:`_lockstep`) and each evaluation's mean is reported to Tune, so ASHA compares means. A search with one
  seed and ASHA runs :func:`trial_driver` (ASHA sees that seed's curve).
* Training returns ``FitResult(metrics, history)``; the trial wraps it in an ``_Outcome`` (status, reason, the
  nodes it ran on) and writes its own Parquet row (``ResultsStore``) before it returns, so a crash of the
  ``sslray run`` process loses nothing finished; ``--resume`` (or a plain re-run) skips stored trial ids and
  continues unfinished ones from their checkpoints. Every path (``trials/<id>``, ``ray_tune``, ``ray_train``)
  comes from :class:`sslray.storage.StudyStorage`; planning (``sslray.results.plan``) and the storage checks live
  there too, so ``sslray run --dry-run`` and ``sslray status`` never import this module.
"""
from __future__ import annotations

import dataclasses
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

# Set before Ray starts: the controller polls workers at this interval, which paces every report and the
# teardown (2 s default measured as 6.5 s of teardown per trial; ray.md §1.3).
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "120")
os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
os.environ.setdefault("RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "1")
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # with verbose=0: no Tune banner or status tables; we print our own
# Tune copies AWS_* credentials from the driver into every trial's runtime env, and at INFO Ray's runtime-env agent
# writes that env, secrets included, to <ray temp>/session_*/logs/runtime_env_agent.log (measured with Ray 2.60).
os.environ.setdefault("RAY_LOGGER_LEVEL", "warning")

import logging  # noqa: E402

# Ray 2.60 logs "Token authentication is enabled for this Ray cluster ..." at every local start: a notice for
# cluster operators, not for someone running a study (sslray run --verbose shows it; real Ray errors still do).
_RAY_NOTICES = ("ray._private.authentication.authentication_token_setup",)
for _name in _RAY_NOTICES:
    logging.getLogger(_name).setLevel(logging.ERROR)

import ray  # noqa: E402
import ray.train  # noqa: E402
import ray.tune  # noqa: E402

from sslray import tracking  # noqa: E402
from sslray.config import TrialConfig, load_plugins  # noqa: E402
from sslray.preflight import (DRIVER_RESOURCE, ClusterTooSmall, check_fits,  # noqa: E402,F401 - re-exported
                              local_resources, max_concurrent)
from sslray.results import ResultsStore, make_row, plan  # noqa: E402
from sslray.storage import StudyStorage, study_storage  # noqa: E402
from sslray.study import Distribution, PlannedTrial, Resources, Study, trial_from_params  # noqa: E402

@dataclass
class RunSummary:
    planned: int
    skipped: int
    ran: int
    ok: int
    failed: int
    wall_s: float
    unfinished: int = 0  # planned this run but neither ok nor failed: the run was interrupted (Ctrl-C, SIGUSR1)


@dataclass(frozen=True, repr=False)
class TrialSpec:
    """Everything a Tune trial needs, built once by the ``sslray run`` process and passed as ``config["sslray"]``:
    no trial, on any node, reads the study file.

    A grid / ablation trial carries its resolved ``config`` (a dict), the ``trial_id`` the driver planned and its
    table ``cell``; a search trial carries the study's ``base`` dict (``--set`` applied) and gets its dotted
    ``params`` from the searcher (``config["params"]``). :meth:`resolve` turns either into a TrialConfig. The dicts
    are never mutated. ``source`` (the study file) only names the study in error messages."""

    study: str
    storage: str
    resources: Resources = Resources()
    max_failures: int = 2
    plugins: tuple[str, ...] = ()
    tracking: dict | None = None
    seed: int = 0
    source: str | None = None
    config: dict | None = None
    trial_id: str | None = None
    cell: dict = dataclasses.field(default_factory=dict)
    base: dict | None = None
    seeds: tuple[int, ...] = ()  # a search: every sampled configuration runs each of these (search_driver)
    lockstep: bool = False  # a search with a scheduler and several seeds: the seeds take turns per evaluation

    def __repr__(self) -> str:  # Tune names trial directories and log lines after it: keep it short
        what = self.trial_id[:12] if self.trial_id else "search"
        return f"TrialSpec({self.study} {what})"

    def resolve(self, params: Mapping[str, Any] | None = None) -> tuple[TrialConfig, dict]:
        """(config, table cell) of this trial; a search sample's from ``params``. A grid config that resolves to
        another id than the driver planned (other sslray code or plugins on this node) is a RuntimeError: its row
        would land where the driver never looks."""
        if self.config is None:
            cfg = trial_from_params(self.base or {}, params or {}, self.seed, self.study, self.source)
            return cfg, {**(params or {}), "seed": self.seed}
        cfg = TrialConfig.from_dict(self.config, source=f"study {self.study}")
        if cfg.trial_id() != self.trial_id:
            raise RuntimeError(f"trial {str(self.trial_id)[:12]} resolves to {cfg.short_id()} on this node: its "
                               "sslray code or plugins differ from the driver's")
        return cfg, dict(self.cell)


@dataclass
class _Outcome:
    """How a trial's training ended: status, final metrics and history (from ``FitResult``), the failure reason,
    and where it ran (``nodes``, ``worker_nodes``: columns of its row)."""

    status: str
    metrics: dict | None = None
    history: list | None = None
    reason: str | None = None
    placement: dict = dataclasses.field(default_factory=dict)


# --------------------------------------------------------------------------------------------------
# inside the trial


def _device_label(gpus: float) -> str:
    import torch

    return torch.cuda.get_device_name(0) if gpus > 0 and torch.cuda.is_available() else "cpu"


def _finish(spec: TrialSpec, cfg: TrialConfig, cell: dict, outcome: _Outcome, t0: float, rerun: str = "") -> dict:
    """Write the trial's result row (and its history) to the store; returns the row."""
    storage = StudyStorage(spec.storage)
    res = spec.resources
    extra = {"gpus": res.workers * res.gpus_per_worker, "cpus": res.workers * res.cpus_per_worker,
             "rerun": rerun, "world_size": res.workers, "started_at": t0, **outcome.placement}
    split_sha = storage.split_sha256(cfg.trial_id())
    if split_sha is not None:
        extra["split_sha256"] = split_sha
    row = make_row(spec.study, cell, cfg, outcome.status, outcome.metrics, outcome.reason, time.time() - t0,
                   _device_label(res.gpus_per_worker), extra)
    ResultsStore(storage).write(row, outcome.history)
    return row


def _fit_with(spec: TrialSpec, cfg: TrialConfig, cell: dict, runtime, reporter, resume_from) -> _Outcome:
    from sslray.methods import NonFiniteLossError
    from sslray.throughput import DoesNotFit
    from sslray.tracking import TrialRun
    from sslray.trainer import fit

    storage = StudyStorage(spec.storage)
    out_dir = str(storage.pull_trial(cfg.trial_id()))  # an object store: a local copy, uploaded below
    # W&B on the reporting process only: the trial actor, or rank 0 of the Train workers (ray.md section 4)
    run = TrialRun.start(spec.tracking, spec.study, cfg, cell) if runtime.is_main else None
    run_dir = _wandb_run_dir(run)
    if storage.remote and runtime.is_main:  # each checkpoint to the store as it is written: any node can resume
        reporter = _uploading(reporter, storage, cfg.trial_id())
    outcome = _Outcome("failed", reason="the trial process stopped before it returned")
    try:
        result = fit(cfg, runtime, run.reporter(reporter) if run else reporter, resume_from=resume_from,
                     out_dir=out_dir, on_log=run.log if run else None)
        outcome = _Outcome("ok", result.metrics, result.history)
    except _Pause:  # a seed in lockstep reached its evaluation (checkpoint written): the next round resumes it
        outcome = _Outcome("paused")
    except (NonFiniteLossError, DoesNotFit) as e:  # deterministic: retrying would fail the same way
        outcome = _Outcome("failed", reason=str(e))
    except (FileNotFoundError, ValueError) as e:  # bad data or config found at trial start
        outcome = _Outcome("failed", reason=f"{type(e).__name__}: {e}")
    finally:
        if run is not None and outcome.status == "paused":
            run.pause()
        elif run is not None:
            run.finish(outcome.status, outcome.metrics, outcome.reason)
        if runtime.is_main and storage.remote:  # the checkpoint, the split files and the offline W&B run
            storage.push_trial(cfg.trial_id())
            if run_dir is not None:
                storage.publish_dir(run_dir, f"wandb/{run_dir.name}")
    return outcome


def _uploading(reporter, storage: StudyStorage, trial_id: str):
    def report(metrics: dict, checkpoint: str | None) -> None:
        if checkpoint:
            storage.upload_dir(checkpoint, f"{storage.trial_key(trial_id)}/checkpoint")
        reporter(metrics, checkpoint)
    return report


def _wandb_run_dir(run) -> "Path | None":
    """The W&B run's own directory (``.../wandb/offline-run-<time>-<id>``), None without a run."""
    files = getattr(getattr(run, "run", None), "dir", None)
    return Path(files).parent if files else None


def _scalars(metrics: Mapping[str, Any] | None) -> dict[str, float]:
    return {k: v for k, v in (metrics or {}).items() if isinstance(v, (int, float))}


def trial_driver(config: dict) -> dict:
    """The Tune trial function: resolves its :class:`TrialSpec`, trains (here or on a Train worker group), stores
    the row, returns the final scalars for Tune."""
    spec: TrialSpec = config["sslray"]
    load_plugins(list(spec.plugins))
    cfg, cell = spec.resolve(config.get("params"))  # params: a search sample's dotted values from OptunaSearch
    rerun = StudyStorage(spec.storage).write_trial_config(cfg, spec.plugins)
    t0 = time.time()
    fit_on = _fit_in_actor if spec.resources.workers == 1 else _fit_on_workers
    outcome = fit_on(spec, cfg, cell)
    _finish(spec, cfg, cell, outcome, t0, rerun)
    return {**_scalars(outcome.metrics), "sslray_status": outcome.status, "sslray_trial_id": cfg.trial_id()}


def search_driver(config: dict) -> dict:
    """The Tune trial function of a search with several seeds, or without a scheduler: one Tune trial per sampled
    configuration, which trains it once per seed of the study, each as its own sslray trial (own id, row,
    checkpoint, W&B run). Without a scheduler the seeds run one after the other; a seed whose ``ok`` row is
    already stored is taken from the store (a configuration re-run after a killed driver trains only what is
    missing). With a scheduler (``spec.lockstep``) the seeds take turns per evaluation (:func:`_lockstep`), so
    ASHA compares means. Returns the mean over seeds of every scalar metric (what OptunaSearch tells the Optuna
    study: one value per configuration), ``<metric>/std`` and ``seeds``."""
    spec: TrialSpec = config["sslray"]
    load_plugins(list(spec.plugins))
    store = ResultsStore(StudyStorage(spec.storage))
    if spec.lockstep:
        rows = _lockstep(spec, config.get("params"), store)
    else:
        rows = [_seed_row(dataclasses.replace(spec, seed=seed), config.get("params"), store)
                for seed in spec.seeds or (spec.seed,)]
    statuses = [row.get("status") for row in rows]
    finals = [_scalars({k: v for k, v in row.items() if k.startswith(_METRIC_PREFIXES) or k == "iteration"})
              for row in rows if row.get("status") == "ok"]
    return {**seed_means(finals if len(finals) == len(rows) else []),
            "sslray_status": "ok" if set(statuses) == {"ok"} else "failed",
            "sslray_trial_id": rows[0]["trial_id"], "sslray_trial_ids": ",".join(r["trial_id"] for r in rows)}


def _seed_row(seeded: TrialSpec, params: Mapping[str, Any] | None, store: ResultsStore) -> dict:
    """One seed of a configuration trained to the end (or its stored ``ok`` row); returns its row."""
    cfg, cell = seeded.resolve(params)
    row = _stored_row(store, cfg.trial_id())
    if row is None or row.get("status") != "ok":
        rerun = StudyStorage(seeded.storage).write_trial_config(cfg, seeded.plugins)
        t0 = time.time()
        outcome = (_fit_in_actor if seeded.resources.workers == 1 else _fit_on_workers)(seeded, cfg, cell)
        row = _finish(seeded, cfg, cell, outcome, t0, rerun)
    return row


class _Pause(Exception):
    """Raised by the reporter of a seed in lockstep once it has reported the evaluation it was asked to reach (its
    checkpoint is already written)."""


def eval_points(iterations: int, eval_every: int) -> list[int]:
    """The iterations at which the trainer evaluates (every ``eval_every`` and always the last)."""
    points = list(range(eval_every, iterations + 1, eval_every))
    return points if points and points[-1] == iterations else points + [iterations]


class _SeedTurns:
    """One seed of a configuration in lockstep: ``at[iteration]`` holds its metrics at each evaluation reached so
    far (from its checkpoint's history when it resumes), ``row`` its stored row once it has one."""

    def __init__(self, spec: TrialSpec, params: Mapping[str, Any] | None, store: ResultsStore):
        from sslray.storage import CHECKPOINT_FILE, checkpoint_dir
        from sslray.trainer import load_checkpoint

        self.spec, self.store = spec, store
        self.cfg, self.cell = spec.resolve(params)
        self.at: dict[int, dict] = {}
        row = _stored_row(store, self.cfg.trial_id())
        self.row = row if row is not None and row.get("status") == "ok" else None
        ckpt = checkpoint_dir(StudyStorage(spec.storage).pull_trial(self.cfg.trial_id()))
        if os.path.exists(os.path.join(ckpt, CHECKPOINT_FILE)):  # resumed, or done: its evaluations so far
            import torch

            for h in load_checkpoint(str(ckpt), torch.device("cpu"))["history"]:
                self.at[int(h["iteration"])] = _scalars(h)
        self.rerun = ""
        if self.row is None:
            self.rerun = StudyStorage(spec.storage).write_trial_config(self.cfg, spec.plugins)

    def reach(self, k: int) -> None:
        """Train until the evaluation at iteration ``k`` (or the end: then its row is stored)."""
        from sslray.trainer import Runtime

        if k in self.at or self.row is not None:
            return
        total = self.cfg.train.iterations

        def reporter(metrics: dict, checkpoint: str | None) -> None:
            self.at[int(metrics["iteration"])] = _scalars(metrics)
            if int(metrics["iteration"]) >= k and int(metrics["iteration"]) < total:
                raise _Pause

        t0 = time.time()
        outcome = _fit_with(self.spec, self.cfg, self.cell, Runtime.detect(self.cfg.run.device), reporter, "auto")
        if outcome.status != "paused":
            if outcome.metrics is not None:
                outcome.placement = {"nodes": [ray.get_runtime_context().get_node_id()]}
            self.row = _finish(self.spec, self.cfg, self.cell, outcome, t0, self.rerun)

    @property
    def failed(self) -> bool:
        return self.row is not None and self.row.get("status") != "ok"


def _lockstep(spec: TrialSpec, params: Mapping[str, Any] | None, store: ResultsStore) -> list[dict]:
    """The seeds of one configuration under a scheduler, in turns: for each evaluation point k, seed 0 trains to
    k, then seed 1, ... (each resuming from its own checkpoint); then the mean over seeds at k goes to Tune
    (``ray.tune.report``), so ASHA compares and stops configurations by their means. Each report also carries
    every seed's metrics at k (``sslray_seed_metrics``, JSON): a configuration ASHA stops gets one ``stopped``
    row per unfinished seed from it (:func:`_store_unreturned`). A failed seed ends the configuration: the
    others are stored as stopped. Returns the seeds' rows."""
    import json

    turns = [_SeedTurns(dataclasses.replace(spec, seed=s), params, store) for s in spec.seeds]
    points = eval_points(turns[0].cfg.train.iterations, turns[0].cfg.train.eval_every)
    for k in points:
        for t in turns:
            t.reach(k)
            if t.failed:
                why = f"stopped: seed {t.spec.seed} of this configuration failed"
                return [u.row if u.row is not None else _store_stopped(u, why) for u in turns]
        if k != points[-1]:  # the last evaluation's mean is the trial's return value
            at_k = {str(t.spec.seed): t.at.get(k, {}) for t in turns}  # {}: a finished seed that lost its checkpoint
            ray.tune.report({**seed_means(list(at_k.values())), "sslray_seed_metrics": json.dumps(at_k)})
    return [t.row for t in turns]


def _store_stopped(t: _SeedTurns, reason: str) -> dict:
    last = t.at[max(t.at)] if t.at else {}
    kept = {k: v for k, v in last.items() if k.startswith(_METRIC_PREFIXES) or k == "iteration"}
    return _finish(t.spec, t.cfg, t.cell, _Outcome("stopped", kept, reason=reason), time.time(), t.rerun)


def _stored_row(store: ResultsStore, trial_id: str) -> dict | None:
    if not store.has(trial_id):
        return None
    import pandas as pd

    return pd.read_parquet(store.path(trial_id)).iloc[0].to_dict()


def seed_means(finals: list[dict[str, float]]) -> dict[str, float]:
    """Mean over seeds of each metric every seed has, plus ``<metric>/std`` (sample std; 0 for one seed) and
    ``seeds`` (their number)."""
    import statistics

    keys = set.intersection(*(set(f) for f in finals)) if finals else set()
    out: dict[str, float] = {"seeds": len(finals)}
    for k in sorted(keys):
        values = [float(f[k]) for f in finals if not math.isnan(float(f[k]))]
        if len(values) == len(finals):
            out[k] = statistics.fmean(values)
            out[f"{k}/std"] = statistics.stdev(values) if len(values) > 1 else 0.0
    return out


def _fit_in_actor(spec: TrialSpec, cfg: TrialConfig, cell: dict) -> _Outcome:
    from sslray.trainer import Runtime

    def reporter(metrics: dict, checkpoint: str | None) -> None:
        ray.tune.report(_scalars(metrics))

    if 0 < spec.resources.gpus_per_worker < 1:  # a packed trial: its allocator capped at its share, checked
        cfg = cfg.replace(**{"run.gpu_memory_fraction": spec.resources.gpus_per_worker})
    outcome = _fit_with(spec, cfg, cell, Runtime.detect(cfg.run.device), reporter, "auto")
    if outcome.metrics is not None:  # where it ran (after a lost node: where the retry ran), as Train workers say
        outcome.placement = {"nodes": [ray.get_runtime_context().get_node_id()]}
    return outcome


def _fit_on_workers(spec: TrialSpec, cfg: TrialConfig, cell: dict) -> _Outcome:
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    res = spec.resources
    use_gpu = res.gpus_per_worker > 0
    per_worker = {"CPU": res.cpus_per_worker, **({"GPU": res.gpus_per_worker} if use_gpu else {})}
    trainer = TorchTrainer(
        train_fn_per_worker,
        train_loop_config={"spec": spec, "config": cfg.to_dict(), "cell": cell},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=res.workers, use_gpu=use_gpu,
                                               resources_per_worker=per_worker,
                                               placement_strategy=res.placement.upper()),
        run_config=ray.train.RunConfig(
            name=f"{spec.study}-{cfg.short_id()}",  # stable: a re-run finds and resumes this run
            **_ray_storage(StudyStorage(spec.storage), "ray_train"),
            callbacks=[TuneReportCallback()],
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1),
            failure_config=ray.train.FailureConfig(max_failures=spec.max_failures, controller_failure_limit=3),
            logging_config=ray.train.LoggingConfig(log_level="WARNING")))
    result = trainer.fit()
    if result.return_value is not None:
        return result.return_value
    if result.error is not None:
        return _Outcome("failed", reason=f"{type(result.error).__name__}: {result.error}")
    return _Outcome("failed")


def train_fn_per_worker(loop_config: dict) -> _Outcome | None:
    """Runs on each Ray Train worker: the shared trainer under DDP (process group set up by Ray Train); rank 0
    returns the :class:`_Outcome`."""
    import torch.distributed as dist

    from sslray.trainer import Runtime

    spec: TrialSpec = loop_config["spec"]
    load_plugins(list(spec.plugins))
    cfg = TrialConfig.from_dict(loop_config["config"])
    rank = ray.train.get_context().get_world_rank()
    runtime = Runtime.detect(cfg.run.device)
    nodes: list[Any] = [None] * runtime.world_size
    dist.all_gather_object(nodes, ray.get_runtime_context().get_node_id())

    def reporter(metrics: dict, checkpoint: str | None) -> None:
        ck = ray.train.Checkpoint.from_directory(checkpoint) if checkpoint else None
        ray.train.report(_scalars(metrics), checkpoint=ck)  # every rank: report is a barrier

    resume_from = "auto"
    ck = ray.train.get_checkpoint()  # after a worker failure: the last reported checkpoint
    if ck is not None:
        with ck.as_directory() as d:  # a copy per rank: no rank reads another's half-copied files
            storage = StudyStorage(spec.storage)
            local = str(storage.local_trial_dir(cfg.trial_id()) / f"restored-rank{rank}")
            shutil.copytree(d, local, dirs_exist_ok=True)
            resume_from = local
    outcome = _fit_with(spec, cfg, loop_config["cell"], runtime, reporter, resume_from)
    if rank != 0:
        return None
    if outcome.metrics is not None:
        outcome.placement = {"nodes": sorted(set(nodes)), "worker_nodes": nodes}
    return outcome


# --------------------------------------------------------------------------------------------------
# the study driver (the ``sslray run`` process)


def _init_ray(address: str | None, num_cpus: int | None, dashboard: bool) -> None:
    """Connect to a cluster, or start a local instance whose head carries the driver resource.

    The dashboard hosts the State API that Train V2's placement-group cleaner polls; without it a trial stopped
    by Tune (ASHA) leaks its workers' placement group and later trials wait forever (ray#54305). It costs a few
    seconds at start, so it is started when trials have Train worker groups or a scheduler may stop them.
    """
    if ray.is_initialized():
        return
    if address:
        ray.init(address=address, log_to_driver=True, logging_level="WARNING")
        return
    # Local workers import sslray from wherever this process did (also from a checkout that is not installed).
    runtime_env = {"env_vars": {"PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}}
    # log_to_driver=False: progress comes from Tune callbacks and failures from the result rows; forwarding
    # worker output only adds Ray's SystemExit tracebacks when Tune ends reused trial actors (ray.md §1.4).
    ray.init(num_cpus=num_cpus or os.cpu_count() or 1, resources={DRIVER_RESOURCE: 1000},
             include_dashboard=dashboard, runtime_env=runtime_env, log_to_driver=False, logging_level="WARNING")


def cluster_resources(address: str) -> dict[str, float]:
    """What the cluster at ``address`` offers (``sslray run --dry-run --address``): connect, read, disconnect."""
    connected = ray.is_initialized()
    _init_ray(address, None, dashboard=False)
    try:
        return dict(ray.cluster_resources())
    finally:
        if not connected:
            ray.shutdown()


def trial_resources(study: Study) -> dict[str, float]:
    """What one Tune trial holds: the whole worker for one worker, else only the driver token."""
    r = study.resources
    if r.workers == 1:
        return {"cpu": r.cpus_per_worker, "gpu": r.gpus_per_worker}
    return {"cpu": 0, DRIVER_RESOURCE: 1}


class _Progress(ray.tune.Callback):
    """One line per finished trial: what ran, what it scored, how long it took."""

    def __init__(self, total: int, labels: dict[str, str], metric: str):
        self.total, self.labels, self.metric, self.done = total, labels, metric, 0
        self.t0 = time.time()

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if "sslray_status" in result or self.metric not in result:
            return  # the final return value, printed by on_trial_complete
        label = self.labels.get(getattr(trial.config.get("sslray"), "trial_id", None) or "", trial.trial_id)
        it = result.get("iteration", "?")
        print(f"      {label}: iteration {it}  loss {result.get('train/loss', float('nan')):.3f}  "
              f"{self.metric} {result[self.metric]:.2f}", flush=True)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.done += 1
        r = trial.last_result or {}
        label = self.labels.get(r.get("sslray_trial_id", ""), trial.trial_id)
        score = r.get(self.metric)
        status = r.get("sslray_status", "?")
        s = f"{score:.2f}" if isinstance(score, (int, float)) else "-"
        print(f"[{self.done}/{self.total}] {label}: {status} {self.metric} {s} "
              f"({time.time() - self.t0:.0f}s elapsed)", flush=True)

    def on_trial_error(self, iteration, trials, trial, **info):
        self.done += 1
        print(f"[{self.done}/{self.total}] {trial.trial_id}: error (see {trial.local_path})", flush=True)


class _LiveProgress(_Progress):
    """The whole study on a terminal: a tqdm bar over trials (done / running / queued / failed in its postfix)
    and one status line per running trial (its iteration of the total and latest metric), with an ETA from the
    measured step times (``time/step_s`` of the running trials, else tqdm's rate over finished trials). Not a
    terminal (CI logs, nohup): :class:`_Progress`'s one line per event."""

    def __init__(self, total: int, labels: dict[str, str], metric: str, iterations: dict[str, int],
                 concurrent: int, file=None):
        super().__init__(total, labels, metric)
        from tqdm import tqdm

        self.file = file or sys.stdout
        self.iterations, self.concurrent, self.failed = iterations, max(1, concurrent), 0
        self.running: dict[str, dict] = {}
        # a terminal that reports 0 columns (a bare pty) would get an empty bar from tqdm: fall back to 100
        self.ncols = shutil.get_terminal_size((100, 24)).columns or 100
        self.bar = tqdm(total=total, desc="trials", unit="trial", file=self.file, ncols=self.ncols, position=0)
        self.lines: dict[str, Any] = {}

    def _line(self, tid: str):
        from tqdm import tqdm

        if tid not in self.lines:
            self.lines[tid] = tqdm(total=0, bar_format="{desc}", file=self.file, position=len(self.lines) + 1,
                                   leave=False, ncols=self.ncols)
        return self.lines[tid]

    def _refresh(self) -> None:
        queued = max(0, self.total - self.done - len(self.running))
        self.bar.set_postfix_str(f"done {self.done - self.failed}, running {len(self.running)}, queued {queued}, "
                                 f"failed {self.failed}{self._eta()}")

    def _eta(self) -> str:
        steps = [r["step_s"] for r in self.running.values() if r.get("step_s")]
        if not steps:
            return ""
        per_trial = sum(steps) / len(steps) * (sum(self.iterations.values()) / max(1, len(self.iterations)))
        left_running = sum(max(0, r["total"] - r["it"]) * (r.get("step_s") or 0) for r in self.running.values())
        queued = max(0, self.total - self.done - len(self.running))
        eta = (left_running + queued * per_trial) / self.concurrent
        return f", ETA {time.strftime('%H:%M:%S', time.gmtime(eta))} (step times)"

    def on_trial_start(self, iteration, trials, trial, **info):
        self.running[trial.trial_id] = {"it": 0, "total": self._total_of(trial), "step_s": None}
        self._refresh()

    def _total_of(self, trial) -> int:
        spec = trial.config.get("sslray")
        tid = getattr(spec, "trial_id", None) or ""
        return self.iterations.get(tid) or self.iterations.get("", 0)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if "sslray_status" in result or self.metric not in result:
            return
        r = self.running.setdefault(trial.trial_id, {"it": 0, "total": self._total_of(trial), "step_s": None})
        r.update(it=int(result.get("iteration", r["it"])), step_s=result.get("time/step_s") or r["step_s"])
        label = self.labels.get(getattr(trial.config.get("sslray"), "trial_id", None) or "", trial.trial_id)
        self._line(trial.trial_id).set_description_str(
            f"  {label}: iteration {r['it']}/{r['total']}  {self.metric} {result[self.metric]:.2f}")
        self._refresh()

    def _end(self, trial, failed: bool) -> None:
        self.done += 1
        self.failed += failed
        self.running.pop(trial.trial_id, None)
        line = self.lines.pop(trial.trial_id, None)
        if line is not None:
            line.close()
        self.bar.update(1)
        self._refresh()

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._end(trial, (trial.last_result or {}).get("sslray_status") != "ok")

    def on_trial_error(self, iteration, trials, trial, **info):
        self._end(trial, True)

    def on_experiment_end(self, trials, **info):
        for line in self.lines.values():
            line.close()
        self.bar.close()


def show_ray_notices() -> None:
    """``sslray run --verbose``: let Ray's start-up notices (token auth) through again."""
    for name in _RAY_NOTICES:
        logging.getLogger(name).setLevel(logging.NOTSET)


def progress_callback(total: int, labels: dict[str, str], metric: str, iterations: dict[str, int],
                      concurrent: int, file=None) -> ray.tune.Callback:
    """:class:`_LiveProgress` when ``file`` (default stdout) is a terminal, else :class:`_Progress`."""
    file = file or sys.stdout
    if getattr(file, "isatty", lambda: False)():
        return _LiveProgress(total, labels, metric, iterations, concurrent, file)
    return _Progress(total, labels, metric)


def _label(p: PlannedTrial) -> str:
    parts = [f"{k}={v}" for k, v in p.point.items() if k != "seed"]
    return " ".join(parts + [f"seed={p.seed}"])


def run_study(study: Study, address: str | None = None, storage: str | None = None,
              retry_failed: bool = False, num_cpus: int | None = None, max_failures: int = 2,
              verbose: bool = True, plugins: tuple[str, ...] = ()) -> RunSummary:
    """Run every missing trial of ``study`` on Ray and store one Parquet row per trial.

    What can be checked before anything starts is: the storage (writable, room left) and, for a local instance, what
    one trial needs against this machine; a failure there creates no directory and starts no Ray. ``plugins`` are the
    ``--plugin`` modules the study was loaded with (already imported here); every trial imports them too. ``storage``
    overrides the study's; the study's ``--set`` overrides are already in ``study.base_dict``, which search trials
    carry (no trial reads the study file).
    """
    t0 = time.time()
    layout = study_storage(study, storage)
    layout.check(study.path)
    if not address and not ray.is_initialized():
        check_fits(study, local_resources(num_cpus, study), study.path)
    todo, skipped = plan(study, layout, retry_failed)
    search = study.search is not None
    if not todo and not search:
        if verbose:
            print(f"sslray run: all {len(skipped)} trials of {study.name} are already in {layout.root}")
        return RunSummary(len(skipped), len(skipped), 0, 0, 0, time.time() - t0)
    _init_ray(address, num_cpus, dashboard=study.resources.workers > 1 or bool(search and study.search.scheduler))
    cluster = ray.cluster_resources()
    check_fits(study, cluster, study.path)
    if not layout.remote:
        layout.root.mkdir(parents=True, exist_ok=True)
    storage_db, completed, existing = optuna_storage(study, layout) if search else (None, 0, 0)
    n = study.search.num_samples - completed if search else len(todo)
    if search and n <= 0:
        if verbose:
            print(f"sslray run: all {study.search.num_samples} configurations of {study.name} are in "
                  f"{layout.optuna_db}")
        return RunSummary(completed, completed, 0, 0, 0, time.time() - t0)
    concurrent = max_concurrent(study, cluster, n)
    spec = TrialSpec(study=study.name, storage=layout.uri, resources=study.resources,
                     max_failures=max_failures, plugins=tuple(plugins), source=os.path.abspath(study.path),
                     tracking=tracking.settings_for(study, layout.uri))
    if search:
        param_space, tune_cfg = _search_setup(study, spec, concurrent, storage_db, completed, existing)
    else:
        param_space = {"sslray": ray.tune.grid_search([_grid_spec(spec, p) for p in todo])}
        tune_cfg = ray.tune.TuneConfig(max_concurrent_trials=concurrent, reuse_actors=True)
    if verbose:
        res = study.resources
        what = (f"{n} search samples ({completed} done before, {len(study.seeds)} seed(s) each)" if search
                else f"{len(todo)} trials ({len(skipped)} already stored)")
        print(f"sslray run: {study.name}: {what}, {concurrent} at a time, {res.workers} worker(s) x "
              f"{res.cpus_per_worker:g} CPU / {res.gpus_per_worker:g} GPU each -> {layout.root}", flush=True)
    tuner = ray.tune.Tuner(
        ray.tune.with_resources(_driver_of(study), trial_resources(study)), param_space=param_space,
        tune_config=tune_cfg,
        run_config=ray.tune.RunConfig(
            name=f"{study.name}-tune", **_ray_storage(layout, "ray_tune"), verbose=0,
            failure_config=ray.tune.FailureConfig(max_failures=max_failures),
            callbacks=[_progress_of(study, todo, n, concurrent)] if verbose else []))
    grid = tuner.fit()
    _store_unreturned(grid, layout)
    tracking.log_study(study, layout.uri, spec.tracking)  # no-op when tracking is disabled
    return _summary(grid, layout, todo, skipped, n if search else None, t0)


def _ray_storage(layout: StudyStorage, rel: str) -> dict:
    """Tune's / Train's ``storage_path`` (and ``storage_filesystem`` on an object store): Ray's experiment state
    lands beside sslray's files, through the same pyarrow filesystem."""
    if not layout.remote:
        return {"storage_path": str(layout.root / rel)}
    return {"storage_path": layout.key(rel), "storage_filesystem": layout.fs}


def _progress_of(study: Study, todo: list[PlannedTrial], n: int, concurrent: int) -> ray.tune.Callback:
    iterations = {p.trial_id: p.config.train.iterations for p in todo} or {"": study.base.train.iterations}
    metric = study.search.metric if study.search else study.report.metric
    return progress_callback(n, {p.trial_id: _label(p) for p in todo}, metric, iterations, concurrent)


def _driver_of(study: Study):
    """The Tune trial function: a grid trial or a search trial with a scheduler and one seed (ASHA sees its curve)
    runs :func:`trial_driver`; any other search runs :func:`search_driver` (every seed of each configuration, the
    mean told to Optuna; with a scheduler, the seeds in lockstep and the mean at each evaluation told to ASHA)."""
    if study.search is not None and (study.search.scheduler is None or len(study.seeds) > 1):
        return search_driver
    return trial_driver


def _grid_spec(spec: TrialSpec, p: PlannedTrial) -> TrialSpec:
    return dataclasses.replace(spec, config=p.config.to_dict(), trial_id=p.trial_id, cell={**p.point, "seed": p.seed},
                               seed=p.seed)


def _summary(grid, layout: StudyStorage, todo: list[PlannedTrial], skipped: list[PlannedTrial],
             samples: int | None, t0: float) -> RunSummary:
    """What ran, from the store for a grid (the truth), from Tune's results for a search (``samples`` set).

    ``unfinished`` counts what this run planned and did not end: Tune stops gracefully on SIGINT and returns
    from ``fit`` as if done, leaving trials pending or running. A grid trial is unfinished when it has no row;
    a search sample when Tune neither terminated it (finished, or stopped by a scheduler) nor marked it errored.
    """
    if samples is not None:
        ran = [r for r in grid if r.metrics and r.metrics.get("sslray_trial_id")]
        ok = sum(1 for r in ran if r.metrics.get("sslray_status") == "ok")
        unfinished = max(0, samples - grid.num_terminated - grid.num_errors)
        return RunSummary(samples, 0, len(ran), ok, len(ran) - ok, time.time() - t0, unfinished)
    store = ResultsStore(layout)
    ids, df = {p.trial_id for p in todo}, store.load()
    ok, failed = len(ids & store.ids("ok", df)), len(ids & store.ids("failed", df))
    unfinished = len(ids - store.ids(None, df))
    return RunSummary(len(todo) + len(skipped), len(skipped), len(todo) - unfinished, ok, failed,
                      time.time() - t0, unfinished)


_METRIC_PREFIXES = ("train/", "val/", "val_ema/", "best/", "time/", "mem/")


def _store_unreturned(grid, layout: StudyStorage) -> None:
    """Rows for trials that never returned: a grid trial that crashed past its retries (Tune marks it errored)
    gets a failed row; a search trial that a scheduler stopped early, its last report as ``stopped``."""
    store = ResultsStore(layout)
    for r in grid:
        spec, m = (r.config or {}).get("sslray"), r.metrics or {}
        if not isinstance(spec, TrialSpec):
            continue
        if r.error is not None and spec.config is not None:
            cfg, cell = spec.resolve()
            reason = f"{type(r.error).__name__}: {str(r.error).strip().splitlines()[-1][:300] if str(r.error) else ''}"
            outcome = _Outcome("failed", reason=reason)
        elif r.error is None and "sslray_seed_metrics" in m and "sslray_status" not in m:
            _store_stopped_seeds(spec, r.config.get("params"), m, store)
            continue
        elif r.error is None and "sslray_status" not in m and "params" in r.config:
            cfg, cell = spec.resolve(r.config["params"])
            kept = {k: v for k, v in m.items() if k.startswith(_METRIC_PREFIXES) or k == "iteration"}
            outcome = _Outcome("stopped", kept, reason=f"stopped by the scheduler after {m.get('iteration', '?')} "
                                                       "iterations")
        else:
            continue
        if not store.has(cfg.trial_id()):
            _finish(spec, cfg, cell, outcome, time.time())


def _store_stopped_seeds(spec: TrialSpec, params: Mapping[str, Any] | None, last: dict, store: ResultsStore) -> None:
    """A configuration in lockstep that the scheduler stopped: one ``stopped`` row per seed not yet stored, with
    that seed's metrics at the last evaluation reported (``sslray_seed_metrics``)."""
    import json

    for seed, metrics in json.loads(last["sslray_seed_metrics"]).items():
        seeded = dataclasses.replace(spec, seed=int(seed))
        cfg, cell = seeded.resolve(params)
        if store.has(cfg.trial_id()):
            continue
        kept = {k: v for k, v in metrics.items() if k.startswith(_METRIC_PREFIXES) or k == "iteration"}
        reason = (f"stopped by the scheduler after {metrics.get('iteration', '?')} iterations (the mean over "
                  f"{len(spec.seeds)} seeds)")
        _finish(seeded, cfg, cell, _Outcome("stopped", kept, reason=reason), time.time())


def optuna_storage(study: Study, layout: StudyStorage):
    """(RDBStorage, completed configurations, trials of any state) of the study's Optuna study in ``<storage>/optuna.db``, made ready to
    continue: trials left RUNNING by a killed driver are marked FAIL and their parameters enqueued, so the same
    configurations run again (their seeds resume from checkpoints or come from the store) instead of new ones
    being sampled in their place. Completed trials stay in the study, so the sampler knows them."""
    import optuna
    from optuna.trial import TrialState

    layout.optuna_db.parent.mkdir(parents=True, exist_ok=True)  # a remote store's lies in the driver's scratch
    storage = optuna.storages.RDBStorage(layout.optuna_url())
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        ostudy = optuna.create_study(storage=storage, study_name=study.name, load_if_exists=True,
                                     direction="maximize" if study.search.mode == "max" else "minimize")
    finally:
        optuna.logging.set_verbosity(verbosity)
    waiting = [t.params for t in ostudy.get_trials(deepcopy=False, states=(TrialState.WAITING,))]
    for t in ostudy.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
        if t.params not in waiting:  # not skip_if_exists: that also matches the trial just marked FAIL
            ostudy.enqueue_trial(t.params, user_attrs={"sslray_requeued_from": t.number})
            waiting.append(t.params)
    return storage, len(ostudy.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))), len(ostudy.trials)


def _search_setup(study: Study, spec: TrialSpec, concurrent: int, storage=None, completed: int = 0,
                  existing: int = 0):
    """(param space, TuneConfig) of a search. Continuing a stored Optuna study (``existing`` trials), the sampler's
    seed is ``search.seed + existing``: with the same seed a fresh sampler would draw the first run's values
    again, so resuming would repeat configurations (the grid and brute-force samplers read the study instead)."""
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    s = study.search
    seed = s.seed + existing
    samplers = {"tpe": lambda: optuna.samplers.TPESampler(seed=seed),
                "random": lambda: optuna.samplers.RandomSampler(seed=seed),
                "gp": lambda: optuna.samplers.GPSampler(seed=seed),
                "bruteforce": lambda: optuna.samplers.BruteForceSampler(seed=seed),
                "grid": lambda: optuna.samplers.GridSampler(
                    {f"params/{k}": list(d.choices) for k, d in s.space.items()}, seed=seed)}
    space = {"params": {k: _domain(v) for k, v in s.space.items()}}
    searcher = OptunaSearch(metric=s.metric, mode=s.mode, sampler=samplers[s.sampler](), storage=storage,
                            study_name=study.name if storage is not None else None)
    scheduler = None
    if s.scheduler:
        from ray.tune.schedulers import ASHAScheduler

        sch = {k: v for k, v in s.scheduler.items() if k != "type"}  # validated and filled in by study.py
        # stop_last_trials=False: survivors at max_t exit on their own instead of being killed (ray.md §1.4)
        scheduler = ASHAScheduler(time_attr="training_iteration", metric=s.metric, mode=s.mode,
                                  stop_last_trials=False, **sch)
    # the base dict travels with every trial: no node reads the study file
    param_space = {**space, "sslray": dataclasses.replace(spec, base=study.base_dict, seed=study.seeds[0],
                                                          seeds=tuple(study.seeds),
                                                          lockstep=bool(s.scheduler) and len(study.seeds) > 1)}
    cfg = ray.tune.TuneConfig(search_alg=searcher, scheduler=scheduler, num_samples=s.num_samples - completed,
                              max_concurrent_trials=concurrent, reuse_actors=True)
    return param_space, cfg


def _domain(d: Distribution):
    """The Tune domain of a validated search-space entry (``study.Distribution``)."""
    if d.kind == "uniform":
        return ray.tune.uniform(d.low, d.high)
    if d.kind == "loguniform":
        return ray.tune.loguniform(d.low, d.high)
    if d.kind == "int":
        return ray.tune.qrandint(d.low, d.high, d.step) if d.step is not None else ray.tune.randint(d.low, d.high + 1)
    if d.kind == "choice":
        return ray.tune.choice(list(d.choices))
    raise ValueError(f"unknown distribution {d.kind!r}")


def shutdown() -> None:
    if ray.is_initialized():
        ray.shutdown()


__all__ = ["run_study", "plan", "TrialSpec", "max_concurrent", "trial_resources", "check_fits", "shutdown", "RunSummary",
           "trial_driver", "train_fn_per_worker", "ClusterTooSmall", "search_driver", "seed_means", "optuna_storage",
           "eval_points",
           "progress_callback", "show_ray_notices"]
