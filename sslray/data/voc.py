"""Pascal VOC 2012 (and anything else in its layout): ``JPEGImages/<id>.jpg`` + ``<mask_dir>/<id>.png``.

Layouts (``datasets.md`` section 1.1): UniMatch's root holds ``JPEGImages`` and ``SegmentationClass`` (the
augmented masks of all 10,582 + 1,449 ids); the official tree adds ``SegmentationClassAug`` (grayscale masks of
the same ids, U2PL / AugSeg / mmseg) while its ``SegmentationClass`` holds only the 2,913 official VOC masks.

Split-file dialects (section 1.4) and the mask each sample is read from:

* UniMatch / ST++ / CorrMatch: ``JPEGImages/2007_000032.jpg SegmentationClass/2007_000032.png`` -- the split file
  is the truth: the mask is the file its second column names, as written (``data check`` and trials read the
  same file);
* U2PL / AugSeg / CPS / mmseg: a bare id per line (``2007_000032``), LF or CRLF -- ``JPEGImages/<id><ext>`` +
  ``<mask_dir>/<id>.png``, where the mask folder is ``data.mask_dir`` or, unset, ``SegmentationClassAug`` when the
  root has one, else ``SegmentationClass``;
* a second column ``None``: a sample without mask (unlabeled only).

``data.mask_dir`` set explicitly and a two-column line naming a mask in another folder is an error
(:class:`~sslray.data.readers.MaskDirConflict`, once per file, naming the line): the run's config would otherwise
record one folder while it read another. To use UniMatch's lists with the official tree (their lines say
``SegmentationClass/`` also for the 9,118 SBD ids only ``SegmentationClassAug`` has), rewrite the mask column of a
copy (``sed 's# SegmentationClass/# SegmentationClassAug/#'``); the copies are still recognised as the published
splits (fingerprints cover the image column only). A missing mask whose name exists in the other folder says so.

Lists: ``<splits>/val.txt`` or ``ImageSets/Segmentation/val.txt``; the pool is ``<splits>/train_aug.txt`` (or
UniMatch-V2's ``all/labeled.txt``, mmseg's ``ImageSets/Segmentation/train_aug.txt`` / ``trainaug.txt``).
Generated partitions follow the two protocols' naming: a count (``92``, ``200``) draws its labeled images from the
1,464 finely annotated ones (``<splits>/1464/labeled.txt`` or ``ImageSets/Segmentation/train.txt``; the classic
protocol), a ratio (``1_16``, ``0.1``) from the whole train_aug pool (blended); the rest of train_aug is unlabeled.
"""
from __future__ import annotations

import os
import re
from pathlib import Path, PurePosixPath

import numpy as np

from sslray.data.readers import FileSource, MaskDirConflict
from sslray.data.splits import SplitEntry

CLASS_NAMES = ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "dining table", "dog", "horse", "motorbike", "person", "potted plant", "sheep", "sofa", "train",
               "tv/monitor")
NUM_CLASSES = len(CLASS_NAMES)
MASK_DIRS = ("SegmentationClass", "SegmentationClassAug")


def color_map(n: int = 256) -> np.ndarray:
    """The VOC palette, uint8 [n, 3]: bits 0/1/2 of the index, 3 at a time, fill R/G/B from the top bit down.

    0 (0, 0, 0), 1 (128, 0, 0), 2 (0, 128, 0), ..., 20 (0, 64, 128), 255 (224, 224, 192).
    """
    cmap = np.zeros((n, 3), np.uint8)
    for i in range(n):
        c, rgb = i, [0, 0, 0]
        for j in range(8):
            for ch in range(3):
                rgb[ch] |= ((c >> ch) & 1) << (7 - j)
            c >>= 3
        cmap[i] = rgb
    return cmap


PALETTE = tuple(tuple(int(v) for v in c) for c in color_map(NUM_CLASSES))


class VOCSource(FileSource):
    """Reader of a VOC-layout root; ``dataset`` names its fingerprint namespace (``pascal``, or "" for others)."""

    split_subdir = "pascal"

    def __init__(self, root: str | os.PathLike | None, num_classes: int = NUM_CLASSES,
                 splits_dir: str | os.PathLike | None = None, mask_dir: str | None = None, image_ext: str = ".jpg",
                 dataset: str = "pascal"):
        self.dataset = dataset
        super().__init__(root, num_classes, splits_dir)
        self.mask_dir_set = mask_dir is not None  # explicit data.mask_dir: two-column lines must agree with it
        if mask_dir is None:
            mask_dir = "SegmentationClassAug" if (self.root / "SegmentationClassAug").is_dir() else "SegmentationClass"
        if not mask_dir or "/" in mask_dir.strip("/") or any(c.isspace() for c in mask_dir):
            raise ValueError(f"data.mask_dir: expected a folder name under the root, got {mask_dir!r}")
        self.mask_dir, self.image_ext = mask_dir.strip("/"), image_ext

    def resolve(self, cols: tuple[str, ...], where: str) -> SplitEntry:
        if len(cols) == 1:  # bare id (or a lone image path): the mask follows from the id and data.mask_dir
            ident = PurePosixPath(cols[0]).stem
            return SplitEntry(f"JPEGImages/{ident}{self.image_ext}", f"{self.mask_dir}/{ident}.png", where or None)
        image, mask = cols[0].lstrip("/"), cols[1].lstrip("/")
        if cols[1] == "None":
            return SplitEntry(image, None, where or None)
        if self.mask_dir_set and mask.partition("/")[0] != self.mask_dir:
            raise MaskDirConflict(where, f"the split names mask {mask} but data.mask_dir is {self.mask_dir!r}; "
                                         "data.mask_dir applies only to split files without a mask column (bare ids): "
                                         "unset it to read the masks the split names, or rewrite the split's mask "
                                         "column", SplitEntry(image, mask, where or None))
        return SplitEntry(image, mask, where or None)  # the split file is the truth: the mask it names, as written

    def mask_origin(self, cols: tuple[str, ...]) -> str | None:
        if len(cols) == 1:
            if self.mask_dir_set:
                return "bare ids + data.mask_dir"
            found = "is" if self.mask_dir == "SegmentationClassAug" else "is not"
            return f"bare ids + data.mask_dir unset: SegmentationClassAug {found} under the root"
        return super().mask_origin(cols)

    def missing_mask_hint(self, entry: SplitEntry) -> str:
        head, _, rest = entry.mask.partition("/")
        for other in MASK_DIRS:
            if head in MASK_DIRS and other != head and (self.root / other / rest).is_file():
                return f" -- {other}/{rest} exists, but the list points at {head}/"
        return ""

    def val_candidates(self) -> list[Path]:
        return self.in_splits("val.txt") + [self.root / "ImageSets" / "Segmentation" / "val.txt"]

    def pool_candidates(self) -> list[Path]:
        sets = self.root / "ImageSets" / "Segmentation"
        return self.in_splits("train_aug.txt", "all/labeled.txt") + [sets / "train_aug.txt", sets / "trainaug.txt"]

    def labeled_pool_candidates(self, spec: str) -> list[Path] | None:
        if not re.fullmatch(r"\d+", spec):
            return None  # a ratio: blended protocol, labeled drawn from the whole pool
        return self.in_splits("1464/labeled.txt") + [self.root / "ImageSets" / "Segmentation" / "train.txt"]
