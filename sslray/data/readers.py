"""What the on-disk readers (Pascal VOC, Cityscapes) share: split lists in every dialect, where the lists are found,
partitions (published files or seeded draws), image / mask decoding, and the cheap checks run at trial start.

Lists. A split file is parsed with :func:`sslray.data.splits.split_rows` (CRLF, tabs, missing final newline all
fine) and each row's columns are turned into a canonical :class:`SplitEntry` by the dataset's ``resolve`` -- the
UniMatch image path plus the mask path (or None), with the ``file:line`` it came from -- so every dialect of the
same images gives the same image paths and the same fingerprint (``fingerprints.py``).

Split files are the truth about masks: a two-column line (``JPEGImages/x.jpg SegmentationClass/x.png``) names the
mask file that trials read and ``sslray data check`` checks, as written; only dialects without a mask column
(bare ids, image paths alone) get a mask path derived by the reader (VOC: ``data.mask_dir``). Each list carries a
one-line description of where its masks are (``SplitList.masks``), which ``sslray data check`` prints.

Where lists come from. With ``data.splits_dir`` set, ``<splits_dir>/<dataset>/`` (or ``<splits_dir>/`` itself when
it has no such sub-folder) is read in UniMatch's layout: ``val.txt``, ``<partition>/{labeled,unlabeled}.txt`` and
the pool list (``train_aug.txt`` for Pascal). Each dataset adds fallbacks under the root (VOC's
``ImageSets/Segmentation/*.txt``, a scan of Cityscapes' ``leftImg8bit/<split>``).

Partitions. ``partition("92", seed)`` reads ``<splits>/92/{labeled,unlabeled}.txt`` when that file exists and
recognises the published split by fingerprint (a file under a published name that differs from it gives a
:class:`NonStandardSplitWarning`); a published name that is missing from a given ``splits_dir`` is an error (a
silently re-drawn "92" would not be the paper's split); anything else is a seeded draw from the pool
(:func:`sslray.data.splits.generate_partition`).

Masks. ``np.array(Image.open(p))`` gives class ids for palette (P) and grayscale (L) PNGs alike (never
``convert("L")``, which turns a palette into luminance); any other mode is an error. Every decoded mask is checked
against ``0..K-1`` and 255, so a wrong label encoding stops a trial at its first batch with the file named instead
of training on garbage.
"""
from __future__ import annotations

import os
import warnings
from abc import ABC, abstractmethod
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from sslray.data.fingerprints import STANDARD_PARTITIONS, UNIMATCH, fingerprint, identify_partition
from sslray.data.splits import Partition, SplitEntry, generate_partition, read_split_rows

IGNORE = 255
NAMED = "named in the split file"  # SplitList.masks: the split's mask column, read as written


class DataError(ValueError):
    """Bad data on disk, one line naming the file: ``<path>: <problem>``."""

    def __init__(self, path: str | os.PathLike, message: str):
        self.path, self.message = str(path), message
        super().__init__(f"{path}: {message}")

    def __reduce__(self):  # pickle with the constructor's arguments (Ray and DataLoader workers send errors back)
        return type(self), (self.path, self.message)


class MissingDataError(DataError):
    """A listed image, mask or list file does not exist."""


class MaskDirConflict(DataError):
    """A split line names a mask outside the explicitly set mask folder (``data.mask_dir``); ``entry`` is the
    sample as the line names it."""

    def __init__(self, path: str | os.PathLike, message: str, entry: SplitEntry):
        super().__init__(path, message)
        self.entry = entry

    def __reduce__(self):
        return type(self), (self.path, self.message, self.entry)


class NonStandardSplitWarning(UserWarning):
    """A list under a published name (``92``, ``val``) is not the published one, or a published name was drawn."""


@dataclass(frozen=True)
class SplitList:
    """Resolved entries of one list file with the 1-based line each came from (0 for scanned lists), and ``masks``:
    where their masks are and who said so (``SegmentationClass/ (named in the split file)``)."""

    path: str
    entries: tuple[SplitEntry, ...]
    lines: tuple[int, ...]
    masks: str = ""


def describe_masks(entries: Sequence[SplitEntry], origins: Sequence[str | None]) -> str:
    """One line: the mask folder(s) of ``entries`` and, per ``origins`` (one per entry, None for no mask), how
    they were resolved, e.g. ``SegmentationClass/ (named in the split file)``; folders with a common parent are
    shown by it (``gtFine/train/ (18 sub-folders)``), others listed with their counts."""
    folders: dict[str, int] = {}
    for e in entries:
        if e.mask is not None:
            parent = e.mask.rpartition("/")[0] or "."
            folders[parent] = folders.get(parent, 0) + 1
    how: dict[str, int] = {}
    for o in origins:
        if o is not None:
            how[o] = how.get(o, 0) + 1
    none = sum(e.mask is None for e in entries)
    if not folders:
        return "no masks listed"
    common = os.path.commonpath(list(folders)) if "." not in folders else ""
    if len(folders) == 1:
        where = f"{next(iter(folders))}/"
    elif common:
        where = f"{common}/ ({len(folders)} sub-folders)"
    else:
        where = ", ".join(f"{f}/ ({n})" for f, n in folders.items())
    if len(how) == 1:
        where += f" ({next(iter(how))})"
    elif how:
        where += " (" + "; ".join(f"{o}: {n} lines" for o, n in how.items()) + ")"
    return where + (f"; {none} samples without mask" if none else "")


class FileSource(ABC):
    """Base of the on-disk readers. Subclasses set ``dataset`` / ``split_subdir`` and implement ``resolve``,
    ``val_candidates`` and ``pool_candidates``; they may override ``labeled_pool_candidates``, ``scan`` and
    ``mask_files``. Instances pickle (DataLoader workers, Ray): they hold paths and lists, no open files."""

    dataset = ""  # fingerprint namespace ("pascal", "cityscapes"); "" for datasets without published splits
    split_subdir = ""  # the folder of this dataset under a UniMatch-layout splits_dir

    def __init__(self, root: str | os.PathLike | None, num_classes: int, splits_dir: str | os.PathLike | None = None):
        if root is None:
            raise ValueError(f"data.root: the {self.dataset or type(self).__name__} reader needs the dataset root "
                             "directory")
        self.root = Path(root)
        if not self.root.is_dir():
            raise MissingDataError(self.root, "data.root is not a directory")
        self.splits_dir = Path(splits_dir) if splits_dir else None
        if self.splits_dir is not None and not self.splits_dir.is_dir():
            raise MissingDataError(self.splits_dir, "data.splits_dir is not a directory")
        self.num_classes = num_classes
        self.valid = np.zeros(256, bool)  # valid[v]: v may appear in a decoded mask
        self.valid[:num_classes] = True
        self.valid[IGNORE] = True
        self._lists: dict[str, SplitList] = {}

    # ---------------------------------------------------------------------------------------------- subclass hooks

    @abstractmethod
    def resolve(self, cols: tuple[str, ...], where: str) -> SplitEntry:
        """Canonical entry of one split-file row (1 or 2 columns); ValueError naming ``where`` if impossible."""

    @abstractmethod
    def val_candidates(self) -> list[Path]:
        """Validation list files, in order of preference."""

    @abstractmethod
    def pool_candidates(self) -> list[Path]:
        """Train pool list files (what partitions are drawn from), in order of preference."""

    def labeled_pool_candidates(self, spec: str) -> list[Path] | None:
        """Files of the pool that partition ``spec`` draws its labeled samples from; None: the whole pool."""
        return None

    def scan(self, what: str) -> SplitList | None:
        """A list found by scanning the root when no list file exists (``what``: val or pool); None: no scan."""
        return None

    def mask_origin(self, cols: tuple[str, ...]) -> str | None:
        """How the mask of a split-file row is found, in words (for ``SplitList.masks``); None: no mask.

        Default: a second column other than ``None`` is the mask path, read as written."""
        return NAMED if len(cols) == 2 and cols[1] != "None" else None

    def missing_mask_hint(self, entry: SplitEntry) -> str:
        """Extra words for a missing mask error (e.g. where a file of that name does exist); "" for none."""
        return ""

    def mask_files(self, entry: SplitEntry) -> list[tuple[str, bool]]:
        """``(relative mask path, is raw label ids)`` to try in order; raw ids go through :meth:`to_train_ids`."""
        return [(entry.mask, False)]

    def to_train_ids(self, raw: np.ndarray, path: Path) -> np.ndarray:
        """Map raw label ids (e.g. Cityscapes labelIds) to class ids; only called for ``is raw`` mask files."""
        raise DataError(path, f"{type(self).__name__} has no raw label ids to convert")

    # ---------------------------------------------------------------------------------------------- lists

    def splits_root(self) -> Path | None:
        """``<splits_dir>/<split_subdir>`` if that folder exists, else ``splits_dir`` (None when unset)."""
        if self.splits_dir is None:
            return None
        sub = self.splits_dir / self.split_subdir if self.split_subdir else None
        return sub if sub is not None and sub.is_dir() else self.splits_dir

    def in_splits(self, *names: str) -> list[Path]:
        """``names`` under :meth:`splits_root` (``[]`` without a splits_dir)."""
        root = self.splits_root()
        return [] if root is None else [root / n for n in names]

    def read_list(self, path: str | os.PathLike) -> SplitList:
        """Every row of a split file, resolved (MissingDataError if the file does not exist; ValueError naming
        ``file:line`` at the first row that cannot be resolved)."""
        path = Path(path)
        try:
            rows = read_split_rows(path)
        except FileNotFoundError:
            raise MissingDataError(path, "missing split file") from None
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(path, f"unreadable split file: {e}") from None
        return self.make_list(path, rows)

    def make_list(self, path: str | os.PathLike, rows: Sequence[tuple[int, tuple[str, ...]]],
                  errors: list[tuple[str, str]] | None = None) -> SplitList:
        """Resolve ``(line, columns)`` rows of the split file ``path``; each entry records its ``file:line``.

        Without ``errors`` the first row that cannot be resolved raises; with it, each such row is appended there
        as ``(file:line, message)`` and skipped -- except a :class:`MaskDirConflict`, reported once per file (at
        its first line, with the count: one setting disagrees with the file) and kept as the line names it, so
        ``sslray data check`` still checks the masks the split names.
        """
        entries, lines, origins = [], [], []
        conflicts: list[tuple[str, str]] = []
        for n, cols in rows:
            where = f"{path}:{n}"
            try:
                entry = self.resolve(cols, where)
            except MaskDirConflict as e:
                if errors is None:
                    raise
                conflicts.append((where, e.message))
                entry = e.entry
            except ValueError as e:
                if errors is None:
                    raise
                errors.append((where, str(e).removeprefix(f"{where}: ")))
                continue
            entries.append(entry if entry.where == where else replace(entry, where=where))
            lines.append(n)
            origins.append(self.mask_origin(cols))
        if conflicts:
            more = f" (and {len(conflicts) - 1} more lines)" if len(conflicts) > 1 else ""
            errors.append((conflicts[0][0], conflicts[0][1] + more))
        return SplitList(str(path), tuple(entries), tuple(lines), describe_masks(entries, origins))

    def _find(self, what: str, candidates: Sequence[Path]) -> SplitList:
        if what not in self._lists:
            found = next((p for p in candidates if p.is_file()), None)
            lst = self.read_list(found) if found is not None else self.scan(what)
            if lst is None:
                tried = ", ".join(str(p) for p in candidates)
                raise MissingDataError(candidates[0] if candidates else self.root,
                                       f"no {what} list found ({f'tried {tried}; ' if tried else ''}"
                                       "set data.splits_dir to a folder of split files)")
            self._lists[what] = lst
        return self._lists[what]

    def val_list(self) -> SplitList:
        return self._find("val", self.val_candidates())

    def pool_list(self) -> SplitList:
        return self._find("pool", self.pool_candidates())

    def labeled_pool_list(self, spec: str) -> SplitList | None:
        candidates = self.labeled_pool_candidates(spec)
        return None if candidates is None else self._find(f"labeled pool ({spec})", candidates)

    # Source protocol (datasets.py)
    def train_pool(self) -> list[SplitEntry]:
        return list(self.pool_list().entries)

    def val_entries(self) -> list[SplitEntry]:
        return list(self.val_list().entries)

    # ---------------------------------------------------------------------------------------------- partitions

    def partition_dir(self, spec: str) -> Path | None:
        """``<splits>/<spec>`` when it holds ``labeled.txt``; None otherwise."""
        root = self.splits_root()
        if root is None or not spec or "/" in spec or spec in (".", ".."):
            return None
        d = root / spec
        return d if (d / "labeled.txt").is_file() else None

    def partition(self, spec: str, seed: int) -> Partition:
        """The partition named ``spec``: the split files under ``splits_dir`` when present, else a seeded draw.

        ``origin`` is the folder of the files or ``generated from <pool list>``; ``standard`` names the published
        split the samples equal (any name: a renamed copy is still recognised).
        """
        spec = str(spec).strip()
        published = spec in STANDARD_PARTITIONS.get(self.dataset, ())
        d = self.partition_dir(spec)
        if d is not None:
            lab, unl = self.read_list(d / "labeled.txt"), self.read_list(d / "unlabeled.txt")
            standard = identify_partition(self.dataset, [e.image for e in lab.entries],
                                          [e.image for e in unl.entries])
            if published and standard != f"unimatch:{self.dataset}/{spec}":
                warnings.warn(NonStandardSplitWarning(
                    f"{d}: partition {spec!r} differs from the published UniMatch split of that name "
                    f"({len(lab.entries)} labeled / {len(unl.entries)} unlabeled)"), stacklevel=2)
            return Partition(lab.entries, unl.entries, name=spec, origin=str(d), standard=standard)
        root = self.splits_root()
        if published and root is not None:
            raise MissingDataError(root / spec / "labeled.txt",
                                   f"missing split file of the published partition {spec!r} (data.splits_dir)")
        pool = self.pool_list()
        lab_pool = self.labeled_pool_list(spec)
        try:
            p = generate_partition(pool.entries, spec, seed, lab_pool.entries if lab_pool else None)
        except ValueError as e:
            hint = " (a published split: set data.splits_dir to a folder holding it)" if published else ""
            raise ValueError(f"data.partition: {e}{hint}") from None
        if published:
            warnings.warn(NonStandardSplitWarning(
                f"partition {spec!r} of {self.dataset} was drawn with split_seed {seed}, not read from the published "
                "split files (set data.splits_dir to use them)"), stacklevel=2)
        origin = f"generated from {pool.path}" + (f", labeled from {lab_pool.path}" if lab_pool else "")
        standard = identify_partition(self.dataset, [e.image for e in p.labeled], [e.image for e in p.unlabeled])
        return replace(p, origin=origin, standard=standard)

    def check_val_standard(self) -> str | None:
        """Warn when a dataset with a published val list is validated on another list; the published name or None."""
        key = f"{self.dataset}/val"
        if key not in UNIMATCH:
            return None
        val = self.val_list()
        if fingerprint(e.image for e in val.entries) == UNIMATCH[key]:
            return f"unimatch:{key}"
        warnings.warn(NonStandardSplitWarning(
            f"{val.path}: {len(val.entries)} validation samples, not the published {self.dataset} val list "
            f"({UNIMATCH[key][0]}); numbers will not be comparable with the papers'"), stacklevel=2)
        return None

    # ---------------------------------------------------------------------------------------------- decoding

    def image(self, entry: SplitEntry) -> Image.Image:
        """The RGB image, fully decoded (a truncated file raises here, not later)."""
        path = self.root / entry.image
        try:
            with Image.open(path) as im:
                return im.convert("RGB")
        except FileNotFoundError:
            raise MissingDataError(path, "missing image") from None
        except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as e:
            raise DataError(path, f"unreadable image: {e}") from None

    def mask_array(self, entry: SplitEntry) -> tuple[np.ndarray, Path]:
        """Class ids uint8 [H, W] (0..K-1, 255 ignore) and the file they came from.

        Raises MissingDataError when no candidate file exists, DataError for an unreadable file, a mode other than
        P / L, or values outside the class range.
        """
        if entry.mask is None:
            raise MissingDataError(self.root / entry.image, "no mask listed for this image")
        tried = []
        for rel, raw_ids in self.mask_files(entry):
            path = self.root / rel
            try:
                im = Image.open(path)
            except FileNotFoundError:
                tried.append(path)
                continue
            except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as e:
                raise DataError(path, f"unreadable mask: {e}") from None
            with im:
                arr = decode_index_png(im, path)
            if raw_ids:
                return self.to_train_ids(arr, path), path
            bad = ~self.valid[arr]
            if bad.any():
                raise DataError(path, f"label values {some_values(arr[bad])} outside 0..{self.num_classes - 1} and "
                                      f"{IGNORE}")
            return arr, path
        extra = f" (nor {', '.join(str(p) for p in tried[1:])})" if len(tried) > 1 else ""
        raise MissingDataError(tried[0], f"missing mask{extra}")

    def load(self, entry: SplitEntry, with_mask: bool = True) -> tuple[Image.Image, Image.Image | None]:
        """RGB image and L-mode class-id mask (None without ``with_mask`` or when the entry lists no mask)."""
        img = self.image(entry)
        if not with_mask or entry.mask is None:
            return img, None
        arr, path = self.mask_array(entry)
        if arr.shape != (img.height, img.width):
            raise DataError(path, f"mask is {arr.shape[1]}x{arr.shape[0]} but its image {self.root / entry.image} "
                                  f"is {img.width}x{img.height}")
        return img, Image.fromarray(arr, "L")

    # ---------------------------------------------------------------------------------------------- trial-start checks

    def quick_check(self, partition: Partition, val: Sequence[SplitEntry]) -> bool:
        """Cheap checks before any training: lists non-empty, no duplicates, labeled / unlabeled / val disjoint,
        every listed image (and labeled / val mask) exists. Raises DataError (one line naming the first bad file,
        with how many more there are). Reads no pixels: the full scan is ``sslray data check``.

        Returns whether every unlabeled sample lists a mask that exists (then its ground truth can feed the
        ``train/pseudo_acc`` diagnostic).
        """
        where = f"partition {partition.name} ({partition.origin})"
        lists = {"labeled": partition.labeled, "unlabeled": partition.unlabeled, "val": val}
        for role in ("labeled", "val"):
            if not lists[role]:
                raise DataError(partition.origin if role == "labeled" else self.val_list().path,
                                f"the {role} list is empty")
        seen: dict[str, str] = {}
        for role, entries in lists.items():
            mine: set[str] = set()
            for e in entries:
                if e.image in mine:
                    raise DataError(self.root / e.image, f"listed twice in the {role} list of {where}")
                if e.image in seen:
                    raise DataError(self.root / e.image, f"in both the {seen[e.image]} and the {role} list of {where}")
                mine.add(e.image)
            seen.update(dict.fromkeys(mine, role))
        missing: list[tuple[Path, str]] = []
        truth = True
        for role, entries in lists.items():
            for e in entries:
                # name the split file and line that listed the sample, when known (scanned lists have none)
                if not e.where:
                    of = f"of {where}"
                else:
                    of = f"listed at {e.where}" if role == "val" else f"of partition {partition.name}, {e.where}"
                if not os.path.exists(self.root / e.image):
                    missing.append((self.root / e.image, f"missing image ({role} sample {of})"))
                if role == "unlabeled":
                    truth = truth and e.mask is not None and self._mask_exists(e)
                elif e.mask is None:
                    missing.append((self.root / e.image,
                                    f"{role} image without a mask in the list ({of.removeprefix('of ')})"))
                elif not self._mask_exists(e):
                    missing.append((self.root / e.mask,
                                    f"missing mask ({role} sample {of}){self.missing_mask_hint(e)}"))
        if missing:
            path, msg = missing[0]
            more = f"; {len(missing) - 1} more missing files (run sslray data check)" if len(missing) > 1 else ""
            raise MissingDataError(path, msg + more)
        return truth

    def _mask_exists(self, entry: SplitEntry) -> bool:
        return any(os.path.exists(self.root / rel) for rel, _ in self.mask_files(entry))


def decode_index_png(im: Image.Image, path: Path) -> np.ndarray:
    """uint8 [H, W] class ids of a P (palette indices) or L (values) mask; DataError for other modes / bad data."""
    if im.mode not in ("P", "L"):
        raise DataError(path, f"mask is a {im.mode} image; expected class ids in a palette (P) or grayscale (L) PNG")
    try:
        return np.array(im, dtype=np.uint8)
    except (OSError, SyntaxError, ValueError) as e:
        raise DataError(path, f"unreadable mask: {e}") from None


def some_values(values: np.ndarray, k: int = 6) -> str:
    """The first ``k`` distinct values, e.g. ``[21, 22, 40, ...]``."""
    u = np.unique(values).tolist()
    return "[" + ", ".join(map(str, u[:k])) + (", ..." if len(u) > k else "") + "]"
