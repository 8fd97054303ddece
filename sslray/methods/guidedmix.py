"""GuidedMix-Net (Tu et al., AAAI 2022, arXiv 2112.14015; extended arXiv 2106.15064) as the family ``guidedmix``.

Labeled images guide the unlabeled ones: a labeled/unlabeled pair is mixed with a small labeled share
lambda, the labeled part is removed again from the mixed prediction ("decoupling"), and what remains is
used for the unlabeled image. The released code and the paper differ (``methods.md`` §5), so the term
``guidedmix`` has ``mode: code | paper``. Tags: [C] from the official code (yh-pengtu/GuidedMix-Net), [A]
from the abstracts, [I] a reconstruction made here (a named setting wherever there was a choice).

``mode: code`` (default; §5.2)::

    A_l, A_u = aspp(x_l), aspp(u_w)                        # the student's one forward on cat(x, u_w) [C]
    lam ~ U(0, min(lambda_max, 0.5)); pi = randperm(B)     # one lam per batch [C]
    A_mix = lam * A_l + (1 - lam) * A_u[pi]                # feature-level mixing after ASPP [C]
    A_mix = MITrans(A_mix)                                 # optional; off in every released config [C]
    z_mix = mix_head(A_mix)                                # a second head of the main head's shape, own weights [C]
    z_dec = z_mix - lam * z_l                              # z_l = the main head on x_l, NOT detached [C]
    L = focal_sigmoid(z_dec, onehot(argmax(sg(z_u[pi]))))  # gamma 0.5, alpha 0.5, mean over pixels x classes [C]

with weight 10 [C]. The code draws lam ~ Beta(1, 1), takes min(lam, 1 - lam) and redraws while
lam >= lambda_max: that is exactly U(0, min(lambda_max, 0.5)), drawn here in one step from the global torch
RNG (which the trainer seeds per rank and checkpoints, so runs are reproducible and resume exactly).
``detach_zl: true`` stops the decoupling's gradient into z_l [I, an ablation]. Attached (the code), the
focal term also trains the main head on x_l (its gradient there is -lam times the one on z_dec); the
review of December 2026 measured it at about 30 % of the labeled CE's gradient, of opposite sign, at init.

Head architecture (setting ``head``). The code builds the mixing head as a second, separately initialised
copy of its main decode head (mmseg's ASPPHead: 3x3 bottleneck conv-BN-ReLU 2560 -> 512, dropout 0.1, 1x1
``conv_seg``) and runs its part after the ASPP branches on A_mix, so z_mix comes out at the stride of z_l
(1/8) and ``z_mix - lam * z_l`` compares like with like [C]. Our model is DeepLabV3+: z_l is the decoder's
output at c1's stride (4 on DeepLabV3+, 2 on the small model), made from ``aspp`` and the reduced low-level
features ``low``. So:

- ``head: decoder`` (default; the code's "two identical heads" on our model): a copy of our decoder after
  ASPP, its own weights: the low-level features are mixed the same way (low_mix = lam * low_l + (1 - lam) *
  low_u[pi]), then the two 3x3 fuse convs on cat(low_mix, up(A_mix)), Dropout2d(``head_dropout``) and the
  1x1 classifier, at z_l's resolution. Costs about one more decoder pass on B_u images (no encoder).
- ``head: aspp`` (the old default, kept as an ablation): 3x3 conv-BN-ReLU (A -> D) -> Dropout2d -> 1x1
  classifier on A_mix at c4's stride (16; 8 on the small model), bilinearly upsampled (align_corners, as the
  decoder) to z_l's resolution. Cheaper, but z_mix is then a smooth upsampled map while z_l carries the
  decoder's stride-4 detail, so ``z_mix - lam * z_l`` cannot cancel the labeled share [I].

The mix head's classifier starts as mmseg's ``conv_seg``: normal(0, 0.01), zero bias (``cls_init: normal``;
``kaiming`` = the Kaiming fan-out init of our other convs). Its convs are Kaiming (fan-out, ReLU), BN weight
1, bias 0, as mmcv's ConvModule. Both heads use BatchNorm without running statistics: the head only ever runs
in training (evaluation uses the segmentation model alone), so there is no buffer to drift apart between DDP
ranks.

Other choices in code mode: the loss is computed at decoder resolution (the code: at the head's 1/8);
padding pixels of the unlabeled image (``ignore_mask_u == 255``) are left out of the mean (the code counts
every pixel; mmseg pads images with zeros) [I]; the target is the student's own main prediction on u_w,
detached, also under an EMA teacher [C: the code has no teacher]. The code needs equal labeled and
unlabeled batches (pair i = labeled i with unlabeled pi(i)); here there are always B_u pairs, the labeled
batch cycled (labeled ``j mod B_x`` with unlabeled pi(j)): identical to the code when B_x == B_u, every
unlabeled image used once otherwise [I]. The code uses no strong views; composed with UniMatch or FixMatch
the strong-view terms are added unchanged.

``mode: paper`` (§5.3 reconstruction, every detail [I] beyond the abstract [A])::

    pairs: each unlabeled image with the labeled image maximising cos(GAP(c4_u), GAP(c4_l)) (detached)
    x_mix = lam * x_l + (1 - lam) * u_w                    # image-level mixup, one extra student forward
    z_mix = logits(x_mix) [+ refine(MITrans(features(x_mix)))]   # optional MITrans on decoder features
    z_dec = (z_mix - lam * sg(z_l)) / (1 - lam)            # decoupling ("decouple: false": z_mix)
    p = (1 - fuse) * softmax(z_dec) + fuse * softmax(sg(f(u_w)))    # optional fusion with the teacher
    L = CE(f(u_w), argmax p) on pixels with max p >= pseudo_thresh, / valid pixels

``pseudo: self`` is plain self-training (the target is the teacher's own argmax, no mixed forward).
The pseudo mask is an argmax, so no gradient reaches the mixed forward through L (it runs under no_grad);
MITrans in paper mode is therefore trained by the separate term ``guidedmix_mix``, the mixup loss on the
mixed image, lam * CE(z_mix, y_l) + (1 - lam) * CE(z_mix, teacher mask, confident pixels) [I]. Its
refinement is residual: a zero-initialised 1x1 classifier on MITrans(features) is added to the student's
logits on x_mix, so it starts as the identity. The no-grad mixed forward runs the student in train mode
(batch statistics, as z_l was made) but leaves the student's BatchNorm running statistics untouched, so
mixup images never reach the statistics evaluation uses; with ``guidedmix_mix`` it is a training forward
(with gradient) and updates them like any other student forward [I].

MITrans (``mitrans: true``, both modes) [C module, unused in the released configs]: 3x3 conv-BN-ReLU ->
non-local block (embedded gaussian, reduction 2, scaled by 1/sqrt(C/2), zero-initialised output conv so it
starts as the identity, residual) -> 3x3 conv-BN-ReLU. Memory: the attention matrix is N x N/pool^2 per
image with N = h*w positions. Code mode mixes at the ASPP resolution: VOC crop 513 at stride 16 is
33^2 = 1,089 positions (1.2 M entries), stride 8 65^2 (18 M, 71 MB fp32). Paper mode works at decoder
resolution: crop 513 gives 129^2 = 16,641 positions, 277 M entries (1.1 GB fp32) per image, so set
``mitrans_pool`` (keys/values average-pooled by that factor: 2 -> 69 M, 4 -> 17 M). The attention runs in
``scaled_dot_product_attention``, which does not materialise the matrix where a fused kernel exists (CUDA
flash / memory-efficient, CPU flash).

Presets: ``guidedmix`` = supervised ``x`` + ``guidedmix`` (weight 10, code mode; L = L_x + 10 L_u as in the
code); ``guidedmix_paper`` = supervised + paper mode (weight 1). ``unimatch+guidedmix``,
``fixmatch+guidedmix``, ``meanteacher+guidedmix`` add the term to those methods unchanged; note that their
``global_div`` 2 also halves it (effective weight 5; set ``method.terms.guidedmix.weight: 20`` for 10).

Finding on the embedded synthetic default (issue 11; 32 labels, 1500 iterations, small model, seeds 0-2; the
code recipe of ``studies/methods_synthetic.yaml``): code mode scores 30.0 +- 0.4 mIoU against supervised 43.0 +-
3.1. ``studies/ablation_guidedmix.yaml``, run in full (``benchmarks/results/ablation_guidedmix_cpu2.csv``):
every single change recovers part of the gap and none reaches supervised: weight 1 37.6 +- 6.4, aspp mix head
36.6 +- 1.6, z_l detached 34.0 +- 7.4, no decoupling 33.8 +- 0.9, kaiming classifier 33.9, MITrans 33.9,
lambda_max 0.1 / 0.3 30.8 / 33.6; paper mode 36.8 +- 1.0, with random pairs 37.0, without decoupling 39.2 +- 2.2,
and plain self-training masks 37.9 +- 2.8 (paper mode's guidance adds nothing over self-training here). So no
single component is responsible: the unlabeled signal itself (the model's own unthresholded argmax on u as
target, at weight 10 from iteration 0, in code mode; a confidence-filtered self-training target in paper mode)
costs mIoU on this 64-px task, and the guided mixing does not repair it. Hypothesis, untested: without a strong
view or threshold the term is confirmation bias; the next row to run is code mode with a confidence threshold.
"""
from __future__ import annotations

import weakref
from contextlib import contextmanager, nullcontext

import torch
import torch.nn as nn
import torch.nn.functional as F

from sslray.layers import init_weights, upsample
from sslray.methods.base import MethodModule, ModuleContext, TermConfig, raise_problems
from sslray.methods.settings import GuidedMixConfig, check_guidedmix as check  # noqa: F401 - re-exported


# --------------------------------------------------------------------------------------------------
# pieces


def sigmoid_focal_loss(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor, gamma: float,
                       alpha: float) -> torch.Tensor:
    """Sigmoid focal loss against one-hot labels, mean over valid pixels x classes (mmcv's formula).

    logits [B, K, h, w]; target [B, h, w] long class indices; valid [B, h, w] bool. Per class with t = 1 for
    the target class: ``-alpha (1-p)^gamma log p`` if t else ``-(1-alpha) p^gamma log(1-p)``, p = sigmoid(z).
    Written with logsigmoid so the gradient stays finite where p saturates (gamma < 1 has an infinite
    derivative of pt^gamma at pt = 0).
    """
    z = logits.float()
    t = F.one_hot(target, z.shape[1]).permute(0, 3, 1, 2).to(z.dtype)  # [B, K, h, w]
    s = z * (1.0 - 2.0 * t)  # logit of the wrong answer: log pt = logsigmoid(s), CE = -logsigmoid(-s)
    weight = (alpha * t + (1.0 - alpha) * (1.0 - t)) * torch.exp(gamma * F.logsigmoid(s))
    loss = -weight * F.logsigmoid(-s) * valid.unsqueeze(1)
    return loss.sum() / (valid.sum() * z.shape[1]).clamp(min=1)


def sample_lambda(lambda_max: float) -> float:
    """The code's draw (Beta(1,1), min(lam, 1-lam), redrawn while >= lambda_max) = U(0, min(lambda_max, 0.5))."""
    return float(sample_lambda_tensor(lambda_max))


def sample_lambda_tensor(lambda_max: float) -> torch.Tensor:
    """:func:`sample_lambda` as a 0-dim float64 CPU tensor, the same draw of the global torch RNG and the same value:
    the step uses it as a scalar operand (float64, as the Python float was), so it never reads a value back."""
    return torch.rand(()).double() * min(lambda_max, 0.5)


def pair_indices(mode: str, feat_x: torch.Tensor, feat_u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(labeled index, unlabeled index) of the B_u pairs, both [B_u] long on the features' device.

    ``mode`` random: unlabeled in random order pi, labeled cycled (j mod B_x): the code's pairing when
    B_x == B_u. similarity: every unlabeled image with the labeled one of highest cosine similarity of
    globally average-pooled c4 features (feat_x [B_x, C, h, w], feat_u [B_u, C, h, w]; detached).
    """
    bx, bu, device = feat_x.shape[0], feat_u.shape[0], feat_u.device
    if mode == "similarity":
        gx = F.normalize(feat_x.detach().float().mean((2, 3)), dim=1)  # [B_x, C]
        gu = F.normalize(feat_u.detach().float().mean((2, 3)), dim=1)  # [B_u, C]
        return (gu @ gx.T).argmax(1), torch.arange(bu, device=device)
    return torch.arange(bu, device=device) % bx, torch.randperm(bu).to(device)


def _conv_bn_relu(cin: int, cout: int, k: int = 3) -> nn.Sequential:
    """conv -> BN (batch statistics only: the module never runs in eval) -> ReLU."""
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, bias=False),
                         nn.BatchNorm2d(cout, track_running_stats=False), nn.ReLU(inplace=True))


@contextmanager
def frozen_bn_stats(forward):
    """While inside, the student's BatchNorm layers normalise with batch statistics (train mode) but leave
    their running statistics and ``num_batches_tracked`` untouched (``track_running_stats`` off for the
    duration). ``forward`` is ``StepOutputs.student_forward``: the bound ``TeacherStudent.forward_student``
    (its ``student_module`` is the bare model, the same layers a DDP wrapper runs) or a module itself; any
    other callable has no layers to reach and runs unchanged."""
    model = getattr(getattr(forward, "__self__", None), "student_module", None)
    if model is None and isinstance(forward, nn.Module):
        model = forward
    layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
              and m.track_running_stats] if model is not None else []
    for m in layers:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in layers:
            m.track_running_stats = True


def _amp(t: torch.Tensor):
    """Run a head in the dtype its input came in (the step's autocast is over when terms run)."""
    if t.dtype in (torch.float16, torch.bfloat16):
        return torch.autocast(device_type=t.device.type, dtype=t.dtype)
    return nullcontext()


class NonLocal2d(nn.Module):
    """Embedded-gaussian non-local block (Wang et al. 2018; mmcv NonLocal2d, reduction 2, use_scale).

    y = softmax(theta(x) phi(x)^T / sqrt(C')) g(x), out = x + W(y) with W zero-initialised (an identity at
    start). ``pool`` > 1 average-pools x before phi and g: N queries attend over N/pool^2 keys.
    """

    def __init__(self, ch: int, reduction: int = 2, pool: int = 1):
        super().__init__()
        inter = max(ch // reduction, 1)
        self.theta, self.phi, self.g = (nn.Conv2d(ch, inter, 1) for _ in range(3))
        self.out = nn.Conv2d(inter, ch, 1)
        self.pool = pool
        for conv in (self.theta, self.phi, self.g):  # mmcv: normal(0, 0.01)
            nn.init.normal_(conv.weight, std=0.01)
            nn.init.zeros_(conv.bias)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, C, h, w] -> [B, C, h, w]."""
        b, _, h, w = x.shape
        kv = F.avg_pool2d(x, self.pool, ceil_mode=True) if self.pool > 1 else x  # [B, C, h', w']
        q = self.theta(x).flatten(2).transpose(1, 2)  # [B, N, C']
        k = self.phi(kv).flatten(2).transpose(1, 2)  # [B, M, C']
        v = self.g(kv).flatten(2).transpose(1, 2)  # [B, M, C']
        y = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]  # [B, N, C'], scale 1/sqrt(C')
        return x + self.out(y.transpose(1, 2).reshape(b, -1, h, w))


class MITrans(nn.Module):
    """The code's MITrans neck: 3x3 conv-BN-ReLU -> NonLocal2d -> 3x3 conv-BN-ReLU (``ch`` in and out)."""

    def __init__(self, ch: int, pool: int = 1):
        super().__init__()
        self.conv_in = _conv_bn_relu(ch, ch)
        self.conv_out = _conv_bn_relu(ch, ch)
        init_weights(self)
        self.nonlocal_block = NonLocal2d(ch, reduction=2, pool=pool)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, C, h, w] -> [B, C, h, w]."""
        return self.conv_out(self.nonlocal_block(self.conv_in(x)))


# --------------------------------------------------------------------------------------------------
# the family module


class GuidedMixModule(MethodModule):
    """The mixing head (code mode) or the residual refinement classifier (paper mode with MITrans), MITrans.

    Stateless apart from its parameters; the paper mode's mixed forward is cached for the step so that
    ``guidedmix`` and ``guidedmix_mix`` share one lam, one pairing and one extra forward.
    """

    def __init__(self, terms: dict[str, TermConfig], ctx: ModuleContext):
        super().__init__()
        raise_problems(check(terms))
        cfg = terms["guidedmix"]
        self.cfg = cfg
        self.train_mix = "guidedmix_mix" in terms
        dims, k = ctx.feature_dims, ctx.num_classes
        missing = [key for key in ("aspp", "features", "low") if key not in dims]
        if missing:
            raise ValueError(f"guidedmix: its heads are sized from the model's feature_dims, which lack {missing}; "
                             "pass model.feature_dims to build_method")
        self.pairing = cfg.pairing if cfg.pairing != "auto" else ("random" if cfg.mode == "code" else "similarity")
        self.head = self.fuse = self.refine = self.mitrans = None
        if cfg.mode == "code":
            a, d = dims["aspp"], dims["features"]
            self.mitrans = MITrans(a, cfg.mitrans_pool) if cfg.mitrans else None
            if cfg.head == "aspp":
                self.head = nn.Sequential(_conv_bn_relu(a, d), nn.Dropout2d(cfg.head_dropout), nn.Conv2d(d, k, 1))
            else:
                self.fuse = nn.Sequential(_conv_bn_relu(a + dims["low"], d), _conv_bn_relu(d, d))
                self.head = nn.Sequential(nn.Dropout2d(cfg.head_dropout), nn.Conv2d(d, k, 1))
                init_weights(self.fuse)
            init_weights(self.head)
            if cfg.cls_init == "normal":  # mmseg BaseDecodeHead: conv_seg ~ N(0, 0.01), bias 0
                nn.init.normal_(self.head[-1].weight, std=0.01)
                nn.init.zeros_(self.head[-1].bias)
        elif cfg.mitrans:
            d = dims["features"]
            self.mitrans = MITrans(d, cfg.mitrans_pool)
            self.refine = nn.Conv2d(d, k, 1)
            nn.init.zeros_(self.refine.weight)
            nn.init.zeros_(self.refine.bias)
        self._cache: tuple[weakref.ref, dict] | None = None
        self._diag: dict[str, torch.Tensor] = {}

    # ---- code mode

    def mix_logits(self, px: dict, pu: dict, lam: float | torch.Tensor, l_idx: torch.Tensor,
                   u_idx: torch.Tensor) -> torch.Tensor:
        """The mixing head on the mixed ASPP features: [n, K, h1, w1] at the decoder resolution of ``logits_low``."""
        a_mix = lam * px["aspp"][l_idx] + (1.0 - lam) * pu["aspp"][u_idx]  # [n, A, h4, w4]
        size = px["logits_low"].shape[-2:]
        with _amp(a_mix):
            if self.mitrans is not None:
                a_mix = self.mitrans(a_mix)
            if self.fuse is None:
                return upsample(self.head(a_mix), size)
            low_mix = lam * px["low"][l_idx] + (1.0 - lam) * pu["low"][u_idx]  # [n, L, h1, w1]
            return self.head(self.fuse(torch.cat([low_mix, upsample(a_mix, size)], dim=1)))

    def code_loss(self, out, ctx) -> torch.Tensor:
        cfg = self.cfg
        px, pu = out.part("x"), out.part("u_w")
        lam = sample_lambda_tensor(cfg.lambda_max)
        l_idx, u_idx = pair_indices(self.pairing, px["c4"], pu["c4"])
        z = self.mix_logits(px, pu, lam, l_idx, u_idx).float()  # [n, K, h1, w1]
        if cfg.decouple:
            z_l = px["logits_low"][l_idx].float()  # keeps its gradient unless detach_zl (the code: kept)
            z = z - lam * (z_l.detach() if cfg.detach_zl else z_l)
        target = pu["logits_low"][u_idx].detach().argmax(1)  # [n, h1, w1]
        pad = F.interpolate(out.ignore_mask_u[u_idx, None].float(), size=z.shape[-2:], mode="nearest")[:, 0]
        valid = pad != ctx.ignore_index
        with torch.no_grad():
            agree = ((z.argmax(1) == target) & valid).sum() / valid.sum().clamp(min=1)
            self._diag = {"lambda": lam.float(), "decoded_acc": agree}
        return sigmoid_focal_loss(z, target, valid, cfg.focal_gamma, cfg.focal_alpha)

    # ---- paper mode

    def paper_mix(self, out) -> dict:
        """lam, the pairs and the logits on x_mix [B_u, K, H, W] (with gradient only for ``guidedmix_mix``);
        computed once per step."""
        if self._cache is not None and self._cache[0]() is out:
            return self._cache[1]
        px, pu = out.part("x"), out.part("u_w")
        lam = sample_lambda_tensor(self.cfg.lambda_max)
        l_idx, u_idx = pair_indices(self.pairing, px["c4"], pu["c4"])
        x_mix = lam * out.img_x[l_idx] + (1.0 - lam) * out.img_u_w[u_idx]  # [B_u, 3, H, W]
        grad = self.train_mix and torch.is_grad_enabled()
        with torch.set_grad_enabled(grad), (nullcontext() if grad else frozen_bn_stats(out.student_forward)):
            m = out.student_forward(x_mix)
            z_mix = m["logits"]
            if self.mitrans is not None:
                with _amp(m["features"]):
                    z_mix = z_mix + upsample(self.refine(self.mitrans(m["features"])), z_mix.shape[-2:])
        mix = {"lam": lam, "l_idx": l_idx, "u_idx": u_idx, "z_mix": z_mix}
        self._cache = (weakref.ref(out), mix)
        return mix

    def paper_loss(self, out, ctx) -> torch.Tensor:
        cfg = self.cfg
        teacher = torch.softmax(out.logits_u_w_teacher.float(), 1)  # [B_u, K, H, W]
        if cfg.pseudo == "self":
            u_idx, prob = torch.arange(teacher.shape[0], device=teacher.device), teacher
            self._diag = {}
        else:
            mix = self.paper_mix(out)
            lam, l_idx, u_idx = mix["lam"], mix["l_idx"], mix["u_idx"]
            z = mix["z_mix"].detach().float()
            if cfg.decouple:
                z = (z - lam * out.part("x")["logits"][l_idx].detach().float()) / (1.0 - lam)
            prob = (1.0 - cfg.fuse) * torch.softmax(z, 1) + cfg.fuse * teacher[u_idx]
        conf, mask = prob.max(1)  # [B_u, H, W]
        valid = out.ignore_mask_u[u_idx] != ctx.ignore_index
        keep = valid & (conf >= cfg.pseudo_thresh)
        if cfg.pseudo != "self":
            changed = ((mask != out.mask_u_w[u_idx]) & valid).sum() / valid.sum().clamp(min=1)
            self._diag = {"lambda": lam.float(), "pseudo_changed": changed}
        ce = F.cross_entropy(out.pred_u_w[u_idx].float(), mask, reduction="none")
        return (ce * keep).sum() / valid.sum().clamp(min=1)

    def mixup_loss(self, out, ctx) -> torch.Tensor:
        """lam * CE(z_mix, y_l) + (1 - lam) * CE(z_mix, teacher mask of u, confident pixels)."""
        mix = self.paper_mix(out)
        lam, l_idx, u_idx, z = mix["lam"], mix["l_idx"], mix["u_idx"], mix["z_mix"].float()
        y = out.mask_x[l_idx]
        lab = y != ctx.ignore_index
        ce_l = F.cross_entropy(z, torch.where(lab, y, torch.zeros_like(y)), reduction="none")
        valid = out.ignore_mask_u[u_idx] != ctx.ignore_index
        keep = valid & (out.conf_u_w[u_idx] >= ctx.conf_thresh)
        ce_u = F.cross_entropy(z, out.mask_u_w[u_idx], reduction="none")
        # float32 weights (a float64 0-dim lam would promote these 0-dim terms to float64); 1 - lam in float64
        # first, as the Python float was
        return (lam.float() * (ce_l * lab).sum() / lab.sum().clamp(min=1)
                + (1.0 - lam).float() * (ce_u * keep).sum() / valid.sum().clamp(min=1))

    # ---- hooks

    @torch.no_grad()
    def after_step(self, out) -> None:
        self._cache = None  # drop the mixed forward's graph with the step

    def diagnostics(self) -> dict[str, torch.Tensor]:
        return dict(self._diag)


def loss_guidedmix(out, cfg: GuidedMixConfig, ctx, module: GuidedMixModule) -> torch.Tensor:
    return module.code_loss(out, ctx) if cfg.mode == "code" else module.paper_loss(out, ctx)


def loss_guidedmix_mix(out, cfg: TermConfig, ctx, module: GuidedMixModule) -> torch.Tensor:
    return module.mixup_loss(out, ctx)
