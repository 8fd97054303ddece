"""Validation: confusion matrix, mIoU, and UniMatch's evaluation modes (``datasets.md`` section 5).

The metric is UniMatch's: per-class intersection and union accumulated over the whole validation set (a
dataset-level confusion matrix, not a mean of per-image IoUs), ``IoU_c = inter_c / (union_c + 1e-10)`` and
``mIoU = 100 * mean_c IoU_c`` over all K classes, so a class absent from both predictions and targets counts
as 0 in the mean (as in UniMatch).

Distributed: rank r evaluates dataset indices r, r + world, ... (no padding, so no image is counted twice,
unlike DistributedSampler), and the confusion matrix is summed across ranks once at the end.
"""
from __future__ import annotations

import collections
import contextlib
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterator, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

from sslray.registries import EVAL_MODES  # noqa: F401 - re-exported (the light commands check names without torch)


class ConfusionMatrix:
    """A [K, K] int64 histogram, rows = target class, columns = predicted class."""

    def __init__(self, num_classes: int, ignore_index: int = 255, device: torch.device | str | None = None):
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.mat = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    def update(self, pred: Tensor, target: Tensor) -> None:
        """Count pixels of ``pred`` / ``target`` (integer tensors of one shape, e.g. [B, H, W]).

        Pixels whose target is ``ignore_index`` or outside [0, K) are skipped. Predictions must lie in [0, K)
        (an argmax always does); anything else is a bug upstream and raises.
        """
        if pred.shape != target.shape:
            raise ValueError(f"pred and target shapes differ: {tuple(pred.shape)} vs {tuple(target.shape)}")
        k = self.num_classes
        t = target.reshape(-1).to(device=self.mat.device, dtype=torch.int64)
        p = pred.reshape(-1).to(device=self.mat.device, dtype=torch.int64)
        valid = (t >= 0) & (t < k) & (t != self.ignore_index)
        t, p = t[valid], p[valid]
        if p.numel() and (int(p.min()) < 0 or int(p.max()) >= k):
            raise ValueError(f"predictions must lie in [0, {k}), got [{int(p.min())}, {int(p.max())}]")
        self.mat += torch.bincount(k * t + p, minlength=k * k).reshape(k, k)

    def all_reduce(self) -> None:
        """Sum the matrix over all ranks (no-op unless torch.distributed is initialized)."""
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self.mat, op=dist.ReduceOp.SUM)

    def iou(self) -> Tensor:
        """Per-class IoU [K] float64 in [0, 1]: inter / (union + 1e-10); a class with union 0 gives 0 (UniMatch)."""
        m = self.mat.double()
        inter = m.diag()
        union = m.sum(0) + m.sum(1) - inter
        return inter / (union + 1e-10)

    def miou(self) -> float:
        """Mean IoU over all K classes, in percent (0..100)."""
        return float(self.iou().mean()) * 100.0

    def pixel_acc(self) -> float:
        """Correct / counted pixels, in percent (0..100); 0 when nothing was counted."""
        total = int(self.mat.sum())
        return 100.0 * int(self.mat.diag().sum()) / total if total else 0.0


# --------------------------------------------------------------------------------------------------
# prediction


def window_starts(size: int, crop: int, stride: int, shifted: bool) -> list[int]:
    """Start offsets of sliding windows along one axis.

    ``shifted=False`` (UniMatch V1): 0, stride, 2 stride, ... while < size; the last window may run past the
    image and is truncated. ``shifted=True`` (UniMatch V2): the last window is moved back to ``size - crop`` so
    every window is full-size. Either way an axis shorter than ``crop`` gets the single start 0 (one truncated
    window = the whole axis); V2's own loop is undefined there.

    Example: size 1024, crop 801, stride 534: V1 [0, 534], V2 [0, 223].
    """
    if crop <= 0 or stride <= 0:
        raise ValueError(f"crop and stride must be positive, got crop={crop}, stride={stride}")
    if not shifted:
        return list(range(0, size, stride))
    starts = [0]
    while starts[-1] + crop < size:
        starts.append(min(starts[-1] + stride, size - crop))
    return starts


def _logits(model: nn.Module, img: Tensor) -> Tensor:
    """Model scores for img [B, 3, h, w] -> [B, K, h, w], as float32."""
    return model(img)["logits"].float()


def sliding_window(model: nn.Module, img: Tensor, crop: int, num_classes: int, shifted: bool) -> Tensor:
    """Sum of softmax probabilities over crop x crop windows at stride int(2/3 crop): [B, K, H, W]."""
    b, _, h, w = img.shape
    stride = int(crop * 2 / 3)
    out = img.new_zeros((b, num_classes, h, w), dtype=torch.float32)
    for r in window_starts(h, crop, stride, shifted):
        for c in window_starts(w, crop, stride, shifted):
            win = (slice(None), slice(None), slice(r, min(h, r + crop)), slice(c, min(w, c + crop)))
            out[win] += _logits(model, img[win]).softmax(dim=1)
    return out


@torch.no_grad()
def predict(model: nn.Module, img: Tensor, mode: str, crop_size: int, num_classes: int) -> Tensor:
    """Class scores for a batch of equally sized images.

    Args:
        model: a segmentation model returning ``{"logits": [B, K, h, w]}`` (put it in eval mode yourself).
        img: [B, 3, H, W].
        mode: ``original`` / ``center_crop`` (the whole given image; the crop itself is done by
            :func:`evaluate`), ``sliding_window`` (UniMatch V1, truncated edge windows) or ``sliding_window_v2``
            (last window shifted inside the image).
        crop_size: window side for the sliding modes.
        num_classes: K.

    Returns:
        [B, K, H, W] float32: logits (whole-image modes) or summed window probabilities (sliding modes); only
        their argmax over K is meaningful across modes.
    """
    if mode in ("original", "center_crop"):
        return _logits(model, img)
    if mode in ("sliding_window", "sliding_window_v2"):
        return sliding_window(model, img, crop_size, num_classes, shifted=mode == "sliding_window_v2")
    raise ValueError(f"unknown eval mode {mode!r} (expected one of: {', '.join(EVAL_MODES)})")


# --------------------------------------------------------------------------------------------------
# evaluation loop


def center_crop(img: Tensor, mask: Tensor, crop: int) -> tuple[Tensor, Tensor]:
    """Crop img [3, H, W] and mask [H, W] to crop x crop at ((H - crop) // 2, (W - crop) // 2), as UniMatch;
    an axis shorter than ``crop`` is kept whole (UniMatch assumes images >= crop)."""
    h, w = mask.shape[-2:]
    top, left = max((h - crop) // 2, 0), max((w - crop) // 2, 0)
    return img[:, top: top + crop, left: left + crop], mask[top: top + crop, left: left + crop]


def _items(dataset: Any, indices: Sequence[int], prefetch: int) -> Iterator[dict]:
    """``dataset[i]`` for ``indices`` in order; with ``prefetch`` > 0, up to ``prefetch`` items are decoded ahead in
    threads (PIL and torch release the GIL), so reading a 2048x1024 PNG overlaps the model's forward pass."""
    if prefetch <= 0:
        yield from (dataset[i] for i in indices)
        return
    with ThreadPoolExecutor(max_workers=prefetch) as pool:
        pending: collections.deque = collections.deque()
        for i in indices:
            pending.append(pool.submit(dataset.__getitem__, i))
            if len(pending) > prefetch:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def _batches(dataset: Any, indices: Sequence[int], mode: str, crop: int, batch_size: int, max_pixels: int,
             prefetch: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield (img [B, 3, H, W], mask [B, H, W]) of consecutive items that share a size: at most ``batch_size`` of
    them and at most ``max_pixels`` pixels in all (always at least one image)."""
    imgs: list[Tensor] = []
    masks: list[Tensor] = []
    for item in _items(dataset, indices, prefetch):
        img, mask = item["img"], item["mask"]
        if mode == "center_crop":
            img, mask = center_crop(img, mask, crop)
        full = len(imgs) == batch_size or (len(imgs) + 1) * mask.numel() > max_pixels
        if imgs and (img.shape != imgs[0].shape or full):
            yield torch.stack(imgs), torch.stack(masks)
            imgs, masks = [], []
        imgs.append(img)
        masks.append(mask)
    if imgs:
        yield torch.stack(imgs), torch.stack(masks)


@torch.no_grad()
def evaluate(model: nn.Module, dataset: Any, num_classes: int, mode: str, crop_size: int,
             device: torch.device | str, class_names: Sequence[str], ignore_index: int = 255, rank: int = 0,
             world: int = 1, amp_dtype: torch.dtype | None = None, batch_size: int = 32,
             per_image: bool = False, max_pixels: int = 4 * 1024 * 2048, prefetch: int = 4) -> dict[str, Any]:
    """Evaluate ``model`` on this rank's share of ``dataset`` and reduce the confusion matrix over ranks.

    Args:
        model: a segmentation model; switched to eval mode during, its previous mode restored after.
        dataset: indexable; items are ``{"img": float [3, H, W], "mask": long [H, W], "index": int}``.
        num_classes: K.
        mode: see :func:`predict`.
        crop_size: the center crop / sliding window side.
        device: where the model runs.
        class_names: K names for the per-class keys.
        ignore_index: target value that is not counted.
        rank, world: this rank evaluates indices rank, rank + world, ...; the matrix is all-reduced once at the
            end when torch.distributed is initialized (without it, each call returns its own share).
        amp_dtype: autocast dtype for the forward passes (None: full precision); scores are summed in float32.
        batch_size: consecutive images of equal size are stacked up to this many (eval-mode models treat
            samples independently, so results equal batch size 1) ...
        max_pixels: ... and up to this many pixels (default: 4 Cityscapes images, whose sliding windows then run
            as batches of 4 crops).
        prefetch: items decoded ahead in threads (0: none).
        per_image: also return ``val/per_image``: ``{"inter": [N][K], "union": [N][K]}`` pixel counts of every
            image in dataset order (gathered from all ranks). They add up to the confusion matrix's intersection
            and union, so a bootstrap over images can recompute the dataset-level mIoU of any resample.

    Returns:
        ``val/miou``, ``val/pixel_acc`` and ``val/iou/<name>`` (all percent), and ``val/confusion`` ([K][K]
        ints, rows = target).
    """
    if mode not in EVAL_MODES:
        raise ValueError(f"unknown eval mode {mode!r} (expected one of: {', '.join(EVAL_MODES)})")
    if len(class_names) != num_classes:
        raise ValueError(f"{len(class_names)} class names for {num_classes} classes")
    device = torch.device(device)
    cm = ConfusionMatrix(num_classes, ignore_index, device=device)
    was_training = model.training
    model.eval()
    indices = range(rank, len(dataset), world)
    images: list[tuple[int, list[int], list[int]]] = []  # (dataset index, inter [K], union [K])
    try:
        for img, mask in _batches(dataset, indices, mode, crop_size, batch_size, max_pixels, prefetch):
            img, mask = img.to(device, non_blocking=True), mask.to(device, non_blocking=True)
            with _autocast(device, amp_dtype):
                scores = predict(model, img, mode, crop_size, num_classes)
            pred = scores.argmax(dim=1)
            cm.update(pred, mask)
            if per_image:
                inter, union = image_counts(pred, mask, num_classes, ignore_index)
                first = len(images)
                images += [(indices[first + j], i, u) for j, (i, u) in enumerate(zip(inter.tolist(), union.tolist()))]
    finally:
        model.train(was_training)
    cm.all_reduce()
    out = summarize(cm, class_names)
    if per_image:
        if dist.is_available() and dist.is_initialized():
            shards: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(shards, images)
            images = [x for shard in shards for x in shard]
        images.sort()
        out["val/per_image"] = {"inter": [i for _, i, _ in images], "union": [u for _, _, u in images]}
    return out


def image_counts(pred: Tensor, target: Tensor, num_classes: int, ignore_index: int = 255) -> tuple[Tensor, Tensor]:
    """Per-image intersection and union pixel counts, each [B, K] int64, of pred / target [B, H, W] (pixels
    counted as in :meth:`ConfusionMatrix.update`)."""
    k, b = num_classes, pred.shape[0]
    t = target.reshape(b, -1).to(torch.int64)
    p = pred.reshape(b, -1).to(torch.int64)
    valid = (t >= 0) & (t < k) & (t != ignore_index)
    image = torch.arange(b, device=t.device).unsqueeze(1).expand_as(t)
    flat = (image * k * k + k * t + p)[valid]
    m = torch.bincount(flat, minlength=b * k * k).reshape(b, k, k)  # [B, K, K] rows = target
    inter = m.diagonal(dim1=1, dim2=2)
    return inter, m.sum(1) + m.sum(2) - inter


def _autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """Autocast on ``device`` when dtype is given, else a null context."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def summarize(cm: ConfusionMatrix, class_names: Sequence[str]) -> dict[str, Any]:
    """The metrics dict of :func:`evaluate` from a (reduced) confusion matrix."""
    out: dict[str, Any] = {"val/miou": cm.miou(), "val/pixel_acc": cm.pixel_acc()}
    for name, v in zip(class_names, cm.iou().tolist()):
        out[f"val/iou/{name}"] = 100.0 * v
    out["val/confusion"] = cm.mat.cpu().tolist()
    return out
