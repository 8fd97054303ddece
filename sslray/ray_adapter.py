"""Everything sslray does with Ray, in one module (Ray's API moves; nothing else imports it).

    sslray run studies/quickstart.yaml                        # a local Ray instance on this machine
    sslray run studies/x.yaml --address auto --storage /nfs/sslray   # an existing cluster (ray up cluster.yaml)

Shape of a run (Ray 2.60, Train V2; the measured traps are in ../shared/ray.md):

* One Tune trial per planned trial (grids and ablations arrive fully resolved; searches come from Tune's
  ``OptunaSearch``). The Tune trial function is the trial's driver.
* ``resources.workers == 1``: the trial trains inside the Tune trial actor itself (plain Tune, actors reused
  between trials). Ray Train would add a controller, a worker group, a placement group and a 2 s-paced
  teardown for nothing: a single worker has no one to all-reduce with. Retries are Tune's
  ``FailureConfig``; the trainer resumes from its own checkpoint in the trial directory.
* ``resources.workers > 1``: the driver builds a ``ray.train.torch.TorchTrainer`` (gloo on CPU, nccl on GPU)
  whose workers run the shared trainer under DDP; rank 0 reports metrics with a checkpoint through
  ``TuneReportCallback``. The driver holds only a ``train_driver`` custom resource, so drivers never starve
  their own workers (the Tune + Train deadlock), and ``max_concurrent_trials`` is derived from what the
  workers need.
* Every finished trial writes its own Parquet row (``ResultsStore``) before it returns, so a crash of the
  ``sslray run`` process loses nothing finished; ``--resume`` (or a plain re-run) skips stored trial ids and
  continues unfinished ones from their checkpoints.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from typing import Any

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

import ray  # noqa: E402
import ray.train  # noqa: E402
import ray.tune  # noqa: E402

from sslray import tracking  # noqa: E402
from sslray.config import ConfigError, TrialConfig, load_plugins  # noqa: E402
from sslray.results import ResultsStore, make_row  # noqa: E402
from sslray.study import Distribution, PlannedTrial, Study  # noqa: E402

DRIVER_RESOURCE = "train_driver"


class ClusterTooSmall(ConfigError):
    """The study asks for more than the cluster has: reported before anything starts."""


@dataclass
class RunSummary:
    planned: int
    skipped: int
    ran: int
    ok: int
    failed: int
    wall_s: float


# --------------------------------------------------------------------------------------------------
# inside the trial


def _trial_dir(storage: str, trial_id: str) -> str:
    return os.path.join(storage, "trials", trial_id)


def _device_label(gpus: float) -> str:
    import torch

    return torch.cuda.get_device_name(0) if gpus > 0 and torch.cuda.is_available() else "cpu"


def _finish(spec: dict, cfg: TrialConfig, status: str, metrics: dict | None, reason: str | None, t0: float,
            extra: dict | None = None) -> dict:
    """Write the trial's result row (and its history) to the store; returns the row."""
    store = ResultsStore(spec["storage"])
    metrics = dict(metrics or {})
    history = metrics.pop("history", None)
    res = spec["resources"]
    wall = time.time() - t0
    row_extra = {"gpus": res["workers"] * res["gpus_per_worker"], "cpus": res["workers"] * res["cpus_per_worker"],
                 "rerun": spec["rerun"], "world_size": res["workers"], "started_at": t0, **(extra or {})}
    split = os.path.join(_trial_dir(spec["storage"], cfg.trial_id()), "splits")
    if os.path.isdir(split):
        from sslray.data.splits import file_sha256

        row_extra["split_sha256"] = {f: file_sha256(os.path.join(split, f)) for f in sorted(os.listdir(split))}
    row = make_row(spec["study"], spec["cell"], cfg, status, metrics, reason, wall,
                   _device_label(res["gpus_per_worker"]), row_extra)
    store.write(row, history)
    return row


def _write_trial_config(storage: str, cfg: TrialConfig, plugins: list[str]) -> str:
    """Store the resolved config beside the trial's checkpoints; returns the command that reruns it alone."""
    import yaml

    d = _trial_dir(storage, cfg.trial_id())
    os.makedirs(d, exist_ok=True)
    path = os.path.join(d, "config.yaml")
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)
        os.replace(tmp, path)
    except BaseException:  # a full disk leaves no half-written config behind
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return f"sslray train {path} --out {d} --resume" + "".join(f" --plugin {m}" for m in plugins)


def _fit_with(spec: dict, cfg: TrialConfig, runtime, reporter, resume_from) -> tuple[str, dict | None, str | None]:
    from sslray.methods import NonFiniteLossError
    from sslray.tracking import TrialRun
    from sslray.trainer import fit

    out_dir = _trial_dir(spec["storage"], cfg.trial_id())
    # W&B on the reporting process only: the trial actor, or rank 0 of the Train workers (ray.md section 4)
    run = TrialRun.start(spec.get("tracking"), spec["study"], cfg, spec.get("cell")) if runtime.is_main else None
    outcome: tuple[str, dict | None, str | None] = ("failed", None, "the trial process stopped before it returned")
    try:
        metrics = fit(cfg, runtime, run.reporter(reporter) if run else reporter, resume_from=resume_from,
                      out_dir=out_dir)
        outcome = ("ok", metrics, None)
    except NonFiniteLossError as e:  # deterministic: retrying would fail the same way
        outcome = ("failed", None, str(e))
    except (FileNotFoundError, ValueError) as e:  # bad data or config found at trial start
        outcome = ("failed", None, f"{type(e).__name__}: {e}")
    finally:
        if run is not None:
            run.finish(*outcome)
    return outcome


def trial_driver(config: dict) -> dict:
    """The Tune trial function: resolves the config, trains (here or on a Train worker group), stores the row."""
    spec = dict(config["sslray"])
    load_plugins(spec["plugins"])
    if "params" in config:  # a search sample: dotted params from OptunaSearch
        study = _load_study_for_search(spec)
        cfg = study.trial_from_params(config["params"], spec["seed"])
        spec["cell"] = {**config["params"], "seed": spec["seed"]}
    else:
        cfg = TrialConfig.from_dict(spec["config"], source=f"study {spec['study']}")
        if cfg.trial_id() != spec["trial_id"]:  # its row would land under an id the driver never looks up
            raise RuntimeError(f"trial {spec['trial_id'][:12]} resolves to {cfg.short_id()} on this node: its sslray "
                               "code or plugins differ from the driver's")
    spec["rerun"] = _write_trial_config(spec["storage"], cfg, spec["plugins"])
    t0 = time.time()
    if spec["resources"]["workers"] == 1:
        status, metrics, reason = _fit_in_actor(spec, cfg)
    else:
        status, metrics, reason = _fit_on_workers(spec, cfg)
    extra = metrics.pop("_extra", None) if metrics else None  # node placement, from the Train workers
    _finish(spec, cfg, status, metrics, reason, t0, extra=extra)
    final = {k: v for k, v in (metrics or {}).items() if isinstance(v, (int, float)) and k != "history"}
    return {**final, "sslray_status": status, "sslray_trial_id": cfg.trial_id()}


def _fit_in_actor(spec: dict, cfg: TrialConfig):
    from sslray.trainer import Runtime

    def reporter(metrics: dict, checkpoint: str | None) -> None:
        ray.tune.report({k: v for k, v in metrics.items() if isinstance(v, (int, float))})

    status, metrics, reason = _fit_with(spec, cfg, Runtime.detect(cfg.run.device), reporter, "auto")
    if metrics is not None:  # where it ran (after a lost node: where the retry ran), like the Train workers report
        metrics["_extra"] = {"nodes": [ray.get_runtime_context().get_node_id()]}
    return status, metrics, reason


def _fit_on_workers(spec: dict, cfg: TrialConfig):
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    res = spec["resources"]
    use_gpu = res["gpus_per_worker"] > 0
    per_worker = {"CPU": res["cpus_per_worker"], **({"GPU": res["gpus_per_worker"]} if use_gpu else {})}
    trainer = TorchTrainer(
        train_fn_per_worker,
        train_loop_config={"spec": spec, "config": cfg.to_dict()},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=res["workers"], use_gpu=use_gpu,
                                               resources_per_worker=per_worker,
                                               placement_strategy=res.get("placement", "PACK").upper()),
        run_config=ray.train.RunConfig(
            name=f"{spec['study']}-{cfg.short_id()}",  # stable: a re-run finds and resumes this run
            storage_path=os.path.join(spec["storage"], "ray_train"),
            callbacks=[TuneReportCallback()],
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1),
            failure_config=ray.train.FailureConfig(max_failures=spec["max_failures"], controller_failure_limit=3),
            logging_config=ray.train.LoggingConfig(log_level="WARNING")))
    result = trainer.fit()
    out = result.return_value if result.return_value is not None else {}
    if result.error is not None and not out:
        return "failed", None, f"{type(result.error).__name__}: {result.error}"
    return out.get("status", "failed"), out.get("metrics"), out.get("reason")


def train_fn_per_worker(loop_config: dict) -> dict | None:
    """Runs on each Ray Train worker: the shared trainer under DDP (process group set up by Ray Train)."""
    import torch.distributed as dist

    from sslray.trainer import Runtime

    spec = loop_config["spec"]
    load_plugins(spec["plugins"])
    cfg = TrialConfig.from_dict(loop_config["config"])
    ctx = ray.train.get_context()
    runtime = Runtime.detect(cfg.run.device)
    nodes: list[Any] = [None] * runtime.world_size
    dist.all_gather_object(nodes, ray.get_runtime_context().get_node_id())

    def reporter(metrics: dict, checkpoint: str | None) -> None:
        scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        ck = ray.train.Checkpoint.from_directory(checkpoint) if checkpoint else None
        ray.train.report(scalars, checkpoint=ck)  # every rank: report is a barrier

    resume_from = "auto"
    ck = ray.train.get_checkpoint()  # after a worker failure: the last reported checkpoint
    if ck is not None:
        import shutil

        with ck.as_directory() as d:  # a copy per rank: no rank reads another's half-copied files
            local = os.path.join(_trial_dir(spec["storage"], cfg.trial_id()), f"restored-rank{ctx.get_world_rank()}")
            shutil.copytree(d, local, dirs_exist_ok=True)
            resume_from = local
    status, metrics, reason = _fit_with(spec, cfg, runtime, reporter, resume_from)
    if ctx.get_world_rank() != 0:
        return None
    if metrics is not None:
        metrics["_extra"] = {"nodes": sorted(set(nodes)), "worker_nodes": nodes}
    return {"status": status, "metrics": metrics, "reason": reason}


_STUDY_CACHE: dict[str, Study] = {}


def _load_study_for_search(spec: dict) -> Study:
    from sslray.study import load_study

    key = spec["study_path"] + json.dumps(spec["overrides"])
    if key not in _STUDY_CACHE:
        _STUDY_CACHE[key] = load_study(spec["study_path"], spec["overrides"])
    return _STUDY_CACHE[key]


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


def trial_resources(study: Study) -> dict[str, float]:
    """What one Tune trial holds: the whole worker for one worker, else only the driver token."""
    r = study.resources
    if r.workers == 1:
        return {"cpu": r.cpus_per_worker, "gpu": r.gpus_per_worker}
    return {"cpu": 0, DRIVER_RESOURCE: 1}


def max_concurrent(study: Study, cluster: dict[str, float], n_trials: int) -> int:
    """How many trials can run at once without drivers starving workers; 0 means never."""
    r = study.resources
    limits = [n_trials]
    if r.cpus_per_worker > 0:
        limits.append(math.floor(cluster.get("CPU", 0) / (r.workers * r.cpus_per_worker)))
    if r.gpus_per_worker > 0:
        limits.append(math.floor(cluster.get("GPU", 0) / (r.workers * r.gpus_per_worker)))
    if r.workers > 1:
        limits.append(int(cluster.get(DRIVER_RESOURCE, 0)))
    return max(0, min(limits))


def check_fits(study: Study, cluster: dict[str, float], source: str) -> None:
    r = study.resources
    if r.workers > 1 and cluster.get(DRIVER_RESOURCE, 0) < 1:
        raise ClusterTooSmall(source, "resources.workers",
                              f"{r.workers} workers per trial need a '{DRIVER_RESOURCE}' resource on the head node "
                              f"(ray start --head --resources='{{\"{DRIVER_RESOURCE}\": 100}}'); the cluster has none")
    need = {"CPU": r.workers * r.cpus_per_worker, "GPU": r.workers * r.gpus_per_worker}
    for k, v in need.items():
        if v > cluster.get(k, 0):
            raise ClusterTooSmall(source, "resources",
                                  f"one trial needs {v:g} {k} ({r.workers} workers) but the cluster has "
                                  f"{cluster.get(k, 0):g}")


class _Progress(ray.tune.Callback):
    """One line per finished trial: what ran, what it scored, how long it took."""

    def __init__(self, total: int, labels: dict[str, str], metric: str):
        self.total, self.labels, self.metric, self.done = total, labels, metric, 0
        self.t0 = time.time()

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if "sslray_status" in result or self.metric not in result:
            return  # the final return value, printed by on_trial_complete
        label = self.labels.get(trial.config.get("sslray", {}).get("trial_id", ""), trial.trial_id)
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


def _label(p: PlannedTrial) -> str:
    parts = [f"{k}={v}" for k, v in p.point.items() if k != "seed"]
    return " ".join(parts + [f"seed={p.seed}"])


def plan(study: Study, storage: str, retry_failed: bool = False) -> tuple[list[PlannedTrial], list[PlannedTrial]]:
    """(to run, skipped): trials whose id is already stored are skipped (failed ones too, unless retried)."""
    store = ResultsStore(storage)
    done = store.ids("ok") | (set() if retry_failed else store.ids("failed"))
    planned = study.trials()
    return [p for p in planned if p.trial_id not in done], [p for p in planned if p.trial_id in done]


def run_study(study: Study, address: str | None = None, storage: str | None = None,
              retry_failed: bool = False, num_cpus: int | None = None, max_failures: int = 2,
              overrides: tuple[str, ...] = (), verbose: bool = True, plugins: tuple[str, ...] = ()) -> RunSummary:
    """Run every missing trial of ``study`` on Ray and store one Parquet row per trial.

    What can be checked before anything starts is: the storage (writable, room left) and, for a local instance, what
    one trial needs against this machine; a failure there creates no directory and starts no Ray. ``plugins`` are the
    ``--plugin`` modules the study was loaded with (already imported here); every trial imports them too.
    """
    t0 = time.time()
    storage = storage or study.storage
    if "://" in storage:
        raise ConfigError(study.path, "storage", f"{storage}: object-store URIs are not supported yet; use a path "
                                                 "that every node sees (local disk on one machine, NFS/EFS on a cluster)")
    storage = os.path.abspath(storage)
    _check_storage(storage, study.path)
    if not address and not ray.is_initialized():
        check_fits(study, _local_resources(num_cpus), study.path)
    todo, skipped = plan(study, storage, retry_failed)
    search = study.search is not None
    if not todo and not search:
        if verbose:
            print(f"sslray run: all {len(skipped)} trials of {study.name} are already in {storage}")
        return RunSummary(len(skipped), len(skipped), 0, 0, 0, time.time() - t0)
    _init_ray(address, num_cpus, dashboard=study.resources.workers > 1 or bool(search and study.search.scheduler))
    cluster = ray.cluster_resources()
    check_fits(study, cluster, study.path)
    os.makedirs(storage, exist_ok=True)
    n = study.search.num_samples if search else len(todo)
    concurrent = max_concurrent(study, cluster, n)
    res = study.resources
    base_spec = {"study": study.name, "storage": storage, "max_failures": max_failures, "plugins": list(plugins),
                 "resources": {"workers": res.workers, "cpus_per_worker": res.cpus_per_worker,
                               "gpus_per_worker": res.gpus_per_worker,
                               "placement": res.placement},
                 "study_path": os.path.abspath(study.path), "overrides": list(overrides),
                 "tracking": tracking.settings_for(study, storage)}
    trainable = ray.tune.with_resources(trial_driver, trial_resources(study))
    labels = {p.trial_id: _label(p) for p in todo}
    metric = study.report.metric
    if search:
        param_space, tune_cfg = _search_setup(study, base_spec, concurrent)
    else:
        specs = [{**base_spec, "config": p.config.to_dict(), "cell": {**p.point, "seed": p.seed}, "seed": p.seed,
                  "trial_id": p.trial_id} for p in todo]
        param_space = {"sslray": ray.tune.grid_search(specs)}
        tune_cfg = ray.tune.TuneConfig(max_concurrent_trials=concurrent, reuse_actors=True)
    if verbose:
        what = f"{n} search samples" if search else f"{len(todo)} trials ({len(skipped)} already stored)"
        print(f"sslray run: {study.name}: {what}, {concurrent} at a time, "
              f"{res.workers} worker(s) x {res.cpus_per_worker:g} CPU / {res.gpus_per_worker:g} GPU each -> {storage}",
              flush=True)
    tuner = ray.tune.Tuner(
        trainable, param_space=param_space, tune_config=tune_cfg,
        run_config=ray.tune.RunConfig(
            name=f"{study.name}-tune", storage_path=os.path.join(storage, "ray_tune"), verbose=0,
            failure_config=ray.tune.FailureConfig(max_failures=max_failures),
            callbacks=[_Progress(n, labels, metric)] if verbose else []))
    grid = tuner.fit()
    _store_errored(grid, storage)
    if search:
        _store_stopped(grid, study, storage)
    tracking.log_study(study, storage, base_spec["tracking"])  # no-op when tracking is disabled
    store = ResultsStore(storage)
    ids = {p.trial_id for p in todo}
    ok_ids, failed_ids = store.ids("ok"), store.ids("failed")
    if search:
        ran = [r for r in grid if r.metrics and r.metrics.get("sslray_trial_id")]
        ok = sum(1 for r in ran if r.metrics.get("sslray_status") == "ok")
        return RunSummary(n, 0, len(ran), ok, len(ran) - ok, time.time() - t0)
    ok, failed = len(ids & ok_ids), len(ids & failed_ids)
    return RunSummary(len(todo) + len(skipped), len(skipped), len(todo), ok, failed, time.time() - t0)


def _store_errored(grid, storage: str) -> None:
    """Trials that crashed past their retries (Tune marks them errored) still get a failed row."""
    store = ResultsStore(storage)
    for r in grid:
        if r.error is None:
            continue
        spec = (r.config or {}).get("sslray")
        if not spec or "config" not in spec:
            continue
        cfg = TrialConfig.from_dict(spec["config"])
        if store.has(cfg.trial_id()):
            continue
        reason = f"{type(r.error).__name__}: {str(r.error).strip().splitlines()[-1][:300] if str(r.error) else ''}"
        _finish({**spec, "rerun": ""}, cfg, "failed", None, reason, time.time())


_METRIC_PREFIXES = ("train/", "val/", "best/", "time/", "mem/")


def _store_stopped(grid, study: Study, storage: str) -> None:
    """Search trials that a scheduler stopped early never return: store their last report as ``stopped``."""
    store = ResultsStore(storage)
    for r in grid:
        m = r.metrics or {}
        if r.error is not None or "sslray_status" in m or "params" not in (r.config or {}):
            continue
        spec = r.config["sslray"]
        cfg = study.trial_from_params(r.config["params"], spec["seed"])
        if store.has(cfg.trial_id()):
            continue
        kept = {k: v for k, v in m.items() if k.startswith(_METRIC_PREFIXES) or k == "iteration"}
        reason = f"stopped by the scheduler after {m.get('iteration', '?')} iterations"
        _finish({**spec, "cell": {**r.config["params"], "seed": spec["seed"]}, "rerun": ""}, cfg, "stopped",
                kept, reason, time.time())


def _search_setup(study: Study, base_spec: dict, concurrent: int):
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    s = study.search
    samplers = {"tpe": lambda: optuna.samplers.TPESampler(seed=s.seed),
                "random": lambda: optuna.samplers.RandomSampler(seed=s.seed),
                "gp": lambda: optuna.samplers.GPSampler(seed=s.seed),
                "bruteforce": lambda: optuna.samplers.BruteForceSampler(seed=s.seed),
                "grid": lambda: optuna.samplers.GridSampler(
                    {f"params/{k}": list(d.choices) for k, d in s.space.items()}, seed=s.seed)}
    space = {"params": {k: _domain(v) for k, v in s.space.items()}}
    searcher = OptunaSearch(metric=s.metric, mode=s.mode, sampler=samplers[s.sampler]())
    scheduler = None
    if s.scheduler:
        from ray.tune.schedulers import ASHAScheduler

        sch = {k: v for k, v in s.scheduler.items() if k != "type"}  # validated and filled in by study.py
        # stop_last_trials=False: survivors at max_t exit on their own instead of being killed (ray.md §1.4)
        scheduler = ASHAScheduler(time_attr="training_iteration", metric=s.metric, mode=s.mode,
                                  stop_last_trials=False, **sch)
    spec = {**base_spec, "seed": study.seeds[0], "cell": {}}
    param_space = {**space, "sslray": spec}
    cfg = ray.tune.TuneConfig(search_alg=searcher, scheduler=scheduler, num_samples=s.num_samples,
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


MIN_FREE_BYTES = 100 << 20  # a full disk, caught before the first checkpoint fails; not a size estimate


def _check_storage(storage: str, source: str) -> None:
    """Refuse a storage that cannot take the study's files, without creating anything: the probe is written (and
    removed) in the deepest directory that exists, where ``makedirs`` would create the storage. Works for root too,
    which ``os.access`` does not (root passes every permission check, but not a read-only mount or a full disk)."""
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


def _local_resources(num_cpus: int | None) -> dict[str, float]:
    """What the local instance ``_init_ray`` would start offers, known without starting it."""
    import torch

    return {"CPU": num_cpus or os.cpu_count() or 1, "GPU": torch.cuda.device_count(), DRIVER_RESOURCE: 1000}


def shutdown() -> None:
    if ray.is_initialized():
        ray.shutdown()


__all__ = ["run_study", "plan", "max_concurrent", "trial_resources", "check_fits", "shutdown", "RunSummary",
           "trial_driver", "train_fn_per_worker", "ClusterTooSmall"]
