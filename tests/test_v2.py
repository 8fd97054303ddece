"""UniMatch V2 and DINOv2: the timm DPT model, local checkpoints in both layouts, paired channel dropout, the EMA
schedule, the preset's loss, and one step of every founding method on top of V2 on a tiny DINOv2-shaped ViT."""
import pytest
import timm
import torch
import torch.nn.functional as F

from sslray.config import ConfigError, ModelConfig, TeacherConfig, TrialConfig
from sslray.dpt import BACKBONES, SIZES, build_vit, fit_size
from sslray.evaluate import predict
from sslray.layers import paired_channel_masks, upsample
from sslray.methods import build_method
from sslray.models import build_model
from sslray.teacher_student import EMATeacher, TeacherStudent
from sslray.trainer import _optimizer

from test_methods import K, random_outputs
from test_trainer import run, tiny

TINY_DPT = {"name": "dpt", "backbone": "dinov2_tiny"}


def dpt(backbone="dinov2_tiny", k=3, **over):
    torch.manual_seed(0)
    return build_model(ModelConfig(name="dpt", backbone=backbone, **over), k).eval()


# ---------------------------------------------------------------- the model


def test_every_backbone_name_is_a_timm_dinov2():
    names = set(timm.list_models("*dinov2*"))
    for b in BACKBONES:
        size, reg = b.split("_")[1], b.endswith("_reg4")
        spec = SIZES[size]
        if spec.timm_name is not None:
            assert spec.timm_name.format(reg="_reg4" if reg else "") in names, b
    assert SIZES["small"].indices == SIZES["base"].indices == (2, 5, 8, 11)  # V2's intermediate_layer_idx
    assert SIZES["large"].indices == (4, 11, 17, 23)


def test_vit_small_is_timms_dinov2_with_sdpa():
    vit = build_vit("dinov2_small_reg4")
    assert (vit.embed_dim, len(vit.blocks), vit.patch_embed.patch_size) == (384, 12, (14, 14))
    assert vit.num_prefix_tokens == 5 and all(b.attn.fused_attn for b in vit.blocks)


def test_attention_runs_through_sdpa(monkeypatch):
    calls = []
    real = F.scaled_dot_product_attention

    def counting(*a, **kw):
        calls.append(a[0].shape)
        return real(*a, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", counting)
    model = dpt()
    assert model.uses_sdpa
    model(torch.randn(1, 3, 42, 42))
    assert len(calls) == 4  # one per block of the tiny ViT


@pytest.mark.parametrize("hw", [(42, 42), (50, 37), (13, 100)])
@pytest.mark.parametrize("fit", ["resize", "pad"])
def test_any_input_size_gives_input_sized_logits(hw, fit):
    model = dpt(patch_fit=fit)
    out = model(torch.randn(2, 3, *hw), need_fp=True)
    fh, fw = fit_size(hw[0], fit), fit_size(hw[1], fit)
    assert fh % 14 == fw % 14 == 0
    assert out["logits"].shape == out["logits_fp"].shape == (2, 3, *hw)
    assert out["c4"].shape[-2:] == (fh // 14, fw // 14) and out["logits_low"].shape[-2:] == (8 * fh // 14, 8 * fw // 14)
    dims = model.feature_dims
    for key in ("features", "aspp", "low", "c1", "c4"):
        assert out[key].shape[1] == dims[key], key


def test_non_multiple_of_14_pad_equals_the_padded_input_cropped():
    model = dpt(patch_fit="pad")
    x = torch.randn(1, 3, 50, 37)
    with torch.no_grad():
        got = model(x)["logits"]
        ref = model(F.pad(x, (0, 42 - 37, 0, 56 - 50)))["logits"][..., :50, :37]
    torch.testing.assert_close(got, ref)


def test_non_multiple_of_14_resize_rounds_to_nearest_and_resizes_back():
    model = dpt(patch_fit="resize")
    x = torch.randn(1, 3, 50, 37)  # 50 / 14 = 3.6 -> 56; 37 / 14 = 2.6 -> 42 (V2: int(s / 14 + 0.5) * 14)
    with torch.no_grad():
        got = model(x)["logits"]
        low = model(upsample(x, (56, 42)))["logits_low"]
    torch.testing.assert_close(got, upsample(low, (50, 37)))


@pytest.mark.parametrize("mode", ["sliding_window", "sliding_window_v2"])
def test_sliding_window_with_crops_that_are_not_multiples_of_14(mode):
    model = dpt()
    scores = predict(model, torch.randn(1, 3, 61, 90), mode, 40, 3)
    assert scores.shape == (1, 3, 61, 90) and torch.isfinite(scores).all()


def test_dpt_needs_a_dinov2_backbone():
    with pytest.raises(ConfigError, match=r"model\.backbone: model dpt needs one of"):
        TrialConfig.from_dict({"model": {"name": "dpt"}})
    with pytest.raises(ConfigError, match=r"model\.patch_fit"):
        TrialConfig.from_dict({"model": {**TINY_DPT, "patch_fit": "crop"}})


# ---------------------------------------------------------------- checkpoints


def meta_layout(vit):
    """What Meta's DINOv2 ``.pth`` holds for this timm model: ``mask_token``, ``register_tokens``, and a
    ``pos_embed`` with the class position (timm folds that into ``cls_token`` for register models)."""
    sd = {k: v.clone() for k, v in vit.state_dict().items()}
    c = vit.embed_dim
    meta = {k: v for k, v in sd.items() if k not in ("reg_token", "cls_token", "pos_embed")}
    meta["mask_token"] = torch.zeros(1, c)
    if "reg_token" in sd:
        cls_pos = torch.randn(1, 1, c)
        meta["register_tokens"] = sd["reg_token"]
        meta["pos_embed"] = torch.cat([cls_pos, sd["pos_embed"]], 1)
        meta["cls_token"] = sd["cls_token"] - cls_pos[:, 0]
    else:
        meta["pos_embed"], meta["cls_token"] = sd["pos_embed"], sd["cls_token"]
    return sd, meta


@pytest.mark.parametrize("backbone", ["dinov2_tiny", "dinov2_tiny_reg4"])
@pytest.mark.parametrize("layout", ["meta", "timm"])
def test_local_checkpoint_loads_in_both_layouts(backbone, layout, tmp_path):
    torch.manual_seed(1)
    src = build_vit(backbone)
    for p in src.parameters():
        torch.nn.init.normal_(p)
    timm_sd, meta_sd = meta_layout(src)
    if layout == "meta":
        assert {"mask_token", "blocks.0.attn.qkv.weight", "blocks.0.ls1.gamma", "patch_embed.proj.weight",
                "norm.weight"} <= set(meta_sd)
    path = tmp_path / f"{backbone}_{layout}.pth"
    torch.save(meta_sd if layout == "meta" else timm_sd, path)
    model = dpt(backbone, pretrained=str(path))
    got = model.encoder.state_dict()
    assert set(got) == set(timm_sd)
    for k, v in timm_sd.items():
        torch.testing.assert_close(got[k], v, msg=k)


def test_v2_segmentation_checkpoint_loads_its_backbone(tmp_path):
    src = build_vit("dinov2_tiny")
    head = {"head.scratch.output_conv.0.weight": torch.zeros(1)}
    torch.save({"model": {**{f"module.backbone.{k}": v for k, v in src.state_dict().items()},
                          **{f"module.{k}": v for k, v in head.items()}}}, tmp_path / "v2.pth")
    model = dpt(pretrained=str(tmp_path / "v2.pth"))
    torch.testing.assert_close(model.encoder.pos_embed, src.pos_embed)


def test_mismatched_checkpoint_is_one_line_naming_file_and_missing_keys(tmp_path):
    sd = build_vit("dinov2_tiny").state_dict()
    del sd["blocks.3.mlp.fc2.weight"]
    path = tmp_path / "partial.pth"
    torch.save(sd, path)
    with pytest.raises(ValueError) as e:
        dpt(pretrained=str(path))
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg and "missing keys [blocks.3.mlp.fc2.weight]" in msg
    torch.save(build_vit("dinov2_tiny_reg4").state_dict(), tmp_path / "reg.pth")  # wrong variant: names the keys
    with pytest.raises(ValueError, match=r"reg\.pth: .*unexpected keys \[reg_token\]"):
        dpt(pretrained=str(tmp_path / "reg.pth"))
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        dpt(pretrained=str(tmp_path / "nope.pth"))


# ---------------------------------------------------------------- the V2 pieces


@pytest.mark.parametrize("n", [1, 4, 7])
def test_complementary_masks_are_complements(n):
    torch.manual_seed(n)
    m = paired_channel_masks(2 * n, 64, "complementary")
    m1, m2 = m[:n], m[n:]
    assert m.shape == (2 * n, 64)
    torch.testing.assert_close(m1 + m2, torch.full_like(m1, 2.0))  # every channel survives in exactly one view
    kept = (m1 == 1).all(1)
    assert int(kept.sum()) == n // 2 and torch.equal(kept, (m2 == 1).all(1))
    assert set(m1[~kept].unique().tolist()) <= {0.0, 2.0}


def test_independent_masks_are_not_complements():
    torch.manual_seed(0)
    m = paired_channel_masks(16, 256, "independent")
    s = m[:8] + m[8:]
    assert (s != 2).any() and set(m.unique().tolist()) <= {0.0, 1.0, 2.0}
    with pytest.raises(ValueError, match="even batch"):
        paired_channel_masks(3, 4, "complementary")


def test_dpt_applies_the_same_masks_to_all_four_features():
    model = dpt()
    x = torch.randn(4, 3, 28, 28)
    with torch.no_grad():
        torch.manual_seed(5)
        got = model(x, strong_dropout="complementary")["logits_low"]
        feats = model.encode(x)
        torch.manual_seed(5)
        m = paired_channel_masks(4, feats[0].shape[1], "complementary")
        ref = model.head([f * m[:, :, None, None] for f in feats])["logits_low"]
    torch.testing.assert_close(got, ref)


def test_ema_momentum_schedule_is_v2s():
    cfg = TrialConfig.from_dict({"method": {"name": "unimatch_v2"}}).method
    assert (cfg.teacher.kind, cfg.teacher.ema_alpha, cfg.teacher.bn_stats) == ("ema", 0.996, "ema")
    student = torch.nn.Linear(2, 2)
    ema = EMATeacher(student, cfg.teacher)
    seen = []
    for k in range(5):
        seen.append(ema.alpha())
        ema.update(student)
    assert seen == pytest.approx([min(1 - 1 / (k + 1), 0.996) for k in range(5)])
    ema.updates = 10_000
    assert ema.alpha() == 0.996
    with torch.no_grad():
        student.weight.fill_(1.0)
        ema.model.weight.fill_(0.0)
    ema.update(student)
    torch.testing.assert_close(ema.model.weight, torch.full((2, 2), 0.004))


def test_unimatch_v2_loss_is_v2s_expression():
    o = random_outputs(3)
    cfg = TrialConfig.from_dict({"method": {"name": "unimatch_v2"}}).method
    got = build_method(cfg, K).losses(o)
    lx = F.cross_entropy(o.pred_x, o.mask_x, ignore_index=255)

    def ls(pred, view):
        t = o.mixed_target(view)
        loss = F.cross_entropy(pred, t.mask, reduction="none") * ((t.conf >= 0.95) & (t.ignore != 255))
        return loss.sum() / (t.ignore != 255).sum()

    torch.testing.assert_close(got["loss"], (lx + (ls(o.pred_u_s1, 1) + ls(o.pred_u_s2, 2)) / 2.0) / 2.0)
    assert set(got) == {"loss", "loss/x", "loss/u_s1", "loss/u_s2"}


# ---------------------------------------------------------------- one step of everything on V2

FOUNDING = ["unimatch_v2", "unimatch_v2+ipixmatch", "unimatch_v2+pcr", "unimatch_v2+mllc", "unimatch_v2+guidedmix"]


def _v2_batches(bx=2, bu=2, size=28, seed=0):
    g = torch.Generator().manual_seed(seed)

    def img(b):
        return torch.randn(b, 3, size, size, generator=g)

    x = {"img_x": img(bx), "mask_x": torch.randint(0, 3, (bx, size, size), generator=g)}
    box = lambda: (torch.rand(bu, size, size, generator=g) > 0.5).long()  # noqa: E731
    u = {"img_u_w": img(bu), "img_u_s1": img(bu), "img_u_s2": img(bu),
         "ignore_mask_u": torch.zeros(bu, size, size, dtype=torch.long), "cutmix_box1": box(), "cutmix_box2": box()}
    return x, u, None


@pytest.mark.parametrize("extra", [{}, {"teacher": {"kind": "self"}}, {"strong_dropout": "independent"}],
                         ids=["v2", "-ema", "-complementary"])
@pytest.mark.parametrize("name", FOUNDING)
def test_one_step_of_every_founding_method_on_v2(name, extra):
    cfg = TrialConfig.from_dict({"method": {"name": name, **extra}, "model": TINY_DPT,
                                 "optim": {"optimizer": "adamw", "lr": 5e-6, "head_lr_mult": 40.0,
                                           "weight_decay": 0.01}})
    assert cfg.method.mix_source == "flip" and cfg.method.global_div == 2.0
    torch.manual_seed(0)
    model = build_model(cfg.model, 3).train()
    method = build_method(cfg.method, 3, 255, model.feature_dims, iterations=10)
    ts = TeacherStudent(model, cfg.method, method.needs,
                        refine_teacher=method.refine_teacher if method.refines_teacher else None)
    backbone, head = model.param_groups()
    opt = _optimizer(cfg, backbone, head + list(method.modules.parameters()))
    assert isinstance(opt, torch.optim.AdamW) and opt.param_groups[1]["lr"] == pytest.approx(2e-4)
    out = ts.step(*_v2_batches(), iteration=0)
    torch.testing.assert_close(out.mask_u_w_mix, out.mask_u_w.flip(0))  # V2 mixes with the batch reversed
    losses = method.losses(out)
    assert torch.isfinite(losses["loss"])
    opt.zero_grad()
    losses["loss"].backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in backbone)
    unused = [n for n, p in model.named_parameters() if p.grad is None]
    assert not unused, unused  # DDP without find_unused_parameters needs every parameter in the graph
    opt.step()
    ts.after_optimizer_step()
    method.after_step(out)
    assert (ts.teacher is None) == (extra.get("teacher", {}).get("kind") == "self")


def test_v2_trains_and_evaluates_student_and_teacher(tmp_path):
    cfg = tiny(**{"method.name": "unimatch_v2", "model.name": "dpt", "model.backbone": "dinov2_tiny",
                  "data.crop_size": 28, "optim.optimizer": "adamw", "optim.lr": 1e-4,
                  "train.eval_model": "both", "train.iterations": 2, "train.eval_every": 1})
    out, reports = run(cfg, tmp_path)
    for key in ("val/miou", "val_ema/miou", "best/val/miou", "best/val_ema/miou"):
        assert key in out, key
    assert "val_ema/confusion" not in out.history[-1] and len(reports) == 2
    assert out["best/val_ema/miou"] == max(r["val_ema/miou"] for r, _ in reports)


# ---------------------------------------------------------------- the studies


@pytest.mark.parametrize("study,dataset,epochs,crop,per_gpu", [
    ("voc_classic_v2", "pascal", 60, 518, 4), ("cityscapes_v2", "cityscapes", 180, 798, 2)])
def test_v2_studies_follow_v2s_recipe(study, dataset, epochs, crop, per_gpu):
    import math
    import os

    from sslray.study import load_paper_numbers, load_study
    from test_paper_studies import DOCUMENTED, REPO

    s = load_study(os.path.join(REPO, "studies", f"{study}.yaml"))
    trials = s.trials()
    assert {t.config.method.name for t in trials} == {"supervised", "unimatch_v2", *(
        f"unimatch_v2+{m}" for m in ("ipixmatch", "guidedmix", "pcr", "mllc"))}
    assert s.resources.workers == 4  # V2: 4 GPUs
    for t in trials:
        c = t.config
        n_unl = DOCUMENTED[f"{dataset}/{c.data.partition}"][1]
        # V2's len(trainloader_u): DistributedSampler over 4 GPUs, per_gpu images per GPU, drop_last
        assert c.train.iterations == epochs * (math.ceil(n_unl / 4) // per_gpu), c.data.partition
        assert c.train.eval_every in (c.train.iterations // epochs, 4 * (c.train.iterations // epochs))
        assert (c.data.crop_size, c.data.batch_size_x, c.data.batch_size_u) == (crop, 4 * per_gpu, 4 * per_gpu)
        assert (c.model.name, c.model.backbone) == ("dpt", "dinov2_base")
        o = c.optim
        assert (o.optimizer, o.lr, o.head_lr_mult, o.weight_decay, o.poly_power) == ("adamw", 5e-6, 40.0, 0.01, 0.9)
        assert c.train.eval_model == "both" and c.method.conf_thresh == 0.95
    paper = load_paper_numbers(os.path.join(REPO, "studies", s.report.paper_numbers))
    assert paper.numbers[("unimatch_v2", "92" if dataset == "pascal" else "1_16")] == (86.3 if dataset == "pascal"
                                                                                       else 83.6)
