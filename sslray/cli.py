"""The ``sslray`` command line.

    sslray run STUDY.yaml [--address auto] [--storage DIR] [--resume] [--set key=value ...] [--dry-run]
    sslray status STUDY.yaml              which cells are done, failed (why), started, missing
    sslray table STUDY.yaml [--format markdown|csv|latex]
    sslray train [CONFIG.yaml] [--set key=value ...] [--out DIR] [--resume]
    sslray validate FILE.yaml ...         study files and trial configs
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
        description="Semi-supervised semantic segmentation studies: run grids, ablations and Optuna searches on "
                    "Ray, train single trials, and print paper-style comparison tables.",
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

    r = sub.add_parser(
        "run", help="run a study (grid, ablation or Optuna search) on Ray and print its table",
        description="Run every trial of a study that is not stored yet, on a local Ray instance (default) or "
                    "an existing cluster (--address), one Parquet row per finished trial under the study's "
                    "storage, then print the comparison table. Re-running (or --resume) skips stored trials "
                    "and continues unfinished ones from their checkpoints.",
        epilog="Example: sslray run studies/quickstart.yaml\n"
               "         sslray run studies/voc_classic.yaml --address auto --storage /nfs/sslray\n"
               "         sslray run studies/smoke.yaml --dry-run",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    r.add_argument("study", help="study YAML file")
    r.add_argument("--address", help="Ray cluster address (auto, ray://host:10001, host:6379); default: start a "
                                     "local Ray instance")
    r.add_argument("--storage", help="results and checkpoints directory (default: the study's storage)")
    r.add_argument("--resume", action="store_true",
                   help="continue after a crash (same as a plain re-run: stored trials are never run twice)")
    r.add_argument("--retry-failed", action="store_true", help="run failed trials again")
    r.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a dotted key of the study's base config (repeatable)")
    r.add_argument("--dry-run", action="store_true", help="print the trial plan and exit")
    r.add_argument("--num-cpus", type=int, help="CPUs of the local Ray instance (default: all)")
    r.add_argument("--max-failures", type=int, default=2, help="retries of a trial whose worker died (default 2)")
    r.add_argument("--format", default="markdown", choices=["markdown", "csv", "latex"], help="table format")

    st = sub.add_parser("status", help="list a study's cells: done, failed (with reason), started, missing")
    st.add_argument("study")
    st.add_argument("--storage", help="default: the study's storage")

    tb = sub.add_parser("table", help="print a study's comparison table from its stored results",
                        description="Rows x columns from the study's report block (overridable), cells mean +- std "
                                    "over seeds with n, best per column marked, missing and failed cells shown.")
    tb.add_argument("study")
    tb.add_argument("--storage", help="default: the study's storage")
    tb.add_argument("--format", default="markdown", choices=["markdown", "csv", "latex"])
    tb.add_argument("--metric", help="default: report.metric (val/miou)")
    tb.add_argument("--rows", help="dotted config key or 'variant' (default: report.rows)")
    tb.add_argument("--cols", help="dotted config key or 'variant' (default: report.cols)")
    tb.add_argument("--baseline", help="row label to compute deltas against (default: report.baseline)")
    tb.add_argument("--agg", choices=["last", "best"], help="final or best evaluation (default: report.agg)")

    v = sub.add_parser("validate", help="check study files and trial configs without running anything",
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
        if not runtime.is_main:
            return
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


STUDY_KEYS = {"base", "grid", "ablation", "search", "seeds", "resources", "report", "storage"}


def _is_study(path: str) -> bool:
    from sslray.config import load_yaml

    d = load_yaml(path)
    return isinstance(d, dict) and bool(STUDY_KEYS & set(d))


def cmd_validate(args: argparse.Namespace) -> int:
    from sslray.study import load_study

    bad = 0
    for path in args.files:
        try:
            if _is_study(path):
                study = load_study(path)
                n = f"search of {study.search.num_samples} samples" if study.search else f"{len(study.trials())} trials"
                print(f"{path}: ok (study {study.name}, {n})")
            else:
                cfg = TrialConfig.from_yaml(path)
                print(f"{path}: ok (trial {cfg.short_id()}, method {cfg.method.name})")
        except ConfigError as e:
            print(f"sslray: error: {e}", file=sys.stderr)
            bad += 1
    return EXIT_USAGE if bad else EXIT_OK


def _print_plan(study, todo, skipped, storage: str) -> None:
    r = study.resources
    kind = f"Optuna search ({study.search.sampler}, {study.search.num_samples} samples)" if study.search else "grid"
    print(f"study {study.name}: {kind}; {len(todo)} to run, {len(skipped)} already stored in {storage}")
    print(f"resources per trial: {r.workers} worker(s) x {r.cpus_per_worker:g} CPU, {r.gpus_per_worker:g} GPU")
    for p in todo:
        cell = " ".join(f"{k}={v}" for k, v in p.point.items())
        print(f"  {p.trial_id[:12]}  {cell}  seed={p.seed}")


def _table(study, storage: str, fmt: str, **over) -> str:
    from sslray.results import ResultsStore
    from sslray.tables import comparison_table, render

    rep = study.report
    df = ResultsStore(storage).load()
    table = comparison_table(df, study.trials(unique=False), rows=over.get("rows") or rep.rows, cols=over.get("cols") or rep.cols,
                             metric=over.get("metric") or rep.metric, agg=over.get("agg") or rep.agg,
                             baseline=over.get("baseline") or rep.baseline)
    return render(table, fmt)


def cmd_run(args: argparse.Namespace) -> int:
    from sslray.study import load_study

    study = load_study(args.study, args.overrides)
    storage = os.path.abspath(args.storage or study.storage)
    if args.dry_run:
        from sslray.ray_adapter import plan

        todo, skipped = plan(study, storage, args.retry_failed)
        _print_plan(study, todo, skipped, storage)
        return EXIT_OK
    from sslray import ray_adapter

    try:
        # --resume needs nothing extra: stored trials are skipped and unfinished ones find their checkpoints
        summary = ray_adapter.run_study(study, address=args.address, storage=storage,
                                        retry_failed=args.retry_failed, num_cpus=args.num_cpus,
                                        max_failures=args.max_failures, overrides=tuple(args.overrides))
    finally:
        ray_adapter.shutdown()
    print()
    print(_table(study, storage, args.format))
    print(f"\n{summary.ran} trials run ({summary.ok} ok, {summary.failed} failed), {summary.skipped} already stored; "
          f"{summary.wall_s:.0f}s; results in {storage}")
    return EXIT_FAILED if summary.failed else EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    from sslray.results import ResultsStore
    from sslray.study import load_study

    study = load_study(args.study)
    storage = os.path.abspath(args.storage or study.storage)
    df = ResultsStore(storage).load()
    rows = {r["trial_id"]: r for r in df.to_dict("records")} if len(df) else {}
    counts = {"done": 0, "failed": 0, "started": 0, "missing": 0}
    for p in study.trials():
        cell = " ".join(f"{k}={v}" for k, v in p.point.items()) + f" seed={p.seed}"
        row = rows.get(p.trial_id)
        if row is not None and row["status"] == "ok":
            state = "done"
            detail = f"{study.report.metric} {row.get(study.report.metric, float('nan')):.2f}"
        elif row is not None:
            state, detail = "failed", str(row.get("reason"))
        else:
            ck = os.path.join(storage, "trials", p.trial_id, "checkpoint", "state.pt")
            state = "started" if os.path.exists(ck) else "missing"
            detail = "checkpoint on disk; --resume continues it" if state == "started" else ""
        counts[state] += 1
        print(f"{state:8s} {p.trial_id[:12]}  {cell}  {detail}".rstrip())
    print(", ".join(f"{v} {k}" for k, v in counts.items()) + f"  ({storage})")
    return EXIT_OK


def cmd_table(args: argparse.Namespace) -> int:
    from sslray.study import load_study

    study = load_study(args.study)
    storage = os.path.abspath(args.storage or study.storage)
    print(_table(study, storage, args.format, metric=args.metric, rows=args.rows, cols=args.cols,
                 baseline=args.baseline, agg=args.agg))
    return EXIT_OK


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
    commands = {"run": cmd_run, "status": cmd_status, "table": cmd_table, "train": cmd_train,
                "validate": cmd_validate, "list": cmd_list}
    try:
        return commands[args.command](args)
    except ConfigError as e:
        print(f"sslray: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except (FileNotFoundError, ValueError, OSError, RuntimeError) as e:
        if os.environ.get("SSLRAY_DEBUG"):
            raise
        print(f"sslray: error: {type(e).__name__}: {e}" if not isinstance(e, (FileNotFoundError, ValueError))
              else f"sslray: error: {e}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("sslray: interrupted; checkpoints and results written so far are kept", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
