"""``sslray data synth``: the synthetic default written to disk in the Pascal VOC layout.

    out/JPEGImages/synth_000000.png ...            RGB, PNG (lossless: JPEG would blur the 6-11 px textures)
    out/SegmentationClass/synth_000000.png ...     palette (P) PNG, VOC colours, 255 on object boundaries
    out/ImageSets/Segmentation/{train,train_aug,val}.txt   bare ids (the official-tree dialect)
    out/splits/{train_aug,val}.txt                 UniMatch two-column lists
    out/splits/<partition>/{labeled,unlabeled}.txt for each requested partition (seeded draws)
    out/synthetic.json                             what was generated (seed, size, counts, classes)

It is read back by the ``synthetic_voc`` dataset -- the Pascal reader with the synthetic classes -- so the whole
on-disk path (split dialects, P masks, quick checks, ``sslray data check``) runs on data anyone can make::

    sslray data synth --out /tmp/synth
    sslray train --set data.dataset=synthetic_voc --set data.root=/tmp/synth --set data.splits_dir=/tmp/synth/splits \\
                 --set data.partition=32

Sample ``i`` of the pool is generator index ``i`` and val sample ``i`` is index ``900000 + i``, exactly as the
in-memory ``synthetic`` dataset, and the written partitions are the draws ``synthetic`` makes for the same
partition and seed: both datasets train on identical pixels.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

from PIL import Image

from sslray.config import SyntheticConfig
from sslray.data import synthetic
from sslray.data.datasets import SyntheticSource
from sslray.data.splits import SplitEntry, generate_partition, write_partition, write_split_file
from sslray.data.voc import color_map


def sample_id(index: int) -> str:
    """File stem of generator index ``index``."""
    return f"synth_{index:06d}"


def write_synthetic_voc(out: str | os.PathLike, cfg: SyntheticConfig = SyntheticConfig(),
                        partitions: Sequence[str] = ("16", "32"), split_seed: int = 0) -> dict:
    """Write the dataset under ``out`` (created if needed; existing files are overwritten with identical bytes for
    identical arguments). Returns the metadata also written to ``synthetic.json``."""
    out = Path(out)
    (out / "JPEGImages").mkdir(parents=True, exist_ok=True)
    (out / "SegmentationClass").mkdir(exist_ok=True)
    palette = color_map().flatten().tolist()
    train = list(range(cfg.num_train))
    val = [SyntheticSource.VAL_OFFSET + i for i in range(cfg.num_val)]
    for index in train + val:
        img, mask = synthetic.make_sample(cfg.seed, index, cfg.size)
        Image.fromarray(img, "RGB").save(out / "JPEGImages" / f"{sample_id(index)}.png")
        m = Image.fromarray(mask, "P")
        m.putpalette(palette)
        m.save(out / "SegmentationClass" / f"{sample_id(index)}.png")

    def entries(indices: list[int]) -> list[SplitEntry]:
        return [SplitEntry(f"JPEGImages/{sample_id(i)}.png", f"SegmentationClass/{sample_id(i)}.png")
                for i in indices]

    sets = out / "ImageSets" / "Segmentation"
    sets.mkdir(parents=True, exist_ok=True)
    for name, indices in (("train", train), ("train_aug", train), ("val", val)):
        (sets / f"{name}.txt").write_text("".join(sample_id(i) + "\n" for i in indices), encoding="utf-8")
    pool = entries(train)
    write_split_file(out / "splits" / "train_aug.txt", pool)
    write_split_file(out / "splits" / "val.txt", entries(val))
    for spec in partitions:
        write_partition(out / "splits" / str(spec), generate_partition(pool, str(spec), split_seed))
    meta = {"dataset": "synthetic_voc", "generator_seed": cfg.seed, "size": cfg.size, "num_train": cfg.num_train,
            "num_val": cfg.num_val, "val_index_offset": SyntheticSource.VAL_OFFSET,
            "class_names": list(synthetic.CLASS_NAMES), "partitions": [str(p) for p in partitions],
            "split_seed": split_seed}
    (out / "synthetic.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return meta
