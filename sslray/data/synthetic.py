"""The embedded synthetic default dataset: textured shapes, "variant B" of ``datasets.md`` section 8.2.

Every image holds 3-5 objects (later ones occlude earlier ones) on a smooth background. The class of an object is
its **texture family** -- 1 stripes, 2 dots (``SynthParams.textures``; "checker" exists too) -- and nothing else:
shape (ellipse / rectangle / triangle), size, rotation, texture period and phase, the two object colours (a random
mean colour, a random RGB direction, a random contrast), the background colours, global gamma / contrast and
Gaussian noise are nuisances drawn independently of the class.

Why semi-supervision measurably helps here, and what the defaults were tuned against (2 cores, small model,
supervised vs FixMatch at equal iterations; numbers in benchmarks/ssl_gap.py's output and the closing notes):

* the class is invariant to the strong view (colour jitter incl. hue, grayscale, blur): a texture family survives
  a hue rotation or grayscale, so weak->strong consistency never asks the model to change a label; periods are
  6-11 px so that blur (sigma <= 0.8 px in configs/synthetic_gap.yaml) weakens but does not erase them;
* the nuisance space (colour x contrast x orientation x period x shape x background) is far larger than what
  a few dozen labeled images cover, so a supervised model over-fits the colours it has seen, while
  consistency on thousands of unlabeled images teaches the photometric invariances the labels cannot;
* the classes must be learnable in a CPU budget: with stripes / checker / dots even the all-labels oracle
  reached only ~36 mIoU in 1k iterations (checker and dots stay confused), with stripes / dots at contrast
  >= 0.5 it reaches ~63, leaving room between 32 labels (~40-46) and the ceiling;
* objects cover over half of the pixels: with background at ~80 % (small, few objects) FixMatch's confident
  pseudo-labels collapsed onto background (pseudo-label accuracy = background share) and the gain vanished.

Generation is pure numpy and deterministic: ``np.random.default_rng([seed, index])`` per sample, so any
``(seed, index)`` gives the same bytes on every machine and every call, and train / val sets are just disjoint index
ranges. Masks carry 255 on a 1-px band on the front side of every boundary between different labels (VOC-like), which
exercises the ignore path of the losses and metrics.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

IGNORE = 255

# Shapes are scaled so that all three cover about the same area (~3.14 * a * b) for the same semi-axes: shape must not
# leak class-independent size cues.
_RECT_HALF = 0.89  # half side, in units of the semi-axis: 4 * 0.89^2 ~ pi
_TRI_CIRCUMRADIUS = 1.55  # equilateral triangle: 3*sqrt(3)/4 * 1.55^2 ~ pi


@dataclass(frozen=True)
class SynthParams:
    """Every range of the generator. ``(lo, hi)`` pairs are sampled uniformly unless noted.

    Pixel quantities (periods, radii) are given at ``ref_size`` and scaled by ``size / ref_size``, so a 96-px image
    shows the same number of periods per object as a 64-px one.
    """

    ref_size: int = 64
    textures: tuple[str, ...] = ("stripes", "dots")  # class k >= 1 is textures[k - 1]; "checker" also exists
    num_objects: tuple[int, int] = (3, 5)  # inclusive
    object_radius: tuple[float, float] = (0.2, 0.34)  # mean semi-axis, fraction of the image side
    aspect: tuple[float, float] = (0.6, 1 / 0.6)  # semi-axis ratio a/b, log-uniform
    center: tuple[float, float] = (0.15, 0.85)  # object centre, fraction of the side (objects may be cut by the border)
    shapes: tuple[str, ...] = ("ellipse", "rectangle", "triangle")
    stripe_period: tuple[float, float] = (6.0, 10.0)  # px, one dark + one light stripe
    checker_period: tuple[float, float] = (6.0, 10.0)  # px, two cells (cell side 3-5 px)
    dot_pitch: tuple[float, float] = (7.0, 11.0)  # px between dot centres
    dot_radius: tuple[float, float] = (2.0, 3.0)  # px; must stay below pitch / 2
    object_contrast: tuple[float, float] = (0.5, 0.9)  # Euclidean RGB distance between an object's two colours
    background_delta: tuple[float, float] = (0.05, 0.2)  # RGB distance between the two background colours
    background_cells: tuple[int, int] = (2, 5)  # value-noise grid (inclusive): smaller = smoother
    gamma: tuple[float, float] = (0.7, 1.4)  # log-uniform
    global_contrast: tuple[float, float] = (0.7, 1.2)
    noise_sigma: float = 0.03


DEFAULT_PARAMS = SynthParams()
CLASS_NAMES = ("background", *DEFAULT_PARAMS.textures)
NUM_CLASSES = len(CLASS_NAMES)
PALETTE = [(0, 0, 0), (128, 0, 0), (0, 128, 0), (128, 128, 0)][:NUM_CLASSES]  # VOC-like, for P-mode PNG masks


def make_sample(seed: int, index: int, size: int = 64,
                params: SynthParams = DEFAULT_PARAMS) -> tuple[np.ndarray, np.ndarray]:
    """One textured-shapes sample, a pure function of ``(seed, index, size, params)``.

    Returns ``image`` uint8 [size, size, 3] and ``mask`` uint8 [size, size] with values in {0, 1, 2, 3, 255}.
    """
    rng = np.random.default_rng([seed, index])
    scale = size / params.ref_size
    yy, xx = _grid(size)
    img = _background(rng, size, params)
    label = np.zeros((size, size), np.uint8)
    layer = np.zeros((size, size), np.int16)  # which object is in front: drives where the boundary band goes
    n_obj = int(rng.integers(params.num_objects[0], params.num_objects[1], endpoint=True))
    for k in range(1, n_obj + 1):
        cls = int(rng.integers(1, len(params.textures) + 1))
        inside = _shape(rng, xx, yy, size, params)
        tex = _texture(rng, cls, xx, yy, scale, params)
        lo, hi = _object_colours(rng, params)
        obj = lo + tex[..., None] * (hi - lo)
        img = np.where(inside[..., None], obj, img)
        label[inside] = cls
        layer[inside] = k
    img = _photometric(rng, img, params)
    return (img * 255.0 + 0.5).astype(np.uint8), _with_boundary(label, layer)


@functools.lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates ``yy, xx``, float32 [size, size] each (read-only, shared between calls)."""
    c = np.arange(size, dtype=np.float32) + 0.5
    yy, xx = np.meshgrid(c, c, indexing="ij")
    yy.flags.writeable = xx.flags.writeable = False
    return yy, xx


@functools.lru_cache(maxsize=32)
def _interp_matrix(size: int, cells: int) -> np.ndarray:
    """Linear interpolation weights float32 [size, cells]: ``M @ grid @ M.T`` upsamples a cells x cells grid."""
    t = (np.arange(size) + 0.5) / size * (cells - 1)
    i0 = np.minimum(np.floor(t).astype(int), cells - 2)
    w = (t - i0).astype(np.float32)
    m = np.zeros((size, cells), np.float32)
    m[np.arange(size), i0] = 1 - w
    m[np.arange(size), i0 + 1] = w
    m.flags.writeable = False
    return m


def _unit(rng: np.random.Generator) -> np.ndarray:
    """A uniformly random direction in RGB space, float32 [3]."""
    d = rng.normal(size=3)
    return (d / max(np.linalg.norm(d), 1e-8)).astype(np.float32)


def _background(rng: np.random.Generator, size: int, p: SynthParams) -> np.ndarray:
    """Smooth value noise between two nearby colours, float32 [size, size, 3] in [0, 1]."""
    c1 = rng.uniform(0.05, 0.95, size=3).astype(np.float32)
    c2 = np.clip(c1 + rng.uniform(*p.background_delta) * _unit(rng), 0.0, 1.0)
    cells = int(rng.integers(p.background_cells[0], p.background_cells[1], endpoint=True))
    m = _interp_matrix(size, cells)
    noise = m @ rng.random((cells, cells), dtype=np.float32) @ m.T
    return c1 + noise[..., None] * (c2 - c1)


def _shape(rng: np.random.Generator, xx: np.ndarray, yy: np.ndarray, size: int, p: SynthParams) -> np.ndarray:
    """Boolean [size, size] footprint of one rotated ellipse / rectangle / triangle."""
    kind = p.shapes[int(rng.integers(len(p.shapes)))]
    cx, cy = rng.uniform(*p.center, size=2) * size
    r = rng.uniform(*p.object_radius) * size
    aspect = np.exp(rng.uniform(np.log(p.aspect[0]), np.log(p.aspect[1])))
    a, b = r * np.sqrt(aspect), r / np.sqrt(aspect)
    phi = rng.uniform(0, 2 * np.pi)
    cos, sin = np.cos(phi), np.sin(phi)
    u = ((xx - cx) * cos + (yy - cy) * sin) / a  # object frame, in units of the semi-axes
    v = (-(xx - cx) * sin + (yy - cy) * cos) / b
    if kind == "ellipse":
        return u * u + v * v <= 1.0
    if kind == "rectangle":
        return np.maximum(np.abs(u), np.abs(v)) <= _RECT_HALF
    if kind == "triangle":
        # Equilateral: inside iff the projection on each of the 3 outward edge normals is <= the inradius (R / 2).
        inside = np.ones(u.shape, bool)
        for ang in (np.pi / 2, np.pi / 2 + 2 * np.pi / 3, np.pi / 2 + 4 * np.pi / 3):
            inside &= u * np.cos(ang) + v * np.sin(ang) <= _TRI_CIRCUMRADIUS / 2
        return inside
    raise ValueError(f"unknown shape {kind!r} (expected ellipse, rectangle or triangle)")


def _texture(rng: np.random.Generator, cls: int, xx: np.ndarray, yy: np.ndarray, scale: float,
             p: SynthParams) -> np.ndarray:
    """Binary pattern float32 [size, size] of texture family ``cls``, random orientation and phase."""
    theta = rng.uniform(0, np.pi)
    cos, sin = np.float32(np.cos(theta)), np.float32(np.sin(theta))
    u = xx * cos + yy * sin
    v = -xx * sin + yy * cos
    kind = p.textures[cls - 1]
    if kind == "stripes":  # a 1-D square wave across u
        period = rng.uniform(*p.stripe_period) * scale
        return ((u / period + rng.random()) % 1.0 < 0.5).astype(np.float32)
    if kind == "checker":  # parity of the two cell indices
        cell = rng.uniform(*p.checker_period) * scale / 2
        ph = rng.random(2) * 2
        return ((np.floor(u / cell + ph[0]) + np.floor(v / cell + ph[1])) % 2).astype(np.float32)
    if kind == "dots":  # discs on a square lattice
        pitch = rng.uniform(*p.dot_pitch) * scale
        radius = min(rng.uniform(*p.dot_radius) * scale, 0.45 * pitch)
        du = ((u / pitch + rng.random()) % 1.0 - 0.5) * pitch
        dv = ((v / pitch + rng.random()) % 1.0 - 0.5) * pitch
        return (du * du + dv * dv <= radius * radius).astype(np.float32)
    raise ValueError(f"no texture family {kind!r}")


def _object_colours(rng: np.random.Generator, p: SynthParams) -> tuple[np.ndarray, np.ndarray]:
    """Two colours float32 [3] at distance ``contrast`` along a random RGB direction, both inside [0, 1]^3.

    The mean colour is drawn per channel from the range that keeps both ends in the cube, so the contrast is exact
    (clipping would silently shrink it).
    """
    contrast = rng.uniform(*p.object_contrast)
    half = 0.5 * contrast * _unit(rng)
    margin = np.abs(half)
    mean = (margin + rng.random(3) * (1.0 - 2.0 * margin)).astype(np.float32)
    return mean - half, mean + half


def _photometric(rng: np.random.Generator, img: np.ndarray, p: SynthParams) -> np.ndarray:
    """Global contrast, gamma and Gaussian noise on float [H, W, 3]; returns values in [0, 1]."""
    c = rng.uniform(*p.global_contrast)
    mean = img.mean()
    img = np.clip(mean + (img - mean) * c, 0.0, 1.0)
    gamma = np.exp(rng.uniform(np.log(p.gamma[0]), np.log(p.gamma[1])))
    img = img ** np.float32(gamma)
    img = img + rng.normal(0.0, p.noise_sigma, size=img.shape).astype(np.float32)
    return np.clip(img, 0.0, 1.0)


def _with_boundary(label: np.ndarray, layer: np.ndarray) -> np.ndarray:
    """uint8 [H, W]: ``label`` with 255 on a 1-px band where 4-neighbours differ in label.

    The band goes on the side of the object in front (higher ``layer``), so it is one pixel wide rather than two.
    """
    band = np.zeros(label.shape, bool)
    for axis in (0, 1):
        n = label.shape[axis]
        a = [slice(None)] * 2
        b = [slice(None)] * 2
        a[axis], b[axis] = slice(1, n), slice(0, n - 1)
        a, b = tuple(a), tuple(b)
        diff = label[a] != label[b]
        a_front = layer[a] > layer[b]
        band[a] |= diff & a_front
        band[b] |= diff & ~a_front
    return np.where(band, np.uint8(IGNORE), label)
