"""Evaluation: confusion matrix and IoU, sliding windows, sharding across ranks."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from sslray.config import ModelConfig
from sslray.evaluate import ConfusionMatrix, evaluate, predict, window_starts
from sslray.models import build_model



class Pointwise(nn.Module):
    """A per-pixel model (1x1 conv): its prediction at a pixel cannot depend on the window around it."""

    def __init__(self, k: int = 3):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, k, 1)

    def forward(self, x):
        return {"logits": self.conv(x)}


class Recorder(nn.Module):
    """Records the window shapes it is called on; predicts zeros."""

    def __init__(self, k: int = 2):
        super().__init__()
        self.k, self.calls = k, []

    def forward(self, x):
        self.calls.append(tuple(x.shape[-2:]))
        return {"logits": x.new_zeros(x.shape[0], self.k, *x.shape[-2:])}


# --------------------------------------------------------------------------------------------------
# confusion matrix


def test_confusion_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    k = 4
    pred = torch.randint(0, k, (2, 5, 7), generator=g)
    target = torch.randint(0, k, (2, 5, 7), generator=g)
    target[0, :2] = 255
    target[1, 0, :3] = 7  # outside [0, K): skipped as well
    cm = ConfusionMatrix(k)
    cm.update(pred[:1], target[:1])
    cm.update(pred[1:], target[1:])
    brute = [[0] * k for _ in range(k)]
    for p, t in zip(pred.flatten().tolist(), target.flatten().tolist()):
        if 0 <= t < k:
            brute[t][p] += 1
    assert cm.mat.dtype == torch.int64
    assert cm.mat.tolist() == brute


def test_iou_by_hand():
    target = torch.tensor([[0, 0, 1], [1, 2, 255]])
    pred = torch.tensor([[0, 1, 1], [1, 0, 2]])
    cm = ConfusionMatrix(3)
    cm.update(pred, target)
    assert cm.mat.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]
    # class 0: inter 1, union 2 + 2 - 1 = 3; class 1: 2 / (2 + 3 - 2); class 2: 0 / (1 + 0 - 0)
    assert cm.iou().tolist() == pytest.approx([1 / 3, 2 / 3, 0.0])
    assert cm.miou() == pytest.approx(100 / 3)
    assert cm.pixel_acc() == pytest.approx(60.0)
    cm4 = ConfusionMatrix(4)  # class 3 never appears: IoU 0 (UniMatch's +1e-10), still in the mean
    cm4.update(pred, target)
    assert cm4.iou()[3] == 0 and cm4.miou() == pytest.approx(25.0)


def test_confusion_rejects_bad_predictions():
    cm = ConfusionMatrix(3)
    with pytest.raises(ValueError, match="predictions"):
        cm.update(torch.tensor([0, 3]), torch.tensor([0, 1]))
    cm.update(torch.tensor([0, 9]), torch.tensor([0, 255]))  # ignored pixel: prediction not checked
    assert int(cm.mat.sum()) == 1
    assert ConfusionMatrix(2).pixel_acc() == 0.0


# --------------------------------------------------------------------------------------------------
# sliding windows


def test_window_starts_cityscapes():
    assert window_starts(1024, 801, 534, shifted=False) == [0, 534]
    assert window_starts(2048, 801, 534, shifted=False) == [0, 534, 1068, 1602]
    assert window_starts(1024, 801, 534, shifted=True) == [0, 223]
    assert window_starts(2048, 801, 534, shifted=True) == [0, 534, 1068, 1247]
    for shifted in (False, True):
        assert window_starts(20, 32, 21, shifted) == [0]  # smaller than the crop: one (truncated) window
    assert window_starts(32, 32, 21, shifted=True) == [0]  # V2: exact fit, one window
    assert window_starts(32, 32, 21, shifted=False) == [0, 21]  # V1 keeps stepping while start < size


@pytest.mark.parametrize("mode", ["sliding_window", "sliding_window_v2"])
def test_cityscapes_window_shapes(mode):
    model = Recorder()
    scores = predict(model, torch.zeros(1, 3, 1024, 2048), mode, 801, 2)
    if mode == "sliding_window":  # edge windows truncated: 490 px high, 446 px wide
        assert sorted(set(model.calls)) == [(490, 446), (490, 801), (801, 446), (801, 801)]
    else:
        assert set(model.calls) == {(801, 801)}
    assert len(model.calls) == 8
    assert scores.shape == (1, 2, 1024, 2048)


@pytest.mark.parametrize("mode", ["sliding_window", "sliding_window_v2"])
@pytest.mark.parametrize("size", [(70, 53), (20, 25)])
def test_sliding_equals_whole_for_pointwise_model(mode, size):
    model = Pointwise()
    img = torch.randn(2, 3, *size)
    whole = predict(model, img, "original", 32, 3)
    slid = predict(model, img, mode, 32, 3)
    # each pixel's score is (number of windows covering it) x its softmax, and every pixel is covered
    count = slid.sum(1, keepdim=True)
    assert count.min() >= 1 - 1e-5
    torch.testing.assert_close(slid / count, whole.softmax(1))
    assert torch.equal(slid.argmax(1), whole.argmax(1))


def test_predict_unknown_mode():
    with pytest.raises(ValueError, match="unknown eval mode"):
        predict(Pointwise(), torch.zeros(1, 3, 4, 4), "tiles", 32, 3)


# --------------------------------------------------------------------------------------------------
# evaluate()


def _dataset(sizes, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    items = []
    for i, (h, w) in enumerate(sizes):
        mask = torch.randint(0, k, (h, w), generator=g)
        mask[0] = 255
        items.append({"img": torch.randn(3, h, w, generator=g), "mask": mask, "index": i})
    return items


def _small(k=3):
    torch.manual_seed(0)
    model = build_model(dataclasses.replace(ModelConfig(), name="small", width=8), k)
    model.train()
    x = torch.randn(4, 3, 24, 24)
    with torch.no_grad():  # move BN running stats off their init so eval mode is not trivial
        model(x)
    return model


NAMES = ("bg", "a", "b")
SIZES = [(20, 24), (20, 24), (18, 18), (20, 24), (24, 20), (24, 20), (20, 24)]


@pytest.mark.parametrize("mode", ["original", "center_crop", "sliding_window", "sliding_window_v2"])
def test_evaluate_sharded_equals_single(mode):
    model, data = _small(), _dataset(SIZES)
    kw = dict(num_classes=3, mode=mode, crop_size=16, device="cpu", class_names=NAMES)
    full = evaluate(model, data, **kw)
    parts = [evaluate(model, data, rank=r, world=2, **kw) for r in (0, 1)]
    summed = (torch.tensor(parts[0]["val/confusion"]) + torch.tensor(parts[1]["val/confusion"])).tolist()
    assert summed == full["val/confusion"]
    one_by_one = evaluate(model, data, batch_size=1, **kw)
    assert one_by_one == full
    assert model.training  # restored
    counted = int(torch.tensor(full["val/confusion"]).sum())
    if mode == "center_crop":  # 16 x 16 crops start at row >= 1, so the ignored row 0 is cut away
        assert counted == 16 * 16 * len(SIZES)
    else:
        assert counted == sum(h * w - w for h, w in SIZES)


def test_evaluate_keys_values_and_eval_mode_kept():
    model, data = Pointwise(), _dataset(SIZES[:3])
    model.eval()
    out = evaluate(model, data, 3, "original", 16, "cpu", NAMES)
    assert set(out) == {"val/miou", "val/pixel_acc", "val/iou/bg", "val/iou/a", "val/iou/b", "val/confusion"}
    assert not model.training
    cm = torch.tensor(out["val/confusion"])
    ious = [out[f"val/iou/{n}"] for n in NAMES]
    assert out["val/miou"] == pytest.approx(sum(ious) / 3)
    assert out["val/pixel_acc"] == pytest.approx(100 * cm.diag().sum().item() / cm.sum().item())
    with pytest.raises(ValueError, match="class names"):
        evaluate(model, data, 3, "original", 16, "cpu", NAMES[:2])


def test_evaluate_bf16_autocast_runs():
    out = evaluate(_small(), _dataset(SIZES[:2]), 3, "original", 16, "cpu", NAMES, amp_dtype=torch.bfloat16)
    assert 0 <= out["val/miou"] <= 100


def test_all_reduce_with_process_group(tmp_path):
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a process group already exists")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        cm = ConfusionMatrix(2)
        cm.update(torch.tensor([0, 1, 1]), torch.tensor([0, 1, 0]))
        cm.all_reduce()
        assert cm.mat.tolist() == [[1, 1], [0, 1]]
    finally:
        dist.destroy_process_group()
