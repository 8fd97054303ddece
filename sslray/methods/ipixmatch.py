"""IPixMatch (Wu, Li, Xiao, arXiv 2404.18891): an inter-pixel relation loss between teacher and student.

The paper adds "loss terms to capture inter-pixel relations" to a teacher-student framework: the teacher's
*soft* pseudo-labels on the weak view (stop-gradient) and the student's predictions on the strong views are
made to agree on how pixels relate to each other, over the teacher's high-confidence pixels, with "either KL
divergence or a correlation-based distance" [A/S]. No official code exists and the paper body was not read,
so the loss below is the reconstruction of ``methods.md`` §4.2 / §8.2 [I]; every unknown is a setting.

Terms (each a view, so a view is ablated with ``method.terms.<term>.weight: 0``):

    ipix_s1   student on CutMixed strong view 1  vs  teacher on the weak view, mixed with box 1
    ipix_s2   student on CutMixed strong view 2  vs  teacher mixed with box 2
    ipix_fp   student's feature-perturbed weak view (UniMatch FP) vs the (unmixed) teacher; off in the preset
    ipix_x    ``apply_on_labeled``: student on the labeled batch vs the one-hot labels; off in the preset

``ipixmatch`` is UniMatch + ``ipix_s1`` + ``ipix_s2`` with lambda_ip = 0.5 (§8.1). The total is divided by the
method's ``global_div`` like every term, so under UniMatch's ``/ 2`` a weight w adds ``(w / 2) * L_ip``
per view: §4.2's ``L_UniMatch + lambda_ip * sum_views L_ip`` is ``weight = lambda_ip * global_div``, so the
preset's weights are 1.0 (effective 0.5 per view; before issue 11 they were 0.5, an effective 0.25). Composed
as ``fixmatch+ipixmatch`` or ``meanteacher+ipixmatch`` (also ``/ 2``) it adds both view terms unchanged, with the
same effective 0.5; after a base with ``global_div: 1`` (``pcr+ipixmatch``) the same weights mean lambda_ip = 1,
so set them to 0.5 there. ``ipix_s2`` costs a second strong-view forward under a one-view base (set its weight
to 0 to keep the one-view step).

Settings of every term (``method.terms.<term>.<setting>``):

- ``relation: per_class`` (default) — per class channel, a distribution over pixels (Variant A, ``O(B K N)``;
  the paper's Fig. 1: "spatial relation consistency mapping per channel"). ``pairwise`` — the N x N cosine
  affinity of the pixels' class-probability vectors (Variant B, ``O(B N^2)``), on at most ``max_nodes``
  nodes per image.
- ``distance: kl`` (default) or ``correlation``.
  per_class/kl: ``T^2 / |keep| * sum_{b,c} KL(softmax_j(z^t_{b,c,j} / T) || softmax_j(z^s_{b,c,j} / T))``,
  the softmax over the image's valid pixels j, images with fewer than 2 valid pixels skipped.
  per_class/correlation: ``mean_{b,c} 1 - Pearson_j(p^t_{b,c,j}, p^s_{b,c,j})`` with p = softmax over
  classes, over (b, c) whose teacher channel is not constant on the valid pixels.
  pairwise/kl: ``T^2 * mean_b mean_i KL(softmax_j(A^t_ij / T) || softmax_j(A^s_ij / T))`` over valid nodes,
  ``A = Q Q^T`` with Q the L2-normalised class probabilities. pairwise/correlation: ``mean_b 1 -
  Pearson(vec A^t, vec A^s)`` over pairs of valid nodes.
  The T^2 factor (Hinton) keeps the gradient scale independent of T; the correlation forms ignore T.
  Affinities lie in [0, 1], so at T = 1 the pairwise KL rows are nearly uniform; T ~ 0.1 sharpens them.
- ``temperature`` (1.0), ``conf_thresh`` (null: the method's ``conf_thresh``, e.g. UniMatch's 0.95; a number
  in [0, 1] overrides it for this term). Valid pixels: teacher max probability >= threshold and not padding.
- ``scale: confident_share`` (default) multiplies each image's entries by the share of its non-padding pixels
  that are valid; ``none`` is §8.2 verbatim. Why [I]: the per-channel KL is a distance between distributions,
  so its size does not shrink with the confident region, and its gradient per pixel grows as the region
  shrinks. Early in training at tau = 0.95 a few pixels per image are confident and carry the whole loss:
  on the synthetic default (300 iterations, seed 0) ``none`` kept the confident share at 0.3 % (UniMatch:
  8 % at iteration 150, 18 % at 300) and reached val mIoU 30.4 (UniMatch 39.8); ``confident_share`` 39.1. The share plays the role of UniMatch's
  division by valid (not confident) pixels, and is 1 when tau = 0 (Cityscapes), where the two agree.
- ``resolution: decoder`` (default) — on the decoder grid (stride 4 for DeepLabV3+, 2 for the small model):
  every full-resolution map (student and teacher logits, CutMix box, padding mask, labels) is *sampled* at
  the full-resolution position of each decoder cell under the ``align_corners=True`` upsampling the model
  uses, ``round(i (H - 1) / (h - 1))``. When ``(H - 1) / (h - 1)`` is an integer (crops 321, 513, 801 at
  stride 4) the sampled logits equal ``logits_low`` exactly, and the box is downsampled by the nearest
  neighbour with the right alignment. Sampling the logits rather than reading ``logits_low`` treats teacher
  and student alike (the teacher of a mixed view has no ``logits_low`` of its own, and MLLC may refine the
  teacher's full-resolution logits) and costs one gather. ``full`` — every pixel (fine for per_class:
  ``O(B K H W)``; pairwise still keeps ``max_nodes``).
- ``max_nodes`` (4096, §8.1) and ``node_select`` (pairwise only): ``random`` (default) keeps a uniform random
  subset of at most ``max_nodes`` valid pixels per image; ``pool`` average-pools the logits with the smallest
  k x k window (ceil mode) leaving at most ``max_nodes`` cells, a cell being a node when all its pixels are
  valid. Only pairwise/kl builds N x N matrices (two per image and view, the student's with gradient): 16.8 M
  entries each at 4096 nodes, whatever the crop (a 201 x 201 map at crop 801 has 40,401 pixels).
  pairwise/correlation needs none: its pair sums are K x K Gram matrices, O(N K^2), so a large
  ``max_nodes`` costs it nothing.

``ipix_x`` (``apply_on_labeled``, [U] in the paper; the choice here): the labels act as a hard teacher on
the labeled images (one-hot probabilities, valid = not ignore). per_class/kl then asks each class channel's
spatial distribution to be uniform over that class's labeled region (classes absent from the image are
skipped); the other forms use the one-hot vectors as the teacher probabilities (pool mode averages them).
The alternative, teacher vs student on labeled images, is empty with the self teacher (both see the same
view), so it was not chosen.

The terms share the family ``ipixmatch``, whose module has no heads or state and only logs what the terms
saw: ``train/ipixmatch/nodes`` (nodes per image, against ``max_nodes``) and ``train/ipixmatch/valid_frac``.

Numerics: softmax/log in float32 (the pairwise correlation's sums in float64); no NaN on empty masks (a zero
that keeps the graph connected).

Result on the embedded synthetic default (issue 11; ``studies/methods_synthetic.yaml``: 32 labels, 1500
iterations, small model, seeds 0 / 1 / 2): ``ipixmatch`` 49.78 / 46.81 / 50.05 mIoU (48.9 +- 1.8) against
UniMatch 51.44 / 47.76 / 46.66 (48.6 +- 2.5) and supervised 39.66 / 45.84 / 43.49 (43.0 +- 3.1): above
supervised on every seed, level with UniMatch (+0.3 on average, -1.7 / -1.0 / +3.4 per seed), so on this task
the relation loss neither helps nor hurts UniMatch measurably over 3 seeds. ``unimatch+ipixmatch`` is the same
configuration and gives the same numbers. Which of its settings matter: ``studies/ablation_ipixmatch.yaml``
(600 iterations, seed 0 only so far; ``benchmarks/results/ablation_ipixmatch_cpu2_seed0.csv``): full 42.2 against
UniMatch 45.3; correlation 46.5, pairwise 50.5, pairwise correlation 47.8, -s1 45.9, -s2 47.0, lambda 0.25 47.9,
+fp 47.2, full resolution 43.6, +labeled 38.5, -confidence 33.3, unscaled 29.5. One seed cannot separate rows
within about 3 mIoU; what stands out is that taking every pixel (-confidence) or not weighting each image by its
confident share (unscaled) hurts by 9-13, and the lighter settings (one view, half weight) sit level with UniMatch.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from sslray.methods.base import MethodModule
from sslray.methods.settings import IPixTermConfig  # noqa: F401 - re-exported

_NEG = torch.finfo(torch.float32).min  # "minus infinity" that keeps log_softmax and its gradient finite
_EPS = 1e-12


# --------------------------------------------------------------------------------------------------
# where the loss is computed


def decoder_grid(full: tuple[int, int], low: tuple[int, int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Full-resolution (row, col) indices of the decoder cells under ``align_corners=True`` upsampling.

    ``full`` = (H, W), ``low`` = (h, w); returns rows [h], cols [w] with ``rows[i] = round(i (H-1) / (h-1))``.
    """
    return tuple(torch.linspace(0, f - 1, n, device=device).round().long() for f, n in zip(full, low))


def _at(t: torch.Tensor, grid: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
    """t [..., H, W] sampled at the grid -> [..., h, w]; unchanged when grid is None (full resolution)."""
    if grid is None:
        return t
    rows, cols = grid
    return t.index_select(-2, rows).index_select(-1, cols)


def view_tensors(out, view: str, cfg: IPixTermConfig, ctx):
    """Teacher target, student logits and the valid-pixel mask of one view, at the term's resolution.

    Returns ``(z_t [B, K, h, w] detached, z_s [B, K, h, w], valid [B, h, w] bool, hard, share [B])``: ``z_t``
    holds the teacher's logits, or one-hot probabilities when ``hard`` (view ``x``: the labels are the teacher);
    ``share`` is each image's fraction of non-padding pixels that are valid (1 for labels).
    """
    student = {"s1": out.pred_u_s1, "s2": out.pred_u_s2, "fp": out.pred_u_w_fp, "x": out.pred_x}[view]
    grid = None
    if cfg.resolution == "decoder":
        low = out.part({"fp": "u_w"}.get(view, view))["logits_low"].shape[-2:]
        grid = decoder_grid(tuple(student.shape[-2:]), tuple(low), student.device)
    z_s = _at(student, grid).float()
    if view == "x":
        mask = _at(out.mask_x, grid)  # [B, h, w]
        valid = mask != ctx.ignore_index
        onehot = F.one_hot(torch.where(valid, mask, torch.zeros_like(mask)), z_s.shape[1])  # [B, h, w, K]
        return (onehot.permute(0, 3, 1, 2) * valid[:, None]).float(), z_s, valid, True, valid.flatten(1).any(1).float()
    z_t, ignore = _at(out.logits_u_w_teacher, grid), _at(out.ignore_mask_u, grid)
    if view in ("s1", "s2"):
        box = _at(out.cutmix_box1 if view == "s1" else out.cutmix_box2, grid) == 1  # [B, h, w]
        z_t = torch.where(box[:, None], _at(out.logits_u_w_mix_teacher, grid), z_t)
        ignore = torch.where(box, _at(out.ignore_mask_mix, grid), ignore)
    z_t = z_t.detach().float()
    tau = ctx.conf_thresh if cfg.conf_thresh is None else cfg.conf_thresh
    present = ignore != ctx.ignore_index
    valid = present & (torch.softmax(z_t, 1).amax(1) >= tau)
    share = valid.flatten(1).sum(1) / present.flatten(1).sum(1).clamp_min(1)
    return z_t, z_s, valid, False, share


def select_nodes(z_t: torch.Tensor, z_s: torch.Tensor, valid: torch.Tensor, max_nodes: int, mode: str):
    """At most ``max_nodes`` nodes per image for the pairwise relation.

    z_t, z_s [B, K, h, w]; valid [B, h, w] -> (z_t [B, K, n], z_s [B, K, n], valid [B, n]), n <= max_nodes.
    ``random``: a uniform subset of the valid pixels (invalid ones fill the slots only when there are fewer
    valid pixels than slots, and stay invalid). ``pool``: k x k average pooling (ceil mode) with the smallest
    k that leaves at most ``max_nodes`` cells; a cell is valid when all its pixels are.
    """
    b, k, h, w = z_s.shape
    if h * w <= max_nodes:
        return z_t.flatten(2), z_s.flatten(2), valid.flatten(1)
    if mode == "pool":
        win = max(2, math.ceil(math.sqrt(h * w / max_nodes)))
        while math.ceil(h / win) * math.ceil(w / win) > max_nodes:
            win += 1
        valid_cells = -F.max_pool2d(-valid[:, None].float(), win, win, ceil_mode=True)  # min over the cell
        z_t, z_s = (F.avg_pool2d(t, win, win, ceil_mode=True).flatten(2) for t in (z_t, z_s))
        return z_t, z_s, valid_cells.flatten(1) == 1
    score = torch.rand(b, h * w, device=z_s.device).masked_fill(~valid.flatten(1), -1.0)  # [B, N]
    score, idx = score.topk(max_nodes, dim=1)  # [B, n]
    z_t, z_s = (t.flatten(2).gather(2, idx[:, None].expand(-1, k, -1)) for t in (z_t, z_s))
    return z_t, z_s, score >= 0


# --------------------------------------------------------------------------------------------------
# the relations; inputs flattened: z_t, z_s [B, K, N], valid [B, N]


def _mean_kept(values: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Mean of ``values[keep]``; 0 (still in the graph, zero gradient) when nothing is kept. No host sync."""
    return torch.where(keep, values, 0.0).sum() / keep.sum().clamp_min(1)


def _pearson(u: torch.Tensor, v: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted Pearson correlation over the last dim (w in {0, 1}) and the teacher's sum of squares.

    ``corr = <u - u_mean, v - v_mean>_w / max(|u - u_mean|_w |v - v_mean|_w, eps)``.
    """
    n = w.sum(-1, keepdim=True).clamp_min(1)
    du = u - (u * w).sum(-1, keepdim=True) / n
    dv = v - (v * w).sum(-1, keepdim=True) / n
    ss_u, ss_v = (du * du * w).sum(-1), (dv * dv * w).sum(-1)
    corr = (du * dv * w).sum(-1) / (ss_u * ss_v).clamp_min(_EPS).sqrt()
    return corr, ss_u


def per_class_kl(z_t, z_s, valid, temperature: float, hard: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``T^2 KL(P^t_{b,c} || P^s_{b,c})`` [B, K] and which (b, c) count [B, K]; P_{b,c} = softmax over the valid
    pixels of channel c / T.

    With ``hard`` (one-hot z_t) P^t_{b,c} is uniform over the pixels labeled c, and absent classes are skipped.
    """
    m = valid[:, None, :]  # [B, 1, N]
    log_p_s = torch.log_softmax((z_s / temperature).masked_fill(~m, _NEG), -1)  # [B, K, N]
    if hard:
        count = (z_t * m).sum(-1)  # [B, K]
        p_t = z_t * m / count.clamp_min(1)[..., None]
        keep = count > 0
    else:
        p_t = torch.softmax((z_t / temperature).masked_fill(~m, _NEG), -1)
        keep = (valid.sum(-1) > 1)[:, None].expand(-1, z_t.shape[1])  # one pixel: both are the same delta
    kl = (torch.xlogy(p_t, p_t) - p_t * log_p_s).masked_fill(~m, 0.0).sum(-1)  # [B, K]
    return temperature ** 2 * kl, keep


def per_class_correlation(z_t, z_s, valid, hard: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``1 - Pearson_j(p^t_{b,c,j}, p^s_{b,c,j})`` [B, K] over valid pixels j (p = softmax over classes), and which
    (b, c) count [B, K]."""
    p_t = z_t if hard else torch.softmax(z_t, 1)
    p_s = torch.softmax(z_s, 1)
    w = valid[:, None, :].float()
    corr, ss_t = _pearson(p_t, p_s, w)  # [B, K]
    keep = (valid.sum(-1) > 1)[:, None] & (ss_t > _EPS)  # a constant teacher channel has no relation
    return 1.0 - corr, keep


def _pair_sum(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``sum_ij (a_i . a_j)(b_i . b_j)`` = ``|a^T b|_F^2`` per image: a, b [B, n, K] -> [B], without any n x n."""
    return (a.transpose(1, 2) @ b).pow(2).sum((1, 2))


def pairwise_relation(z_t, z_s, valid, distance: str, temperature: float,
                      hard: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Affinity ``A = Q Q^T`` [B, n, n] of the L2-normalised class-probability vectors Q [B, n, K] of the nodes.

    Per image [B]: kl ``T^2 mean_i KL(softmax_j(A^t_i. / T) || softmax_j(A^s_i. / T))`` over valid nodes i, j;
    correlation ``1 - Pearson(vec A^t, vec A^s)`` over pairs of valid nodes; and which images count [B]
    (at least 2 valid nodes).

    The KL row is computed as ``sum_j r^t log r^t - q^s_i . (R^t Q^s)_i / T + logsumexp_j(A^s_ij / T)`` with
    the teacher's rows R^t built without grad, so backward keeps two n x n tensors (A^s / T and R^t); the
    correlation never builds A at all: its pair sums are Gram matrices of Q (``sum_ij A^t_ij A^s_ij =
    |Q_t^T Q_s|_F^2``, ``sum_ij A_ij = |sum_i q_i|^2``), O(n K^2), in float64.
    """
    q_t = F.normalize((z_t if hard else torch.softmax(z_t, 1)).transpose(1, 2), dim=-1)  # [B, n, K]
    q_s = F.normalize(torch.softmax(z_s, 1).transpose(1, 2), dim=-1)
    n_valid = valid.sum(-1)  # [B]
    keep = n_valid > 1
    if distance == "kl":
        cols = valid[:, None, :]  # [B, 1, n]
        # 1/T goes on one [B, n, K] factor, and the fresh bmm outputs are masked in place: n x n passes are the cost
        with torch.no_grad():
            r_t = torch.softmax(((q_t / temperature) @ q_t.transpose(1, 2)).masked_fill_(~cols, _NEG), -1)  # [B, n, n]
            neg_entropy = torch.xlogy(r_t, r_t).sum(-1)  # [B, n]
        a_s = ((q_s / temperature) @ q_s.transpose(1, 2)).masked_fill_(~cols, _NEG)  # [B, n, n] = A^s / T
        cross = (q_s * (r_t @ q_s)).sum(-1) / temperature  # [B, n] = sum_j r^t_ij A^s_ij / T
        kl_rows = neg_entropy - cross + torch.logsumexp(a_s, -1)
        kl = (kl_rows * valid).sum(-1) / n_valid.clamp_min(1)  # [B]
        return temperature ** 2 * kl, keep
    w = valid[..., None].double()  # [B, n, 1]
    q_t, q_s = q_t.double() * w, q_s.double() * w  # invalid nodes drop out of every sum
    pairs = n_valid.double() ** 2
    s_t, s_s = q_t.sum(1).pow(2).sum(-1), q_s.sum(1).pow(2).sum(-1)  # [B] sum_ij A_ij
    var_t = _pair_sum(q_t, q_t) - s_t ** 2 / pairs.clamp_min(1)
    var_s = _pair_sum(q_s, q_s) - s_s ** 2 / pairs.clamp_min(1)
    cov = _pair_sum(q_t, q_s) - s_t * s_s / pairs.clamp_min(1)
    corr = cov / (var_t * var_s).clamp_min(_EPS).sqrt()
    return (1.0 - corr).float(), keep & (var_t > _EPS)


def relation_nodes(z_t, z_s, valid, cfg: IPixTermConfig):
    """The nodes the relation is computed on: every pixel (per_class) or at most ``max_nodes`` (pairwise).

    z_t, z_s [B, K, h, w]; valid [B, h, w] -> z_t, z_s [B, K, n]; valid [B, n].
    """
    if cfg.relation == "pairwise":
        return select_nodes(z_t, z_s, valid, cfg.max_nodes, cfg.node_select)
    return z_t.flatten(2), z_s.flatten(2), valid.flatten(1)


def relation_loss(z_t, z_s, valid, cfg: IPixTermConfig, hard: bool = False,
                  image_weight: torch.Tensor | None = None) -> torch.Tensor:
    """The relation loss on nodes from :func:`relation_nodes`: z_t, z_s [B, K, n] (z_t detached), valid [B, n].

    The mean over the (image, class) or image entries that count, each multiplied by its image's weight [B].
    """
    if cfg.relation == "pairwise":
        values, keep = pairwise_relation(z_t, z_s, valid, cfg.distance, cfg.temperature, hard)  # [B]
    elif cfg.distance == "kl":
        values, keep = per_class_kl(z_t, z_s, valid, cfg.temperature, hard)  # [B, K]
    else:
        values, keep = per_class_correlation(z_t, z_s, valid, hard)
    if image_weight is not None:
        values = values * image_weight.view(-1, *[1] * (values.dim() - 1))
    return _mean_kept(values, keep)


def ipix_loss(z_t, z_s, valid, cfg: IPixTermConfig, hard: bool = False,
              image_weight: torch.Tensor | None = None) -> torch.Tensor:
    """The relation loss of one view. z_t, z_s [B, K, h, w] (z_t detached); valid [B, h, w] bool."""
    return relation_loss(*relation_nodes(z_t, z_s, valid, cfg), cfg, hard, image_weight)


class IPixMatchModule(MethodModule):
    """No heads and no state: it only reports, per step, what the relation terms saw.

    ``nodes``: the most nodes per image any view used (pairwise: <= ``max_nodes``; per_class: the pixels at the
    term's resolution), ``valid_frac``: the share of those nodes that were confident and not padding.
    """

    def __init__(self):
        super().__init__()
        self._nodes, self._views, self._valid_sum = 0, 0, torch.zeros(())  # since the last diagnostics()

    def record(self, valid: torch.Tensor) -> None:
        """valid [B, n] bool: the nodes of one view."""
        self._nodes = max(self._nodes, valid.shape[-1])
        self._views += 1
        self._valid_sum = self._valid_sum.to(valid.device) + valid.float().mean().detach()

    def diagnostics(self) -> dict[str, torch.Tensor]:
        if not self._views:
            return {}
        diag = {"nodes": torch.tensor(float(self._nodes)), "valid_frac": self._valid_sum / self._views}
        self._nodes, self._views, self._valid_sum = 0, 0, torch.zeros(())
        return diag


def _term(view: str):
    def loss(out, cfg: IPixTermConfig, ctx, module: IPixMatchModule | None = None) -> torch.Tensor:
        z_t, z_s, valid, hard, share = view_tensors(out, view, cfg, ctx)
        z_t, z_s, valid = relation_nodes(z_t, z_s, valid, cfg)
        if module is not None:
            module.record(valid)
        return relation_loss(z_t, z_s, valid, cfg, hard, share if cfg.scale == "confident_share" else None)

    loss.__name__ = f"loss_ipix_{view}"
    loss.__doc__ = f"IPixMatch relation loss on view {view!r} (see the module docstring)."
    return loss


loss_ipix_s1, loss_ipix_s2, loss_ipix_fp, loss_ipix_x = (_term(v) for v in ("s1", "s2", "fp", "x"))


def build(terms, mctx) -> IPixMatchModule:
    """The family's module: no heads or state, only the diagnostics."""
    return IPixMatchModule()
