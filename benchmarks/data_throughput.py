"""Data-loading throughput of the real readers: samples/s of one loader worker, and workers needed; prints JSON.

Writes fixtures of real sizes in a temporary directory -- Pascal-sized JPEGs (500x375 and 375x500, quality 90)
with palette masks, Cityscapes-sized PNGs (2048x1024) with labelTrainIds masks -- whose content (smooth fields,
edges, texture, noise) compresses like photos rather than like noise, so decode costs are realistic. Then times
``LabeledDataset[key]`` (read + weak view + normalise) and ``UnlabeledDataset[key]`` (read incl. the ground truth
for the pseudo-label diagnostic + weak view + two strong views + two CutMix boxes + normalise) in this process with
one torch thread -- exactly what one DataLoader worker process does -- at crop 321 (Pascal) and 801 (Cityscapes).
Throughput is per CPU second of the process (``time.process_time``), i.e. a worker with a core of its own, so the
numbers hold on a shared, loaded machine; wall time is reported next to it.

A UniMatch step at 8 + 8 needs 8 labeled samples, 8 unlabeled and 8 more unlabeled for the CutMix source
(``method.mix_source: batch``); ``workers_for_5_steps_per_s`` is the number of worker processes that keeps up with
5 steps/s, with and without that third stream. sslray's trainer starts ``run.num_workers`` workers per stream.

    python benchmarks/data_throughput.py > benchmarks/results/data_throughput.json
    python benchmarks/data_throughput.py --samples 40 --voc-images 32 --city-images 12    # steadier numbers
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import PIL
import torch
from PIL import Image
from torch.utils.data import default_collate

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sslray.config import DataConfig  # noqa: E402
from sslray.data.datasets import build_data  # noqa: E402
from sslray.data.device_augs import augment_batch  # noqa: E402
from sslray.data.readers import NonStandardSplitWarning  # noqa: E402
from sslray.data.voc import color_map  # noqa: E402


def photo_like(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """uint8 [h, w, 3]: a smooth colour field, a few hard-edged regions, fine texture and sensor noise."""
    small = rng.random((max(h // 64, 2), max(w // 64, 2), 3)).astype(np.float32)
    field = np.asarray(Image.fromarray((small * 255).astype(np.uint8)).resize((w, h), Image.BICUBIC), np.float32)
    yy, xx = np.mgrid[0:h, 0:w]
    for _ in range(6):
        cy, cx, r = rng.integers(0, h), rng.integers(0, w), rng.integers(h // 10, h // 3)
        inside = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
        field[inside] = field[inside] * 0.4 + rng.random(3) * 150
    texture = 12 * np.sin(xx / rng.uniform(2, 6))[..., None] * np.cos(yy / rng.uniform(2, 6))[..., None]
    noise = rng.normal(0, 4, (h, w, 3))
    return np.clip(field + texture + noise, 0, 255).astype(np.uint8)


def blobs(rng: np.random.Generator, h: int, w: int, k: int) -> np.ndarray:
    """uint8 [h, w] class map of a few discs on background, with a 1-px-ish 255 outline."""
    yy, xx = np.mgrid[0:h, 0:w]
    lbl = np.zeros((h, w), np.uint8)
    for _ in range(4):
        cy, cx, r = rng.integers(0, h), rng.integers(0, w), rng.integers(h // 10, h // 3)
        d = np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2)
        lbl[d < r] = rng.integers(1, k)
        lbl[np.abs(d - r) < 1] = 255
    return lbl


def write_voc(root: Path, n: int, rng: np.random.Generator) -> int:
    """n VOC-sized samples; returns the mean JPEG size in bytes."""
    (root / "JPEGImages").mkdir(parents=True)
    (root / "SegmentationClass").mkdir()
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    palette = color_map().flatten().tolist()
    ids = [f"2007_{i:06d}" for i in range(n)]
    for i, ident in enumerate(ids):
        h, w = (375, 500) if i % 3 else (500, 375)
        Image.fromarray(photo_like(rng, h, w)).save(root / "JPEGImages" / f"{ident}.jpg", quality=90)
        m = Image.fromarray(blobs(rng, h, w, 21), "P")
        m.putpalette(palette)
        m.save(root / "SegmentationClass" / f"{ident}.png")
    sets = root / "ImageSets" / "Segmentation"
    for name, part in (("train", ids[:-2]), ("train_aug", ids[:-2]), ("val", ids[-2:])):
        (sets / f"{name}.txt").write_text("".join(i + "\n" for i in part))
    return int(statistics.mean((root / "JPEGImages" / f"{i}.jpg").stat().st_size for i in ids))


def write_cityscapes(root: Path, n: int, rng: np.random.Generator) -> int:
    """n Cityscapes-sized train samples (+1 val); returns the mean PNG size in bytes."""
    sizes = []
    for i in range(n + 1):
        split, city = ("val", "frankfurt") if i == n else ("train", "aachen")
        stem = f"{city}_{i:06d}_000019"
        img_dir, gt_dir = root / "leftImg8bit" / split / city, root / "gtFine" / split / city
        img_dir.mkdir(parents=True, exist_ok=True)
        gt_dir.mkdir(parents=True, exist_ok=True)
        Image.fromarray(photo_like(rng, 1024, 2048)).save(img_dir / f"{stem}_leftImg8bit.png")
        Image.fromarray(blobs(rng, 1024, 2048, 19), "L").save(gt_dir / f"{stem}_gtFine_labelTrainIds.png")
        sizes.append((img_dir / f"{stem}_leftImg8bit.png").stat().st_size)
    return int(statistics.mean(sizes))


def time_items(dataset, n_items: int, samples: int) -> dict:
    """Per ``dataset[(index, aug_seed)]`` over ``samples`` calls cycling through the items: CPU seconds of this
    process (what one worker on a core of its own takes; robust to other jobs on the machine) and wall seconds."""
    dataset[(0, 0)]  # warm-up: imports, caches
    cpu, wall = [], []
    for j in range(samples):
        c, t = time.process_time(), time.perf_counter()
        dataset[(j % n_items, 1000 + j)]
        cpu.append(time.process_time() - c)
        wall.append(time.perf_counter() - t)
    return {"samples": samples, "cpu_s_mean": round(statistics.mean(cpu), 4), "wall_s_mean": round(
        statistics.mean(wall), 4), "samples_per_s_per_worker": round(1.0 / statistics.mean(cpu), 2)}


def workers_needed(labeled: dict, unlabeled: dict, bx: int, bu: int, steps_per_s: float) -> dict:
    """Worker processes (one core each) for ``steps_per_s``: each stream's rate over one worker's throughput."""
    x = steps_per_s * bx / labeled["samples_per_s_per_worker"]
    u = steps_per_s * bu / unlabeled["samples_per_s_per_worker"]
    return {"labeled_stream": round(x, 2), "unlabeled_stream": round(u, 2), "mix_stream": round(u, 2),
            "total_with_mix_stream": math.ceil(x + 2 * u), "total_without_mix_stream": math.ceil(x + u)}


def _build(cfg: DataConfig):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NonStandardSplitWarning)  # fixture lists are not the published ones
        return build_data(cfg)


def device_aug(cfg: DataConfig, n_items: int, samples: int, bu: int, device: str) -> dict:
    """``data.augment_on: device``: what a loader worker still does per unlabeled sample (read, weak view, draws,
    boxes; CPU seconds as above) and the strong views of a collated batch of ``bu`` on ``device`` (wall seconds,
    synchronised; on CPU with this process's threads, which is what the label says)."""
    ds = _build(dataclasses.replace(cfg, augment_on="device")).unlabeled
    n = min(n_items, len(ds))
    loader = time_items(ds, n, samples)
    batch = {k: v.to(device) if not k.startswith("host_") else v
             for k, v in default_collate([ds[(j % n, 2000 + j)] for j in range(bu)]).items()}
    augment_batch(batch)  # warm-up
    reps, t = max(1, samples // bu), time.perf_counter()
    for _ in range(reps):
        augment_batch(batch)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    per_sample = (time.perf_counter() - t) / (reps * bu)
    return {"loader_part": loader, "device_part": {"device": device, "torch_threads": torch.get_num_threads(),
                                                   "s_per_sample": round(per_sample, 5),
                                                   "samples_per_s": round(1.0 / per_sample, 2)}}


def bench(cfg: DataConfig, n_items: int, samples: int, bx: int, bu: int, steps: float,
          aug_device: str | None = None) -> dict:
    data = _build(cfg)
    lab = time_items(data.labeled, min(n_items, len(data.labeled)), samples)
    unl = time_items(data.unlabeled, min(n_items, len(data.unlabeled)), samples)
    out = {"crop": data.crop_size, "labeled_weak": lab, "unlabeled_weak_strong": unl,
           "unlabeled_reads_ground_truth": data.unlabeled.with_truth,
           f"workers_for_{steps:g}_steps_per_s": workers_needed(lab, unl, bx, bu, steps)}
    if aug_device:
        dev = device_aug(cfg, n_items, samples, bu, aug_device)
        out["augment_on_device"] = {**dev, f"workers_for_{steps:g}_steps_per_s": workers_needed(
            lab, dev["loader_part"], bx, bu, steps)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=24, help="timed samples per dataset and stream")
    ap.add_argument("--voc-images", type=int, default=24)
    ap.add_argument("--city-images", type=int, default=8)
    ap.add_argument("--bx", type=int, default=8)
    ap.add_argument("--bu", type=int, default=8)
    ap.add_argument("--steps-per-s", type=float, default=5.0)
    ap.add_argument("--aug-device", default="cpu", help="where data.augment_on: device runs its strong views "
                    "(cpu here; cuda on a GPU machine); '' to skip")
    args = ap.parse_args()
    torch.set_num_threads(1)  # what a DataLoader worker runs with
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="sslray-throughput-") as tmp:
        voc_root, city_root = Path(tmp) / "voc", Path(tmp) / "cityscapes"
        jpeg_bytes = write_voc(voc_root, args.voc_images, rng)
        png_bytes = write_cityscapes(city_root, args.city_images, rng)
        common = dict(batch_size_x=args.bx, batch_size_u=args.bu)
        voc = bench(DataConfig(dataset="pascal", root=str(voc_root), partition="1_2", **common),
                    args.voc_images - 2, args.samples, args.bx, args.bu, args.steps_per_s)
        city = bench(DataConfig(dataset="cityscapes", root=str(city_root), partition="1_2", **common),
                     args.city_images, args.samples, args.bx, args.bu, args.steps_per_s, args.aug_device)
    out = {
        "benchmark": "data_throughput",
        "pascal": {"image": "JPEG 500x375 / 375x500, quality 90", "mean_file_bytes": jpeg_bytes, **voc},
        "cityscapes": {"image": "PNG 2048x1024", "mean_file_bytes": png_bytes, **city},
        "batch": {"labeled": args.bx, "unlabeled": args.bu, "steps_per_s": args.steps_per_s},
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                    "python": platform.python_version(), "torch": torch.__version__, "pillow": PIL.__version__,
                    "torch_threads": torch.get_num_threads(), "load_avg_1m": round(os.getloadavg()[0], 2)},
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
