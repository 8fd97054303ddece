"""The typed settings of every loss term (``TermConfig`` subclasses) and the families' consistency checks.

Torch-free on purpose: config validation and the light commands build these without importing the method code
(``sslray/methods/<method>.py`` holds the losses and modules, and re-exports its settings classes from here).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import ClassVar

from sslray.methods.spec import TermConfig


# --------------------------------------------------------------------------------------------------
# supervised (sslray/methods/supervised.py)


@dataclass(frozen=True)
class SupervisedTermConfig(TermConfig):
    criterion: str = "ce"  # ce | ohem
    ohem_thresh: float = 0.7  # UniMatch's ProbOhemCrossEntropy2d defaults for Cityscapes
    ohem_min_kept: int = 200000

    CHOICES: ClassVar[dict[str, tuple]] = {"criterion": ("ce", "ohem")}


# --------------------------------------------------------------------------------------------------
# GuidedMix-Net (sslray/methods/guidedmix.py)


@dataclass(frozen=True)
class GuidedMixConfig(TermConfig):
    """Settings of the ``guidedmix`` term; they also shape the family's module (heads, MITrans)."""

    mode: str = "code"  # code: feature mixing + mix head + focal (official code) | paper: image mixup + pseudo masks
    lambda_max: float = 0.5  # lam ~ U(0, min(lambda_max, 0.5)); 0.4 in the code's cityscapes_372, 0.1-0.3 ablations
    pairing: str = "auto"  # auto (code: random, paper: similarity) | random | similarity (cos of GAP(c4))
    decouple: bool = True  # subtract the labeled share from the mixed prediction; false: use z_mix directly
    mitrans: bool = False  # the non-local MITrans module on the mixed features
    mitrans_pool: int = 1  # average-pool keys/values of the non-local attention by this factor
    # code mode
    head: str = "decoder"  # decoder: copy of the main decoder after ASPP, at z_l's stride | aspp: at c4's stride
    head_dropout: float = 0.1  # Dropout2d before the mix head's classifier (mmseg decode heads: 0.1)
    cls_init: str = "normal"  # mix head classifier: normal: N(0, 0.01), zero bias (mmseg conv_seg) | kaiming
    detach_zl: bool = False  # stop the decoupling's gradient into z_l (the code does not: false)
    focal_gamma: float = 0.5
    focal_alpha: float = 0.5
    # paper mode
    pseudo: str = "decoupled"  # decoupled: masks from the mixed prediction | self: plain self-training
    fuse: float = 0.5  # weight of the teacher's probabilities fused into the decoupled ones (0: none)
    pseudo_thresh: float = 0.0  # pixels whose fused confidence is below are left out

    CHOICES: ClassVar[dict[str, tuple]] = {"mode": ("code", "paper"), "pairing": ("auto", "random", "similarity"),
                                           "head": ("decoder", "aspp"), "cls_init": ("normal", "kaiming"),
                                           "pseudo": ("decoupled", "self")}

    def problems(self) -> list[tuple[str, str]]:
        bad = []
        if not 0.0 < self.lambda_max <= 1.0:
            bad.append(("lambda_max", f"expected a value in (0, 1], got {self.lambda_max!r}"))
        if self.mitrans_pool < 1:
            bad.append(("mitrans_pool", f"expected an integer >= 1, got {self.mitrans_pool!r}"))
        if not 0.0 <= self.head_dropout < 1.0:
            bad.append(("head_dropout", f"expected a value in [0, 1), got {self.head_dropout!r}"))
        if self.focal_gamma < 0:
            bad.append(("focal_gamma", f"expected a non-negative value, got {self.focal_gamma!r}"))
        for key in ("focal_alpha", "fuse", "pseudo_thresh"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                bad.append((key, f"expected a value in [0, 1], got {getattr(self, key)!r}"))
        return bad


def check_guidedmix(terms: dict[str, TermConfig]) -> list[tuple[str, str]]:
    """guidedmix_mix shares guidedmix's (paper-mode) mixing; paper-mode MITrans is trained only by guidedmix_mix."""
    cfg = terms.get("guidedmix")
    if cfg is None or cfg.mode != "paper" and "guidedmix_mix" in terms:
        return [("guidedmix_mix.weight", "needs the term guidedmix with mode paper and a weight > 0 (it shares its "
                                         "mixing settings)")]
    if cfg.mode == "paper" and cfg.mitrans and "guidedmix_mix" not in terms:
        return [("guidedmix.mitrans", "in paper mode MITrans is trained only by the term guidedmix_mix; give it a "
                                      "weight > 0")]
    return []


# --------------------------------------------------------------------------------------------------
# IPixMatch (sslray/methods/ipixmatch.py)


@dataclass(frozen=True)
class IPixTermConfig(TermConfig):
    """Settings of one IPixMatch view term (see the module docstring)."""

    relation: str = "per_class"  # per_class | pairwise
    distance: str = "kl"  # kl | correlation
    temperature: float = 1.0  # KL forms only
    conf_thresh: float | None = None  # None: inherit method.conf_thresh
    resolution: str = "decoder"  # decoder | full
    max_nodes: int = 4096  # pairwise: nodes per image
    node_select: str = "random"  # pairwise: random | pool
    scale: str = "confident_share"  # confident_share | none: weigh each image by its share of confident pixels

    CHOICES: ClassVar[dict[str, tuple]] = {"relation": ("per_class", "pairwise"), "distance": ("kl", "correlation"),
                                           "resolution": ("decoder", "full"), "node_select": ("random", "pool"),
                                           "scale": ("confident_share", "none")}


# --------------------------------------------------------------------------------------------------
# PCR and U2PL (sslray/methods/pcr.py)


@dataclass(frozen=True)
class PCRConfig(TermConfig):
    """Settings of pcr_x / pcr_u. All but ``weight`` configure the shared prototype module (see the module doc)."""

    num_protos: int = 4  # M micro-prototypes per class (PCR: 4 VOC, 3 Cityscapes)
    temperature: float = 0.1  # g_c = max_m cos / temperature
    feature: str = "rep_clf"  # rep_clf: cat(reduced c1, ASPP), PCR's | features: the fused 1x1-classifier input
    sample_grid: int = 32  # G: one random pixel per cell of a G x G grid on the decoder map
    confid_thresh: float = 0.8  # teacher confidence for pcr_u and for unlabeled prototype updates
    momentum: float = 0.99  # prototype EMA; 1.0 freezes the prototypes
    update_cond: str = "correct"  # correct: only pixels the prototype head gets right update | all
    update_unlabeled: bool = True  # confident strong-view pixels update the prototypes too
    init: str = "kmeans"  # kmeans on labeled warm-up features | random (Gaussian)
    warmup_frac: float = 0.05  # share of the iterations before the prototype terms start
    kmeans_iters: int = 20  # Lloyd iterations
    kmeans_pixels: int = 1024  # per-class FIFO bank of labeled features clustered at the end of the warm-up
    kmeans_seed: int = 0  # seeds the k-means starting points (identical on every rank)

    CHOICES: ClassVar[dict[str, tuple]] = {"feature": ("features", "rep_clf"), "update_cond": ("correct", "all"),
                                           "init": ("kmeans", "random")}
    def problems(self) -> list[tuple[str, str]]:
        bad = [(k, f"expected an integer >= 1, got {getattr(self, k)!r}")
               for k in ("num_protos", "sample_grid", "kmeans_iters", "kmeans_pixels") if getattr(self, k) < 1]
        bad += [(k, f"expected a value in [0, 1], got {getattr(self, k)!r}")
                for k in ("confid_thresh", "momentum", "warmup_frac") if not 0.0 <= getattr(self, k) <= 1.0]
        return bad


@dataclass(frozen=True)
class EntropyDropConfig(TermConfig):
    """U2PL's ``drop_percent`` [C]: at iteration t the top ``(100 - drop_percent) * (1 - t / T)`` percent of the valid
    pixels by teacher entropy are ignored, so 80 drops 20 % at the start, falling linearly to 0 % at the end.

    ``warmup_frac``: U2PL's / PCR's ``sup_only_epoch`` [C: 1 of 80 VOC epochs, 1 of 200 Cityscapes epochs]: the
    term is 0 for the first round(warmup_frac * iterations) iterations. The default 0.0125 = 1/80 is exactly one
    epoch of the VOC paper studies (80 epochs); 0 switches the gate off."""

    drop_percent: float = 80.0
    warmup_frac: float = 0.0125  # share of the iterations before u_drop starts (U2PL/PCR sup_only_epoch 1 of 80)

    def problems(self) -> list[tuple[str, str]]:
        bad = []
        if not 0.0 <= self.drop_percent <= 100.0:
            bad.append(("drop_percent", f"expected a value in [0, 100], got {self.drop_percent!r}"))
        if not 0.0 <= self.warmup_frac <= 1.0:
            bad.append(("warmup_frac", f"expected a value in [0, 1], got {self.warmup_frac!r}"))
        return bad


def check_pcr(terms: dict[str, PCRConfig]) -> list[tuple[str, str]]:
    """pcr_x and pcr_u share one prototype module: every setting but ``weight`` must agree."""
    (first, cfg), *rest = terms.items()
    return [(f"{name}.{f.name}", f"{getattr(other, f.name)!r} differs from method.terms.{first}.{f.name} = "
                                 f"{getattr(cfg, f.name)!r}: pcr_x and pcr_u share the prototypes; set both")
            for name, other in rest for f in fields(PCRConfig)
            if f.name != "weight" and getattr(other, f.name) != getattr(cfg, f.name)]


# --------------------------------------------------------------------------------------------------
# MLLC (sslray/methods/mllc.py)


def out_of_range(cfg: TermConfig, bounds: dict[str, tuple[float, float]]) -> list[tuple[str, str]]:
    """``problems()`` of a term config: each named setting against its inclusive (low, high) bounds."""
    bad = []
    for key, (lo, hi) in bounds.items():
        v = getattr(cfg, key)
        if not lo <= v <= hi:
            bad.append((key, f"expected {f'an integer >= {lo}' if hi == math.inf else f'a value in [{lo}, {hi}]'}, "
                             f"got {v!r}"))
    return bad


@dataclass(frozen=True)
class MLLCGraphConfig(TermConfig):
    """``mllc_x``: the supervision of every round on labeled images, and the settings of the graph itself."""

    rounds: int = 2
    knn: int = 20
    graph_max_nodes: int = 4096
    base_tau: float = 0.95
    dynamic_thresh: bool = True
    prop_reliable: float = 0.2
    prop_unreliable: float = 0.8
    class_graph: bool = True
    pseudo_from: str = "corrected"
    pooled_output: str = "residual"
    proj_dim: int = 0
    class_init: str = "code"

    CHOICES: ClassVar[dict[str, tuple]] = {"pseudo_from": ("corrected", "base"), "pooled_output": ("residual", "direct"),
                                           "class_init": ("code", "identity", "default")}

    def problems(self) -> list[tuple[str, str]]:
        return out_of_range(self, {"rounds": (0, 16), "knn": (1, math.inf), "graph_max_nodes": (1, math.inf),
                                   "base_tau": (0.0, 1.0), "prop_reliable": (0.0, 1.0), "prop_unreliable": (0.0, 1.0),
                                   "proj_dim": (0, math.inf)})


@dataclass(frozen=True)
class MLLCUnsupConfig(TermConfig):
    """``mllc_u``: the dynamic-weighted CE of the rounds on the strong view."""

    uniform_thresh: float = 0.968

    def problems(self) -> list[tuple[str, str]]:
        return out_of_range(self, {"uniform_thresh": (0.0, 1.0)})


@dataclass(frozen=True)
class MLLCProtoConfig(TermConfig):
    """``mllc_proto``: the inter-image prototype CE on every feature level."""

    temperature: float = 0.1
    momentum: float = 0.99
    start: float = 0.125

    def problems(self) -> list[tuple[str, str]]:
        return out_of_range(self, {"momentum": (0.0, 1.0), "start": (0.0, 1.0)})


@dataclass(frozen=True)
class MLLCPairConfig(TermConfig):
    """``mllc_pair``: the intra-image pairwise affinity BCE on every feature level."""

    max_nodes: int = 1024

    def problems(self) -> list[tuple[str, str]]:
        return out_of_range(self, {"max_nodes": (2, math.inf)})


def check_mllc(terms: dict[str, TermConfig]) -> list[tuple[str, str]]:
    if "mllc_x" in terms:
        return []
    return [("mllc_x.weight", f"{', '.join(sorted(terms))} need mllc_x with a weight > 0 (it holds the graph's "
                              "settings and supervises its rounds); method.terms.mllc_x.rounds: 0 removes the graph")]
