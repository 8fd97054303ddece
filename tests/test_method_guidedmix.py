"""GuidedMix-Net (family ``guidedmix``): focal loss, lambda and pairing, the code mode's mixing head and
decoupling, the paper mode's pseudo masks, MITrans, config errors, and training/resume through ``fit``."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from sslray.config import ConfigError, TrialConfig
from sslray.methods import build_method
from sslray.methods.base import ModuleContext, TermContext
from sslray.methods.guidedmix import (GuidedMixModule, NonLocal2d, pair_indices, sample_lambda,
                                      sigmoid_focal_loss)
from sslray.models import build_model, upsample
from sslray.teacher_student import StepOutputs, TeacherStudent, confidence
from sslray.trainer import Runtime, fit

from test_method_infra import _batches
from test_trainer import checkpoint, crash_then_resume, tiny

K = 3


def method_of(name, **over):
    cfg = TrialConfig.from_dict({"method": {"name": name, **over}, "model": {"width": 8}})
    return cfg, build_method(cfg.method, K, 255, build_model(cfg.model, K).feature_dims)


def real_step(name, bx=2, bu=3, amp=None, **over):
    """One shared step of the tiny model; returns (outputs, method)."""
    cfg = TrialConfig.from_dict({"method": {"name": name, **over}, "model": {"width": 8}})
    torch.manual_seed(0)
    model = build_model(cfg.model, K)
    method = build_method(cfg.method, K, 255, model.feature_dims)
    ts = TeacherStudent(model, cfg.method, method.needs, amp_dtype=amp)
    batch_x, batch_u, batch_mix = _batches(bx, bu)
    return ts.step(batch_x, batch_u, batch_mix, iteration=0), method


def fake_outputs(bx=2, bu=2, a=4, low=2, h4=2, h1=4, seed=0):
    """StepOutputs of a student 'forward' made of leaf tensors, so gradients can be read per entry."""
    g = torch.Generator().manual_seed(seed)
    leaf = lambda *s: torch.randn(*s, generator=g).requires_grad_()  # noqa: E731
    d = {"aspp": leaf(bx + bu, a, h4, h4), "low": leaf(bx + bu, low, h1, h1),
         "logits_low": leaf(bx + bu, K, h1, h1), "c4": torch.randn(bx + bu, 5, h4, h4, generator=g)}
    return StepOutputs(pred_x=None, mask_x=torch.zeros(bx, h1, h1, dtype=torch.long),
                       ignore_mask_u=torch.zeros(bu, h1, h1, dtype=torch.long), model_out={"x_u_w": d},
                       _parts={"x": ("x_u_w", 0, bx), "u_w": ("x_u_w", bx, None)}), d


# ----------------------------------------------------------------------------------------------
# pieces


def test_focal_hand_computed_and_masked():
    z = torch.tensor([[[[2.0, -1.0]], [[0.5, 3.0]]]])  # [1, 2 classes, 1, 2 pixels]
    target = torch.tensor([[[0, 1]]])
    sig = lambda v: 1 / (1 + math.exp(-v))  # noqa: E731

    def term(v, positive, gamma=0.5, alpha=0.5):  # mmcv: -a (1-p)^g log p | -(1-a) p^g log(1-p)
        p = sig(v)
        return -alpha * (1 - p) ** gamma * math.log(p) if positive else -(1 - alpha) * p ** gamma * math.log(1 - p)

    pix0, pix1 = term(2.0, True) + term(0.5, False), term(-1.0, False) + term(3.0, True)
    valid = torch.ones(1, 1, 2, dtype=torch.bool)
    torch.testing.assert_close(sigmoid_focal_loss(z, target, valid, 0.5, 0.5), torch.tensor((pix0 + pix1) / 4))
    valid[0, 0, 1] = False  # a padding pixel leaves the sum and the count
    torch.testing.assert_close(sigmoid_focal_loss(z, target, valid, 0.5, 0.5), torch.tensor(pix0 / 2))
    a = term(2.0, True, 2.0, 0.25) + term(0.5, False, 2.0, 0.25)
    torch.testing.assert_close(sigmoid_focal_loss(z, target, valid, 2.0, 0.25), torch.tensor(a / 2))
    none = torch.zeros_like(valid)
    assert float(sigmoid_focal_loss(z, target, none, 0.5, 0.5)) == 0.0


def test_focal_zero_when_prediction_agrees_and_gradient_finite_when_saturated():
    target = torch.randint(0, K, (2, 4, 4))
    onehot = F.one_hot(target, K).permute(0, 3, 1, 2).float()
    valid = torch.ones(2, 4, 4, dtype=torch.bool)
    assert float(sigmoid_focal_loss(60 * (2 * onehot - 1), target, valid, 0.5, 0.5)) < 1e-12
    z = (200 * (2 * onehot - 1)).requires_grad_()  # sigmoid is exactly 0/1 in float32 here
    sigmoid_focal_loss(z, target, valid, 0.5, 0.5).backward()
    assert torch.isfinite(z.grad).all()


def test_lambda_is_uniform_below_min_of_lambda_max_and_half():
    torch.manual_seed(0)
    lams = torch.tensor([sample_lambda(0.3) for _ in range(2000)])
    assert 0 <= float(lams.min()) and float(lams.max()) < 0.3 and abs(float(lams.mean()) - 0.15) < 0.01
    assert max(sample_lambda(0.9) for _ in range(200)) < 0.5  # min(lam, 1 - lam) caps it at 0.5


def test_pairing_random_cycles_labeled_and_similarity_picks_nearest():
    torch.manual_seed(0)
    l_idx, u_idx = pair_indices("random", torch.randn(2, 4, 2, 2), torch.randn(3, 4, 2, 2))
    assert l_idx.tolist() == [0, 1, 0] and sorted(u_idx.tolist()) == [0, 1, 2]
    fx = torch.eye(3)[:, :, None, None].expand(3, 3, 2, 2)  # labeled GAP features e0, e1, e2
    fu = torch.stack([fx[2] * 5, fx[0] + 0.1 * fx[1]])  # nearest: labeled 2, labeled 0
    l_idx, u_idx = pair_indices("similarity", fx, fu)
    assert l_idx.tolist() == [2, 0] and u_idx.tolist() == [0, 1]


# ----------------------------------------------------------------------------------------------
# code mode


@pytest.mark.parametrize("head", ["decoder", "aspp"])
@pytest.mark.parametrize("decouple", [True, False])
def test_code_loss_equals_manual_mix_head_and_decoupling(decouple, head):
    """Labeled batch 2, unlabeled 3: three pairs, labeled cycled; the loss is the focal loss of
    z_mix - lam * z_l against argmax of the permuted unlabeled prediction."""
    out, method = real_step("guidedmix", terms={"guidedmix": {"head_dropout": 0.0, "decouple": decouple,
                                                              "head": head}})
    module = method.modules["guidedmix"]
    torch.manual_seed(7)
    loss = method.losses(out)["loss/guidedmix"]
    torch.manual_seed(7)
    lam = float(torch.rand(())) * 0.5
    perm, l_idx = torch.randperm(3), torch.tensor([0, 1, 0])
    px, pu = out.part("x"), out.part("u_w")
    a_mix = lam * px["aspp"][l_idx] + (1 - lam) * pu["aspp"][perm]
    size = px["logits_low"].shape[-2:]
    if head == "aspp":
        z = upsample(module.head(a_mix), size)
    else:
        low_mix = lam * px["low"][l_idx] + (1 - lam) * pu["low"][perm]
        z = module.head(module.fuse(torch.cat([low_mix, upsample(a_mix, size)], 1)))
    if decouple:
        z = z - lam * px["logits_low"][l_idx]
    target = pu["logits_low"][perm].argmax(1)
    t = F.one_hot(target, K).permute(0, 3, 1, 2).float()
    p = torch.sigmoid(z)
    pt = (1 - p) * t + p * (1 - t)
    manual = (F.binary_cross_entropy_with_logits(z, t, reduction="none") * 0.5 * pt.sqrt()).mean()
    torch.testing.assert_close(loss, manual, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(module.diagnostics()["lambda"], torch.tensor(lam))


def test_code_gradient_reaches_features_and_z_l_but_not_the_target():
    out, d = fake_outputs()
    terms = {"guidedmix": TrialConfig.from_dict({"method": {"name": "guidedmix"}}).method.terms["guidedmix"]}
    module = GuidedMixModule(terms, ModuleContext(K, feature_dims={"aspp": 4, "features": 6, "low": 2}))
    module.code_loss(out, TermContext(0.95, 255, K)).backward()
    g = d["logits_low"].grad
    assert g[:2].abs().sum() > 0  # z_l (labeled, main head) is not detached, as in the code
    assert g[2:].abs().sum() == 0  # the unlabeled prediction is only the (detached) target
    assert d["aspp"].grad[:2].abs().sum() > 0 and d["aspp"].grad[2:].abs().sum() > 0


def test_default_mix_head_decodes_at_the_stride_of_z_l():
    """The code's two heads run at one stride, so z_mix - lam * z_l compares like with like; the old default
    (head: aspp) classified at c4's stride and upsampled."""
    for head, same in (({}, True), ({"head": "aspp"}, False)):
        out, method = real_step("guidedmix", terms={"guidedmix": head})
        module, shapes = method.modules["guidedmix"], []
        module.head[-1].register_forward_hook(lambda m, i, o: shapes.append(o.shape[-2:]))
        method.losses(out)
        assert (shapes == [out.part("x")["logits_low"].shape[-2:]]) == same


def test_default_mix_head_is_a_copy_of_the_main_decoder():
    """Given the main decoder's weights (fuse convs and classifier), the mix head reproduces the main
    prediction of the unlabeled image at lam = 0: the same layers at the same resolution."""
    cfg = TrialConfig.from_dict({"method": {"name": "guidedmix"}, "model": {"width": 8}})
    torch.manual_seed(0)
    model = build_model(cfg.model, K)
    module = build_method(cfg.method, K, 255, model.feature_dims).modules["guidedmix"]
    dec = model.decoder
    with torch.no_grad():
        for mine, main in ((module.fuse, dec.fuse), (module.head[-1], dec.classifier)):
            for p, q in zip(mine.parameters(), main.parameters(), strict=True):
                p.copy_(q)
        module.eval()  # dropout off; its BN always uses batch statistics, as the decoder's in train mode
        u = model(torch.randn(3, 3, 32, 32))
        perm = torch.tensor([2, 0, 1])
        z_mix = module.mix_logits(u, u, 0.0, perm, perm)
        main = dec(u["c1"][perm], u["c4"][perm])["logits_low"]  # the main head on the permuted batch alone
        torch.testing.assert_close(z_mix, main, rtol=1e-5, atol=1e-5)


def test_mix_classifier_starts_as_mmseg_conv_seg():
    def classifier(**over):
        cfg = TrialConfig.from_dict({"method": {"name": "guidedmix", "terms": {"guidedmix": over}}})
        dims = {"aspp": 16, "features": 64, "low": 8}
        torch.manual_seed(0)
        return GuidedMixModule(dict(cfg.method.terms), ModuleContext(K, feature_dims=dims)).head[-1]

    for head in ("decoder", "aspp"):
        conv = classifier(head=head)
        assert abs(float(conv.weight.detach().std()) - 0.01) < 0.002 and not conv.bias.any()  # N(0, 0.01), bias 0
    kaiming = classifier(cls_init="kaiming")  # fan_out = K: std sqrt(2 / K)
    assert abs(float(kaiming.weight.detach().std()) - math.sqrt(2 / K)) < 0.15


def test_detach_zl_stops_the_decoupling_gradient_into_the_labeled_prediction():
    for detach in (False, True):
        out, d = fake_outputs()
        cfg = TrialConfig.from_dict({"method": {"name": "guidedmix", "terms": {"guidedmix": {"detach_zl": detach}}}})
        module = GuidedMixModule(dict(cfg.method.terms),
                                 ModuleContext(K, feature_dims={"aspp": 4, "features": 6, "low": 2}))
        module.code_loss(out, TermContext(0.95, 255, K)).backward()
        g = d["logits_low"].grad
        assert (g is None or g.abs().sum() == 0) == detach  # unlabeled half: only the detached target
        assert d["aspp"].grad[:2].abs().sum() > 0  # the mixed features are trained either way


def test_code_padding_pixels_do_not_count():
    terms = {"guidedmix": TrialConfig.from_dict({"method": {"name": "guidedmix"}}).method.terms["guidedmix"]}
    module = GuidedMixModule(terms, ModuleContext(K, feature_dims={"aspp": 4, "features": 6, "low": 2}))
    ctx = TermContext(0.95, 255, K)
    losses = []
    for scale in (1.0, -50.0):  # change the unlabeled prediction (the target) only inside the padding
        out, d = fake_outputs()
        out.ignore_mask_u[:, :, 2:] = 255
        with torch.no_grad():
            d["logits_low"][2:, :, :, 2:] *= scale
        torch.manual_seed(3)
        losses.append(module.code_loss(out, ctx))
    torch.testing.assert_close(losses[0], losses[1])
    out, _ = fake_outputs()
    out.ignore_mask_u[:] = 255
    assert float(module.code_loss(out, ctx).detach()) == 0.0


@pytest.mark.parametrize("over", [{"head": "decoder", "mitrans": True, "mitrans_pool": 2}, {"pairing": "similarity"},
                                  {"head": "aspp", "mitrans": True}])
def test_code_variants_and_unequal_batches_train(over):
    out, method = real_step("guidedmix", bx=4, bu=2, terms={"guidedmix": over})
    losses = method.losses(out)
    losses["loss"].backward()
    assert torch.isfinite(losses["loss"])
    grads = [p.grad for p in method.modules.parameters()]
    assert all(g is not None for g in grads) or over.get("mitrans")  # MITrans' inner convs: zero-init output
    assert method.modules["guidedmix"].head[-1].weight.grad.abs().sum() > 0


def test_code_mode_under_bf16_autocast():
    out, method = real_step("unimatch+guidedmix", amp=torch.bfloat16, terms={"guidedmix": {"mitrans": True}})
    losses = method.losses(out)
    losses["loss"].backward()
    assert torch.isfinite(losses["loss"]) and losses["loss/guidedmix"].dtype == torch.float32


# ----------------------------------------------------------------------------------------------
# paper mode


def linear_paper_outputs(bx=2, bu=3, size=6, seed=0):
    """Outputs of a bias-free linear 'student' (1x1 conv): decoupling then recovers f(u) exactly."""
    g = torch.Generator().manual_seed(seed)
    conv = nn.Conv2d(3, K, 1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(K, 3, 1, 1, generator=g))
    forward = lambda img: {"logits": conv(img), "features": img, "c4": img}  # noqa: E731
    img_x, img_u = torch.randn(bx, 3, size, size, generator=g), torch.randn(bu, 3, size, size, generator=g)
    dx, du = forward(img_x), forward(img_u)
    pred_x, pred_u = dx["logits"].detach().requires_grad_(), du["logits"].detach().requires_grad_()
    model_out = {"x_u_w": {"logits": torch.cat([pred_x, pred_u]), "c4": torch.cat([img_x, img_u])}}
    out = StepOutputs(pred_x=pred_x, pred_u_w=pred_u, mask_x=torch.randint(0, K, (bx, size, size), generator=g),
                      logits_u_w_teacher=pred_u.detach(), ignore_mask_u=torch.zeros(bu, size, size, dtype=torch.long),
                      model_out=model_out, _parts={"x": ("x_u_w", 0, bx), "u_w": ("x_u_w", bx, None)},
                      img_x=img_x, img_u_w=img_u, student_forward=forward)
    out.conf_u_w, out.mask_u_w = confidence(out.logits_u_w_teacher)
    return out


def paper_module(**settings):
    cfg = TrialConfig.from_dict({"method": {"name": "guidedmix_paper", "terms": {"guidedmix": settings}}}).method
    return GuidedMixModule(dict(cfg.terms), ModuleContext(K, feature_dims={"aspp": 4, "features": 3, "low": 2}))


def test_paper_decoupling_recovers_the_unlabeled_prediction_of_a_linear_model():
    ctx = TermContext(0.95, 255, K)
    out = linear_paper_outputs()
    self_training = paper_module(pseudo="self").paper_loss(out, ctx)
    for pairing in ("similarity", "random"):
        torch.manual_seed(1)
        decoupled = paper_module(fuse=0.0, pairing=pairing).paper_loss(out, ctx)
        torch.testing.assert_close(decoupled, self_training)
    # the confidence too (the division by 1 - lam), seen through the fused, thresholded mask
    torch.manual_seed(1)
    fused = paper_module(fuse=0.5, pseudo_thresh=0.6).paper_loss(out, ctx)
    torch.testing.assert_close(fused, paper_module(pseudo="self", pseudo_thresh=0.6).paper_loss(out, ctx))
    torch.manual_seed(1)
    coupled = paper_module(fuse=0.0, decouple=False).paper_loss(linear_paper_outputs(), ctx)
    assert not torch.allclose(coupled, self_training)  # without decoupling the labeled share leaks in


def test_paper_gradient_only_into_the_unlabeled_prediction_and_masks_respected():
    ctx = TermContext(0.95, 255, K)
    out = linear_paper_outputs()
    paper_module().paper_loss(out, ctx).backward()
    assert out.pred_u_w.grad.abs().sum() > 0 and out.pred_x.grad is None
    assert float(paper_module(pseudo_thresh=1.0).paper_loss(linear_paper_outputs(), ctx).detach()) == 0.0
    out = linear_paper_outputs()
    out.ignore_mask_u[:] = 255
    assert float(paper_module().paper_loss(out, ctx).detach()) == 0.0
    out = linear_paper_outputs()
    with torch.no_grad():  # a confident student that agrees with its target: loss ~ 0
        out.pred_u_w.copy_(50 * F.one_hot(out.mask_u_w, K).permute(0, 3, 1, 2).float())
    out.logits_u_w_teacher = out.pred_u_w.detach()
    assert float(paper_module(pseudo="self").paper_loss(out, ctx).detach()) < 1e-12


def test_paper_no_grad_mixed_forward_leaves_the_students_bn_statistics():
    cfg = TrialConfig.from_dict({"method": {"name": "guidedmix_paper"}, "model": {"width": 8}})
    torch.manual_seed(0)
    model = build_model(cfg.model, K)
    method = build_method(cfg.method, K, 255, model.feature_dims)
    ts = TeacherStudent(model, cfg.method, method.needs)
    out = ts.step(*_batches(2, 3), iteration=0)
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}
    method.losses(out)
    assert "lambda" in method.modules["guidedmix"].diagnostics() and model.training  # the mixed forward ran
    after = model.state_dict()
    assert before and all(torch.equal(v, after[k]) for k, v in before.items())
    assert all(m.track_running_stats for m in model.modules() if isinstance(m, nn.BatchNorm2d))


def test_paper_mode_with_mitrans_and_mixup_term_shares_one_mixed_forward():
    out, method = real_step("guidedmix_paper", terms={"guidedmix": {"mitrans": True, "mitrans_pool": 2},
                                                      "guidedmix_mix": {"weight": 1.0}})
    calls = []
    forward = out.student_forward
    out.student_forward = lambda img: calls.append(img.shape) or forward(img)
    losses = method.losses(out)
    losses["loss"].backward()
    assert len(calls) == 1 and torch.isfinite(losses["loss"])
    assert method.modules["guidedmix"].refine.weight.grad.abs().sum() > 0  # trained through guidedmix_mix
    method.after_step(out)
    assert method.modules["guidedmix"]._cache is None


# ----------------------------------------------------------------------------------------------
# MITrans


def test_nonlocal_is_identity_at_init_and_equals_explicit_attention():
    torch.manual_seed(0)
    nl = NonLocal2d(4, reduction=2)
    x = torch.randn(2, 4, 3, 5)
    torch.testing.assert_close(nl(x), x)
    nn.init.normal_(nl.out.weight)
    q = nl.theta(x).flatten(2).transpose(1, 2)  # [B, N, 2]
    k, v = nl.phi(x).flatten(2), nl.g(x).flatten(2).transpose(1, 2)
    y = torch.softmax(q @ k / math.sqrt(2), -1) @ v  # [B, N, 2]
    torch.testing.assert_close(nl(x), x + nl.out(y.transpose(1, 2).reshape(2, 2, 3, 5)))


def test_nonlocal_pool_bounds_the_keys_at_a_large_map(monkeypatch):
    """201 x 201 map (crop 801 at stride 4): 40,401 queries attend over 51 x 51 = 2,601 pooled keys, so the
    attention holds 105 M entries per image instead of 1.6 G (shapes recorded; the product is not computed)."""
    seen = []

    def attention(q, k, v):  # [B, 1, N, C'], [B, 1, M, C'], [B, 1, M, C']
        seen.append((q.shape[2], k.shape[2]))
        return torch.zeros_like(q)

    monkeypatch.setattr(F, "scaled_dot_product_attention", attention)
    with torch.no_grad():
        y = NonLocal2d(4, reduction=2, pool=4)(torch.randn(1, 4, 201, 201))
    assert seen == [(201 * 201, 51 * 51)] and y.shape == (1, 4, 201, 201)


# ----------------------------------------------------------------------------------------------
# config, presets, state, training


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"method\.terms\.guidedmix\.lambda_max: expected a value in \(0, 1\]"):
        TrialConfig.from_dict({"method": {"name": "guidedmix", "terms": {"guidedmix": {"lambda_max": 0}}}})
    with pytest.raises(ConfigError, match=r"method\.terms\.guidedmix\.mode"):
        TrialConfig.from_dict({"method": {"name": "guidedmix", "terms": {"guidedmix": {"mode": "tpami"}}}})
    # inconsistent terms of the family: refused when the config is read, before anything is built
    with pytest.raises(ConfigError, match=r"method\.terms\.guidedmix_mix\.weight: needs the term guidedmix with mode "):
        TrialConfig.from_dict({"method": {"name": "guidedmix", "terms": {"guidedmix_mix": {"weight": 1.0}}}})
    with pytest.raises(ConfigError, match=r"method\.terms\.guidedmix\.mitrans: in paper mode"):
        TrialConfig.from_dict({"method": {"name": "guidedmix_paper", "terms": {"guidedmix": {"mitrans": True}}}})


def test_presets_standalone_and_composed():
    alone = TrialConfig.from_dict({"method": {"name": "guidedmix"}}).method
    assert set(alone.terms) == {"x", "guidedmix"} and alone.global_div == 1.0
    assert alone.terms["guidedmix"].weight == 10.0 and alone.terms["guidedmix"].mode == "code"
    for base, terms in (("unimatch", {"x", "u_s1", "u_s2", "u_fp"}), ("fixmatch", {"x", "u_s1"})):
        composed = TrialConfig.from_dict({"method": {"name": f"{base}+guidedmix"}}).method
        assert set(composed.terms) == terms | {"guidedmix"} and composed.global_div == 2.0
    assert TrialConfig.from_dict({"method": {"name": "guidedmix_paper"}}).method.terms["guidedmix"].mode == "paper"


def test_state_dict_round_trip():
    _, m1 = method_of("guidedmix", terms={"guidedmix": {"mitrans": True, "head": "decoder"}})
    torch.manual_seed(5)
    _, m2 = method_of("guidedmix", terms={"guidedmix": {"mitrans": True, "head": "decoder"}})
    a, b = m1.modules["guidedmix"], m2.modules["guidedmix"]
    b.load_state_dict(a.state_dict())
    out, _ = real_step("guidedmix")
    a.eval(), b.eval()
    args = (out.part("x"), out.part("u_w"), 0.3, torch.tensor([0, 1, 0]), torch.tensor([2, 0, 1]))
    torch.testing.assert_close(a.mix_logits(*args), b.mix_logits(*args))
    assert all(not k.endswith("running_mean") for k in a.state_dict())  # no BN statistics to drift across ranks


def test_fit_trains_the_mix_head_and_resume_equals_uninterrupted(tmp_path):
    cfg = tiny(**{"method.name": "guidedmix", "train.iterations": 4, "train.eval_every": 2})
    reports, first = [], {}

    def report(metrics, ckpt):
        reports.append(metrics)
        first.setdefault("method", torch.load(f"{ckpt}/state.pt", weights_only=False)["method"])

    full = fit(cfg, Runtime(), report, out_dir=str(tmp_path / "full"))
    assert "train/guidedmix/lambda" in reports[-1] and "train/loss/guidedmix" in reports[-1]
    state = torch.load(tmp_path / "full" / "checkpoint" / "state.pt", weights_only=False)["method"]
    key = "guidedmix.head.1.weight"  # the default (decoder) mix head: dropout, classifier
    assert not torch.equal(state[key], first["method"][key])

    resumed, _, _ = crash_then_resume(cfg, tmp_path, at=2)
    cut = checkpoint(tmp_path / "cut")["method"]
    for k in state:
        torch.testing.assert_close(cut[k], state[k], rtol=0, atol=0)
    assert resumed["val/confusion"] == full["val/confusion"]


def test_fit_paper_mode_with_mitrans_and_meanteacher(tmp_path):
    cfg = tiny(**{"method.name": "meanteacher+guidedmix_paper", "method.terms.guidedmix.mitrans": True,
                  "method.terms.guidedmix_mix.weight": 1.0, "train.iterations": 2, "train.eval_every": 2,
                  "run.checkpoint": False})
    out = fit(cfg, Runtime(), None, out_dir=str(tmp_path))
    assert math.isfinite(out.history[-1]["train/loss/guidedmix_mix"])


def test_ablation_study_baseline_is_the_code_and_every_row_builds():
    """studies/ablation_guidedmix.yaml: its base writes out the code's settings, which are the preset's
    defaults, and every row builds its method."""
    import os

    from sslray.study import load_study

    path = os.path.join(os.path.dirname(__file__), "..", "studies", "ablation_guidedmix.yaml")
    trials = [t for t in load_study(path).trials() if t.seed == 0]
    assert len(trials) == 14  # 13 rows + the code-mode weight-1 diagnostic
    preset = TrialConfig.from_dict({"method": {"name": "guidedmix"}}).method.terms["guidedmix"]
    assert trials[0].config.method.terms["guidedmix"] == preset
    dims = {"aspp": 8, "features": 8, "low": 4}
    rows = {(t.config.method.terms["guidedmix"].head, t.config.method.terms["guidedmix"].detach_zl) for t in trials}
    assert {("decoder", True), ("aspp", False)} <= rows
    for t in trials:
        build_method(t.config.method, K, 255, dims)
