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
