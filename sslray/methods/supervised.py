"""The supervised term ``x``: cross-entropy (VOC) or OHEM cross-entropy (Cityscapes) on labeled pixels."""
from __future__ import annotations


import torch
import torch.nn.functional as F

from sslray.methods.settings import SupervisedTermConfig  # noqa: F401 - re-exported


def loss_x(out, cfg: SupervisedTermConfig, ctx) -> torch.Tensor:
    """L_x = CE(pred_x, mask_x), mean over pixels whose label is not ``ignore_index``.

    pred_x: [B, K, H, W] logits; mask_x: [B, H, W] long.
    """
    if cfg.criterion == "ohem":
        return ohem_ce(out.pred_x, out.mask_x, ctx.ignore_index, cfg.ohem_thresh, cfg.ohem_min_kept)
    return F.cross_entropy(out.pred_x.float(), out.mask_x, ignore_index=ctx.ignore_index)


def ohem_ce(logits: torch.Tensor, target: torch.Tensor, ignore_index: int, thresh: float,
            min_kept: int) -> torch.Tensor:
    """Online hard example mining CE (UniMatch ``util/ohem.py`` semantics).

    Among valid pixels keep those whose probability of the true class is <= threshold, where
    threshold = max(thresh, prob of the ``min_kept``-th hardest pixel); with fewer than ``min_kept``
    valid pixels, keep all of them.

    Computed without reading the valid count back: the ``min_kept``-th smallest true-class probability among
    valid pixels is the ``min_kept``-th smallest of all pixels with the others set to +inf, and whether there
    are more than ``min_kept`` valid pixels is a device-side condition (with no more pixels than ``min_kept``
    in the batch it cannot hold, and nothing is mined). With no valid pixel the loss is a graph-connected 0.
    """
    logits = logits.float()
    valid = target != ignore_index
    tgt = torch.where(valid, target, torch.zeros_like(target))
    keep = valid
    if 0 < min_kept < valid.numel():
        prob_true = torch.softmax(logits, 1).gather(1, tgt.unsqueeze(1)).squeeze(1)
        kth = torch.kthvalue(prob_true.masked_fill(~valid, float("inf")).flatten(), min_kept).values
        threshold = torch.clamp(kth, min=thresh)
        keep = valid & ((valid.sum() <= min_kept) | (prob_true <= threshold))
    target_kept = torch.where(keep, target, torch.full_like(target, ignore_index))
    loss = F.cross_entropy(logits, target_kept, ignore_index=ignore_index, reduction="sum")
    return loss / keep.sum().clamp(min=1)
