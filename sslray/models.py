"""Segmentation models: DeepLabV3+ (as in UniMatch), a small CPU model with the same decoder, and the DINOv2 DPT
of UniMatch V2 (``sslray.dpt``, ``model.name: dpt``).

Both models share the :class:`SegModel` contract::

    out = model(x)                   # {"logits", "features", "c1", "c4"}
    out = model(x, need_fp=True)     # + "logits_fp" (UniMatch feature perturbation)
    backbone, head = model.param_groups()

The decoder is UniMatch's DeepLabV3+ decoder (``methods.md`` section 3.5): ASPP on the high-level feature c4,
bilinear upsampling to the low-level feature c1, a 48-channel (or width-scaled) reduction of c1, concatenation,
two 3x3 fuse convs and a 1x1 classifier. Feature perturbation (FP) duplicates c1 and c4 along the batch as
``cat(c, Dropout2d(p)(c))`` and decodes both halves, so the same decoder sees clean and perturbed features.

Nothing is ever downloaded: ``ModelConfig.pretrained`` is a local file with torchvision ResNet weights. The layer
helpers (``upsample``, ``init_weights``, ``conv_bn_relu``) live in ``sslray.layers`` (re-exported here), so the method
families build their heads without importing this module.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn

from sslray.config import ModelConfig
from sslray.dpt import DPTSegModel
from sslray.layers import conv_bn_relu, init_weights, paired_channel_masks, upsample  # noqa: F401 - re-exported for callers of models
from sslray.weights import load_backbone_weights  # noqa: F401 - re-exported (tests, callers)

# UniMatch's DeepLabV3+ (model/semseg/deeplabv3plus.py) has no dropout after the ASPP projection; torchvision's
# DeepLabV3 head has Dropout(0.5) there. We follow UniMatch; set this to 0.5 for the torchvision/paper variant.
ASPP_DROPOUT = 0.0

# ResNet depth -> (torchvision constructor, c1 channels, c4 channels)
_RESNETS: dict[str, tuple[Callable[..., nn.Module], int, int]] = {
    "resnet18": (torchvision.models.resnet18, 64, 512),
    "resnet50": (torchvision.models.resnet50, 256, 2048),
    "resnet101": (torchvision.models.resnet101, 256, 2048),
}

# output stride -> replace_stride_with_dilation for (layer2, layer3, layer4)
_DILATION = {16: [False, False, True], 8: [False, True, True]}


# --------------------------------------------------------------------------------------------------
# building blocks


class ASPPPooling(nn.Module):
    """Image-level branch: global average pool -> 1x1 conv-BN-ReLU -> broadcast back to [h, w].

    Its BatchNorm sees one value per channel and image, so train mode needs a batch of at least 2 (as UniMatch).
    """

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.conv = conv_bn_relu(cin, cout, k=1)

    def forward(self, x: Tensor) -> Tensor:
        """x [B, Cin, h, w] -> [B, Cout, h, w]."""
        return upsample(self.conv(self.gap(x)), x.shape[-2:])


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: 1x1 branch, one 3x3 branch per rate, image pooling, 1x1 projection."""

    def __init__(self, cin: int, cout: int, rates: tuple[int, ...], dropout: float = ASPP_DROPOUT):
        super().__init__()
        branches = [conv_bn_relu(cin, cout, k=1)]
        branches += [conv_bn_relu(cin, cout, k=3, dilation=r) for r in rates]
        branches.append(ASPPPooling(cin, cout))
        self.branches = nn.ModuleList(branches)
        self.project = conv_bn_relu(cout * len(branches), cout, k=1)
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        """x [B, Cin, h, w] -> [B, Cout, h, w]."""
        y = torch.cat([b(x) for b in self.branches], dim=1)
        return self.dropout(self.project(y))


class Decoder(nn.Module):
    """DeepLabV3+ decoder: ASPP(c4) upsampled to c1, concat with reduced c1, two fuse convs, classifier."""

    def __init__(self, c1_ch: int, c4_ch: int, num_classes: int, rates: tuple[int, ...],
                 aspp_ch: int = 256, low_ch: int = 48, fuse_ch: int = 256, aspp_dropout: float = ASPP_DROPOUT):
        super().__init__()
        self.aspp = ASPP(c4_ch, aspp_ch, rates, dropout=aspp_dropout)
        self.reduce = conv_bn_relu(c1_ch, low_ch, k=1)
        self.fuse = nn.Sequential(conv_bn_relu(aspp_ch + low_ch, fuse_ch), conv_bn_relu(fuse_ch, fuse_ch))
        self.classifier = nn.Conv2d(fuse_ch, num_classes, 1, bias=True)

    def forward(self, c1: Tensor, c4: Tensor) -> dict[str, Tensor]:
        """Decode at c1 resolution; returns every intermediate a method head may need:

        ``aspp`` [B, aspp_ch, h4, w4] (ASPP output, before upsampling), ``low`` [B, low_ch, h1, w1] (reduced
        c1), ``features`` [B, fuse_ch, h1, w1] (fused, before the classifier), ``logits_low`` [B, K, h1, w1].
        """
        aspp = self.aspp(c4)
        low = self.reduce(c1)
        feat = self.fuse(torch.cat([low, upsample(aspp, c1.shape[-2:])], dim=1))
        return {"aspp": aspp, "low": low, "features": feat, "logits_low": self.classifier(feat)}


# --------------------------------------------------------------------------------------------------
# the shared contract


class SegModel(nn.Module):
    """Encoder (``encode`` -> c1, c4) + :class:`Decoder`; subclasses set ``encoder``, ``decoder``, ``fp_dropout``."""

    encoder: nn.Module
    decoder: Decoder
    fp_dropout: nn.Module

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x [B, 3, H, W] -> (c1 [B, C1, h1, w1] low-level, c4 [B, C4, h4, w4] high-level)."""
        return self.encoder(x)

    def forward(self, x: Tensor, need_fp: bool = False, strong_dropout: str = "none") -> dict[str, Tensor]:
        """Segment a batch.

        Args:
            x: images [B, 3, H, W].
            need_fp: UniMatch feature perturbation: also decode ``Dropout2d(fp_dropout)`` copies of c1 and c4.
                The clean and perturbed halves go through the decoder as one batch of 2B (as UniMatch does), so
                in train mode its BatchNorm statistics cover both. The dropout is a registered module, so it is
                the identity in eval mode (UniMatch builds a fresh, always-active Dropout2d; it only ever uses
                need_fp in train mode, where both agree).
            strong_dropout: UniMatch V2's paired channel dropout on c1 and c4 for x = cat(s1, s2)
                (``none`` | ``complementary`` | ``independent``; :func:`sslray.layers.paired_channel_masks`, one
                draw per feature, as their channel counts differ).

        Returns:
            ``logits`` [B, K, H, W] (bilinear, align_corners=True, to the input size), ``logits_low``
            [B, K, h1, w1] (the same before upsampling), ``features`` [B, D, h1, w1] (the fused decoder
            feature before the classifier), ``aspp`` [B, A, h4, w4], ``low`` [B, L, h1, w1] (reduced c1), ``c1``
            and ``c4`` (encoder features); with need_fp also ``logits_fp`` [B, K, H, W]. With need_fp, every
            other entry is the clean half.
        """
        size = x.shape[-2:]
        c1, c4 = self.encode(x)
        if strong_dropout != "none":
            c1, c4 = (c * paired_channel_masks(x.shape[0], c.shape[1], strong_dropout, c.device)[:, :, None, None]
                      for c in (c1, c4))
        if not need_fp:
            out = self.decoder(c1, c4)
            return {"logits": upsample(out["logits_low"], size), **out, "c1": c1, "c4": c4}
        out = self.decoder(torch.cat([c1, self.fp_dropout(c1)]), torch.cat([c4, self.fp_dropout(c4)]))
        clean, fp = upsample(out["logits_low"], size).chunk(2)
        b = x.shape[0]
        return {"logits": clean, "logits_fp": fp, **{k: v[:b] for k, v in out.items()}, "c1": c1, "c4": c4}

    @property
    def feature_dims(self) -> dict[str, int]:
        """Channel counts of the dict entries, for method heads: features, aspp, low, c1, c4, classes."""
        d = self.decoder
        return {"features": d.classifier.in_channels, "aspp": d.aspp.project[0].out_channels,
                "low": d.reduce[0].out_channels, "c1": d.reduce[0].in_channels,
                "c4": d.aspp.branches[0][0].in_channels, "classes": d.classifier.out_channels}

    def param_groups(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(backbone/encoder parameters, head = ASPP + decoder + classifier parameters); UniMatch gives the head
        ``lr * head_lr_mult``. Every parameter is in exactly one group."""
        backbone = list(self.encoder.parameters())
        seen = {id(p) for p in backbone}
        head = [p for p in self.parameters() if id(p) not in seen]
        return backbone, head


# --------------------------------------------------------------------------------------------------
# DeepLabV3+ with a torchvision ResNet


class ResNetEncoder(nn.Module):
    """A torchvision ResNet without avgpool/fc. Parameter names equal torchvision's (``layer1.0.conv1.weight``),
    so torchvision state dicts load directly."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x [B, 3, H, W] -> (c1 = layer1 [B, C1, H/4, W/4], c4 = layer4 [B, C4, H/os, W/os])."""
        c1 = self.layer1(self.maxpool(self.relu(self.bn1(self.conv1(x)))))
        return c1, self.layer4(self.layer3(self.layer2(c1)))


def _dilate_basic_layer(layer: nn.Sequential, prev_dilation: int, dilation: int) -> None:
    """Turn a strided BasicBlock layer into a dilated one, in place.

    torchvision's BasicBlock refuses ``replace_stride_with_dilation``. We mirror what torchvision does for
    Bottleneck: the first block drops its stride (and its downsample's) and keeps the previous dilation, the
    following blocks use the new one. Padding = dilation keeps 3x3 convs size-preserving.
    """
    for i, block in enumerate(layer):
        d = prev_dilation if i == 0 else dilation
        for conv in (block.conv1, block.conv2):
            conv.stride, conv.dilation, conv.padding = (1, 1), (d, d), (d, d)
        if block.downsample is not None:
            block.downsample[0].stride = (1, 1)


def _resnet(name: str, output_stride: int) -> nn.Module:
    """A randomly initialised torchvision ResNet with the requested output stride (8 or 16)."""
    if name not in _RESNETS:
        raise ValueError(f"unknown backbone {name!r} (expected one of: {', '.join(_RESNETS)})")
    if output_stride not in _DILATION:
        raise ValueError(f"output_stride must be one of {sorted(_DILATION)}, got {output_stride}")
    ctor, _, _ = _RESNETS[name]
    dilate = _DILATION[output_stride]
    if name != "resnet18":
        return ctor(weights=None, replace_stride_with_dilation=dilate)
    net = ctor(weights=None)
    dilation = 1
    for layer, flag in zip((net.layer2, net.layer3, net.layer4), dilate):
        if flag:
            _dilate_basic_layer(layer, dilation, dilation * 2)
            dilation *= 2
    return net


class DeepLabV3Plus(SegModel):
    """DeepLabV3+ as in UniMatch, with a torchvision ResNet-18/50/101 (plain stem, not UniMatch's deep stem).

    c1 = layer1 (stride 4; 64 ch for resnet18, 256 otherwise), c4 = layer4 (stride ``output_stride``; 512 or
    2048 ch), ASPP to 256 ch, c1 reduced to 48 ch, fuse to 256 ch.
    """

    def __init__(self, cfg: ModelConfig, num_classes: int):
        super().__init__()
        self.encoder = ResNetEncoder(_resnet(cfg.backbone, cfg.output_stride))
        _, c1_ch, c4_ch = _RESNETS[cfg.backbone]
        self.decoder = Decoder(c1_ch, c4_ch, num_classes, tuple(cfg.aspp_rates))
        init_weights(self.decoder)  # the encoder keeps torchvision's (also Kaiming) init
        self.fp_dropout = nn.Dropout2d(cfg.fp_dropout)
        if cfg.pretrained:
            load_backbone_weights(self.encoder, cfg.pretrained)


# --------------------------------------------------------------------------------------------------
# the small CPU model


class ResBlock(nn.Module):
    """Two 3x3 conv-BN with an identity skip; ``dilation`` widens the receptive field at no cost."""

    def __init__(self, ch: int, dilation: int = 1):
        super().__init__()
        self.conv1 = conv_bn_relu(ch, ch, dilation=dilation)
        self.conv2 = nn.Conv2d(ch, ch, 3, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(ch)

    def forward(self, x: Tensor) -> Tensor:
        """x [B, C, h, w] -> [B, C, h, w]."""
        return F.relu(x + self.bn2(self.conv2(self.conv1(x))))


class SmallEncoder(nn.Module):
    """stem (3x3, stride 2) + residual block = c1 (stride 2) -> stride 4 -> c4 (stride 8, dilated residual block).

    Channels at width w: c1 w/2, stride 4 w, c4 2w. The stem is strided and c1 is narrow because
    full-resolution convs dominate CPU time at 64x64; c1 at stride 2 still gives a 32x32 decoder output for
    64x64 inputs, fine enough for 8-17 px objects. Receptive field: 11 px at c1, 31 px at stride 4, 103 px at c4.
    """

    def __init__(self, width: int):
        super().__init__()
        c1, c2, c4 = max(width // 2, 4), width, 2 * width
        self.stem = conv_bn_relu(3, c1, stride=2)
        self.stage1 = ResBlock(c1)
        self.stage2 = nn.Sequential(conv_bn_relu(c1, c2, stride=2), ResBlock(c2))
        self.stage3 = nn.Sequential(conv_bn_relu(c2, c4, stride=2), ResBlock(c4, dilation=2))
        self.c1_channels, self.c4_channels = c1, c4

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x [B, 3, H, W] -> (c1 [B, w/2, H/2, W/2], c4 [B, 2w, H/8, W/8])."""
        c1 = self.stage1(self.stem(x))
        return c1, self.stage3(self.stage2(c1))


class SmallSegModel(SegModel):
    """A fast CPU model with UniMatch's decoder structure, scaled by ``cfg.width`` (w).

    Decoder at width w: ASPP 2w -> w, low-level projection w/2 -> w/4, fuse w (features D = w). ASPP rates are
    fixed at (1, 2, 3): at stride 8 on 64x64 inputs c4 is 8x8, so DeepLab's (6, 12, 18) would mostly see
    padding; ``cfg.aspp_rates`` and ``cfg.output_stride`` apply to deeplabv3plus only. Width 32: ~0.21 M
    parameters.
    """

    ASPP_RATES = (1, 2, 3)

    def __init__(self, cfg: ModelConfig, num_classes: int):
        super().__init__()
        w = cfg.width
        self.encoder = SmallEncoder(w)
        e = self.encoder
        self.decoder = Decoder(e.c1_channels, e.c4_channels, num_classes, self.ASPP_RATES,
                               aspp_ch=w, low_ch=max(w // 4, 4), fuse_ch=w)
        self.fp_dropout = nn.Dropout2d(cfg.fp_dropout)
        init_weights(self)


# --------------------------------------------------------------------------------------------------
# registry

MODELS: dict[str, type[nn.Module]] = {
    "small": SmallSegModel,
    "deeplabv3plus": DeepLabV3Plus,
    "dpt": DPTSegModel,  # DINOv2 (timm) + DPT head, UniMatch V2 (sslray.dpt)
}


def list_models() -> list[str]:
    """Names accepted by ``ModelConfig.name``."""
    return list(MODELS)


def build_model(cfg: ModelConfig, num_classes: int) -> SegModel:
    """Build the model named by ``cfg.name`` with ``num_classes`` output channels (random init unless
    ``cfg.pretrained`` names a local backbone weight file)."""
    if cfg.name not in MODELS:
        raise ValueError(f"unknown model {cfg.name!r} (expected one of: {', '.join(MODELS)})")
    if num_classes < 1:
        raise ValueError(f"num_classes must be positive, got {num_classes}")
    return MODELS[cfg.name](cfg, num_classes)
