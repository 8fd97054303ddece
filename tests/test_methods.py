"""Loss terms and their composition, checked on hand-built tensors and against UniMatch's expressions."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from sslray.config import TeacherConfig, TrialConfig
from sslray.methods import METHOD_PRESETS, TERMS, NonFiniteLossError, build_method, list_methods
from sslray.methods.fixmatch import pseudo_label_ce
from sslray.methods.supervised import ohem_ce
from sslray.models import build_model
from sslray.teacher_student import EMATeacher, StepOutputs, confidence

K, B, H, W = 3, 2, 4, 5
FEATURE_DIMS = build_model(TrialConfig().model, K).feature_dims  # what family modules size their heads from


def method_cfg(name, **over):
    return TrialConfig.from_dict({"method": {"name": name, **over}}).method


def random_outputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g) * 2  # noqa: E731
    mask_x = torch.randint(0, K, (B, H, W), generator=g)
    mask_x[0, 0, :2] = 255
    ignore = torch.zeros(B, H, W, dtype=torch.long)
    ignore[:, -1, :] = 255
    ignore_mix = torch.zeros(B, H, W, dtype=torch.long)
    ignore_mix[:, :, -1] = 255
    box1 = (torch.rand(B, H, W, generator=g) > 0.5).float()
    box2 = (torch.rand(B, H, W, generator=g) > 0.5).float()
    t_w, t_mix = r(B, K, H, W), r(B, K, H, W)
    out = StepOutputs(pred_x=r(B, K, H, W), mask_x=mask_x, pred_u_w=t_w, pred_u_w_fp=r(B, K, H, W),
                      pred_u_s1=r(B, K, H, W), pred_u_s2=r(B, K, H, W), logits_u_w_teacher=t_w,
                      logits_u_w_mix_teacher=t_mix, ignore_mask_u=ignore, ignore_mask_mix=ignore_mix,
                      cutmix_box1=box1, cutmix_box2=box2)
    out.conf_u_w, out.mask_u_w = confidence(t_w)
    out.conf_u_w_mix, out.mask_u_w_mix = confidence(t_mix)
    return out


def unimatch_reference(o, thresh):
    """UniMatch's unimatch.py loss, transcribed term by term onto the same tensors."""
    criterion_l = nn.CrossEntropyLoss(ignore_index=255)
    criterion_u = nn.CrossEntropyLoss(reduction="none")
    mask_u_w_cutmixed1, conf_u_w_cutmixed1, ignore_mask_cutmixed1 = o.mask_u_w.clone(), o.conf_u_w.clone(), o.ignore_mask_u.clone()
    mask_u_w_cutmixed2, conf_u_w_cutmixed2, ignore_mask_cutmixed2 = o.mask_u_w.clone(), o.conf_u_w.clone(), o.ignore_mask_u.clone()
    mask_u_w_cutmixed1[o.cutmix_box1 == 1] = o.mask_u_w_mix[o.cutmix_box1 == 1]
    conf_u_w_cutmixed1[o.cutmix_box1 == 1] = o.conf_u_w_mix[o.cutmix_box1 == 1]
    ignore_mask_cutmixed1[o.cutmix_box1 == 1] = o.ignore_mask_mix[o.cutmix_box1 == 1]
    mask_u_w_cutmixed2[o.cutmix_box2 == 1] = o.mask_u_w_mix[o.cutmix_box2 == 1]
    conf_u_w_cutmixed2[o.cutmix_box2 == 1] = o.conf_u_w_mix[o.cutmix_box2 == 1]
    ignore_mask_cutmixed2[o.cutmix_box2 == 1] = o.ignore_mask_mix[o.cutmix_box2 == 1]
    loss_x = criterion_l(o.pred_x, o.mask_x)
    loss_u_s1 = criterion_u(o.pred_u_s1, mask_u_w_cutmixed1)
    loss_u_s1 = loss_u_s1 * ((conf_u_w_cutmixed1 >= thresh) & (ignore_mask_cutmixed1 != 255))
    loss_u_s1 = loss_u_s1.sum() / (ignore_mask_cutmixed1 != 255).sum().item()
    loss_u_s2 = criterion_u(o.pred_u_s2, mask_u_w_cutmixed2)
    loss_u_s2 = loss_u_s2 * ((conf_u_w_cutmixed2 >= thresh) & (ignore_mask_cutmixed2 != 255))
    loss_u_s2 = loss_u_s2.sum() / (ignore_mask_cutmixed2 != 255).sum().item()
    loss_u_w_fp = criterion_u(o.pred_u_w_fp, o.mask_u_w)
    loss_u_w_fp = loss_u_w_fp * ((o.conf_u_w >= thresh) & (o.ignore_mask_u != 255))
    loss_u_w_fp = loss_u_w_fp.sum() / (o.ignore_mask_u != 255).sum().item()
    loss = (loss_x + loss_u_s1 * 0.25 + loss_u_s2 * 0.25 + loss_u_w_fp * 0.5) / 2.0
    return loss, loss_x, loss_u_s1, loss_u_s2, loss_u_w_fp


@pytest.mark.parametrize("thresh", [0.0, 0.6, 0.95])
def test_unimatch_matches_reference(thresh):
    o = random_outputs(1)
    got = build_method(method_cfg("unimatch", conf_thresh=thresh), K).losses(o)
    ref = unimatch_reference(o, thresh)
    torch.testing.assert_close(got["loss"], ref[0])
    for key, r in zip(["loss/x", "loss/u_s1", "loss/u_s2", "loss/u_fp"], ref[1:]):
        torch.testing.assert_close(got[key], r)


def test_fixmatch_is_x_plus_s1_over_two():
    o = random_outputs(2)
    got = build_method(method_cfg("fixmatch", conf_thresh=0.5), K).losses(o)
    _, lx, ls1, _, _ = unimatch_reference(o, 0.5)
    torch.testing.assert_close(got["loss"], (lx + ls1) / 2)
    assert set(got) == {"loss", "loss/x", "loss/u_s1"}


def test_pseudo_label_ce_hand_computed():
    # One image, 2 classes, 4 pixels. Logits make conf = softmax max per pixel.
    pred = torch.tensor([[[[2.0, 0.0, 1.0, 0.0]], [[0.0, 0.0, 0.0, 3.0]]]])  # [1, 2, 1, 4]
    mask = torch.tensor([[[0, 1, 0, 1]]])
    conf = torch.tensor([[[0.99, 0.97, 0.5, 0.96]]])
    ignore = torch.tensor([[[0, 0, 0, 255]]])
    # Confident and valid: pixels 0 and 1; valid: pixels 0..2 -> denominator 3.
    ce0 = -math.log(math.exp(2) / (math.exp(2) + 1))
    ce1 = math.log(2)
    expected = (ce0 + ce1) / 3
    assert pseudo_label_ce(pred, mask, conf, ignore, 0.95).item() == pytest.approx(expected, rel=1e-6)


def test_confidence_mask_threshold_is_inclusive():
    pred = torch.zeros(1, 2, 1, 2)
    mask = torch.zeros(1, 1, 2, dtype=torch.long)
    ignore = torch.zeros(1, 1, 2, dtype=torch.long)
    conf = torch.tensor([[[0.95, 0.9499]]])
    assert pseudo_label_ce(pred, mask, conf, ignore, 0.95).item() == pytest.approx(math.log(2) / 2)


def test_zero_weight_term_is_not_computed_and_needs_shrink():
    cfg = TrialConfig.from_dict({"method": {"name": "unimatch"}}).with_overrides(
        ["method.terms.u_fp.weight=0", "method.terms.u_s2.weight=0"]).method
    m = build_method(cfg, K)
    assert set(m.active) == {"x", "u_s1"} and m.needs == {"u", "s1"}
    o = random_outputs(3)
    o.pred_u_w_fp = o.pred_u_s2 = None  # would crash if computed
    assert set(m.losses(o)) == {"loss", "loss/x", "loss/u_s1"}


def test_ohem_keeps_hardest_and_all_when_few():
    logits = torch.tensor([[[[4.0, 0.0, -4.0, 0.0]], [[0.0, 0.0, 0.0, 0.0]]]])  # [1, 2, 1, 4]
    target = torch.tensor([[[0, 0, 0, 255]]])
    # min_kept larger than valid pixels: plain CE over the 3 valid pixels.
    torch.testing.assert_close(ohem_ce(logits, target, 255, 0.7, 10), F.cross_entropy(logits, target, ignore_index=255))
    # min_kept=1, thresh 0.7: keep pixels whose p_true <= max(0.7, hardest) -> pixels 1 (p=.5) and 2 (p=.018).
    keep = torch.tensor([[[255, 0, 0, 255]]])
    torch.testing.assert_close(ohem_ce(logits, target, 255, 0.7, 1), F.cross_entropy(logits, keep, ignore_index=255))


def test_mse_term_zero_when_student_matches_teacher():
    o = random_outputs(4)
    o.cutmix_box1 = torch.zeros_like(o.cutmix_box1)
    o.pred_u_s1 = o.logits_u_w_teacher.clone()
    cfg = method_cfg("meanteacher", terms={"u_mse": {"weight": 100}})
    got = build_method(cfg, K).losses(o)
    assert got["loss/u_mse"].item() == pytest.approx(0.0, abs=1e-12)


def test_nonfinite_loss_names_the_term():
    o = random_outputs(5)
    o.pred_u_s1 = o.pred_u_s1.clone()
    o.pred_u_s1[0, 0, 0, 0] = float("nan")
    m = build_method(method_cfg("fixmatch", conf_thresh=0.0), K)
    losses = m.losses(o)
    with pytest.raises(NonFiniteLossError, match=r"iteration 7: term 'u_s1' = nan"):
        m.check_finite(losses, 7)


def test_ema_teacher_arithmetic():
    torch.manual_seed(0)
    student = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    ema = EMATeacher(student, TeacherConfig(kind="ema", ema_alpha=0.99, ema_warmup=True, bn_stats="ema"))
    w0 = ema.model[0].weight.clone()
    with torch.no_grad():
        student[0].weight.add_(1.0)
        student[1].running_mean.fill_(2.0)
    ema.update(student)  # k=0: alpha = min(1 - 1/1, .99) = 0 -> copy of the student
    torch.testing.assert_close(ema.model[0].weight, student[0].weight)
    torch.testing.assert_close(ema.model[1].running_mean, student[1].running_mean)
    prev = ema.model[0].weight.clone()
    with torch.no_grad():
        student[0].weight.add_(1.0)
    ema.update(student)  # k=1: alpha = 0.5
    torch.testing.assert_close(ema.model[0].weight, 0.5 * prev + 0.5 * student[0].weight)
    ema.updates = 500
    assert ema.alpha() == 0.99
    assert not torch.equal(w0, ema.model[0].weight)
    assert all(not p.requires_grad for p in ema.model.parameters())


def test_registry_consistency():
    assert list_methods() == list(METHOD_PRESETS)
    for name in METHOD_PRESETS:
        cfg = method_cfg(name)
        assert set(cfg.terms) <= set(TERMS)
        assert build_method(cfg, K, feature_dims=FEATURE_DIMS).active
