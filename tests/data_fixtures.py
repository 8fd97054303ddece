"""Tiny on-disk datasets in the exact published formats (``datasets.md`` sections 1.6 and 2.4), written by tests.

Written with PIL and plain file writes only -- never with sslray's own writers -- so the readers are tested against
the formats, not against themselves. Reusable for corpora of broken datasets: write a clean tree, then break it.

VOC (:func:`write_voc`): ids ``2007_000001 ..``; ``JPEGImages/<id>.jpg`` (RGB JPEG), ``SegmentationClass/<id>.png``
(P mode, VOC palette), ``SegmentationClassAug/<id>.png`` (L mode, the same values), values 0..20 with a 1-px 255
outline; ``ImageSets/Segmentation/{train,train_aug,val}.txt`` (bare ids, LF); UniMatch-layout lists under
``splits/pascal/`` (two columns).

VOC with both mask folders holding *different* labels (:func:`write_voc_ids`, any ids, e.g. those of a published
split): tells which folder a reader opened. :func:`unimatch_splits` finds UniMatch's published split files (the
read-only ``shared/splits/unimatch/`` beside the checkout; never copied into the repo).

Cityscapes (:func:`write_cityscapes`): cities aachen + bochum (train), frankfurt (val);
``leftImg8bit/<split>/<city>/<city>_<seq>_<frame>_leftImg8bit.png`` (RGB PNG), ``gtFine/...``: ``_labelIds.png``
with random ids 0..33 and the matching ``_labelTrainIds.png`` through the documented table; UniMatch-layout lists
under ``splits/cityscapes/``.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

# datasets.md section 2.2, written out independently of sslray.data.cityscapes
CITYSCAPES_TRAIN_IDS = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12,
                        26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}


def voc_palette() -> list[int]:
    """Flat [768] VOC colour map (bit-interleaved), as the official PNGs carry it."""
    out = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        out += [r, g, b]
    return out


def voc_label(rng: np.random.Generator, h: int, w: int, k: int = 21) -> np.ndarray:
    """uint8 [h, w]: blocks of random classes 0..k-1 with a 1-px 255 band where blocks meet."""
    lbl = np.kron(rng.integers(0, k, (h // 6 + 1, w // 8 + 1)), np.ones((6, 8), np.int64))[:h, :w].astype(np.uint8)
    edge = np.zeros((h, w), bool)
    edge[1:, :] |= lbl[1:, :] != lbl[:-1, :]
    edge[:, 1:] |= lbl[:, 1:] != lbl[:, :-1]
    lbl[edge] = 255
    return lbl


def write_voc(root: Path, n_fine: int = 4, n_extra: int = 4, n_val: int = 3, size: tuple[int, int] = (40, 30),
              seed: int = 0, k: int = 21) -> dict[str, list[str]]:
    """A VOC tree under ``root``; returns the ids: ``fine`` (the "1,464"), ``train_aug`` (fine + SBD-like extras),
    ``val``. Val images alternate landscape / portrait so evaluation sees several sizes."""
    rng = np.random.default_rng(seed)
    w, h = size
    ids = [f"2007_{i:06d}" for i in range(1, n_fine + n_extra + n_val + 1)]
    fine, extra, val = ids[:n_fine], ids[n_fine:n_fine + n_extra], ids[n_fine + n_extra:]
    for d in ("JPEGImages", "SegmentationClass", "SegmentationClassAug", "ImageSets/Segmentation"):
        (root / d).mkdir(parents=True, exist_ok=True)
    palette = voc_palette()
    for j, ident in enumerate(ids):
        hh, ww = (w, h) if ident in val and j % 2 else (h, w)
        Image.fromarray(rng.integers(0, 256, (hh, ww, 3), dtype=np.uint8), "RGB").save(
            root / "JPEGImages" / f"{ident}.jpg", quality=95)
        lbl = voc_label(rng, hh, ww, k)
        p = Image.fromarray(lbl, "P")
        p.putpalette(palette)
        p.save(root / "SegmentationClass" / f"{ident}.png")
        Image.fromarray(lbl, "L").save(root / "SegmentationClassAug" / f"{ident}.png")
    sets = root / "ImageSets" / "Segmentation"
    for name, part in (("train", fine), ("train_aug", fine + extra), ("val", val)):
        (sets / f"{name}.txt").write_text("".join(f"{i}\n" for i in part))
    splits = root / "splits" / "pascal"
    splits.mkdir(parents=True, exist_ok=True)
    (splits / "val.txt").write_text(unimatch_voc_lines(val))
    (splits / "train_aug.txt").write_text(unimatch_voc_lines(fine + extra))
    return {"fine": fine, "train_aug": fine + extra, "val": val}


def write_voc_ids(root: Path, ids: list[str], size: tuple[int, int] = (40, 30),
                  seed: int = 0) -> dict[str, dict[str, np.ndarray]]:
    """``JPEGImages/<id>.jpg`` for ``ids``, ``SegmentationClass/<id>.png`` (P, VOC palette) and
    ``SegmentationClassAug/<id>.png`` (L) with labels drawn independently per folder. Returns
    ``{folder: {id: uint8 [h, w] labels}}``."""
    rng = np.random.default_rng(seed)
    w, h = size
    labels: dict[str, dict[str, np.ndarray]] = {"SegmentationClass": {}, "SegmentationClassAug": {}}
    for d in ("JPEGImages", *labels):
        (root / d).mkdir(parents=True, exist_ok=True)
    palette = voc_palette()
    for ident in ids:
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB").save(
            root / "JPEGImages" / f"{ident}.jpg", quality=95)
        for folder, found in labels.items():
            found[ident] = lbl = voc_label(rng, h, w)
            im = Image.fromarray(lbl, "P" if folder == "SegmentationClass" else "L")
            if folder == "SegmentationClass":
                im.putpalette(palette)
            im.save(root / folder / f"{ident}.png")
    return labels


def unimatch_splits() -> Path | None:
    """UniMatch's published ``splits/`` folder (``shared/splits/unimatch`` in a parent of this file), or None."""
    for parent in Path(__file__).resolve().parents:
        if (parent / "shared" / "splits" / "unimatch").is_dir():
            return parent / "shared" / "splits" / "unimatch"
    return None


def unimatch_voc_lines(ids: list[str], trailing_newline: bool = True) -> str:
    text = "\n".join(f"JPEGImages/{i}.jpg SegmentationClass/{i}.png" for i in ids)
    return text + "\n" if trailing_newline else text


def write_partition_files(directory: Path, labeled: str, unlabeled: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "labeled.txt").write_text(labeled)
    (directory / "unlabeled.txt").write_text(unlabeled)
    return directory


def train_ids(label_ids: np.ndarray) -> np.ndarray:
    out = np.full(label_ids.shape, 255, np.uint8)
    for lid, tid in CITYSCAPES_TRAIN_IDS.items():
        out[label_ids == lid] = tid
    return out


def write_cityscapes(root: Path, per_city: int = 2, size: tuple[int, int] = (64, 32), val_size: tuple[int, int] =
                     (96, 48), seed: int = 0, train_ids_files: bool = True) -> dict[str, list[str]]:
    """A Cityscapes tree under ``root``; returns canonical image paths of ``train`` and ``val``. Val images are
    larger (96x48 by default) so sliding-window evaluation with a 40-px window has several windows per axis."""
    rng = np.random.default_rng(seed)
    out: dict[str, list[str]] = {"train": [], "val": []}
    for split, cities, (w, h) in (("train", ("aachen", "bochum"), size), ("val", ("frankfurt",), val_size)):
        for city in cities:
            (root / "leftImg8bit" / split / city).mkdir(parents=True, exist_ok=True)
            (root / "gtFine" / split / city).mkdir(parents=True, exist_ok=True)
            for i in range(per_city):
                stem = f"{city}_{i:06d}_000019"
                image = f"leftImg8bit/{split}/{city}/{stem}_leftImg8bit.png"
                Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB").save(root / image)
                ids = np.kron(rng.integers(0, 34, (h // 4, w // 4)), np.ones((4, 4), np.int64)).astype(np.uint8)
                gt = root / "gtFine" / split / city
                Image.fromarray(ids, "L").save(gt / f"{stem}_gtFine_labelIds.png")
                if train_ids_files:
                    Image.fromarray(train_ids(ids), "L").save(gt / f"{stem}_gtFine_labelTrainIds.png")
                out[split].append(image)
    splits = root / "splits" / "cityscapes"
    splits.mkdir(parents=True, exist_ok=True)
    (splits / "val.txt").write_text(unimatch_city_lines(out["val"], trailing_newline=False))
    return out


def city_mask(image: str) -> str:
    return image.replace("leftImg8bit/", "gtFine/", 1).replace("_leftImg8bit.png", "_gtFine_labelTrainIds.png")


def unimatch_city_lines(images: list[str], trailing_newline: bool = True) -> str:
    text = "\n".join(f"{i} {city_mask(i)}" for i in images)
    return text + "\n" if trailing_newline else text
