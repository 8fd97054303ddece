"""The host-read-free forms of the method heads (issue 16) equal the forms they replaced, on random inputs.

Each old form is written out here as it was (boolean-mask indexing, host-side counts and branches) and compared
with the module's current one: OHEM's mining, U2PL's percentile over valid pixels, PCR's prototype update,
MLLC's class counters and prototype sums, GuidedMix's lambda.
"""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sslray.methods.base import ModuleContext
from sslray.methods.guidedmix import sample_lambda, sample_lambda_tensor
from sslray.methods.mllc import MLLCGraphConfig, MLLCModule, MLLCProtoConfig
from sslray.methods.pcr import PCRConfig, PCRModule, masked_percentile, percentile
from sslray.methods.supervised import ohem_ce

IGN = 255


def old_ohem_ce(logits, target, ignore_index, thresh, min_kept):
    logits = logits.float()
    valid = target != ignore_index
    n_valid = int(valid.sum())
    if n_valid == 0:
        return logits.sum() * 0.0
    tgt = torch.where(valid, target, torch.zeros_like(target))
    prob_true = torch.softmax(logits, 1).gather(1, tgt.unsqueeze(1)).squeeze(1)
    keep = valid
    if n_valid > min_kept > 0:
        kth = torch.kthvalue(prob_true[valid], min(min_kept, n_valid)).values
        keep = valid & (prob_true <= torch.clamp(kth, min=thresh))
    return F.cross_entropy(logits, torch.where(keep, target, torch.full_like(target, ignore_index)),
                           ignore_index=ignore_index)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("min_kept", [0, 1, 7, 40, 128, 10_000])
@pytest.mark.parametrize("valid_share", [0.0, 0.02, 0.5, 1.0])
def test_ohem_equals_the_host_counted_form(seed, min_kept, valid_share):
    g = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(2, 4, 8, 8, generator=g)).requires_grad_()
    target = torch.randint(0, 4, (2, 8, 8), generator=g)
    target[torch.rand(2, 8, 8, generator=g) >= valid_share] = IGN
    for thresh in (0.3, 0.7):
        new, old = ohem_ce(logits, target, IGN, thresh, min_kept), old_ohem_ce(logits, target, IGN, thresh, min_kept)
        torch.testing.assert_close(new, old)
        ga, = torch.autograd.grad(new, logits)
        gb, = torch.autograd.grad(old, logits)
        torch.testing.assert_close(ga, gb)


@pytest.mark.parametrize("seed", range(5))
def test_masked_percentile_equals_percentile_of_the_valid_values(seed):
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(3, 7, 5, generator=g)
    values[0, :2] = 0.25  # ties
    for share in (1.0, 0.5, 0.05):
        valid = torch.rand(3, 7, 5, generator=g) < share
        valid.view(-1)[0] = True  # at least one
        for q in (0.0, 12.5, 50.0, 80.0, 99.9, 100.0):
            want = percentile(values[valid], q)
            torch.testing.assert_close(masked_percentile(values, valid, q), want)
            assert float(want) == pytest.approx(np.percentile(values[valid].numpy(), q), rel=1e-5, abs=1e-6)
    assert masked_percentile(values, torch.zeros_like(values, dtype=torch.bool), 50.0).shape == ()  # no valid: no error


def old_pcr_update(m: PCRModule, feat, logits, idx, target, conf):
    keep = target != m.ignore_index
    if conf is not None:
        keep &= conf >= m.cfg.confid_thresh
    if m.cfg.update_cond == "correct":
        keep &= logits.argmax(1) == target
    tgt = target[keep]
    key = tgt * m.cfg.num_protos + idx[keep].gather(1, tgt[:, None]).squeeze(1)
    f = feat[keep]
    stats = torch.zeros(m.protos.shape[0], m.dim + 1).index_add_(0, key, torch.cat((f, torch.ones_like(f[:, :1])), 1))
    count, mean = stats[:, -1:], stats[:, :-1] / stats[:, -1:].clamp(min=1)
    mom = m.cfg.momentum
    return torch.where(count > 0, mom * m.protos + (1.0 - mom) * mean, m.protos)


@pytest.mark.parametrize("cond", ["correct", "all"])
@pytest.mark.parametrize("seed", range(3))
def test_pcr_fixed_size_update_equals_the_masked_one(cond, seed):
    torch.manual_seed(seed)
    c, d, n = 3, 6, 200
    m = PCRModule(PCRConfig(feature="features", init="random", warmup_frac=0.0, update_cond=cond, momentum=0.9),
                  ModuleContext(num_classes=c, iterations=10, feature_dims={"features": d}))
    feat = torch.randn(n, d)
    target = torch.randint(0, c, (n,))
    target[torch.rand(n) < 0.3] = IGN
    conf = torch.rand(n)
    logits, idx = m.head(feat)
    want = old_pcr_update(m, feat, logits, idx, target, conf)
    f, key = m._select(feat, logits, idx, target, conf)
    m._momentum_update(f, key)
    torch.testing.assert_close(m.protos, want)


def test_mllc_counts_and_prototype_sums_equal_the_masked_forms():
    torch.manual_seed(0)
    g = MLLCGraphConfig(rounds=1, base_tau=0.6)
    m = MLLCModule(g, None, MLLCProtoConfig(momentum=0.8), None, ModuleContext(3, feature_dims={"features": 4}))
    logits = 3 * torch.randn(2, 3, 6, 6)
    valid = torch.rand(2, 6, 6) < 0.7
    conf, cls = torch.softmax(logits, 1).max(1)
    want = torch.bincount(cls[(conf >= 0.6) & valid], minlength=3)
    assert torch.equal(m._confident(logits, valid), want)

    labels = torch.randint(0, 3, (2, 36))
    labels[torch.rand(2, 36) < 0.3] = IGN
    feats = torch.randn(2, 36, 4)
    keep = labels != IGN
    sums = torch.zeros(3, 4).index_add_(0, labels[keep], feats[keep])
    counts = torch.zeros(3).index_add_(0, labels[keep], torch.ones(int(keep.sum())))
    lv = type("Lv", (), {"feats": [feats]})()
    m.protos = torch.zeros(1, 3, 4)
    m.student = lambda out, view: lv
    m.to_grid = lambda y, lv: labels
    m._update_protos(type("Out", (), {"mask_x": None})(), None)
    seen = counts > 0
    torch.testing.assert_close(m.protos[0], torch.where(seen[:, None], sums / counts.clamp(min=1)[:, None], 0.0))
    assert torch.equal(m.proto_seen, seen)


def test_guidedmix_lambda_tensor_is_the_same_draw():
    for lam_max in (0.3, 0.9):
        torch.manual_seed(3)
        floats = [sample_lambda(lam_max) for _ in range(50)]
        torch.manual_seed(3)
        tensors = [sample_lambda_tensor(lam_max) for _ in range(50)]
        assert floats == [float(t) for t in tensors] and all(t.dtype == torch.float64 for t in tensors)
    x = torch.randn(4, 5)
    t = sample_lambda_tensor(0.5)
    assert torch.equal(t * x + (1.0 - t) * x.flip(0), float(t) * x + (1.0 - float(t)) * x.flip(0))
