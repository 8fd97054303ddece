import numpy as np
import pytest
import torch
from PIL import Image

from sslray.data.transforms import (IMAGENET_MEAN, IMAGENET_STD, cutmix_box, gaussian_blur, normalize, rescale,
                                    strong_view, weak_view)


def _pair(w=40, h=24, seed=0):
    """Random RGB image [h, w] and an L mask with values {0, 1, 2} (blocky, so nearest resizing matters)."""
    r = np.random.default_rng(seed)
    img = Image.fromarray(r.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")
    mask = Image.fromarray(np.kron(r.integers(0, 3, (h // 4, w // 4)), np.ones((4, 4))).astype(np.uint8), "L")
    return img, mask


def _rng(seed=0):
    return np.random.default_rng(seed)


def test_weak_view_deterministic_and_exact_crop():
    img, mask = _pair()
    a = weak_view(img, mask, 32, 255, _rng(3))
    b = weak_view(img, mask, 32, 255, _rng(3))
    assert a[0].tobytes() == b[0].tobytes() and a[1].tobytes() == b[1].tobytes()
    for seed in range(10):
        i, m = weak_view(img, mask, 32, 255, _rng(seed))
        assert i.size == m.size == (32, 32)
        assert set(np.unique(np.array(m))) <= {0, 1, 2, 255}  # nearest: no blended label values


@pytest.mark.parametrize("ignore_value", [255, 254])
def test_padding_lands_right_bottom_only(ignore_value):
    img, mask = _pair(w=20, h=12)
    i, m = weak_view(img, mask, 32, ignore_value, _rng(0), scale=(1.0, 1.0), hflip_p=0.0)
    i, m = np.array(i), np.array(m)
    assert (m[:12, :20] == np.array(mask)).all() and (i[:12, :20] == np.array(img)).all()
    assert (m[12:, :] == ignore_value).all() and (m[:, 20:] == ignore_value).all()
    assert (i[12:, :] == 0).all() and (i[:, 20:] == 0).all()


def test_hflip_and_rescale_rule():
    img, mask = _pair(w=32, h=32)
    i, m = weak_view(img, mask, 32, 255, _rng(0), scale=(1.0, 1.0), hflip_p=1.0)
    assert (np.array(i) == np.array(img)[:, ::-1]).all() and (np.array(m) == np.array(mask)[:, ::-1]).all()
    img, mask = _pair(w=40, h=24)
    for seed in range(10):
        i, m = rescale(img, mask, _rng(seed))
        new_long = i.size[0]
        assert 20 <= new_long <= 80 and i.size[1] == int(24 * new_long / 40 + 0.5) and m.size == i.size


def test_strong_view_deterministic_and_identity_when_off():
    img, _ = _pair(w=32, h=32)
    a = strong_view(img, _rng(5), jitter_p=1.0, blur_p=1.0)
    assert a.tobytes() == strong_view(img, _rng(5), jitter_p=1.0, blur_p=1.0).tobytes()
    assert a.size == img.size and a.mode == "RGB"
    off = strong_view(img, _rng(5), jitter_p=0.0, gray_p=0.0, blur_p=0.0)
    assert off.tobytes() == img.tobytes()


def test_grayscale_gives_equal_channels():
    img, _ = _pair(w=16, h=16)
    g = np.array(strong_view(img, _rng(0), jitter_p=0.0, gray_p=1.0, blur_p=0.0))
    assert g.shape == (16, 16, 3) and (g[..., 0] == g[..., 1]).all() and (g[..., 1] == g[..., 2]).all()


def test_blur_small_image_and_smoothing():
    tiny, _ = _pair(w=4, h=4)
    assert gaussian_blur(tiny, 2.0).size == (4, 4)  # kernel clipped below the image size
    img, _ = _pair(w=32, h=32)
    assert np.array(gaussian_blur(img, 2.0)).astype(float).std() < np.array(img).astype(float).std()


def test_cutmix_box_probability_and_area():
    assert (cutmix_box(32, _rng(0), p=0.0) == 0).all()
    for seed in range(30):
        box = cutmix_box(32, _rng(seed), p=1.0)
        assert box.shape == (32, 32) and box.dtype == torch.float32
        ys, xs = torch.nonzero(box, as_tuple=True)
        h, w = int(ys.max() - ys.min() + 1), int(xs.max() - xs.min() + 1)
        assert box.sum() == h * w  # one axis-aligned rectangle, fully inside
        # int() truncation of the sides can only shrink the box by < 1 px per side
        assert h * w <= 0.4 * 32 * 32 and (h + 1) * (w + 1) >= 0.02 * 32 * 32
    assert (cutmix_box(32, _rng(4), p=1.0) == cutmix_box(32, _rng(4), p=1.0)).all()
    assert cutmix_box(4, _rng(0), p=1.0).sum() >= 1  # tiny image: terminates, still a box


@pytest.mark.parametrize("size", [64, 321])
def test_cutmix_box_mean_area_matches_unimatch(size):
    """UniMatch draws the area once and retries only aspect and position: the mean gated-on box is ~0.20 of the
    image (U(0.02, 0.4) has mean 0.21; int() truncation of the sides takes a little off). Re-drawing the area on
    every rejected try biases towards small boxes (mean 0.14)."""
    rng = _rng(11)
    areas = [float(cutmix_box(size, rng, p=1.0).mean()) for _ in range(1500)]
    assert abs(np.mean(areas) - 0.205) < 0.015, np.mean(areas)  # 0.203 at 64 px, 0.210 at 321 px (SE 0.003)
    assert abs(np.median(areas) - 0.205) < 0.03  # the area distribution itself is ~uniform, not skewed small


def test_normalize():
    img = Image.new("RGB", (5, 3), tuple(int(round(m * 255)) for m in IMAGENET_MEAN))
    x = normalize(img)
    assert x.shape == (3, 3, 5) and x.dtype == torch.float32 and x.abs().max() < 0.02
    x, m = normalize(Image.new("RGB", (5, 3)), Image.new("L", (5, 3), 254))
    assert m.dtype == torch.long and m.shape == (3, 5) and (m == 254).all()
    assert torch.allclose(x[:, 0, 0], -torch.tensor(IMAGENET_MEAN) / torch.tensor(IMAGENET_STD))


def test_weak_view_equals_rescale_pad_crop_flip():
    """The fused weak view (resize of the kept box only) against UniMatch's literal order: same draws, masks
    identical, image values within 2 (float rounding of the box's sampling positions)."""
    from torchvision.transforms.v2 import functional as F

    from sslray.data.transforms import pad_crop

    img, mask = _pair(w=90, h=60)
    for seed in range(30):
        crop = (32, 64, 120)[seed % 3]  # inside, across and beyond the rescaled image
        a, am = weak_view(img, mask, crop, 254, _rng(seed))
        g = _rng(seed)
        b, bm = rescale(img, mask, g)
        b, bm = pad_crop(b, bm, crop, 254, g)
        if g.random() < 0.5:
            b, bm = F.horizontal_flip(b), F.horizontal_flip(bm)
        assert np.array_equal(np.array(am), np.array(bm))
        assert np.abs(np.array(a).astype(int) - np.array(b).astype(int)).max() <= 2
