"""The ``sslray`` command line.

    sslray run STUDY.yaml [--address auto] [--storage DIR] [--resume] [--set key=value ...] [--dry-run]
    sslray status STUDY.yaml [--set key=value ...]   which cells are done, failed (why), started, missing
    sslray table STUDY.yaml [--format markdown|latex|csv|html] [--per-class] [--pseudo] [--cost] [--manifest]
    sslray plot STUDY.yaml [--kind efficiency|ablation|curves] [--format png|svg|pdf] [--out DIR]
    sslray train [CONFIG.yaml] [--set key=value ...] [--out DIR] [--resume]
    sslray validate FILE.yaml ...         study files and trial configs
    sslray list {methods,terms,datasets,models}
    sslray data check --dataset NAME --root DIR [--split FILE ...]   scan a dataset, one line per problem
    sslray data synth --out DIR           write the synthetic default in the VOC layout (dataset synthetic_voc)
    sslray export PATH ... --out FILE     the rows of one or more studies as one Parquet/CSV (sslray.load_results)

The study commands (run, status, table, plot) share ``STUDY.yaml --storage DIR --set KEY=VALUE --plugin MODULE``:
give every one of them the same ``--set`` a study was run with, since overrides change the trial ids.

Errors in inputs are one line naming the file and the dotted key, exit code 2; a failed trial (NaN loss,
missing data) is one line too, exit code 1, with whatever was already written (splits, checkpoints) kept.
``status``, ``table`` and ``plot`` on a storage holding nothing of the study say so in one line (where they looked)
and exit 1. The light commands (``list``, ``validate``, ``status``, ``table``, ``--help``, ``--version``) import
neither torch nor Ray.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

from sslray.config import ConfigError, TrialConfig, load_plugins

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sslray",
        description="Semi-supervised semantic segmentation studies: run grids, ablations and Optuna searches on "
                    "Ray, train single trials, and print paper-style comparison tables.",
        epilog="Run 'sslray COMMAND --help' for a command's options. Docs: README.md.")
    p.add_argument("--version", action="version", version=f"sslray {_version()}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _train_parser(sub)
    _run_parser(sub)
    _study_arguments(sub.add_parser("status", help="list a study's cells: done, failed (with reason), started, "
                                                   "missing"))
    _table_parser(sub)
    _plot_parser(sub)
    v = sub.add_parser("validate", help="check study files and trial configs without running anything",
                       description="Parse and validate each file; print one line per file; exit 2 if any is wrong.")
    v.add_argument("files", nargs="+")
    _plugin_argument(v)
    ls = sub.add_parser("list", help="list registered methods, loss terms, datasets or models")
    ls.add_argument("what", choices=["methods", "terms", "datasets", "models"])
    _plugin_argument(ls)
    _data_parser(sub)
    _export_parser(sub)
    return p


def _export_parser(sub) -> None:
    e = sub.add_parser(
        "export", help="write the stored rows of one or more studies as one Parquet or CSV file",
        description="One row per trial (or per evaluation with --history) across studies, as sslray.load_results "
                    "returns them, with a 'storage' column; Parquet keeps the nested columns (confusion matrix, "
                    "per-image counts, versions, split hashes) and the units in the field metadata.",
        epilog="Example: sslray export runs/quickstart runs/voc_classic --out all.parquet\n"
               "         sslray export 'runs/*' --history --out history.csv",
        formatter_class=_RAW)
    e.add_argument("paths", nargs="+", help="study storage directories, study YAML files or glob patterns")
    e.add_argument("--out", required=True, help="output file: .parquet or .csv")
    e.add_argument("--history", action="store_true", help="the per-evaluation rows instead of one row per trial")


_RAW = argparse.RawDescriptionHelpFormatter


def _version() -> str:
    from sslray import __version__

    return __version__


def _plugin_argument(cmd: argparse.ArgumentParser) -> None:
    # study files are data: code they rely on is named here, by the user
    cmd.add_argument("--plugin", dest="plugins", action="append", default=[], metavar="MODULE",
                     help="import MODULE and call its register() first, adding methods, terms or datasets "
                          "(repeatable; Ray trials import it too)")


def _set_argument(cmd: argparse.ArgumentParser, what: str) -> None:
    cmd.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help=f"override a dotted key {what} (repeatable)")


def _study_arguments(cmd: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """What every study command takes: the study file, ``--storage``, ``--set`` and ``--plugin``."""
    cmd.add_argument("study", help="study YAML file")
    cmd.add_argument("--storage", help="results and checkpoints directory (default: the study's storage)")
    _set_argument(cmd, "of the study's base config, as the study was (or is) run with: the overrides change the "
                       "trial ids")
    _plugin_argument(cmd)
    return cmd


def _train_parser(sub) -> None:
    t = sub.add_parser(
        "train", help="run one trial without Ray (also under torchrun for DDP)",
        description="Run one trial: trains, evaluates every train.eval_every iterations, writes checkpoints, "
                    "splits and summary.json under the output directory, and prints the metrics. "
                    "Without CONFIG it trains the defaults (supervised, small model, synthetic dataset).",
        epilog="Example: sslray train configs/synthetic_fixmatch.yaml --set train.iterations=500 --set seed=1\n"
               "DDP:     torchrun --nproc-per-node 2 -m sslray train configs/synthetic_fixmatch.yaml",
        formatter_class=_RAW)
    t.add_argument("config", nargs="?", help="trial config YAML (keys: name, seed, data, model, optim, method, "
                                             "train, run); omitted: all defaults")
    _set_argument(t, "e.g. --set method.terms.u_fp.weight=0.3")
    t.add_argument("--out", help="output directory (default: run.out_dir or runs/<name>-<trial id>)")
    t.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint if it exists")
    t.add_argument("--quiet", action="store_true", help="print only the final summary")
    _plugin_argument(t)


def _run_parser(sub) -> None:
    r = _study_arguments(sub.add_parser(
        "run", help="run a study (grid, ablation or Optuna search) on Ray and print its table",
        description="Run every trial of a study that is not stored yet, on a local Ray instance (default) or "
                    "an existing cluster (--address), one Parquet row per finished trial under the study's "
                    "storage, then print the comparison table. Re-running (or --resume) skips stored trials "
                    "and continues unfinished ones from their checkpoints.",
        epilog="Example: sslray run studies/quickstart.yaml\n"
               "         sslray run studies/voc_classic.yaml --address auto --storage /nfs/sslray\n"
               "         sslray run studies/smoke.yaml --dry-run",
        formatter_class=_RAW))
    r.add_argument("--address", help="Ray cluster address (auto, ray://host:10001, host:6379); default: start a "
                                     "local Ray instance")
    r.add_argument("--resume", action="store_true",
                   help="continue after a crash (same as a plain re-run: stored trials are never run twice)")
    r.add_argument("--retry-failed", action="store_true", help="run failed trials again")
    r.add_argument("--dry-run", action="store_true",
                   help="make the checks the run makes before Ray starts (storage, resources, data on disk), print "
                        "the plan and its forecast, exit non-zero where the run would refuse; creates nothing (Ray "
                        "is imported only to ask an --address cluster for its resources)")
    r.add_argument("--num-cpus", type=int, help="CPUs of the local Ray instance (default: all)")
    r.add_argument("--max-failures", type=int, default=2, help="retries of a trial whose worker died (default 2)")
    r.add_argument("--format", default="markdown", choices=["markdown", "latex", "csv", "html"], help="table format")
    r.add_argument("--verbose", action="store_true", help="also show Ray's start-up notices (token auth)")
    r.add_argument("--reuse-from", metavar="DIR", action="append", default=[],
                   help="another study's storage: its finished trials with the same trial id are copied here "
                        "(column reused_from) instead of trained again; repeatable")


def _table_parser(sub) -> None:
    tb = _study_arguments(sub.add_parser(
        "table", help="print a study's comparison table from its stored results",
        description="Rows x columns from the study's report block (overridable), cells mean +- std over seeds with "
                    "n, best per column bold and second underlined, delta and a paired test over seeds against the "
                    "baseline row (Holm-corrected, marked with a dagger), paper numbers beside the reproduced ones "
                    "(report.paper_numbers), missing and failed cells shown. An ablation study prints its variants "
                    "with what each changes; a search study its best configs, Optuna parameter importances and "
                    "history. --per-class, --pseudo, --cost and --manifest print those tables instead.",
        epilog="Example: sslray table studies/quickstart.yaml --format latex > table.tex\n"
               "         sslray table studies/quickstart.yaml --bootstrap 1000    # + CIs over validation images\n"
               "         sslray table studies/quickstart.yaml --manifest          # what reproduces each trial",
        formatter_class=_RAW))
    tb.add_argument("--format", default="markdown", choices=["markdown", "latex", "csv", "html"])
    tb.add_argument("--metric", help="default: report.metric (val/miou)")
    tb.add_argument("--rows", help="dotted config key or 'variant' (default: report.rows)")
    tb.add_argument("--cols", help="dotted config key or 'variant' (default: report.cols)")
    tb.add_argument("--baseline", help="row label to compute deltas against (default: report.baseline)")
    tb.add_argument("--agg", choices=["last", "best"], help="final or best evaluation (default: report.agg)")
    tb.add_argument("--significance", choices=["auto", "t", "wilcoxon", "none"],
                    help="paired test over seeds against the baseline (default: report.significance, auto: exact "
                         "Wilcoxon from 6 seeds on, else paired t)")
    tb.add_argument("--alpha", type=float, help="family-wise level after Holm's correction (default: report.alpha)")
    tb.add_argument("--bootstrap", type=int, metavar="N",
                    help="N resamples of the validation images for CIs (default: report.bootstrap; 0: off)")
    tb.add_argument("--paper", metavar="YAML", help="paper numbers file (default: report.paper_numbers)")
    tb.add_argument("--per-class", action="store_true", help="IoU per class from the stored confusion matrices")
    tb.add_argument("--pseudo", action="store_true", help="pseudo-label quality: mask ratio and accuracy")
    tb.add_argument("--cost", action="store_true", help="GPU- and CPU-hours per cell, with a forecast for the rest")
    tb.add_argument("--manifest", action="store_true",
                    help="per trial: id, git sha and dirty flag, split sha256, versions, the exact rerun command")


def _plot_parser(sub) -> None:
    pl = _study_arguments(sub.add_parser(
        "plot", help="write a study's figures: label efficiency, ablation bars, training curves",
        description="Figures from the stored results (matplotlib): label-efficiency curves (metric vs number of "
                    "labeled images, one line per row, seed band), ablation bars with error bars, training curves "
                    "per cell. Default: every kind that applies to the study. Prints the paths written.",
        epilog="Example: sslray plot studies/quickstart.yaml --kind efficiency --format svg --out figs/",
        formatter_class=_RAW))
    pl.add_argument("--kind", action="append", choices=["efficiency", "ablation", "curves"],
                    help="repeatable (default: all that apply)")
    pl.add_argument("--out", help="output directory (default: <storage>/plots)")
    pl.add_argument("--format", default="png", choices=["png", "svg", "pdf"],
                    help="png (300 dpi), svg or pdf (text kept as text, not outlines)")
    pl.add_argument("--metric", help="default: report.metric (val/miou)")
    pl.add_argument("--agg", choices=["last", "best"], help="default: report.agg")


def _data_parser(sub) -> None:
    """``sslray data check`` and ``sslray data synth``."""
    from sslray.config import SyntheticConfig

    d = sub.add_parser("data", help="check a dataset on disk, or write the synthetic one in the VOC layout")
    dsub = d.add_subparsers(dest="data_command", metavar="DATA_COMMAND", required=True)
    c = dsub.add_parser(
        "check", help="read every listed image and mask once and report each problem on one line",
        description="Reports missing, unreadable or truncated images and masks, label values outside the class "
                    "range (other than 255), image/mask size mismatches, duplicate ids, labeled/unlabeled overlap "
                    "and training images in val lists, then a summary (counts, published splits recognised, class "
                    "histogram). Exit code 1 if anything is wrong. A file's role comes from its name: "
                    "*unlabeled*/test -> images only, val -> validation, anything else -> labeled.",
        epilog="Example: sslray data check --dataset pascal --root /data/VOC2012 "
               "--split UniMatch/splits/pascal/92/labeled.txt --split UniMatch/splits/pascal/92/unlabeled.txt "
               "--split UniMatch/splits/pascal/val.txt")
    c.add_argument("--dataset", required=True, help="pascal, cityscapes or synthetic_voc")
    c.add_argument("--root", required=True, help="dataset root directory")
    c.add_argument("--split", dest="splits", action="append", default=[], metavar="FILE",
                   help="split file in any supported dialect (repeatable; default: the val list and train pool a "
                        "trial would read)")
    c.add_argument("--splits-dir", help="as data.splits_dir, for the default lists")
    c.add_argument("--mask-dir", help="as data.mask_dir (VOC): SegmentationClass or SegmentationClassAug")
    c.add_argument("--workers", type=int, help="decoding threads (default: up to 8)")
    y = dsub.add_parser("synth", help="write the synthetic default dataset in the VOC layout with split files",
                        description="Writes JPEGImages/*.png, SegmentationClass/*.png (palette masks), "
                                    "ImageSets/Segmentation/*.txt and UniMatch-format splits/ under OUT; train on it "
                                    "with data.dataset=synthetic_voc, data.root=OUT, data.splits_dir=OUT/splits.")
    dflt = SyntheticConfig()
    y.add_argument("--out", required=True, help="output directory (created)")
    y.add_argument("--size", type=int, default=dflt.size, help=f"image side in pixels (default {dflt.size})")
    y.add_argument("--num-train", type=int, default=dflt.num_train, help=f"pool size (default {dflt.num_train})")
    y.add_argument("--num-val", type=int, default=dflt.num_val, help=f"validation images (default {dflt.num_val})")
    y.add_argument("--seed", type=int, default=dflt.seed, help=f"generator seed (default {dflt.seed})")
    y.add_argument("--partition", dest="partitions", action="append", metavar="SPEC",
                   help="partition to write under splits/ (repeatable; default: 16 and 32)")
    y.add_argument("--split-seed", type=int, default=0, help="seed of the partition draws (default 0)")


def _load_config(path: str | None, overrides: list[str]) -> TrialConfig:
    from sslray.registries import check_names

    cfg = TrialConfig().with_overrides(overrides) if path is None else TrialConfig.from_yaml(path, overrides)
    check_names(cfg, path)
    return cfg


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
    from sslray.storage import atomic_write_text  # a full disk leaves no half-written summary behind

    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str))


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
    from sslray.trainer import NOT_IN_HISTORY, Runtime, default_out_dir, fit

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
            f.write(json.dumps({k: v for k, v in metrics.items() if k not in NOT_IN_HISTORY}) + "\n")
        if not args.quiet:
            print(_fmt_report(metrics, cfg.train.iterations), flush=True)

    t0 = time.time()
    summary: dict[str, Any] = {"trial_id": cfg.trial_id(), "name": cfg.name, "config": cfg.to_dict(),
                               "device": str(runtime.device), "world_size": runtime.world_size}
    try:
        result = fit(cfg, runtime, reporter, resume_from="auto" if args.resume else None, out_dir=out_dir)
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
    metrics = result.metrics
    summary.update(status="ok", metrics=metrics, history=result.history, wall_s=time.time() - t0)
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
                cfg = _load_config(path, [])
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
    if study.search is None:
        _print_table_shape(study)
    for p in todo:
        cell = " ".join(f"{k}={v}" for k, v in p.point.items())
        print(f"  {p.trial_id[:12]}  {cell}  seed={p.seed}")


def _print_table_shape(study) -> None:
    """The report's rows and columns as planned (``rows: method.name (7) ...; cols: data.partition (5) 92, ...``)."""
    from sslray.study import row_label

    planned = study.trials(unique=False)
    for axis in ("rows", "cols"):
        key = getattr(study.report, axis)
        labels = list(dict.fromkeys(row_label(t, key) for t in planned))
        print(f"table {axis}: {key} ({len(labels)}): {', '.join(labels)}")


def _dry_run(study, storage: str, args: argparse.Namespace) -> int:
    """What ``sslray run`` checks before it starts Ray, then the plan and its forecast; creates nothing. The
    resources of a cluster (``--address``) need Ray to be known: only then is Ray imported (and connected to)."""
    from sslray import preflight
    from sslray.results import ResultsStore, plan
    from sslray.storage import StudyStorage

    StudyStorage(storage).check(study.path)
    if args.address:
        from sslray import ray_adapter

        cluster, where = ray_adapter.cluster_resources(args.address), f"the cluster at {args.address}"
    else:
        cluster, where = preflight.local_resources(args.num_cpus, study), "this machine"
    preflight.check_fits(study, cluster, study.path)
    stored = ResultsStore(storage).load()  # once: the plan and the forecast read the same rows
    todo, skipped = plan(study, storage, args.retry_failed, stored)
    n_data = preflight.check_data(todo)
    _print_plan(study, todo, skipped, storage)
    if len(_study_rows(study, stored)) == 0:
        print(f"nothing of this study is stored in {storage} yet: every trial would run")
    n = study.search.num_samples if study.search else len(todo)
    concurrent = preflight.max_concurrent(study, cluster, max(n, 1))
    print(f"checks passed: storage usable; one trial fits {where} ({preflight.describe(cluster)}), {concurrent} at "
          f"a time; " + (f"{n_data} dataset config(s) on disk found with their split files" if n_data else
                         "synthetic data (nothing on disk)"))
    if study.search is None and todo:
        print(_forecast(study, stored, len(todo), concurrent))
    return EXIT_OK


def _forecast(study, stored, n_todo: int, concurrent: int) -> str:
    """Time and GPU-hours of the trials still to run, from the mean of this study's finished trials."""
    import statistics

    done = _study_rows(study, stored)
    done = done[done["status"] == "ok"] if len(done) else done
    if len(done) == 0:
        return (f"forecast: unknown until a trial of this study has finished ({n_todo} trials x "
                f"{study.base.train.iterations} iterations; sslray table --cost forecasts the rest then)")
    wall = statistics.fmean(float(w) for w in done["wall_s"])
    gpus = study.resources.workers * study.resources.gpus_per_worker
    hours = n_todo * wall / 3600
    return (f"forecast: {n_todo} trials x {wall / 60:.1f} min (mean of {len(done)} finished) = {hours:.2f} trial-hours, "
            f"about {hours / max(concurrent, 1):.2f} h of wall time at {concurrent} at a time; "
            f"{hours * gpus:.2f} GPU-hours")


def _table(study, storage: str, fmt: str, stored=None, **over) -> str:
    """The study's report as text (``sslray.report.study_report``): the comparison (or ablation) table, or the
    per-class / pseudo / cost / manifest tables when asked for; a search study's best configs, importances and
    history. ``stored``: the store's rows when the caller has loaded them. ``over`` holds those flags and the report
    keys the command line overrides."""
    from sslray.report import render, study_report
    from sslray.results import ResultsStore

    store = ResultsStore(storage)
    flags = {"per_class": "per_class", "pseudo": "pseudo_labels", "cost": "cost", "manifest": "manifest"}
    sections = [name for flag, name in flags.items() if over.pop(flag, None)] or ["comparison"]
    history = store.load_history() if "pseudo_labels" in sections and study.search is None else None
    report = study_report(study, store.load() if stored is None else stored, history, sections, **over)
    _notes(store)
    return "\n".join(render(s, fmt) for s in report.values())


def _reuse(study, storage: str, sources: list[str], dry_run: bool) -> None:
    """``--reuse-from``: copy the other stores' ok rows of trials this study plans (``sslray.reuse``); a dry run
    only says how many it would take."""
    from sslray.results import ResultsStore
    from sslray.reuse import reuse_trials
    from sslray.storage import StudyStorage

    for source in sources:
        if not os.path.isdir(source):
            raise ConfigError(source, "--reuse-from", "no such directory (expected another study's storage)")
        if dry_run:
            other = ResultsStore(source).ids("ok") if os.path.isdir(source) else set()
            n = len({p.trial_id for p in study.trials()} & other - ResultsStore(storage).ids())
            print(f"--reuse-from {source}: {n} trial(s) would be reused")
            continue
        taken = reuse_trials(study.trials(), source, StudyStorage(storage), study.name)
        print(f"reused {len(taken)} finished trial(s) from {source}")


def cmd_run(args: argparse.Namespace) -> int:
    study, storage = _load(args)
    from sslray import tracking

    tracking.settings_for(study, storage)  # an unknown WANDB_MODE is refused here, before anything starts
    if getattr(args, "reuse_from", None):
        _reuse(study, storage, args.reuse_from, args.dry_run)
    if args.dry_run:
        return _dry_run(study, storage, args)
    from sslray import ray_adapter

    if getattr(args, "verbose", False):
        ray_adapter.show_ray_notices()
    try:
        # --resume needs nothing extra: stored trials are skipped and unfinished ones find their checkpoints
        summary = ray_adapter.run_study(study, address=args.address, storage=storage,
                                        retry_failed=args.retry_failed, num_cpus=args.num_cpus,
                                        max_failures=args.max_failures, plugins=tuple(args.plugins))
    finally:
        ray_adapter.shutdown()
    print()
    print(_table(study, storage, args.format))
    left = f", {summary.unfinished} not finished" if summary.unfinished else ""
    print(f"\n{summary.ran} trials run ({summary.ok} ok, {summary.failed} failed){left}, {summary.skipped} already "
          f"stored; {summary.wall_s:.0f}s; results in {storage}")
    if summary.unfinished:  # Tune's own advice (Tuner.restore) is not how an sslray study continues
        print(f"sslray: interrupted: {summary.unfinished} of {summary.planned - summary.skipped} trials not finished; "
              f"the same 'sslray run' command continues them (results and checkpoints written so far are kept)",
              file=sys.stderr)
    return EXIT_FAILED if summary.failed else EXIT_INTERRUPTED if summary.unfinished else EXIT_OK


def _load(args: argparse.Namespace):
    """(study, absolute storage path) of a study command: the file with its ``--set`` overrides, ``--storage``."""
    from sslray.storage import study_storage
    from sslray.study import check_storage_value, load_study

    study = load_study(args.study, args.overrides)
    if args.storage is not None:  # the rules of storage: in a study file (no '..', not a file)
        check_storage_value(args.storage, None, "--storage")
    return study, study_storage(study, args.storage).uri


def _study_rows(study, df):
    """The stored rows that belong to ``study``: its planned trial ids (grid, ablation), or its name (search)."""
    if len(df) == 0:
        return df
    if study.search is not None:
        return df[df["study"] == study.name]
    return df[df["trial_id"].isin({p.trial_id for p in study.trials()})]


def _nothing_stored(study, storage: str, df) -> str:
    """One line: no results of this study were found, and where sslray looked."""
    from sslray.storage import StudyStorage

    layout = StudyStorage(storage)
    results = layout.results_dir
    if layout.remote:  # an object store has no directories: what the results prefix holds
        others = f"{len(df)} row(s) of other trials or studies" if len(df) else "no result objects"
        where = f"{results} holds {others}"
    elif not os.path.isdir(storage):
        where = f"{storage} does not exist"
    elif not results.is_dir():
        where = f"{storage} has no results/ directory"
    else:
        others = f"{len(df)} row(s) of other trials or studies" if len(df) else "no result files"
        where = f"{results} holds {others}"
    return (f"sslray: no results of study {study.name!r} found ({where}); check --storage and --set, or run it "
            f"first: sslray run {study.path}")


def cmd_status(args: argparse.Namespace) -> int:
    from sslray.results import ResultsStore, row_dicts
    from sslray.storage import StudyStorage

    study, storage = _load(args)
    layout = StudyStorage(storage)
    store = ResultsStore(layout)
    stored = store.load()
    _notes(store)
    df = _study_rows(study, stored)
    if len(df) == 0 and not any(layout.started(p.trial_id) for p in study.trials()):
        print(_nothing_stored(study, storage, stored), file=sys.stderr)
        return EXIT_FAILED
    metric = study.report.metric
    keep = ["trial_id", "status", "reason", *([metric] if metric in df.columns else [])]
    rows = {r["trial_id"]: r for r in row_dicts(df[keep])} if len(df) else {}
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
            state = "started" if layout.started(p.trial_id) else "missing"
            detail = "checkpoint on disk; --resume continues it" if state == "started" else ""
        counts[state] += 1
        print(f"{state:8s} {p.trial_id[:12]}  {cell}  {detail}".rstrip())
    print(", ".join(f"{v} {k}" for k, v in counts.items()) + f"  ({storage})")
    return EXIT_OK


def _notes(store) -> None:
    """What a load skipped without losing a row (an unreadable snapshot), one line each on stderr."""
    for note in store.notes:
        print(f"sslray: warning: {note}", file=sys.stderr)


def cmd_table(args: argparse.Namespace) -> int:
    from sslray.results import ResultsStore

    study, storage = _load(args)
    store = ResultsStore(storage)
    stored = store.load()  # once: the table reads the same rows
    _notes(store)
    if len(_study_rows(study, stored)) == 0:
        print(_nothing_stored(study, storage, stored), file=sys.stderr)
        return EXIT_FAILED
    print(_table(study, storage, args.format, stored, metric=args.metric, rows=args.rows, cols=args.cols,
                 baseline=args.baseline, agg=args.agg, significance=args.significance, alpha=args.alpha,
                 bootstrap=args.bootstrap, paper=args.paper, per_class=args.per_class, pseudo=args.pseudo,
                 cost=args.cost, manifest=args.manifest))
    return EXIT_OK


def cmd_plot(args: argparse.Namespace) -> int:
    from sslray.plots import plot_study
    from sslray.results import ResultsStore
    from sslray.storage import StudyStorage

    study, storage = _load(args)
    store = ResultsStore(storage)
    df = store.load()
    if len(_study_rows(study, df)) == 0:
        print(_nothing_stored(study, storage, df), file=sys.stderr)
        return EXIT_FAILED
    layout = StudyStorage(storage)
    history = store.load_history()
    _notes(store)
    out = args.out or str(layout.local_dir("plots"))  # an object store: drawn here, then uploaded
    paths = plot_study(study, df, history, out, args.kind, args.format, storage, args.metric, args.agg)
    if layout.remote and not args.out:
        layout.publish_dir(out, "plots")
        paths = [layout.display(f"plots/{os.path.basename(p)}") for p in paths]
    for path in paths:
        print(path)
    return EXIT_OK


def cmd_list(args: argparse.Namespace) -> int:
    """Names from the registries without importing torch (``sslray.methods.registry``, ``sslray.registries``)."""
    import sslray
    from sslray.methods import METHOD_DOCS, TERMS

    if args.what in ("terms", "methods"):
        docs = {n: t.doc for n, t in TERMS.items()} if args.what == "terms" else {
            n: METHOD_DOCS.get(n, "(no description)") for n in sslray.list_methods()}
        width = max(map(len, docs))
        for name, doc in docs.items():
            print(f"{name:{width}s}  {doc}")
        return EXIT_OK
    items = {"datasets": sslray.list_datasets, "models": sslray.list_models}
    print("\n".join(items[args.what]()))
    return EXIT_OK


def cmd_export(args: argparse.Namespace) -> int:
    from sslray.results import load_results

    if not args.out.endswith((".parquet", ".csv")):
        raise ConfigError(None, "--out", f"expected a .parquet or .csv file, got {args.out!r}")
    df = load_results(args.paths, history=args.history)
    if len(df) == 0:
        print(f"sslray: no stored rows in {', '.join(args.paths)}; nothing written", file=sys.stderr)
        return EXIT_FAILED
    from sslray.storage import atomic_write

    if args.out.endswith(".csv"):
        atomic_write(args.out, lambda f: f.write(df.to_csv(index=False).encode()))
    else:
        atomic_write(args.out, lambda f: df.to_parquet(f, index=False))
    print(f"wrote {len(df)} {'evaluation' if args.history else 'trial'} rows of {df['storage'].nunique()} "
          f"storage(s), {len(df.columns)} columns, to {args.out}")
    return EXIT_OK


def cmd_data(args: argparse.Namespace) -> int:
    if args.data_command == "synth":
        from sslray.data.synth_voc import write_synthetic_voc

        cfg = TrialConfig.from_dict({"data": {"synthetic": {"size": args.size, "num_train": args.num_train,
                                                            "num_val": args.num_val, "seed": args.seed}}},
                                    source="sslray data synth").data.synthetic
        meta = write_synthetic_voc(args.out, cfg, args.partitions or ("16", "32"), args.split_seed)
        print(f"wrote {meta['num_train']} train + {meta['num_val']} val images ({meta['size']} px, "
              f"{len(meta['class_names'])} classes) and partitions {', '.join(meta['partitions'])} to {args.out}")
        print(f"train: sslray train --set data.dataset=synthetic_voc --set data.root={args.out} "
              f"--set data.splits_dir={os.path.join(args.out, 'splits')} --set data.partition={meta['partitions'][0]}")
        return EXIT_OK
    from sslray.data.check import check_dataset
    from sslray.data.datasets import DATASETS

    if args.dataset not in DATASETS or args.dataset == "synthetic":
        on_disk = ", ".join(n for n in sorted(DATASETS) if n != "synthetic")
        raise ConfigError(None, "--dataset", f"expected a dataset on disk ({on_disk}), got {args.dataset!r}")
    report = check_dataset(args.dataset, args.root, args.splits, splits_dir=args.splits_dir,
                           mask_dir=args.mask_dir, workers=args.workers)
    for line in report.error_lines():
        print(line)
    print(report.summary())
    return EXIT_OK if report.ok else EXIT_FAILED


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    commands = {"run": cmd_run, "status": cmd_status, "table": cmd_table, "train": cmd_train,
                "validate": cmd_validate, "list": cmd_list, "data": cmd_data, "plot": cmd_plot, "export": cmd_export}
    try:
        load_plugins(getattr(args, "plugins", []))
        return commands[args.command](args)
    except ConfigError as e:
        print(f"sslray: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except (FileNotFoundError, ValueError, OSError, RuntimeError) as e:
        if os.environ.get("SSLRAY_DEBUG"):
            raise
        from sslray.storage import redact  # no credential in a message, whatever raised it

        print(redact(f"sslray: error: {type(e).__name__}: {e}" if not isinstance(e, (FileNotFoundError, ValueError))
                     else f"sslray: error: {e}"), file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("sslray: interrupted; checkpoints and results written so far are kept", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    raise SystemExit(main())
