"""A configured method (:class:`Method`, ``build_method``): the active terms, their families' modules, the loss.

The registry it reads (``TERMS``, ``FAMILIES``) is ``sslray.methods.registry``; this module imports torch and the
terms' code.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from sslray.methods.base import MethodModule, ModuleContext, TermConfig, TermContext, world_size
from sslray.methods.registry import FAMILIES, TERMS
from sslray.methods.spec import NonFiniteLossError


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
