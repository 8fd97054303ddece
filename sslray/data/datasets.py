"""Dataset specs, sample readers ("sources") and the three torch datasets of a trial, plus the sample stream.

Datasets (:data:`DATASETS`): ``synthetic`` (the generator, nothing on disk), ``pascal`` (VOC 2012, 21 classes,
crop 321, whole-image evaluation), ``cityscapes`` (19 classes, crop 801, sliding-window evaluation) and
``synthetic_voc`` (what ``sslray data synth`` writes: the synthetic default in the VOC layout, read by the Pascal
reader with 3 classes). The defaults are UniMatch's (``datasets.md`` section 7); the readers are ``voc.py`` and
``cityscapes.py``, their shared rules ``readers.py``.

A trial's data is a pure function of its config: the partition of ``(pool, cfg.partition, cfg.split_seed)``, and
for every training iteration the batch of ``(index, aug_seed)`` keys from :func:`batch_keys`. Datasets take such a
key and seed a fresh ``np.random.default_rng(aug_seed)`` for the sample's augmentation, so nothing depends on worker
processes, their number, or how many iterations ran before a resume.

Registries are explicit dict literals (:data:`DATASETS`); nothing registers itself on import.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol, Sequence, runtime_checkable

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.transforms.v2 import functional as F

from sslray.config import AugConfig, DataConfig, SyntheticConfig
from sslray.data import cityscapes, synthetic, voc
from sslray.data.device_augs import PARAMS_KEY, WEAK_U8_KEY
from sslray.data.readers import FileSource
from sslray.data.splits import Partition, SplitEntry, generate_partition, write_partition
from sslray.data.transforms import apply_strong, cutmix_box, draw_strong, normalize, weak_view

UNLABELED_PAD = 254  # mask value of padding in unlabeled weak views; cannot collide with a real 255 (UniMatch)


# --------------------------------------------------------------------------------------------------
# readers


@runtime_checkable
class Source(Protocol):
    """What a dataset reader provides: the train pool, the val list, and sample loading."""

    def train_pool(self) -> list[SplitEntry]:
        """The pool that labeled / unlabeled partitions are drawn from."""

    def val_entries(self) -> list[SplitEntry]:
        """The validation samples."""

    def load(self, entry: SplitEntry, with_mask: bool = True) -> tuple[Image.Image, Image.Image | None]:
        """RGB image and a mask whose ``np.array`` gives class ids / 255 (None when ``with_mask`` is False)."""

    def partition(self, spec: str, seed: int) -> Partition:
        """The labeled / unlabeled partition named by ``data.partition`` and ``data.split_seed``."""


class SyntheticSource:
    """The textured-shapes generator seen as a dataset on disk (paths are names; nothing is read or cached).

    Train pool entry ``i``: ``images/00000i.png masks/00000i.png`` -> generator index ``i``; val entry ``i``:
    ``val/images/00000i.png val/masks/00000i.png`` -> generator index ``VAL_OFFSET + i``, so train and val never
    share an image.
    """

    VAL_OFFSET = 900_000

    def __init__(self, cfg: SyntheticConfig, params: synthetic.SynthParams = synthetic.DEFAULT_PARAMS):
        if cfg.num_train > self.VAL_OFFSET:
            raise ValueError(f"synthetic.num_train must be <= {self.VAL_OFFSET} (val indices start there)")
        self.cfg, self.params = cfg, params

    def train_pool(self) -> list[SplitEntry]:
        return [SplitEntry(f"images/{i:06d}.png", f"masks/{i:06d}.png") for i in range(self.cfg.num_train)]

    def val_entries(self) -> list[SplitEntry]:
        return [SplitEntry(f"val/images/{i:06d}.png", f"val/masks/{i:06d}.png") for i in range(self.cfg.num_val)]

    def generator_index(self, entry: SplitEntry) -> int:
        """The generator index named by an entry's image path."""
        m = re.fullmatch(r"(val/)?images/(\d+)\.png", entry.image)
        if not m:
            raise ValueError(f"not a synthetic sample path: {entry.image!r}")
        return int(m.group(2)) + (self.VAL_OFFSET if m.group(1) else 0)

    def load(self, entry: SplitEntry, with_mask: bool = True) -> tuple[Image.Image, Image.Image | None]:
        img, mask = synthetic.make_sample(self.cfg.seed, self.generator_index(entry), self.cfg.size, self.params)
        return Image.fromarray(img, "RGB"), (Image.fromarray(mask, "L") if with_mask else None)

    def partition(self, spec: str, seed: int) -> Partition:
        return generate_partition(self.train_pool(), spec, seed)


# Module-level functions, not lambdas: specs and sources must pickle (DataLoader workers, Ray).
def _synthetic_source(cfg: DataConfig) -> SyntheticSource:
    return SyntheticSource(cfg.synthetic)


def _pascal_source(cfg: DataConfig) -> voc.VOCSource:
    return voc.VOCSource(cfg.root, splits_dir=cfg.splits_dir, mask_dir=cfg.mask_dir)


def _synthetic_voc_source(cfg: DataConfig) -> voc.VOCSource:
    return voc.VOCSource(cfg.root, num_classes=synthetic.NUM_CLASSES, splits_dir=cfg.splits_dir,
                         mask_dir=cfg.mask_dir, image_ext=".png", dataset="")


def _cityscapes_source(cfg: DataConfig) -> cityscapes.CityscapesSource:
    return cityscapes.CityscapesSource(cfg.root, splits_dir=cfg.splits_dir)


# --------------------------------------------------------------------------------------------------
# specs


@dataclass(frozen=True, kw_only=True)
class DatasetSpec:
    """Static facts about a dataset and how to build its reader."""

    name: str
    num_classes: int
    class_names: tuple[str, ...]
    ignore_index: int = 255
    eval_mode: str = "original"  # original | center_crop | sliding_window | sliding_window_v2 (datasets.md 5.3)
    crop_size: int = 64  # training crop when the config leaves data.crop_size unset
    palette: tuple[tuple[int, int, int], ...] = ()  # for P-mode PNG masks / visualisation
    make_source: Callable[[DataConfig], Source]


DATASETS: dict[str, DatasetSpec] = {
    "synthetic": DatasetSpec(
        name="synthetic", num_classes=synthetic.NUM_CLASSES, class_names=synthetic.CLASS_NAMES, ignore_index=255,
        eval_mode="original", crop_size=64, palette=tuple(synthetic.PALETTE), make_source=_synthetic_source),
    "synthetic_voc": DatasetSpec(
        name="synthetic_voc", num_classes=synthetic.NUM_CLASSES, class_names=synthetic.CLASS_NAMES,
        ignore_index=255, eval_mode="original", crop_size=64, palette=tuple(synthetic.PALETTE),
        make_source=_synthetic_voc_source),
    # UniMatch configs/pascal.yaml: crop 321 (513 for its u2pl_* runs), evaluated on whole images.
    "pascal": DatasetSpec(
        name="pascal", num_classes=voc.NUM_CLASSES, class_names=voc.CLASS_NAMES, ignore_index=255,
        eval_mode="original", crop_size=321, palette=voc.PALETTE, make_source=_pascal_source),
    # UniMatch configs/cityscapes.yaml: crop 801, sliding 801 windows at stride 534 (V1, truncated edges).
    "cityscapes": DatasetSpec(
        name="cityscapes", num_classes=cityscapes.NUM_CLASSES, class_names=cityscapes.CLASS_NAMES,
        ignore_index=255, eval_mode="sliding_window", crop_size=801, palette=cityscapes.PALETTE,
        make_source=_cityscapes_source),
}


def list_datasets() -> list[str]:
    return sorted(DATASETS)


def get_spec(name: str) -> DatasetSpec:
    """The spec registered as ``name``; ValueError naming the known datasets otherwise."""
    try:
        return DATASETS[name]
    except KeyError:
        raise ValueError(f"unknown dataset {name!r} (known: {', '.join(list_datasets())})") from None


# --------------------------------------------------------------------------------------------------
# torch datasets; keys are (index into entries, aug_seed)


def _split_key(key: Any) -> tuple[int, int]:
    if not (isinstance(key, (tuple, list)) and len(key) == 2):
        raise TypeError(f"expected a key (index, aug_seed) as produced by batch_keys / StreamSampler, got {key!r}")
    return int(key[0]), int(key[1])


class LabeledDataset(Dataset):
    """Labeled weak views. ``ds[(index, aug_seed)]`` -> ``img_x`` float [3, c, c] (normalised),
    ``mask_x`` long [c, c] (class ids, ``ignore_index`` on boundaries and padding)."""

    def __init__(self, source: Source, entries: Sequence[SplitEntry], crop: int, aug: AugConfig,
                 ignore_index: int = 255):
        self.source, self.entries, self.crop, self.aug, self.ignore_index = source, list(entries), crop, aug, ignore_index

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, torch.Tensor]:
        index, aug_seed = _split_key(key)
        rng = np.random.default_rng(aug_seed)
        img, mask = self.source.load(self.entries[index])
        img, mask = weak_view(img, mask, self.crop, self.ignore_index, rng, self.aug.scale, self.aug.hflip_p)
        img_x, mask_x = normalize(img, mask)
        return {"img_x": img_x, "mask_x": mask_x}


class UnlabeledDataset(Dataset):
    """Unlabeled views. ``ds[(index, aug_seed)]`` -> ``img_u_w``, ``img_u_s1``, ``img_u_s2`` float [3, c, c]
    (normalised), ``ignore_mask_u`` long [c, c] (255 on padding, else 0), ``cutmix_box1``, ``cutmix_box2``
    float [c, c].

    Without ``with_truth`` no ground truth is read: a dummy all-zero mask goes through the weak view with padding
    value 254, which is all UniMatch uses the real mask of an unlabeled image for. With ``with_truth`` the real
    mask takes that path instead (real labels never equal 254) and comes back as ``mask_u_true`` long [c, c]
    (255 on padding and ignore), used only for the ``train/pseudo_acc`` diagnostic, never by a loss.

    With ``augment_on="device"`` the three views are replaced by the weak view as uint8 (``img_u_w_u8``) and the
    strong views' draws (``host_strong_params`` [2, 12]), which :func:`sslray.data.device_augs.augment_batch` turns
    into the same three keys on the device.
    """

    def __init__(self, source: Source, entries: Sequence[SplitEntry], crop: int, aug: AugConfig,
                 with_truth: bool = False, augment_on: str = "loader"):
        self.source, self.entries, self.crop, self.aug, self.augment_on = source, list(entries), crop, aug, augment_on
        self.with_truth = with_truth and all(e.mask is not None for e in self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, torch.Tensor]:
        index, aug_seed = _split_key(key)
        rng = np.random.default_rng(aug_seed)
        a = self.aug
        img, truth = self.source.load(self.entries[index], with_mask=self.with_truth)
        mask_in = truth if truth is not None else Image.new("L", img.size, 0)
        img_w, pad = weak_view(img, mask_in, self.crop, UNLABELED_PAD, rng, a.scale, a.hflip_p)
        draws, boxes = [], []
        for _ in range(2):  # s1 then s2, each with its own box, in UniMatch's draw order
            draws.append(draw_strong(rng, a.jitter, a.jitter_p, a.gray_p, a.blur_p, a.blur_sigma))
            boxes.append(cutmix_box(self.crop, rng, a.cutmix_p, a.cutmix_area, a.cutmix_ratio))
        pad_t = torch.from_numpy(np.array(pad, dtype=np.int64))
        ignore_mask_u = torch.where(pad_t == UNLABELED_PAD, 255, 0)
        out = {"ignore_mask_u": ignore_mask_u, "cutmix_box1": boxes[0], "cutmix_box2": boxes[1]}
        if self.augment_on == "device":  # strong views made on the device (sslray.data.device_augs)
            out.update({WEAK_U8_KEY: F.pil_to_tensor(img_w), PARAMS_KEY: torch.stack(draws)})
        else:
            out.update(img_u_w=normalize(img_w), img_u_s1=normalize(apply_strong(img_w, draws[0])),
                       img_u_s2=normalize(apply_strong(img_w, draws[1])))
        if truth is not None:
            out["mask_u_true"] = torch.where(pad_t == UNLABELED_PAD, 255, pad_t)
        return out


class ValDataset(Dataset):
    """Validation samples at original resolution: ``ds[i]`` -> ``img`` float [3, H, W], ``mask`` long [H, W],
    ``index`` i."""

    def __init__(self, source: Source, entries: Sequence[SplitEntry]):
        self.source, self.entries = source, list(entries)

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i: int) -> dict[str, Any]:
        img, mask = self.source.load(self.entries[i])
        img_t, mask_t = normalize(img, mask)
        return {"img": img_t, "mask": mask_t, "index": i}


# --------------------------------------------------------------------------------------------------
# a trial's data


@dataclass
class TrialData:
    spec: DatasetSpec
    labeled: LabeledDataset
    unlabeled: UnlabeledDataset
    val: ValDataset
    partition: Partition
    split_sha256: dict[str, str]
    crop_size: int
    eval_mode: str
    num_classes: int
    ignore_index: int
    class_names: tuple[str, ...]


def build_data(cfg: DataConfig, workdir: str | os.PathLike | None = None) -> TrialData:
    """Build the reader, get the partition (split files or a seeded draw) and wrap the three datasets.

    On-disk datasets are checked cheaply first (``FileSource.quick_check``: lists non-empty, no duplicates or
    overlaps, every listed file exists), so bad data fails the trial now, with one line naming the file, rather
    than in the middle of training; ``sslray data check`` does the full pixel scan.

    With ``workdir``, the partition is written to ``workdir/splits/{labeled,unlabeled}.txt`` (canonical two-column
    form, whatever dialect it was read from) and the recorded sha256 are those of the files on disk; without, the
    same bytes are hashed in memory.
    """
    spec = get_spec(cfg.dataset)
    source = spec.make_source(cfg)
    partition = source.partition(cfg.partition, cfg.split_seed)
    val_entries = source.val_entries()
    with_truth = True
    if isinstance(source, FileSource):
        with_truth = source.quick_check(partition, val_entries)
        source.check_val_standard()
    if workdir is not None:
        sha = write_partition(Path(workdir) / "splits", partition)
    else:
        sha = partition.sha256()
    crop = cfg.crop_size or spec.crop_size
    return TrialData(
        spec=spec,
        labeled=LabeledDataset(source, partition.labeled, crop, cfg.aug, spec.ignore_index),
        unlabeled=UnlabeledDataset(source, partition.unlabeled, crop, cfg.aug, with_truth=with_truth,
                                   augment_on=cfg.augment_on),
        val=ValDataset(source, val_entries),
        partition=partition, split_sha256=sha, crop_size=crop, eval_mode=cfg.eval_mode or spec.eval_mode,
        num_classes=spec.num_classes, ignore_index=spec.ignore_index, class_names=spec.class_names)


# --------------------------------------------------------------------------------------------------
# the sample stream


@lru_cache(maxsize=16)
def _epoch_perm(n: int, seed: int, stream: int, epoch: int) -> np.ndarray:
    """int64 [n]: the order of epoch ``epoch`` of stream ``stream``."""
    perm = np.random.default_rng([seed, stream, epoch]).permutation(n)
    perm.flags.writeable = False  # shared through the cache
    return perm


def aug_seed(seed: int, stream: int, position: int) -> int:
    """A 63-bit augmentation seed for global stream position ``position`` (well mixed by SeedSequence)."""
    state = np.random.SeedSequence([seed, stream, position]).generate_state(1, np.uint64)
    return int(state[0] >> np.uint64(1))


def batch_keys(n: int, batch_size: int, seed: int, stream: int, iteration: int, rank: int = 0,
               world: int = 1) -> list[tuple[int, int]]:
    """Rank ``rank``'s ``(index, aug_seed)`` keys of iteration ``iteration`` of a deterministic infinite stream.

    The stream is the concatenation of per-epoch permutations ``default_rng([seed, stream, e]).permutation(n)``;
    iteration ``k`` is global positions ``[k*B, (k+1)*B)``, so batches may straddle epochs (every index appears once
    per epoch, no sample is dropped). Each position ``j`` has its own ``aug_seed(seed, stream, j)``. Rank ``r`` keeps
    the positions with ``j % world == r``, so the global batch -- indices and augmentations -- is the same for every
    world size; ``batch_size`` is the global batch and must be divisible by ``world``.

    Use distinct ``stream`` numbers for independent streams of one trial (e.g. labeled, unlabeled, CutMix source).
    """
    if n <= 0:
        raise ValueError(f"cannot sample batches from an empty dataset (n={n})")
    if batch_size <= 0 or world <= 0 or not 0 <= rank < world:
        raise ValueError(f"need batch_size > 0 and 0 <= rank < world, got {batch_size=}, {rank=}, {world=}")
    if batch_size % world:
        raise ValueError(f"global batch size {batch_size} is not divisible by the world size {world}")
    if min(seed, stream, iteration) < 0:
        raise ValueError(f"seed, stream and iteration must be >= 0, got {seed=}, {stream=}, {iteration=}")
    keys = []
    for j in range(iteration * batch_size + rank, (iteration + 1) * batch_size, world):
        epoch, offset = divmod(j, n)
        keys.append((int(_epoch_perm(n, seed, stream, epoch)[offset]), aug_seed(seed, stream, j)))
    return keys


class StreamSampler(Sampler):
    """Batch sampler over :func:`batch_keys`: yields one list of keys per iteration, for iterations
    ``start_iter .. start_iter + num_iters - 1`` (use as ``DataLoader(batch_sampler=...)``). Resuming at
    ``start_iter=k`` yields exactly the batches an uninterrupted run yields from iteration k on."""

    def __init__(self, n: int, batch_size: int, seed: int, stream: int, start_iter: int, num_iters: int,
                 rank: int = 0, world: int = 1):
        batch_keys(n, batch_size, seed, stream, start_iter, rank, world)  # validate the arguments now, not in a worker
        if num_iters < 0:
            raise ValueError(f"num_iters must be >= 0, got {num_iters}")
        self.n, self.batch_size, self.seed, self.stream = n, batch_size, seed, stream
        self.start_iter, self.num_iters, self.rank, self.world = start_iter, num_iters, rank, world

    def __len__(self) -> int:
        return self.num_iters

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for it in range(self.start_iter, self.start_iter + self.num_iters):
            yield batch_keys(self.n, self.batch_size, self.seed, self.stream, it, self.rank, self.world)


def make_loader(dataset: Dataset, n: int, batch_size: int, seed: int, stream: int, start_iter: int, num_iters: int,
                rank: int = 0, world: int = 1, num_workers: int = 0) -> DataLoader:
    """A DataLoader over ``dataset`` driven by a :class:`StreamSampler` (default collate; ``batch_size`` is global,
    each rank gets ``batch_size // world``). Workers need no seeding: all randomness comes from the keys."""
    sampler = StreamSampler(n, batch_size, seed, stream, start_iter, num_iters, rank, world)
    # Its own generator: iter(DataLoader) draws a base seed, and drawing it from the global RNG would shift the
    # model's dropout stream and break resume == uninterrupted.
    return DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers,
                      persistent_workers=num_workers > 0, generator=torch.Generator().manual_seed(seed))
