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

from dataclasses import dataclass
from typing import Any, Callable

from sslray.config import TermConfig
from sslray.methods import fixmatch, meanteacher, supervised, unimatch


@dataclass(frozen=True)
class Term:
    """A loss term: ``fn(outputs, settings, ctx) -> scalar tensor``.

    ``needs`` names what the shared step must compute for it: ``u`` (unlabeled batch, teacher
    pseudo-labels), ``s1``/``s2`` (student on a strong view), ``fp`` (feature-perturbed weak view).
    """

    fn: Callable[..., Any]
    config_cls: type[TermConfig]
    needs: frozenset[str]
    doc: str


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
    "meanteacher": {"teacher": {"kind": "ema", "ema_alpha": 0.99, "ema_warmup": True},
                    "conf_thresh": 0.95, "global_div": 2.0,
                    "terms": {"x": {"weight": 1.0}, "u_s1": {"weight": 1.0}}},
}


def list_methods() -> list[str]:
    return list(METHOD_PRESETS)


def list_terms() -> list[str]:
    return list(TERMS)


@dataclass(frozen=True)
class TermContext:
    """What a term may read besides the step outputs and its own settings."""

    conf_thresh: float
    ignore_index: int
    num_classes: int


class NonFiniteLossError(FloatingPointError):
    """A loss became NaN or inf; names the iteration and the first offending term."""

    def __init__(self, iteration: int, term: str, value: float):
        self.iteration, self.term, self.value = iteration, term, value
        super().__init__(f"non-finite loss at iteration {iteration}: term {term!r} = {value}")


class Method:
    """A configured method: the active (non-zero weight) terms and how they combine.

    ``losses(out)`` returns ``{"loss": total, "loss/<term>": unweighted value, ...}`` where
    ``total = sum(weight * value) / global_div``.
    """

    def __init__(self, cfg, num_classes: int, ignore_index: int = 255):
        self.cfg = cfg
        self.active = {name: t for name, t in cfg.terms.items() if t.weight > 0}
        if not self.active:
            raise ValueError(f"method {cfg.name!r} has no loss term with a non-zero weight")
        self.ctx = TermContext(cfg.conf_thresh, ignore_index, num_classes)
        self.needs = frozenset().union(*(TERMS[n].needs for n in self.active))

    def losses(self, out, iteration: int | None = None) -> dict[str, Any]:
        values = {name: TERMS[name].fn(out, tcfg, self.ctx) for name, tcfg in self.active.items()}
        total = sum(self.active[n].weight * v for n, v in values.items()) / self.cfg.global_div
        result = {"loss": total, **{f"loss/{n}": v for n, v in values.items()}}
        return result

    @staticmethod
    def check_finite(losses: dict[str, Any], iteration: int) -> None:
        """Raise NonFiniteLossError naming the first non-finite term (the total last)."""
        import math

        items = [(k, v) for k, v in losses.items() if k != "loss"] + [("loss", losses["loss"])]
        for key, v in items:
            f = float(v.detach()) if hasattr(v, "detach") else float(v)
            if not math.isfinite(f):
                raise NonFiniteLossError(iteration, key.removeprefix("loss/") if key != "loss" else "total", f)


def build_method(cfg, num_classes: int, ignore_index: int = 255) -> Method:
    return Method(cfg, num_classes, ignore_index)
