"""PCR: prototype-based consistency regularization (Xu, Liu, Bian, Yang; NeurIPS 2022, arXiv 2210.04388).

A non-trainable set of M "micro" prototypes per class defines a second, prototype-based predictor on the
student's pixel features: ``g_c(f) = max_m cos(f, p_{c,m}) / tau``. PCR trains the features so that this
predictor agrees with the teacher's linear-head pseudo-labels on confident unlabeled pixels, keeps the
prototypes up to date with a momentum average of the features assigned to them, and trains the linear head
with U2PL's entropy-filtered pseudo-label CE. Only abstracts, configs and the (evaluation-only, MindSpore)
official code were readable (``methods.md`` §6); [C] marks what the code/configs fix, [I] what is
reconstructed (each reconstruction is a setting where a choice exists).

Terms (``method.terms.<term>``; a component is ablated with ``weight: 0``)::

    pcr_x   CE(g(student features on x)[S], y[S])            prototype head on labeled pixels      [I, §6.3]
    pcr_u   sum_S [c >= thr] CE(g(student on s1)[S], y_hat) / sum_S [c >= thr]   the PCR term     [I, §6.3]
    u_drop  U2PL entropy-filtered CE of the linear head on s1 (family ``u2pl``)                    [C, §3.7]

S is the sampled pixel grid, y_hat / c the teacher's (linear-head) pseudo-label / confidence CutMixed with
strong view 1's box, thr = ``confid_thresh``. pcr_u is normalised by the number of confident sampled pixels
(§6.3), not by the valid ones as UniMatch's terms are.

u_drop settings (``method.terms.u_drop.<setting>``): ``drop_percent`` 80 [C] and ``warmup_frac`` 0.0125: U2PL's /
PCR's supervised-only warm-up ``sup_only_epoch`` [C: 1 of 80 VOC epochs, 1 of 200 Cityscapes epochs], u_drop is 0
for the first round(warmup_frac * iterations) iterations (0.0125 = one epoch of the 80-epoch VOC paper studies;
PCR's Cityscapes share is 0.005). Unlike U2PL, the warm-up still runs the unlabeled forwards (the student's BN
sees the strong views) and the EMA teacher is not reset to the student at its end [I: teacher mechanics are the
trainer's, ``sslray.teacher_student``].

Presets: ``pcr`` = ``pcr_base`` + pcr_x + pcr_u, where ``pcr_base`` is PCR's (= U2PL's) training without
prototypes: EMA teacher 0.99 with warm-up, ``L_x + L_u_drop`` (``global_div: 1``, U2PL/PCR sum their losses),
``u_s1`` listed with weight 0 so the "plain pseudo-label CE" ablation is one override. L_x is OHEM as in PCR's
configs on both datasets [C: threshold 0.7, min_kept 100,000 per GPU of 2 images]: ``x.ohem_min_kept`` 400,000
keeps that count per image for one batch of 8 (sslray computes OHEM per rank over its labeled batch; with fewer
valid pixels than min_kept every pixel is kept, i.e. plain CE, as on the synthetic default's 8 x 64 x 64).
``x.criterion: ce`` is U2PL's VOC choice. Composed after another preset (``fixmatch+pcr``, ``unimatch+pcr``,
``meanteacher+pcr``) only pcr_x and pcr_u are added: the base keeps its own L_x, unlabeled terms and
``global_div`` (which then divides the PCR terms too).

Prototype module (family ``pcr``; the settings are shared by pcr_x and pcr_u, which must agree when both
are active; ``method.terms.pcr_x.<setting>`` and ``method.terms.pcr_u.<setting>``):

- ``num_protos`` M per class [C: 4 VOC, 3 Cityscapes; default 4]; prototypes are a buffer [C*M, D] stored
  un-normalised [C]; ``temperature`` 0.1 [C]; the matched micro-prototype of class c is argmax_m [C].
- ``feature``: ``rep_clf`` (default, PCR's choice [C: ``rep_clf: True``, ``proto_head.in_planes: 512``]:
  cat(reduced c1, ASPP upsampled), the tensor PCR's decoder classifier consumes, here the input of the decoder's
  fuse convs, D = low + aspp channels: 48 + 256 = 304 for DeepLabV3+, w/4 + w for the small model; PCR's
  decoder has 256 + 256 = 512 [C], a width of the architecture, so no projection is added; the ASPP part is
  sampled with ``grid_sample`` (align_corners=True), which equals upsampling it to the decoder grid and
  indexing) or ``features`` (the fused decoder feature that this codebase's 1x1 classifier reads,
  D = ``feature_dims["features"]``).
- ``sample_grid`` G = 32 [C ``select_granularity``]: one random pixel per cell of a G x G grid (cell =
  h // G x w // G, G clamped to the map size), per image, taken on the decoder-resolution map [I: the code
  samples the input-size upsampled map; sampling the stride-4 map avoids materialising it, §6.5]. Labels,
  pseudo-labels, confidences and padding masks are read at the nearest full-resolution pixel
  (``F.interpolate`` nearest semantics). Each step draws one grid per view; the loss terms and the
  prototype update use the same pixels.
- ``confid_thresh`` 0.8 [C: VOC 0.8, Cityscapes 0.65; use [U], read as the pcr_u mask and the unlabeled
  update condition, I].
- ``momentum`` 0.99 [C]: after the optimizer step, sampled valid pixels that pass the update condition are
  grouped by (target class c, matched micro-prototype m*(c)) and ``p_cm <- momentum p_cm + (1 - momentum)
  mean(f)`` over un-normalised features [C]. Targets: ground truth on x, the CutMixed pseudo-label on s1.
  ``update_cond: correct`` (default, the [D] port's rule): target == prototype-head argmax, and for unlabeled
  pixels also confidence >= confid_thresh; ``all``: every valid (and, unlabeled, confident) pixel.
  ``update_unlabeled: false`` updates from labeled pixels only. momentum 1.0 freezes the prototypes.
  Features come from the student's forward of this step [I: §6.2 leaves student vs teacher open; the teacher
  never sees the labeled batch, so teacher features would cost an extra forward]. Under DDP the per-(c, m)
  feature sums and counts are all-reduced before the update, so every rank keeps identical prototypes.
- ``init``: ``kmeans`` (default) [D/I]: during a supervised warm-up of W = round(``warmup_frac`` * iterations)
  iterations (at least 1) the labeled sampled features (gathered from every rank) fill a per-class FIFO bank
  of ``kmeans_pixels`` entries; at the end of iteration W the bank is clustered per class into M centroids by
  Lloyd k-means (Euclidean, ``kmeans_iters`` rounds, starting points drawn with a generator seeded by
  ``kmeans_seed``, so every rank computes the same prototypes), and the bank is freed. A class never seen in
  the bank keeps its random prototypes; a class with fewer than M pixels repeats starting points.
  ``random``: the prototypes keep their random initialisation (Gaussian, drawn from the trial-seeded RNG at
  build time, identical on every rank). warmup_frac defaults to 0.05 [I; PCR: sup_only_epoch 1 of 80 VOC
  epochs, prototypes from a pickle of unknown provenance].
  During the warm-up pcr_x and pcr_u are 0 and the prototypes are not updated; the base method's unlabeled
  terms stay on [I: switching them off would change the composed base methods; the EMA teacher has its own
  warm-up], except ``u_drop``, which has its own supervised-only gate (``u_drop.warmup_frac``, below). PCR has
  one sup_only_epoch for everything: to reproduce it set the three ``warmup_frac`` equal (as the
  ``studies/ablation_pcr.yaml`` recipe does: one epoch of the unlabeled set).

Diagnostics (``train/pcr/*``): ``proto_acc`` (prototype-head accuracy on the labeled sampled pixels),
``conf_frac`` (share of valid sampled s1 pixels at or above confid_thresh); ``train/u2pl/drop_frac``.

Result on the embedded synthetic default (issue 11; ``studies/methods_synthetic.yaml``: 32 labels, 1500
iterations, small model, seeds 0 / 1 / 2). PCR on its own base (the U2PL recipe of the study file: EMA teacher
with parameters only, OHEM, entropy-drop CE with its supervised epoch, U2PL's CutMix box and no colour
augmentation): 44.74 / 49.60 / 50.63 mIoU (48.3 +- 3.1), above supervised 39.66 / 45.84 / 43.49 (43.0 +- 3.1) on
every seed and level with UniMatch (48.6 +- 2.5). The prototype terms added to UniMatch (``unimatch+pcr``, with
UniMatch's recipe and the default warm-up): 69.79 / 75.74 / 50.81 (65.4 +- 13.0), the best row of the study, with
a large spread: on seeds 0 and 1 still rising at iteration 1500 (61.7 -> 69.8, 70.1 -> 75.7), on seed 2 level
with UniMatch (50.8 against 46.7). So on this task the prototype head helps most on top of UniMatch's strong
views and feature perturbation, much less on its own U2PL base; which part is responsible is what
``studies/ablation_pcr.yaml`` measures.

Ablation (issue 11, ``benchmarks/results/ablation_pcr_cpu2_subset.csv``; 14 rows at seed 0, five of them at seeds 1
and 2 too; measured on another machine than ``methods_synthetic``, whose arithmetic differs: PCR's seed 0 is 36.84
there against 44.74, so compare within the file). Full PCR 36.84 / 48.18 / 45.50 (43.5 +- 5.9). Without the
prototype terms (``pcr_base``: the EMA teacher and entropy-drop CE alone) 37.71 / 43.79 / 42.64 (41.4 +- 3.2): the
prototypes add +2.1 on average (-0.9 / +4.4 / +2.9), within the noise. What moves more is the U2PL base around
them: UniMatch's strong view (colour, grayscale, blur and a 2-40 % CutMix box from a second batch) instead of
U2PL's CutMix-only view gives 50.3 +- 1.6, above PCR on every seed (+11.7 / +3.6 / +5.0), which agrees with
``unimatch+pcr`` being the best row of ``methods_synthetic``; dropping the supervised-only epoch of ``u_drop``
(its loss from iteration 0) gives 49.1 +- 4.4 (+9.9 / -1.9 / +8.6). FixMatch's confident CE in place of the
entropy drop gives 46.2 +- 3.8 (+12.2 / -0.5 / -3.6): not a finding. At seed 0 alone no other row is more than a
seed's noise from the baseline (random prototypes 40.3, M = 1 40.2, plain CE 44.1, the rest 36-40). Nothing here
was tuned: the defaults stay PCR's, and a user who wants the best number on this task composes the prototype
terms onto UniMatch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from sslray.methods.base import MethodModule, ModuleContext, all_gather_cat, all_reduce_sum, raise_problems
from sslray.methods.settings import EntropyDropConfig, PCRConfig, check_pcr  # noqa: F401 - re-exported


# --------------------------------------------------------------------------------------------------
# settings


# --------------------------------------------------------------------------------------------------
# pure functions


def proto_logits(feat: torch.Tensor, protos: torch.Tensor, num_protos: int,
                 temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Prototype-head logits: feat [N, D], protos [C*M, D] -> (g [N, C] = max_m cos / tau, m* [N, C] long)."""
    f = feat.float()
    inv_norm = f.pow(2).sum(1, keepdim=True).clamp_min(1e-24).rsqrt()  # [N, 1]; F.normalize's eps, cheaper backward
    sim = (f @ F.normalize(protos.float(), dim=1).t()) * inv_norm  # [N, C*M]
    best, idx = sim.view(feat.shape[0], -1, num_protos).max(2)  # [N, C], [N, C]
    return best / temperature, idx


def grid_positions(batch: int, h: int, w: int, grid: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """One random pixel per cell of a G x G grid on an h x w map, per image: (rows, cols), each [B, G_h * G_w].

    G is clamped to the map size per axis; the cell is ``h // G`` x ``w // G`` (PCR's strips), so a remainder
    at the bottom/right edge is never sampled, as in the official sampler.
    """
    gh, gw = min(grid, h), min(grid, w)
    ph, pw = h // gh, w // gw
    rows = torch.arange(gh, device=device)[:, None] * ph + torch.randint(ph, (batch, gh, gw), device=device)
    cols = torch.arange(gw, device=device)[None, :] * pw + torch.randint(pw, (batch, gh, gw), device=device)
    return rows.flatten(1), cols.flatten(1)


def _nearest_source(idx: torch.Tensor, out_size: int, in_size: int) -> torch.Tensor:
    """The source index ``F.interpolate(mode="nearest")`` reads for output index ``idx`` when resizing in -> out."""
    return (idx.float() * (in_size / out_size)).floor().long().clamp_(max=in_size - 1)


def _read_at(maps: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Values of full-resolution maps [B, H, W] at the pixels nearest to decoder positions (rows, cols) [B, N]."""
    big_h, big_w = maps.shape[-2:]
    flat = _nearest_source(rows, h, big_h) * big_w + _nearest_source(cols, w, big_w)  # [B, N]
    return maps.flatten(1).gather(1, flat)


def sample_features(part: dict[str, torch.Tensor], rows: torch.Tensor, cols: torch.Tensor,
                    feature: str) -> torch.Tensor:
    """Features of the decoder-resolution map at (rows, cols) [B, N] -> [B * N, D] (with grad)."""
    feat = part["low"] if feature == "rep_clf" else part["features"]  # [B, D0, h, w]
    b, d, h, w = feat.shape
    idx = (rows * w + cols)[:, None, :]  # [B, 1, N]
    out = feat.flatten(2).gather(2, idx.expand(-1, d, -1))  # [B, D0, N]
    if feature == "rep_clf":
        # ASPP at h4 x w4, upsampled with align_corners=True in the decoder: sample it at the same points.
        x = cols.float() * (2.0 / max(w - 1, 1)) - (1.0 if w > 1 else 0.0)
        y = rows.float() * (2.0 / max(h - 1, 1)) - (1.0 if h > 1 else 0.0)
        grid = torch.stack((x, y), -1)[:, None].to(part["aspp"].dtype)  # [B, 1, N, 2]
        aspp = F.grid_sample(part["aspp"], grid, mode="bilinear", align_corners=True)  # [B, A, 1, N]
        out = torch.cat((out, aspp.squeeze(2)), 1)
    return out.transpose(1, 2).reshape(b * rows.shape[1], -1)


def percentile(values: torch.Tensor, q: float) -> torch.Tensor:
    """The q-th percentile (0..100) of a 1-D tensor with linear interpolation (numpy's default)."""
    n = values.numel()
    pos = q / 100.0 * (n - 1)
    lo = int(pos)
    hi = min(lo + 1, n - 1)
    v_lo = torch.kthvalue(values, lo + 1).values
    v_hi = torch.kthvalue(values, hi + 1).values if hi != lo else v_lo
    return v_lo + (pos - lo) * (v_hi - v_lo)


def masked_percentile(values: torch.Tensor, valid: torch.Tensor, q: float) -> torch.Tensor:
    """``percentile(values[valid], q)`` without the data-dependent boolean index (a host read): the valid values
    sorted first (the others set to +inf), the interpolation position ``q / 100 (n - 1)`` computed from the valid
    count n on the device. Any value when nothing is valid (the caller masks with ``valid`` anyway)."""
    flat = values.flatten()
    n = valid.flatten().sum()
    ordered = flat.masked_fill(~valid.flatten(), float("inf")).sort().values
    pos = (q / 100.0) * (n - 1).clamp(min=0).to(torch.float64)
    lo = pos.floor().long()
    hi = torch.minimum(lo + 1, (n - 1).clamp(min=0))
    v_lo, v_hi = ordered.gather(0, lo.reshape(1))[0], ordered.gather(0, hi.reshape(1))[0]  # not ordered[lo]: a 0-dim
    # index tensor is read back as a Python int
    frac = (pos - lo).to(flat.dtype)
    return torch.where(hi == lo, v_lo, v_lo + frac * (v_hi - v_lo))


# --------------------------------------------------------------------------------------------------
# the prototype module


@dataclass
class _Sample:
    """One view's sampled pixels: feat [N, D] (with grad), target [N] (ignore_index where not valid), conf [N];
    ``head`` keeps the loss's prototype logits and matches (detached) for the update after the step."""

    feat: torch.Tensor
    target: torch.Tensor
    conf: torch.Tensor | None
    head: tuple[torch.Tensor, torch.Tensor] | None = None


class PCRModule(MethodModule):
    """Non-trainable class prototypes, the grid sampler, momentum maintenance and k-means initialisation.

    Buffers (checkpointed): ``protos`` [C*M, D], ``ready`` (0 during the warm-up, 1 once initialised), and with
    ``init: kmeans`` the warm-up bank ``bank`` [C, kmeans_pixels, D] / ``bank_n`` [C] (pixels pushed so far),
    which shrinks to an empty tensor once the prototypes are initialised.
    """

    def __init__(self, cfg: PCRConfig, ctx: ModuleContext):
        super().__init__()
        dims = ctx.feature_dims
        need = ("low", "aspp") if cfg.feature == "rep_clf" else ("features",)
        if any(k not in dims for k in need):
            raise ValueError(f"pcr: the model does not report feature_dims {need} (got {sorted(dims)})")
        self.cfg = cfg
        self.num_classes, self.ignore_index = ctx.num_classes, ctx.ignore_index
        self.dim = dims["low"] + dims["aspp"] if cfg.feature == "rep_clf" else dims["features"]
        warmup = round(cfg.warmup_frac * ctx.iterations)
        self.warmup_iters = max(warmup, 1) if cfg.init == "kmeans" else warmup
        self.register_buffer("protos", torch.randn(self.num_classes * cfg.num_protos, self.dim))
        self.register_buffer("ready", torch.tensor(int(self.warmup_iters == 0)))
        self._ready = self.warmup_iters == 0  # the host's copy of ``ready``: the step never reads the buffer
        if cfg.init == "kmeans":
            self.register_buffer("bank", torch.zeros(self.num_classes, cfg.kmeans_pixels, self.dim))
            self.register_buffer("bank_n", torch.zeros(self.num_classes, dtype=torch.long))
        self._cache_out: Any = None
        self._cache: dict[str, _Sample] = {}
        self._diag: dict[str, torch.Tensor] = {}

    @property
    def is_ready(self) -> bool:
        """Whether the prototypes are initialised: a host-side copy of the ``ready`` buffer (set with it in
        ``after_step``, read from it only when a checkpoint is loaded), so the terms' warm-up gate costs no
        device read per step."""
        return self._ready

    def head(self, feat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """feat [N, D] -> (prototype logits [N, C], matched micro-prototype [N, C])."""
        return proto_logits(feat, self.protos, self.cfg.num_protos, self.cfg.temperature)

    def sample_head(self, s: _Sample) -> torch.Tensor:
        """Prototype logits [N, C] of a sample, with grad; remembered (detached) for ``after_step``."""
        logits, idx = self.head(s.feat)
        s.head = (logits.detach(), idx)
        return logits

    def _detached_head(self, s: _Sample) -> tuple[torch.Tensor, torch.Tensor]:
        # The prototypes only change in after_step, so the loss's logits are still current.
        return s.head if s.head is not None else self.head(s.feat.detach())

    def sample(self, out, view: str) -> _Sample | None:
        """The sampled pixels of view ``x`` (ground truth) or ``s1`` (CutMixed pseudo-labels) for this step.

        Drawn once per step and view (cached on the step's outputs) so the losses and the update agree.
        None when the step did not compute the view.
        """
        if self._cache_out is not out:
            self._cache_out, self._cache = out, {}
        if view in self._cache:
            return self._cache[view]
        part = out.part(view)
        if part is None:
            return None
        ref = part["features"]
        b, _, h, w = ref.shape
        rows, cols = grid_positions(b, h, w, self.cfg.sample_grid, ref.device)
        feat = sample_features(part, rows, cols, self.cfg.feature)
        ign = self.ignore_index
        if view == "x":
            target, conf = _read_at(out.mask_x, rows, cols, h, w).flatten(), None
        else:
            t = out.mixed_target(1)
            mask, conf, pad = (_read_at(m, rows, cols, h, w).flatten() for m in (t.mask, t.conf, t.ignore))
            target = torch.where(pad == ign, torch.full_like(mask, ign), mask)
        self._cache[view] = _Sample(feat, target, conf)
        return self._cache[view]

    @torch.no_grad()
    def after_step(self, out) -> None:
        """Diagnostics; during the warm-up fill the k-means bank (and initialise at its end), else the momentum update."""
        ign, cfg = self.ignore_index, self.cfg
        x = self.sample(out, "x")
        u = self.sample(out, "s1")
        self._cache_out, self._cache = None, {}
        fx = x.feat.detach().float()
        gx, idx_x = self._detached_head(x)
        valid_x = x.target != ign
        self._diag = {"proto_acc": ((gx.argmax(1) == x.target) & valid_x).sum() / valid_x.sum().clamp(min=1)}
        if u is not None:
            valid_u = u.target != ign
            self._diag["conf_frac"] = (valid_u & (u.conf >= cfg.confid_thresh)).sum() / valid_u.sum().clamp(min=1)
        if not self.is_ready:
            if cfg.init == "kmeans":  # warm-up only: the bank takes a variable number of labeled pixels, gathered
                # from ranks that hold different counts (all_gather_cat reads the sizes), so these reads are kept
                self._push_bank(fx[valid_x], x.target[valid_x])
            if out.iteration + 1 >= self.warmup_iters:
                if cfg.init == "kmeans":
                    self._init_kmeans()
                self.ready.fill_(1)
                self._ready = True
            return
        if cfg.momentum >= 1.0:
            return
        chosen = [self._select(fx, gx, idx_x, x.target, None)]
        if u is not None and cfg.update_unlabeled:
            gu, idx_u = self._detached_head(u)
            chosen.append(self._select(u.feat.detach().float(), gu, idx_u, u.target, u.conf))
        self._momentum_update(torch.cat([f for f, _ in chosen]), torch.cat([k for _, k in chosen]))

    def _select(self, feat, logits, idx, target, conf) -> tuple[torch.Tensor, torch.Tensor]:
        """Every sampled pixel and its (class, micro-prototype) key c * M + m*(c), or the spare key C * M for a
        pixel that does not update the prototypes: ([N, D], [N]). Fixed-size, so selecting reads nothing back
        (a boolean-mask index would: its size is data-dependent)."""
        keep = target != self.ignore_index
        if conf is not None:
            keep &= conf >= self.cfg.confid_thresh
        if self.cfg.update_cond == "correct":
            keep &= logits.argmax(1) == target
        tgt = torch.where(keep, target, torch.zeros_like(target))
        m_star = idx.gather(1, tgt[:, None]).squeeze(1)
        spare = torch.full_like(tgt, self.protos.shape[0])
        return feat, torch.where(keep, tgt * self.cfg.num_protos + m_star, spare)

    def _momentum_update(self, feat: torch.Tensor, key: torch.Tensor) -> None:
        """p_k <- m p_k + (1 - m) mean(feat of key k), sums and counts all-reduced over ranks; feat [n, D], key [n]
        (key C * M: a pixel that updates nothing, summed into a spare row that is dropped)."""
        n_keys = self.protos.shape[0]
        stats = torch.zeros(n_keys + 1, self.dim + 1, device=feat.device)  # [C*M + 1, D + 1]: feature sums, count
        stats.index_add_(0, key, torch.cat((feat, torch.ones_like(feat[:, :1])), 1))
        stats = stats[:n_keys]
        all_reduce_sum(stats)
        count = stats[:, -1:]
        mean = stats[:, :-1] / count.clamp(min=1)
        m = self.cfg.momentum
        self.protos.copy_(torch.where(count > 0, m * self.protos + (1.0 - m) * mean, self.protos))

    def _push_bank(self, feat: torch.Tensor, label: torch.Tensor) -> None:
        """Append every rank's labeled features to the per-class FIFO bank (the newest kmeans_pixels per class)."""
        both = all_gather_cat(torch.cat((feat, label[:, None].to(feat.dtype)), 1))
        feat, label = both[:, :-1], both[:, -1].long()
        c, cap, d = self.bank.shape
        order = torch.argsort(label, stable=True)
        feat, label = feat[order], label[order]
        counts = torch.bincount(label, minlength=c)  # [C]
        rank = torch.arange(label.numel(), device=label.device) - (counts.cumsum(0) - counts)[label]
        keep = rank >= counts[label] - cap  # only the newest cap of a class can survive
        slot = (self.bank_n[label] + rank) % cap
        self.bank.view(c * cap, d)[(label * cap + slot)[keep]] = feat[keep]
        self.bank_n += counts

    def _init_kmeans(self) -> None:
        """Per-class Lloyd k-means of the bank into M centroids, batched over classes; then free the bank."""
        c, cap, d = self.bank.shape
        m = self.cfg.num_protos
        pts = self.bank  # [C, cap, D]
        n = self.bank_n.clamp(max=cap)  # [C]
        valid = torch.arange(cap, device=pts.device)[None] < n[:, None]  # [C, cap]
        gen = torch.Generator().manual_seed(self.cfg.kmeans_seed)
        score = torch.rand(c, cap, generator=gen).to(pts.device).masked_fill(~valid, -1.0)
        order = score.argsort(1, descending=True)  # valid points first, in random order
        start = order.gather(1, torch.arange(m, device=pts.device)[None] % n.clamp(min=1)[:, None])  # [C, M]
        cent = pts.gather(1, start[..., None].expand(-1, -1, d))  # [C, M, D]
        for _ in range(self.cfg.kmeans_iters):
            assign = torch.cdist(pts, cent).argmin(2)  # [C, cap]
            onehot = F.one_hot(assign, m).to(pts.dtype) * valid[..., None]  # [C, cap, M]
            size = onehot.sum(1)[..., None]  # [C, M, 1]
            cent = torch.where(size > 0, onehot.transpose(1, 2) @ pts / size.clamp(min=1), cent)
        seen = (n > 0)[:, None, None]
        self.protos.copy_(torch.where(seen, cent, self.protos.view(c, m, d)).view(c * m, d))
        self.bank = self.bank.new_zeros((c, 0, d))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # The bank is freed after initialisation: take the checkpoint's size before loading into it.
        key = prefix + "bank"
        if key in state_dict and hasattr(self, "bank") and state_dict[key].shape != self.bank.shape:
            self.bank = self.bank.new_zeros(state_dict[key].shape)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._ready = bool(self.ready)  # at load time, not in a step

    def diagnostics(self) -> dict[str, torch.Tensor]:
        return dict(self._diag)


def build_pcr(terms: dict[str, PCRConfig], ctx: ModuleContext) -> PCRModule:
    """One module for pcr_x and pcr_u; their prototype settings must agree (only ``weight`` may differ)."""
    raise_problems(check_pcr(terms))
    cfg = next(iter(terms.values()))
    return PCRModule(cfg, ctx)


# --------------------------------------------------------------------------------------------------
# the U2PL entropy drop


class EntropyDropModule(MethodModule):
    """Carries the schedule of ``u_drop`` (its length and the supervised-only warm-up ``warmup_iters``) and reports
    the fraction of valid pixels it dropped."""

    def __init__(self, iterations: int, warmup_iters: int = 0):
        super().__init__()
        self.iterations, self.warmup_iters = iterations, warmup_iters
        self._diag: dict[str, torch.Tensor] = {}

    def drop_fraction(self, iteration: int, drop_percent: float) -> float:
        return (100.0 - drop_percent) / 100.0 * max(0.0, 1.0 - iteration / self.iterations)

    def diagnostics(self) -> dict[str, torch.Tensor]:
        return dict(self._diag)


def build_u2pl(terms: dict[str, EntropyDropConfig], ctx: ModuleContext) -> EntropyDropModule:
    """The schedule module of ``u_drop``: warm-up round(warmup_frac * iterations) iterations."""
    cfg = terms["u_drop"]
    return EntropyDropModule(ctx.iterations, round(cfg.warmup_frac * ctx.iterations))


def loss_u_drop(out, cfg: EntropyDropConfig, ctx, module: EntropyDropModule) -> torch.Tensor:
    """U2PL's L_u on strong view 1 (``methods.md`` §3.7): CE of the linear head against the CutMixed pseudo-label
    on every valid pixel except the highest-entropy fraction, ``(B H W / #kept) * mean_kept CE``.

    No confidence threshold [C]. The entropy is that of the teacher's weak-view probabilities CutMixed with the
    view's box [I: U2PL runs the teacher once more, in train mode, on the mixed images]; the fraction decays
    per iteration rather than per epoch [I]. Pixels at or above the (100 - alpha)-th entropy percentile (linear
    interpolation, as ``np.percentile``) are dropped, as U2PL's ``entropy.ge(thresh)``. During the supervised-only
    warm-up (iterations < ``module.warmup_iters``, U2PL's ``epoch < sup_only_epoch``) the term is a graph-connected
    0; the drop schedule still counts from iteration 0, as U2PL's ``epoch / epochs`` does.
    """
    pred = out.pred_u_s1.float()  # [B, K, H, W]
    if out.iteration < module.warmup_iters:
        module._diag = {}
        return pred.sum() * 0.0
    t = out.mixed_target(1, with_prob=True)
    ign = ctx.ignore_index
    target = torch.where(t.ignore == ign, torch.full_like(t.mask, ign), t.mask)  # [B, H, W]
    valid = target != ign
    alpha = module.drop_fraction(out.iteration, cfg.drop_percent)
    # n_valid stays on the device: no valid pixel gives kept = 0, every CE 0 (ignored) and drop_frac 0, as the
    # early return of a host-side count did
    n_valid = valid.sum()
    entropy = -(t.prob * torch.log(t.prob + 1e-10)).sum(1)  # [B, H, W]
    if alpha > 0:
        drop = (entropy >= masked_percentile(entropy, valid, 100.0 * (1.0 - alpha))) & valid
        target = torch.where(drop, torch.full_like(target, ign), target)
    kept = (target != ign).sum()
    module._diag = {"drop_frac": torch.where(n_valid > 0, 1.0 - kept / n_valid.clamp(min=1), 0.0)}
    ce = F.cross_entropy(pred, target, ignore_index=ign, reduction="none")  # [B, H, W], 0 where ignored
    return ce.sum() * target.numel() / kept.clamp(min=1).float() ** 2


# --------------------------------------------------------------------------------------------------
# the PCR terms


def _zero(out) -> torch.Tensor:
    """A graph-connected 0 for the warm-up and for empty masks."""
    return out.pred_x.float().sum() * 0.0


def _masked_ce(logits: torch.Tensor, target: torch.Tensor, keep: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Mean CE over ``keep`` pixels (0, graph-connected, when none); logits [N, C], target/keep [N]."""
    tgt = torch.where(keep, target, torch.full_like(target, ignore_index))
    ce = F.cross_entropy(logits, tgt, ignore_index=ignore_index, reduction="none")
    return ce.sum() / keep.sum().clamp(min=1)


def loss_pcr_x(out, cfg: PCRConfig, ctx, module: PCRModule) -> torch.Tensor:
    """Prototype-head CE against the ground truth on the labeled sampled pixels (mean over valid ones)."""
    if not module.is_ready:
        return _zero(out)
    s = module.sample(out, "x")
    logits = module.sample_head(s)
    return _masked_ce(logits, s.target, s.target != ctx.ignore_index, ctx.ignore_index)


def loss_pcr_u(out, cfg: PCRConfig, ctx, module: PCRModule) -> torch.Tensor:
    """The PCR consistency: prototype head on strong view 1 vs the teacher's CutMixed linear-head pseudo-label,
    over sampled pixels that are valid and confident (conf >= confid_thresh), normalised by their number."""
    if not module.is_ready:
        return _zero(out)
    s = module.sample(out, "s1")
    logits = module.sample_head(s)
    keep = (s.target != ctx.ignore_index) & (s.conf >= cfg.confid_thresh)
    return _masked_ce(logits, s.target, keep, ctx.ignore_index)
