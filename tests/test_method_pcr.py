"""PCR (prototype-based consistency) and the U2PL entropy drop: hand-computed values on tiny tensors, masks,
gradients, the momentum update, k-means initialisation, checkpoints, DDP and a resumed fit."""
import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from sslray.config import ConfigError, ModelConfig, TrialConfig
from sslray.methods import build_method
from sslray.methods.base import ModuleContext
from sslray.models import build_model
from sslray.methods.pcr import (EntropyDropConfig, EntropyDropModule, PCRConfig, PCRModule, build_pcr,
                                grid_positions, loss_pcr_u, loss_pcr_x, loss_u_drop, percentile, proto_logits,
                                sample_features)
from sslray.teacher_student import StepOutputs, confidence
from sslray.trainer import Runtime, fit

from test_trainer import checkpoint, crash_then_resume, tiny

C, D = 2, 3  # classes, feature channels of the hand-built outputs


def module(**settings) -> PCRModule:
    """A prototype module on a D-channel feature map; every pixel sampled (grid >= map size), no warm-up."""
    cfg = PCRConfig(**{"feature": "features", "init": "random", "warmup_frac": 0.0, "sample_grid": 64, **settings})
    return PCRModule(cfg, ModuleContext(num_classes=C, iterations=10, feature_dims={"features": D}))


def outputs(feat_x, mask_x, feat_s1=None, mask_u=None, conf_u=None, ignore_u=None, iteration=0):
    """StepOutputs with student dicts for x (and s1): features [B, D, h, w]; labels at the same resolution.

    The CutMix box is empty and the teacher logits are built so that confidence() returns (conf_u, mask_u).
    """
    b, _, h, w = feat_x.shape
    out = StepOutputs(pred_x=torch.zeros(b, C, h, w, requires_grad=True), mask_x=mask_x, iteration=iteration)
    out.model_out["x"] = {"features": feat_x}
    out._parts["x"] = ("x", 0, None)
    if feat_s1 is not None:
        out.model_out["u_s"] = {"features": feat_s1}
        out._parts["s1"] = ("u_s", 0, None)
        p = conf_u[:, None] * F.one_hot(mask_u, C).permute(0, 3, 1, 2) + (1 - conf_u[:, None]) * (
            1 - F.one_hot(mask_u, C).permute(0, 3, 1, 2)) / (C - 1)
        out.logits_u_w_teacher = out.logits_u_w_mix_teacher = p.log()
        out.conf_u_w, out.mask_u_w = confidence(out.logits_u_w_teacher)
        out.conf_u_w_mix, out.mask_u_w_mix = out.conf_u_w, out.mask_u_w
        out.ignore_mask_u = out.ignore_mask_mix = ignore_u if ignore_u is not None else torch.zeros_like(mask_u)
        out.cutmix_box1 = torch.zeros_like(mask_u)
    return out


def feats(vectors):
    """A list of D-vectors -> a [1, D, 1, n] feature map (one image, one row of n pixels)."""
    return torch.tensor(vectors, dtype=torch.float32).t()[None, :, None, :].contiguous()


# ----------------------------------------------------------------------------------------------
# the prototype head and the sampler


def test_proto_logits_hand_computed():
    protos = torch.tensor([[1.0, 0.0], [0.0, 1.0],     # class 0: m=0, m=1
                           [-1.0, 0.0], [1.0, 1.0]])   # class 1: m=0, m=1
    feat = torch.tensor([[2.0, 0.0], [0.0, -3.0]])
    g, idx = proto_logits(feat, protos, num_protos=2, temperature=0.1)
    s = 1 / math.sqrt(2)
    # feat 0: class 0 -> cos 1 (m=0), class 1 -> max(-1, s) (m=1); feat 1: class 0 -> max(0, -1), class 1 -> max(0, -s)
    torch.testing.assert_close(g, torch.tensor([[1.0, s], [0.0, 0.0]]) / 0.1)
    assert idx.tolist() == [[0, 1], [0, 0]]


def test_grid_positions_one_pixel_per_cell_and_clamped():
    torch.manual_seed(0)
    rows, cols = grid_positions(3, 20, 12, 4, torch.device("cpu"))  # cells 5 x 3
    assert rows.shape == cols.shape == (3, 16)
    cell = (rows // 5) * 4 + cols // 3
    assert all(sorted(c.tolist()) == list(range(16)) for c in cell)  # every cell exactly once per image
    assert not torch.equal(rows[0], rows[1])  # images draw their own pixels
    rows, cols = grid_positions(1, 7, 5, 32, torch.device("cpu"))  # G clamped to the map: every pixel
    assert sorted((rows * 5 + cols)[0].tolist()) == list(range(35))


def test_sampler_bounded_at_crop_801():
    """DeepLabV3+ at crop 801 has a 201 x 201 decoder map: the head sees 32 x 32 pixels per image, not 40401."""
    rows, cols = grid_positions(2, 201, 201, 32, torch.device("cpu"))
    assert rows.shape == (2, 1024) and int(rows.max()) < 6 * 32 and int(cols.max()) < 6 * 32


def test_rep_clf_sampling_equals_upsample_then_index():
    g = torch.Generator().manual_seed(0)
    part = {"features": torch.randn(2, 5, 9, 7, generator=g), "low": torch.randn(2, 2, 9, 7, generator=g),
            "aspp": torch.randn(2, 4, 3, 2, generator=g)}
    rows, cols = grid_positions(2, 9, 7, 4, torch.device("cpu"))
    got = sample_features(part, rows, cols, "rep_clf")  # [2 * 16, 6]
    full = torch.cat((part["low"], F.interpolate(part["aspp"], (9, 7), mode="bilinear", align_corners=True)), 1)
    ref = torch.stack([full[b, :, rows[b], cols[b]].t() for b in range(2)]).reshape(32, 6)
    torch.testing.assert_close(got, ref)


def test_rep_clf_is_the_default_and_the_classifier_input():
    """PCR's prototype feature is rep_clf = cat(reduced c1, upsampled ASPP), the tensor its decoder classifier
    consumes (methods.md §6.2); here that is the input of the fuse convs of the real model."""
    assert PCRConfig().feature == "rep_clf"
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="small", width=16), C).eval()
    dims = model.feature_dims
    method = build_method(TrialConfig.from_dict({"method": {"name": "pcr"}}).method, C, feature_dims=dims)
    assert method.modules["pcr"].protos.shape == (C * 4, dims["low"] + dims["aspp"])
    seen = []
    hook = model.decoder.fuse.register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    hook.remove()
    fuse_in = seen[0]  # [B, low + aspp, h, w]
    b, d, h, w = fuse_in.shape
    rows, cols = grid_positions(b, h, w, 8, torch.device("cpu"))
    got = sample_features(out, rows, cols, "rep_clf")
    ref = torch.stack([fuse_in[i, :, rows[i], cols[i]].t() for i in range(b)]).reshape(-1, d)
    torch.testing.assert_close(got, ref)


# ----------------------------------------------------------------------------------------------
# the loss terms


def test_pcr_x_hand_computed_and_ignore():
    m = module(num_protos=1, temperature=0.5)
    m.protos.copy_(torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]))
    fx = feats([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 5.0]])
    mask = torch.tensor([[[0, 1, 255]]])
    loss = loss_pcr_x(outputs(fx, mask), m.cfg, _ctx(), m)
    s = 1 / math.sqrt(2)
    ce0 = -math.log(math.exp(2) / (math.exp(2) + 1))          # logits [1, 0] / 0.5
    ce1 = -math.log(math.exp(2 * s) / (2 * math.exp(2 * s)))  # logits [s, s] / 0.5
    assert loss.item() == pytest.approx((ce0 + ce1) / 2, rel=1e-6)  # the ignored pixel does not count


def _ctx():
    return build_method(TrialConfig.from_dict({"method": {"name": "fixmatch"}}).method, C).ctx


def test_pcr_u_confidence_ignore_and_zero_when_agreeing():
    m = module(num_protos=2, temperature=1e-3, confid_thresh=0.8)
    m.protos.copy_(torch.tensor([[1.0, 0, 0], [0, 0, 1.0], [0, 1.0, 0], [0, 0, -1.0]]))
    fs = feats([[2.0, 0, 0], [0, 3.0, 0], [0, 0, 1.0], [0, 4.0, 0]])
    mask_u = torch.tensor([[[0, 1, 0, 0]]])
    conf_u = torch.tensor([[[0.9, 0.95, 0.9, 0.5]]])
    out = outputs(feats([[1.0, 0, 0]]), torch.tensor([[[0]]]), fs, mask_u, conf_u)
    # Pixels 0-2 confident and matched by a prototype of their pseudo-class (pixel 2 by class 0's m=1): ~0.
    assert loss_pcr_u(out, m.cfg, _ctx(), m).item() == pytest.approx(0.0, abs=1e-6)
    # Pixel 3 disagrees (features of class 1) but is below the threshold; padding on pixel 1 keeps it out too.
    ignore = torch.tensor([[[0, 255, 0, 0]]])
    out = outputs(feats([[1.0, 0, 0]]), torch.tensor([[[0]]]), fs, torch.tensor([[[0, 0, 0, 0]]]), conf_u, ignore)
    assert loss_pcr_u(out, m.cfg, _ctx(), m).item() == pytest.approx(0.0, abs=1e-6)
    fs.requires_grad_()
    out = outputs(feats([[1.0, 0, 0]]), torch.tensor([[[0]]]), fs, torch.tensor([[[1, 1, 1, 1]]]),
                  torch.full_like(conf_u, 0.5))
    zero = loss_pcr_u(out, m.cfg, _ctx(), m)  # nothing confident: 0, finite, still differentiable
    assert zero.item() == 0.0 and zero.requires_grad


def test_gradient_reaches_student_features_not_prototypes():
    m = module(num_protos=2)
    fx = torch.randn(2, D, 4, 4, requires_grad=True)
    fs = torch.randn(2, D, 4, 4, requires_grad=True)
    mask_u = torch.randint(0, C, (2, 4, 4))
    out = outputs(fx, torch.randint(0, C, (2, 4, 4)), fs, mask_u, torch.full((2, 4, 4), 0.9))
    (loss_pcr_x(out, m.cfg, _ctx(), m) + loss_pcr_u(out, m.cfg, _ctx(), m)).backward()
    assert fx.grad.abs().sum() > 0 and fs.grad.abs().sum() > 0
    assert not m.protos.requires_grad and m.protos.grad is None and list(m.parameters()) == []
    assert not out.logits_u_w_teacher.requires_grad


def test_terms_are_zero_during_warmup():
    cfg = PCRConfig(feature="features", init="kmeans", warmup_frac=0.3)
    m = PCRModule(cfg, ModuleContext(num_classes=C, iterations=10, feature_dims={"features": D}))
    assert m.warmup_iters == 3 and not m.is_ready
    out = outputs(torch.randn(1, D, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long))
    assert loss_pcr_x(out, cfg, _ctx(), m).item() == 0.0


# ----------------------------------------------------------------------------------------------
# the momentum update and the initialisation


def test_momentum_update_hand_computed():
    m = module(num_protos=2, momentum=0.9, confid_thresh=0.8)
    p0 = torch.tensor([[1.0, 0, 0], [0, 0, 1.0], [0, 1.0, 0], [-1.0, -1.0, -1.0]])
    m.protos.copy_(p0)
    fx = feats([[2.0, 0, 0], [4.0, 1.0, 0], [0, 0, 3.0], [0, 5.0, 0], [1.0, 0, 0]])
    mask_x = torch.tensor([[[0, 0, 0, 1, 1]]])  # the last pixel is class 0 by features: wrong, not used
    fs = feats([[0, 2.0, 0], [0, 6.0, 0]])
    out = outputs(fx, mask_x, fs, torch.tensor([[[1, 1]]]), torch.tensor([[[0.9, 0.5]]]), iteration=5)
    m.after_step(out)
    expected = p0.clone()
    expected[0] = 0.9 * p0[0] + 0.1 * torch.tensor([3.0, 0.5, 0])   # class 0, m=0: pixels 0 and 1
    expected[1] = 0.9 * p0[1] + 0.1 * torch.tensor([0, 0, 3.0])     # class 0, m=1: pixel 2
    expected[2] = 0.9 * p0[2] + 0.1 * torch.tensor([0, 3.5, 0])     # class 1, m=0: pixel 3 and confident s1 px
    torch.testing.assert_close(m.protos, expected)                 # class 1, m=1: nothing, unchanged
    diag = m.diagnostics()
    assert diag["proto_acc"].item() == pytest.approx(4 / 5) and diag["conf_frac"].item() == pytest.approx(0.5)
    frozen = module(num_protos=2, momentum=1.0)
    frozen.protos.copy_(p0)
    frozen.after_step(out)
    torch.testing.assert_close(frozen.protos, p0)


def _clusters(seed, n=40):
    """Labeled features with two tight clusters per class: class 0 near e0 / e1, class 1 near e2 / -e0."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.tensor([[5.0, 0, 0], [0, 5.0, 0], [0, 0, 5.0], [-5.0, 0, 0]])
    which = torch.randint(0, 4, (n,), generator=g)
    f = centers[which] + 0.1 * torch.randn(n, D, generator=g)
    return f.t()[None, :, None, :].contiguous(), (which // 2)[None, None, :], centers


def test_kmeans_init_after_warmup_and_fifo_bank():
    cfg = PCRConfig(feature="features", num_protos=2, init="kmeans", warmup_frac=0.2, kmeans_pixels=30, sample_grid=64)
    make = lambda: PCRModule(cfg, ModuleContext(num_classes=C, iterations=10, feature_dims={"features": D}))  # noqa: E731
    torch.manual_seed(0)
    m = make()
    fx, y, centers = _clusters(0)
    m.after_step(outputs(fx, y, iteration=0))
    assert not m.is_ready and m.bank_n.tolist() == [int((y == 0).sum()), int((y == 1).sum())]
    # FIFO: the bank holds the newest 30 of a class, in push order modulo the capacity.
    last0 = fx[0, :, 0][:, y[0, 0] == 0].t()
    n0 = last0.shape[0]
    torch.testing.assert_close(m.bank[0, :n0], last0)
    fx2, y2, _ = _clusters(1)
    m.after_step(outputs(fx2, y2, iteration=1))  # end of the warm-up (2 iterations): k-means
    assert m.is_ready and m.bank.numel() == 0
    protos = m.protos.view(C, 2, D)
    for c in range(C):
        got = sorted(protos[c].tolist())
        want = sorted(centers[2 * c: 2 * c + 2].tolist())
        torch.testing.assert_close(torch.tensor(got), torch.tensor(want), atol=0.1, rtol=0)
    torch.manual_seed(0)
    again = make()
    again.after_step(outputs(fx, y, iteration=0))
    again.after_step(outputs(fx2, y2, iteration=1))
    assert torch.equal(again.protos, m.protos)  # seeded: deterministic


def test_kmeans_keeps_random_prototypes_of_unseen_classes():
    cfg = PCRConfig(feature="features", num_protos=3, init="kmeans", warmup_frac=0.1, sample_grid=64)
    m = PCRModule(cfg, ModuleContext(num_classes=C, iterations=10, feature_dims={"features": D}))
    p0 = m.protos.clone()
    m.after_step(outputs(feats([[1.0, 0, 0], [2.0, 0, 0]]), torch.tensor([[[0, 0]]])))  # class 1 never seen, 2 < M
    assert m.is_ready
    torch.testing.assert_close(m.protos[3:], p0[3:])
    assert {tuple(r) for r in m.protos[:3].tolist()} <= {(1.0, 0, 0), (2.0, 0, 0), (1.5, 0, 0)}


def test_state_dict_round_trip_with_freed_bank():
    cfg = PCRConfig(feature="features", num_protos=2, init="kmeans", warmup_frac=0.1, sample_grid=64)
    make = lambda: PCRModule(cfg, ModuleContext(num_classes=C, iterations=10, feature_dims={"features": D}))  # noqa: E731
    m = make()
    fx, y, _ = _clusters(0)
    m.after_step(outputs(fx, y, iteration=0))
    state = m.state_dict()
    assert state["bank"].numel() == 0 and int(state["ready"]) == 1
    fresh = make()
    assert fresh.bank.numel() > 0 and not fresh.is_ready
    fresh.load_state_dict(state)
    assert fresh.is_ready and fresh.bank.numel() == 0 and torch.equal(fresh.protos, m.protos)
    warm = make()  # and back: a warm-up checkpoint into a module whose bank is freed
    fresh.load_state_dict(warm.state_dict())
    assert fresh.bank.shape == warm.bank.shape and not fresh.is_ready


# ----------------------------------------------------------------------------------------------
# the U2PL entropy drop


def test_u_drop_hand_computed_and_schedule():
    mod = EntropyDropModule(iterations=10)
    assert mod.drop_fraction(0, 80.0) == pytest.approx(0.2) and mod.drop_fraction(5, 80.0) == pytest.approx(0.1)
    assert mod.drop_fraction(3, 100.0) == 0.0
    # 1 image, 5 pixels; teacher probabilities with increasing entropy; pixel 4 is padding.
    p1 = torch.tensor([0.99, 0.9, 0.8, 0.6, 0.7])
    logits_t = torch.stack((p1, 1 - p1)).log()[None, :, None, :]  # [1, 2, 1, 5]
    pred = torch.tensor([[2.0, 0.0, 1.0, -1.0, 0.0], [0.0, 1.0, 0.0, 0.0, 0.0]])[None, :, None, :]
    out = StepOutputs(pred_x=torch.zeros(1, 2, 1, 5), mask_x=torch.zeros(1, 1, 5, dtype=torch.long),
                      pred_u_s1=pred, logits_u_w_teacher=logits_t, logits_u_w_mix_teacher=logits_t,
                      ignore_mask_u=torch.tensor([[[0, 0, 0, 0, 255]]]), cutmix_box1=torch.zeros(1, 1, 5),
                      iteration=0)
    out.ignore_mask_mix = out.ignore_mask_u
    out.conf_u_w, out.mask_u_w = confidence(logits_t)
    out.conf_u_w_mix, out.mask_u_w_mix = out.conf_u_w, out.mask_u_w
    # alpha = 0.25 at t = 0 with drop_percent 75: the 75th percentile of the 4 valid entropies is
    # between the 3rd and 4th largest; only pixel 3 (p = 0.6, highest entropy) is at or above it.
    loss = loss_u_drop(out, EntropyDropConfig(drop_percent=75.0), _ctx(), mod)
    ce = [-math.log(math.exp(2) / (math.exp(2) + 1)), -math.log(1 / (1 + math.e)), -math.log(math.e / (math.e + 1))]
    assert loss.item() == pytest.approx(5 * sum(ce) / 3 ** 2, rel=1e-5)  # (B H W / kept) * mean_kept CE
    assert mod.diagnostics()["drop_frac"].item() == pytest.approx(0.25)
    ent = -(torch.stack((p1, 1 - p1)) * torch.stack((p1, 1 - p1)).log()).sum(0)[:4]
    assert percentile(ent, 75.0).item() == pytest.approx(float(torch.quantile(ent, 0.75)), rel=1e-6)


def _drop_outputs(iteration):
    """StepOutputs for u_drop: 1 image of 1 x 5 pixels, the student disagreeing with a confident teacher."""
    p1 = torch.tensor([0.99, 0.9, 0.8, 0.6, 0.7])
    logits_t = torch.stack((p1, 1 - p1)).log()[None, :, None, :]  # [1, 2, 1, 5]: pseudo-label 0 everywhere
    pred = torch.tensor([[0.0] * 5, [2.0] * 5])[None, :, None, :].requires_grad_()
    out = StepOutputs(pred_x=torch.zeros(1, 2, 1, 5), mask_x=torch.zeros(1, 1, 5, dtype=torch.long),
                      pred_u_s1=pred, logits_u_w_teacher=logits_t, logits_u_w_mix_teacher=logits_t,
                      ignore_mask_u=torch.zeros(1, 1, 5, dtype=torch.long), cutmix_box1=torch.zeros(1, 1, 5),
                      iteration=iteration)
    out.ignore_mask_mix = out.ignore_mask_u
    out.conf_u_w, out.mask_u_w = confidence(logits_t)
    out.conf_u_w_mix, out.mask_u_w_mix = out.conf_u_w, out.mask_u_w
    return out


def test_u_drop_gated_by_the_supervised_only_warmup():
    """U2PL/PCR sup_only_epoch: u_drop is 0 (and graph-connected) before the warm-up ends, then the CE is on."""
    cfg = TrialConfig.from_dict({"method": {"name": "pcr"}}).method
    m = build_method(cfg, C, feature_dims={"features": D, "low": 2, "aspp": D}, iterations=240)
    mod = m.modules["u2pl"]
    assert m.losses(_drop_outputs(0))["loss/u_drop"].item() == 0.0  # the default preset is gated
    assert cfg.terms["u_drop"].warmup_frac == pytest.approx(1 / 80)  # 1 of PCR's 80 VOC epochs
    assert mod.warmup_iters == 3
    for it in (0, 2):
        out = _drop_outputs(it)
        zero = loss_u_drop(out, cfg.terms["u_drop"], m.ctx, mod)
        assert zero.item() == 0.0 and zero.requires_grad, it
    for it in (3, 100):
        assert loss_u_drop(_drop_outputs(it), cfg.terms["u_drop"], m.ctx, mod).item() > 0.5, it
    off = EntropyDropConfig(warmup_frac=0.0)  # the gate switched off: on from iteration 0
    build = build_method(TrialConfig.from_dict({"method": {"name": "pcr_base",
                                                           "terms": {"u_drop": {"warmup_frac": 0.0}}}}).method,
                         C, iterations=240)
    assert build.modules["u2pl"].warmup_iters == 0
    assert loss_u_drop(_drop_outputs(0), off, m.ctx, build.modules["u2pl"]).item() > 0.5
    with pytest.raises(ConfigError, match=r"method\.terms\.u_drop\.warmup_frac: expected a value in \[0, 1\]"):
        TrialConfig.from_dict({"method": {"name": "pcr", "terms": {"u_drop": {"warmup_frac": 2}}}})


# ----------------------------------------------------------------------------------------------
# configuration and presets


def test_presets_compose():
    def terms(name):
        cfg = TrialConfig.from_dict({"method": {"name": name}}).method
        return cfg, {k: v.weight for k, v in cfg.terms.items()}

    cfg, w = terms("pcr")
    assert cfg.teacher.kind == "ema" and cfg.global_div == 1.0
    assert w == {"x": 1.0, "u_s1": 0.0, "u_drop": 1.0, "pcr_x": 1.0, "pcr_u": 1.0}
    cfg, w = terms("fixmatch+pcr")
    assert cfg.teacher.kind == "self" and cfg.global_div == 2.0 and w == {"x": 1, "u_s1": 1, "pcr_x": 1, "pcr_u": 1}
    _, w = terms("unimatch+pcr")
    assert w == {"x": 1, "u_s1": 0.25, "u_s2": 0.25, "u_fp": 0.5, "pcr_x": 1, "pcr_u": 1}


def test_supervised_term_is_ohem_as_pcr_and_in_the_paper_studies():
    """PCR's configs: OHEM (0.7, min_kept 100,000 per GPU of 2 images) on VOC and Cityscapes (methods.md §2, §6.2)."""
    from sslray.study import load_study

    for name in ("pcr", "pcr_base"):
        x = TrialConfig.from_dict({"method": {"name": name}}).method.terms["x"]
        assert (x.criterion, x.ohem_thresh, x.ohem_min_kept, x.weight) == ("ohem", 0.7, 400000, 1.0)  # batch 8
    assert TrialConfig.from_dict({"method": {"name": "fixmatch+pcr"}}).method.terms["x"].criterion == "ce"
    studies = os.path.join(os.path.dirname(__file__), "..", "studies")
    for study in ("voc_classic", "voc_blended", "cityscapes"):
        rows = [t.config for t in load_study(os.path.join(studies, f"{study}.yaml")).trials()
                if t.config.method.name == "pcr"]
        assert rows, study
        for c in rows:
            x = c.method.terms["x"]
            assert (x.criterion, x.ohem_thresh) == ("ohem", 0.7), study
            # PCR's 100,000 per GPU of 2 images on both datasets (cityscapes.yaml's paired method.name entry)
            assert x.ohem_min_kept == 100000 * c.data.batch_size_x // 2, study


def test_settings_validated_and_shared():
    with pytest.raises(ConfigError, match=r"method\.terms\.pcr_u\.momentum: expected a value in \[0, 1\], got 1\.5"):
        TrialConfig.from_dict({"method": {"name": "pcr", "terms": {"pcr_u": {"momentum": 1.5}}}})
    with pytest.raises(ConfigError, match=r"method\.terms\.pcr_x\.num_protos: expected an integer >= 1, got 0"):
        TrialConfig.from_dict({"method": {"name": "pcr", "terms": {"pcr_x": {"num_protos": 0}}}})
    with pytest.raises(ConfigError, match=r"method\.terms\.u_drop\.drop_percent: expected a value in \[0, 100\]"):
        TrialConfig.from_dict({"method": {"name": "pcr", "terms": {"u_drop": {"drop_percent": 120}}}})
    with pytest.raises(ConfigError, match=r"method\.terms\.pcr_x\.init: expected one of \['kmeans', 'random'\]"):
        TrialConfig.from_dict({"method": {"name": "pcr", "terms": {"pcr_x": {"init": "pickle"}}}})
    # shared settings that disagree: refused when the config is read (and by build_pcr itself)
    with pytest.raises(ConfigError, match=r"method\.terms\.pcr_u\.num_protos: 1 differs from method\.terms\.pcr_x"):
        TrialConfig.from_dict({"method": {"name": "pcr", "terms": {"pcr_u": {"num_protos": 1}}}})
    with pytest.raises(ValueError, match=r"method\.terms\.pcr_u\.num_protos: 1 differs from method\.terms\.pcr_x"):
        build_pcr({"pcr_x": PCRConfig(), "pcr_u": PCRConfig(num_protos=1)}, ModuleContext(C, feature_dims={"features": D}))
    cfg = TrialConfig.from_dict({"method": {"name": "pcr", "terms": {"pcr_x": {"weight": 0}}}}).method
    dims = {"features": 5, "low": 1, "aspp": D - 1}  # rep_clf (the default) = low + aspp channels = D
    m = build_method(cfg, C, feature_dims=dims)  # one term off: the other's settings rule alone
    assert set(m.modules) == {"pcr", "u2pl"} and m.modules["pcr"].protos.shape == (C * 4, D)
    assert isinstance(build_pcr({"pcr_u": PCRConfig(feature="rep_clf")},
                                ModuleContext(C, feature_dims={"low": 2, "aspp": 5})).protos, torch.Tensor)


# ----------------------------------------------------------------------------------------------
# DDP: ranks with different data keep identical prototypes (equal to one process on all the data)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_data(rank, step):
    g = torch.Generator().manual_seed(100 * rank + step)
    fx = torch.randn(2, D, 3, 3, generator=g).abs()
    y = torch.randint(0, C, (2, 3, 3), generator=g)
    fs = torch.randn(2, D, 3, 3, generator=g).abs()
    yu = torch.randint(0, C, (2, 3, 3), generator=g)
    return fx, y, fs, yu, torch.full((2, 3, 3), 0.9)


def _run_module(parts, result):
    cfg = PCRConfig(feature="features", num_protos=2, init="kmeans", warmup_frac=0.2, update_cond="all", momentum=0.5, sample_grid=8)
    torch.manual_seed(0)  # the trial seed: identical random prototypes on every rank
    m = PCRModule(cfg, ModuleContext(num_classes=C, iterations=10, feature_dims={"features": D}))
    for step in range(5):  # warm-up 2 iterations, k-means, 3 momentum updates
        data = [_ddp_data(r, step) for r in parts]
        fx, y, fs, yu, conf = (torch.cat(t) for t in zip(*data))
        torch.manual_seed(step)  # sampling RNG differs from rank to rank in training; here every pixel is sampled
        m.after_step(outputs(fx, y, fs, yu, conf, iteration=step))
    torch.save(m.protos, result)


def _ddp_worker(rank, world, port, result_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        _run_module([rank], os.path.join(result_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.ddp
def test_ddp_ranks_keep_identical_prototypes(tmp_path):
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"{r}.pt") for r in (0, 1))
    assert torch.equal(r0, r1)
    _run_module([0, 1], tmp_path / "single.pt")  # one process seeing both ranks' batches
    torch.testing.assert_close(r0, torch.load(tmp_path / "single.pt"), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# training


PCR_FIT = {"train.iterations": 6, "train.eval_every": 3, "method.conf_thresh": 0.5,
           "method.terms.pcr_x.warmup_frac": 0.34, "method.terms.pcr_u.warmup_frac": 0.34,
           "method.terms.pcr_x.confid_thresh": 0.4, "method.terms.pcr_u.confid_thresh": 0.4}


def test_resume_equals_uninterrupted_with_updating_prototypes(tmp_path):
    cfg = tiny(**{"method.name": "pcr", **PCR_FIT})
    full = []
    fit(cfg, Runtime(), lambda m, c: full.append(m), out_dir=str(tmp_path / "full"))

    _, resumed, mid = crash_then_resume(cfg, tmp_path, at=3)
    mid = mid["method"]
    a, b = checkpoint(tmp_path / "full"), checkpoint(tmp_path / "cut")
    assert int(mid["pcr.ready"]) == 1 and mid["pcr.bank"].numel() == 0  # initialised at iteration 2 of 6
    assert not torch.equal(mid["pcr.protos"], a["method"]["pcr.protos"])  # still moving after the checkpoint
    assert torch.equal(a["method"]["pcr.protos"], b["method"]["pcr.protos"])
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert resumed[-1]["train/loss"] == pytest.approx(full[-1]["train/loss"], rel=1e-6)
    last = full[-1]
    assert last["train/loss/pcr_u"] > 0 and 0 <= last["train/pcr/proto_acc"] <= 1
    assert 0 < last["train/u2pl/drop_frac"] < 0.2


@pytest.mark.parametrize("name", ["fixmatch+pcr", "unimatch+pcr"])
def test_composed_fit(name, tmp_path):
    reports = []
    fit(tiny(**{"method.name": name, **PCR_FIT, "train.eval_every": 6}), Runtime(),
        lambda m, c: reports.append(m), out_dir=str(tmp_path / "r"))
    last = reports[-1]
    assert last["train/loss/pcr_u"] > 0 and last["train/loss/pcr_x"] > 0 and "train/loss/u_s1" in last
    assert 0 <= last["train/pcr/conf_frac"] <= 1 and math.isfinite(last["train/loss"])


def test_ablation_study_variants_build():
    """Every row of studies/ablation_pcr.yaml builds its method (the shared prototype settings agree); the baseline
    is PCR's recipe: one supervised-only epoch (1,984 unlabeled / 8 = 248 iterations) before every unsupervised term,
    OHEM keeping PCR's 19 % of the labeled pixels, parameter-only EMA, U2PL's half-image CutMix as the strong view."""
    from sslray.study import load_study

    path = os.path.join(os.path.dirname(__file__), "..", "studies", "ablation_pcr.yaml")
    trials = [t for t in load_study(path).trials() if t.seed == 0]
    dims = build_model(ModelConfig(name="small"), C).feature_dims
    assert len(trials) == 14
    for t in trials:
        c = t.config
        assert c.train.iterations == 1500 and c.data.partition == "32"
        m = build_method(c.method, C, feature_dims=dims, iterations=c.train.iterations)
        if t.variant == "pcr":
            assert m.modules["pcr"].warmup_iters == m.modules["u2pl"].warmup_iters == (2016 - 32) // 8
            x = c.method.terms["x"]
            assert x.criterion == "ohem" and x.ohem_min_kept == round(100000 / (2 * 513 ** 2) * 8 * 64 ** 2)
            assert c.method.teacher.bn_stats == "forward" and c.method.mix_source == "roll"
            assert (c.data.aug.jitter_p, c.data.aug.gray_p, c.data.aug.blur_p) == (0, 0, 0)
            assert m.modules["pcr"].cfg.feature == "rep_clf"
        if t.variant == "-u_drop_warmup":
            assert m.modules["u2pl"].warmup_iters == 0 and m.modules["pcr"].warmup_iters == 248
