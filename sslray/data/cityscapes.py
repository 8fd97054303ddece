"""Cityscapes in the cityscapesScripts layout (``datasets.md`` section 2):
``leftImg8bit/<split>/<city>/<city>_<seq>_<frame>_leftImg8bit.png`` and
``gtFine/<split>/<city>/<city>_<seq>_<frame>_gtFine_labelTrainIds.png`` (19 classes, 255 ignore).

Masks: ``*_gtFine_labelTrainIds.png`` when present, else the official ``*_gtFine_labelIds.png`` (ids 0..33) mapped
through :data:`LABEL_ID_TO_TRAIN_ID` with a 256-entry uint8 table (any other byte -> 255), so a root straight from
``gtFine.zip`` works without running ``createTrainIdLabelImgs``.

Split-file dialects (section 2.3), all resolved to the canonical image path and a mask:

* UniMatch / CorrMatch: ``leftImg8bit/train/jena/jena_000078_000019_leftImg8bit.png gtFine/.../..._labelTrainIds.png``
  -- the split file is the truth: the mask is the file its second column names, as written (a missing
  ``*_labelTrainIds.png`` falls back to the ``*_labelIds.png`` beside it, see above);
* U2PL / AugSeg: the image path alone (the labelTrainIds mask path is derived from it);
* CPS: ``/images/train/jena_000078_000019.png<TAB>/segmentation/train/jena_000078_000019_gtFine.png`` -- CPS's
  re-packaged copy; the sample is read from the standard layout (CPS's own folders are not a supported root);
* UniMatch-V2: a second column ``None`` (``train_extra``, coarse only): an unlabeled sample without mask.

Lists: ``<splits>/val.txt`` or a scan of ``leftImg8bit/val``; the pool is ``<splits>/train.txt`` (or V2's
``all/train.txt``) or a scan of ``leftImg8bit/train`` (2,975 images). Partitions draw labeled images from the pool.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

from sslray.data.readers import DataError, FileSource, SplitList, describe_masks, some_values
from sslray.data.splits import SplitEntry

CLASS_NAMES = ("road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
               "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle")
NUM_CLASSES = len(CLASS_NAMES)
PALETTE = ((128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153), (153, 153, 153),
           (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152), (70, 130, 180), (220, 20, 60), (255, 0, 0),
           (0, 0, 142), (0, 0, 70), (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32))

# cityscapesScripts helpers/labels.py: label id 0..33 -> train id (255 = ignore)
LABEL_ID_TO_TRAIN_ID = (255, 255, 255, 255, 255, 255, 255, 0, 1, 255, 255, 2, 3, 4, 255, 255, 255, 5, 255, 6, 7, 8, 9,
                        10, 11, 12, 13, 14, 15, 255, 255, 16, 17, 18)
MAX_LABEL_ID = len(LABEL_ID_TO_TRAIN_ID) - 1
LUT = np.full(256, 255, np.uint8)
LUT[:len(LABEL_ID_TO_TRAIN_ID)] = LABEL_ID_TO_TRAIN_ID

_IMAGE = re.compile(r"leftImg8bit/(?P<split>[^/]+)/(?P<city>[^/]+)/(?P<stem>[^/]+)_leftImg8bit\.png")
_CPS_IMAGE = re.compile(r"images/(?P<split>[^/]+)/(?P<stem>[^/]+)\.png")
_TRAIN_IDS, _LABEL_IDS = "_gtFine_labelTrainIds.png", "_gtFine_labelIds.png"
DERIVED = "derived from the image paths"  # SplitList.masks of dialects without a usable mask column


def image_path(split: str, stem: str) -> str:
    """``leftImg8bit/<split>/<city>/<stem>_leftImg8bit.png`` for ``stem`` = ``<city>_<seq>_<frame>``."""
    city = stem.rsplit("_", 2)[0]
    return f"leftImg8bit/{split}/{city}/{stem}_leftImg8bit.png"


def mask_path(image: str) -> str | None:
    """The labelTrainIds mask of a canonical image path, or None if the path is not canonical."""
    m = _IMAGE.fullmatch(image)
    return None if m is None else f"gtFine/{m['split']}/{m['city']}/{m['stem']}{_TRAIN_IDS}"


class CityscapesSource(FileSource):
    dataset = "cityscapes"
    split_subdir = "cityscapes"

    def __init__(self, root: str | os.PathLike | None, splits_dir: str | os.PathLike | None = None):
        super().__init__(root, NUM_CLASSES, splits_dir)

    def resolve(self, cols: tuple[str, ...], where: str) -> SplitEntry:
        first = cols[0].lstrip("/")
        cps = _CPS_IMAGE.fullmatch(first)
        image = image_path(cps["split"], cps["stem"]) if cps else first
        if len(cols) == 2 and cols[1] == "None":
            return SplitEntry(image, None, where or None)
        if len(cols) == 2 and not cps:
            return SplitEntry(image, cols[1].lstrip("/"), where or None)
        mask = mask_path(image)
        if mask is None:
            raise ValueError(f"{where}: cannot derive the mask of {cols[0]!r} (expected "
                             "leftImg8bit/<split>/<city>/<city>_<seq>_<frame>_leftImg8bit.png)")
        return SplitEntry(image, mask, where or None)

    def mask_origin(self, cols: tuple[str, ...]) -> str | None:
        if len(cols) == 2 and cols[1] == "None":
            return None
        if len(cols) == 2 and not _CPS_IMAGE.fullmatch(cols[0].lstrip("/")):
            return super().mask_origin(cols)
        return DERIVED if len(cols) == 1 else f"{DERIVED} (CPS's mask column names its own re-packaged tree)"

    def val_candidates(self) -> list[Path]:
        return self.in_splits("val.txt")

    def pool_candidates(self) -> list[Path]:
        return self.in_splits("train.txt", "all/train.txt")

    def scan(self, what: str) -> SplitList | None:
        split = {"val": "val", "pool": "train"}.get(what)
        if split is None:
            return None
        folder = self.root / "leftImg8bit" / split
        images = sorted(p.relative_to(self.root).as_posix() for p in folder.glob("*/*_leftImg8bit.png"))
        if not images:
            return None
        entries = tuple(SplitEntry(i, mask_path(i)) for i in images)
        return SplitList(str(folder), entries, (0,) * len(entries), describe_masks(entries, [DERIVED] * len(entries)))

    def mask_files(self, entry: SplitEntry) -> list[tuple[str, bool]]:
        m = entry.mask
        if m.endswith(_LABEL_IDS):
            return [(m, True)]
        if m.endswith(_TRAIN_IDS):
            return [(m, False), (m[: -len(_TRAIN_IDS)] + _LABEL_IDS, True)]
        return [(m, False)]

    def to_train_ids(self, raw: np.ndarray, path: Path) -> np.ndarray:
        """labelIds uint8 [H, W] -> trainIds uint8 [H, W]; ids above 33 are an error (not a labelIds file)."""
        bad = raw > MAX_LABEL_ID
        if bad.any():
            raise DataError(path, f"label ids {some_values(raw[bad])} outside 0..{MAX_LABEL_ID}")
        return LUT[raw]
