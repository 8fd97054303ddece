"""The one shared teacher-student step of every method.

Glossary (the same words in YAML keys, dataclass fields and metric columns):

    x        labeled batch (``img_x`` [Bx, 3, H, W], ``mask_x`` [Bx, H, W], 255 = ignore)
    u        unlabeled batch
    w        weak view of u (rescale, crop, flip)          -> ``img_u_w``
    s1, s2   strong views of u (colour, grayscale, blur)    -> ``img_u_s1``, ``img_u_s2``
    mix      the CutMix partner batch (a second unlabeled batch, or u rolled by one)
    fp       feature perturbation: Dropout2d on the encoder features c1 and c4 (UniMatch)
    conf     teacher confidence, max softmax               -> ``conf_u_w`` [Bu, H, W]
    mask     (pseudo-)labels                               -> ``mask_u_w`` [Bu, H, W]
    ignore   255 where a pixel is padding                  -> ``ignore_mask_u`` [Bu, H, W]
    box      CutMix box, 1 inside                          -> ``cutmix_box1`` [Bu, H, W]

One step (UniMatch's order, methods.md §3.2/§3.5):

1. teacher on ``img_u_w_mix`` (eval mode, no grad) -> pseudo-labels of the mix partner;
2. CutMix: ``img_u_s1[box1 == 1] = img_u_s1_mix[box1 == 1]`` (and s2 with box2);
3. student on ``cat(img_x, img_u_w)`` (with the FP copy when a term needs it) -> ``pred_x``, ``pred_u_w``;
   the self teacher's pseudo-labels are ``pred_u_w.detach()``; an EMA teacher runs on ``img_u_w`` instead;
4. student on ``cat(img_u_s1, img_u_s2)``;
5. targets for each strong view are mixed with that view's box: ``mask_u_w_cutmixed1`` etc.;
6. an EMA teacher with ``bn_stats: forward`` (U2PL/PCR) runs once more, in train mode and without gradient, on
   ``cat(img_x, img_u_s1)`` (the CutMixed view; s2 or the weak view when s1 is not computed), which is what keeps
   its BN running statistics current; its dict is ``model_out["t_train"]`` (U2PL's ``out_t``). The EMA teacher
   itself always predicts in eval mode (:class:`EMATeacher`).

Which of these run is derived from the method's terms (``Method.needs``): supervised-only runs step 3 on
``img_x`` alone; FixMatch skips s2 and fp; a zero-weight term costs nothing.
"""
from __future__ import annotations

import copy
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn as nn

from sslray.config import MethodConfig, TeacherConfig


@dataclass
class MixedTarget:
    """The teacher's target for one strong view, assembled with that view's CutMix box."""

    mask: torch.Tensor  # [Bu, H, W] long
    conf: torch.Tensor  # [Bu, H, W]
    ignore: torch.Tensor  # [Bu, H, W] 255 = padding
    prob: torch.Tensor | None  # [Bu, K, H, W] soft target, computed only when asked


@dataclass
class StepOutputs:
    """Named tensors of one step; loss terms read what they need. Unused entries stay None."""

    pred_x: torch.Tensor  # [Bx, K, H, W] student logits on the labeled batch
    mask_x: torch.Tensor  # [Bx, H, W]
    pred_u_w: torch.Tensor | None = None  # [Bu, K, H, W] student logits on the weak view (with grad)
    pred_u_w_fp: torch.Tensor | None = None  # [Bu, K, H, W] student logits on the FP copy
    pred_u_s1: torch.Tensor | None = None  # [Bu, K, H, W] student logits on the (CutMixed) strong view 1
    pred_u_s2: torch.Tensor | None = None
    logits_u_w_teacher: torch.Tensor | None = None  # [Bu, K, H, W] teacher logits on the weak view, detached
    logits_u_w_mix_teacher: torch.Tensor | None = None  # [Bu, K, H, W] teacher logits on the mix partner
    mask_u_w: torch.Tensor | None = None  # [Bu, H, W] pseudo-labels (argmax of the teacher)
    conf_u_w: torch.Tensor | None = None  # [Bu, H, W]
    ignore_mask_u: torch.Tensor | None = None  # [Bu, H, W]
    mask_u_w_mix: torch.Tensor | None = None
    conf_u_w_mix: torch.Tensor | None = None
    ignore_mask_mix: torch.Tensor | None = None
    cutmix_box1: torch.Tensor | None = None  # [Bu, H, W]
    cutmix_box2: torch.Tensor | None = None
    # raw model dicts, for method heads: student "x_u_w" (cat(x, u_w)) or "x", "u_s" (s1, s2 as computed);
    # teacher "t_u_w" and "t_mix" (no grad, eval mode), and with ``bn_stats: forward`` "t_train" (no grad, train
    # mode, on cat(x, s1) -- x alone in a supervised step). Use ``part()`` to slice one view out of them.
    model_out: dict[str, Any] = field(default_factory=dict)
    iteration: int = 0
    # the step's inputs and a handle that runs the student on an extra batch (train mode, with gradient, the
    # step's autocast): for terms that build their own inputs, e.g. GuidedMix's image-level mixup (semi steps)
    img_x: torch.Tensor | None = None  # [Bx, 3, H, W]
    img_u_w: torch.Tensor | None = None  # [Bu, 3, H, W]
    student_forward: Callable[[torch.Tensor], dict] | None = field(default=None, repr=False)
    _parts: dict = field(default_factory=dict, repr=False)  # view -> (model_out key, start, stop)
    _mixed: dict = field(default_factory=dict, repr=False)

    def part(self, view: str) -> dict[str, torch.Tensor] | None:
        """The student's (or teacher's, for ``t_u_w``/``t_mix``) model dict for one view, sliced along the batch.

        Views: ``x``, ``u_w`` (student, with grad), ``s1``, ``s2`` (student on the CutMixed strong views),
        ``t_u_w``, ``t_mix`` (teacher, detached), ``t_train`` (EMA teacher's train-mode pass on cat(x, s1), whole).
        None when this step did not compute that view.
        """
        if view in ("t_u_w", "t_mix", "t_train"):
            return self.model_out.get(view)
        if view not in self._parts:
            return None
        key, start, stop = self._parts[view]
        src = self.model_out[key]
        if start == 0 and stop is None:
            return src
        return {k: v[start:stop] if torch.is_tensor(v) and v.dim() > 0 else v for k, v in src.items()}

    def mixed_target(self, view: int, with_prob: bool = False) -> MixedTarget:
        """Teacher target for strong view ``view`` (1 or 2): plain where the box is 0, the mix partner's inside."""
        key = (view, with_prob)
        if key not in self._mixed:
            box = (self.cutmix_box1 if view == 1 else self.cutmix_box2) == 1
            prob = None
            if with_prob:
                p = torch.softmax(self.logits_u_w_teacher.float(), 1)
                p_mix = torch.softmax(self.logits_u_w_mix_teacher.float(), 1)
                prob = torch.where(box.unsqueeze(1), p_mix, p)
            self._mixed[key] = MixedTarget(
                mask=torch.where(box, self.mask_u_w_mix, self.mask_u_w),
                conf=torch.where(box, self.conf_u_w_mix, self.conf_u_w),
                ignore=torch.where(box, self.ignore_mask_mix, self.ignore_mask_u),
                prob=prob,
            )
        return self._mixed[key]


def confidence(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [B, K, H, W] -> (conf [B, H, W], pseudo-label [B, H, W])."""
    conf, mask = torch.softmax(logits.float(), 1).max(1)
    return conf, mask


def paste(img_s: torch.Tensor, img_mix: torch.Tensor, box: torch.Tensor) -> torch.Tensor:
    """CutMix of inputs: img [B, 3, H, W]; box [B, H, W] (1 = take the mix partner's pixel)."""
    return torch.where(box.unsqueeze(1) == 1, img_mix, img_s)


class EMATeacher:
    """theta_t <- a_k theta_t + (1 - a_k) theta_s after every optimiser step.

    a_k = min(1 - 1/(k + 1), alpha) with warm-up (k = number of updates so far, so the first update copies
    the student), else alpha.

    The teacher model is kept in **eval mode**: its pseudo-labels (``teacher(img)``) and its evaluation
    (``train.eval_model: teacher``) use BN running statistics, so an image's pseudo-label does not depend on the
    other images of the batch (U2PL, PCR, UniMatch V2). Where the running statistics come from is
    ``bn_stats`` (methods.md §3.3):

    - ``forward`` (U2PL/PCR): only the parameters are averaged; :meth:`forward_train` runs the teacher once per
      step in train mode, without gradient, which updates its running statistics with BN's own momentum
      (U2PL: ``model_teacher.train()`` then a no-grad forward on ``cat(labeled, mixed unlabeled)``, after the
      eval-mode pseudo-labels). Integer buffers (``num_batches_tracked``) are the teacher's own.
    - ``ema`` (CutMix-Seg, UniMatch V2): float buffers are averaged with the same a_k as the parameters; integer
      buffers are copied from the student; no extra forward.

    Either way the statistics track training: with parameters-only EMA and no own forward they would stay at
    their deep-copy values forever. Under DDP on CUDA the model is converted to SyncBN before the copy, so the
    teacher's own pass syncs its statistics over ranks (U2PL's SyncBN teacher); on CPU each rank keeps its own,
    as the student does (``broadcast_buffers=False``).
    """

    def __init__(self, student: nn.Module, cfg: TeacherConfig):
        self.cfg = cfg
        self.model = copy.deepcopy(student).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.updates = 0

    @property
    def own_bn_forward(self) -> bool:
        """Whether the step must call :meth:`forward_train` (``bn_stats: forward``)."""
        return self.cfg.bn_stats == "forward"

    @torch.no_grad()
    def __call__(self, img: torch.Tensor) -> dict[str, torch.Tensor]:
        """The teacher's model dict in eval mode (pseudo-labels)."""
        self.model.eval()
        return self.model(img)

    @torch.no_grad()
    def forward_train(self, img: torch.Tensor) -> dict[str, torch.Tensor]:
        """One no-grad forward in train mode (updates the BN running statistics), then back to eval mode."""
        self.model.train()
        try:
            return self.model(img)
        finally:
            self.model.eval()

    def alpha(self) -> float:
        if self.cfg.ema_warmup:
            return min(1.0 - 1.0 / (self.updates + 1), self.cfg.ema_alpha)
        return self.cfg.ema_alpha

    @torch.no_grad()
    def update(self, student: nn.Module) -> None:
        a = self.alpha()
        for t, s in zip(self.model.parameters(), student.parameters()):
            t.mul_(a).add_(s.detach(), alpha=1.0 - a)
        if self.cfg.bn_stats == "ema":
            for t, s in zip(self.model.buffers(), student.buffers()):
                if t.dtype.is_floating_point:
                    t.mul_(a).add_(s.detach(), alpha=1.0 - a)
                else:
                    t.copy_(s)
        self.updates += 1

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.updates = int(state["updates"])


class TeacherStudent:
    """Runs the shared step for a method (``needs`` from its terms) on a student and its teacher.

    ``student`` may be wrapped in DistributedDataParallel; ``student_module`` is the bare model.
    """

    def __init__(self, student: nn.Module, method_cfg: MethodConfig, needs: frozenset[str],
                 student_module: nn.Module | None = None, amp_dtype: torch.dtype | None = None,
                 refine_teacher: Callable[[dict], torch.Tensor | None] | None = None):
        self.student = student
        self.student_module = student_module or student
        self.cfg = method_cfg
        self.needs = needs
        self.amp_dtype = amp_dtype
        self.refine_teacher = refine_teacher  # a method's override of the teacher's logits (MLLC), or None
        self.teacher = EMATeacher(self.student_module, method_cfg.teacher) if method_cfg.teacher.kind == "ema" else None

    def _autocast(self, device: torch.device):
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(device_type=device.type, dtype=self.amp_dtype)

    @torch.no_grad()
    def _teacher(self, img: torch.Tensor) -> dict[str, torch.Tensor]:
        """Teacher model dict with no gradient: the EMA model, or the student itself in eval mode."""
        if self.teacher is not None:
            return self.teacher(img)
        was_training = self.student.training
        self.student.eval()
        try:
            return self.student(img)
        finally:
            self.student.train(was_training)

    def forward_student(self, img: torch.Tensor) -> dict[str, torch.Tensor]:
        """The student's model dict on an extra batch [B, 3, H, W], as the step runs it (train mode, with
        gradient, the step's autocast); the caller decides whether to run it under no_grad."""
        with self._autocast(img.device):
            return self.student(img)

    @torch.no_grad()
    def _teacher_logits_of(self, model_out: dict[str, torch.Tensor]) -> torch.Tensor:
        """The teacher's logits from its model dict: the method's refined ones when it has them."""
        logits = self.refine_teacher(model_out) if self.refine_teacher is not None else None
        return (model_out["logits"] if logits is None else logits).detach()

    def step(self, batch_x: dict, batch_u: dict | None = None, batch_mix: dict | None = None,
             iteration: int = 0) -> StepOutputs:
        img_x, mask_x = batch_x["img_x"], batch_x["mask_x"]
        device = img_x.device
        if "u" not in self.needs:
            with self._autocast(device):
                out_x = self.student(img_x)
                model_out = {"x": out_x}
                if self.teacher is not None and self.teacher.own_bn_forward:  # U2PL's sup-only epochs do the same
                    model_out["t_train"] = self.teacher.forward_train(img_x)
            return StepOutputs(pred_x=out_x["logits"], mask_x=mask_x, model_out=model_out, iteration=iteration,
                               _parts={"x": ("x", 0, None)})
        return self._semi_step(img_x, mask_x, batch_u, batch_mix, iteration)

    def _semi_step(self, img_x, mask_x, batch_u, batch_mix, iteration) -> StepOutputs:
        device = img_x.device
        img_u_w, ignore_mask_u = batch_u["img_u_w"], batch_u["ignore_mask_u"]
        img_u_s1, img_u_s2 = batch_u["img_u_s1"], batch_u["img_u_s2"]
        box1, box2 = batch_u["cutmix_box1"], batch_u["cutmix_box2"]
        need_s1, need_s2, need_fp = "s1" in self.needs, "s2" in self.needs, "fp" in self.needs
        bx, bu = img_x.shape[0], img_u_w.shape[0]
        out = StepOutputs(pred_x=None, mask_x=mask_x, ignore_mask_u=ignore_mask_u, cutmix_box1=box1,
                          cutmix_box2=box2, iteration=iteration, img_x=img_x, img_u_w=img_u_w,
                          student_forward=self.forward_student)

        with self._autocast(device):
            mixing = (need_s1 or need_s2) and self.cfg.mix_source == "batch"
            if mixing:
                out.model_out["t_mix"] = self._teacher(batch_mix["img_u_w"])
                out.logits_u_w_mix_teacher = self._teacher_logits_of(out.model_out["t_mix"])
                img_u_s1 = paste(img_u_s1, batch_mix["img_u_s1"], box1)
                img_u_s2 = paste(img_u_s2, batch_mix["img_u_s2"], box2)
            elif need_s1 or need_s2:  # the same batch rolled by one (UniMatch #34) or reversed (V2): no extra pass
                img_u_s1 = paste(img_u_s1, self._partner(img_u_s1), box1)
                img_u_s2 = paste(img_u_s2, self._partner(img_u_s2), box2)

            # The student sees the weak view when it is its own teacher or when FP or a term needs it.
            if self.teacher is None or need_fp or "w" in self.needs:
                out_xw = self.student(torch.cat((img_x, img_u_w)), need_fp=need_fp)
                out.pred_x, out.pred_u_w = out_xw["logits"].split([bx, bu])
                if need_fp:
                    out.pred_u_w_fp = out_xw["logits_fp"][bx:]
                out.model_out["x_u_w"] = out_xw
                out._parts.update(x=("x_u_w", 0, bx), u_w=("x_u_w", bx, None))
            else:
                out_xw = self.student(img_x)
                out.pred_x = out_xw["logits"]
                out.model_out["x"] = out_xw
                out._parts["x"] = ("x", 0, None)
            if self.teacher is None:
                out.model_out["t_u_w"] = {k: v.detach() for k, v in out.part("u_w").items()}
            else:
                out.model_out["t_u_w"] = self._teacher(img_u_w)
            out.logits_u_w_teacher = self._teacher_logits_of(out.model_out["t_u_w"])

            if need_s1 and need_s2:  # UniMatch V2: paired channel dropout on the encoder features of the two views
                drop = {} if self.cfg.strong_dropout == "none" else {"strong_dropout": self.cfg.strong_dropout}
                out_s = self.student(torch.cat((img_u_s1, img_u_s2)), **drop)
                out.pred_u_s1, out.pred_u_s2 = out_s["logits"].chunk(2)
                out.model_out["u_s"] = out_s
                out._parts.update(s1=("u_s", 0, bu), s2=("u_s", bu, None))
            elif need_s1 or need_s2:
                out_s = self.student(img_u_s1 if need_s1 else img_u_s2)
                setattr(out, "pred_u_s1" if need_s1 else "pred_u_s2", out_s["logits"])
                out.model_out["u_s"] = out_s
                out._parts["s1" if need_s1 else "s2"] = ("u_s", 0, None)

            if self.teacher is not None and self.teacher.own_bn_forward:
                img_t = img_u_s1 if need_s1 else img_u_s2 if need_s2 else img_u_w  # the (CutMixed) student input
                out.model_out["t_train"] = self.teacher.forward_train(torch.cat((img_x, img_t)))

        out.conf_u_w, out.mask_u_w = confidence(out.logits_u_w_teacher)
        if need_s1 or need_s2:
            if self.cfg.mix_source == "batch":
                out.conf_u_w_mix, out.mask_u_w_mix = confidence(out.logits_u_w_mix_teacher)
                out.ignore_mask_mix = batch_mix["ignore_mask_u"]
            else:
                out.logits_u_w_mix_teacher = self._partner(out.logits_u_w_teacher)
                out.conf_u_w_mix, out.mask_u_w_mix = self._partner(out.conf_u_w), self._partner(out.mask_u_w)
                out.ignore_mask_mix = self._partner(ignore_mask_u)
        return out

    def _partner(self, t: torch.Tensor) -> torch.Tensor:
        """The CutMix partner of each image within the batch: ``roll`` by one, or ``flip`` (V2's ``img.flip(0)``)."""
        return t.flip(0) if self.cfg.mix_source == "flip" else t.roll(1, 0)

    def after_optimizer_step(self) -> None:
        if self.teacher is not None:
            self.teacher.update(self.student_module)

    def state_dict(self) -> dict:
        return {"teacher": self.teacher.state_dict()} if self.teacher is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if self.teacher is not None:
            self.teacher.load_state_dict(state["teacher"])
