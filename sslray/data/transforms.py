"""UniMatch's weak and strong views (``datasets.md`` section 4), deterministic from an explicit generator.

Every random choice is drawn from the ``np.random.Generator`` passed in -- never from torch's, numpy's or Python's
global RNG -- so a sample's augmentation is a pure function of the generator's seed. The datasets seed it from
``(seed, stream, position)``, which makes checkpoint-resume exact and DataLoader workers deterministic whatever their
number. Pixel operations are PIL's, directly or through ``torchvision.transforms.v2.functional`` (which calls PIL on
PIL input), as in UniMatch: bilinear / nearest resizing, ``ImageFilter.GaussianBlur`` for the blur.

The weak view resizes only the part of the image that its crop keeps (PIL's ``resize(box=...)``): the same random
draws, geometry and interpolation as UniMatch's "rescale the whole image, pad, crop", with image values within 2 of
it (float rounding of the sampling positions; masks are exact), and 3-14x cheaper on a 2048x1024 Cityscapes image
rescaled to up to twice its size. :func:`rescale` and :func:`pad_crop` are the literal two-step version (the
reference in tests).

The draw order follows UniMatch: rescale (1 integer), crop (x then y), hflip (1 uniform); strong view: jitter gate,
jitter order and factors, grayscale gate, blur gate and sigma; CutMix box: gate, area (once), then (ratio, x, y) per try.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image, ImageFilter
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_MAX_BOX_TRIES = 1000  # rejection sampling of the CutMix box position/aspect (area fixed per box)


def weak_view(img: Image.Image, mask: Image.Image, crop: int, ignore_value: int, rng: np.random.Generator,
              scale: tuple[float, float] = (0.5, 2.0), hflip_p: float = 0.5) -> tuple[Image.Image, Image.Image]:
    """Random rescale, right/bottom pad, random ``crop x crop`` crop, horizontal flip (image and mask together).

    ``img`` RGB [H, W], ``mask`` L [H, W] -> both [crop, crop]. Padding is 0 in the image and ``ignore_value`` in
    the mask (255 for labeled data, 254 for unlabeled data, where it later becomes the ignore map). Equals
    :func:`rescale` then :func:`pad_crop` then the flip, resizing only the kept region (see the module docstring).
    """
    w, h = img.size
    ow, oh = rescaled_size(w, h, rng, scale)
    x = int(rng.integers(0, max(ow, crop) - crop, endpoint=True))
    y = int(rng.integers(0, max(oh, crop) - crop, endpoint=True))
    x1, y1 = min(x + crop, ow), min(y + crop, oh)  # the crop window's part inside the rescaled image
    if (ow, oh) == (w, h):
        img, mask = img.crop((x, y, x1, y1)), mask.crop((x, y, x1, y1))
    else:
        box = (x * w / ow, y * h / oh, x1 * w / ow, y1 * h / oh)  # that part in source pixels
        img = img.resize((x1 - x, y1 - y), Image.Resampling.BILINEAR, box=box)
        # Nearest is cheap on one channel, and PIL's box variant rounds sampling positions differently: masks are
        # resized whole, so labels are exactly UniMatch's.
        mask = mask.resize((ow, oh), Image.Resampling.NEAREST).crop((x, y, x1, y1))
    if img.size != (crop, crop):  # the rescaled image is smaller than the crop: pad right / bottom
        img_c, mask_c = Image.new(img.mode, (crop, crop), 0), Image.new(mask.mode, (crop, crop), ignore_value)
        img_c.paste(img, (0, 0))
        mask_c.paste(mask, (0, 0))
        img, mask = img_c, mask_c
    if rng.random() < hflip_p:
        img, mask = F.horizontal_flip(img), F.horizontal_flip(mask)
    return img, mask


def rescaled_size(w: int, h: int, rng: np.random.Generator,
                  scale: tuple[float, float] = (0.5, 2.0)) -> tuple[int, int]:
    """UniMatch's random size: long side ~ ``randint(int(L*lo), int(L*hi))`` inclusive, L = the image's own long
    side; short side ``int(short * new_long / long + 0.5)`` (aspect kept). Returns (width, height), each >= 1."""
    long = max(w, h)
    new_long = int(rng.integers(int(long * scale[0]), int(long * scale[1]), endpoint=True))
    if h > w:
        oh, ow = new_long, int(1.0 * w * new_long / h + 0.5)
    else:
        ow, oh = new_long, int(1.0 * h * new_long / w + 0.5)
    return max(ow, 1), max(oh, 1)  # a degenerate scale range must not produce an empty image


def rescale(img: Image.Image, mask: Image.Image, rng: np.random.Generator,
            scale: tuple[float, float] = (0.5, 2.0)) -> tuple[Image.Image, Image.Image]:
    """The whole image and mask at :func:`rescaled_size`; image bilinear, mask nearest (labels never blend)."""
    ow, oh = rescaled_size(*img.size, rng, scale)
    return (F.resize(img, [oh, ow], interpolation=InterpolationMode.BILINEAR),
            F.resize(mask, [oh, ow], interpolation=InterpolationMode.NEAREST))


def pad_crop(img: Image.Image, mask: Image.Image, crop: int, ignore_value: int,
             rng: np.random.Generator) -> tuple[Image.Image, Image.Image]:
    """Pad right/bottom up to ``crop`` (image 0, mask ``ignore_value``), then a uniformly placed crop x crop window."""
    w, h = img.size
    padw, padh = max(crop - w, 0), max(crop - h, 0)
    if padw or padh:
        img = F.pad(img, [0, 0, padw, padh], fill=0)
        mask = F.pad(mask, [0, 0, padw, padh], fill=ignore_value)
        w, h = img.size
    x = int(rng.integers(0, w - crop, endpoint=True))
    y = int(rng.integers(0, h - crop, endpoint=True))
    return F.crop(img, y, x, crop, crop), F.crop(mask, y, x, crop, crop)


def strong_view(img: Image.Image, rng: np.random.Generator,
                jitter: tuple[float, float, float, float] = (0.5, 0.5, 0.5, 0.25), jitter_p: float = 0.8,
                gray_p: float = 0.2, blur_p: float = 0.5,
                blur_sigma: tuple[float, float] = (0.1, 2.0)) -> Image.Image:
    """Photometric strong view of an RGB image (same size): colour jitter, grayscale, Gaussian blur."""
    return apply_strong(img, draw_strong(rng, jitter, jitter_p, gray_p, blur_p, blur_sigma))


# A strong view's random draws as 12 floats: jitter gate, the 4 jitter ops in order (-1: skipped, strength 0), the 4
# factors (brightness, contrast, saturation, hue), grayscale gate, blur gate, blur sigma. ``data.augment_on: device``
# ships these from the loader and applies them on the device (:mod:`sslray.data.device_augs`).
STRONG_PARAMS = 12


def draw_strong(rng: np.random.Generator, jitter: tuple[float, float, float, float] = (0.5, 0.5, 0.5, 0.25),
                jitter_p: float = 0.8, gray_p: float = 0.2, blur_p: float = 0.5,
                blur_sigma: tuple[float, float] = (0.1, 2.0)) -> torch.Tensor:
    """The strong view's draws in UniMatch's order (jitter gate; jitter order and all 4 factors, only when the gate
    passes; grayscale gate; blur gate; sigma, only when that gate passes) -> float64 [STRONG_PARAMS]."""
    p = torch.zeros(STRONG_PARAMS, dtype=torch.float64)
    p[1:5] = -1
    if rng.random() < jitter_p:
        order, factors = _jitter_draws(rng, jitter)
        p[0] = 1
        kept = [int(i) for i in order if jitter[i] > 0]
        p[1:1 + len(kept)] = torch.tensor(kept, dtype=torch.float64)
        p[5:9] = torch.tensor(factors, dtype=torch.float64)
    p[9] = float(rng.random() < gray_p)
    if rng.random() < blur_p:
        p[10], p[11] = 1, float(rng.uniform(*blur_sigma))
    return p


_JITTER_OPS = (F.adjust_brightness, F.adjust_contrast, F.adjust_saturation, F.adjust_hue)


def apply_strong(img, params: torch.Tensor, blur=None):
    """Apply one strong view's draws (:func:`draw_strong`) to a PIL image or to a float [3, H, W] tensor in [0, 1]:
    the same ``torchvision.transforms.v2.functional`` ops on either (they dispatch on the input type); the blur is
    PIL's (:func:`gaussian_blur`) on PIL input and ``blur(img, sigma)`` on a tensor."""
    values = params.tolist()
    if values[0]:
        for i in values[1:5]:
            if i >= 0:
                img = _JITTER_OPS[int(i)](img, float(values[5 + int(i)]))
    if values[9]:
        img = F.rgb_to_grayscale(img, num_output_channels=3)  # keep 3 channels: the model expects RGB
    if values[10]:
        img = gaussian_blur(img, values[11]) if blur is None else blur(img, values[11])
    return img


def _jitter_draws(rng: np.random.Generator, jitter: tuple[float, float, float, float]) -> tuple[np.ndarray, list]:
    """A random order of the 4 jitter ops and all 4 factors (``U(max(0, 1-x), 1+x)``; hue ``U(-h, h)``)."""
    b, c, s, h = jitter
    order = rng.permutation(4)
    factors = [rng.uniform(max(0.0, 1 - x), 1 + x) for x in (b, c, s)] + [rng.uniform(-h, h)]
    return order, factors


def color_jitter(img: Image.Image, rng: np.random.Generator,
                 jitter: tuple[float, float, float, float] = (0.5, 0.5, 0.5, 0.25)) -> Image.Image:
    """torchvision ``ColorJitter(b, c, s, h)`` semantics: the 4 ops in a random order, factors
    ``U(max(0, 1-x), 1+x)`` for brightness/contrast/saturation and ``U(-h, h)`` for hue; ops with strength 0 skip.

    All 4 factors are always drawn so the stream position after this call does not depend on the strengths.
    """
    order, factors = _jitter_draws(rng, jitter)
    for i in order:
        if jitter[i] > 0:
            img = _JITTER_OPS[i](img, float(factors[i]))
    return img


def gaussian_blur(img: Image.Image, sigma: float) -> Image.Image:
    """UniMatch's ``blur``: ``img.filter(ImageFilter.GaussianBlur(radius=sigma))`` -- PIL's extended-box
    approximation of a Gaussian of standard deviation ``sigma`` (edges extended), ~4x faster than an exact kernel
    at 801 px."""
    return img.filter(ImageFilter.GaussianBlur(radius=sigma))


def cutmix_box(size: int, rng: np.random.Generator, p: float = 0.5, area: tuple[float, float] = (0.02, 0.4),
               ratio: tuple[float, float] = (0.3, 1 / 0.3)) -> torch.Tensor:
    """UniMatch's ``obtain_cutmix_box``: float [size, size], 1 inside one axis-aligned box, 0 elsewhere.

    With probability ``1 - p`` all zeros. Otherwise the area ``A ~ U(area) * size^2`` is drawn ONCE; then, per try,
    aspect ``r ~ U(ratio)``, ``w = int(sqrt(A / r))``, ``h = int(sqrt(A * r))`` (at least 1 px) and a top-left corner
    uniform in [0, size) are re-sampled until the box fits inside the image. Keeping the area fixed across tries is
    what UniMatch does; re-drawing it per try (sslray before issue 11) favours small boxes that fit more often and
    gives a mean box of 0.14 of the image instead of ~0.20 at the defaults. Draw order: gate, area, then
    (ratio, x, y) per try -- a pure function of ``rng``. The loop is bounded: after ``_MAX_BOX_TRIES`` misses the
    last box is shrunk to the image and placed uniformly where it fits.
    """
    box = torch.zeros(size, size)
    if rng.random() > p:
        return box
    a = rng.uniform(*area) * size * size
    for _ in range(_MAX_BOX_TRIES):
        r = rng.uniform(*ratio)
        w, h = max(int(math.sqrt(a / r)), 1), max(int(math.sqrt(a * r)), 1)
        x, y = int(rng.integers(0, size)), int(rng.integers(0, size))
        if x + w <= size and y + h <= size:
            break
    else:
        w, h = min(w, size), min(h, size)
        x, y = int(rng.integers(0, size - w, endpoint=True)), int(rng.integers(0, size - h, endpoint=True))
    box[y:y + h, x:x + w] = 1.0
    return box


def normalize(img: Image.Image, mask: Image.Image | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RGB PIL [H, W] -> float [3, H, W], ``(x/255 - IMAGENET_MEAN) / IMAGENET_STD``; with ``mask``, also
    long [H, W] holding the mask's raw values (class ids, 255 ignore, 254 unlabeled padding)."""
    x = F.to_dtype(F.pil_to_tensor(img), torch.float32, scale=True)
    x = F.normalize(x, mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD))
    if mask is None:
        return x
    return x, torch.from_numpy(np.array(mask, dtype=np.int64))
