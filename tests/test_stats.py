"""Significance helpers: exact small-sample tests pinned by hand and against scipy, Holm, bootstrap of mIoU."""
import math

import numpy as np
import pytest

from sslray import stats


def test_paired_t_by_hand():
    # d = [5, 4, 3]: mean 4, sd 1, t = 4 / (1 / sqrt 3) = 6.928, df 2: p = 1 - t / sqrt(t^2 + 2) exactly
    r = stats.paired_t([35, 36, 37], [30, 32, 34])
    t = 4 * math.sqrt(3)
    assert (r.test, r.n) == ("t", 3) and r.statistic == pytest.approx(t)
    assert r.p == pytest.approx(1 - t / math.sqrt(t * t + 2), rel=1e-12)  # the df = 2 closed form
    assert stats.paired_t([2, 3], [1, 2]).p == 0.0 and stats.paired_t([1, 2], [1, 2]).p == 1.0
    with pytest.raises(ValueError, match="at least 2 pairs"):
        stats.paired_t([1.0], [0.0])


def test_wilcoxon_exact_by_hand():
    r = stats.wilcoxon([2, 3, 4, 5, 6, 7], [1, 1, 1, 1, 1, 1])
    assert (r.n, r.statistic, r.p) == (6, 21.0, 2 / 64)  # all positive: 1 of 64 patterns, two-sided
    # d = [1, -2, 3, 3]: tied ranks 1, 2, 3.5, 3.5, W+ = 1 + 3.5 + 3.5 = 8; the null distribution by brute force
    # over the 16 sign patterns
    d = [1, -2, 3, 3]
    ranks = [1, 2, 3.5, 3.5]
    w = 8.0
    sums = [sum(r for r, bit in zip(ranks, range(4)) if mask >> bit & 1) for mask in range(16)]
    p = min(1.0, 2 * min(sum(s <= w for s in sums), sum(s >= w for s in sums)) / 16)
    r = stats.wilcoxon([x + 10 for x in d], [10] * 4)
    assert (r.statistic, r.p) == (w, p)
    assert stats.wilcoxon([1, 2], [1, 2]).p == 1.0  # only zero differences


def test_auto_switches_to_wilcoxon_at_six_pairs():
    a, b = list(range(10, 16)), list(range(6))
    assert stats.paired_test(a[:5], b[:5]).test == "t"
    assert stats.paired_test(a, b).test == "wilcoxon"
    assert 2.0 / 2 ** 5 > 0.05 > 2.0 / 2 ** stats.WILCOXON_MIN_N  # why 6: below it Wilcoxon can never reject


def test_against_scipy():
    ss = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(1)
    for _ in range(50):
        n = int(rng.integers(2, 12))
        a = rng.normal(40, 3, n)
        b = a - rng.normal(1, 2, n)
        assert stats.paired_t(a, b).p == pytest.approx(ss.ttest_rel(a, b).pvalue, rel=1e-9, abs=1e-14)
        assert stats.wilcoxon(a, b).p == pytest.approx(ss.wilcoxon(a, b, method="exact").pvalue, rel=1e-12)


def test_holm():
    assert stats.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert stats.holm([0.5, 0.9]) == [1.0, 1.0] and stats.holm([]) == []


def test_bootstrap_miou_matches_the_dataset_metric():
    rng = np.random.default_rng(0)
    union = rng.integers(10, 50, (30, 4)).astype(float)
    inter = np.floor(union * rng.uniform(0, 1, (30, 4)))
    full = 100 * np.mean(inter.sum(0) / (union.sum(0) + 1e-10))
    assert stats.bootstrap_miou(inter, union, np.ones((1, 30)))[0] == pytest.approx(full)
    w = stats.resample_weights(30, 500, seed=3)
    assert w.shape == (500, 30) and (w.sum(axis=1) == 30).all()
    lo, hi = stats.percentile_ci(stats.bootstrap_miou(inter, union, w))
    assert lo < full < hi


def test_per_image_counts_add_up_to_the_evaluated_confusion_matrix():
    """evaluate(per_image=True) stores what the bootstrap resamples: per-image intersection / union that sum to the
    dataset-level confusion matrix, in dataset order."""
    import torch

    from sslray.evaluate import evaluate

    class Identity(torch.nn.Module):
        def forward(self, img):
            return {"logits": img}  # [B, 3, H, W]: the image's channels are the class scores

    g = torch.Generator().manual_seed(0)
    data = [{"img": torch.rand(3, 6, 6, generator=g), "mask": torch.randint(0, 3, (6, 6), generator=g), "index": i}
            for i in range(7)]
    data[2]["mask"][0] = 255  # ignored pixels are counted nowhere
    out = evaluate(Identity(), data, 3, "original", 6, "cpu", ["a", "b", "c"], batch_size=3, per_image=True)
    inter = np.array(out["val/per_image"]["inter"])
    union = np.array(out["val/per_image"]["union"])
    cm = np.array(out["val/confusion"])
    assert inter.shape == union.shape == (7, 3)
    assert (inter.sum(0) == np.diag(cm)).all() and (union.sum(0) == cm.sum(0) + cm.sum(1) - np.diag(cm)).all()
    pred = data[4]["img"].argmax(0).numpy()
    mask = data[4]["mask"].numpy()
    assert inter[4].tolist() == [int(((pred == c) & (mask == c)).sum()) for c in range(3)]  # dataset order
    assert stats.bootstrap_miou(inter, union, np.ones((1, 7)))[0] == pytest.approx(out["val/miou"])
    assert "val/per_image" not in evaluate(Identity(), data, 3, "original", 6, "cpu", ["a", "b", "c"])
