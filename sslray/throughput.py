"""What keeps a GPU busy, in one place: the device-side finite-loss guard, the throughput settings, the memory
check of packed trials. The trainer and the Ray adapter call these; nothing here imports either.

* :class:`FiniteGuard` keeps the NaN guarantee (a non-finite loss fails the trial naming the iteration and the
  term) without a host synchronisation per step: every step folds "is any term non-finite" into three device
  scalars with ``torch.where`` (first bad iteration, which term, its value); the host reads them back only at
  :meth:`FiniteGuard.check` -- log and evaluation points, or every ``run.finite_check_every`` steps -- and raises
  for the *first* bad iteration, however many steps ran since.
* :func:`resolve` turns ``train.amp`` and the ``run.*`` throughput options into a :class:`Settings` for a device:
  ``auto`` means on for CUDA, off on CPU (bf16 autocast, channels_last, the fused optimizer, cuDNN benchmark);
  ``torch.compile`` is off unless asked for (``run.compile: on``): its compile time is not measured on a GPU yet,
  so nothing says it pays back within a short trial.
* :func:`memory_check` is the up-front refusal of a trial that would not fit its share of a GPU
  (``resources.gpus_per_worker < 1``): a pure function of the estimate and the device's total memory.
"""
from __future__ import annotations

import math
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch

from sslray.methods import NonFiniteLossError


class FiniteGuard:
    """Watches the loss terms of every step on the device; :meth:`check` raises for the first non-finite one.

    Terms are checked in the order of :meth:`sslray.methods.Method.check_finite`: every ``loss/<term>`` first,
    then the total (reported as ``total``), so a NaN term is named rather than the sum it spoils.
    """

    def __init__(self):
        self.names: list[str] | None = None
        self.first: torch.Tensor | None = None  # long scalar: first bad iteration, -1 while all are finite
        self.term = self.value = None  # long / float scalars: index into names, and the value there

    def watch(self, losses: dict[str, torch.Tensor], iteration: int) -> None:
        keys = [k for k in losses if k != "loss"] + ["loss"]
        if self.names is not None and keys != self.names:  # another set of terms: settle the old one first
            self.check()
            self.names = None
        vals = torch.stack([torch.as_tensor(losses[k]).detach().float().reshape(()) for k in keys])
        if self.names is None:
            self.names = keys
            self.first = torch.full((), -1, dtype=torch.long, device=vals.device)
            self.term = torch.zeros((), dtype=torch.long, device=vals.device)
            self.value = torch.zeros((), dtype=torch.float32, device=vals.device)
        bad = ~torch.isfinite(vals)
        new = bad.any() & (self.first < 0)
        idx = bad.to(torch.uint8).argmax()  # the first non-finite term (argmax returns the first maximum)
        self.first = torch.where(new, iteration, self.first)
        self.term = torch.where(new, idx, self.term)
        self.value = torch.where(new, vals.gather(0, idx.reshape(1)).reshape(()), self.value)

    def check(self) -> None:
        """Read the flag back (one host sync); raise NonFiniteLossError for the first bad iteration seen."""
        if self.first is None:
            return
        first = int(self.first)
        if first >= 0:
            key = self.names[int(self.term)]
            raise NonFiniteLossError(first, "total" if key == "loss" else key.removeprefix("loss/"), float(self.value))


# The Python-level ways a tensor's value reaches the host: each is a device synchronisation on CUDA.
HOST_READS = ("item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__", "__index__")


@contextmanager
def count_host_reads() -> Iterator[Counter]:
    """Count calls of :data:`HOST_READS` on any tensor while the block runs (CPU's stand-in for
    ``torch.cuda.set_sync_debug_mode``). Reads inside C++ (a boolean-mask index's ``nonzero``) are not seen;
    ``benchmarks/gpu.py`` counts those on a device with the sync debug mode."""
    counts: Counter = Counter()
    originals = {n: getattr(torch.Tensor, n) for n in HOST_READS}

    def counting(name, fn):
        def wrapper(self, *args, **kwargs):
            counts[name] += 1
            return fn(self, *args, **kwargs)
        return wrapper

    for name, fn in originals.items():
        setattr(torch.Tensor, name, counting(name, fn))
    try:
        yield counts
    finally:
        for name, fn in originals.items():
            setattr(torch.Tensor, name, fn)


# ---------------------------------------------------------------------------------------------------- settings

@dataclass(frozen=True)
class Settings:
    """The throughput settings resolved for one device (what ``auto`` became)."""

    amp_dtype: torch.dtype | None = None
    channels_last: bool = False
    optimizer_kwargs: dict[str, Any] = field(default_factory=dict)  # fused= / foreach= for torch.optim.SGD
    compile: bool = False
    cudnn_benchmark: bool = False

    def describe(self) -> dict[str, Any]:
        dtype = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.amp_dtype]
        impl = "fused" if self.optimizer_kwargs.get("fused") else (
            "foreach" if self.optimizer_kwargs.get("foreach") else "for_loop")
        return {"precision": dtype, "channels_last": self.channels_last, "optimizer_impl": impl,
                "compile": self.compile, "cudnn_benchmark": self.cudnn_benchmark}


def _on(value: str, device: torch.device) -> bool:
    return value == "on" or (value == "auto" and device.type == "cuda")


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """``train.amp``: none (fp32) | bf16 | fp16 (CUDA only) | auto (bf16 on a CUDA device that has it, else fp32)."""
    if amp == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else None
    if amp == "none":
        return None
    if amp == "fp16" and device.type != "cuda":
        raise ValueError("train.amp: fp16 autocast needs a CUDA device; use bf16 or none")
    return torch.bfloat16 if amp == "bf16" else torch.float16


def optimizer_kwargs(impl: str, device: torch.device) -> dict[str, Any]:
    """``run.optimizer_impl``: auto (fused on CUDA, foreach on CPU) | fused | foreach | for_loop."""
    if impl == "auto":
        impl = "fused" if device.type == "cuda" else "foreach"
    return {"fused": {"fused": True}, "foreach": {"foreach": True}, "for_loop": {"foreach": False}}[impl]


def resolve(cfg, device: torch.device) -> Settings:
    """The :class:`Settings` of a TrialConfig on ``device``."""
    run = cfg.run
    return Settings(amp_dtype=amp_dtype(cfg.train.amp, device), channels_last=_on(run.channels_last, device),
                    optimizer_kwargs=optimizer_kwargs(run.optimizer_impl, device), compile=run.compile == "on",
                    cudnn_benchmark=_on(run.cudnn_benchmark, device) and device.type == "cuda")


def apply_to_model(model: torch.nn.Module, settings: Settings) -> torch.nn.Module:
    """channels_last weights and cuDNN benchmark; returns the model (in place)."""
    if settings.cudnn_benchmark:
        torch.backends.cudnn.benchmark = True
    if settings.channels_last:
        model.to(memory_format=torch.channels_last)
    return model


# ------------------------------------------------------------------------------------------------- trial packing

# Peak training memory of a step is about (weights + grads + momentum) plus activations; activations dominate
# segmentation at crop >= 321 and are not a function of the parameter count, so the estimate is measured.
PARAM_STATE_FACTOR = 4  # fp32 weights, grads, SGD momentum, and the EMA teacher / a bf16 copy: 4 x params x 4 B


def memory_estimate_mb(n_params: int, probe_peak_mb: float | None = None, headroom: float = 1.1) -> float:
    """A trial's GPU memory: the peak of a measured probe step (``torch.cuda.max_memory_allocated`` after one
    training step at the trial's batch and crop) when there is one, else ``PARAM_STATE_FACTOR x params x 4 B``
    (a lower bound that ignores activations); times ``headroom`` for the allocator's fragmentation."""
    base = probe_peak_mb if probe_peak_mb is not None else PARAM_STATE_FACTOR * n_params * 4 / 2**20
    return base * headroom


class DoesNotFit(MemoryError):
    """A trial that would not fit its share of a GPU: deterministic, so it fails without a retry."""


def memory_check(need_mb: float, gpu_fraction: float, device_total_mb: float, what: str = "trial") -> None:
    """Refuse a trial whose estimate exceeds its share of the device (``gpu_fraction x device_total_mb``) with
    the numbers; a fraction of 1 or more (a whole GPU per worker) is checked against the whole device."""
    share = min(gpu_fraction, 1.0) * device_total_mb
    if need_mb > share:
        per_gpu = max(1, math.floor(device_total_mb / need_mb)) if need_mb <= device_total_mb else 0
        hint = f"; at most {per_gpu} such trials fit one GPU" if per_gpu else "; it does not fit one whole GPU"
        raise DoesNotFit(f"resources.gpus_per_worker: {what} needs ~{need_mb:.0f} MiB but its share "
                          f"{gpu_fraction:g} x {device_total_mb:.0f} MiB = {share:.0f} MiB{hint}")


class MemoryGuard:
    """A trial's share of a GPU (``run.gpu_memory_fraction``, set from ``resources.gpus_per_worker < 1`` by the Ray
    adapter; 0 = the whole device, no checks). :meth:`start` refuses a model whose parameter-state lower bound
    already exceeds the share and caps this process's allocator at the share
    (``torch.cuda.set_per_process_memory_fraction``) so a packed trial cannot take its neighbours' memory;
    :meth:`probing` wraps the first step (the measured probe): an out-of-memory there, or a peak that leaves less
    than the headroom, refuses the trial with the numbers before it trains on."""

    def __init__(self, fraction: float, device: torch.device):
        self.active = fraction > 0 and device.type == "cuda"
        self.fraction, self.device = fraction, device
        self.total_mb = torch.cuda.get_device_properties(device).total_memory / 2**20 if self.active else 0.0

    def start(self, model: torch.nn.Module) -> None:
        if not self.active:
            return
        n_params = sum(p.numel() for p in model.parameters())
        memory_check(memory_estimate_mb(n_params), self.fraction, self.total_mb, "the model's weights and state")
        torch.cuda.set_per_process_memory_fraction(min(self.fraction, 1.0), self.device)

    @contextmanager
    def probing(self, first: bool) -> Iterator[None]:
        if not (self.active and first):
            yield
            return
        torch.cuda.reset_peak_memory_stats(self.device)
        try:
            yield
        except torch.OutOfMemoryError:
            peak = torch.cuda.max_memory_allocated(self.device) / 2**20
            raise DoesNotFit(f"resources.gpus_per_worker: the first training step ran out of memory at ~{peak:.0f} "
                             f"MiB of its share {self.fraction:g} x {self.total_mb:.0f} MiB") from None
        peak = torch.cuda.max_memory_allocated(self.device) / 2**20
        memory_check(memory_estimate_mb(0, probe_peak_mb=peak), self.fraction, self.total_mb,
                     "the trial (measured first step, +10 % headroom)")
