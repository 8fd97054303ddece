"""IPixMatch's relation terms: hand-computed values, agreement, stop-gradient, masks, node bound, config, a fit."""
import math

import pytest
import torch
import torch.nn.functional as F

from sslray.config import ConfigError, TrialConfig
from sslray.methods import TERMS, build_method, ipixmatch
from sslray.methods.base import TermContext
from sslray.methods.ipixmatch import IPixTermConfig, decoder_grid, ipix_loss, select_nodes
from sslray.teacher_student import StepOutputs, confidence

K, B, H, W, h, w = 3, 2, 9, 9, 5, 5  # (H - 1) / (h - 1) = 2: the decoder grid is exact
COMBOS = [(r, d) for r in ("per_class", "pairwise") for d in ("kl", "correlation")]


def up(t, size):
    return F.interpolate(t, size=size, mode="bilinear", align_corners=True)


def outputs(seed=0, scale=3.0, student=None):
    """StepOutputs of a UniMatch step on hand-built tensors; full-res logits are upsampled decoder maps."""
    g = torch.Generator().manual_seed(seed)
    r = lambda: up(torch.randn(B, K, h, w, generator=g) * scale, (H, W))  # noqa: E731
    t_w, t_mix = r(), r()
    box1, box2 = torch.zeros(B, H, W), torch.zeros(B, H, W)
    box1[:, 2:7, 3:8] = 1
    box2[:, :4, :4] = 1
    ignore, ignore_mix = torch.zeros(B, H, W, dtype=torch.long), torch.zeros(B, H, W, dtype=torch.long)
    ignore[:, -2:, :] = 255
    ignore_mix[:, :, 6:] = 255  # overlaps box 1: padding of the mix partner pasted in
    mask_x = torch.randint(0, K, (B, H, W), generator=g)
    mask_x[:, 0, :] = 255
    out = StepOutputs(pred_x=r(), mask_x=mask_x, pred_u_w=t_w, pred_u_w_fp=r(), pred_u_s1=r(), pred_u_s2=r(),
                      logits_u_w_teacher=t_w, logits_u_w_mix_teacher=t_mix, ignore_mask_u=ignore,
                      ignore_mask_mix=ignore_mix, cutmix_box1=box1, cutmix_box2=box2)
    out.conf_u_w, out.mask_u_w = confidence(t_w)
    out.conf_u_w_mix, out.mask_u_w_mix = confidence(t_mix)
    out.model_out = {"x_u_w": {"logits_low": torch.zeros(2 * B, K, h, w)},
                     "u_s": {"logits_low": torch.zeros(2 * B, K, h, w)}}
    out._parts = {"x": ("x_u_w", 0, B), "u_w": ("x_u_w", B, None), "s1": ("u_s", 0, B), "s2": ("u_s", B, None)}
    return out


def ctx(thresh=0.5):
    return TermContext(thresh, 255, K)


def term(view, out, ctx_=None, **settings):
    return TERMS[f"ipix_{view}"].fn(out, IPixTermConfig(**settings), ctx_ or ctx())


# ---- hand-computed values (pure Python references) -------------------------------------------------


def softmax(xs):
    e = [math.exp(x - max(xs)) for x in xs]
    return [v / sum(e) for v in e]


def kl(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q) if a > 0)


def pearson(u, v):
    mu, mv = sum(u) / len(u), sum(v) / len(v)
    cov = sum((a - mu) * (b - mv) for a, b in zip(u, v))
    return cov / math.sqrt(sum((a - mu) ** 2 for a in u) * sum((b - mv) ** 2 for b in v))


ZT = [[1.0, 2.0, -1.0, 9.0], [0.0, 0.5, 1.5, 9.0]]  # [K=2][N=4]; pixel 3 is invalid
ZS = [[0.0, 1.0, 0.5, -9.0], [1.0, 0.0, 2.0, 5.0]]
VALID = [True, True, True, False]


def tensors():
    return torch.tensor([ZT])[:, :, None], torch.tensor([ZS])[:, :, None], torch.tensor([[VALID]])  # a 1 x 4 image


def test_per_class_kl_hand_computed():
    t = 2.0
    ref = t * t * sum(kl(softmax([x / t for x in zt[:3]]), softmax([x / t for x in zs[:3]]))
                      for zt, zs in zip(ZT, ZS)) / 2
    got = ipix_loss(*tensors(), IPixTermConfig(temperature=t))
    assert got.item() == pytest.approx(ref, rel=1e-5)


def test_per_class_correlation_hand_computed():
    p_t = [softmax([ZT[0][j], ZT[1][j]]) for j in range(3)]  # class probabilities per valid pixel
    p_s = [softmax([ZS[0][j], ZS[1][j]]) for j in range(3)]
    ref = sum(1 - pearson([p[c] for p in p_t], [p[c] for p in p_s]) for c in range(2)) / 2
    got = ipix_loss(*tensors(), IPixTermConfig(distance="correlation", temperature=7.0))  # T unused
    assert got.item() == pytest.approx(ref, rel=1e-5)


def affinity(z):
    q = [softmax([z[0][j], z[1][j]]) for j in range(3)]
    q = [[a / math.sqrt(sum(x * x for x in p)) for a in p] for p in q]
    return [[sum(a * b for a, b in zip(q[i], q[j])) for j in range(3)] for i in range(3)]


@pytest.mark.parametrize("distance", ["kl", "correlation"])
def test_pairwise_hand_computed(distance):
    t = 0.5
    a_t, a_s = affinity(ZT), affinity(ZS)
    if distance == "kl":
        ref = t * t * sum(kl(softmax([x / t for x in rt]), softmax([x / t for x in rs]))
                          for rt, rs in zip(a_t, a_s)) / 3
    else:
        ref = 1 - pearson(sum(a_t, []), sum(a_s, []))
    got = ipix_loss(*tensors(), IPixTermConfig(relation="pairwise", distance=distance, temperature=t))
    assert got.item() == pytest.approx(ref, rel=1e-5)


def test_labeled_term_hand_computed():
    """ipix_x, per_class/kl: each class channel's spatial distribution is asked to be uniform on its label region."""
    z = torch.tensor([[[[0.0, 1.0, 2.0, 3.0]], [[1.0, -1.0, 0.5, 2.0]], [[0.0, 0.0, 0.0, 0.0]]]])  # [1, K, 1, 4]
    out = StepOutputs(pred_x=z, mask_x=torch.tensor([[[0, 0, 1, 255]]]))
    got = term("x", out, resolution="full")
    q0, q1 = softmax([0.0, 1.0, 2.0]), softmax([1.0, -1.0, 0.5])  # softmax over the labeled pixels
    ref = (kl([0.5, 0.5, 0.0], q0) + kl([0.0, 0.0, 1.0], q1)) / 2  # class 2 is absent: skipped
    assert got.item() == pytest.approx(ref, rel=1e-5)
    onehot = F.one_hot(torch.tensor([[[0, 0, 1, 1]]]), K).permute(0, 3, 1, 2).float()
    agree = StepOutputs(pred_x=onehot * 40, mask_x=torch.tensor([[[0, 0, 1, 1]]]))
    for r, d in COMBOS:
        assert term("x", agree, resolution="full", relation=r, distance=d).item() == pytest.approx(0, abs=1e-5)


# ---- behaviour on a whole step -----------------------------------------------------------------------


@pytest.mark.parametrize("relation,distance", COMBOS)
@pytest.mark.parametrize("resolution", ["decoder", "full"])
def test_zero_when_student_matches_the_box_mixed_teacher(relation, distance, resolution):
    out = outputs()
    for view, box in (("s1", out.cutmix_box1), ("s2", out.cutmix_box2)):
        mixed = torch.where(box[:, None] == 1, out.logits_u_w_mix_teacher, out.logits_u_w_teacher)
        setattr(out, f"pred_u_{view}", mixed)
        s = dict(relation=relation, distance=distance, resolution=resolution)
        assert term(view, out, **s).item() == pytest.approx(0.0, abs=1e-5)
        setattr(out, f"pred_u_{view}", out.logits_u_w_teacher)  # ignores the box: the loss sees it
        assert term(view, out, **s).item() > 1e-3
    out.pred_u_w_fp = out.logits_u_w_teacher  # the FP view is not mixed
    assert term("fp", out, relation=relation, distance=distance).item() == pytest.approx(0.0, abs=1e-5)


@pytest.mark.parametrize("relation,distance", COMBOS)
def test_no_gradient_into_the_teacher_and_masks_respected(relation, distance):
    out = outputs(1)
    t_w = out.logits_u_w_teacher.clone().requires_grad_(True)
    t_mix = out.logits_u_w_mix_teacher.clone().requires_grad_(True)
    s1 = out.pred_u_s1.clone().requires_grad_(True)
    out.logits_u_w_teacher, out.logits_u_w_mix_teacher, out.pred_u_s1 = t_w, t_mix, s1
    loss = term("s1", out, ctx(0.6), relation=relation, distance=distance, resolution="full")
    loss.backward()
    assert t_w.grad is None and t_mix.grad is None
    box = out.cutmix_box1 == 1
    conf = torch.where(box, out.conf_u_w_mix, out.conf_u_w)
    ignore = torch.where(box, out.ignore_mask_mix, out.ignore_mask_u)
    valid = (conf >= 0.6) & (ignore != 255)
    assert (~valid & (conf >= 0.6)).any() and (~valid & (ignore != 255)).any()  # both masks bite
    g = s1.grad.abs().sum(1)  # [B, H, W]
    assert torch.isfinite(s1.grad).all() and g[~valid].max() == 0 and g[valid].max() > 0


@pytest.mark.parametrize("relation,distance", COMBOS)
def test_each_image_is_weighted_by_its_confident_share(relation, distance):
    out = outputs(4)
    for name in ("pred_u_s1", "logits_u_w_teacher", "logits_u_w_mix_teacher", "ignore_mask_u", "ignore_mask_mix",
                 "cutmix_box1"):
        setattr(out, name, getattr(out, name)[:1])  # image 0 alone: the mean over images is the image's value
    s = dict(relation=relation, distance=distance)
    box = out.cutmix_box1 == 1  # below, [..., ::2, ::2] is the 5 x 5 decoder grid of a 9 x 9 image
    teacher = torch.where(box[:, None], out.logits_u_w_mix_teacher, out.logits_u_w_teacher)[..., ::2, ::2]
    present = torch.where(box, out.ignore_mask_mix, out.ignore_mask_u)[..., ::2, ::2] != 255
    share = ((torch.softmax(teacher, 1).amax(1) >= 0.9) & present).sum() / present.sum()
    assert 0.2 < share < 0.9
    scaled, plain = term("s1", out, ctx(0.9), **s), term("s1", out, ctx(0.9), scale="none", **s)
    torch.testing.assert_close(scaled, share * plain)


@pytest.mark.parametrize("relation,distance", COMBOS)
def test_threshold_inherits_and_no_confident_pixel_is_a_connected_zero(relation, distance):
    out = outputs(2, scale=0.1)  # flat teacher: nothing reaches 0.95
    s1 = out.pred_u_s1.clone().requires_grad_(True)
    out.pred_u_s1 = s1
    loss = term("s1", out, ctx(0.95), relation=relation, distance=distance)  # conf_thresh None -> 0.95
    loss.backward()
    assert loss.item() == 0.0 and s1.grad is not None and (s1.grad == 0).all()
    assert term("s1", out, ctx(0.95), relation=relation, distance=distance, conf_thresh=0.0).item() > 0


def test_decoder_grid_is_the_upsampled_decoder_map():
    for size, low in ((801, 201), (321, 81), (9, 5)):
        z = torch.randn(1, 2, low, low)
        grid = decoder_grid((size, size), (low, low), z.device)
        torch.testing.assert_close(ipixmatch._at(up(z, (size, size)), grid), z)


@pytest.mark.parametrize("mode,nodes,n_valid", [("random", 1024, 1024), ("pool", 29 * 29, 29 * 29 - 29 * 4)])
def test_pairwise_node_bound_at_crop_801(mode, nodes, n_valid, monkeypatch):
    """Cityscapes crop 801 -> a 201 x 201 decoder map (40,401 pixels): at most max_nodes per image.

    The loss runs with max_nodes 1024 (a 4096-node backward takes seconds on one CPU thread); the default
    bound is checked on the node selection alone. Pool: 7 x 7 cells; the 25 padded grid rows void 4 cell rows.
    """
    g = torch.Generator().manual_seed(0)
    size, low, k = 801, 201, 19
    t_w = up(torch.randn(1, k, low, low, generator=g) * 3, (size, size))
    s1 = up(torch.randn(1, k, low, low, generator=g), (size, size)).requires_grad_(True)
    ignore = torch.zeros(1, size, size, dtype=torch.long)
    ignore[:, :100] = 255
    box = torch.zeros(1, size, size)
    out = StepOutputs(pred_x=None, mask_x=None, pred_u_s1=s1, logits_u_w_teacher=t_w, logits_u_w_mix_teacher=t_w,
                      ignore_mask_u=ignore, ignore_mask_mix=ignore, cutmix_box1=box)
    out.model_out, out._parts = {"u_s": {"logits_low": torch.zeros(1, k, low, low)}}, {"s1": ("u_s", 0, None)}
    seen = []
    real = ipixmatch.pairwise_relation

    def spy(z_t, z_s, valid, *args):
        seen.append((tuple(z_t.shape), tuple(z_s.shape), tuple(valid.shape), int(valid.sum())))
        return real(z_t, z_s, valid, *args)

    monkeypatch.setattr(ipixmatch, "pairwise_relation", spy)
    cfg = IPixTermConfig(relation="pairwise", node_select=mode, max_nodes=1024)
    loss = TERMS["ipix_s1"].fn(out, cfg, TermContext(0.0, 255, k))
    loss.backward()
    assert seen == [((1, k, nodes), (1, k, nodes), (1, nodes), n_valid)] and torch.isfinite(loss)
    z = torch.zeros(2, k, low, low)
    z_t, z_s, valid = select_nodes(z, z, torch.ones(2, low, low, dtype=torch.bool), IPixTermConfig().max_nodes, mode)
    assert z_t.shape[-1] == z_s.shape[-1] == valid.shape[-1] == (4096 if mode == "random" else 51 * 51)


def test_select_nodes_keeps_only_valid_pixels_and_pools_means():
    z = torch.arange(2 * 1 * 5 * 5, dtype=torch.float32).view(2, 1, 5, 5)
    valid = torch.ones(2, 5, 5, dtype=torch.bool)
    valid[0, :, :3] = False  # image 0: 10 valid pixels, image 1: 25
    z_t, z_s, v = select_nodes(z, z.clone(), valid, 8, "random")
    assert z_t.shape == (2, 1, 8) and v.all()
    assert all(int(x) % 5 >= 3 for x in z_t[0, 0])  # image 0 drew from the valid columns only
    z_t, _, v = select_nodes(z, z, valid, 9, "pool")  # window 2, ceil mode: 3 x 3 cells
    assert z_t[0, 0, 2].item() == (4 + 9) / 2 and z_t[0, 0, 8].item() == 24
    assert v[0].tolist() == [False, False, True] * 3 and v[1].all()


# ---- config, composition, a short fit ----------------------------------------------------------------


def test_preset_composes_and_settings_are_dotted_keys():
    m = TrialConfig.from_dict({"method": {"name": "ipixmatch"}}).method
    assert m.global_div == 2.0 and m.conf_thresh == 0.95 and m.teacher.kind == "self"
    assert {n: t.weight for n, t in m.terms.items()} == {"x": 1.0, "u_s1": 0.25, "u_s2": 0.25, "u_fp": 0.5,
                                                          "ipix_s1": 1.0, "ipix_s2": 1.0, "ipix_fp": 0.0, "ipix_x": 0.0}
    s1 = m.terms["ipix_s1"]
    assert (s1.relation, s1.distance, s1.temperature, s1.conf_thresh) == ("per_class", "kl", 1.0, None)
    mt = TrialConfig.from_dict({"method": {"name": "meanteacher+ipixmatch"}}).method
    assert mt.teacher.kind == "ema" and "u_fp" not in mt.terms and mt.terms["ipix_s1"].weight == 1.0
    assert build_method(mt, K).needs == {"u", "s1", "s2"}
    cfg = TrialConfig.from_dict({"method": {"name": "ipixmatch"}}).replace(
        **{"method.terms.ipix_s1.distance": "correlation", "method.terms.ipix_s1.relation": "pairwise",
           "method.terms.ipix_s1.conf_thresh": 0.7})
    assert cfg.method.terms["ipix_s1"] == IPixTermConfig(weight=1.0, relation="pairwise", distance="correlation",
                                                         conf_thresh=0.7)


@pytest.mark.parametrize("name", ["ipixmatch", "fixmatch+ipixmatch", "meanteacher+ipixmatch"])
def test_preset_effective_weight_is_the_specs_lambda(name):
    """methods.md §4.2/§8.1: L = L_base + 0.5 * sum_views L_ip, the base's own "/ 2" not applied to the relation
    terms (the weights are lambda_ip * global_div)."""
    method = build_method(TrialConfig.from_dict({"method": {"name": name}}).method, K)
    losses = method.losses(outputs(3))
    base = sum(method.active[n].weight * losses[f"loss/{n}"] for n in method.active if not n.startswith("ipix"))
    ipix = losses["loss/ipix_s1"] + losses["loss/ipix_s2"]
    assert float(ipix) > 0
    torch.testing.assert_close(losses["loss"], base / method.cfg.global_div + 0.5 * ipix)


@pytest.mark.parametrize("key,value,msg", [
    ("distance", "l2", "expected one of ['kl', 'correlation'], got 'l2'"),
    ("relation", "graph", "expected one of ['per_class', 'pairwise'], got 'graph'"),
    ("conf_thresh", 1.5, "expected a value in [0, 1], got 1.5"),
    ("temperature", 0, "expected a positive value, got 0.0"),
    ("max_nodes", 0, "expected a positive value, got 0"),
])
def test_bad_settings_name_the_dotted_key(key, value, msg):
    with pytest.raises(ConfigError) as e:
        TrialConfig.from_dict({"method": {"name": "ipixmatch", "terms": {"ipix_s2": {key: value}}}}, source="s.yaml")
    assert str(e.value) == f"s.yaml: method.terms.ipix_s2.{key}: {msg}"


def test_fit_with_every_view_and_the_pairwise_correlation_form(tmp_path):
    from sslray.trainer import Runtime, fit

    tiny = {"data": {"partition": "4", "batch_size_x": 4, "batch_size_u": 4, "crop_size": 32,
                     "synthetic": {"size": 32, "num_train": 24, "num_val": 6}},
            "model": {"width": 8}, "train": {"iterations": 2, "eval_every": 2},
            "run": {"log_every": 1, "progress": "off", "threads": 1}}
    view = {"relation": "pairwise", "distance": "correlation", "max_nodes": 32, "weight": 0.5}
    tiny["method"] = {"name": "ipixmatch", "conf_thresh": 0.0,
                      "terms": {f"ipix_{v}": view for v in ("s1", "s2", "fp", "x")}}
    reports = []
    fit(TrialConfig.from_dict(tiny), Runtime(), lambda m, c: reports.append(m), out_dir=str(tmp_path / "run"))
    last = reports[-1]
    for v in ("s1", "s2", "fp", "x"):
        assert math.isfinite(last[f"train/loss/ipix_{v}"]) and last[f"train/loss/ipix_{v}"] > 0
    assert math.isfinite(last["val/miou"])
    assert last["train/ipixmatch/nodes"] == 32 and 0 < last["train/ipixmatch/valid_frac"] <= 1  # 16 x 16 map


def test_method_logs_nodes_and_valid_share():
    method = build_method(TrialConfig.from_dict({"method": {"name": "ipixmatch", "conf_thresh": 0.6}}).method, K)
    losses = method.losses(outputs(3))
    assert set(losses) == {"loss", *(f"loss/{t}" for t in ("x", "u_s1", "u_s2", "u_fp", "ipix_s1", "ipix_s2"))}
    diag = method.diagnostics()
    assert diag["train/ipixmatch/nodes"].item() == h * w and 0 < diag["train/ipixmatch/valid_frac"].item() < 1
    assert method.diagnostics() == {} and list(method.modules["ipixmatch"].state_dict()) == []  # per step, no state
