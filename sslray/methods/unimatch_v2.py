"""UniMatch V2 (Yang et al., arXiv 2410.10777; LiheYoung/UniMatch-V2 ``unimatch_v2.py``) as a preset of shared pieces.

What V2 changes over UniMatch V1, each a setting or a term weight, so each is one ablation row:

- ``teacher``: an EMA teacher in eval mode makes the pseudo-labels on the weak view, momentum
  ``min(1 - 1/(k + 1), 0.996)`` after the k-th update, applied to parameters and float buffers (``bn_stats: ema``;
  the DPT has no BN). ``-ema``: ``method.teacher.kind: self`` (the student's own detached weak-view pass, V1).
- ``strong_dropout: complementary``: the student sees ``cat(s1, s2)`` in one forward, and the encoder's four
  intermediate features are multiplied by paired channel masks m1 in {0, 2}, m2 = 2 - m1 (a random half of the
  images keep every channel; :func:`sslray.layers.paired_channel_masks`). ``-complementary``: ``independent``
  (two independent draws); no dropout at all: ``none``.
- ``mix_source: flip``: each strong view is CutMixed with its own box against the same batch reversed
  (``img.flip(0)``), pseudo-labels mixed alike; no second unlabeled batch.
- Loss ``(L_x + (L_s1 + L_s2) / 2) / 2`` = weights x 1, u_s1 0.5, u_s2 0.5, ``global_div`` 2; tau 0.95; no FP term.

The rest of V2's recipe is trial settings, not the method (``studies/voc_classic_v2.yaml``): ``model.name: dpt``
with a DINOv2 backbone, ``optim.optimizer: adamw``, ``optim.lr: 5e-6``, ``optim.head_lr_mult: 40``,
``optim.weight_decay: 0.01``, ``optim.poly_power: 0.9``, ``train.eval_model: both`` (student and EMA evaluated).

Composition: ``unimatch_v2+ipixmatch`` / ``+pcr`` / ``+mllc`` / ``+guidedmix`` add those methods' terms (their
own base presets apply only when they come first); the term weights are divided by V2's ``global_div`` of 2.
"""
from __future__ import annotations

from typing import Any

# The preset (registered as "unimatch_v2" by sslray/methods/registry.py; this module imports nothing, like the
# registry it stays free of torch). Its terms are the shared x / u_s1 / u_s2; the rest is settings.
PRESET: dict[str, Any] = {
    "teacher": {"kind": "ema", "ema_alpha": 0.996, "ema_warmup": True, "bn_stats": "ema"},
    "conf_thresh": 0.95, "global_div": 2.0, "mix_source": "flip", "strong_dropout": "complementary",
    "terms": {"x": {"weight": 1.0}, "u_s1": {"weight": 0.5}, "u_s2": {"weight": 0.5}},
}
