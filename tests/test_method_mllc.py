"""MLLC (sslray/methods/mllc.py): the graph pieces against the dense §8.2 reference, every term on hand-computed
tiny tensors, masks, gradients, the node bound at a 201 x 201 map, state, DDP, the presets and a resumed fit."""
import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from sslray.config import ConfigError, TrialConfig
from sslray.methods import build_method
from sslray.methods.base import ModuleContext
from sslray.methods import mllc
from sslray.methods.mllc import (DenseGraph, EdgeGraph, GraphRound, MLLCGraphConfig, MLLCModule, MLLCPairConfig,
                                 MLLCProtoConfig, MLLCUnsupConfig, class_propagate, graph_grid, knn_graph, propagate)
from sslray.models import build_model, upsample
from sslray.study import load_study
from sslray.teacher_student import StepOutputs, TeacherStudent, confidence
from sslray.trainer import Runtime, fit
from test_trainer import checkpoint, crash_then_resume

K, D0 = 3, 6  # classes, decoder feature width of the fake model dicts
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def method_cfg(name="mllc", **terms):
    return TrialConfig.from_dict({"method": {"name": name, "terms": terms}}).method


def make_method(name="mllc", iterations=100, **terms):
    return build_method(method_cfg(name, **terms), K, 255, {"features": D0}, iterations)


def fake_step(m, seed, bx=2, bu=2, h=4, w=5, iteration=50):
    """A self-teacher semi step as TeacherStudent assembles it, from random model dicts (decoder (h, w), crop 2x)."""
    g = torch.Generator().manual_seed(seed)
    size = (2 * h, 2 * w)

    def model_dict(b, grad):
        low = (torch.randn(b, K, h, w, generator=g) * 2).requires_grad_(grad)
        feat = torch.randn(b, D0, h, w, generator=g).requires_grad_(grad)
        return {"logits_low": low, "features": feat, "logits": upsample(low, size)}

    xuw, s, t_mix = model_dict(bx + bu, True), model_dict(bu, True), model_dict(bu, False)
    mask_x = torch.randint(0, K, (bx, *size), generator=g)
    mask_x[0, 0, :3] = 255
    ignore = torch.zeros(bu, *size, dtype=torch.long)
    ignore[:, -1] = 255
    out = StepOutputs(pred_x=xuw["logits"][:bx], mask_x=mask_x, pred_u_w=xuw["logits"][bx:], pred_u_s1=s["logits"],
                      ignore_mask_u=ignore, ignore_mask_mix=ignore.clone(), iteration=iteration,
                      cutmix_box1=(torch.rand(bu, *size, generator=g) > 0.5).float(),
                      cutmix_box2=(torch.rand(bu, *size, generator=g) > 0.5).float())
    out.model_out = {"x_u_w": xuw, "u_s": s, "t_mix": t_mix}
    out._parts = {"x": ("x_u_w", 0, bx), "u_w": ("x_u_w", bx, None), "s1": ("u_s", 0, None)}
    out.model_out["t_u_w"] = {k: v.detach() for k, v in out.part("u_w").items()}
    for key, attr in (("t_mix", "logits_u_w_mix_teacher"), ("t_u_w", "logits_u_w_teacher")):
        refined = m.refine_teacher(out.model_out[key])
        setattr(out, attr, (out.model_out[key]["logits"] if refined is None else refined).detach())
    out.conf_u_w, out.mask_u_w = confidence(out.logits_u_w_teacher)
    out.conf_u_w_mix, out.mask_u_w_mix = confidence(out.logits_u_w_mix_teacher)
    return out


def confident_counts(out, tau=0.95):
    """Per class, the labeled and teacher weak-view pixels with confidence >= tau, padding/ignore excluded."""
    counts = torch.zeros(K, dtype=torch.long)
    pairs = ((out.pred_x, out.mask_x != 255), (out.model_out["t_u_w"]["logits"], out.ignore_mask_u != 255))
    for logits, valid in pairs:
        conf, cls = torch.softmax(logits.detach(), 1).max(1)
        counts += torch.bincount(cls[(conf >= tau) & valid], minlength=K)
    return counts


def module(rounds=1, dim=2, proto=None, pair=None, unsup=None, **graph):
    """An MLLC module whose feat_proj and class convs are the identity (on non-negative features), for hand
    computation."""
    g = MLLCGraphConfig(rounds=rounds, **{"class_init": "identity", **graph})
    m = MLLCModule(g, unsup, proto, pair, ModuleContext(2, feature_dims={"features": dim}, iterations=100))
    with torch.no_grad():
        for layer in (m.feat_proj[0], m.feat_proj[2]):
            layer.weight.copy_(torch.eye(dim))
            layer.bias.zero_()
    return m


def tiny_out(logits_low, features, mask=None, view="x", **fields):
    """StepOutputs holding one student view dict at decoder (1, N) = crop (1, N)."""
    d = {"logits_low": logits_low, "features": features, "logits": logits_low}
    out = StepOutputs(pred_x=logits_low, mask_x=mask, **fields)
    out.model_out = {view: d}
    out._parts = {view: (view, 0, None)}
    return out


# --------------------------------------------------------------------------------------------------
# graph pieces


def dense_round(z, f, eta, round_: GraphRound, k, tau=0.95):
    """methods.md §8.2 ``g2net_round``, transcribed with dense N x N matrices."""
    with torch.no_grad():
        conf, cls = z.softmax(-1).max(-1)
        rel = (conf >= tau) | (conf >= eta[cls])
        fn = F.normalize(f, dim=-1)
        a = (fn @ fn.transpose(1, 2)).clamp_min(0)
        kth = a.topk(k + 1, dim=-1).values[..., -1:]
        a = torch.where(a >= kth, a, torch.zeros_like(a))
        a = a + a.transpose(1, 2)
        d = a.sum(-1).clamp_min(1e-10).rsqrt()
        a = a * d[..., :, None] * d[..., None, :]
    zp = a @ z
    r = rel[..., None].to(z.dtype)
    zk = round_.class_conv(r * (0.2 * zp + 0.8 * z) + (1 - r) * (0.8 * zp + 0.2 * z))
    with torch.no_grad():
        q = F.normalize(zk.softmax(-1), dim=-1)
        bm = (q @ q.transpose(1, 2)) * (cls[..., :, None] == cls[..., None, :])
        d = bm.sum(-1).clamp_min(1e-10).rsqrt()
        bm = bm * d[..., :, None] * d[..., None, :]
    return zk, round_.feat_conv(bm @ f)


@pytest.mark.parametrize("dense", [True, False])
def test_knn_graph_matches_dense_form_with_ties_and_negative_cosines(dense):
    torch.manual_seed(0)
    f = torch.randn(2, 40, 5, dtype=torch.float64)
    f[:, 10:16] = f[:, 10:11]  # six identical nodes: ties at the (k+1)-th value are all kept, as in the code
    z = torch.randn(2, 40, 4, dtype=torch.float64)
    fn = F.normalize(f, dim=-1)
    a = (fn @ fn.transpose(1, 2)).clamp_min(0)
    a = torch.where(a >= a.topk(4, dim=-1).values[..., -1:], a, torch.zeros_like(a))
    a = a + a.transpose(1, 2)
    d = a.sum(-1).clamp_min(1e-10).rsqrt()
    graph = knn_graph(f, 3, dense=dense)
    assert isinstance(graph, DenseGraph if dense else EdgeGraph)
    torch.testing.assert_close(propagate(z, graph), (a * d[..., :, None] * d[..., None, :]) @ z)


def test_symmetric_knn_torch_form_equals_numpy_form():
    # the torch form runs on GPUs; both are A + A^T of the kept entries
    torch.manual_seed(6)
    fn = F.normalize(torch.randn(3, 30, 4), dim=-1)
    sim = fn @ fn.transpose(1, 2)
    kth = sim.topk(6, dim=-1).values[..., -1:]
    a = torch.where(sim >= kth, sim, torch.zeros_like(sim))
    for use_numpy in (True, False):
        got = sim.clone()
        mllc.symmetric_knn_(got, kth, use_numpy=use_numpy)
        torch.testing.assert_close(got, a + a.transpose(1, 2))


def test_knn_graph_batched_equals_per_image():
    # every form and chunking of the batch is the per-image computation (a chunk of one image, edge list)
    torch.manual_seed(3)
    f = torch.randn(7, 64, 6)
    f[2, 5:30] = f[2, 5:6]  # a tie block larger than k + 1
    z = torch.randn(7, 64, 3)
    per_image = torch.cat([propagate(z[i:i + 1], knn_graph(f[i:i + 1], 20, chunk=1, dense=False)) for i in range(7)])
    for kwargs in ({}, {"dense": True}, {"dense": True, "chunk": 3}, {"dense": False}, {"dense": False, "chunk": 2}):
        torch.testing.assert_close(propagate(z, knn_graph(f, 20, **kwargs)), per_image, rtol=1e-6, atol=1e-6)


def test_class_propagation_matches_dense_form():
    torch.manual_seed(1)
    z_out, f = torch.randn(2, 30, 4, dtype=torch.float64), torch.randn(2, 30, 5, dtype=torch.float64)
    cls = torch.randint(0, 4, (2, 30))
    q = F.normalize(z_out.softmax(-1), dim=-1)
    b = (q @ q.transpose(1, 2)) * (cls[..., :, None] == cls[..., None, :])
    d = b.sum(-1).clamp_min(1e-10).rsqrt()
    torch.testing.assert_close(class_propagate(z_out, cls, f), (b * d[..., :, None] * d[..., None, :]) @ f)


@pytest.mark.parametrize("dense_max_nodes", [1024, 0])  # the round on the dense graph form, and on edges
def test_graph_round_matches_reference_pseudo_code(dense_max_nodes, monkeypatch):
    monkeypatch.setattr(mllc, "DENSE_MAX_NODES", dense_max_nodes)
    torch.manual_seed(2)
    rnd = GraphRound(4, 6, class_graph=True, class_init="default").double()
    z, f = torch.randn(2, 50, 4, dtype=torch.float64) * 3, torch.randn(2, 50, 6, dtype=torch.float64)
    eta = torch.tensor([0.95, 0.3, 0.6, 0.0], dtype=torch.float64)
    zk, fk, reliable = rnd(z, f, eta, MLLCGraphConfig(knn=5))
    ref_z, ref_f = dense_round(z, f, eta, rnd, k=5)
    torch.testing.assert_close(zk, ref_z)
    torch.testing.assert_close(fk, ref_f)
    assert reliable.any() and not reliable.all()


def test_default_class_init_is_the_official_normal_001():
    # ResNet101.__init__ re-draws every Conv2d (G2Net's class and feature convs included) from normal(0, 0.01);
    # G2Net zeroed the biases before. So the rounds start near zero: the corrected logits are almost uniform.
    torch.manual_seed(0)
    c, dim = 21, 256
    m = MLLCModule(MLLCGraphConfig(), None, None, None,
                   ModuleContext(c, feature_dims={"features": dim}, iterations=100))
    assert m.g.class_init == "code" and len(m.rounds) == 2
    for rnd in m.rounds:
        for layer, n in ((rnd.class_conv[0], c), (rnd.class_conv[1], c), (rnd.feat_conv[0], dim),
                         (rnd.feat_conv[2], dim)):
            w = layer.weight.detach()
            assert w.shape == (n, n) and torch.equal(layer.bias, torch.zeros(n))
            assert abs(w.mean().item()) < 4 * 0.01 / n  # 4 sigma of the mean of n^2 draws
            assert w.std().item() == pytest.approx(0.01, rel=8 / math.sqrt(2 * n * n))
    z, f = torch.randn(2, 64, c) * 5, torch.randn(2, 64, dim)
    z1, f1, _ = m.rounds[0](z, f, m.eta(), m.g)
    assert z1.std() < 0.01 * z.std() and f1.std() < 0.05 * f.std()  # measured: 0.0015 and 0.010
    assert z1.softmax(-1).max() < 1.1 / c  # almost uniform: no corrected pseudo-label passes a threshold
    # the other inits stay selectable: identity class convs, PyTorch's default
    ident = GraphRound(c, dim, True, "identity")
    assert torch.equal(ident.class_conv[0].weight, torch.eye(c)) and torch.equal(ident.class_conv[1].bias, torch.zeros(c))
    assert GraphRound(c, dim, True, "default").class_conv[0].weight.std() > 0.05  # U(-1/sqrt(c), 1/sqrt(c)): 0.126


@pytest.mark.parametrize("dense_max_nodes", [1024, 0])
def test_graph_round_batched_equals_per_image(dense_max_nodes, monkeypatch):
    # both rounds of a chain, each given the same inputs batched and one image at a time; the second round's
    # features are class-propagated (near-tied cosines), so this also checks that batching does not round them
    monkeypatch.setattr(mllc, "DENSE_MAX_NODES", dense_max_nodes)
    torch.manual_seed(4)
    rounds = [GraphRound(3, 8, True, "identity") for _ in range(2)]
    z, f = torch.randn(6, 60, 3) * 3, torch.randn(6, 60, 8)
    eta, cfg = torch.tensor([0.95, 0.3, 0.6]), MLLCGraphConfig()
    for rnd in rounds:
        zb, fb, rb = rnd(z, f, eta, cfg)
        per = [rnd(z[i:i + 1], f[i:i + 1], eta, cfg) for i in range(6)]
        torch.testing.assert_close(zb, torch.cat([p[0] for p in per]), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(fb, torch.cat([p[1] for p in per]), rtol=1e-6, atol=1e-6)
        assert torch.equal(rb, torch.cat([p[2] for p in per]))
        z, f = zb.detach(), fb.detach()


@pytest.mark.parametrize("form", ["dense", "edges"])
def test_views_batched_equal_per_view_and_per_image(form, monkeypatch):
    """The step as it runs (views x + s1 in one batch of rounds, the graphs of several images at once) against
    one view and one image at a time: the same levels, losses and gradients, for either graph form.

    One round: a later round's kNN runs on class-propagated features, which lie in a C-dim subspace per class,
    so many of their cosines are equal to ~1e-7 and which of them pass the (k+1)-th largest depends on float
    rounding of the inputs (in the code as here); test_graph_round_batched_equals_per_image covers such inputs
    given identically."""
    def step_losses(m):
        mod = m.modules["mllc"]
        mod.protos.normal_(generator=torch.Generator().manual_seed(9))  # as after some steps
        out = fake_step(mod, 11, bx=3, bu=4, h=6, w=7)
        losses = m.losses(out)
        losses["loss"].backward()
        grads = [p.grad.clone() for p in mod.parameters()]
        return out, losses, grads

    # (mllc_pair is left out: its BCE at cos ~ 1 - 1e-7 turns float rounding of the features into 1e-4 of loss;
    # the features it reads are compared below)
    terms = {"mllc_proto": {"start": 0.0}, "mllc_u": {"uniform_thresh": 0.6},
             "mllc_x": {"class_init": "identity", "rounds": 1}}
    if form == "edges":
        monkeypatch.setattr(mllc, "DENSE_MAX_NODES", 0)
    torch.manual_seed(5)
    batched = make_method(**terms)
    out_b, losses_b, grads_b = step_losses(batched)
    lx, ls = batched.modules["mllc"]._student["x"], batched.modules["mllc"]._student["s1"]
    assert lx.base.shape[0] == 3 and ls.base.shape[0] == 4  # both views came from one run_views call:
    assert lx.logits[0]._base is ls.logits[0]._base is not None  # slices of one batch of rounds

    monkeypatch.setattr(mllc, "CHUNK", 1)  # one image per chunk
    monkeypatch.setattr(MLLCModule, "_student_views", lambda self, out: [])  # one view per run
    torch.manual_seed(5)
    looped = make_method(**terms)
    out_l, losses_l, grads_l = step_losses(looped)
    assert lx.logits[0]._base is not looped.modules["mllc"]._student["x"].logits[0]._base
    torch.testing.assert_close(out_b.logits_u_w_teacher, out_l.logits_u_w_teacher, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out_b.logits_u_w_mix_teacher, out_l.logits_u_w_mix_teacher, rtol=1e-6, atol=1e-6)
    lv_l = looped.modules["mllc"]._student
    for view, lv in (("x", lx), ("s1", ls)):
        for a, b in zip(lv.logits + lv.feats, lv_l[view].logits + lv_l[view].feats):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    assert min(losses_b[f"loss/{k}"].item() for k in ("mllc_x", "mllc_u", "mllc_proto")) > 0
    for key in ("loss/mllc_x", "loss/mllc_u", "loss/mllc_proto", "loss"):
        torch.testing.assert_close(losses_b[key], losses_l[key], rtol=1e-6, atol=1e-6)
    for gb, gl in zip(grads_b, grads_l):
        torch.testing.assert_close(gb, gl, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape, size", [((2, 3, 32, 32), (16, 16)), ((1, 2, 201, 201), (64, 64)),
                                         ((2, 5, 45, 91), (20, 41)), ((1, 2, 7, 9), (7, 9))])
def test_grid_pool_is_adaptive_avg_pool(shape, size):
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    g = torch.randn(*shape[:2], *size, dtype=torch.float64)
    got, want = mllc.grid_pool(x, size), F.adaptive_avg_pool2d(x, size)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(torch.autograd.grad(got, x, g)[0], torch.autograd.grad(want, x, g)[0])


@pytest.mark.parametrize("h, w, n, want", [(32, 32, 4096, (32, 32)), (201, 201, 4096, (64, 64)),
                                           (64, 128, 4096, (45, 91)), (1, 5000, 4096, (1, 4096))])
def test_graph_grid(h, w, n, want):
    assert graph_grid(h, w, n) == want and want[0] * want[1] <= n


# --------------------------------------------------------------------------------------------------
# terms, by hand


def two_nodes(rounds=1, counts=None, **graph):
    """Two nodes with parallel features (cos 1, so A_hat averages them) and logits [2, 0] / [0, 0.5]."""
    m = module(rounds=rounds, knn=1, class_graph=False, **graph)
    if counts is not None:
        m.class_counts.copy_(torch.tensor(counts))
    low = torch.tensor([[[[2.0, 0.0]], [[0.0, 0.5]]]])  # [1, 2 classes, 1, 2]
    feat = torch.tensor([[[[1.0, 2.0]], [[1.0, 2.0]]]])
    return m, low, feat


def test_mllc_x_hand_computed_with_gating_and_dynamic_threshold():
    # Z' = ([2, 0] + [0, .5]) / 2 = [1, .25] at both nodes; conf = .881 (class 0) and .622 (class 1).
    m, low, feat = two_nodes()
    out = tiny_out(low, feat, mask=torch.tensor([[[0, 1]]]))
    # nothing counted: eta = base_tau = .95, both unreliable: .8 Z' + .2 Z = [1.2, .2] and [.8, .3]
    expected = (math.log1p(math.exp(-1.0)) + math.log1p(math.exp(0.5))) / 2
    assert m.loss_x(out).item() == pytest.approx(expected, rel=1e-6)
    # N = [10, 5]: eta = [.95, .475], node 2 (class 1, conf .622) is reliable: .2 Z' + .8 Z = [.2, .45]
    m, low, feat = two_nodes(counts=[10, 5])
    torch.testing.assert_close(m.eta(), torch.tensor([0.95, 0.475]))
    expected = (math.log1p(math.exp(-1.0)) + math.log1p(math.exp(-0.25))) / 2
    assert m.loss_x(tiny_out(low, feat, mask=torch.tensor([[[0, 1]]]))).item() == pytest.approx(expected, rel=1e-6)
    # fixed thresholds ignore the counts; two rounds sum two CEs
    m, low, feat = two_nodes(counts=[10, 5], dynamic_thresh=False)
    torch.testing.assert_close(m.eta(), torch.tensor([0.95, 0.95]))
    m, low, feat = two_nodes(rounds=2)
    out = tiny_out(low, feat, mask=torch.tensor([[[0, 1]]]))
    lv = m.student(out, "x")
    assert len(lv.logits) == 2 and len(lv.feats) == 3
    expected = sum(F.cross_entropy(z[0], torch.tensor([0, 1])) for z in lv.logits)
    torch.testing.assert_close(m.loss_x(out), expected)


def unsup_out(m, s_low, s_feat, t_logits, ignore):
    out = tiny_out(s_low, s_feat, view="s1", pred_u_s1=s_low, ignore_mask_u=ignore,
                   cutmix_box1=torch.zeros_like(ignore, dtype=torch.float))
    out.logits_u_w_teacher = out.logits_u_w_mix_teacher = t_logits
    out.conf_u_w, out.mask_u_w = confidence(t_logits)
    out.conf_u_w_mix, out.mask_u_w_mix, out.ignore_mask_mix = out.conf_u_w, out.mask_u_w, ignore
    return out


def test_mllc_u_hand_computed_scalar_weight_and_padding():
    # Orthogonal features: A_hat = I, so Z_1 = Z_0 and the loss is w * CE(Z_0, pseudo-label).
    m = module(dim=3, unsup=MLLCUnsupConfig(), knn=1, class_graph=False)
    s_low = torch.tensor([[[[1.0, 0.0, 2.0]], [[0.0, 1.0, 0.0]]]])
    s_feat = torch.eye(3).view(1, 3, 1, 3)
    t = torch.tensor([[[[5.0, 0.0, 0.0]], [[0.0, 2.0, 1.0]]]])  # conf .993, .881, .731; labels 0, 1, 1
    ce = [math.log1p(math.exp(-1.0)), math.log1p(math.exp(-1.0)), math.log1p(math.exp(2.0))]
    out = unsup_out(m, s_low, s_feat, t, torch.zeros(1, 1, 3, dtype=torch.long))
    assert m.loss_u(out).item() == pytest.approx(1 / 3 * sum(ce) / 3, rel=1e-6)  # 1 of 3 pixels >= .968
    padded = torch.tensor([[[0, 0, 255]]])
    out = unsup_out(m, s_low, s_feat, t, padded)
    assert m.loss_u(out).item() == pytest.approx(1 / 2 * (ce[0] + ce[1]) / 2, rel=1e-6)  # padding not counted


def test_mllc_proto_hand_computed_and_start():
    m = module(rounds=0, proto=MLLCProtoConfig(temperature=0.5, start=0.1))  # starts at iteration 10 of 100
    m.protos[0] = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    x_feat = torch.tensor([[[[2.0, 0.0]], [[0.0, 3.0]]]])  # nodes [2, 0] (cos .. protos: 1, .707), [0, 3] (0, .707)
    out = tiny_out(torch.zeros(1, 2, 1, 2, requires_grad=True), x_feat, mask=torch.tensor([[[0, 255]]]), iteration=9)
    assert m.loss_proto(out).item() == 0.0
    out.iteration = 10
    c = 1 / math.sqrt(2)
    expected = math.log1p(math.exp((c - 1) / 0.5))  # node 1, label 0; node 2 ignored
    assert m.loss_proto(out).item() == pytest.approx(expected, rel=1e-6)


def test_mllc_pair_hand_computed_and_ignore():
    m = module(rounds=0, pair=MLLCPairConfig(max_nodes=16))
    feat = torch.tensor([[[[1.0, 1.0, 0.0]], [[0.0, 1.0, 1.0]]]])  # nodes (1, 0), (1, 1), (0, 1)
    out = tiny_out(torch.zeros(1, 2, 1, 3), feat, mask=torch.tensor([[[0, 0, 1]]]))
    lo, hi, c = 1e-10, 1 - 1e-7, 1 / math.sqrt(2)  # cos(1,2) = cos(2,3) = c, cos(1,3) = 0 -> clamped to lo
    same = -math.log(hi)  # a node with itself: cos 1, same label
    pairs = [same] * 3 + [-math.log(c)] * 2 + [-math.log(1 - c)] * 2 + [-math.log(1 - lo)] * 2  # (1,2) (2,3) (1,3)
    assert m.loss_pair(out).item() == pytest.approx(sum(pairs) / 9, rel=1e-5)
    out = tiny_out(torch.zeros(1, 2, 1, 3), feat, mask=torch.tensor([[[0, 255, 0]]]))  # node 2 out of every pair
    assert m.loss_pair(out).item() == pytest.approx((2 * same + 2 * -math.log(lo)) / 4, rel=1e-5)


def test_near_zero_when_student_agrees_with_targets():
    # mllc_x / mllc_u: large-margin logits that match the labels; pair: one-hot features of the labels;
    # proto: features equal to the prototypes at a sharp temperature.
    labels = torch.tensor([[[0, 1, 1, 0]]])
    low = F.one_hot(labels, 2).permute(0, 3, 1, 2).float() * 40
    feat = F.one_hot(labels, 2).permute(0, 3, 1, 2).float()
    m = module(rounds=2, dim=2, proto=MLLCProtoConfig(temperature=0.01, start=0.0), pair=MLLCPairConfig(),
               unsup=MLLCUnsupConfig(), class_graph=False)  # F_k = F_0: the features stay one-hot
    m.protos.copy_(torch.eye(2).expand(3, 2, 2))
    out = tiny_out(low, feat, mask=labels)
    assert m.loss_x(out).item() < 1e-6
    assert m.loss_proto(out).item() < 1e-6
    assert m.loss_pair(out).item() < 1e-5
    out = unsup_out(m, low, feat, low, torch.zeros_like(labels))
    assert m.loss_u(out).item() < 1e-6


def test_empty_masks_give_finite_zero_with_graph():
    m = make_method(**{"mllc_pair": {"weight": 0.1}})
    out = fake_step(m.modules["mllc"], 3)
    out.mask_x = torch.full_like(out.mask_x, 255)
    out.ignore_mask_u = torch.full_like(out.ignore_mask_u, 255)
    out.ignore_mask_mix = torch.full_like(out.ignore_mask_mix, 255)
    losses = m.losses(out)
    terms = [losses[f"loss/{key}"] for key in ("mllc_x", "mllc_u", "mllc_proto", "mllc_pair")]
    assert [t.item() for t in terms] == [0.0] * 4
    sum(terms).backward()  # still a graph: no NaN, no "does not require grad"


# --------------------------------------------------------------------------------------------------
# gradients, teacher, state


def test_no_gradient_into_teacher_or_state_and_heads_train():
    torch.manual_seed(0)
    cfg = TrialConfig.from_dict({"model": {"width": 8}, "method": {"name": "meanteacher+mllc"}})
    model = build_model(cfg.model, K)
    method = build_method(cfg.method, K, 255, model.feature_dims, 100)
    ts = TeacherStudent(model, cfg.method, method.needs, refine_teacher=method.refine_teacher)
    method.modules["mllc"].protos.normal_()  # as after some steps (empty prototypes give constant logits)
    g = torch.Generator().manual_seed(0)

    def img(b):
        return torch.randn(b, 3, 32, 32, generator=g)

    box = torch.zeros(2, 32, 32)
    box[:, 8:20, 8:20] = 1
    batch_u = {"img_u_w": img(2), "img_u_s1": img(2), "img_u_s2": img(2), "cutmix_box1": box, "cutmix_box2": box,
               "ignore_mask_u": torch.zeros(2, 32, 32, dtype=torch.long)}
    batch_mix = {"img_u_w": img(2), "img_u_s1": img(2), "img_u_s2": img(2),
                 "ignore_mask_u": torch.zeros(2, 32, 32, dtype=torch.long)}
    out = ts.step({"img_x": img(2), "mask_x": torch.randint(0, K, (2, 32, 32), generator=g)}, batch_u, batch_mix,
                  iteration=50)
    assert not out.logits_u_w_teacher.requires_grad and not out.logits_u_w_mix_teacher.requires_grad
    base = out.model_out["t_u_w"]["logits"]
    assert out.logits_u_w_teacher.shape == base.shape and not torch.equal(out.logits_u_w_teacher, base)
    method.losses(out)["loss"].backward()
    assert all(p.grad is None for p in ts.teacher.model.parameters())
    mod = method.modules["mllc"]
    assert all(not b.requires_grad for b in mod.buffers())
    assert all(p.grad is not None for p in mod.rounds.parameters())  # mllc_x/mllc_u and the proto levels
    assert mod.feat_proj[0].weight.grad.abs().sum() > 0
    assert model.decoder.classifier.weight.grad is not None


def test_refine_teacher_pseudo_from_and_rounds():
    for terms in ({"mllc_x": {"pseudo_from": "base"}}, {"mllc_x": {"rounds": 0}}):
        m = make_method(**terms)
        assert not m.refines_teacher or m.refine_teacher(fake_step(m.modules["mllc"], 0).model_out["t_u_w"]) is None
    # orthogonal one-hot features and the identity class convs: A_hat = I and Z_k = Z_0, so the refined logits
    # are the model's own (same align_corners=True upsampling when the map is not pooled)
    m = module(rounds=2, dim=4, knn=1, class_graph=False)
    low = torch.randn(1, 2, 2, 2)
    d = {"logits_low": low, "features": torch.eye(4).view(1, 4, 2, 2), "logits": upsample(low, (3, 3))}
    torch.testing.assert_close(m.refine_teacher(d), d["logits"])


@pytest.mark.parametrize("pooled_output", ["residual", "direct"])
def test_pooled_graph_returns_to_full_resolution(pooled_output):
    # 4 x 4 map pooled to 2 x 2 nodes with orthogonal features: the rounds change nothing (Z_k = Z_0), so the
    # residual form gives back the model's own full-resolution logits and the direct form the pooled ones
    m = module(rounds=1, dim=4, knn=1, class_graph=False, graph_max_nodes=4, pooled_output=pooled_output)
    low = torch.randn(1, 2, 4, 4)
    feat = torch.eye(4).view(1, 4, 2, 2).repeat_interleave(2, 2).repeat_interleave(2, 3)  # one-hot per 2 x 2 cell
    d = {"logits_low": low, "features": feat, "logits": upsample(low, (7, 7))}
    refined = m.refine_teacher(d)
    pooled = F.interpolate(F.adaptive_avg_pool2d(low, 2), size=(7, 7), mode="bilinear", align_corners=False)
    torch.testing.assert_close(refined, d["logits"] if pooled_output == "residual" else pooled)


def test_class_counters_and_prototypes_after_step():
    m = make_method()
    mod = m.modules["mllc"]
    out = fake_step(mod, 1)
    m.losses(out)
    m.after_step(out)
    expected = confident_counts(out)
    assert torch.equal(mod.class_counts, expected) and expected.sum() > 0
    assert mod.proto_seen.all() and mod.protos.abs().sum() > 0
    first = mod.protos.clone()
    out = fake_step(mod, 2)
    m.losses(out)
    # EMA 0.99 of this step's class means: labeled features (GT) and teacher weak-view features (its last round's
    # argmax), on the graph grid, padding/ignore left out
    lx = mod.student(out, "x")
    lt = mod.teacher(out.model_out["t_u_w"])
    labels = torch.cat([mod.to_grid(out.mask_x, lx).flatten(),
                        lt.last.argmax(-1).masked_fill(mod.to_grid(out.ignore_mask_u, lt) == 255, 255).flatten()])
    want = first.clone()
    for level in range(3):
        feats = torch.cat([lx.feats[level].detach().flatten(0, 1), lt.feats[level].flatten(0, 1)])
        for c in range(K):
            want[level, c] = 0.99 * first[level, c] + 0.01 * feats[labels == c].mean(0)
    m.after_step(out)
    torch.testing.assert_close(mod.protos, want)
    assert torch.equal(mod.class_counts, expected + confident_counts(out))  # never reset
    diag = m.diagnostics()
    assert {"train/mllc/eta_min", "train/mllc/eta_mean", "train/mllc/reliable", "train/mllc/corrected",
            "train/mllc/nodes"} <= set(diag)


def test_state_dict_round_trip():
    a = make_method()
    for seed in (4, 5):
        out = fake_step(a.modules["mllc"], seed)
        a.losses(out)["loss"].backward()
        a.after_step(out)
    state = a.modules.state_dict()
    assert {"mllc.class_counts", "mllc.protos", "mllc.proto_seen"} <= set(state)
    torch.manual_seed(123)  # different initial weights, all overwritten
    b = make_method()
    b.modules.load_state_dict(state)
    for k, v in b.modules.state_dict().items():
        assert torch.equal(v, state[k]), k
    out_a, out_b = fake_step(a.modules["mllc"], 6), fake_step(b.modules["mllc"], 6)
    torch.testing.assert_close(out_a.logits_u_w_teacher, out_b.logits_u_w_teacher, rtol=0, atol=0)
    torch.testing.assert_close(a.losses(out_a)["loss"], b.losses(out_b)["loss"], rtol=0, atol=0)


class _LargestTensor(TorchDispatchMode):
    """Records the element count of the largest tensor any op produces."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        for r in result if isinstance(result, (tuple, list)) else (result,):
            if isinstance(r, torch.Tensor):
                self.largest = max(self.largest, r.numel())
        return result


def test_graph_node_bound_at_crop_801():
    """DeepLabV3+ at crop 801, stride 4: a 201 x 201 decoder map (40,401 pixels) -> at most 4,096 nodes."""
    torch.manual_seed(0)
    m = module(rounds=2, dim=8)
    low = torch.randn(1, 2, 201, 201)
    d = {"logits_low": low, "features": torch.rand(1, 8, 201, 201), "logits": upsample(low, (801, 801))}
    with torch.no_grad(), _LargestTensor() as probe:
        lv = m.run(d)
    assert lv.size == (64, 64) and lv.pooled and m._nodes == 4096
    assert all(z.shape == (1, 4096, 2) for z in lv.logits) and all(f.shape == (1, 4096, 8) for f in lv.feats)
    assert probe.largest <= 4096 ** 2  # the N x N similarity of one image; unpooled it would be 40401^2
    assert probe.largest >= 4096 ** 2  # (and it is there: the bound is tight, not a smaller graph)
    assert m.to_full(lv.last, lv).shape == (1, 2, 801, 801)


# --------------------------------------------------------------------------------------------------
# DDP: state identical across ranks that see different data


def _ddp_worker(rank, world, init_file, result_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        torch.manual_seed(0)  # identical initial weights, as the trainer seeds before building
        m = make_method()
        mod = m.modules["mllc"]
        local = torch.zeros(K, dtype=torch.long)
        for step in range(2):
            out = fake_step(mod, seed=100 * rank + step)
            local += confident_counts(out)
            m.losses(out)["loss"].backward()
            m.sync_grads()
            with torch.no_grad():
                for p in mod.parameters():
                    if p.grad is not None:
                        p -= 0.1 * p.grad
                        p.grad = None
            m.after_step(out)
        torch.save({"state": mod.state_dict(), "local": local}, os.path.join(result_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.ddp
def test_ddp_counters_and_prototypes_identical_across_ranks(tmp_path):
    # fork: the children inherit the imported modules (spawn would re-import torch and sslray, ~10 s on 2 cores)
    mp.start_processes(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True,
                       start_method="fork")
    r0, r1 = (torch.load(tmp_path / f"{r}.pt") for r in (0, 1))
    assert not torch.equal(r0["local"], r1["local"])  # the ranks saw different data
    for k, v in r0["state"].items():
        assert torch.equal(v, r1["state"][k]), k  # counters, prototypes and the trained heads
    assert torch.equal(r0["state"]["class_counts"], r0["local"] + r1["local"])


# --------------------------------------------------------------------------------------------------
# config, presets, training


def test_settings_are_validated_with_their_key():
    for over, key in ((("mllc_x", "rounds", -1), "method.terms.mllc_x.rounds"),
                      (("mllc_x", "pseudo_from", "pred2"), "method.terms.mllc_x.pseudo_from"),
                      (("mllc_x", "knn", 0), "method.terms.mllc_x.knn"),
                      (("mllc_x", "class_init", "eye"), "method.terms.mllc_x.class_init"),
                      (("mllc_u", "uniform_thresh", 1.5), "method.terms.mllc_u.uniform_thresh"),
                      (("mllc_proto", "temperature", 0.0), "method.terms.mllc_proto.temperature"),
                      (("mllc_pair", "max_nodes", 1), "method.terms.mllc_pair.max_nodes")):
        term, setting, value = over
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            TrialConfig.from_dict({"method": {"name": "mllc", "terms": {term: {setting: value}}}})
    with pytest.raises(ConfigError, match=r"method\.terms\.mllc_x\.weight: mllc_proto, mllc_u need mllc_x"):
        TrialConfig.from_dict({"method": {"name": "mllc", "terms": {"mllc_x": {"weight": 0}}}})


def test_presets_compose_with_every_base():
    mllc = {"mllc_x", "mllc_u", "mllc_proto", "mllc_pair"}
    cfg = method_cfg("mllc")
    assert set(cfg.terms) == {"x", "u_s1"} | mllc and cfg.teacher.kind == "self" and cfg.global_div == 2.0
    assert cfg.terms["mllc_proto"].weight == 0.1 and cfg.terms["mllc_pair"].weight == 0.0
    cfg = method_cfg("unimatch+mllc")
    assert set(cfg.terms) == {"x", "u_s1", "u_s2", "u_fp"} | mllc and cfg.terms["u_s2"].weight == 0.25
    cfg = method_cfg("meanteacher+mllc")
    assert set(cfg.terms) == {"x", "u_s1"} | mllc and cfg.teacher.kind == "ema"


def test_no_graph_and_no_proto_is_the_base_method():
    m = make_method(**{"mllc_x": {"rounds": 0}, "mllc_proto": {"weight": 0}})
    base = build_method(method_cfg("fixmatch"), K, 255, {"features": D0}, 100)
    out = fake_step(m.modules["mllc"], 7)
    assert torch.equal(out.logits_u_w_teacher, out.model_out["t_u_w"]["logits"])  # not refined
    got, ref = m.losses(out), base.losses(out)
    assert got["loss/mllc_x"].item() == got["loss/mllc_u"].item() == 0.0
    torch.testing.assert_close(got["loss"], ref["loss"], rtol=0, atol=0)


TINY = {
    "name": "tiny",
    "data": {"partition": "4", "batch_size_x": 4, "batch_size_u": 4, "crop_size": 32,
             "synthetic": {"size": 32, "num_train": 24, "num_val": 6}},
    "model": {"width": 8},
    "method": {"name": "mllc", "conf_thresh": 0.5, "terms": {"mllc_pair": {"weight": 0.1}}},
    "optim": {"lr": 0.05, "head_lr_mult": 1.0},
    "train": {"iterations": 6, "eval_every": 3},
    "run": {"log_every": 1, "progress": "off", "threads": 1},
}


def test_fit_resume_equals_uninterrupted(tmp_path):
    cfg = TrialConfig.from_dict(TINY)
    reports = []
    fit(cfg, Runtime(), lambda m, c: reports.append(m), out_dir=str(tmp_path / "full"))
    assert all(math.isfinite(m["train/loss"]) for m in reports)
    assert reports[-1]["train/loss/mllc_proto"] > 0 and reports[-1]["train/loss/mllc_pair"] > 0

    _, resumed, _ = crash_then_resume(cfg, tmp_path, at=3)
    assert resumed[-1]["train/loss"] == pytest.approx(reports[-1]["train/loss"], rel=1e-6)
    a, b = checkpoint(tmp_path / "full"), checkpoint(tmp_path / "cut")
    for part in ("model", "method"):
        for k in a[part]:
            torch.testing.assert_close(a[part][k], b[part][k], rtol=0, atol=0)
    assert a["method"]["mllc.class_counts"].sum() > 0


def test_ablation_study_plans_every_variant():
    study = load_study(os.path.join(ROOT, "studies", "ablation_mllc.yaml"))
    assert set(study.ablation.variants) == {"K1", "K0", "-class_graph", "-dynamic_thresh", "-proto", "+pair",
                                            "pseudo_base", "init_identity", "div2"}
    trials = study.trials()
    assert len(trials) == 10 * 3 and len({t.trial_id for t in trials}) == 30
    k0 = next(t.config for t in trials if t.variant == "K0")
    assert k0.method.terms["mllc_x"].rounds == 0 and k0.method.terms["mllc_proto"].weight == 0
    by_variant = {t.variant: t.config.method.terms["mllc_x"].class_init for t in trials}
    assert by_variant["mllc"] == "code" and by_variant["init_identity"] == "identity"
