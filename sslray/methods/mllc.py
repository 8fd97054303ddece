"""MLLC: Multi-Level Label Correction (Xiao et al., IEEE TMM 26, 2024; arXiv 2404.02065), as a family.

The paper rectifies pseudo-labels with graphs over pixels: a Semantic-Level Graph (feature affinities) and a
Class-Level Graph (label consistency), iterated for K rounds with a dynamic class threshold eta(t, c), trained
with a dynamic-weighted CE on every round and "intra-/inter-image" semantic losses [A/S]. The paper body was
not read; what follows is the official code's algorithm (``methods.md`` §7.2, [C]) in the efficient form of
§8.2, with every reconstructed choice [I] a named setting.

One graph round k (``GraphRound``), per image, on N = hg * wg nodes, input logits Z [N, C], features F [N, D]::

    conf, c = max/argmax softmax(Z)                                   no grad
    reliable = conf >= base_tau  or  conf >= eta(c)                   eta(c) = base_tau * N_t(c) / max N_t
    A = kNN(max(0, cos(F_i, F_j)), k + 1 per row); A <- A + A^T; A_hat = D^-1/2 A D^-1/2   (SLG, no grad)
    Z'  = A_hat Z                                                      gradient flows through Z
    Z'' = reliable * (0.2 Z' + 0.8 Z) + unreliable * (0.8 Z' + 0.2 Z)
    Z_k = Linear(C, C)(Linear(C, C)(Z''))                              the code's two 1x1 convs
    B_ij = cos(softmax(Z_k)_i, softmax(Z_k)_j) * [c_i = c_j]; B_hat = D^-1/2 B D^-1/2   (CLG, no grad)
    F_k = Linear(D, D)(ReLU(Linear(D, D)(B_hat F)))                    gradient flows through F

Exact reformulations keep it cheap [I]. Every piece of a round is per image, so the images of a view, and the
student's views ``x`` and ``s1`` together, run as one batch of rounds (the teacher's two views cannot join: the
step refines the mix partner before the weak view exists). The SLG's per-row (k+1)-th largest similarity comes
from ``np.partition`` on CPU, ``topk`` elsewhere, ties at the threshold kept as in the code. Up to
``DENSE_MAX_NODES`` (1,024) nodes it is kept dense, A + A^T = cos * (M + M^T) for the kept-entry mask M, with the
degrees apart; propagation is one ``bmm`` each way. Beyond, an edge list (about (k + 1) N edges per image)
propagates with index_add (its size grows with ties: see DENSE_MAX_NODES). Either is built a few images at a time
(``CHUNK`` similarity entries, one image from 512 nodes on), so the N x N blocks stay in cache and one N x N similarity is the largest tensor at large N. The CLG is low rank (``B = sum_c (onehot_c * q)(onehot_c * q)^T``), so ``B_hat F``
costs O(N C^2 D) and never forms an N x N matrix. Pooling to the graph grid is ``adaptive_avg_pool2d`` written
as two matmuls. All are checked against the dense §8.2 form, and batched against one image / one view at a time,
in the tests. Cost on one CPU thread, small model, 64 px, 8 + 8 images, 16 x 16 nodes (the studies' setting):
see ``benchmarks/results/loss_cost_cpu_small_mllc256.json``; about a third of the extra time is the kNN
selection itself (8 graphs per step: labeled, strong, teacher weak, mix partner, 2 rounds each).

Terms (family ``mllc``; a weight of 0 switches a component off):

    mllc_x      sum_k CE(Z_k, y) on the labeled batch, Z_k upsampled to the crop      [C: CE(pred1) + CE(pred2)]
    mllc_u      w * sum_k CE(Z_k(s1), y_hat), w = share of valid pixels whose teacher confidence >= 0.968
                ("threshold_uniform", a scalar, no per-pixel mask), on the student's strong view 1      [C]
    mllc_proto  sum over levels l = 0..K and over (labeled, GT) + (strong view, pseudo-label) of
                CE(cos(F_l, P_l) / 0.1, label), P_l the level's EMA class prototypes; from ``start``   [C]
    mllc_pair   the same sources and levels: mean over node pairs of BCE(clamp(cos(F_i, F_j)), [y_i = y_j]),
                on at most ``max_nodes`` sampled nodes per image; weight 0 in the preset (off in the code) [C]

The preset ``mllc`` is FixMatch (self teacher, ``(L_x + L_u) / 2``) plus these terms with the code's weights
(1, 1, 0.1, 0), so the code's ``L_x + L_u + 0.1 L_proto`` keeps its ratios under FixMatch's ``/ 2``. The base's
own ``x``/``u_s1`` terms supervise Z_0, the plain prediction (the code's CE(out) and CE(out_s)); ``u_s1`` keeps
FixMatch's per-pixel threshold where the code weighs CE(out_s) by w too. Composed presets add the terms to
their base: ``unimatch+mllc``, ``meanteacher+mllc`` (the rounds then run on the EMA teacher's outputs but are
the student's own, not averaged: the code's teacher is the network itself).

Settings. The graph is shared by all four terms and is configured on ``mllc_x`` (its rounds exist to be
supervised on labeled data, so MLLC without ``mllc_x`` is refused; ``rounds: 0`` removes the graph):

- ``rounds`` (K = 2 [C]; 0: no graph, ``mllc_x``/``mllc_u`` are 0 and the teacher is not refined),
  ``knn`` (20 [C], + self), ``base_tau`` (0.95 [C]), ``prop_reliable`` / ``prop_unreliable`` (0.2 / 0.8 [C]:
  the share of the propagated logits Z' for reliable / unreliable nodes).
- ``dynamic_thresh`` (true [C]): eta(c) = base_tau * N(c) / max N, N(c) the running (never reset) count of
  pixels with confidence >= base_tau and argmax c in the labeled predictions and the teacher's weak-view
  predictions (full resolution, padding and ignore pixels excluded [I]), summed over DDP ranks; eta = base_tau
  while nothing was counted [I]. false: eta = base_tau for every class (fixed threshold).
- ``class_graph`` (true [C]): false removes the CLG and the feature propagation (F_k = F_0 for every k).
- ``pseudo_from``: ``corrected`` (the code's ``pred2``: the teacher's logits are replaced by the last round's,
  upsampled, for every pseudo-label of the step, the base's included) or ``base`` (the plain teacher logits).
- ``graph_max_nodes`` (4096, §7.3 [I]): the decoder map (stride 4 for DeepLabV3+, 201 x 201 at crop 801) is
  average-pooled to the largest hg x wg <= graph_max_nodes keeping its aspect ratio; labels are sampled at
  the cell centres. The code ran at OS8 on 321 crops (1,681 nodes). Unpooled, the rounds' logits are upsampled
  to the crop exactly as the model upsamples its own. Pooled, ``pooled_output: residual`` (default [I]) adds
  the upsampled correction Z_k - Z_0 to the model's full-resolution logits (the same thing when nothing is
  pooled, keeping the decoder's detail when something is); ``direct`` upsamples Z_k itself (§7.3).
- ``proj_dim`` (0 = the decoder feature width, 256 on DeepLabV3+ as the code's ``layer6``): ``feat_proj``, a
  1x1 conv -> ReLU -> 1x1 conv head on the pooled decoder features, stands in for the code's second ASPP head
  (no GroupNorm/BatchNorm, so the module has no batch statistics to keep in sync across ranks) [I].
- ``class_init``: ``code`` (default [C]) is the official init: ``ResNet101.__init__`` re-draws every Conv2d of
  the model, G2Net's included, from normal(0, 0.01) after G2Net zeroed their biases, so both C x C convs and
  both D x D feature convs of every round start near zero. The rounds' logits then start near 0 (uniform
  softmax): with ``pseudo_from: corrected`` no pseudo-label passes a threshold and the weight w of ``mllc_u``
  is 0 until the rounds have learned from ``mllc_x``, an implicit warm-up. ``identity`` [I] starts both class
  convs at the identity (feature convs PyTorch's default), so the corrected logits are the propagated model
  logits from the first step; ``default`` is PyTorch's init for all four. ``feat_proj`` keeps PyTorch's init
  (it replaces a GroupNorm'ed ASPP head, whose scale the norm fixes).
- ``mllc_u.uniform_thresh`` (0.968 [C]); the denominator of w is the valid (non-padding) pixels [I].
- ``mllc_proto.temperature`` (0.1 [C]), ``momentum`` (0.99 [C]), ``start`` (0.125: the term is 0 before
  iteration ``round(start * train.iterations)``; the code starts at 2,000 of 16,000 Cityscapes iterations).
  One memory per level (the code updates only level 0's memory three times, a bug [I]); each memory is an EMA
  of the per-step class means of the labeled features (GT) and the teacher's weak-view features (labels:
  argmax of its last round), means over all DDP ranks; a class's first mean initialises it [I] (the code's
  ``PrototypeMemory`` is missing from the repo). Prototypes update from the first step on.
- ``mllc_pair.max_nodes`` (1,024 [I]): a uniform random subset of the valid nodes per image; ignore and
  padding pixels are left out (the code treats them as an extra class [C]).

Strong views are sslray's (colour/blur + CutMix, the mix partner's target pasted in the box); the code uses
ClassMix on Cityscapes and no mixing on VOC. Diagnostics (``train/mllc/...``): ``eta_min``, ``eta_mean``,
``reliable`` (share of reliable nodes over the step's graph rounds), ``corrected`` (share of the teacher's
graph nodes whose argmax the rounds changed), ``nodes`` (nodes per image of the largest graph of the step).

Graphs run in float32 with autocast off (a bf16 similarity would tie the kNN threshold). Under DDP the
module's gradients are averaged by the trainer and its counters and prototypes update from statistics summed
over ranks, so every rank holds the same state.

Result on the embedded synthetic default (issue 11; ``studies/methods_synthetic.yaml``: 32 labels, 1500
iterations, small model, 256 graph nodes, seeds 0 / 1 / 2). MLLC with the code's recipe (self teacher, plain sum,
weight decay 5e-4, prototype CE from 1/8, code init): 47.89 / 41.95 / 49.76 mIoU (46.5 +- 4.1) against supervised
39.66 / 45.84 / 43.49 (43.0 +- 3.1) and FixMatch (its base, at the synthetic default's recipe) 52.12 / 47.79 /
47.57 (49.2 +- 2.6): above supervised on average (below it on seed 1), below FixMatch on two seeds of three.
Added to UniMatch (``unimatch+mllc``): 62.80 / 47.29 / 49.73 (53.3 +- 8.3) against UniMatch's 48.6 +- 2.5.
``studies/ablation_mllc.yaml``, seed 0 only so far (``benchmarks/results/ablation_mllc_cpu2_seed0.csv``): full
47.9; K = 1 41.2, K = 0 (no graph, no proto) 46.6, -class_graph 48.3, -dynamic_thresh 45.9, -proto 47.3, +pair
39.2, pseudo-labels from the plain logits 46.3, identity init 44.7, FixMatch's "/ 2" 42.5. One seed cannot
separate rows within about 4 mIoU (MLLC's 3-seed std); +pair and one round instead of two cost 6-9. Step cost at these
256 nodes: +30 % over the UniMatch step (``benchmarks/results/loss_cost_cpu_small_mllc256.json``, median of three
runs).

    sslray train configs/synthetic_fixmatch.yaml --set method.name=mllc            # FixMatch + MLLC
    sslray train configs/synthetic_fixmatch.yaml --set method.name=unimatch+mllc --set method.terms.mllc_x.rounds=1
    sslray run studies/ablation_mllc.yaml                                           # each component off in turn
"""
from __future__ import annotations

import functools
import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from sslray.layers import upsample
from sslray.methods.base import MethodModule, ModuleContext, TermConfig, all_reduce_sum, raise_problems
from sslray.methods.settings import (MLLCGraphConfig, MLLCPairConfig, MLLCProtoConfig,  # noqa: F401 - re-exported
                                     MLLCUnsupConfig, check_mllc as check, out_of_range)

_EPS_DEG = 1e-10  # degree floor of the code's D^-1/2
_BCE_CLAMP = (1e-10, 1.0 - 1e-7)  # the code clamps cos to [1e-10, 1]; 1 - 1e-7 keeps log(1 - p) finite
CHUNK = 2 ** 18  # similarity entries knn_graph builds at a time (1 MiB fp32, about L2: 4 images at 256 nodes, 1 at
# 512 and beyond; larger chunks of N >= 512 leave the cache and are slower than one image at a time)
DENSE_MAX_NODES = 1024  # knn_graph's dense form up to this many nodes per image (one CPU thread, k = 20: 2x faster than
# the edge list with its backward at 256 nodes, 1.6x at 512, even at 1024 without ties; and its cost does not grow
# with ties: at the code's init the second round's features tie within a class, whole-class neighbourhoods, up to
# N^2 / C edges, 7x the edge list's step cost on the full 32 x 32 map)
DENSE_BUDGET = 2 ** 24  # and while the batch's dense A_hat, kept for the backward, has at most this many entries
# The kNN selection on a CPU tensor goes through numpy (``np.partition``, the uint8 transpose-add): 8x and 4x faster
# than torch there. Those ``.numpy()`` calls are the only host reads left in an MLLC step (3 per graph build), and
# they are not device synchronisations: a CPU tensor's memory is shared, not copied, and on a GPU the torch path
# (``topk``, ``torch.mul``) runs instead, reading nothing back. False forces the torch path on CPU as well.
NUMPY_ON_CPU = True


# --------------------------------------------------------------------------------------------------
# settings


# --------------------------------------------------------------------------------------------------
# graph pieces (all on flattened per-image nodes: [B, N, *])


def graph_grid(h: int, w: int, max_nodes: int) -> tuple[int, int]:
    """The largest (hg, wg) with hg * wg <= max_nodes and about the aspect ratio of (h, w); (h, w) if it fits."""
    if h * w <= max_nodes:
        return h, w
    hg = min(h, max(1, math.floor(h / math.sqrt(h * w / max_nodes))))
    return hg, min(w, max(1, max_nodes // hg))


@functools.lru_cache(maxsize=64)
def pool_matrix(n_in: int, n_out: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """[n_out, n_in]: row i averages ``adaptive_avg_pool``'s window floor(i n / m) .. ceil((i + 1) n / m)."""
    m = torch.zeros(n_out, n_in, dtype=torch.float64)
    for i in range(n_out):
        lo, hi = (i * n_in) // n_out, -(-(i + 1) * n_in // n_out)
        m[i, lo:hi] = 1.0 / (hi - lo)
    return m.to(device=device, dtype=dtype)


def grid_pool(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``F.adaptive_avg_pool2d(x, size)`` (x [B, K, h, w]; x itself when it already has that size) as two
    matmuls with the separable window-averaging matrices: the same windows and weights, to float rounding, and on
    CPU 2.5x faster forward and backward than the pooling kernel."""
    h, w = x.shape[-2:]
    if (h, w) == tuple(size):
        return x
    rows = pool_matrix(h, size[0], x.device, x.dtype)
    cols = pool_matrix(w, size[1], x.device, x.dtype)
    return torch.matmul(rows, torch.matmul(x, cols.T))


def kth_largest(sim: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th largest value of every row of sim [N, M] -> [N, 1].

    On CPU numpy's introselect (``np.partition``) is about 8x faster than ``torch.topk`` at N ~ 1e3; both
    return an element of the row, so ``sim >= kth`` keeps the k largest (and any ties, as the code does).
    """
    m = sim.shape[-1]
    if sim.device.type == "cpu" and NUMPY_ON_CPU:
        part = np.partition(sim.numpy(), m - k, axis=-1)[:, m - k: m - k + 1]
        return torch.from_numpy(part)
    return sim.topk(k, dim=-1).values[:, -1:]


class DenseGraph(NamedTuple):
    """A_hat = diag(d_inv) adj^T diag(d_inv) for a batch of images: adj [B, N, N] = A + A^T, d_inv [B, N]."""

    adj: torch.Tensor
    d_inv: torch.Tensor


class EdgeGraph(NamedTuple):
    """A_hat as the edges of A over the batch (node b * N + i): rows, cols [E] long, w [E] normalised weights."""

    rows: torch.Tensor
    cols: torch.Tensor
    w: torch.Tensor


def symmetric_knn_(sim: torch.Tensor, kth: torch.Tensor, use_numpy: bool | None = None) -> None:
    """sim [c, N, N] <- A + A^T in place: (A + A^T)_ij = cos_ij (M_ij + M_ji), M = sim >= kth [c, N, 1]."""
    if sim.device.type == "cpu" and NUMPY_ON_CPU if use_numpy is None else use_numpy:  # numpy's uint8 transpose-add and
        # mixed-type multiply are ~4x faster on CPU than torch's
        x = sim.numpy()
        keep = (x >= kth.numpy()).view(np.uint8)
        np.multiply(x, keep + keep.transpose(0, 2, 1), out=x)
    else:
        keep = (sim >= kth).view(torch.uint8)
        torch.mul(sim, keep + keep.transpose(1, 2), out=sim)


@torch.no_grad()
def knn_graph(f: torch.Tensor, k: int, chunk: int | None = None, dense: bool | None = None
              ) -> DenseGraph | EdgeGraph:
    """The normalised symmetric kNN affinity A_hat = D^-1/2 (A + A^T) D^-1/2 of features f [B, N, D], per image.

    Per image, A keeps the entries of ``max(0, cos(f_i, f_j))`` that are >= the (k+1)-th largest of their row
    (self included; ties kept, as in the code); D holds the row sums of A + A^T. Images are independent and
    are computed together:

    - dense (default when N <= ``DENSE_MAX_NODES`` and B N^2 <= ``DENSE_BUDGET``): one row selection over each
      chunk's rows, and A + A^T = cos * (M + M^T) for the kept-entry mask M (the cosine is symmetric), kept
      unnormalised with the degrees apart (:class:`DenseGraph`), so the N x N work is four passes and
      propagation one ``bmm`` each way.
    - else an edge list (:class:`EdgeGraph`, about (k + 1) N edges per image), one ``nonzero`` per chunk.

    Images are processed ``chunk`` at a time (default: as many as fit ``CHUNK`` similarity entries, at least
    one), each chunk with one batched similarity, so at most max(CHUNK, N^2) similarity entries exist at a
    time besides a dense result; ``chunk=1`` is the per-image computation.

    Both forms are the same matrix (to float rounding of the cosines and degree sums).
    """
    b, n, _ = f.shape
    fn = F.normalize(f, dim=-1)
    kk = min(k + 1, n)
    tiny = torch.finfo(fn.dtype).tiny  # a threshold <= 0 keeps the positive entries only: max(0, cos)
    step = max(1, chunk or CHUNK // (n * n))  # a few images at a time, so that their N x N stay in cache
    if dense if dense is not None else n <= DENSE_MAX_NODES and b * n * n <= DENSE_BUDGET:
        adj = fn.new_empty(b, n, n)
        for start in range(0, b, step):
            x = fn[start:start + step]
            sim = torch.bmm(x, x.transpose(1, 2), out=adj[start:start + step])  # [c, N, N]
            symmetric_knn_(sim, kth_largest(sim.view(-1, n), kk).clamp_min(tiny).view(-1, n, 1))
        # propagate() multiplies by adj^T (the fast bmm side), whose row sums are adj's column sums
        return DenseGraph(adj, adj.sum(1).clamp_min(_EPS_DEG).rsqrt())
    rows, cols, vals = [], [], []
    for start in range(0, b, step):
        x = fn[start:start + step]
        sim = torch.bmm(x, x.transpose(1, 2))  # [c, N, N]
        kth = kth_largest(sim.view(-1, n), kk).clamp_min(tiny)  # [c * N, 1]
        # over (image, row, col) of the chunk. A host sync on a GPU, and inherent to the edge list: the edge count
        # depends on the ties at the threshold (a fixed k + 1 per row would drop the code's tied neighbours); the
        # dense form (<= DENSE_MAX_NODES nodes, the default grids) has none
        flat = (sim.view(-1, n) >= kth).view(-1).nonzero().squeeze(1)
        node = flat // n  # row node within the chunk
        rows.append(node + start * n)
        cols.append(flat % n + (node // n + start) * n)
        vals.append(sim.view(-1).index_select(0, flat))
    rows, cols, vals = torch.cat(rows), torch.cat(cols), torch.cat(vals)
    deg = torch.zeros(b * n, dtype=vals.dtype, device=vals.device).index_add_(0, rows, vals).index_add_(0, cols, vals)
    d_inv = deg.clamp_min(_EPS_DEG).rsqrt()  # row sums of A + A^T
    return EdgeGraph(rows, cols, vals * d_inv.index_select(0, rows) * d_inv.index_select(0, cols))


def propagate(z: torch.Tensor, graph: DenseGraph | EdgeGraph) -> torch.Tensor:
    """``A_hat z`` for a graph of :func:`knn_graph`: z [B, N, C] -> [B, N, C] (differentiable in z)."""
    if isinstance(graph, DenseGraph):
        d = graph.d_inv.unsqueeze(-1)
        # (z^T adj)^T = adj^T z: a [C, N] x [N, N] product, ~4x faster on CPU than [N, N] x [N, C] at C << N
        return torch.bmm((z * d).transpose(1, 2), graph.adj).transpose(1, 2) * d
    rows, cols, w = graph
    b, n, c = z.shape
    flat = z.reshape(b * n, c)
    w = w.unsqueeze(1)
    out = torch.zeros_like(flat).index_add(0, rows, w * flat.index_select(0, cols))  # A: row i gathers its columns
    return out.index_add(0, cols, w * flat.index_select(0, rows)).view(b, n, c)  # A^T: and the rows that kept it


def class_softmax(z: torch.Tensor) -> torch.Tensor:
    """softmax over the classes of node logits z [B, N, C], taken along a strided dim (8x faster on CPU than
    along a last dim of a few classes, same values)."""
    return z.transpose(1, 2).softmax(1).transpose(1, 2)


def class_propagate(z_out: torch.Tensor, cls: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """``B_hat f`` with B_ij = cos(softmax(z_out)_i, softmax(z_out)_j) [cls_i = cls_j], D^-1/2 B D^-1/2.

    z_out [B, N, C] (no gradient is taken through it), cls [B, N] long, f [B, N, D] -> [B, N, D]. B is a sum
    over classes of rank-C blocks, so it is applied as ``g (g^T (d^-1/2 f))`` with g_i = onehot(cls_i) x q_i
    [B, N, C*C]. Probabilities are non-negative, so the code's max(0, cos) is the identity here.
    """
    with torch.no_grad():
        c = z_out.shape[-1]
        p = z_out.transpose(1, 2).softmax(1)  # [B, C, N]: reductions over a strided class dim (see class_softmax)
        q = (p / p.square().sum(1, keepdim=True).sqrt().clamp_min(1e-12)).transpose(1, 2)  # F.normalize, [B, N, C]
        onehot = F.one_hot(cls, c).to(q.dtype)  # [B, N, C]
        per_class = torch.bmm(onehot.transpose(1, 2), q)  # [B, C, C]: sum of q over the nodes of each class
        d_inv = (q * torch.bmm(onehot, per_class)).sum(-1).clamp_min(_EPS_DEG).rsqrt()  # [B, N]
        g = (onehot.unsqueeze(-1) * q.unsqueeze(-2)).flatten(2)  # [B, N, C*C]
    m = torch.bmm(g.transpose(1, 2), f * d_inv.unsqueeze(-1))  # [B, C*C, D]
    return torch.bmm(g, m) * d_inv.unsqueeze(-1)


class GraphRound(nn.Module):
    """One G2Net round: SLG label propagation with reliability gating, class conv, CLG feature propagation."""

    def __init__(self, num_classes: int, dim: int, class_graph: bool, class_init: str):
        super().__init__()
        self.class_conv = nn.Sequential(nn.Linear(num_classes, num_classes), nn.Linear(num_classes, num_classes))
        self.feat_conv = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, dim)) if class_graph else None
        if class_init == "code":  # ResNet101.__init__'s normal(0, 0.01) on every conv; G2Net zeroed the biases
            for layer in self.modules():
                if isinstance(layer, nn.Linear):
                    nn.init.normal_(layer.weight, 0.0, 0.01)
                    nn.init.zeros_(layer.bias)
        elif class_init == "identity":
            for layer in self.class_conv:
                nn.init.eye_(layer.weight)
                nn.init.zeros_(layer.bias)

    def forward(self, z: torch.Tensor, f: torch.Tensor, eta: torch.Tensor, cfg: MLLCGraphConfig
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """z [B, N, C], f [B, N, D], eta [C] -> (Z_k [B, N, C], F_k [B, N, D], reliable [B, N] bool)."""
        with torch.no_grad():
            conf, cls = class_softmax(z).max(-1)
            reliable = (conf >= cfg.base_tau) | (conf >= eta[cls])
            graph = knn_graph(f, cfg.knn)
            share = torch.where(reliable, cfg.prop_reliable, cfg.prop_unreliable).unsqueeze(-1)  # of Z'
        z_out = self.class_conv(share * propagate(z, graph) + (1 - share) * z)
        if self.feat_conv is None:
            return z_out, f, reliable
        return z_out, self.feat_conv(class_propagate(z_out.detach(), cls, f)), reliable


@dataclass
class Levels:
    """The rounds on one view, per image on the graph grid (hg, wg): node tensors [B, N, *], N = hg * wg."""

    dec: tuple[int, int]  # (h, w) of the decoder map
    size: tuple[int, int]  # (hg, wg): dec, or smaller when pooled to fit graph_max_nodes
    full: torch.Tensor  # [B, C, H, W] the model's own logits at full resolution
    base: torch.Tensor  # [B, N, C] Z_0 (logits_low on the graph grid)
    logits: list[torch.Tensor]  # K x [B, N, C]: Z_1 .. Z_K
    feats: list[torch.Tensor]  # (K + 1) x [B, N, D]: F_0 (feat_proj) .. F_K

    @property
    def last(self) -> torch.Tensor:
        return self.logits[-1] if self.logits else self.base

    @property
    def pooled(self) -> bool:
        return self.size != self.dec


def grid_index(full: int, dec: int, grid: int, device=None) -> torch.Tensor:
    """Full-resolution row (or column) under the centre of each graph cell: [grid] long.

    The decoder grid maps to the crop with ``align_corners=True`` (cell j at j (full - 1) / (dec - 1)); a
    pooled cell i covers decoder cells around (i + 0.5) dec / grid - 0.5.
    """
    centre = (torch.arange(grid, device=device, dtype=torch.float64) + 0.5) * dec / grid - 0.5
    return (centre * (full - 1) / max(dec - 1, 1)).round().clamp(0, full - 1).long()


# --------------------------------------------------------------------------------------------------
# the family module


class MLLCModule(MethodModule):
    """feat_proj, K graph rounds, the class counters N(c) and (with ``mllc_proto``) per-level prototypes.

    Buffers: ``class_counts`` [C] int64; ``protos`` [K + 1, C, D] and ``proto_seen`` [C] bool.
    """

    def __init__(self, graph: MLLCGraphConfig, unsup: MLLCUnsupConfig | None, proto: MLLCProtoConfig | None,
                 pair: MLLCPairConfig | None, ctx: ModuleContext):
        super().__init__()
        if "features" not in ctx.feature_dims:
            raise ValueError("mllc: needs the model's feature_dims['features'] (the decoder feature width)")
        self.g, self.unsup, self.proto, self.pair = graph, unsup, proto, pair
        self.num_classes, self.ignore_index = ctx.num_classes, ctx.ignore_index
        d_in = ctx.feature_dims["features"]
        dim = graph.proj_dim or d_in
        self.feat_proj = nn.Sequential(nn.Linear(d_in, dim), nn.ReLU(), nn.Linear(dim, dim))
        self.rounds = nn.ModuleList(GraphRound(ctx.num_classes, dim, graph.class_graph, graph.class_init)
                                    for _ in range(graph.rounds))
        self.register_buffer("class_counts", torch.zeros(ctx.num_classes, dtype=torch.long))
        with_protos = proto is not None
        self.register_buffer("protos", torch.zeros(graph.rounds + 1, ctx.num_classes, dim) if with_protos else None)
        self.register_buffer("proto_seen", torch.zeros(ctx.num_classes, dtype=torch.bool) if with_protos else None)
        self.proto_start = round(proto.start * ctx.iterations) if with_protos else None
        # per-step caches, cleared by after_step: the student's levels per view (for the step ``_step_out``)
        # and the teacher's per model dict (refine_teacher sees the dicts, not the step)
        self._step_out = None
        self._student: dict[str, Levels | None] = {}
        self._teacher: OrderedDict[int, tuple[dict, Levels]] = OrderedDict()
        self._reliable: list[torch.Tensor] = []
        self._corrected: list[torch.Tensor] = []
        self._nodes = 0
        self._diag: dict[str, torch.Tensor] = {}

    # ---- the rounds

    def eta(self) -> torch.Tensor:
        """Class thresholds [C]: base_tau * N(c) / max N (dynamic), else base_tau."""
        tau = self.g.base_tau
        if not self.g.dynamic_thresh:
            return torch.full((self.num_classes,), tau, device=self.class_counts.device)
        n = self.class_counts.double()
        top = n.max()
        return torch.where(top > 0, tau * n / top.clamp(min=1), torch.full_like(n, tau)).float()

    def run(self, d: dict[str, torch.Tensor]) -> Levels:
        """feat_proj and the K rounds on a model dict's ``logits_low`` [B, C, h, w] and ``features`` [B, D0, h, w]."""
        return self.run_views([d])[0]

    def run_views(self, dicts: list[dict[str, torch.Tensor]]) -> list[Levels]:
        """:meth:`run` on several model dicts of one decoder size at once: their images form one batch of rounds.

        Every piece of a round is per image (the pooling, feat_proj, both graphs, the class and feature convs;
        eta is this step's), so this is the per-dict computation, with one kNN graph build and one set of
        round ops for all of them instead of one per dict.
        """
        sizes = [d["logits_low"].shape[0] for d in dicts]
        dev = dicts[0]["logits_low"].device
        with torch.autocast(dev.type, enabled=False):
            h, w = dicts[0]["logits_low"].shape[-2:]
            size = graph_grid(h, w, self.g.graph_max_nodes)

            def nodes(key: str) -> torch.Tensor:  # the views' maps on the graph grid, one batch [B, K, N]
                maps = [grid_pool(d[key].float(), size) for d in dicts]
                return (torch.cat(maps) if len(maps) > 1 else maps[0]).flatten(2)

            base = z = nodes("logits_low").transpose(1, 2)  # [B, N, C]
            f = self.feat_proj(nodes("features").transpose(1, 2))  # [B, N, D]
            self._nodes = max(self._nodes, size[0] * size[1])
            eta = self.eta()
            zs, fs = [], [f]
            for rnd in self.rounds:
                z, f, reliable = rnd(z, f, eta, self.g)
                zs.append(z)
                fs.append(f)
                self._reliable.extend(r.float().mean().detach() for r in reliable.split(sizes))
        if len(dicts) == 1:
            return [Levels((h, w), size, dicts[0]["logits"], base, zs, fs)]
        parts = [t.split(sizes) for t in [base] + zs + fs]  # (split: one backward for all of a tensor's views)
        k = len(zs)
        return [Levels((h, w), size, d["logits"], p[0], list(p[1:k + 1]), list(p[k + 1:]))
                for d, p in zip(dicts, zip(*parts))]

    def to_full(self, z: torch.Tensor, lv: Levels) -> torch.Tensor:
        """Node logits [B, N, C] on the graph grid -> [B, C, H, W] at the view's full resolution (bilinear).

        Unpooled: upsampled exactly as the model upsamples ``logits_low``. Pooled, ``residual``: the model's own
        logits plus the upsampled correction Z - Z_0 (equal to the unpooled form when nothing was pooled, as
        upsampling is linear), so the pooling costs the correction's resolution, not the logits'; ``direct``: Z
        upsampled.
        """
        b, _, c = z.shape
        size = lv.full.shape[-2:]
        with torch.autocast(z.device.type, enabled=False):
            if not lv.pooled:
                return upsample(z.transpose(1, 2).reshape(b, c, *lv.size), size)
            residual = self.g.pooled_output == "residual"
            grid = (z - lv.base if residual else z).transpose(1, 2).reshape(b, c, *lv.size)
            up = F.interpolate(grid, size=tuple(size), mode="bilinear", align_corners=False)
            return lv.full.float() + up if residual else up

    def to_grid(self, labels: torch.Tensor, lv: Levels) -> torch.Tensor:
        """Full-resolution labels [B, H, W] -> the label under each graph cell's centre [B, N]."""
        (hh, ww), (h, w), (hg, wg) = labels.shape[-2:], lv.dec, lv.size
        rows, cols = grid_index(hh, h, hg, labels.device), grid_index(ww, w, wg, labels.device)
        return labels[:, rows][:, :, cols].flatten(1)

    def student(self, out, view: str) -> Levels | None:
        """The student's levels on one view of this step (computed once, with gradient); None if not computed.

        The first request of a step also runs the other student views this step's terms will ask for (``x``,
        and ``s1`` for ``mllc_u``/``mllc_pair``/an active ``mllc_proto``) when they have the same decoder
        size: one batch of rounds for all of them (:meth:`run_views`).
        """
        if self._step_out is not out:
            self._step_out, self._student = out, {}
        if view not in self._student:
            d = out.part(view)
            if d is None:
                self._student[view] = None
                return None
            batch = {view: d}
            for other in self._student_views(out):
                if other in self._student or other in batch:
                    continue
                e = out.part(other)
                if e is not None and all(e[k].shape[1:] == d[k].shape[1:] for k in ("logits_low", "features")):
                    batch[other] = e
            self._student.update(zip(batch, self.run_views(list(batch.values()))))
        return self._student[view]

    def _student_views(self, out) -> list[str]:
        """The student views this step's terms use: ``x`` always, ``s1`` for the unlabeled terms."""
        proto = self.proto is not None and out.iteration >= self.proto_start
        return ["x", "s1"] if self.unsup is not None or self.pair is not None or proto else ["x"]

    def teacher(self, d: dict[str, torch.Tensor]) -> Levels:
        """The rounds on a teacher model dict, without gradient (cached for the step)."""
        hit = self._teacher.get(id(d))
        if hit is not None and hit[0] is d:
            return hit[1]
        with torch.no_grad():
            lv = self.run(d)
        self._teacher[id(d)] = (d, lv)
        while len(self._teacher) > 4:  # the step's u_w and mix dicts; bounded if after_step is never called
            self._teacher.popitem(last=False)
        return lv

    def refine_teacher(self, model_out: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """The last round's logits [B, C, H, W] on the teacher's dict (``pseudo_from: corrected``)."""
        if self.g.pseudo_from == "base" or not self.rounds:
            return None
        with torch.no_grad():
            lv = self.teacher(model_out)
            self._corrected.append((lv.last.argmax(-1) != lv.base.argmax(-1)).float().mean())
            return self.to_full(lv.last, lv)

    # ---- losses

    def _ce(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Mean CE over pixels whose target is not ignore_index; 0 (graph-connected) when there are none."""
        loss = F.cross_entropy(logits.float(), target, ignore_index=self.ignore_index, reduction="sum")
        return loss / (target != self.ignore_index).sum().clamp(min=1)

    def loss_x(self, out) -> torch.Tensor:
        if not self.rounds:
            return out.pred_x.sum() * 0.0
        lv = self.student(out, "x")
        return sum(self._ce(self.to_full(z, lv), out.mask_x) for z in lv.logits)

    def strong_target(self, out) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Strong view 1's CutMixed teacher target: (labels with ignore_index on padding, conf, valid) [Bu, H, W]."""
        t = out.mixed_target(1)
        valid = t.ignore != 255
        return torch.where(valid, t.mask, torch.full_like(t.mask, self.ignore_index)), t.conf, valid

    def loss_u(self, out) -> torch.Tensor:
        if not self.rounds:
            return out.pred_u_s1.sum() * 0.0
        target, conf, valid = self.strong_target(out)
        weight = ((conf >= self.unsup.uniform_thresh) & valid).sum() / valid.sum().clamp(min=1)
        lv = self.student(out, "s1")
        return weight * sum(self._ce(self.to_full(z, lv), target) for z in lv.logits)

    def sources(self, out) -> list[tuple[Levels, torch.Tensor]]:
        """(levels, node labels [B, N]) of the labeled batch (GT) and of strong view 1 (pseudo-labels)."""
        lv = self.student(out, "x")
        found = [(lv, self.to_grid(out.mask_x, lv))]
        s1 = self.student(out, "s1")
        if s1 is not None:
            found.append((s1, self.to_grid(self.strong_target(out)[0], s1)))
        return found

    def loss_proto(self, out) -> torch.Tensor:
        if out.iteration < self.proto_start:
            return out.pred_x.sum() * 0.0
        protos = F.normalize(self.protos, dim=-1)  # [L, C, D]
        total = 0.0
        for lv, labels in self.sources(out):
            for level, f in enumerate(lv.feats):
                logits = F.normalize(f, dim=-1) @ protos[level].T / self.proto.temperature  # [B, N, C]
                total = total + self._ce(logits.flatten(0, 1), labels.flatten())
        return total

    def loss_pair(self, out) -> torch.Tensor:
        total = 0.0
        lo, hi = _BCE_CLAMP
        for lv, labels in self.sources(out):
            valid = labels != self.ignore_index
            sel = sample_nodes(valid, self.pair.max_nodes)  # [B, n]
            lab, ok = labels.gather(1, sel), valid.gather(1, sel)
            same = (lab.unsqueeze(2) == lab.unsqueeze(1)).float()  # [B, n, n]
            pairs = (ok.unsqueeze(2) & ok.unsqueeze(1)).float()
            for f in lv.feats:
                fs = F.normalize(f.gather(1, sel.unsqueeze(-1).expand(-1, -1, f.shape[-1])), dim=-1)
                p = torch.bmm(fs, fs.transpose(1, 2)).clamp(lo, hi)
                bce = -(same * p.log() + (1 - same) * (1 - p).log())
                total = total + (bce * pairs).sum() / pairs.sum().clamp(min=1)
        return total

    # ---- state

    @torch.no_grad()
    def after_step(self, out) -> None:
        """Prototype EMA per level and class counters N(c), from statistics summed over DDP ranks."""
        diag = {}
        if self._reliable:
            diag["reliable"] = torch.stack(self._reliable).mean()
            diag["nodes"] = torch.tensor(float(self._nodes))
        if self._corrected:
            diag["corrected"] = torch.stack(self._corrected).mean()
        t_u_w = out.model_out.get("t_u_w")
        if self.protos is not None:
            self._update_protos(out, t_u_w)
        counts = self._confident(out.pred_x, out.mask_x != self.ignore_index)
        if t_u_w is not None:
            counts += self._confident(t_u_w["logits"], out.ignore_mask_u != 255)
        self.class_counts += all_reduce_sum(counts)
        eta = self.eta()
        self._diag = {**diag, "eta_min": eta.min(), "eta_mean": eta.mean()}
        self._step_out, self._student = None, {}
        self._teacher.clear()
        self._reliable, self._corrected, self._nodes = [], [], 0

    def _confident(self, logits: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Pixels per class [C] with confidence >= base_tau among ``valid`` ones; logits [B, C, H, W]."""
        conf, cls = torch.softmax(logits.detach().float(), 1).max(1)
        hit = ((conf >= self.g.base_tau) & valid).long()  # counted with a scatter: a masked bincount reads a size
        return torch.zeros(self.num_classes, dtype=torch.long, device=cls.device).scatter_add_(0, cls.flatten(),
                                                                                                 hit.flatten())

    def _update_protos(self, out, t_u_w: dict | None) -> None:
        lv = self.student(out, "x")
        sources = [(lv, self.to_grid(out.mask_x, lv))]
        if t_u_w is not None:
            lt = self.teacher(t_u_w)
            pad = self.to_grid(out.ignore_mask_u, lt) == 255
            sources.append((lt, lt.last.argmax(-1).masked_fill(pad, self.ignore_index)))
        levels, c, dim = self.protos.shape
        sums = torch.zeros(levels, c, dim, device=self.protos.device)
        counts = torch.zeros(c, device=self.protos.device)
        for lv, labels in sources:  # every node, ignored ones adding 0 to class 0 (fixed size: no boolean index)
            keep = (labels != self.ignore_index).flatten()
            cls = torch.where(keep, labels.flatten(), torch.zeros_like(labels.flatten()))
            counts.index_add_(0, cls, keep.to(counts.dtype))
            for level, f in enumerate(lv.feats):
                f = f.detach().flatten(0, 1)
                sums[level].index_add_(0, cls, torch.where(keep[:, None], f, torch.zeros_like(f)))
        stats = all_reduce_sum(torch.cat([sums.flatten(), counts]))
        sums, counts = stats[:-c].view(levels, c, dim), stats[-c:]
        seen = counts > 0
        mean = sums / counts.clamp(min=1).view(1, c, 1)
        m = self.proto.momentum
        ema = torch.where(self.proto_seen.view(1, c, 1), m * self.protos + (1 - m) * mean, mean)
        self.protos.copy_(torch.where(seen.view(1, c, 1), ema, self.protos))
        self.proto_seen |= seen

    def diagnostics(self) -> dict[str, torch.Tensor]:
        return dict(self._diag)


def sample_nodes(valid: torch.Tensor, n: int) -> torch.Tensor:
    """Indices [B, min(n, N)] of nodes per image: all of them if N <= n, else n random ones, valid ones first."""
    b, total = valid.shape
    if total <= n:
        return torch.arange(total, device=valid.device).expand(b, -1)
    score = torch.rand(b, total, device=valid.device) + valid.float()  # valid in [1, 2), others in [0, 1)
    return score.topk(n, dim=1).indices


# --------------------------------------------------------------------------------------------------
# registration


def build(terms: dict[str, TermConfig], ctx: ModuleContext) -> MLLCModule:
    raise_problems(check(terms))
    return MLLCModule(terms["mllc_x"], terms.get("mllc_u"), terms.get("mllc_proto"), terms.get("mllc_pair"), ctx)


def loss_mllc_x(out, cfg, ctx, module: MLLCModule) -> torch.Tensor:
    return module.loss_x(out)


def loss_mllc_u(out, cfg, ctx, module: MLLCModule) -> torch.Tensor:
    return module.loss_u(out)


def loss_mllc_proto(out, cfg, ctx, module: MLLCModule) -> torch.Tensor:
    return module.loss_proto(out)


def loss_mllc_pair(out, cfg, ctx, module: MLLCModule) -> torch.Tensor:
    return module.loss_pair(out)
