"""The training loop: one visible ``for`` loop shared by every method.

Run manual::

    sslray train                                         # synthetic default, supervised, CPU or one GPU
    sslray train configs/synthetic_fixmatch.yaml --set train.iterations=2000
    torchrun --nproc-per-node 2 -m sslray train configs/synthetic_fixmatch.yaml   # DDP (gloo on CPU, nccl on GPU)

``fit(cfg, runtime, reporter, resume_from, out_dir) -> FitResult(metrics, history)`` knows nothing about Ray: the
reporter callback is its only way out during training (a metrics dict and the checkpoint directory after every
evaluation), and the result it returns reads as the final metrics mapping with the per-evaluation history beside
it (``result.history``), never inside. Results are reproducible: model init, data order and every augmentation are
functions of ``cfg.seed`` and the iteration, and the checkpoint carries the RNG state used by dropout, so a resumed
run equals an uninterrupted one.

Shape of ``fit``: :func:`_build` (data, model, method, optimizer, teacher-student step), :func:`_restore` (a
checkpoint into those), :func:`_streams` (the labeled / unlabeled / mixing batch streams, named by ``STREAM_*``),
then the loop itself in ``fit`` (learning rate, step, losses, backward, meters, log lines), which calls
:func:`_evaluate_and_save` at every ``train.eval_every`` (validation, best, history, checkpoint) before reporting.
Checkpoints are ``<out_dir>/checkpoint/state.pt`` (:func:`sslray.storage.checkpoint_dir`), written atomically.
"""
from __future__ import annotations

import os
import resource
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn as nn

from sslray.config import TrialConfig
from sslray.data.datasets import build_data, make_loader
from sslray.data.device_augs import PARAMS_KEY, augment_batch
from sslray.evaluate import evaluate
from sslray.methods import build_method
from sslray.models import build_model
from sslray.storage import CHECKPOINT_FILE, atomic_write, checkpoint_dir
from sslray.teacher_student import TeacherStudent
from sslray.throughput import FiniteGuard, MemoryGuard, Settings, apply_to_model, resolve

Reporter = Callable[[dict[str, Any], "str | None"], None]
# Per-evaluation arrays kept only for the final metrics (the results row), not in every history entry.
NOT_IN_HISTORY = ("val/confusion", "val/per_image")


@dataclass
class Runtime:
    """Where this process runs: its rank in the (optional) process group and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def detect(cls, device: str = "auto") -> "Runtime":
        """From an initialised torch.distributed group (torchrun, Ray Train) or a single process."""
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        if device == "auto":
            device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
        elif device == "cuda":
            device = f"cuda:{local_rank}"
        return cls(rank, world, local_rank, torch.device(device))


def poly_lr(base_lr: float, iteration: int, total: int, power: float) -> float:
    return base_lr * (1.0 - iteration / total) ** power


def _peak_mem_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def save_checkpoint(directory: str, state: dict) -> str:
    """Write ``directory/state.pt`` atomically (:func:`sslray.storage.atomic_write`) so a crash never leaves half a
    checkpoint, and a failed write (disk full) leaves no temp file and says which file and why."""
    atomic_write(os.path.join(directory, CHECKPOINT_FILE), lambda f: torch.save(state, f), what="checkpoint")
    return directory


def load_checkpoint(directory: str, device: torch.device) -> dict:
    path = os.path.join(directory, CHECKPOINT_FILE) if os.path.isdir(directory) else directory
    return torch.load(path, map_location=device, weights_only=False)


def default_out_dir(cfg: TrialConfig) -> str:
    return cfg.run.out_dir or os.path.join("runs", f"{cfg.name}-{cfg.short_id()}")


class _Meter:
    """Running means of scalar tensors without a device sync per step."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.n = 0

    def add(self, values: dict[str, torch.Tensor]) -> None:
        for k, v in values.items():
            v = v.detach().float()
            self.sums[k] = self.sums[k] + v if k in self.sums else v.clone()
        self.n += 1

    def means(self) -> dict[str, float]:
        out = {k: float(v) / max(self.n, 1) for k, v in self.sums.items()}
        self.sums, self.n = {}, 0
        return out


class _Bar:
    """The tqdm progress bar on rank 0 when ``run.progress`` asks for one; every method is a no-op otherwise."""

    def __init__(self, cfg: TrialConfig, runtime: Runtime, start: int):
        show = cfg.run.progress == "on" or (cfg.run.progress == "auto" and sys.stderr.isatty())
        self.bar = None
        if show and runtime.is_main:
            from tqdm import tqdm

            self.bar = tqdm(total=cfg.train.iterations, initial=start, desc=cfg.name, dynamic_ncols=True,
                            file=sys.stderr, unit="it")

    def step(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def logged(self, metrics: dict[str, Any]) -> None:
        """The loss at log points only: reading it every few steps would synchronise the device."""
        if self.bar is not None and "train/loss" in metrics:
            self.bar.set_postfix(loss=f"{metrics['train/loss']:.3f}", refresh=False)

    def evaluated(self, metrics: dict[str, Any]) -> None:
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{metrics.get('train/loss', float('nan')):.3f}",
                                 miou=f"{metrics['val/miou']:.1f}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _set_lr(optimizer: torch.optim.Optimizer, cfg: TrialConfig, it: int) -> float:
    """Poly decay of the backbone lr (group 0); the heads (group 1) at ``optim.head_lr_mult`` times it."""
    lr = poly_lr(cfg.optim.lr, it, cfg.train.iterations, cfg.optim.poly_power)
    optimizer.param_groups[0]["lr"] = lr
    optimizer.param_groups[1]["lr"] = lr * cfg.optim.head_lr_mult
    return lr


def _step_diagnostics(out, conf_thresh: float, batch_u: dict | None) -> dict[str, torch.Tensor]:
    """mask_ratio: share of valid unlabeled pixels above the threshold; pseudo_acc where truth is known."""
    if out.conf_u_w is None:
        return {}
    valid = out.ignore_mask_u != 255
    diag = {"train/mask_ratio": ((out.conf_u_w >= conf_thresh) & valid).sum() / valid.sum().clamp(min=1)}
    truth = batch_u.get("mask_u_true") if batch_u else None
    if truth is not None:
        known = valid & (truth != 255)
        diag["train/pseudo_acc"] = ((out.mask_u_w == truth) & known).sum() / known.sum().clamp(min=1)
    return diag


def _to(batch: dict | None, device: torch.device, channels_last: bool = False) -> dict | None:
    """A collated batch on the device (``host_*`` keys stay on the host), its strong views made there under
    ``data.augment_on: device``, images channels_last when asked."""
    if batch is None:
        return None
    out = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) and not k.startswith("host_") else v
           for k, v in batch.items()}
    if PARAMS_KEY in out:
        out = augment_batch(out)
    if channels_last:  # images only (4-D float); masks and boxes keep their layout
        out = {k: v.contiguous(memory_format=torch.channels_last) if torch.is_tensor(v) and v.dim() == 4
               and v.is_floating_point() else v for k, v in out.items()}
    return out


@dataclass(frozen=True, eq=False)
class FitResult(Mapping):
    """What :func:`fit` returns: the final ``metrics`` (``val/*`` of the last evaluation, ``best/*``, ``time/*``,
    ``resumed_from``: the iteration a resumed run continued from, 0 for a fresh one) and the per-evaluation
    ``history`` (one metrics dict per evaluation, without the arrays of ``NOT_IN_HISTORY``).

    It reads as the metrics mapping (``fit(cfg)["val/miou"]``); the history is only ``result.history``."""

    metrics: dict[str, Any]
    history: list[dict[str, Any]]

    def __getitem__(self, key: str) -> Any:
        return self.metrics[key]

    def __iter__(self):
        return iter(self.metrics)

    def __len__(self) -> int:
        return len(self.metrics)


@dataclass
class _Parts:
    """What a trial trains with, built once by :func:`_build` (and restored into by :func:`_restore`)."""

    cfg: TrialConfig
    runtime: Runtime
    data: Any
    model: nn.Module
    method: Any
    optimizer: torch.optim.Optimizer
    ts: TeacherStudent
    amp_dtype: torch.dtype | None
    settings: Settings = field(default_factory=Settings)
    memory: MemoryGuard | None = None

    def validate(self) -> dict[str, Any]:
        """Evaluate the student (or the teacher, ``train.eval_model``) on the validation set, all ranks together.

        ``both`` (UniMatch V2's log): ``val/*`` from the student and ``val_ema/*`` from the EMA teacher (the student
        alone when the method has no EMA teacher)."""
        cfg, data, ts = self.cfg, self.data, self.ts
        mode = cfg.train.eval_model
        eval_model = ts.teacher.model if (mode == "teacher" and ts.teacher) else self.model
        val = self._evaluate(eval_model, per_image=True)
        if mode == "both" and ts.teacher is not None:
            ema = self._evaluate(ts.teacher.model, per_image=False)
            val.update({"val_ema/" + k.removeprefix("val/"): v for k, v in ema.items() if k != "val/confusion"})
        return val

    def _evaluate(self, model: nn.Module, per_image: bool) -> dict[str, Any]:
        data, rt = self.data, self.runtime
        return evaluate(model, data.val, data.num_classes, data.eval_mode, data.crop_size, rt.device,
                        data.class_names, data.ignore_index, rt.rank, rt.world_size, self.amp_dtype,
                        per_image=per_image)


@dataclass
class _Progress:
    """Where training stands: the first iteration to run, the best evaluation so far, the history so far."""

    start: int = 0
    best: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)


# Stream ids of the data loaders: each stream's order and augmentations are a function of (seed, stream, iteration).
STREAM_X, STREAM_U, STREAM_MIX = 0, 1, 2


def _build(cfg: TrialConfig, runtime: Runtime, out_dir: str, data: Any = None) -> _Parts:
    """Data (split files under ``out_dir`` on rank 0), model, method, optimizer and the teacher-student step.
    ``data``: already built data (``benchmarks/gpu.py`` passes only ``num_classes`` and ``ignore_index``)."""
    device = runtime.device
    if cfg.run.threads > 0:
        torch.set_num_threads(cfg.run.threads)
    if data is None:
        data = build_data(cfg.data, workdir=out_dir if runtime.is_main else None)
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    settings = resolve(cfg, device)
    model = apply_to_model(build_model(cfg.model, data.num_classes).to(device), settings)
    memory = MemoryGuard(cfg.run.gpu_memory_fraction, device)
    memory.start(model)  # a packed trial (resources.gpus_per_worker < 1) that cannot fit is refused here
    if runtime.world_size > 1 and device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    method = build_method(cfg.method, data.num_classes, data.ignore_index, model.feature_dims, cfg.train.iterations)
    method.modules.to(device)
    backbone, head = model.param_groups()
    head = head + [p for p in method.modules.parameters() if p.requires_grad]  # method heads: head lr
    optimizer = _optimizer(cfg, backbone, head, settings.optimizer_kwargs)
    student = model
    if runtime.world_size > 1:
        ids = [device.index] if device.type == "cuda" else None
        student = nn.parallel.DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False)
    amp_dtype = settings.amp_dtype
    ts = TeacherStudent(student, cfg.method, method.needs, student_module=model, amp_dtype=amp_dtype,
                        refine_teacher=method.refine_teacher if method.refines_teacher else None)
    if settings.compile:  # in place after the EMA copy: state_dict keys stay those of the plain model
        model.compile()
    # Dropout (FP) differs per rank, like independent GPUs; the stream itself is part of the checkpoint.
    torch.manual_seed(cfg.seed * 1009 + runtime.rank + 1)
    return _Parts(cfg, runtime, data, model, method, optimizer, ts, amp_dtype, settings, memory)


def _optimizer(cfg: TrialConfig, backbone: list, head: list, impl: dict | None = None) -> torch.optim.Optimizer:
    """SGD (UniMatch V1; momentum) or AdamW (UniMatch V2; betas (0.9, 0.999)); group 0 backbone, group 1 heads.
    ``impl``: the implementation keywords of ``run.optimizer_impl`` (foreach / fused), which both accept."""
    groups = [{"params": backbone, "lr": cfg.optim.lr}, {"params": head, "lr": cfg.optim.lr * cfg.optim.head_lr_mult}]
    if cfg.optim.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=(0.9, 0.999), weight_decay=cfg.optim.weight_decay,
                                 **(impl or {}))
    return torch.optim.SGD(groups, lr=cfg.optim.lr, momentum=cfg.optim.momentum, weight_decay=cfg.optim.weight_decay,
                           **(impl or {}))


def _resume_path(resume_from: str | None, ckpt_dir: str) -> str | None:
    if resume_from != "auto":
        return resume_from
    return ckpt_dir if os.path.exists(os.path.join(ckpt_dir, CHECKPOINT_FILE)) else None


def _restore(parts: _Parts, resume_from: str | None) -> _Progress:
    """Load a checkpoint into ``parts`` (weights, optimizer, teacher, method state, this rank's RNG)."""
    if not resume_from:
        return _Progress()
    cfg, device = parts.cfg, parts.runtime.device
    state = load_checkpoint(resume_from, device)
    if state["trial_id"] != cfg.trial_id():
        raise ValueError(f"{resume_from}: checkpoint belongs to trial {state['trial_id'][:12]}, not {cfg.short_id()}")
    parts.model.load_state_dict(state["model"])
    parts.optimizer.load_state_dict(state["optimizer"])
    parts.ts.load_state_dict(state["teacher_student"])
    parts.method.modules.load_state_dict(state["method"])
    _set_rng_state(state["rng"][min(parts.runtime.rank, len(state["rng"]) - 1)], device)
    return _Progress(state["iteration"], state["best"], state["history"])


def _streams(parts: _Parts, start: int) -> Callable[[], tuple[dict, dict | None, dict | None]]:
    """The batch streams from iteration ``start`` on: labeled always, unlabeled when the method needs it, a second
    unlabeled stream for mixing partners (``method.mix_source: batch``); returns ``next_batches()`` -> (x, u, mix)
    on the device."""
    cfg, data, rt = parts.cfg, parts.data, parts.runtime
    common = dict(seed=cfg.seed, start_iter=start, num_iters=cfg.train.iterations - start, rank=rt.rank,
                  world=rt.world_size, num_workers=cfg.run.num_workers)
    loaders = [make_loader(data.labeled, n=len(data.labeled.entries), batch_size=cfg.data.batch_size_x,
                           stream=STREAM_X, **common), None, None]
    if "u" in parts.method.needs:
        n_u = len(data.unlabeled.entries)
        loaders[1] = make_loader(data.unlabeled, n=n_u, batch_size=cfg.data.batch_size_u, stream=STREAM_U, **common)
        if cfg.method.mix_source == "batch" and parts.method.needs & {"s1", "s2"}:
            loaders[2] = make_loader(data.unlabeled, n=n_u, batch_size=cfg.data.batch_size_u, stream=STREAM_MIX,
                                     **common)
    streams = [iter(loader) if loader is not None else None for loader in loaders]

    channels_last = parts.settings.channels_last

    def next_batches() -> tuple[dict, dict | None, dict | None]:
        x, u, mix = (_to(next(s), rt.device, channels_last) if s is not None else None for s in streams)
        return x, u, mix

    return next_batches


def fit(cfg: TrialConfig, runtime: Runtime | None = None, reporter: Reporter | None = None,
        resume_from: str | None = None, out_dir: str | None = None,
        on_log: Callable[[dict], None] | None = None) -> FitResult:
    """Train one trial of the resolved ``cfg``; returns its :class:`FitResult` (final metrics, history).

    ``runtime`` (rank, world size, device) is detected from torch.distributed when None. ``reporter`` is called after
    every evaluation on every rank with (metrics, checkpoint directory: None on ranks other than 0 and with
    checkpointing off). ``resume_from`` is a checkpoint directory, or "auto" for ``<out_dir>/checkpoint`` when
    present. ``out_dir`` gets splits and checkpoints (default ``cfg.run.out_dir`` or ``runs/<name>-<id>``).
    ``on_log`` gets the training metrics every ``run.log_every`` iterations between evaluations (W&B), on every
    rank (the callee decides which logs).
    """
    runtime = runtime or Runtime.detect(cfg.run.device)
    device, world = runtime.device, runtime.world_size
    out_dir = out_dir or default_out_dir(cfg)
    ckpt_dir = str(checkpoint_dir(out_dir))
    t_start = time.perf_counter()
    parts = _build(cfg, runtime, out_dir)
    model, method = parts.model, parts.method
    progress = _restore(parts, _resume_path(resume_from, ckpt_dir))
    next_batches = _streams(parts, progress.start)
    total = cfg.train.iterations
    meter, bar, log = _Meter(), _Bar(cfg, runtime, progress.start), _LogClock(cfg, "u" in method.needs)
    metrics: dict[str, Any] = {}
    model.train()
    method.modules.train()
    guard, check_every = FiniteGuard(), cfg.run.finite_check_every
    for it in range(progress.start, total):
        batches = next_batches()
        lr = _set_lr(parts.optimizer, cfg, it)
        with parts.memory.probing(first=it == progress.start):  # the first step measures a packed trial's peak
            _train_step(parts, batches, it, guard, meter)
        log.steps += 1
        bar.step()

        last = it + 1 == total
        evaluating = (it + 1) % cfg.train.eval_every == 0 or last
        logging = evaluating or (it + 1) % cfg.run.log_every == 0
        if logging or (check_every and (it + 1) % check_every == 0):
            guard.check()  # the only host read of the step's losses: raises for the first bad iteration
        if logging:
            metrics = {"iteration": it + 1, "train/lr": lr, **_mean_across_ranks(meter.means(), world, device),
                       **log.timing(device)}
            bar.logged(metrics)
            if on_log is not None and not evaluating:
                on_log(dict(metrics))  # an evaluation step reports its metrics (these included) to the reporter
        if evaluating:
            metrics, checkpoint = _evaluate_and_save(parts, progress, metrics, it + 1, ckpt_dir, t_start)
            bar.evaluated(metrics)
            if reporter is not None:  # every rank: Ray Train's report is a barrier; only rank 0 has the checkpoint
                reporter(dict(metrics), checkpoint)
    bar.close()
    if progress.start >= total:  # resumed from the final checkpoint (a crash after training, before results stored)
        metrics = {**progress.history[-1], **parts.validate()}
    metrics["time/wall_s"] = time.perf_counter() - t_start
    metrics["resumed_from"] = progress.start  # 0 for a fresh run; the iteration a resumed run continued from
    return FitResult(metrics, progress.history)


def _train_step(parts: _Parts, batches: tuple, it: int, guard: FiniteGuard, meter: _Meter) -> None:
    """One optimisation step with no host synchronisation: losses are watched by ``guard`` on the device and
    accumulated by ``meter`` on the device; both are read back at log points only."""
    batch_x, batch_u, batch_mix = batches
    method, optimizer, ts = parts.method, parts.optimizer, parts.ts
    out = ts.step(batch_x, batch_u, batch_mix, iteration=it)
    losses = method.losses(out)
    guard.watch(losses, it)
    optimizer.zero_grad(set_to_none=True)
    losses["loss"].backward()
    method.sync_grads()
    optimizer.step()
    ts.after_optimizer_step()
    method.after_step(out)
    with torch.no_grad():
        meter.add({**{"train/" + k: v for k, v in losses.items()},
                   **_step_diagnostics(out, parts.cfg.method.conf_thresh, batch_u), **method.diagnostics()})


class _LogClock:
    """Seconds per step and images per second since the last log line."""

    def __init__(self, cfg: TrialConfig, needs_u: bool):
        self.images_per_step = cfg.data.batch_size_x + (cfg.data.batch_size_u if needs_u else 0)
        self.t, self.steps = time.perf_counter(), 0

    def timing(self, device: torch.device) -> dict[str, float]:
        now = time.perf_counter()
        step_s = (now - self.t) / max(self.steps, 1)
        self.t, self.steps = now, 0
        return {"time/step_s": step_s, "time/images_per_s": self.images_per_step / step_s if step_s > 0 else 0.0,
                "mem/peak_mb": _peak_mem_mb(device)}


def _evaluate_and_save(parts: _Parts, progress: _Progress, metrics: dict[str, Any], iteration: int, ckpt_dir: str,
                       t_start: float) -> tuple[dict[str, Any], str | None]:
    """Validate, update best and history, write the checkpoint (rank 0; all ranks wait); returns the metrics to
    report and the checkpoint directory (None on other ranks and with checkpointing off)."""
    cfg, runtime = parts.cfg, parts.runtime
    val = parts.validate()
    parts.model.train()
    metrics = {**metrics, **val}
    if not progress.best or val["val/miou"] > progress.best.get("best/val/miou", -1):
        progress.best = {**progress.best, "best/val/miou": val["val/miou"], "best/iteration": iteration}
    if "val_ema/miou" in val and val["val_ema/miou"] > progress.best.get("best/val_ema/miou", -1):
        progress.best = {**progress.best, "best/val_ema/miou": val["val_ema/miou"], "best_ema/iteration": iteration}
    metrics.update(progress.best)
    metrics["time/wall_s"] = time.perf_counter() - t_start
    progress.history.append({k: v for k, v in metrics.items() if k not in NOT_IN_HISTORY})
    checkpoint = None
    if cfg.run.checkpoint:
        rng_all = _gather_rng(runtime.device, runtime.world_size)
        if runtime.is_main:
            checkpoint = save_checkpoint(ckpt_dir, {
                "trial_id": cfg.trial_id(), "config": cfg.to_dict(), "iteration": iteration,
                "model": parts.model.state_dict(), "optimizer": parts.optimizer.state_dict(),
                "teacher_student": parts.ts.state_dict(), "method": parts.method.modules.state_dict(),
                "best": progress.best, "history": progress.history, "rng": rng_all})
        if runtime.world_size > 1:
            dist.barrier()
    return metrics, checkpoint


def _mean_across_ranks(values: dict[str, float], world: int, device: torch.device) -> dict[str, float]:
    """Average logged train metrics over ranks once per log line, so DDP reports the global batch."""
    if world == 1 or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)  # nccl needs device tensors
    dist.all_reduce(t)
    return {k: float(v) / world for k, v in zip(keys, t)}


def _gather_rng(device: torch.device, world: int) -> list[dict]:
    """Every rank's RNG state, so a resumed DDP run continues each rank's dropout stream."""
    state = _rng_state(device)
    if world == 1:
        return [state]
    states: list[Any] = [None] * world
    dist.all_gather_object(states, {k: v.cpu() for k, v in state.items()})
    return states
