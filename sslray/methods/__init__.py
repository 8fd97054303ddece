"""Methods are data: a teacher kind plus named, weighted loss terms.

``TERMS`` maps a term name to its function, its typed settings and the views it needs; ``METHOD_PRESETS``
maps a method name to a plain dict that ``MethodConfig`` is built from (user YAML is merged on top).
Presets compose with ``+``: ``method.name: unimatch+meanteacher`` merges the dicts left to right. An
ablation switches a term off with ``method.terms.<term>.weight: 0`` (a zero-weight term is not computed,
and the forward passes that only it needed are skipped).

The total loss is ``sum(weight_t * L_t) / global_div``; UniMatch's
``(L_x + 0.25 L_s1 + 0.25 L_s2 + 0.5 L_fp) / 2`` is weights ``x=1, u_s1=0.25, u_s2=0.25, u_fp=0.5`` with
``global_div=2``.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from sslray.methods import fixmatch, meanteacher, supervised, unimatch
from sslray.methods import guidedmix, ipixmatch, mllc, pcr, unimatch_v2
from sslray.methods.base import Family, MethodModule, ModuleContext, Term, TermConfig, TermContext, world_size


TERMS: dict[str, Term] = {
    "x": Term(supervised.loss_x, supervised.SupervisedTermConfig, frozenset(),
              "supervised CE (or OHEM) on the labeled batch"),
    "u_s1": Term(fixmatch.loss_u_s1, TermConfig, frozenset({"u", "s1"}),
                 "pseudo-label CE on strong view 1 with the CutMix-mixed target (UniMatch/FixMatch)"),
    "u_s2": Term(fixmatch.loss_u_s2, TermConfig, frozenset({"u", "s2"}),
                 "pseudo-label CE on strong view 2 with its own CutMix-mixed target (UniMatch)"),
    "u_fp": Term(unimatch.loss_u_fp, TermConfig, frozenset({"u", "fp"}),
                 "pseudo-label CE on the feature-perturbed weak view (UniMatch FP)"),
    "u_mse": Term(meanteacher.loss_u_mse, TermConfig, frozenset({"u", "s1"}),
                  "squared error between student and teacher class probabilities (classic Mean Teacher)"),
}

FAMILIES: dict[str, Family] = {}

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
}


# UniMatch V2 and the founding methods register their own terms, families and presets (sslray/methods/<name>.py).
for _m in (unimatch_v2, ipixmatch, guidedmix, pcr, mllc):
    TERMS.update(_m.TERMS)
    FAMILIES.update(_m.FAMILIES)
    METHOD_PRESETS.update(_m.PRESETS)


def list_methods() -> list[str]:
    return list(METHOD_PRESETS)


def list_terms() -> list[str]:
    return list(TERMS)


class NonFiniteLossError(FloatingPointError):
    """A loss became NaN or inf; names the iteration and the first offending term."""

    def __init__(self, iteration: int, term: str, value: float):
        self.iteration, self.term, self.value = iteration, term, value
        super().__init__(f"non-finite loss at iteration {iteration}: term {term!r} = {value}")


class Method:
    """A configured method: the active (non-zero weight) terms, their families' modules, how they combine.

    ``losses(out)`` returns ``{"loss": total, "loss/<term>": unweighted value, ...}`` where
    ``total = sum(weight * value) / global_div``. ``modules`` (an ``nn.ModuleDict``, family -> module) holds
    the extra heads and state; the trainer optimises, checkpoints and DDP-syncs it.
    """

    def __init__(self, cfg, num_classes: int, ignore_index: int = 255, feature_dims: dict[str, int] | None = None,
                 iterations: int = 1000):
        self.cfg = cfg
        self.active = {name: t for name, t in cfg.terms.items() if t.weight > 0}
        if not self.active:
            raise ValueError(f"method {cfg.name!r} has no loss term with a non-zero weight")
        self.ctx = TermContext(cfg.conf_thresh, ignore_index, num_classes)
        self.needs = frozenset().union(*(TERMS[n].needs for n in self.active))
        mctx = ModuleContext(num_classes, ignore_index, cfg.conf_thresh, iterations, dict(feature_dims or {}))
        by_family: dict[str, dict[str, TermConfig]] = {}
        for name, tcfg in self.active.items():
            if TERMS[name].family is not None:
                by_family.setdefault(TERMS[name].family, {})[name] = tcfg
        self.modules = nn.ModuleDict({fam: FAMILIES[fam].build(terms, mctx) for fam, terms in by_family.items()})

    def losses(self, out, iteration: int | None = None) -> dict[str, Any]:
        values = {}
        for name, tcfg in self.active.items():
            term = TERMS[name]
            if term.family is None:
                values[name] = term.fn(out, tcfg, self.ctx)
            else:
                values[name] = term.fn(out, tcfg, self.ctx, self.modules[term.family])
        total = sum(self.active[n].weight * v for n, v in values.items()) / self.cfg.global_div
        return {"loss": total, **{f"loss/{n}": v for n, v in values.items()}}

    def refine_teacher(self, model_out: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """The first family module that overrides the teacher's logits, else None."""
        for module in self.modules.values():
            logits = module.refine_teacher(model_out)
            if logits is not None:
                return logits
        return None

    @property
    def refines_teacher(self) -> bool:
        return any(type(m).refine_teacher is not MethodModule.refine_teacher for m in self.modules.values())

    def after_step(self, out) -> None:
        for module in self.modules.values():
            module.after_step(out)

    def diagnostics(self) -> dict[str, torch.Tensor]:
        return {f"train/{fam}/{k}": v for fam, m in self.modules.items() for k, v in m.diagnostics().items()}

    def sync_grads(self) -> None:
        """Average the modules' gradients over DDP ranks (the modules are not inside the DDP wrapper).

        Every rank runs the same terms at the same iteration, so the set of parameters with a gradient is
        the same on every rank; they are flattened into one all-reduce.
        """
        world = world_size()
        grads = [p.grad for p in self.modules.parameters() if p.grad is not None]
        if world == 1 or not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        torch.distributed.all_reduce(flat)
        flat /= world
        offset = 0
        for g in grads:
            g.copy_(flat[offset: offset + g.numel()].view_as(g))
            offset += g.numel()

    @staticmethod
    def check_finite(losses: dict[str, Any], iteration: int) -> None:
        """Raise NonFiniteLossError naming the first non-finite term (the total last)."""
        import math

        items = [(k, v) for k, v in losses.items() if k != "loss"] + [("loss", losses["loss"])]
        for key, v in items:
            f = float(v.detach()) if hasattr(v, "detach") else float(v)
            if not math.isfinite(f):
                raise NonFiniteLossError(iteration, key.removeprefix("loss/") if key != "loss" else "total", f)


def build_method(cfg, num_classes: int, ignore_index: int = 255, feature_dims: dict[str, int] | None = None,
                 iterations: int = 1000) -> Method:
    return Method(cfg, num_classes, ignore_index, feature_dims, iterations)
