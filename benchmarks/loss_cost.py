"""What each founding method's terms cost on top of the UniMatch step (same model, same batch); prints JSON.

Every method runs as ``unimatch`` plus its own terms (``unimatch+ipixmatch``, ``unimatch+pcr`` ...), so the
difference to plain ``unimatch`` is exactly its terms, heads and state updates. Step times are measured
interleaved (every method once per round, order rotating) in one process, so load drift hits all alike; on
the CPU the ratio uses the process CPU time of one torch thread (robust to other jobs on the machine);
peak memory is measured per method in a fresh subprocess (CUDA: max_memory_allocated; CPU: the growth of
the process's max RSS over the model and data set-up, which is what the method's tensors add).
Targets (issue 4): <= 15 % extra step time for IPixMatch, PCR and GuidedMix, <= 30 % for MLLC.

The ``large_crop`` section runs one step of each pairwise/graph form at a large crop (default 801,
DeepLabV3+ stride-4 map 201 x 201 = 40,401 pixels) and reports the node count each form actually used
against its bound (``max_nodes`` / ``graph_max_nodes``) and the peak memory.

    python benchmarks/loss_cost.py                                    # small model, 64 px, 8 + 8, CPU
    python benchmarks/loss_cost.py --model deeplabv3plus --backbone resnet101 --crop 321 --device cuda --amp bf16
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sslray.config import TrialConfig  # noqa: E402
from sslray.methods import build_method  # noqa: E402
from sslray.models import build_model  # noqa: E402
from sslray.teacher_student import TeacherStudent  # noqa: E402

from step_overhead import _iqr, _sync, make_batch, step_args  # noqa: E402

BASE = "unimatch"
METHODS = ["unimatch", "unimatch+ipixmatch", "unimatch+guidedmix", "unimatch+pcr", "unimatch+mllc"]
TARGET = {"ipixmatch": 0.15, "guidedmix": 0.15, "pcr": 0.15, "mllc": 0.30}
# The pairwise / graph forms and the overrides that select them (checked against their node bounds).
LARGE_CROP = {
    "ipixmatch_pairwise_kl": ("unimatch+ipixmatch", ["method.terms.ipix_s1.relation=pairwise",
                                                     "method.terms.ipix_s2.relation=pairwise"]),
    "mllc_graph": ("unimatch+mllc", []),
}


class Setup:
    """One method's model, optimizer, method and step, from identical initial weights."""

    def __init__(self, name: str, args, overrides: list[str] = ()):
        self.device = torch.device(args.device)
        d = {"model": {"name": args.model, "backbone": args.backbone, "width": args.width},
             "method": {"name": name, "conf_thresh": args.conf_thresh},
             "train": {"iterations": 10_000}}
        self.cfg = TrialConfig.from_dict(d).with_overrides(list(overrides))
        torch.manual_seed(0)
        self.model = build_model(self.cfg.model, args.classes).to(self.device)
        self.method = build_method(self.cfg.method, args.classes, 255, self.model.feature_dims,
                                   self.cfg.train.iterations)
        self.method.modules.to(self.device)
        params = list(self.model.parameters()) + [p for p in self.method.modules.parameters() if p.requires_grad]
        if getattr(args, "optimizer", "sgd") == "adamw":  # UniMatch V2's (benchmarks/v2_step.py)
            self.optimizer = torch.optim.AdamW(params, lr=5e-6, betas=(0.9, 0.999), weight_decay=0.01)
        else:
            self.optimizer = torch.optim.SGD(params, lr=1e-3, momentum=0.9, weight_decay=1e-4)
        amp = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.amp]
        self.ts = TeacherStudent(self.model, self.cfg.method, self.method.needs, amp_dtype=amp,
                                 refine_teacher=self.method.refine_teacher if self.method.refines_teacher else None)
        self.batches = make_batch(args.bx, args.bu, args.crop, args.classes, self.device)
        self.iteration = args.start_iteration  # past any warm-up, so every term is active

    def step(self) -> dict:
        out = self.ts.step(*self.batches, iteration=self.iteration)
        losses = self.method.losses(out)
        if not torch.isfinite(losses["loss"]):
            raise FloatingPointError(f"non-finite loss: { {k: float(v) for k, v in losses.items()} }")
        self.optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        self.optimizer.step()
        self.ts.after_optimizer_step()
        self.method.after_step(out)
        self.iteration += 1
        return {k: float(v) for k, v in self.method.diagnostics().items()}


def _family(name: str) -> str:
    return name.split("+")[-1]


def measure_times(args) -> dict:
    base = args.base
    setups = {m: Setup(m, args, args.overrides if m != base else ()) for m in args.methods}
    times: dict[str, list[float]] = {m: [] for m in setups}
    cpu: dict[str, list[float]] = {m: [] for m in setups}
    names = list(setups)
    for i in range(args.warmup + args.repeats):
        order = names[i % len(names):] + names[: i % len(names)]
        for m in order:
            _sync(setups[m].device)
            t0, c0 = time.perf_counter(), time.process_time()
            setups[m].step()
            _sync(setups[m].device)
            if i >= args.warmup:
                times[m].append(time.perf_counter() - t0)
                cpu[m].append(time.process_time() - c0)
    med = {m: statistics.median(v) for m, v in times.items()}
    med_cpu = {m: statistics.median(v) for m, v in cpu.items()}
    # On a shared CPU with one torch thread, CPU time is what the step costs and wall time is what the machine
    # allowed; on a GPU only wall time means anything.
    key = med_cpu if setups[base].device.type == "cpu" else med
    rows = {}
    for m in names:
        row = {"step_s": med[m], "step_s_iqr": _iqr(times[m]), "step_cpu_s": med_cpu[m],
               "extra_time": key[m] / key[base] - 1.0}
        if m != base:
            row["target_extra"] = TARGET.get(_family(m))
            row["within_target"] = row["target_extra"] is None or row["extra_time"] <= row["target_extra"]
        rows[m] = row
    return rows


def measure_memory(args, method: str, overrides: list[str], crop: int, bx: int, bu: int) -> dict:
    """Peak memory of a few steps of one method, in a fresh process."""
    cmd = [sys.executable, __file__, "--part", "mem", "--methods", method, "--crop", str(crop), "--bx", str(bx),
           "--bu", str(bu), "--model", args.model, "--backbone", args.backbone, "--width", str(args.width),
           "--device", args.device, "--amp", args.amp, "--classes", str(args.classes),
           "--conf-thresh", str(args.conf_thresh), "--start-iteration", str(args.start_iteration),
           "--threads", str(torch.get_num_threads()), "--mem-steps", str(args.mem_steps),
           "--optimizer", getattr(args, "optimizer", "sgd")]
    for o in overrides:
        cmd += ["--set", o]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
    return json.loads(proc.stdout)


def _peak_rss_kb() -> int:
    """This process's peak resident set in KiB: Linux's VmHWM, which starts afresh at exec. ``ru_maxrss`` does not:
    a child spawned by a parent holding several models reports at least the parent's RSS at fork."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _mem_child(args) -> dict:
    setup = Setup(args.methods[0], args, args.overrides)
    device = setup.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.max_memory_allocated(device)
    else:
        before = _peak_rss_kb()
    diag = {}
    for _ in range(args.mem_steps):
        diag = setup.step()
    _sync(device)
    if device.type == "cuda":
        peak_mb, extra_mb = torch.cuda.max_memory_allocated(device) / 2**20, (
            torch.cuda.max_memory_allocated(device) - before) / 2**20
    else:
        rss = _peak_rss_kb()
        peak_mb, extra_mb = rss / 1024, (rss - before) / 1024
    return {"peak_mb": peak_mb, "step_growth_mb": extra_mb, "diagnostics": diag}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    step_args(p, classes=3, repeats=20, warmup=3, threads=1)
    p.add_argument("--conf-thresh", type=float, default=0.5, help="so that confidence masks are not empty early")
    p.add_argument("--methods", nargs="+", default=METHODS)
    p.add_argument("--start-iteration", type=int, default=5_000, help="iteration of the first step (past warm-ups)")
    p.add_argument("--large-crop", type=int, default=801, help="crop of the node-bound check (0: skip)")
    p.add_argument("--large-model", default="deeplabv3plus", help="model of the node-bound check")
    p.add_argument("--large-backbone", default="resnet18")
    p.add_argument("--mem-steps", type=int, default=2)
    p.add_argument("--large-steps", type=int, default=1, help="steps of the large-crop check")
    p.add_argument("--part", default="all", choices=["all", "mem"], help=argparse.SUPPRESS)
    p.add_argument("--optimizer", default="sgd", choices=["sgd", "adamw"])
    p.add_argument("--base", default=BASE, help="the reference method of extra_time (benchmarks/v2_step.py: unimatch_v2)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a dotted key of every method but the base (e.g. "
                        "method.terms.mllc_x.graph_max_nodes=256)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.part == "mem":
        print(json.dumps(_mem_child(args)))
        return {}

    device = torch.device(args.device)
    result = {
        "benchmark": "loss_cost", "base": args.base,
        "model": args.model if args.model == "small" else f"{args.model}-{args.backbone}",
        "crop": args.crop, "batch_x": args.bx, "batch_u": args.bu, "amp": args.amp,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "threads": torch.get_num_threads(), "repeats": args.repeats,
        "methods": measure_times(args),
    }
    base_mem = None
    for m in args.methods:
        mem = measure_memory(args, m, args.overrides if m != args.base else [], args.crop, args.bx, args.bu)
        result["methods"][m]["memory"] = mem
        if m == args.base:
            base_mem = mem.get("peak_mb")
        elif base_mem and "peak_mb" in mem:
            result["methods"][m]["extra_peak_mb"] = mem["peak_mb"] - base_mem
    if args.large_crop:
        large = argparse.Namespace(**{**vars(args), "model": args.large_model, "backbone": args.large_backbone,
                                      "mem_steps": args.large_steps})
        result["large_crop"] = {"crop": args.large_crop, "model": f"{args.large_model}-{args.large_backbone}",
                                "batch_x": 1, "batch_u": 2}
        base = measure_memory(large, BASE, [], args.large_crop, 1, 2)
        result["large_crop"][BASE] = base
        for form, (method, overrides) in LARGE_CROP.items():
            mem = measure_memory(large, method, overrides, args.large_crop, 1, 2)
            if "peak_mb" in mem and "peak_mb" in base:
                mem["extra_peak_mb"] = mem["peak_mb"] - base["peak_mb"]
            result["large_crop"][form] = mem
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
