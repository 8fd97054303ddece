"""The ``sslray`` command line.

    sslray train [CONFIG.yaml] [--set key=value ...] [--out DIR] [--resume]
    sslray validate CONFIG.yaml ...
    sslray list {methods,terms,datasets,models}

Errors in inputs are one line naming the file and the dotted key, exit code 2; a failed trial (NaN loss,
missing data) is one line too, exit code 1, with whatever was already written (splits, checkpoints) kept.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

from sslray.config import ConfigError, TrialConfig

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sslray",
        description="Semi-supervised semantic segmentation studies: train one trial, validate configs.",
        epilog="Run 'sslray COMMAND --help' for a command's options. Docs: README.md.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    t = sub.add_parser(
        "train", help="run one trial without Ray (also under torchrun for DDP)",
        description="Run one trial: trains, evaluates every train.eval_every iterations, writes checkpoints, "
                    "splits and summary.json under the output directory, and prints the metrics. "
                    "Without CONFIG it trains the defaults (supervised, small model, synthetic dataset).",
        epilog="Example: sslray train configs/synthetic_fixmatch.yaml --set train.iterations=500 --set seed=1\n"
               "DDP:     torchrun --nproc-per-node 2 -m sslray train configs/synthetic_fixmatch.yaml",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    t.add_argument("config", nargs="?", help="trial config YAML (keys: name, seed, data, model, optim, method, "
                                             "train, run); omitted: all defaults")
    t.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a dotted key, e.g. --set method.terms.u_fp.weight=0.3 (repeatable)")
    t.add_argument("--out", help="output directory (default: run.out_dir or runs/<name>-<trial id>)")
    t.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint if it exists")
    t.add_argument("--quiet", action="store_true", help="print only the final summary")

    v = sub.add_parser("validate", help="check trial config files without running anything",
                       description="Parse and validate each file; print one line per file; exit 2 if any is wrong.")
    v.add_argument("files", nargs="+")

    ls = sub.add_parser("list", help="list registered methods, loss terms, datasets or models")
    ls.add_argument("what", choices=["methods", "terms", "datasets", "models"])
    return p


def _load_config(path: str | None, overrides: list[str]) -> TrialConfig:
    if path is None:
        return TrialConfig().with_overrides(overrides)
    return TrialConfig.from_yaml(path, overrides)


def _init_distributed() -> bool:
    """torchrun sets RANK/WORLD_SIZE: join the group (nccl on GPU, gloo on CPU), like nanoGPT's ``ddp`` flag."""
    import torch
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return False
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend=backend)
    return True


def _write_json(path: str, obj: Any) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=str)
    os.replace(tmp, path)


def _fmt_report(m: dict, total: int) -> str:
    parts = [f"[{m['iteration']:>{len(str(total))}}/{total}]", f"loss {m.get('train/loss', float('nan')):.4f}"]
    for k in ("train/mask_ratio", "train/pseudo_acc"):
        if k in m:
            parts.append(f"{k.split('/')[1]} {m[k]:.3f}")
    parts += [f"miou {m['val/miou']:.2f}", f"(best {m['best/val/miou']:.2f})", f"{m['time/step_s']:.3f} s/it"]
    return "  ".join(parts)


def cmd_train(args: argparse.Namespace) -> int:
    cfg = _load_config(args.config, args.overrides)
    if args.out:
        cfg = cfg.with_overrides([f"run.out_dir={args.out}"])
    from sslray.methods import NonFiniteLossError
    from sslray.trainer import Runtime, default_out_dir, fit

    distributed = _init_distributed()
    runtime = Runtime.detect(cfg.run.device)
    out_dir = default_out_dir(cfg)
    if runtime.is_main:
        os.makedirs(out_dir, exist_ok=True)
        print(f"sslray train: trial {cfg.short_id()} ({cfg.method.name}, {cfg.data.dataset} "
              f"partition {cfg.data.partition}, seed {cfg.seed}) -> {out_dir}", flush=True)
    history_path = os.path.join(out_dir, "metrics.jsonl")

    def reporter(metrics: dict, checkpoint: str | None) -> None:
        with open(history_path, "a", encoding="utf-8") as f:
            f.write(json.dumps({k: v for k, v in metrics.items() if k != "val/confusion"}) + "\n")
        if not args.quiet:
            print(_fmt_report(metrics, cfg.train.iterations), flush=True)

    t0 = time.time()
    summary: dict[str, Any] = {"trial_id": cfg.trial_id(), "name": cfg.name, "config": cfg.to_dict(),
                               "device": str(runtime.device), "world_size": runtime.world_size}
    try:
        metrics = fit(cfg, runtime, reporter, resume_from="auto" if args.resume else None, out_dir=out_dir)
    except NonFiniteLossError as e:
        summary.update(status="failed", reason=str(e), wall_s=time.time() - t0)
        if runtime.is_main:
            _write_json(os.path.join(out_dir, "summary.json"), summary)
        print(f"sslray train: failed: {e}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        if distributed:
            import torch.distributed as dist

            dist.destroy_process_group()
    history = metrics.pop("history", [])
    summary.update(status="ok", metrics=metrics, history=history, wall_s=time.time() - t0)
    if runtime.is_main:
        _write_json(os.path.join(out_dir, "summary.json"), summary)
        ious = {k.split("/", 2)[2]: v for k, v in metrics.items() if k.startswith("val/iou/")}
        print(f"final: miou {metrics['val/miou']:.2f}  best {metrics['best/val/miou']:.2f} "
              f"@ {metrics['best/iteration']}  wall {summary['wall_s']:.1f}s")
        print("per-class IoU: " + "  ".join(f"{k} {v:.1f}" for k, v in ious.items()))
        print(f"summary: {os.path.join(out_dir, 'summary.json')}")
    return EXIT_OK


def cmd_validate(args: argparse.Namespace) -> int:
    bad = 0
    for path in args.files:
        try:
            cfg = TrialConfig.from_yaml(path)
            print(f"{path}: ok (trial {cfg.short_id()}, method {cfg.method.name})")
        except ConfigError as e:
            print(f"sslray: error: {e}", file=sys.stderr)
            bad += 1
    return EXIT_USAGE if bad else EXIT_OK


def cmd_list(args: argparse.Namespace) -> int:
    import sslray
    from sslray.methods import TERMS

    if args.what == "terms":
        for name, term in TERMS.items():
            print(f"{name:8s} {term.doc}")
        return EXIT_OK
    items = {"methods": sslray.list_methods, "datasets": sslray.list_datasets, "models": sslray.list_models}
    print("\n".join(items[args.what]()))
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    commands = {"train": cmd_train, "validate": cmd_validate, "list": cmd_list}
    try:
        return commands[args.command](args)
    except ConfigError as e:
        print(f"sslray: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except (FileNotFoundError, ValueError) as e:
        print(f"sslray: error: {e}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("sslray: interrupted; checkpoints and results written so far are kept", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
