"""Models: output contract, strides, feature perturbation, pretrained loading, parameter groups.

Kept CPU-cheap: resnet18 (resnet50 once), inputs of 64x64 or smaller, eval mode where batch statistics
are not the point.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
import torchvision

from sslray.config import ModelConfig
from sslray.models import build_model, list_models, load_backbone_weights



K = 5


def _cfg(**kw) -> ModelConfig:
    return dataclasses.replace(ModelConfig(), **kw)


def _dlv3p(seed: int = 0, **kw):
    torch.manual_seed(seed)
    return build_model(_cfg(name="deeplabv3plus", backbone="resnet18", **kw), K)


@pytest.fixture(scope="module")
def r18_os16():
    return _dlv3p()


def test_registry():
    assert list_models() == ["small", "deeplabv3plus", "dpt"]
    with pytest.raises(ValueError, match="unknown model"):
        build_model(_cfg(name="unet"), K)


@pytest.mark.parametrize("os_", [16, 8])
def test_deeplab_r18_strides_and_shapes(os_, r18_os16):
    model = r18_os16 if os_ == 16 else _dlv3p(output_stride=8)
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 64, 64))
        odd = model(torch.randn(1, 3, 65, 53))["logits"]
    assert out["logits"].shape == (2, K, 64, 64)
    assert out["c1"].shape == (2, 64, 16, 16)  # layer1, stride 4
    assert out["c4"].shape == (2, 512, 64 // os_, 64 // os_)  # layer4, stride = output stride
    assert out["features"].shape == (2, 256, 16, 16)  # fuse output at c1 resolution
    assert odd.shape == (1, K, 65, 53)
    assert "logits_fp" not in out


def test_deeplab_r18_dilation_mirrors_torchvision(r18_os16):
    layer4 = r18_os16.encoder.layer4
    assert layer4[0].conv1.stride == (1, 1) and layer4[0].downsample[0].stride == (1, 1)
    assert layer4[0].conv2.dilation == (1, 1)  # first block keeps the previous dilation, as torchvision
    assert layer4[1].conv1.dilation == (2, 2) and layer4[1].conv1.padding == (2, 2)
    layer4_os8 = _dlv3p(output_stride=8).encoder.layer4
    assert layer4_os8[0].conv1.dilation == (2, 2) and layer4_os8[1].conv2.dilation == (4, 4)


def test_deeplab_r50_channels():
    torch.manual_seed(0)
    model = build_model(_cfg(name="deeplabv3plus", backbone="resnet50", output_stride=16), K).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 33, 33))
    assert out["c1"].shape[1] == 256 and out["c4"].shape[1] == 2048
    assert out["logits"].shape == (1, K, 33, 33)


def test_need_fp_train_and_eval(r18_os16):
    model = r18_os16
    x = torch.randn(2, 3, 64, 64)
    model.train()
    out = model(x, need_fp=True)
    for key in ("logits", "logits_fp"):
        assert out[key].shape == (2, K, 64, 64)
    assert out["c1"].shape[0] == out["c4"].shape[0] == out["features"].shape[0] == 2
    assert not torch.allclose(out["logits"], out["logits_fp"])  # Dropout2d is active in train mode
    model.eval()
    with torch.no_grad():
        plain = model(x)["logits"]
        fp = model(x, need_fp=True)
    # eval-mode Dropout2d is the identity, so both halves equal the plain forward
    torch.testing.assert_close(fp["logits"], plain, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fp["logits_fp"], plain, atol=1e-5, rtol=1e-5)


def test_fp_dropout_drops_whole_channels():
    model = build_model(_cfg(name="small", width=8, fp_dropout=0.5), K).train()
    c = torch.ones(4, 16, 3, 3)
    d = model.fp_dropout(c)
    per_channel = d.flatten(2)
    assert torch.all(per_channel.amin(-1) == per_channel.amax(-1))  # channel-wise, not pixel-wise
    assert set(per_channel.unique().tolist()) <= {0.0, 2.0}


def test_param_groups_partition(r18_os16):
    for model in (r18_os16, build_model(_cfg(name="small"), K)):
        backbone, head = model.param_groups()
        ids_b, ids_h = {id(p) for p in backbone}, {id(p) for p in head}
        assert len(ids_b) == len(backbone) and len(ids_h) == len(head)
        assert not ids_b & ids_h
        assert ids_b | ids_h == {id(p) for p in model.parameters()}
        assert ids_b == {id(p) for p in model.encoder.parameters()}
        assert ids_h == {id(p) for p in model.decoder.parameters()}


def test_pretrained_round_trip_with_wrapper_prefix_and_fc(tmp_path, r18_os16):
    sd = {f"backbone.{k}": v for k, v in r18_os16.encoder.state_dict().items()}
    sd["backbone.fc.weight"], sd["backbone.fc.bias"] = torch.zeros(1000, 512), torch.zeros(1000)
    path = tmp_path / "r18.pth"
    torch.save({"state_dict": sd, "epoch": 3}, path)
    loaded = _dlv3p(seed=1, pretrained=str(path))
    for k, v in r18_os16.encoder.state_dict().items():
        assert torch.equal(loaded.encoder.state_dict()[k], v), k


def test_pretrained_plain_torchvision_state_dict(tmp_path):
    torch.manual_seed(3)
    net = torchvision.models.resnet18(weights=None)
    sd = {k: v for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}  # old-style file
    torch.save(sd, tmp_path / "tv.pth")
    loaded = _dlv3p(seed=1, pretrained=str(tmp_path / "tv.pth"))
    assert torch.equal(loaded.encoder.conv1.weight, net.conv1.weight)
    assert torch.equal(loaded.encoder.layer4[1].bn2.running_var, net.layer4[1].bn2.running_var)


def test_pretrained_errors(tmp_path, r18_os16):
    missing = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        _dlv3p(pretrained=str(missing))
    sd = dict(r18_os16.encoder.state_dict())
    del sd["layer3.1.conv2.weight"]
    torch.save(sd, tmp_path / "partial.pth")
    with pytest.raises(ValueError, match=r"missing keys \[layer3\.1\.conv2\.weight\]"):
        load_backbone_weights(r18_os16.encoder, str(tmp_path / "partial.pth"))
    sd50 = torchvision.models.resnet50(weights=None).state_dict()
    torch.save(sd50, tmp_path / "r50.pth")
    with pytest.raises(ValueError, match="do not match"):
        load_backbone_weights(r18_os16.encoder, str(tmp_path / "r50.pth"))


def test_small_model_shapes_backward_and_size():
    torch.manual_seed(0)
    model = build_model(_cfg(name="small", width=32), K).train()
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params == 206_981  # K = 5; pinned: a change here changes every small-model result
    x = torch.randn(4, 3, 64, 64)
    out = model(x, need_fp=True)
    assert out["logits"].shape == out["logits_fp"].shape == (4, K, 64, 64)
    assert out["c1"].shape == (4, 16, 32, 32)  # stride 2, w/2 channels
    assert out["c4"].shape == (4, 64, 8, 8)  # stride 8, 2w channels
    assert out["features"].shape == (4, 32, 32, 32)
    y = torch.randint(0, K, (4, 64, 64))
    (F.cross_entropy(out["logits"], y) + F.cross_entropy(out["logits_fp"], y)).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    odd = model.eval()(torch.randn(1, 3, 65, 97))["logits"]
    assert odd.shape == (1, K, 65, 97)


def test_deterministic_given_seed():
    def run():
        torch.manual_seed(7)
        model = build_model(_cfg(name="small", width=16), K).train()
        return model.state_dict(), model(torch.randn(2, 3, 32, 32), need_fp=True)

    (sd1, out1), (sd2, out2) = run(), run()
    assert all(torch.equal(sd1[k], sd2[k]) for k in sd1)
    assert torch.equal(out1["logits_fp"], out2["logits_fp"])


def test_init():
    model = build_model(_cfg(name="small", width=16), K)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and all(torch.all(m.weight == 1) and torch.all(m.bias == 0) for m in bns)
    assert torch.all(model.decoder.classifier.bias == 0)
