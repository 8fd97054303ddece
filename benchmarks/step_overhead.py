"""sslray's FixMatch training step against a hand-written plain-torch FixMatch step; prints JSON.

Both steps run on the same model, the same batch and the same optimizer, interleaved (A B A B ...) in one
process so that drift in machine load hits both equally; the ratio is median(sslray) / median(plain).
Target: ratio <= 1.05.

    python benchmarks/step_overhead.py                                  # small model, 64 px, CPU
    python benchmarks/step_overhead.py --model deeplabv3plus --backbone resnet101 --crop 321 \
        --bx 8 --bu 8 --amp bf16 --device cuda --repeats 30               # the GPU measurement
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sslray.config import TrialConfig  # noqa: E402
from sslray.methods import build_method  # noqa: E402
from sslray.models import build_model  # noqa: E402
from sslray.teacher_student import TeacherStudent  # noqa: E402


def make_batch(bx: int, bu: int, crop: int, k: int, device, seed: int = 0) -> tuple[dict, dict, dict]:
    g = torch.Generator().manual_seed(seed)

    def img(b):
        return torch.randn(b, 3, crop, crop, generator=g).to(device)

    def box(b):
        m = torch.zeros(b, crop, crop)
        m[:, crop // 4: crop // 2, crop // 3: 2 * crop // 3] = 1
        return m.to(device)

    mask_x = torch.randint(0, k, (bx, crop, crop), generator=g).to(device)
    ignore = torch.zeros(bu, crop, crop, dtype=torch.long, device=device)
    batch_x = {"img_x": img(bx), "mask_x": mask_x}
    batch_u = {"img_u_w": img(bu), "img_u_s1": img(bu), "img_u_s2": img(bu), "ignore_mask_u": ignore,
               "cutmix_box1": box(bu), "cutmix_box2": box(bu)}
    batch_mix = {"img_u_w": img(bu), "img_u_s1": img(bu), "img_u_s2": img(bu), "ignore_mask_u": ignore.clone()}
    return batch_x, batch_u, batch_mix


def plain_fixmatch_step(model, optimizer, bx, bu, bmix, thresh: float, amp_dtype) -> torch.Tensor:
    """FixMatch as UniMatch's fixmatch.py writes it, inline, no abstractions."""
    ctx = torch.autocast(bx["img_x"].device.type, dtype=amp_dtype) if amp_dtype else torch.autocast("cpu", enabled=False)
    criterion_l = nn.CrossEntropyLoss(ignore_index=255)
    criterion_u = nn.CrossEntropyLoss(reduction="none")
    img_x, mask_x = bx["img_x"], bx["mask_x"]
    img_u_w, img_u_s, ignore_mask, cutmix_box = bu["img_u_w"], bu["img_u_s1"], bu["ignore_mask_u"], bu["cutmix_box1"]
    with ctx:
        with torch.no_grad():
            model.eval()
            pred_u_w_mix = model(bmix["img_u_w"])["logits"].detach()
            conf_u_w_mix = pred_u_w_mix.softmax(dim=1).max(dim=1)[0]
            mask_u_w_mix = pred_u_w_mix.argmax(dim=1)
        img_u_s = img_u_s.clone()
        sel = cutmix_box.unsqueeze(1).expand(img_u_s.shape) == 1
        img_u_s[sel] = bmix["img_u_s1"][sel]
        model.train()
        num_lb, num_ulb = img_x.shape[0], img_u_w.shape[0]
        preds = model(torch.cat((img_x, img_u_w)))["logits"]
        pred_x, pred_u_w = preds.split([num_lb, num_ulb])
        pred_u_s = model(img_u_s)["logits"]
    pred_u_w = pred_u_w.detach().float()
    conf_u_w = pred_u_w.softmax(dim=1).max(dim=1)[0]
    mask_u_w = pred_u_w.argmax(dim=1)
    mask_u_w_cutmixed, conf_u_w_cutmixed, ignore_mask_cutmixed = mask_u_w.clone(), conf_u_w.clone(), ignore_mask.clone()
    mask_u_w_cutmixed[cutmix_box == 1] = mask_u_w_mix[cutmix_box == 1]
    conf_u_w_cutmixed[cutmix_box == 1] = conf_u_w_mix.float()[cutmix_box == 1]
    ignore_mask_cutmixed[cutmix_box == 1] = bmix["ignore_mask_u"][cutmix_box == 1]
    loss_x = criterion_l(pred_x.float(), mask_x)
    loss_u_s = criterion_u(pred_u_s.float(), mask_u_w_cutmixed)
    loss_u_s = loss_u_s * ((conf_u_w_cutmixed >= thresh) & (ignore_mask_cutmixed != 255))
    loss_u_s = loss_u_s.sum() / (ignore_mask_cutmixed != 255).sum().item()
    loss = (loss_x + loss_u_s) / 2.0
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss


def sslray_step(ts, method, optimizer, bx, bu, bmix) -> torch.Tensor:
    out = ts.step(bx, bu, bmix)
    losses = method.losses(out)
    if not torch.isfinite(losses["loss"]):  # the trainer's per-step check, included in the cost
        raise FloatingPointError("non-finite loss")
    optimizer.zero_grad(set_to_none=True)
    losses["loss"].backward()
    optimizer.step()
    ts.after_optimizer_step()
    return losses["loss"]


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_args(p: argparse.ArgumentParser, classes: int, repeats: int, warmup: int, threads: int) -> None:
    """The model, batch, device and repetition options shared by the step benchmarks."""
    p.add_argument("--model", default="small")
    p.add_argument("--backbone", default="resnet50")
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--crop", type=int, default=64)
    p.add_argument("--bx", type=int, default=8)
    p.add_argument("--bu", type=int, default=8)
    p.add_argument("--classes", type=int, default=classes)
    p.add_argument("--amp", default="none", choices=["none", "bf16", "fp16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=repeats)
    p.add_argument("--warmup", type=int, default=warmup)
    p.add_argument("--threads", type=int, default=threads, help="torch threads (0: torch's default)")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    step_args(p, classes=4, repeats=40, warmup=5, threads=0)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cfg = TrialConfig.from_dict({"model": {"name": args.model, "backbone": args.backbone, "width": args.width},
                                 "method": {"name": "fixmatch"}})
    torch.manual_seed(0)
    model = build_model(cfg.model, args.classes).to(device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4)
    amp_dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.amp]
    method = build_method(cfg.method, args.classes)
    ts = TeacherStudent(model, cfg.method, method.needs, amp_dtype=amp_dtype)
    bx, bu, bmix = make_batch(args.bx, args.bu, args.crop, args.classes, device)
    thresh = cfg.method.conf_thresh

    runs = {"sslray": lambda: sslray_step(ts, method, optimizer, bx, bu, bmix),
            "plain": lambda: plain_fixmatch_step(model, optimizer, bx, bu, bmix, thresh, amp_dtype)}
    times: dict[str, list[float]] = {k: [] for k in runs}
    for i in range(args.warmup + args.repeats):
        order = list(runs) if i % 2 == 0 else list(reversed(runs))
        for name in order:
            _sync(device)
            t0 = time.perf_counter()
            runs[name]()
            _sync(device)
            if i >= args.warmup:
                times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    images = args.bx + args.bu
    result = {
        "benchmark": "step_overhead",
        "model": args.model if args.model == "small" else f"{args.model}-{args.backbone}",
        "crop": args.crop, "batch_x": args.bx, "batch_u": args.bu, "amp": args.amp,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "threads": torch.get_num_threads(), "repeats": args.repeats,
        "sslray_step_s": med["sslray"], "plain_step_s": med["plain"],
        "ratio": med["sslray"] / med["plain"],
        "sslray_images_per_s": images / med["sslray"], "plain_images_per_s": images / med["plain"],
        "sslray_step_s_iqr": _iqr(times["sslray"]), "plain_step_s_iqr": _iqr(times["plain"]),
        "peak_mem_mb": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
    }
    print(json.dumps(result, indent=2))
    return result


def _iqr(xs: list[float]) -> list[float]:
    q = statistics.quantiles(xs, n=4)
    return [q[0], q[2]]


if __name__ == "__main__":
    main()
