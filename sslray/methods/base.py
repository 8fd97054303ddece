"""The types a method is made of: :class:`TermConfig` (a term's typed settings), :class:`Term` (a loss term),
:class:`Family` (terms sharing heads or state) and :class:`MethodModule` (those heads and state).

This module and the method files never import ``sslray.config``: config imports the registry
(``sslray.methods.TERMS``/``FAMILIES``/``METHOD_PRESETS``) to build ``MethodConfig``, one way only.

What a method family may add to the shared step: extra heads and state, as one ``nn.Module``.

A family (``pcr``, ``mllc``, ``guidedmix``) groups the loss terms that share heads or state. Its module is
built once per trial from the settings of the family's active terms, lives beside the student (its
parameters train with the head learning rate, its buffers are checkpointed with ``state_dict``), and is
never used at inference: evaluation runs the plain segmentation model.

Hooks the trainer calls, in this order, every iteration::

    logits = module.refine_teacher(model_out)   # optional: replace the teacher's logits (MLLC's corrected ones)
    loss   = term.fn(out, settings, ctx, module)  # for each active term of the family
    ...backward, optimizer step, EMA teacher update...
    module.after_step(out)                      # no-grad state update: prototypes, class counters

Under DDP the module is not wrapped: the trainer averages its gradients across ranks itself, and
``after_step`` must keep its state identical on every rank by all-reducing the statistics it updates from
(``all_reduce_sum``), never by updating from the local batch alone.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn as nn

from sslray.methods.spec import Family, Term, TermConfig, raise_problems  # noqa: F401 - re-exported


@dataclass(frozen=True)
class TermContext:
    """What a term may read besides the step outputs and its own settings."""

    conf_thresh: float
    ignore_index: int
    num_classes: int


@dataclass(frozen=True)
class ModuleContext:
    """What a family's module is built from besides its terms' settings."""

    num_classes: int
    ignore_index: int = 255
    conf_thresh: float = 0.95
    iterations: int = 1000  # total training iterations, for warm-ups and schedules
    feature_dims: dict[str, int] = field(default_factory=dict)  # SegModel.feature_dims: features, aspp, low, ...


class MethodModule(nn.Module):
    """Base class of a family's heads and state; every hook defaults to doing nothing."""

    def refine_teacher(self, model_out: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """Teacher logits [B, K, H, W] to use instead of ``model_out["logits"]`` (called under no_grad)."""
        return None

    @torch.no_grad()
    def after_step(self, out) -> None:
        """Update non-trainable state from this step's outputs (after the optimizer step)."""

    def diagnostics(self) -> dict[str, torch.Tensor]:
        """Scalars logged as ``train/<family>/<name>`` (running means, like the losses)."""
        return {}


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over ranks in place (a no-op in a single process); returns ``t``."""
    if world_size() > 1:
        dist.all_reduce(t)
    return t


def all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Concatenate a [N_r, ...] tensor from every rank along dim 0 (ranks may hold different N_r)."""
    world = world_size()
    if world == 1:
        return t
    n = torch.tensor([t.shape[0]], device=t.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    cap = int(max(int(s) for s in sizes))
    padded = torch.zeros((cap, *t.shape[1:]), dtype=t.dtype, device=t.device)
    padded[: t.shape[0]] = t
    parts = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([p[: int(s)] for p, s in zip(parts, sizes)])
