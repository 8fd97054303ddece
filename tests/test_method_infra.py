"""The machinery the founding methods plug into: views of one step, add-on presets, family modules
(trained, checkpointed, resumed, DDP-synced) and the teacher-refinement hook."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
from dataclasses import dataclass

from sslray.config import TrialConfig
from sslray.methods import FAMILIES, METHOD_PRESETS, TERMS, build_method
from sslray.methods.base import Family, MethodModule, Term, TermConfig, all_gather_cat, all_reduce_sum
from sslray.models import build_model
from sslray.teacher_student import TeacherStudent
from sslray.trainer import Runtime, fit

from test_trainer import TINY, checkpoint, crash_then_resume, tiny


def _batches(bx=2, bu=3, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    batch_x = {"img_x": torch.randn(bx, 3, size, size, generator=g),
               "mask_x": torch.randint(0, 3, (bx, size, size), generator=g)}

    def u():
        return {"img_u_w": torch.randn(bu, 3, size, size, generator=g),
                "img_u_s1": torch.randn(bu, 3, size, size, generator=g),
                "img_u_s2": torch.randn(bu, 3, size, size, generator=g),
                "ignore_mask_u": torch.zeros(bu, size, size, dtype=torch.long),
                "cutmix_box1": (torch.rand(bu, size, size, generator=g) > 0.5).long(),
                "cutmix_box2": (torch.rand(bu, size, size, generator=g) > 0.5).long()}
    return batch_x, u(), u()


def _step(method_name, **over):
    cfg = TrialConfig.from_dict({"method": {"name": method_name, **over}, "model": {"width": 8}})
    torch.manual_seed(0)
    model = build_model(cfg.model, 3)
    method = build_method(cfg.method, 3, 255, model.feature_dims)
    ts = TeacherStudent(model, cfg.method, method.needs,
                        refine_teacher=method.refine_teacher if method.refines_teacher else None)
    return ts.step(*_batches(), iteration=0), model


def _ts(method_name, **over):
    cfg = TrialConfig.from_dict({"method": {"name": method_name, **over}, "model": {"width": 8}})
    torch.manual_seed(0)
    model = build_model(cfg.model, 3)
    method = build_method(cfg.method, 3, 255, model.feature_dims)
    return TeacherStudent(model, cfg.method, method.needs,
                          refine_teacher=method.refine_teacher if method.refines_teacher else None), model


def _bn(module):
    return {n: m for n, m in module.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}


@pytest.mark.parametrize("bn_stats", ["ema", "forward"])
def test_ema_teacher_pseudo_labels_are_eval_mode(bn_stats):
    """An EMA teacher predicts with BN running statistics (U2PL/PCR/UniMatch V2 ``model_teacher.eval()``): one
    image's pseudo-label does not depend on the other images of its batch, and the teacher stays in eval mode."""
    batch_x, batch_u, batch_mix = _batches()
    other = {**batch_u, "img_u_w": torch.cat((batch_u["img_u_w"][:1], 3 + 2 * torch.randn(2, 3, 32, 32)))}
    ts_a, _ = _ts("meanteacher", teacher={"bn_stats": bn_stats})
    ts_b, _ = _ts("meanteacher", teacher={"bn_stats": bn_stats})
    a = ts_a.step(batch_x, batch_u, batch_mix).logits_u_w_teacher
    b = ts_b.step(batch_x, other, batch_mix).logits_u_w_teacher
    torch.testing.assert_close(a[0], b[0])
    assert not ts_a.teacher.model.training
    assert ts_a.student.training  # the student is untouched


def test_forward_bn_stats_come_from_the_teachers_own_train_mode_pass():
    """``bn_stats: forward`` (U2PL): the EMA averages parameters only; the teacher's running statistics are
    those of one no-grad train-mode pass on cat(x, CutMixed s1), after its eval-mode pseudo-labels."""
    import copy

    from sslray.teacher_student import paste

    batch_x, batch_u, batch_mix = _batches()
    ts, model = _ts("meanteacher", teacher={"bn_stats": "forward"})
    ref = copy.deepcopy(ts.teacher.model).train()
    out = ts.step(batch_x, batch_u, batch_mix)
    with torch.no_grad():
        ref(torch.cat((batch_x["img_x"], paste(batch_u["img_u_s1"], batch_mix["img_u_s1"], batch_u["cutmix_box1"]))))
    for name, bn in _bn(ts.teacher.model).items():
        torch.testing.assert_close(bn.running_mean, _bn(ref)[name].running_mean)
        torch.testing.assert_close(bn.running_var, _bn(ref)[name].running_var)
    assert out.part("t_train")["logits"].shape[0] == 2 + 3 and not ts.teacher.model.training
    before = {n: bn.running_mean.clone() for n, bn in _bn(ts.teacher.model).items()}
    ts.after_optimizer_step()  # parameters only: the student's statistics are not averaged in
    assert all(torch.equal(bn.running_mean, before[n]) for n, bn in _bn(ts.teacher.model).items())


def _ema_presets():
    return [n for n in METHOD_PRESETS if TrialConfig.from_dict({"method": {"name": n}}).method.teacher.kind == "ema"]


def test_presets_teacher_bn_stats_follow_their_source():
    assert {"meanteacher", "pcr"} <= set(_ema_presets())
    bn = lambda name: TrialConfig.from_dict({"method": {"name": name}}).method.teacher.bn_stats  # noqa: E731
    assert bn("meanteacher") == "ema"  # CutMix-Seg / UniMatch V2
    assert bn("pcr") == bn("pcr_base") == "forward"  # U2PL: parameters only + the teacher's own train pass


@pytest.mark.parametrize("preset", _ema_presets())
def test_every_ema_preset_keeps_teacher_bn_stats_current(preset):
    """Eval-mode teacher + whatever each preset's bn_stats is: after a few steps the teacher's running
    statistics have moved from their initial values (never stale)."""
    ts, model = _ts(preset)
    init = {n: bn.running_mean.clone() for n, bn in _bn(ts.teacher.model).items()}
    assert init
    for it in range(3):
        ts.step(*_batches(seed=it), iteration=it)
        ts.after_optimizer_step()
    for n, bn in _bn(ts.teacher.model).items():
        assert not torch.allclose(bn.running_mean, init[n]), n


def test_parts_slice_each_view_of_the_shared_forward():
    out, model = _step("unimatch")
    x, u_w, s1, s2, t = out.part("x"), out.part("u_w"), out.part("s1"), out.part("s2"), out.part("t_u_w")
    assert x["logits"].shape[0] == 2 and u_w["logits"].shape[0] == 3 and s1["features"].shape[0] == 3
    assert torch.equal(x["logits"], out.pred_x) and torch.equal(u_w["logits"], out.pred_u_w)
    assert torch.equal(s1["logits"], out.pred_u_s1) and torch.equal(s2["logits"], out.pred_u_s2)
    assert u_w["features"].requires_grad and not t["features"].requires_grad
    assert torch.equal(t["logits"], out.logits_u_w_teacher)
    dims = model.feature_dims
    assert x["features"].shape[1] == dims["features"] and x["aspp"].shape[1] == dims["aspp"]
    assert x["low"].shape[1] == dims["low"] and x["logits_low"].shape[1] == dims["classes"] == 3
    assert out.part("t_mix")["logits"].shape[0] == 3


def test_supervised_step_has_only_the_labeled_view():
    out, _ = _step("supervised")
    assert out.part("x")["logits"] is out.pred_x and out.part("u_w") is None and out.part("t_u_w") is None


def test_addon_preset_base_applies_only_when_standalone(monkeypatch):
    monkeypatch.setitem(METHOD_PRESETS, "addon", {"base": "unimatch", "terms": {"u_mse": {"weight": 2.0}}})
    alone = TrialConfig.from_dict({"method": {"name": "addon"}}).method
    assert set(alone.terms) == {"x", "u_s1", "u_s2", "u_fp", "u_mse"} and alone.global_div == 2.0
    composed = TrialConfig.from_dict({"method": {"name": "fixmatch+addon"}}).method
    assert set(composed.terms) == {"x", "u_s1", "u_mse"} and composed.terms["u_mse"].weight == 2.0


# ----------------------------------------------------------------------------------------------
# a toy family: one trainable scale, one counter buffer, and a teacher override


@dataclass(frozen=True)
class ToyConfig(TermConfig):
    shift: float = 0.0


class ToyModule(MethodModule):
    def __init__(self, terms, ctx):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(ctx.feature_dims["features"]))
        self.register_buffer("seen", torch.zeros(ctx.num_classes, dtype=torch.float64))
        self.refined = 0

    def refine_teacher(self, model_out):
        self.refined += 1
        return model_out["logits"] * 2.0

    @torch.no_grad()
    def after_step(self, out):
        counts = torch.bincount(out.mask_u_w.flatten(), minlength=self.seen.numel()).double()
        self.seen += all_reduce_sum(counts)

    def diagnostics(self):
        return {"seen": self.seen.sum().float()}


def toy_loss(out, cfg, ctx, module):
    feat = out.part("u_w")["features"]  # [Bu, D, h, w]
    return ((feat * module.scale[:, None, None]).mean() - cfg.shift) ** 2


TOY = {"TERMS": ("toy", Term(toy_loss, ToyConfig, frozenset({"u", "w"}), "test term", family="toy")),
       "FAMILIES": ("toy", Family(ToyModule, "test family")),
       "METHOD_PRESETS": ("toy", {"base": "fixmatch", "terms": {"toy": {"weight": 1.0, "shift": 1.0}}})}


@pytest.fixture
def toy(monkeypatch):
    for registry, (key, value) in zip((TERMS, FAMILIES, METHOD_PRESETS), TOY.values()):
        monkeypatch.setitem(registry, key, value)


def test_family_module_refines_teacher_and_sees_views(toy):
    out, _ = _step("toy")
    torch.testing.assert_close(out.logits_u_w_teacher, out.part("t_u_w")["logits"] * 2.0)
    assert out.conf_u_w.shape == out.mask_u_w.shape


def test_family_module_trains_checkpoints_and_resumes(toy, tmp_path):
    cfg = tiny(**{"method.name": "toy", "method.conf_thresh": 0.5, "train.iterations": 6, "train.eval_every": 3})
    reports = []
    full = fit(cfg, Runtime(), lambda m, c: reports.append(m), out_dir=str(tmp_path / "full"))
    state = torch.load(tmp_path / "full" / "checkpoint" / "state.pt", weights_only=False)["method"]
    assert not torch.equal(state["toy.scale"], torch.ones_like(state["toy.scale"]))  # trained (head lr)
    pixels_per_step = cfg.data.batch_size_u * cfg.data.crop_size ** 2
    assert float(state["toy.seen"].sum()) == 6 * pixels_per_step
    assert "train/toy/seen" in reports[-1] and "train/loss/toy" in reports[-1]

    resumed, _, _ = crash_then_resume(cfg, tmp_path, at=3)
    cut = checkpoint(tmp_path / "cut")["method"]
    for k in state:
        torch.testing.assert_close(cut[k], state[k], rtol=0, atol=0)
    assert resumed["val/confusion"] == full["val/confusion"]


# ----------------------------------------------------------------------------------------------
# DDP: gradients of family modules are averaged, gathered tensors and sums agree on every rank


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, result_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    for registry, (key, value) in zip((TERMS, FAMILIES, METHOD_PRESETS), TOY.values()):
        registry[key] = value  # a fresh process: register the toy family again
    try:
        cfg = TrialConfig.from_dict({**TINY, "method": {"name": "toy"}})
        method = build_method(cfg.method, 3, 255, {"features": 4})
        p = method.modules["toy"].scale
        p.grad = torch.full_like(p, float(rank + 1))  # rank 0: 1, rank 1: 2 -> mean 1.5
        method.sync_grads()
        gathered = all_gather_cat(torch.arange(rank + 1, dtype=torch.float32))  # sizes 1 and 2
        total = all_reduce_sum(torch.tensor([float(rank + 1)]))
        torch.save({"grad": p.grad, "gathered": gathered, "total": total}, os.path.join(result_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.ddp
def test_family_grads_and_stats_identical_across_ranks(toy, tmp_path):
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"{r}.pt") for r in (0, 1))
    for r in (r0, r1):
        torch.testing.assert_close(r["grad"], torch.full((4,), 1.5))
        torch.testing.assert_close(r["gathered"], torch.tensor([0.0, 0.0, 1.0]))
        torch.testing.assert_close(r["total"], torch.tensor([3.0]))
