"""UniMatch's feature-perturbation term (CVPR 2023, ``unimatch.py``).

The weak view is decoded twice in one forward: once from the clean encoder features and once after
Dropout2d(0.5) on c1 and c4 (``model(..., need_fp=True)``). The FP branch is trained on the plain
(un-mixed) pseudo-labels with the same confidence mask and valid-pixel normalisation as ``u_s1``.
"""
from __future__ import annotations

import torch

from sslray.methods.fixmatch import pseudo_label_ce


def loss_u_fp(out, cfg, ctx) -> torch.Tensor:
    return pseudo_label_ce(out.pred_u_w_fp, out.mask_u_w, out.conf_u_w, out.ignore_mask_u,
                           ctx.conf_thresh, ctx.ignore_index)
