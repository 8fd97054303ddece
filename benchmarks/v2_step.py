"""UniMatch V2's step on a DINOv2 DPT, and what each founding method adds to it; prints JSON.

The step is the trainer's (``TeacherStudent.step`` + losses + backward + AdamW + EMA update) for ``unimatch_v2`` and
``unimatch_v2+X`` on the same model and batch, timed interleaved and with peak memory per method in a fresh process
by ``benchmarks/loss_cost.py``'s machinery (base ``unimatch_v2``). On the CPU the extra cost uses the process CPU
time of one torch thread. It also confirms that attention runs through ``F.scaled_dot_product_attention``: it
counts the calls during one student forward (one per ViT block) and reports timm's ``fused_attn`` flags.

    python benchmarks/v2_step.py                     # ViT-S (dinov2_small), crop 98 (7 x 7 patches), 4 + 4, CPU
    python benchmarks/v2_step.py --device cuda --amp bf16 --crop 518 --backbone dinov2_base

The GPU figures the issue asks for (ViT-S / ViT-B at 518, bf16, images/s, MFU) need a device; none was lent to the
task that wrote this, so the JSON says "not measured on GPU".
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import loss_cost  # noqa: E402
from sslray.config import ModelConfig  # noqa: E402
from sslray.models import build_model  # noqa: E402

METHODS = ["unimatch_v2", "unimatch_v2+ipixmatch", "unimatch_v2+guidedmix", "unimatch_v2+pcr", "unimatch_v2+mllc"]
OUT = Path(__file__).resolve().parent / "results"


def sdpa_check(backbone: str, crop: int, device: torch.device) -> dict:
    """Count F.scaled_dot_product_attention calls in one forward of the DPT (the real function, wrapped)."""
    model = build_model(ModelConfig(name="dpt", backbone=backbone), 3).to(device).eval()
    calls = []
    real = F.scaled_dot_product_attention

    def counting(*a, **kw):
        calls.append(tuple(a[0].shape))
        return real(*a, **kw)

    F.scaled_dot_product_attention = counting
    try:
        with torch.no_grad():
            model(torch.randn(1, 3, crop, crop, device=device))
    finally:
        F.scaled_dot_product_attention = real
    return {"fused_attn_all_blocks": model.uses_sdpa, "blocks": len(model.encoder.blocks),
            "sdpa_calls_per_forward": len(calls), "q_shape": list(calls[0]) if calls else None,
            "uses_sdpa": model.uses_sdpa and len(calls) == len(model.encoder.blocks)}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="dinov2_small")
    p.add_argument("--crop", type=int, default=98)
    p.add_argument("--bx", type=int, default=4)
    p.add_argument("--bu", type=int, default=4)
    p.add_argument("--device", default="cpu")
    p.add_argument("--amp", default="none", choices=["none", "bf16"])
    p.add_argument("--repeats", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--methods", nargs="+", default=METHODS)
    p.add_argument("--out", default=None, help="JSON file (default benchmarks/results/v2_step_<device>_<backbone>.json)")
    args = p.parse_args(argv)
    lc = ["--model", "dpt", "--backbone", args.backbone, "--crop", str(args.crop), "--bx", str(args.bx),
          "--bu", str(args.bu), "--device", args.device, "--amp", args.amp, "--repeats", str(args.repeats),
          "--warmup", str(args.warmup), "--threads", str(args.threads), "--large-crop", "0",
          "--optimizer", "adamw", "--base", "unimatch_v2", "--methods", *args.methods]
    with contextlib.redirect_stdout(io.StringIO()):  # loss_cost prints its own table; this prints the V2 one
        table = loss_cost.main(lc)
    device = torch.device(args.device)
    base = table["methods"]["unimatch_v2"]
    result = {
        "benchmark": "v2_step", "base": "unimatch_v2", "model": f"dpt-{args.backbone}", "crop": args.crop,
        "batch_x": args.bx, "batch_u": args.bu, "amp": args.amp, "device": table["device"] or args.device,
        "threads": table["threads"], "repeats": args.repeats, "optimizer": "adamw",
        "sdpa": sdpa_check(args.backbone, args.crop, device),
        "unimatch_v2_step_s": base["step_s"], "unimatch_v2_step_cpu_s": base["step_cpu_s"],
        "unimatch_v2_peak_mb": base.get("memory", {}).get("peak_mb"),
        "images_per_s": (args.bx + args.bu) / base["step_s"],
        "methods": table["methods"],
        "note": "extra_time: each method's step over unimatch_v2's (CPU time of one thread on the CPU); "
                "target_extra: issue 4's targets, set for UniMatch V1's step",
        "gpu": "not measured on GPU (no device lent to this task): ViT-S / ViT-B at 518, bf16, images/s and MFU open",
    }
    out = Path(args.out) if args.out else OUT / f"v2_step_{device.type}_{args.backbone}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
