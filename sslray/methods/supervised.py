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
    """
    logits = logits.float()
    valid = target != ignore_index
    n_valid = int(valid.sum())
    if n_valid == 0:
        return logits.sum() * 0.0
    tgt = torch.where(valid, target, torch.zeros_like(target))
    prob_true = torch.softmax(logits, 1).gather(1, tgt.unsqueeze(1)).squeeze(1)
    keep = valid
    if n_valid > min_kept > 0:
        kth = torch.kthvalue(prob_true[valid], min(min_kept, n_valid)).values
        threshold = torch.clamp(kth, min=thresh)
        keep = valid & (prob_true <= threshold)
    target_kept = torch.where(keep, target, torch.full_like(target, ignore_index))
    return F.cross_entropy(logits, target_kept, ignore_index=ignore_index)
