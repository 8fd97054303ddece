"""The device script: sslray's UniMatch step with each throughput setting on and off, MFU, and the data paths; JSON.

    python benchmarks/gpu.py                        # on a GPU machine: DeepLabV3+ R-101, crop 321, 8 + 8 (the paper's)
    python benchmarks/gpu.py --model dpt            # the ViT model, once model.name: dpt is registered
    python benchmarks/gpu.py --device cpu           # smoke mode: tiny sizes, no compile (what the test runs)

What it measures, in one process, each variant on a fresh model with the same random batch (21 classes, UniMatch's
``unimatch`` preset, ``mix_source: batch``), through the trainer's own step (:func:`sslray.trainer._train_step`:
the method's losses, the device-side finite guard, backward, optimizer step, the meters):

* ``fp32_eager``: fp32, NCHW, torch's default optimizer (foreach on CUDA), no compile, no cuDNN benchmark -- what
  UniMatch's official code runs; the denominator of every ``speedup``.
* each setting alone on top of it (``bf16``, ``channels_last``, ``fused_optimizer``, ``cudnn_benchmark``), the
  resolved ``auto`` default of this device, and ``auto`` minus each setting; ``auto+compile`` with its compile time
  and the steps it needs to pay that back (``--no-compile`` skips it; off by default on CPU).
* per variant: ms/step (mean over ``--steps`` after ``--warmup``, one sync at the end), images/s (labeled +
  unlabeled images per step, the trainer's convention), peak memory (``torch.cuda.max_memory_allocated``), MFU
  (FLOPs of one step counted by ``torch.utils.flop_counter`` / step time / the device's dense bf16 peak from
  :data:`BF16_PEAK`; null when the device is not in the table).
* host syncs per step of the ``auto`` variant: ``torch.cuda.set_sync_debug_mode("warn")`` on CUDA (every sync,
  C++ ones included), the Python-level reads of :func:`sslray.throughput.count_host_reads` on CPU.
* data at crop 801 (Cityscapes-sized PNG fixtures from ``benchmarks/data_throughput.py``): unlabeled samples/s of
  one loader worker with the strong views in the loader, and with ``data.augment_on: device`` (the worker's
  remaining part, and the device's strong views per sample).

The whole run is kept under ``--budget-s`` (default 270 s): variants left when it is spent are listed as skipped.
The JSON goes to ``benchmarks/results/gpu_<device name>.json`` (``--out`` to change).
"""
from __future__ import annotations

import argparse
import json
import platform
import re
import sys
import tempfile
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from data_throughput import device_aug, time_items, write_cityscapes  # noqa: E402
from step_overhead import make_batch  # noqa: E402

from sslray import trainer  # noqa: E402
from sslray.config import DataConfig, TrialConfig  # noqa: E402
from sslray.data.datasets import build_data  # noqa: E402
from sslray.models import list_models  # noqa: E402
from sslray.throughput import FiniteGuard, count_host_reads  # noqa: E402

# Dense (no sparsity) bf16 tensor-core peaks in FLOP/s, from the vendors' datasheets; the first substring of the
# device name that matches wins, so the more specific names come first.
BF16_PEAK = [("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("GH200", 989e12), ("H200", 989e12), ("H100", 989e12),
             ("H800", 989e12), ("B200", 2250e12), ("B100", 1750e12), ("A100", 312e12), ("A800", 312e12),
             ("L40S", 362e12), ("L40", 181e12), ("L4", 121e12), ("RTX 4090", 165e12)]

BASE = {"train.amp": "none", "run.channels_last": "off", "run.optimizer_impl": "foreach", "run.compile": "off",
        "run.cudnn_benchmark": "off"}
SETTINGS = {"bf16": ("train.amp", "bf16"), "channels_last": ("run.channels_last", "on"),
            "fused_optimizer": ("run.optimizer_impl", "fused"), "cudnn_benchmark": ("run.cudnn_benchmark", "on")}
AUTO = {"train.amp": "auto", "run.channels_last": "auto", "run.optimizer_impl": "auto", "run.cudnn_benchmark": "auto"}


def variants(with_compile: bool) -> dict[str, dict]:
    out = {"fp32_eager": {}}
    out.update({name: {key: value} for name, (key, value) in SETTINGS.items()})
    out["auto"] = dict(AUTO)
    for name, (key, _) in SETTINGS.items():
        out[f"auto-{name}"] = {**AUTO, key: BASE[key]}
    if with_compile:
        out["auto+compile"] = {**AUTO, "run.compile": "on"}
    return out


def peak_flops(name: str) -> float | None:
    return next((peak for key, peak in BF16_PEAK if key in name), None)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def base_config(args) -> TrialConfig:
    model = {"name": args.model, "backbone": args.backbone, "width": args.width}
    return TrialConfig.from_dict({
        "method": {"name": "unimatch"}, "model": model, "optim": {"lr": 0.001},
        "data": {"batch_size_x": args.bx, "batch_size_u": args.bu, "crop_size": args.crop},
        "train": {"iterations": 10 ** 6}, "run": {"device": str(args.device), "progress": "off"}})


class Step:
    """One variant's model, method and optimizer (built by the trainer's own ``_build``) and its step."""

    def __init__(self, cfg: TrialConfig, device: torch.device, classes: int, batches):
        torch.backends.cudnn.benchmark = False  # global: each variant sets it again if it asks
        data = SimpleNamespace(num_classes=classes, ignore_index=255)
        self.parts = trainer._build(cfg, trainer.Runtime(device=device), tempfile.mkdtemp(), data=data)
        cl = self.parts.settings.channels_last
        self.batches = tuple(trainer._to(b, device, cl) for b in batches)
        self.guard, self.meter, self.it, self.device = FiniteGuard(), trainer._Meter(), 0, device

    def __call__(self) -> None:
        trainer._set_lr(self.parts.optimizer, self.parts.cfg, self.it)
        trainer._train_step(self.parts, self.batches, self.it, self.guard, self.meter)
        self.it += 1

    def timed(self, steps: int) -> float:
        """Mean seconds per step over ``steps`` (one sync at the end, as in training)."""
        _sync(self.device)
        t = time.perf_counter()
        for _ in range(steps):
            self()
        _sync(self.device)
        self.guard.check()
        return (time.perf_counter() - t) / steps


def count_flops(step: Step) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step()
    return float(counter.get_total_flops())


def host_syncs(step: Step, steps: int = 3) -> dict:
    if step.device.type == "cuda":
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                for _ in range(steps):
                    step()
                _sync(step.device)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        n = sum("synchroniz" in str(w.message) for w in caught)
        return {"per_step": n / steps, "how": "torch.cuda.set_sync_debug_mode(warn)"}
    with count_host_reads() as counts:
        for _ in range(steps):
            step()
    return {"per_step": sum(counts.values()) / steps, "how": "count_host_reads (Python-level reads only)"}


def measure(name: str, over: dict, args, batches, flops: float | None, peak: float | None) -> dict:
    cfg = base_config(args).replace(**{**BASE, **over})
    device = args.device
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    step = Step(cfg, device, args.classes, batches)
    step()  # the first step: cuDNN autotuning, compilation
    _sync(device)
    first_s = time.perf_counter() - t0
    for _ in range(args.warmup - 1):
        step()
    step_s = step.timed(args.steps)
    images = args.bx + args.bu
    out = {"settings": step.parts.settings.describe(), "ms_per_step": round(step_s * 1e3, 2),
           "images_per_s": round(images / step_s, 2), "first_step_s": round(first_s, 2),
           "peak_mem_mb": round(torch.cuda.max_memory_allocated(device) / 2**20, 1) if device.type == "cuda"
           else None,
           "mfu": round(flops / step_s / peak, 4) if flops and peak else None}
    if name == "auto":
        out["host_syncs"] = host_syncs(step)
    return out


def data_paths(args) -> dict:
    """Unlabeled samples/s at crop 801: strong views in the loader vs on ``args.device``."""
    with tempfile.TemporaryDirectory(prefix="sslray-gpu-data-") as tmp:
        root = Path(tmp) / "cityscapes"
        write_cityscapes(root, args.data_images, np.random.default_rng(0))
        cfg = DataConfig(dataset="cityscapes", root=str(root), partition="1_2", batch_size_u=args.bu)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            data = build_data(cfg)
        n = len(data.unlabeled)
        loader = time_items(data.unlabeled, n, args.data_samples)
        dev = device_aug(cfg, n, args.data_samples, min(args.bu, args.data_samples), str(args.device))
    return {"crop": data.crop_size, "loader_path": loader, "device_path": dev,
            "note": "samples/s per loader worker: CPU seconds of one process; device part: wall seconds"}


def parse(argv) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto", help="auto | cuda | cuda:N | cpu (cpu: smoke sizes)")
    p.add_argument("--model", default=None, help="deeplabv3plus (default) | dpt (when registered) | small")
    p.add_argument("--backbone", default=None)
    p.add_argument("--width", type=int, default=8, help="small model only")
    p.add_argument("--crop", type=int, default=None)
    p.add_argument("--bx", type=int, default=None)
    p.add_argument("--bu", type=int, default=None)
    p.add_argument("--classes", type=int, default=21)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--data-images", type=int, default=None)
    p.add_argument("--data-samples", type=int, default=None)
    p.add_argument("--budget-s", type=float, default=270.0)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    dev = args.device
    args.device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if dev == "auto" else dev)
    smoke = args.device.type == "cpu"
    dpt = args.model == "dpt"
    vit = "dinov2_tiny" if smoke else "dinov2_base"
    defaults = {"model": "small" if smoke else "deeplabv3plus", "backbone": vit if dpt else "resnet101",
                "crop": (28 if dpt else 32) if smoke else (518 if dpt else 321), "bx": 2 if smoke else 8, "bu": 2 if smoke else 8,
                "steps": 2 if smoke else 15, "warmup": 1 if smoke else 3, "data_images": 2 if smoke else 8,
                "data_samples": 2 if smoke else 16}
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.no_compile = args.no_compile or smoke
    args.smoke = smoke
    if args.model not in list_models():
        p.error(f"--model {args.model}: not registered here (models: {', '.join(list_models())}); "
                f"dpt arrives with UniMatch V2")
    return args


def main(argv=None) -> dict:
    args = parse(argv)
    t_start = time.perf_counter()
    device = args.device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = peak_flops(name)
    batches = make_batch(args.bx, args.bu, args.crop, args.classes, device)
    flops = count_flops(Step(base_config(args).replace(**BASE), device, args.classes, batches))
    results, skipped = {}, []
    for vname, over in variants(not args.no_compile).items():
        if time.perf_counter() - t_start > args.budget_s:
            skipped.append(vname)
            continue
        try:  # one failing variant (a compile error, out of memory) must not cost the device run the others
            results[vname] = measure(vname, over, args, batches, flops, peak)
        except Exception as e:  # noqa: BLE001 - recorded in the JSON, the run goes on
            results[vname] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
    base = results["fp32_eager"]["ms_per_step"]
    for r in results.values():
        if "ms_per_step" in r:
            r["speedup_vs_fp32_eager"] = round(base / r["ms_per_step"], 3)
    if "ms_per_step" in results.get("auto+compile", {}):
        r, gain = results["auto+compile"], results["auto"]["ms_per_step"] - results["auto+compile"]["ms_per_step"]
        r["compile_pays_back_after_steps"] = round(r["first_step_s"] * 1e3 / gain) if gain > 0 else None
    out = {"benchmark": "gpu", "device": name, "smoke": args.smoke, "bf16_peak_flops": peak,
           "step": {"method": "unimatch", "model": args.model, "backbone": args.backbone, "crop": args.crop,
                    "bx": args.bx, "bu": args.bu, "classes": args.classes, "steps": args.steps,
                    "warmup": args.warmup, "flops_per_step": flops},
           "variants": results, "skipped_for_budget": skipped,
           "data": data_paths(args) if time.perf_counter() - t_start < args.budget_s else "skipped for budget",
           "machine": {"torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
                       "threads": torch.get_num_threads()},
           "wall_s": round(time.perf_counter() - t_start, 1)}
    slug = re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_") + ("_smoke" if args.smoke else "")
    path = Path(args.out or ROOT / "benchmarks" / "results" / f"gpu_{slug}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
