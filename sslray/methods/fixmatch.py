"""Pseudo-label terms on strong views, exactly as UniMatch's ``fixmatch.py``/``unimatch.py`` compute them.

``L_s = sum_pix CE(pred_u_s, mask_mixed) * [conf_mixed >= tau] * [ignore_mixed != 255] / sum_pix [ignore_mixed != 255]``

The denominator counts *valid* pixels, not confident ones (methods.md §3.2 step 5).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def pseudo_label_ce(pred: torch.Tensor, mask: torch.Tensor, conf: torch.Tensor, ignore: torch.Tensor,
                    conf_thresh: float, ignore_index: int = 255) -> torch.Tensor:
    """pred [B, K, H, W] logits; mask [B, H, W] long pseudo-labels; conf [B, H, W]; ignore [B, H, W] (255 = pad)."""
    loss = F.cross_entropy(pred.float(), mask, reduction="none")
    valid = ignore != ignore_index
    loss = loss * ((conf >= conf_thresh) & valid)
    return loss.sum() / valid.sum().clamp(min=1)


def loss_u_s1(out, cfg, ctx) -> torch.Tensor:
    t = out.mixed_target(1)
    return pseudo_label_ce(out.pred_u_s1, t.mask, t.conf, t.ignore, ctx.conf_thresh, ctx.ignore_index)


def loss_u_s2(out, cfg, ctx) -> torch.Tensor:
    t = out.mixed_target(2)
    return pseudo_label_ce(out.pred_u_s2, t.mask, t.conf, t.ignore, ctx.conf_thresh, ctx.ignore_index)
