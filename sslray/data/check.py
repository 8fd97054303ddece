"""The full data scan behind ``sslray data check``: every listed file read once, every problem one line.

    report = check_dataset("pascal", "/data/VOC2012", ["splits/pascal/92/labeled.txt", "splits/pascal/val.txt"])
    for path, message in report.errors:
        print(f"{path}: {message}")
    print(report.summary())

What is checked, per split file (its role -- labeled, unlabeled or val -- comes from its name, see
:func:`split_role`, or is given explicitly):

* the file itself: missing, unreadable, a line that no dialect parses, no samples;
* duplicate images within a file (``file:line``), the same image in a labeled and an unlabeled file, and any
  training image in a val file;
* every image: missing, unreadable or truncated (decoded to the last pixel);
* every mask of a labeled or val sample (unlabeled samples need none): missing, unreadable, not a P / L PNG,
  label values outside ``0..K-1`` other than the ignore value 255 (Cityscapes labelIds: outside 0..33), a size
  other than its image's. The mask is the file a two-column line names (the split file is the truth); only
  dialects without a mask column derive it (VOC bare ids: ``data.mask_dir``). The summary prints, per split, the
  mask folder it resolved to and how (``masks: SegmentationClass/ (named in the split file)``); an explicit
  ``mask_dir`` that a two-column file contradicts is one error for that file.

Decoding goes through the reader a trial uses (``FileSource.image`` / ``mask_array``), so what passes here is what
training reads. Images are decoded in a thread pool (PIL releases the GIL while decoding).

:class:`Report` is the API other tools build on: ``errors`` is a list of ``(path, message)`` -- ``path`` the
data file, or ``split_file:line`` for list problems -- in list order, and ``ok`` is ``not errors``.
"""
from __future__ import annotations

import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from sslray.config import DataConfig
from sslray.data.datasets import get_spec
from sslray.data.fingerprints import identify_list
from sslray.data.readers import DataError, FileSource, MissingDataError, SplitList
from sslray.data.splits import SplitEntry, read_split_rows

ROLES = ("labeled", "unlabeled", "val")


def split_role(path: str | os.PathLike) -> str:
    """``unlabeled`` if the file name mentions unlabel(l)ed or test (no public masks), ``val`` if a word of it is
    ``val``, else ``labeled`` (``labeled.txt``, ``train_aug.txt``, CPS ``train_aug_labeled_1-16.txt``)."""
    stem = Path(path).stem.lower()
    words = re.split(r"[^a-z0-9]+", stem)
    if any(w.startswith("unlabel") for w in words) or "test" in words:
        return "unlabeled"
    if "val" in words:
        return "val"
    return "labeled"


@dataclass
class SplitSummary:
    """One checked split file: its role, how many samples it lists, the published list it equals (or None), and
    where its masks were resolved to (``SplitList.masks``)."""

    path: str
    role: str
    samples: int
    standard: str | None
    masks: str = ""


@dataclass
class Report:
    """Result of :func:`check_dataset`."""

    dataset: str
    root: str
    class_names: tuple[str, ...]
    errors: list[tuple[str, str]] = field(default_factory=list)
    splits: list[SplitSummary] = field(default_factory=list)
    images_checked: int = 0
    masks_checked: int = 0
    class_pixels: list[int] = field(default_factory=list)  # per class, over every decoded mask
    ignore_pixels: int = 0

    @property
    def ok(self) -> bool:
        return not self.errors

    def error_lines(self) -> list[str]:
        return [f"{path}: {message}" for path, message in self.errors]

    def summary(self) -> str:
        """Counts per split file, files checked, error count and the class histogram (share of labeled pixels)."""
        lines = [f"{self.dataset} at {self.root}"]
        for s in self.splits:
            std = f", = {s.standard}" if s.standard else ""
            masks = f"; masks: {s.masks}" if s.masks else ""
            lines.append(f"  {s.path}: {s.samples} {s.role} samples{std}{masks}")
        lines.append(f"  {self.images_checked} images and {self.masks_checked} masks read; "
                     f"{len(self.errors)} error{'s' if len(self.errors) != 1 else ''}")
        total = sum(self.class_pixels)
        if total:
            lines.append("  class histogram (share of labeled pixels; ignore "
                         f"{100.0 * self.ignore_pixels / (total + self.ignore_pixels):.1f}% of all):")
            width = max(len(n) for n in self.class_names)
            for name, count in zip(self.class_names, self.class_pixels):
                lines.append(f"    {name:<{width}} {100.0 * count / total:6.2f}%  {count}")
        return "\n".join(lines)


def check_dataset(name: str, root: str | os.PathLike, split_files: Sequence[str | os.PathLike] = (), *,
                  roles: Mapping[str, str] | None = None, splits_dir: str | os.PathLike | None = None,
                  mask_dir: str | None = None, workers: int | None = None) -> Report:
    """Scan ``split_files`` of dataset ``name`` under ``root`` and report every problem.

    Args:
        name: a registered on-disk dataset (``pascal``, ``cityscapes``, ``synthetic_voc``).
        root: the dataset root.
        split_files: list files in any dialect of the dataset. Empty: the validation list and the train pool a
            trial would read (``splits_dir`` / the root's own lists).
        roles: ``{path: role}`` overriding :func:`split_role` for some files.
        splits_dir, mask_dir: as ``data.splits_dir`` / ``data.mask_dir``.
        workers: decoding threads (default: up to 8, one per CPU).

    Returns a :class:`Report`; problems are never raised (except an unknown or in-memory dataset name).
    """
    spec = get_spec(name)
    report = Report(dataset=name, root=str(root), class_names=spec.class_names,
                    class_pixels=[0] * spec.num_classes)
    try:
        source = spec.make_source(DataConfig(dataset=name, root=str(root), splits_dir=splits_dir and str(splits_dir),
                                             mask_dir=mask_dir))
    except DataError as e:
        report.errors.append((e.path, e.message))
        return report
    if not isinstance(source, FileSource):
        raise ValueError(f"{name} is generated in memory; there are no files to check")
    lists = _read_lists(source, split_files, roles or {}, report)
    _check_lists(source, lists, report)
    _scan_files(source, lists, report, workers or min(8, os.cpu_count() or 1))
    return report


def _read_lists(source: FileSource, split_files: Sequence[str | os.PathLike], roles: Mapping[str, str],
                report: Report) -> list[tuple[SplitList, str]]:
    """Each split file resolved, with its role; unreadable files and bad lines become errors."""
    if not split_files:
        pairs = []
        for what, get in (("val", source.val_list), ("labeled", source.pool_list)):
            try:
                pairs.append((get(), what))
            except DataError as e:
                report.errors.append((e.path, e.message))
        for lst, role in pairs:
            report.splits.append(SplitSummary(lst.path, role, len(lst.entries), _standard(source, lst), lst.masks))
        return pairs
    out = []
    for f in split_files:
        role = roles.get(str(f), split_role(f))
        if role not in ROLES:
            raise ValueError(f"{f}: unknown role {role!r} (expected one of {', '.join(ROLES)})")
        lst = _read_one(source, Path(f), report)
        if lst is None:
            continue
        if not lst.entries:
            report.errors.append((str(f), "no samples listed"))
        report.splits.append(SplitSummary(str(f), role, len(lst.entries), _standard(source, lst), lst.masks))
        out.append((lst, role))
    return out


def _read_one(source: FileSource, path: Path, report: Report) -> SplitList | None:
    """Resolve a split file line by line, so one bad line is one error and the rest is still checked."""
    bad: list[tuple[int, str]] = []
    try:
        rows = read_split_rows(path, errors=bad)
    except FileNotFoundError:
        report.errors.append((str(path), "missing split file"))
        return None
    except (OSError, UnicodeDecodeError) as e:
        report.errors.append((str(path), f"unreadable split file: {e}"))
        return None
    report.errors.extend((f"{path}:{n}", message) for n, message in bad)
    return source.make_list(path, rows, errors=report.errors)


def _standard(source: FileSource, lst: SplitList) -> str | None:
    key = identify_list(source.dataset, (e.image for e in lst.entries)) if source.dataset else None
    return f"unimatch:{key}" if key else None


def _check_lists(source: FileSource, lists: list[tuple[SplitList, str]], report: Report) -> None:
    """Duplicates within a file, labeled/unlabeled overlap, training images in a val list."""
    first_seen: dict[str, dict[str, str]] = {r: {} for r in ROLES}  # role -> image -> "file:line"
    for lst, role in lists:
        here: dict[str, int] = {}
        for e, n in zip(lst.entries, lst.lines):
            if e.image in here:
                report.errors.append((f"{lst.path}:{n}", f"duplicate of line {here[e.image]}: {e.image}"))
                continue
            here[e.image] = n
            first_seen[role].setdefault(e.image, f"{lst.path}:{n}")
    for image, where in first_seen["unlabeled"].items():
        if image in first_seen["labeled"]:
            report.errors.append((where, f"{image} is also labeled ({first_seen['labeled'][image]})"))
    for role in ("labeled", "unlabeled"):
        for image, where in first_seen[role].items():
            if image in first_seen["val"]:
                report.errors.append((where, f"{image} is a validation image ({first_seen['val'][image]}) "
                                             f"listed as {role} training data"))


def _scan_files(source: FileSource, lists: list[tuple[SplitList, str]], report: Report, workers: int) -> None:
    """Decode every distinct (image, mask) pair once -- the mask only for labeled / val samples. Two lists that
    pair one image with different masks get both masks checked, each named by its own list."""
    samples: dict[tuple[str, str | None], tuple[SplitEntry, bool, str]] = {}  # -> (entry, needs mask, "file:line")
    for lst, role in lists:
        for e, n in zip(lst.entries, lst.lines):
            needs, key = role != "unlabeled", (e.image, e.mask)
            if key not in samples or (needs and not samples[key][1]):
                samples[key] = (e, needs, f"{lst.path}:{n}")
    hist = np.zeros(256, np.int64)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for errors, counts, n_masks in pool.map(lambda s: _check_sample(source, *s), samples.values()):
            report.errors.extend(errors)
            report.images_checked += 1
            report.masks_checked += n_masks
            if counts is not None:
                hist += counts
    k = len(report.class_names)
    report.class_pixels = hist[:k].tolist()
    report.ignore_pixels = int(hist[255])


def _check_sample(source: FileSource, entry: SplitEntry, needs_mask: bool,
                  listed: str) -> tuple[list[tuple[str, str]], np.ndarray | None, int]:
    """(errors, value histogram int64 [256] of the mask or None, masks read) for one sample."""
    errors: list[tuple[str, str]] = []
    size = None
    try:
        img = source.image(entry)
        size = img.size
    except DataError as e:
        errors.append((e.path, f"{e.message} (listed in {listed})"))
    if not needs_mask:
        return errors, None, 0
    if entry.mask is None:
        errors.append((str(source.root / entry.image), f"no mask listed for a labeled/val sample ({listed})"))
        return errors, None, 0
    try:
        arr, path = source.mask_array(entry)
    except MissingDataError as e:
        errors.append((e.path, f"{e.message} (listed in {listed}){source.missing_mask_hint(entry)}"))
        return errors, None, 0
    except DataError as e:
        errors.append((e.path, e.message))
        return errors, None, 1
    if size is not None and arr.shape != (size[1], size[0]):
        errors.append((str(path), f"mask is {arr.shape[1]}x{arr.shape[0]} but its image is {size[0]}x{size[1]}"))
    return errors, np.bincount(arr.ravel(), minlength=256), 1
