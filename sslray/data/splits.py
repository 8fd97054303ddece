"""Partition protocols: which pool samples are labeled, which are unlabeled, and the split files that record it.

Split files use UniMatch's two-column format (``datasets.md`` section 1.3), one sample per line::

    JPEGImages/2007_000032.jpg SegmentationClass/2007_000032.png

Files are written with LF endings and a trailing newline, and read with ``splitlines()`` so CRLF files and files
without a final newline (several published UniMatch splits) parse the same. A one-column line (bare id or image path,
the U2PL / CPS dialects) reads as an entry without a mask; resolving it to paths is the dataset reader's business.

Generated partitions are a pure function of ``(pool, spec, seed)``: the labeled set is the first ``n`` indices of
``default_rng(seed).permutation(len(labeled_pool))`` **in draw order**, so for one seed the 16-label set is a prefix of
the 32-label set (nested protocols, like the CPS blended splits), and the sha256 of the written files identifies a
split. The labeled pool defaults to the whole pool; Pascal's classic protocol draws from the 1,464 finely annotated
images while every other train_aug image stays unlabeled (``datasets.md`` section 6).
"""
from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from sslray.atomic import atomic_write

LABELED_FILE = "labeled.txt"
UNLABELED_FILE = "unlabeled.txt"


@dataclass(frozen=True)
class SplitEntry:
    """One sample: image path and mask path relative to the dataset root (``mask`` None: no mask listed).

    ``where`` is the ``split_file:line`` the entry was read from (None for generated lists); it is provenance for
    error messages only, not part of equality or of the written line.
    """

    image: str
    mask: str | None = None
    where: str | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        # The format separates columns by whitespace, so a path containing any could never be read back.
        for name, value in (("image", self.image), ("mask", self.mask)):
            if value is None and name == "mask":
                continue
            if not isinstance(value, str) or not value or any(c.isspace() for c in value):
                raise ValueError(f"SplitEntry.{name} must be a non-empty path without whitespace, got {value!r}")

    def line(self) -> str:
        """``"img mask"``, or ``"img"`` when there is no mask."""
        return self.image if self.mask is None else f"{self.image} {self.mask}"


@dataclass(frozen=True)
class Partition:
    """A labeled / unlabeled partition of a pool (disjoint; their union is the pool).

    ``origin`` says where it came from: ``generated`` (seeded draw) or the labeled split file it was read from;
    ``standard`` names the published split it equals (``unimatch:pascal/92``, see ``fingerprints``), else None.
    """

    labeled: tuple[SplitEntry, ...]
    unlabeled: tuple[SplitEntry, ...]
    name: str
    origin: str = "generated"
    standard: str | None = None

    def sha256(self) -> dict[str, str]:
        """sha256 hex of ``labeled.txt`` and ``unlabeled.txt`` exactly as :func:`write_partition` writes them."""
        return {"labeled": _sha256_bytes(split_bytes(self.labeled)),
                "unlabeled": _sha256_bytes(split_bytes(self.unlabeled))}


def parse_partition_spec(spec: str, pool_size: int) -> int:
    """Number of labeled samples that ``spec`` asks for out of ``pool_size``.

    * ``"16"``: an absolute count;
    * ``"1_8"`` (UniMatch's directory names) or ``"0.125"``: a fraction of the pool, rounded **up**
      (``ceil(pool_size * a / b)``, computed exactly with integers / ``Fraction``). Rounding up reproduces every
      published ratio split: VOC 10,582 -> 662 / 1,323 / 2,646 for 1_16 / 1_8 / 1_4, Cityscapes 2,975 -> 100 / 186 /
      372 / 744 / 1,488 for 1_30 / 1_16 / 1_8 / 1_4 / 1_2, where ``int()`` would give 661, 1,322, ... It also makes
      any positive fraction of a non-empty pool at least 1.

    Raises ValueError for counts <= 0 or > pool_size, fractions outside (0, 1], and anything else.
    """
    s = str(spec).strip()
    if pool_size <= 0:
        raise ValueError(f"partition {spec!r}: the pool is empty")
    if re.fullmatch(r"\d+", s):
        n = int(s)
        if not 0 < n <= pool_size:
            raise ValueError(f"partition {spec!r}: labeled count must be in 1..{pool_size} (the pool size), got {n}")
        return n
    frac = _parse_fraction(s)
    if frac is None:
        raise ValueError(f"partition {spec!r}: expected a count ('16'), a ratio ('1_8') or a fraction ('0.125')")
    if not 0 < frac <= 1:
        raise ValueError(f"partition {spec!r}: a ratio or fraction must be in (0, 1], got {frac}")
    return -(-(pool_size * frac.numerator) // frac.denominator)  # exact ceil


def _parse_fraction(s: str) -> Fraction | None:
    """``"1_8"`` -> 1/8, ``"0.125"`` -> 1/8 (exact, no float rounding); None if neither form."""
    m = re.fullmatch(r"(\d+)_(\d+)", s)
    if m:
        num, den = int(m.group(1)), int(m.group(2))
        return Fraction(num, den) if den else None
    if re.fullmatch(r"\d*\.\d+", s):
        return Fraction(s)
    return None


def generate_partition(pool: Sequence[SplitEntry], spec: str, seed: int,
                       labeled_pool: Sequence[SplitEntry] | None = None) -> Partition:
    """Draw the labeled set with ``numpy.random.default_rng(seed)``.

    Labeled = the first n indices of a permutation of ``labeled_pool`` (default: ``pool``), in draw order (not
    sorted: the same seed then gives nested labeled sets across n, and the file order records the draw); ``spec``
    counts or ratios are of the labeled pool. Unlabeled = the rest of ``pool``, in pool order. Samples are matched
    by image path, so the labeled pool must be a subset of the pool.
    """
    _check_unique(pool)
    candidates = pool if labeled_pool is None else labeled_pool
    _check_unique(candidates)
    index = {e.image: i for i, e in enumerate(pool)}
    outside = [e.image for e in candidates if e.image not in index]
    if outside:
        raise ValueError(f"the labeled pool has {len(outside)} samples outside the pool, e.g. {outside[0]!r}")
    n = parse_partition_spec(spec, len(candidates))
    perm = np.random.default_rng(seed).permutation(len(candidates))
    chosen = [index[candidates[i].image] for i in perm[:n]]
    rest = np.ones(len(pool), bool)
    rest[chosen] = False
    return Partition(labeled=tuple(pool[i] for i in chosen),
                     unlabeled=tuple(pool[i] for i in np.flatnonzero(rest)),
                     name=f"{str(spec).strip()}-seed{seed}")


def _check_unique(pool: Sequence[SplitEntry]) -> None:
    seen: set[str] = set()
    for e in pool:
        if e.image in seen:
            raise ValueError(f"pool lists {e.image!r} twice: labeled and unlabeled sets would overlap")
        seen.add(e.image)


def split_rows(text: str, source: str = "<text>",
               errors: list[tuple[int, str]] | None = None) -> list[tuple[int, tuple[str, ...]]]:
    """``(line number, columns)`` of every non-blank line: ``splitlines()`` then whitespace split, so CRLF, tabs
    (CPS), trailing spaces and a missing final newline all parse. Dataset readers turn the columns into paths (the
    dialects differ).

    A line with more than 2 columns raises ValueError naming ``source:line``, or, with ``errors``, is appended there
    as ``(line, message)`` and skipped.
    """
    out = []
    for lineno, raw in enumerate(text.splitlines(), 1):
        cols = raw.split()
        if not cols:
            continue
        if len(cols) > 2:
            message = f"expected '<image> <mask>' or '<image>', got {raw.strip()!r}"
            if errors is None:
                raise ValueError(f"{source}:{lineno}: {message}")
            errors.append((lineno, message))
            continue
        out.append((lineno, tuple(cols)))
    return out


def read_split_rows(path: str | os.PathLike,
                    errors: list[tuple[int, str]] | None = None) -> list[tuple[int, tuple[str, ...]]]:
    """:func:`split_rows` of a file (UTF-8; a BOM is ignored)."""
    return split_rows(Path(path).read_text(encoding="utf-8-sig"), source=str(path), errors=errors)


def parse_split_text(text: str, source: str = "<text>") -> list[SplitEntry]:
    """Entries of a split file's text, columns taken literally (see :func:`split_rows`).

    A second column ``None`` (UniMatch-V2's unlabeled lists) means no mask.
    """
    out = []
    for _, cols in split_rows(text, source):
        mask = cols[1] if len(cols) == 2 and cols[1] != "None" else None
        out.append(SplitEntry(cols[0], mask))
    return out


def read_split_file(path: str | os.PathLike) -> list[SplitEntry]:
    """Entries of a split file (see :func:`parse_split_text`)."""
    return parse_split_text(Path(path).read_text(encoding="utf-8"), source=str(path))


def split_bytes(entries: Iterable[SplitEntry]) -> bytes:
    """The file content for ``entries``: one ``line()`` per entry, LF, trailing newline (empty list: empty file)."""
    return "".join(e.line() + "\n" for e in entries).encode("utf-8")


def write_split_file(path: str | os.PathLike, entries: Iterable[SplitEntry]) -> None:
    """Write ``entries`` atomically (:func:`sslray.atomic.atomic_write`: temp file, fsync, ``os.replace``).

    Readers (other trials sharing a work directory) therefore see either the old file or the complete new one.
    """
    atomic_write(path, lambda f: f.write(split_bytes(entries)), what="split file")


def write_partition(directory: str | os.PathLike, partition: Partition) -> dict[str, str]:
    """Write ``labeled.txt`` and ``unlabeled.txt`` under ``directory``; returns their sha256 as read back from disk."""
    directory = Path(directory)
    write_split_file(directory / LABELED_FILE, partition.labeled)
    write_split_file(directory / UNLABELED_FILE, partition.unlabeled)
    return {"labeled": file_sha256(directory / LABELED_FILE),
            "unlabeled": file_sha256(directory / UNLABELED_FILE)}


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 hex digest of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
