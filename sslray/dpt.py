"""DINOv2 ViT encoders (built by timm) with a DPT head, as in UniMatch V2 (``model/semseg/dpt.py``).

``model.name: dpt`` with ``model.backbone: dinov2_<size>`` or ``dinov2_<size>_reg4`` builds the timm model
``vit_<size>_patch14[_reg4]_dinov2`` with ``pretrained=False`` (random init; ``model.pretrained`` loads a local file,
nothing is ever downloaded) and V2's head settings per size:

    size    timm model                     blocks read          DPT features  projections
    small   vit_small_patch14_dinov2       [2, 5, 8, 11]        64            [48, 96, 192, 384]
    base    vit_base_patch14_dinov2        [2, 5, 8, 11]        128           [96, 192, 384, 768]
    large   vit_large_patch14_dinov2       [4, 11, 17, 23]      256           [256, 512, 1024, 1024]
    giant   vit_giant_patch14_dinov2       [9, 19, 29, 39]      384           [1536] * 4
    tiny    (test size, not a DINOv2)      [0, 1, 2, 3]         16            [16, 32, 48, 48]

``dinov2_tiny`` is **a test size only**: a timm ``VisionTransformer`` with DINOv2's shape (patch 14, layer scale,
518 px position grid, optional 4 registers) but embed dim 48, depth 4, 3 heads, for CPU tests and synthetic
studies. No DINOv2 weights exist for it.

The encoder returns the four blocks' patch tokens after the final LayerNorm (DINOv2's ``get_intermediate_layers``
with ``norm=True``, which V2 calls; timm's ``forward_intermediates(norm=True)``), class and register tokens
dropped, as [B, C, H/14, W/14]. timm resamples the position embedding (bicubic) for grids other than the 37 x 37
of 518 px; Meta's code (which V2 runs) interpolates with a 0.1 offset, so away from 518 px the two differ slightly.
Attention uses ``scaled_dot_product_attention`` (timm's ``fused_attn``, switched on for every block here;
:attr:`DPTSegModel.uses_sdpa` reports it).

**Inputs that are not a multiple of 14** (``model.patch_fit``): ``resize`` (default; V2's evaluation) resizes the
image bilinearly (align_corners=True) to the nearest multiple of 14 per side (``int(s / 14 + 0.5) * 14``, at least
14) and the logits back to the input size; ``pad`` zero-pads bottom/right to the next multiple and crops the
logits. With ``resize`` the logits are ``upsample(logits_low, input size)`` in one step (V2 resizes to the
multiple of 14 and then to the original size: two bilinear steps, the same at multiples of 14, as V2's 518/798
training crops and 798 sliding windows are), so ``logits`` is ``logits_low`` upsampled, as for DeepLabV3+, and the
method heads that re-upsample ``logits_low`` agree with the model. With ``pad`` that holds only at multiples of 14.

**The model dict** is the :class:`sslray.models.SegModel` contract, so every loss term works unchanged. The DPT
head fuses four maps at 4x, 2x, 1x and 1/2x the patch grid (p = H/14) up to 8p; the entries are:

    logits_low  [B, K, 8p, 8p]   the head's output before resizing to the input
    features    [B, F, 8p, 8p]   after the head's 3x3 conv + ReLU, before its 1x1 classifier
    low         [B, F, 8p, 8p]   the last fusion block's output (the input of the 3x3 conv)       [I: the analog of
    aspp        [B, F, 4p, 4p]   the fusion path before its last fusion (deepest decoder context)      DeepLab's
    c1, c4      [B, C, p, p]     the first and last intermediate encoder features                   low / ASPP]
    logits      [B, K, H, W]

``need_fp`` (UniMatch V1's feature perturbation) applies Dropout2d(``model.fp_dropout``) to all four encoder
features and decodes clean and perturbed copies as one batch. ``strong_dropout`` (UniMatch V2) multiplies the four
features of a batch ``cat(s1, s2)`` by paired channel masks (:func:`sslray.layers.paired_channel_masks`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sslray.config import DINOV2_BACKBONES, ModelConfig
from sslray.layers import paired_channel_masks, upsample
from sslray.weights import check_keys, read_state_dict

PATCH = 14


@dataclass(frozen=True)
class ViTSize:
    """One encoder size: the timm model (None: the tiny test ViT), the blocks read, V2's DPT head widths."""

    timm_name: str | None
    indices: tuple[int, int, int, int]
    features: int
    out_channels: tuple[int, int, int, int]


SIZES: dict[str, ViTSize] = {
    "small": ViTSize("vit_small_patch14{reg}_dinov2", (2, 5, 8, 11), 64, (48, 96, 192, 384)),
    "base": ViTSize("vit_base_patch14{reg}_dinov2", (2, 5, 8, 11), 128, (96, 192, 384, 768)),
    "large": ViTSize("vit_large_patch14{reg}_dinov2", (4, 11, 17, 23), 256, (256, 512, 1024, 1024)),
    "giant": ViTSize("vit_giant_patch14{reg}_dinov2", (9, 19, 29, 39), 384, (1536, 1536, 1536, 1536)),
    "tiny": ViTSize(None, (0, 1, 2, 3), 16, (16, 32, 48, 48)),  # a test size, not a DINOv2
}
TINY_VIT = dict(embed_dim=48, depth=4, num_heads=3)
BACKBONES = DINOV2_BACKBONES  # the config's list: dinov2_<size>[_reg4] for every size here
assert set(BACKBONES) == {f"dinov2_{s}{r}" for s in SIZES for r in ("", "_reg4")}


def parse_backbone(name: str) -> tuple[str, bool]:
    """``dinov2_small_reg4`` -> ("small", True); ValueError for anything else."""
    parts = name.split("_")
    if name not in BACKBONES:
        raise ValueError(f"unknown ViT backbone {name!r} (expected one of: {', '.join(BACKBONES)})")
    return parts[1], len(parts) == 3


def build_vit(backbone: str) -> nn.Module:
    """The timm ViT for ``dinov2_<size>[_reg4]`` with random weights, ``dynamic_img_size`` (any patch grid), no
    classifier, and fused (SDPA) attention in every block."""
    import timm
    from timm.models.vision_transformer import VisionTransformer

    size, reg = parse_backbone(backbone)
    spec = SIZES[size]
    common = dict(num_classes=0, dynamic_img_size=True)
    if spec.timm_name is None:
        regs = dict(reg_tokens=4, no_embed_class=True) if reg else {}
        vit = VisionTransformer(img_size=518, patch_size=PATCH, init_values=1e-5, **TINY_VIT, **regs, **common)
    else:
        vit = timm.create_model(spec.timm_name.format(reg="_reg4" if reg else ""), pretrained=False, **common)
    for block in vit.blocks:
        block.attn.fused_attn = True
    return vit


def load_dinov2_weights(vit: nn.Module, path: str) -> None:
    """Load a local DINOv2 checkpoint in Meta's layout (``mask_token``, ``register_tokens``, ``pos_embed`` with the
    class position, ``mlp.w12``/``w3`` for giant) or timm's (``reg_token``, ``fc1``/``fc2``) into ``vit``.

    timm's own ``checkpoint_filter_fn`` converts Meta's layout (it recognises it by ``mask_token``) and resamples
    ``pos_embed`` to the model's grid; every key and shape is then checked. Raises FileNotFoundError / ValueError
    with one line naming the file (and the missing, unexpected and mis-shaped keys)."""
    from timm.models.vision_transformer import checkpoint_filter_fn

    sd = read_state_dict(path)
    try:
        sd = checkpoint_filter_fn(dict(sd), vit)
    except Exception as e:  # noqa: BLE001 - a foreign layout or another variant (registers, size) timm cannot convert
        check_keys(vit, sd, path)  # names the missing / unexpected / mis-shaped keys when there are any
        raise ValueError(f"{path}: not a DINOv2 checkpoint timm can convert ({type(e).__name__}: {e}); "
                         f"keys {sorted(sd)[:8]}") from None
    check_keys(vit, sd, path)
    vit.load_state_dict(sd, strict=True)


# --------------------------------------------------------------------------------------------------
# the DPT head (UniMatch V2 / Depth Anything's, without BN)


class ResidualConvUnit(nn.Module):
    """x + conv(relu(conv(relu(x)))), 3x3 convs with bias."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv1 = nn.Conv2d(ch, ch, 3, padding=1)
        self.conv2 = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv2(F.relu(self.conv1(F.relu(x))))


class FusionBlock(nn.Module):
    """(path [+ RCU(skip)]) -> RCU -> bilinear resize (to ``size``, else x2; align_corners=True) -> 1x1 conv.

    The deepest block has no skip, so no ``res1`` (V2 builds one it never uses, and so needs DDP's
    ``find_unused_parameters``; here every parameter gets a gradient)."""

    def __init__(self, ch: int, skip: bool = True):
        super().__init__()
        self.res1 = ResidualConvUnit(ch) if skip else None
        self.res2 = ResidualConvUnit(ch)
        self.out_conv = nn.Conv2d(ch, ch, 1)

    def forward(self, path: Tensor, skip: Tensor | None = None, size: torch.Size | None = None) -> Tensor:
        if skip is not None and self.res1 is not None:
            path = path + self.res1(skip)
        path = self.res2(path)
        if size is None:
            path = F.interpolate(path, scale_factor=2, mode="bilinear", align_corners=True)
        else:
            path = upsample(path, size)
        return self.out_conv(path)


class DPTHead(nn.Module):
    """Project each feature (1x1), resample to 4x / 2x / 1x / 0.5x the patch grid, 3x3 to ``features`` channels,
    fuse from the deepest up, then 3x3 conv + ReLU + 1x1 classifier."""

    def __init__(self, embed_dim: int, num_classes: int, features: int, out_channels: tuple[int, ...]):
        super().__init__()
        o = out_channels
        self.projects = nn.ModuleList([nn.Conv2d(embed_dim, c, 1) for c in o])
        self.resize = nn.ModuleList([nn.ConvTranspose2d(o[0], o[0], 4, stride=4),
                                     nn.ConvTranspose2d(o[1], o[1], 2, stride=2), nn.Identity(),
                                     nn.Conv2d(o[3], o[3], 3, stride=2, padding=1)])
        self.layer_rn = nn.ModuleList([nn.Conv2d(c, features, 3, padding=1, bias=False) for c in o])
        self.fusion = nn.ModuleList([FusionBlock(features, skip=i < 3) for i in range(4)])  # [0]: the finest
        self.conv = nn.Conv2d(features, features, 3, padding=1)
        self.classifier = nn.Conv2d(features, num_classes, 1)

    def forward(self, feats: list[Tensor]) -> dict[str, Tensor]:
        """feats: four [B, C, p, p] -> ``logits_low``, ``features``, ``low``, ``aspp`` (see the module docstring)."""
        r = [rn(rs(pr(f))) for f, pr, rs, rn in zip(feats, self.projects, self.resize, self.layer_rn)]
        path = self.fusion[3](r[3], size=r[2].shape[-2:])
        path = self.fusion[2](path, r[2], size=r[1].shape[-2:])
        deep = self.fusion[1](path, r[1], size=r[0].shape[-2:])
        low = self.fusion[0](deep, r[0])
        feat = F.relu(self.conv(low))
        return {"logits_low": self.classifier(feat), "features": feat, "low": low, "aspp": deep}


# --------------------------------------------------------------------------------------------------
# the segmentation model


def fit_size(s: int, mode: str) -> int:
    """The side the encoder sees for an input side ``s``: nearest multiple of 14 (resize) or the next (pad)."""
    if mode == "pad":
        return -(-s // PATCH) * PATCH
    return max(int(s / PATCH + 0.5), 1) * PATCH


class DPTSegModel(nn.Module):
    """DINOv2 (timm) + DPT head with the :class:`sslray.models.SegModel` contract (``forward``, ``feature_dims``,
    ``param_groups``)."""

    def __init__(self, cfg: ModelConfig, num_classes: int):
        super().__init__()
        size, _ = parse_backbone(cfg.backbone)
        spec = SIZES[size]
        self.encoder = build_vit(cfg.backbone)
        self.indices = list(spec.indices)
        self.patch_fit = cfg.patch_fit
        self.head = DPTHead(self.encoder.embed_dim, num_classes, spec.features, spec.out_channels)
        self.fp_dropout = nn.Dropout2d(cfg.fp_dropout)
        if cfg.pretrained:
            load_dinov2_weights(self.encoder, cfg.pretrained)

    @property
    def uses_sdpa(self) -> bool:
        """Whether every attention block calls ``F.scaled_dot_product_attention`` (timm's fused path)."""
        return all(getattr(b.attn, "fused_attn", False) for b in self.encoder.blocks)

    def encode(self, x: Tensor) -> list[Tensor]:
        """x [B, 3, 14a, 14b] -> four [B, C, a, b] normed patch-token maps of the blocks in ``indices``."""
        return self.encoder.forward_intermediates(x, indices=self.indices, norm=True, output_fmt="NCHW",
                                                  intermediates_only=True)

    def _fit(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        fh, fw = fit_size(h, self.patch_fit), fit_size(w, self.patch_fit)
        if (fh, fw) == (h, w):
            return x
        if self.patch_fit == "pad":
            return F.pad(x, (0, fw - w, 0, fh - h))
        return upsample(x, (fh, fw))

    def _logits(self, logits_low: Tensor, fitted: torch.Size, size: torch.Size) -> Tensor:
        if self.patch_fit == "pad" and fitted != size:
            return upsample(logits_low, fitted)[..., : size[0], : size[1]]
        return upsample(logits_low, size)

    def forward(self, x: Tensor, need_fp: bool = False, strong_dropout: str = "none") -> dict[str, Tensor]:
        """Segment a batch of any size; ``strong_dropout`` (none | complementary | independent) needs x =
        cat(s1, s2) of two equal halves. Returns the dict of the module docstring (with need_fp also
        ``logits_fp``, every other entry the clean half)."""
        size = x.shape[-2:]
        x_fit = self._fit(x)
        feats = self.encode(x_fit)
        if strong_dropout != "none":
            m = paired_channel_masks(x.shape[0], feats[0].shape[1], strong_dropout, feats[0].device)
            feats = [f * m[:, :, None, None].to(f.dtype) for f in feats]
        out_fp = None
        if need_fp:
            out = self.head([torch.cat([f, self.fp_dropout(f)]) for f in feats])
            b = x.shape[0]
            out_fp = out["logits_low"][b:]
            out = {k: v[:b] for k, v in out.items()}
        else:
            out = self.head(feats)
        res = {"logits": self._logits(out["logits_low"], x_fit.shape[-2:], size), **out, "c1": feats[0],
               "c4": feats[-1]}
        if out_fp is not None:
            res["logits_fp"] = self._logits(out_fp, x_fit.shape[-2:], size)
        return res

    @property
    def feature_dims(self) -> dict[str, int]:
        """Channel counts of the dict entries, for method heads: features, aspp, low, c1, c4, classes."""
        f = self.head.conv.out_channels
        c = self.encoder.embed_dim
        return {"features": f, "aspp": f, "low": f, "c1": c, "c4": c, "classes": self.head.classifier.out_channels}

    def param_groups(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(encoder parameters, head parameters): V2 gives the head ``lr * 40``."""
        backbone = list(self.encoder.parameters())
        seen = {id(p) for p in backbone}
        return backbone, [p for p in self.parameters() if id(p) not in seen]
