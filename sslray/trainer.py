"""The training loop: one visible ``for`` loop shared by every method.

Run manual::

    sslray train                                         # synthetic default, supervised, CPU or one GPU
    sslray train configs/synthetic_fixmatch.yaml --set train.iterations=2000
    torchrun --nproc-per-node 2 -m sslray train configs/synthetic_fixmatch.yaml   # DDP (gloo on CPU, nccl on GPU)

``fit(cfg, runtime, reporter, resume_from)`` knows nothing about Ray: the reporter callback is its only way
out (a metrics dict and the checkpoint directory after every evaluation). Results are reproducible: model
init, data order and every augmentation are functions of ``cfg.seed`` and the iteration, and the
checkpoint carries the RNG state used by dropout, so a resumed run equals an uninterrupted one.
"""
from __future__ import annotations

import os
import resource
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn as nn

from sslray.config import TrialConfig
from sslray.data.datasets import build_data, make_loader
from sslray.evaluate import evaluate
from sslray.methods import NonFiniteLossError, build_method
from sslray.models import build_model
from sslray.teacher_student import TeacherStudent

Reporter = Callable[[dict[str, Any], "str | None"], None]
CHECKPOINT_FILE = "state.pt"
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


def _amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    if amp == "none":
        return None
    if amp == "fp16" and device.type != "cuda":
        raise ValueError("train.amp: fp16 autocast needs a CUDA device; use bf16 or none")
    return torch.bfloat16 if amp == "bf16" else torch.float16


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
    """Write ``directory/state.pt`` atomically (tmp + rename) so a crash never leaves half a checkpoint, and a failed
    write (disk full) leaves no temp file and says which file and why."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, CHECKPOINT_FILE)
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb") as f:  # our file object: torch's writer keeps the OSError as the context
            torch.save(state, f)
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        cause = e if isinstance(e, OSError) else e.__context__
        if isinstance(cause, OSError) and cause.errno is not None:  # torch raises "enforce fail ... unexpected pos"
            raise OSError(cause.errno, f"cannot write checkpoint {path}: {cause.strerror}") from None
        raise
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


def _progress(cfg: TrialConfig, runtime: Runtime, start: int):
    show = cfg.run.progress == "on" or (cfg.run.progress == "auto" and sys.stderr.isatty())
    if not (show and runtime.is_main):
        return None
    from tqdm import tqdm

    return tqdm(total=cfg.train.iterations, initial=start, desc=cfg.name, dynamic_ncols=True, file=sys.stderr,
                unit="it")


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


def _to(batch: dict | None, device: torch.device) -> dict | None:
    if batch is None:
        return None
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def fit(cfg: TrialConfig, runtime: Runtime | None = None, reporter: Reporter | None = None,
        resume_from: str | None = None, out_dir: str | None = None) -> dict[str, Any]:
    """Train one trial and return its final metrics (``val/*`` of the last evaluation, ``best/*``, ``time/*``).

    Args:
        cfg: the resolved trial config.
        runtime: rank, world size and device; detected from torch.distributed when None.
        reporter: called after every evaluation on every rank with (metrics, checkpoint directory); the
            directory is None on ranks other than 0 and when checkpointing is off.
        resume_from: a checkpoint directory to continue from, or "auto" for ``<out_dir>/checkpoint`` when present.
        out_dir: where splits and checkpoints go (default ``cfg.run.out_dir`` or ``runs/<name>-<id>``).
    """
    runtime = runtime or Runtime.detect(cfg.run.device)
    device = runtime.device
    out_dir = out_dir or default_out_dir(cfg)
    ckpt_dir = os.path.join(out_dir, "checkpoint")
    if resume_from == "auto":
        resume_from = ckpt_dir if os.path.exists(os.path.join(ckpt_dir, CHECKPOINT_FILE)) else None
    if cfg.run.threads > 0:
        torch.set_num_threads(cfg.run.threads)
    t_start = time.perf_counter()

    data = build_data(cfg.data, workdir=out_dir if runtime.is_main else None)
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    model = build_model(cfg.model, data.num_classes).to(device)
    if runtime.world_size > 1 and device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    method = build_method(cfg.method, data.num_classes, data.ignore_index, model.feature_dims, cfg.train.iterations)
    method.modules.to(device)
    backbone, head = model.param_groups()
    head = head + [p for p in method.modules.parameters() if p.requires_grad]  # method heads: head lr
    optimizer = torch.optim.SGD(
        [{"params": backbone, "lr": cfg.optim.lr}, {"params": head, "lr": cfg.optim.lr * cfg.optim.head_lr_mult}],
        lr=cfg.optim.lr, momentum=cfg.optim.momentum, weight_decay=cfg.optim.weight_decay)
    student = model
    if runtime.world_size > 1:
        ids = [device.index] if device.type == "cuda" else None
        student = nn.parallel.DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False)
    amp_dtype = _amp_dtype(cfg.train.amp, device)
    ts = TeacherStudent(student, cfg.method, method.needs, student_module=model, amp_dtype=amp_dtype,
                        refine_teacher=method.refine_teacher if method.refines_teacher else None)
    # Dropout (FP) differs per rank, like independent GPUs; the stream itself is part of the checkpoint.
    torch.manual_seed(cfg.seed * 1009 + runtime.rank + 1)

    start, best, history = 0, {}, []
    if resume_from:
        state = load_checkpoint(resume_from, device)
        if state["trial_id"] != cfg.trial_id():
            raise ValueError(f"{resume_from}: checkpoint belongs to trial {state['trial_id'][:12]}, "
                             f"not {cfg.short_id()}")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        ts.load_state_dict(state["teacher_student"])
        method.modules.load_state_dict(state["method"])
        start, best, history = state["iteration"], state["best"], state["history"]
        _set_rng_state(state["rng"][min(runtime.rank, len(state["rng"]) - 1)], device)

    total = cfg.train.iterations
    rank, world = runtime.rank, runtime.world_size
    n_iters = total - start
    loader_x = make_loader(data.labeled, len(data.labeled.entries), cfg.data.batch_size_x, cfg.seed, 0, start,
                           n_iters, rank, world, cfg.run.num_workers)
    needs_u = "u" in method.needs
    loader_u = loader_mix = None
    if needs_u:
        n_u = len(data.unlabeled.entries)
        loader_u = make_loader(data.unlabeled, n_u, cfg.data.batch_size_u, cfg.seed, 1, start, n_iters, rank, world,
                               cfg.run.num_workers)
        if cfg.method.mix_source == "batch" and method.needs & {"s1", "s2"}:
            loader_mix = make_loader(data.unlabeled, n_u, cfg.data.batch_size_u, cfg.seed, 2, start, n_iters, rank,
                                     world, cfg.run.num_workers)
    streams = [iter(loader_x), iter(loader_u) if loader_u else None, iter(loader_mix) if loader_mix else None]

    def validate() -> dict[str, Any]:
        eval_model = ts.teacher.model if (cfg.train.eval_model == "teacher" and ts.teacher) else model
        return evaluate(eval_model, data.val, data.num_classes, data.eval_mode, data.crop_size, device,
                        data.class_names, data.ignore_index, rank, world, amp_dtype, per_image=True)

    meter, bar = _Meter(), _progress(cfg, runtime, start)
    images_per_step = cfg.data.batch_size_x + (cfg.data.batch_size_u if needs_u else 0)
    metrics: dict[str, Any] = {}
    t_log, steps_since_log = time.perf_counter(), 0
    model.train()
    method.modules.train()
    for it in range(start, total):
        batch_x, batch_u, batch_mix = (_to(next(s), device) if s is not None else None for s in streams)
        lr = poly_lr(cfg.optim.lr, it, total, cfg.optim.poly_power)
        optimizer.param_groups[0]["lr"] = lr
        optimizer.param_groups[1]["lr"] = lr * cfg.optim.head_lr_mult

        out = ts.step(batch_x, batch_u, batch_mix, iteration=it)
        losses = method.losses(out)
        if not torch.isfinite(losses["loss"]):
            method.check_finite(losses, it)
            raise NonFiniteLossError(it, "total", float(losses["loss"]))
        optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        method.sync_grads()
        optimizer.step()
        ts.after_optimizer_step()
        method.after_step(out)

        with torch.no_grad():
            meter.add({**{"train/" + k: v for k, v in losses.items()},
                       **_step_diagnostics(out, cfg.method.conf_thresh, batch_u), **method.diagnostics()})
        steps_since_log += 1
        if bar is not None:
            bar.update(1)
            if (it + 1) % 10 == 0:
                bar.set_postfix(loss=f"{float(losses['loss']):.3f}", refresh=False)

        last = it + 1 == total
        if (it + 1) % cfg.run.log_every == 0 or (it + 1) % cfg.train.eval_every == 0 or last:
            now = time.perf_counter()
            step_s = (now - t_log) / max(steps_since_log, 1)
            metrics = {"iteration": it + 1, "train/lr": lr, **_mean_across_ranks(meter.means(), world, device),
                       "time/step_s": step_s,
                       "time/images_per_s": images_per_step / step_s if step_s > 0 else 0.0,
                       "mem/peak_mb": _peak_mem_mb(device)}
            t_log, steps_since_log = now, 0

        if (it + 1) % cfg.train.eval_every == 0 or last:
            val = validate()
            model.train()
            metrics.update(val)
            if not best or val["val/miou"] > best.get("best/val/miou", -1):
                best = {"best/val/miou": val["val/miou"], "best/iteration": it + 1}
            metrics.update(best)
            metrics["time/wall_s"] = time.perf_counter() - t_start
            history.append({k: v for k, v in metrics.items() if k not in NOT_IN_HISTORY})
            checkpoint = None
            if cfg.run.checkpoint:
                rng_all = _gather_rng(device, world)
                if runtime.is_main:
                    checkpoint = save_checkpoint(ckpt_dir, {
                        "trial_id": cfg.trial_id(), "config": cfg.to_dict(), "iteration": it + 1,
                        "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                        "teacher_student": ts.state_dict(), "method": method.modules.state_dict(),
                        "best": best, "history": history, "rng": rng_all})
                if world > 1:
                    dist.barrier()
            if bar is not None:
                bar.set_postfix(loss=f"{metrics.get('train/loss', float('nan')):.3f}",
                                miou=f"{val['val/miou']:.1f}")
            if reporter is not None:  # every rank: Ray Train's report is a barrier; only rank 0 has the checkpoint
                reporter(dict(metrics), checkpoint)
    if bar is not None:
        bar.close()
    if start >= total:  # resumed from the final checkpoint (a crash after training, before results were stored)
        metrics = {**history[-1], **validate()}
    metrics["time/wall_s"] = time.perf_counter() - t_start
    metrics["resumed_from"] = start  # 0 for a fresh run; the iteration a resumed run continued from
    metrics["history"] = history
    return metrics


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
