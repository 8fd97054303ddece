"""Classic Mean Teacher consistency (Tarvainen & Valpola 2017; TorchSemiSeg's MeanTeacher).

``L_mse = mean over valid pixels and classes of (softmax(student on s1) - teacher probabilities)^2``, the
teacher probabilities mixed with the same CutMix box as the student's input. TorchSemiSeg weighs it by
100; set ``method.terms.u_mse.weight`` accordingly.
"""
from __future__ import annotations

import torch


def loss_u_mse(out, cfg, ctx) -> torch.Tensor:
    t = out.mixed_target(1, with_prob=True)
    p_s = torch.softmax(out.pred_u_s1.float(), 1)
    valid = (t.ignore != ctx.ignore_index).unsqueeze(1)
    sq = (p_s - t.prob) ** 2 * valid
    return sq.sum() / (valid.sum() * p_s.shape[1]).clamp(min=1)
