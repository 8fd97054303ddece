"""Layer helpers shared by the segmentation models and the method families' extra heads.

``models.py`` builds the segmentation networks from these, and method families (``methods/guidedmix.py``,
``methods/mllc.py``) build their heads from them, so a method never imports the model module (and through it the
config): the import graph stays one-way, ``config -> methods -> layers`` and ``models -> layers``::

    x = upsample(logits_low, (h, w))        # bilinear, align_corners=True (UniMatch)
    block = conv_bn_relu(256, 256)          # conv (no bias) -> BN -> ReLU, 'same' padding
    init_weights(head)                      # Kaiming-normal convs, BN 1/0

Only torch; nothing here knows about configs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def conv_bn_relu(cin: int, cout: int, k: int = 3, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    """Conv (no bias, BN follows) -> BN -> ReLU, 'same' padding for odd k."""
    pad = dilation * (k // 2)
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, stride=stride, padding=pad, dilation=dilation, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


def init_weights(module: nn.Module) -> None:
    """Kaiming-normal convs (fan_out, ReLU), BN weight 1 and bias 0, zero conv biases."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def upsample(x: Tensor, size: tuple[int, int] | torch.Size) -> Tensor:
    """Bilinear resize with align_corners=True (UniMatch's choice everywhere in its decoder)."""
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=True)


STRONG_DROPOUT = ("none", "complementary", "independent")


def paired_channel_masks(batch: int, channels: int, mode: str, device: torch.device | str | None = None,
                         p: float = 0.5, keep_share: float = 0.5) -> Tensor:
    """UniMatch V2's channel dropout for a batch ``cat(s1, s2)`` of 2n images: masks [2n, C] to multiply features.

    For image i of the first half, ``m1[i, c] = 2 * Bernoulli(1 - p)`` (values 0 or 2); its partner n + i in the
    second half gets ``m2 = 2 - m1`` (``complementary``: every channel survives in exactly one of the two views) or
    its own independent draw (``independent``, the ablation). A random ``int(n * keep_share)`` of the n pairs keep
    every channel (both masks 1), as V2 does. ``p`` must be 0.5 for the complements to keep the expected value.
    """
    if mode not in ("complementary", "independent"):
        raise ValueError(f"strong_dropout must be complementary or independent here, got {mode!r}")
    if batch % 2:
        raise ValueError(f"paired channel dropout needs cat(s1, s2): an even batch, got {batch}")
    n = batch // 2
    probs = torch.full((n, channels), 1.0 - p, device=device)
    m1 = torch.bernoulli(probs) * 2.0
    m2 = 2.0 - m1 if mode == "complementary" else torch.bernoulli(probs) * 2.0
    kept = torch.randperm(n, device=device)[: int(n * keep_share)]
    m1[kept] = 1.0
    m2[kept] = 1.0
    return torch.cat([m1, m2])
