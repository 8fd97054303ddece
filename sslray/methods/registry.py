"""The method registry, free of torch: loss terms, families and method presets, with a line of what each is.

``TERMS`` maps a term name to its function (a ``Ref``, imported when a trial builds its method), its
typed settings (``sslray.methods.settings``) and the views it needs; ``FAMILIES`` the heads and state that terms
share; ``METHOD_PRESETS`` a method name to the plain dict ``MethodConfig`` is built from (user YAML is merged on
top) and ``METHOD_DOCS`` to one line of what it is (``sslray list methods``). ``--plugin`` modules add entries to
these dicts. ``sslray.config`` and the light commands read this module only; ``sslray.methods.build_method``
imports the method code.
"""
from __future__ import annotations

from typing import Any

from sslray.methods.settings import (EntropyDropConfig, GuidedMixConfig, IPixTermConfig, MLLCGraphConfig,
                                     MLLCPairConfig, MLLCProtoConfig, MLLCUnsupConfig, PCRConfig,
                                     SupervisedTermConfig, check_guidedmix, check_mllc, check_pcr)
from sslray.methods.spec import Family, Ref, Term, TermConfig
from sslray.methods.unimatch_v2 import PRESET as _UNIMATCH_V2


def _method_module(name: str):
    """A method module (it imports torch): explicit imports, late, when a trial builds its method."""
    from sslray.methods import fixmatch, guidedmix, ipixmatch, meanteacher, mllc, pcr, supervised, unimatch

    modules = {"fixmatch": fixmatch, "guidedmix": guidedmix, "ipixmatch": ipixmatch, "meanteacher": meanteacher,
               "mllc": mllc, "pcr": pcr, "supervised": supervised, "unimatch": unimatch}
    return modules[name]


def _code(ref: str) -> Ref:
    """``"module:attribute"`` of a method module as a Ref (nothing imported now)."""
    module, attr = ref.split(":")
    return Ref(lambda: getattr(_method_module(module), attr), f"sslray.methods.{ref}")

TERMS: dict[str, Term] = {
    "x": Term(_code("supervised:loss_x"), SupervisedTermConfig, frozenset(),
              "supervised CE (or OHEM) on the labeled batch"),
    "u_s1": Term(_code("fixmatch:loss_u_s1"), TermConfig, frozenset({"u", "s1"}),
                 "pseudo-label CE on strong view 1 with the CutMix-mixed target (UniMatch/FixMatch)"),
    "u_s2": Term(_code("fixmatch:loss_u_s2"), TermConfig, frozenset({"u", "s2"}),
                 "pseudo-label CE on strong view 2 with its own CutMix-mixed target (UniMatch)"),
    "u_fp": Term(_code("unimatch:loss_u_fp"), TermConfig, frozenset({"u", "fp"}),
                 "pseudo-label CE on the feature-perturbed weak view (UniMatch FP)"),
    "u_mse": Term(_code("meanteacher:loss_u_mse"), TermConfig, frozenset({"u", "s1"}),
                  "squared error between student and teacher class probabilities (classic Mean Teacher)"),
    # IPixMatch (sslray/methods/ipixmatch.py)
    "ipix_s1": Term(_code("ipixmatch:loss_ipix_s1"), IPixTermConfig, frozenset({"u", "s1"}),
                    "IPixMatch inter-pixel relation: student on strong view 1 vs the box-1-mixed soft teacher",
                    family="ipixmatch"),
    "ipix_s2": Term(_code("ipixmatch:loss_ipix_s2"), IPixTermConfig, frozenset({"u", "s2"}),
                    "IPixMatch inter-pixel relation: student on strong view 2 vs the box-2-mixed soft teacher",
                    family="ipixmatch"),
    "ipix_fp": Term(_code("ipixmatch:loss_ipix_fp"), IPixTermConfig, frozenset({"u", "fp"}),
                    "IPixMatch inter-pixel relation: student's feature-perturbed weak view vs the soft teacher",
                    family="ipixmatch"),
    "ipix_x": Term(_code("ipixmatch:loss_ipix_x"), IPixTermConfig, frozenset(),
                   "IPixMatch on labeled images (apply_on_labeled): student vs the one-hot labels",
                   family="ipixmatch"),
    # GuidedMix-Net (sslray/methods/guidedmix.py)
    "guidedmix": Term(_code("guidedmix:loss_guidedmix"), GuidedMixConfig, frozenset({"u", "w"}),
                      "GuidedMix-Net: labeled/unlabeled mixing with decoupling (mode code: mix head + focal; "
                      "paper: image mixup + pseudo masks)", family="guidedmix"),
    "guidedmix_mix": Term(_code("guidedmix:loss_guidedmix_mix"), TermConfig, frozenset({"u", "w"}),
                          "GuidedMix-Net paper mode: mixup CE on the mixed image (trains MITrans there)",
                          family="guidedmix"),
    # PCR and U2PL (sslray/methods/pcr.py)
    "pcr_x": Term(_code("pcr:loss_pcr_x"), PCRConfig, frozenset(),
                  "PCR prototype-head CE on sampled labeled pixels (keeps the prototypes discriminative)", family="pcr"),
    "pcr_u": Term(_code("pcr:loss_pcr_u"), PCRConfig, frozenset({"u", "s1"}),
                  "PCR consistency: prototype head on strong view 1 vs the teacher's confident pseudo-labels",
                  family="pcr"),
    "u_drop": Term(_code("pcr:loss_u_drop"), EntropyDropConfig, frozenset({"u", "s1"}),
                   "U2PL entropy-filtered pseudo-label CE on strong view 1 (drop_percent schedule)", family="u2pl"),
    # MLLC (sslray/methods/mllc.py)
    "mllc_x": Term(_code("mllc:loss_mllc_x"), MLLCGraphConfig, frozenset(),
                   "MLLC: CE of every graph round's corrected logits on the labeled batch (holds the graph settings)",
                   family="mllc"),
    "mllc_u": Term(_code("mllc:loss_mllc_u"), MLLCUnsupConfig, frozenset({"u", "s1"}),
                   "MLLC: confidence-fraction-weighted CE of every round on strong view 1 vs the pseudo-labels",
                   family="mllc"),
    "mllc_proto": Term(_code("mllc:loss_mllc_proto"), MLLCProtoConfig, frozenset({"u", "s1"}),
                       "MLLC inter-image: cosine/temperature CE against per-level EMA class prototypes",
                       family="mllc"),
    "mllc_pair": Term(_code("mllc:loss_mllc_pair"), MLLCPairConfig, frozenset({"u", "s1"}),
                      "MLLC intra-image: BCE of pairwise feature cosines against label agreement (sampled nodes)",
                      family="mllc"),
}

FAMILIES: dict[str, Family] = {
    "ipixmatch": Family(_code("ipixmatch:build"),
                        "no heads or state; logs train/ipixmatch/nodes and train/ipixmatch/valid_frac"),
    "guidedmix": Family(_code("guidedmix:GuidedMixModule"),
                        "GuidedMix-Net mixing head and optional MITrans (non-local) module", check_guidedmix),
    "pcr": Family(_code("pcr:build_pcr"), "PCR class prototypes: grid sampler, momentum update, k-means initialisation",
                  check_pcr),
    "u2pl": Family(_code("pcr:build_u2pl"), "U2PL entropy-drop schedule and supervised-only warm-up"),
    "mllc": Family(_code("mllc:build"), "MLLC graph rounds (SLG + CLG), class counters for eta(t, c), per-level "
                                      "prototypes", check_mllc),
}

_IPIX = {"relation": "per_class", "distance": "kl", "temperature": 1.0}  # methods.md §8.1 placeholders [I]

METHOD_PRESETS: dict[str, dict[str, Any]] = {
    # Supervised-only: trains on the labeled stream for the same number of iterations as the others.
    "supervised": {"teacher": {"kind": "self"}, "global_div": 1.0, "terms": {"x": {"weight": 1.0}}},
    # UniMatch's fixmatch.py: (L_x + L_u) / 2, self-detached teacher, CutMix on one strong view.
    "fixmatch": {"teacher": {"kind": "self"}, "conf_thresh": 0.95, "global_div": 2.0,
                 "terms": {"x": {"weight": 1.0}, "u_s1": {"weight": 1.0}}},
    # UniMatch's unimatch.py: (L_x + 0.25 L_s1 + 0.25 L_s2 + 0.5 L_fp) / 2.
    "unimatch": {"teacher": {"kind": "self"}, "conf_thresh": 0.95, "global_div": 2.0,
                 "terms": {"x": {"weight": 1.0}, "u_s1": {"weight": 0.25}, "u_s2": {"weight": 0.25},
                           "u_fp": {"weight": 0.5}}},
    # Mean Teacher as the EMA-teacher methods (U2PL, PCR, CutMix-Seg) use it: EMA 0.99 with warm-up
    # min(1 - 1/(k+1), 0.99), confident pseudo-labels on a CutMix strong view. The classic
    # consistency (TorchSemiSeg MT: 100 * MSE of probabilities) is the ``u_mse`` term, off by default.
    # BN statistics averaged with the parameters (bn_stats: ema) as CutMix-Seg and UniMatch V2, whose
    # (L_x + L_u) / 2 with tau 0.95 this loss is; U2PL's own train-mode teacher pass (forward, the default that
    # pcr_base gets) is the alternative -- sources disagree, so studies/ablation_teacher.yaml compares them.
    "meanteacher": {"teacher": {"kind": "ema", "ema_alpha": 0.99, "ema_warmup": True, "bn_stats": "ema"},
                    "conf_thresh": 0.95, "global_div": 2.0,
                    "terms": {"x": {"weight": 1.0}, "u_s1": {"weight": 1.0}}},
    # UniMatch + the relation loss on both strong views; FP and labeled views listed switched off.
    # weight 1.0 = lambda_ip 0.5 (§8.1) times UniMatch's global_div 2 (see sslray/methods/ipixmatch.py).
    "ipixmatch": {"base": "unimatch",
                  "terms": {"ipix_s1": {"weight": 1.0, **_IPIX}, "ipix_s2": {"weight": 1.0, **_IPIX},
                            "ipix_fp": {"weight": 0.0, **_IPIX}, "ipix_x": {"weight": 0.0, **_IPIX}}},
    # the official code: L = L_x + 10 * focal(decoupled mix head, detached main prediction)
    "guidedmix": {"base": "supervised", "terms": {"guidedmix": {"weight": 10.0}}},
    # the paper reconstruction: L = L_x + CE(f(u), pseudo mask from the decoupled mixed prediction)
    "guidedmix_paper": {"base": "supervised", "terms": {"guidedmix": {"weight": 1.0, "mode": "paper"}}},
    # PCR's (= U2PL's) training without prototypes and without U2PL's contrastive loss: EMA teacher 0.99,
    # L_x + L_u_drop. u_s1 is listed off so that "plain pseudo-label CE instead of the entropy drop" is one override.
    # L_x is OHEM on both datasets as PCR's configs: threshold 0.7, min_kept 100,000 per GPU of 2 images, i.e.
    # 400,000 for one batch of 8 (the paper studies' batch; scale it with data.batch_size_x per rank).
    "pcr_base": {"teacher": {"kind": "ema", "ema_alpha": 0.99, "ema_warmup": True}, "conf_thresh": 0.95,
                 "global_div": 1.0,
                 "terms": {"x": {"weight": 1.0, "criterion": "ohem", "ohem_thresh": 0.7, "ohem_min_kept": 400000},
                           "u_s1": {"weight": 0.0}, "u_drop": {"weight": 1.0}}},
    # Standalone: pcr_base + the prototype terms (lambda_proto = 1 [C]); after another preset: only the latter.
    "pcr": {"base": "pcr_base", "terms": {"pcr_x": {"weight": 1.0}, "pcr_u": {"weight": 1.0}}},
    # UniMatch V2 (sslray/methods/unimatch_v2.py): EMA 0.996, paired channel dropout, flip CutMix, (L_x + mean L_s) / 2
    "unimatch_v2": _UNIMATCH_V2,
    # FixMatch + MLLC with the official code's weights (methods.md §8.1); "unimatch+mllc", "meanteacher+mllc" add
    # the same terms to those bases.
    "mllc": {"base": "fixmatch",
             "terms": {"mllc_x": {"weight": 1.0}, "mllc_u": {"weight": 1.0}, "mllc_proto": {"weight": 0.1},
                       "mllc_pair": {"weight": 0.0}}},
}

# One line per preset for ``sslray list methods`` (a test checks that every preset has one).
METHOD_DOCS: dict[str, str] = {
    "supervised": "labeled images only (L_x), the baseline every method is compared against",
    "fixmatch": "FixMatch as in UniMatch's code: confident pseudo-labels on one CutMix strong view, (L_x + L_u) / 2",
    "unimatch": "UniMatch V1: two CutMix strong views and a feature-perturbed view, (L_x + .25 L_s1 + .25 L_s2 + .5 "
                "L_fp) / 2",
    "meanteacher": "Mean Teacher: EMA teacher (0.99, warm-up) pseudo-labels one CutMix strong view, (L_x + L_u) / 2",
    "ipixmatch": "IPixMatch: UniMatch + inter-pixel relation consistency on both strong views",
    "guidedmix": "GuidedMix-Net, the official code: L_x + 10 x focal loss of the decoupled mix head",
    "guidedmix_paper": "GuidedMix-Net, the paper's reconstruction: L_x + CE against pseudo masks from the decoupled "
                       "mixed prediction",
    "pcr_base": "U2PL/PCR's training without prototypes: EMA teacher, OHEM L_x + entropy-filtered L_u (u_drop)",
    "pcr": "PCR: pcr_base + prototype-head terms (pcr_x, pcr_u) with momentum class prototypes",
    "unimatch_v2": "UniMatch V2: EMA teacher (0.996), two CutMix strong views with complementary channel dropout, "
                   "(L_x + (L_s1 + L_s2) / 2) / 2",
    "mllc": "MLLC: FixMatch + graph label correction rounds (mllc_x, mllc_u) and level prototypes (mllc_proto)",
}


def list_methods() -> list[str]:
    return list(METHOD_PRESETS)


def list_terms() -> list[str]:
    return list(TERMS)
