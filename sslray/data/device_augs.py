"""``data.augment_on: device``: the unlabeled strong views made on the training device, on the batch.

The loader still decodes, makes the weak view (rescale, crop, flip: geometry, cheap next to the photometric ops at
crop 801) and draws every random choice of the strong views with :func:`sslray.data.transforms.draw_strong` --
the same generator, the same draws in the same order as the loader path -- but ships the weak view as uint8 (4x
less to copy than float) and the draws as ``host_strong_params`` [B, 2, 12] (kept on the host: reading them is no
device sync). :func:`augment_batch` then applies colour jitter, grayscale and blur per sample with the
``torchvision.transforms.v2.functional`` ops on tensors and normalises all three views. The CutMix paste was
already a device op of the step (:func:`sslray.teacher_student.paste`); the boxes stay drawn in the loader (a
rectangle fill, ~1 % of a sample's time).

Why torchvision v2 and not kornia: the loader path calls the very same functions (``F.adjust_brightness`` etc.
dispatch on PIL or tensor input), so the two paths share one definition of each op and of ColorJitter's factor
ranges; torchvision is already a dependency; kornia's colour ops define hue and saturation on its own HSV
conversion, so its distribution would be a second one to check against UniMatch's. Differences from the PIL path,
kept as small as the ops allow: no uint8 rounding between ops, and the blur is an exact Gaussian (kernel
``2 * ceil(3 sigma) + 1``, reflect padding) where PIL's ``GaussianBlur`` is an extended-box approximation with
edge extension; ``tests/test_data_device_augs.py`` bounds the difference per image and checks the statistics.
"""
from __future__ import annotations

import math

import torch
from torchvision.transforms.v2 import functional as F

from sslray.data.transforms import IMAGENET_MEAN, IMAGENET_STD, apply_strong

PARAMS_KEY = "host_strong_params"  # batch keys starting with "host_" stay on the host (trainer._to)
WEAK_U8_KEY = "img_u_w_u8"


def tensor_blur(img: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian blur of standard deviation ``sigma`` (PIL's ``radius``), kernel ``2 * ceil(3 sigma) + 1``."""
    k = 2 * math.ceil(3 * sigma) + 1
    return F.gaussian_blur(img, kernel_size=[k, k], sigma=[sigma, sigma])


def _normalize(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD))


def strong_views(weak: torch.Tensor, params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float [B, 3, H, W] in [0, 1] and draws [B, 2, 12] -> the two strong views, same shape and range."""
    views = ([], [])
    for i in range(weak.shape[0]):
        for v in (0, 1):
            views[v].append(apply_strong(weak[i], params[i, v], blur=tensor_blur))
    return torch.stack(views[0]), torch.stack(views[1])


def augment_batch(batch: dict) -> dict:
    """A collated device-mode unlabeled batch (``img_u_w_u8`` on the device, draws on the host) -> the loader
    path's keys: ``img_u_w``, ``img_u_s1``, ``img_u_s2`` normalised float [B, 3, H, W]."""
    batch = dict(batch)
    params = batch.pop(PARAMS_KEY)
    weak = F.to_dtype(batch.pop(WEAK_U8_KEY), torch.float32, scale=True)
    s1, s2 = strong_views(weak, params)
    batch.update(img_u_w=_normalize(weak), img_u_s1=_normalize(s1), img_u_s2=_normalize(s2))
    return batch
