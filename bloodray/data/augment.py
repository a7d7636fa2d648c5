"""Training augmentation of uint8 cell crops, on numpy batches (CPU) and torch tensors (any device).

Two geometric schemes, one colour scheme:

- :func:`augment_batch` (the Ray Train workers' iterators): a random zoom crop, a rotation by a multiple of 90
  degrees and a mirror, exact pixel moves on numpy arrays with no Python loop over images;
- :func:`augment_on_device` (the pack trainer, on a GPU): one affine warp per image (any angle, zoom, shift, mirror)
  with ``grid_sample``;
- both then jitter brightness, saturation, contrast and hue through :func:`colour_matrices`, which folds the chain
  into one 3x3 matrix and offset per image. The numpy path calls it on CPU tensors, so both trainers see the same
  colour math.

Robustness to other labs (issue 12), all off by default and applied by :func:`robust_batch` (which
:func:`augment_batch` calls, and which any trainer can call on a uint8 batch): zoom-out onto a background estimated
from the border (cells at another magnification), HED-space stain jitter, gamma, defocus blur, Gaussian noise and
JPEG re-compression at a random quality.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from bloodray.config import ConfigError


@dataclass
class JitterConfig:
    """Settings both augmentation schemes share: mirror, zoom and colour jitter.

    Each key is declared once, here: :class:`AugmentConfig` (``train.augment`` of ``bloodray train``) and
    :class:`WarpAugmentConfig` (the pack trainer's top-level keys) inherit it.
    """

    #: mirror half of the images left-right (orientation carries no meaning in a cell crop).
    flips: bool = True
    #: max relative change of brightness/contrast/saturation (stain variation).
    color_jitter: float = 0.1
    #: hue shift in [-hue, hue] as a fraction of the colour circle.
    hue_jitter: float = 0.02
    #: smallest zoom: the CPU scheme crops a square of U(min_scale, 1) of the side and resizes it back; the warp
    #: scheme scales by U(min_scale, max_scale).
    min_scale: float = 0.85

    def validate(self, prefix: str) -> None:
        if not 0.0 < self.min_scale <= 1.0:
            raise ConfigError(f"{_at(prefix, 'min_scale')}: must be in (0, 1]")
        if not 0.0 <= self.color_jitter < 1.0:
            raise ConfigError(f"{_at(prefix, 'color_jitter')}: must be in [0, 1)")


@dataclass
class RobustConfig:
    """Robustness to other labs' slides (issue 12), applied by :func:`robust_batch`; all off by default."""

    #: zoom-out: shrink the image by up to this factor (1 = off) onto the background colour of its border
    #: (another magnification).
    zoom_out: float = 1.0
    #: share of images that are zoomed out (when ``zoom_out`` > 1).
    zoom_out_prob: float = 0.5
    #: HED stain jitter: each stain's optical density is scaled by U(1-s, 1+s) and shifted by U(-s, s) / 10 (0 = off).
    stain_jitter: float = 0.0
    #: gamma ``exp(U(-g, g))`` applied to the 0..1 intensities (0 = off).
    gamma: float = 0.0
    #: share of images blurred (defocus), with a Gaussian of sigma U(0.3, blur_sigma) px (0 = off).
    blur_prob: float = 0.0
    #: largest Gaussian sigma of the defocus blur, in px.
    blur_sigma: float = 1.5
    #: Gaussian noise of std U(0, noise_std) on the 0..255 scale (0 = off).
    noise_std: float = 0.0
    #: share of images re-compressed as JPEG at a quality drawn from [jpeg_quality_min, 95] (0 = off).
    jpeg_prob: float = 0.0
    #: lowest JPEG quality of the re-compression.
    jpeg_quality_min: int = 30

    @property
    def robust(self) -> bool:
        """Whether any robustness augmentation of :func:`robust_batch` is on."""
        return (self.zoom_out > 1.0 and self.zoom_out_prob > 0) or self.stain_jitter > 0 or self.gamma > 0 \
            or self.blur_prob > 0 or self.noise_std > 0 or self.jpeg_prob > 0

    def validate(self, prefix: str) -> None:
        if not 1.0 <= self.zoom_out <= 4.0:
            raise ConfigError(f"{_at(prefix, 'zoom_out')}: must be in [1, 4] (1 = off)")
        for name in ("zoom_out_prob", "blur_prob", "jpeg_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"{_at(prefix, name)}: must be in [0, 1]")
        if not 0.0 <= self.stain_jitter < 1.0:
            raise ConfigError(f"{_at(prefix, 'stain_jitter')}: must be in [0, 1)")
        if not 0.0 <= self.gamma <= 1.0:
            raise ConfigError(f"{_at(prefix, 'gamma')}: must be in [0, 1]")
        if self.blur_sigma < 0.3:
            raise ConfigError(f"{_at(prefix, 'blur_sigma')}: must be >= 0.3")
        if not 0.0 <= self.noise_std <= 64.0:
            raise ConfigError(f"{_at(prefix, 'noise_std')}: must be in [0, 64] (0..255 scale)")
        if not 1 <= self.jpeg_quality_min <= 95:
            raise ConfigError(f"{_at(prefix, 'jpeg_quality_min')}: must be in [1, 95]")


@dataclass
class AugmentConfig(JitterConfig, RobustConfig):
    """Training augmentation of :func:`augment_batch` (the Ray Train workers), suited to cell crops."""

    #: rotate by a random multiple of 90 degrees.
    rotate90: bool = True

    def validate(self, prefix: str) -> None:
        JitterConfig.validate(self, prefix)
        RobustConfig.validate(self, prefix)


def _at(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def augment_batch(images: np.ndarray, rng: np.random.Generator, cfg: AugmentConfig) -> np.ndarray:
    """Augment a uint8 NHWC batch of square images on the CPU; returns a new uint8 NHWC array.

    Per image, in this order: the robustness augmentations of :func:`robust_batch` (when any is on), a random zoom (a square crop of ``min_scale``..1 of
    the side at a random place, resized back with bilinear interpolation), a
    random rotation by a multiple of 90 degrees, a random horizontal flip, then
    brightness / saturation / contrast / hue jitter. Every step works on the
    whole batch at once (no Python loop over images), and the result depends
    only on ``images``, ``cfg`` and the state of ``rng``. (The colour jitter
    acts on each pixel alone and on the image mean, so it is applied before
    the rotation and flip, which only move pixels: same result, cheaper.)
    """
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[3] != 3 or images.dtype != np.uint8:
        raise ValueError(f"expected a uint8 NHWC RGB batch, got {images.dtype} {images.shape}")
    n, h, w, _ = images.shape
    if cfg.rotate90 and h != w:
        raise ValueError(f"rotate90 needs square images, got {h}x{w}")
    out: np.ndarray = images
    if cfg.robust and n:
        out = robust_batch(images, rng, cfg)  # uint8, a new array
    if cfg.min_scale < 1.0 and n:
        out = _random_zoom(out, rng, cfg.min_scale)  # float32
    if (cfg.color_jitter > 0 or cfg.hue_jitter > 0) and n:
        out = _jitter_colors(out, rng, cfg)  # uint8
    elif out.dtype != np.uint8:
        out = _to_uint8(out)
    turns = rng.integers(0, 4, size=n) if cfg.rotate90 and n else np.zeros(n, dtype=np.int64)
    flips = rng.random(n) < 0.5 if cfg.flips and n else np.zeros(n, dtype=bool)
    if turns.any() or flips.any():
        out = _dihedral(out, turns, flips)
    return out.copy() if out is images else out


_DIHEDRAL_MAPS: dict[int, np.ndarray] = {}


def _dihedral_maps(size: int) -> np.ndarray:
    """(8, size*size) source pixel of each output pixel for ``np.rot90(img, k)`` then, if ``flip``, ``[:, ::-1]``.

    Row ``2 * k + flip``; pixels are numbered row by row. Cached per size.
    """
    if size in _DIHEDRAL_MAPS:
        return _DIHEDRAL_MAPS[size]
    i, j = np.indices((size, size))
    last = size - 1
    maps = []
    for k in range(4):
        for flip in (False, True):
            jj = last - j if flip else j
            # np.rot90(m, k)[i, j] is m[j, last-i], m[last-i, last-j], m[last-j, i] for k = 1, 2, 3.
            src_i, src_j = [(i, jj), (jj, last - i), (last - i, last - jj), (last - jj, i)][k]
            maps.append((src_i * size + src_j).ravel())
    _DIHEDRAL_MAPS[size] = np.stack(maps).astype(np.intp)
    return _DIHEDRAL_MAPS[size]


def _dihedral(images: np.ndarray, turns: np.ndarray, flips: np.ndarray) -> np.ndarray:
    """Rotate each square uint8 image by ``turns`` x 90 degrees, then mirror it left-right where ``flips``.

    One gather of whole pixels per distinct (turns, flip) pair (at most eight), not one step per image.
    """
    n, size, width = images.shape[:3]
    if size != width:  # only mirroring is defined (augment_batch refuses rotate90 here)
        out = images.copy()
        out[flips] = out[flips, :, ::-1]
        return out
    maps = _dihedral_maps(size)
    pixels = np.ascontiguousarray(images).reshape(n, size * size, 3).view(np.dtype((np.void, 3)))[..., 0]
    out = np.empty_like(pixels)
    which = 2 * turns.astype(np.int64) + flips.astype(np.int64)
    for g in np.unique(which):
        group = np.flatnonzero(which == g)
        out[group] = np.take(pixels[group], maps[g], axis=1)
    return out.view(np.uint8).reshape(images.shape)


def _to_uint8(x: np.ndarray) -> np.ndarray:
    """Round a float image batch on the 0..255 scale to uint8 (half up, clipped)."""
    return np.add(np.clip(x, 0.0, 255.0, out=x), 0.5, out=x).astype(np.uint8)


def _bilinear_taps(start: np.ndarray, side: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source rows (or columns) and weights to resize ``side`` px starting at ``start`` to ``size`` px.

    Pixel centres are aligned as in PIL's BILINEAR resize (an upscale here, so
    a plain triangle filter), clamped at the crop's edges. Shapes (N, size).
    """
    pos = start[:, None] + (np.arange(size, dtype=np.float32)[None, :] + 0.5) * (side[:, None] / size) - 0.5
    lo = np.floor(pos)
    frac = (pos - lo).astype(np.float32)
    lo = lo.astype(np.int64)
    first, last = start[:, None].astype(np.int64), (start + side - 1)[:, None].astype(np.int64)
    return np.clip(lo, first, last), np.clip(lo + 1, first, last), frac


def _random_zoom(images: np.ndarray, rng: np.random.Generator, min_scale: float) -> np.ndarray:
    """Crop a random square of ``min_scale``..1 of the side from every image and resize it back (float32)."""
    n, h, w, _ = images.shape
    scale = rng.uniform(min_scale, 1.0, size=n)
    side = np.minimum(np.maximum(min(8, h), np.rint(h * scale)), min(h, w)).astype(np.int64)
    top = np.floor(rng.random(n) * (h - side + 1)).astype(np.int64)
    left = np.floor(rng.random(n) * (w - side + 1)).astype(np.int64)
    return zoom_crops(images, top, left, side)


def zoom_crops(images: np.ndarray, top: np.ndarray, left: np.ndarray, side: np.ndarray) -> np.ndarray:
    """Resize the square crop ``[top:top+side, left:left+side]`` of each image back to the full size.

    Bilinear, as PIL's ``resize(..., BILINEAR)`` upscales; float32 NHWC on the
    0..255 scale. A crop of the whole image returns it unchanged.
    """
    n, h, w, _ = images.shape
    side = np.asarray(side, dtype=np.float32)
    y0, y1, wy = _bilinear_taps(np.asarray(top, dtype=np.float32), side, h)
    x0, x1, wx = _bilinear_taps(np.asarray(left, dtype=np.float32), side, w)
    # Separable, in place on (N, H, W*3) planes so that every inner loop runs along a whole row.
    rows = np.arange(n)[:, None]
    tall = images[rows, y1].astype(np.float32).reshape(n, h, w * 3)   # gathers whole rows
    upper = images[rows, y0].astype(np.float32).reshape(n, h, w * 3)
    tall -= upper
    tall *= wy[:, :, None]
    tall += upper
    # Along x, gather whole pixels (12-byte records) by flat index.
    pixels = tall.reshape(n * h * w, 3).view(np.dtype((np.void, 12))).reshape(-1)
    base = (np.arange(n * h, dtype=np.int64) * w).reshape(n, h, 1)
    out = np.take(pixels, base + x1[:, None, :]).view(np.float32).reshape(n, h, w * 3)
    before = np.take(pixels, base + x0[:, None, :]).view(np.float32).reshape(n, h, w * 3)
    out -= before
    out *= np.repeat(wx, 3, axis=1)[:, None, :]
    out += before
    return out.reshape(n, h, w, 3)


def colour_matrices(brightness, saturation, contrast, hue_angle, channel_mean):
    """Per-image ``(M, offset)`` of the colour jitter: a jittered pixel is ``M @ rgb + offset``.

    The chain is brightness ``x * b``; saturation ``g + (x - g) * s`` about the pixel's grey value ``g``; contrast
    ``m + (x - m) * c`` about the image's mean ``m`` over pixels and channels; then a hue rotation by ``hue_angle``
    radians about the grey axis. Every step is affine in RGB, so the chain folds into one matrix and offset.
    Arguments are float tensors of shape (N,), ``channel_mean`` (N, 3) is the image's mean RGB before jitter, on the
    same scale as the pixels. Returns tensors of shape (N, 3, 3) and (N, 3).
    """
    import torch

    n = brightness.shape[0]
    eye = torch.eye(3, dtype=brightness.dtype, device=brightness.device)
    grey = torch.full((3, 3), 1.0 / 3.0, dtype=brightness.dtype, device=brightness.device)
    m = (saturation[:, None, None] * eye + (1 - saturation)[:, None, None] * grey) * brightness[:, None, None]
    image_mean = torch.einsum("nij,nj->ni", m, channel_mean).mean(dim=1)
    m = m * contrast[:, None, None]
    offset = ((1 - contrast) * image_mean)[:, None].expand(n, 3)
    rotation = hue_matrices(hue_angle)
    return rotation @ m, torch.einsum("nij,nj->ni", rotation, offset)


def hue_matrices(angle):
    """(N, 3, 3) rotations of RGB by ``angle`` radians (a float tensor of shape (N,)) about the grey axis."""
    import torch

    cos, sin = torch.cos(angle), torch.sin(angle)
    k, q = 1.0 / 3.0, math.sqrt(1.0 / 3.0)
    diag = cos + (1 - cos) * k
    plus = k * (1 - cos) + q * sin
    minus = k * (1 - cos) - q * sin
    return torch.stack([torch.stack([diag, minus, plus], dim=-1),
                        torch.stack([plus, diag, minus], dim=-1),
                        torch.stack([minus, plus, diag], dim=-1)], dim=1)


def _jitter_colors(images: np.ndarray, rng: np.random.Generator, cfg: AugmentConfig) -> np.ndarray:
    """Colour jitter of a NHWC batch (uint8 or float on 0..255) -> uint8, in one batched pass over the pixels."""
    import torch

    n = images.shape[0]
    j = cfg.color_jitter
    brightness, contrast, saturation = (rng.uniform(1 - j, 1 + j, size=n).astype(np.float32) for _ in range(3))
    angle = (rng.uniform(-cfg.hue_jitter, cfg.hue_jitter, size=n) * 2 * np.pi).astype(np.float32) \
        if cfg.hue_jitter > 0 else np.zeros(n, dtype=np.float32)
    flat = images.reshape(n, -1, 3).astype(np.float32, copy=False)
    channel_mean = (np.ones((1, flat.shape[1]), dtype=np.float32) @ flat)[:, 0] / flat.shape[1]  # (N, 3)
    m, offset = colour_matrices(*(torch.from_numpy(a) for a in (brightness, saturation, contrast, angle, channel_mean)))
    out = np.matmul(flat, m.numpy().transpose(0, 2, 1))
    out += offset.numpy()[:, None, :]
    return _to_uint8(out).reshape(images.shape)


@dataclass
class WarpAugmentConfig(JitterConfig):
    """Augmentation of :func:`augment_on_device`: a free affine warp, then the colour jitter."""

    #: rotation by any angle (cell orientation carries no meaning).
    rotate: bool = True
    #: largest zoom of the warp (``min_scale`` is the smallest).
    max_scale: float = 1.1
    #: shift as a fraction of the side.
    translate: float = 0.05

    def validate(self, prefix: str) -> None:
        if not 0 < self.min_scale <= self.max_scale:
            raise ConfigError(f"{_at(prefix, 'min_scale')}/max_scale: need 0 < min_scale <= max_scale "
                              f"(got {self.min_scale}, {self.max_scale})")
        if not 0.0 <= self.color_jitter < 1.0:
            raise ConfigError(f"{_at(prefix, 'color_jitter')}: must be in [0, 1)")


def augment_on_device(images, cfg: WarpAugmentConfig, generator=None):
    """Batched augmentation of a ``uint8`` NHWC tensor; returns float NCHW in [0, 1] on the same device.

    One affine warp per image (rotation, mirror, zoom, shift) with reflected borders, then the colour jitter of
    :func:`colour_matrices`, all as tensor ops so the cost does not grow with Python per image.
    """
    import torch
    import torch.nn.functional as F

    x = images.permute(0, 3, 1, 2).float().div_(255.0)
    n, device = x.shape[0], x.device

    def uniform(lo, hi, *shape):
        return torch.rand(*shape, device=device, generator=generator) * (hi - lo) + lo

    angle = uniform(0, 2 * math.pi, n) if cfg.rotate else torch.zeros(n, device=device)
    scale = uniform(cfg.min_scale, cfg.max_scale, n)
    mirror = (torch.where(torch.rand(n, device=device, generator=generator) < 0.5, -1.0, 1.0)
              if cfg.flips else torch.ones(n, device=device))
    shift = uniform(-cfg.translate, cfg.translate, n, 2)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos * mirror, -sin, shift[:, 0]], 1),
                         torch.stack([sin * mirror, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    if cfg.color_jitter > 0 or cfg.hue_jitter > 0:
        j = cfg.color_jitter
        brightness, saturation, contrast = (uniform(1 - j, 1 + j, n) for _ in range(3))
        hue = uniform(-cfg.hue_jitter, cfg.hue_jitter, n) * 2 * math.pi
        m, offset = colour_matrices(brightness, saturation, contrast, hue, x.mean((2, 3)))
        x = torch.einsum("nij,njhw->nihw", m, x) + offset[:, :, None, None]
    return x.clamp_(0.0, 1.0)


#: skimage's ``rgb_from_hed`` (Ruifrok & Johnston's haematoxylin, eosin, DAB vectors) and its inverse, as constants
#: so that the stain jitter needs no scikit-image.
RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=np.float64)
HED_FROM_RGB = np.linalg.inv(RGB_FROM_HED)
#: skimage's floor on intensities before the log (optical density of a black pixel).
_OD_FLOOR = 1e-6


def robust_batch(images: np.ndarray, rng: np.random.Generator, cfg: AugmentConfig) -> np.ndarray:
    """The robustness augmentations of ``cfg`` on a uint8 NHWC batch; returns a new uint8 array of the same shape.

    In this order: zoom-out (:func:`zoom_out`), HED stain jitter, gamma, defocus blur, Gaussian noise, JPEG
    re-compression. Every draw comes from ``rng`` in a fixed order whatever is switched on, so a batch's transforms
    depend only on ``images``, ``cfg`` and the state of ``rng``.
    """
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[3] != 3 or images.dtype != np.uint8:
        raise ValueError(f"expected a uint8 NHWC RGB batch, got {images.dtype} {images.shape}")
    n = images.shape[0]
    # Draw everything first so that switching one step on or off does not shift the others' random numbers.
    shrink = np.where(rng.random(n) < cfg.zoom_out_prob, rng.uniform(1.0, max(1.0, cfg.zoom_out), n), 1.0)
    place = rng.random((n, 2))
    s = cfg.stain_jitter
    # Stained pixels have optical densities of ~0.01-0.1 on skimage's scale: a shift of s itself would blacken them.
    alpha, beta = rng.uniform(1 - s, 1 + s, (n, 3)), rng.uniform(-s, s, (n, 3)) / 10
    gamma = np.exp(rng.uniform(-cfg.gamma, cfg.gamma, n))
    sigma = np.where(rng.random(n) < cfg.blur_prob, rng.uniform(0.3, max(0.3, cfg.blur_sigma), n), 0.0)
    noise_std = rng.uniform(0.0, cfg.noise_std, n)
    noise_seed = int(rng.integers(0, 2**63))
    quality = np.where(rng.random(n) < cfg.jpeg_prob, rng.integers(cfg.jpeg_quality_min, 96, n), 0)

    out = images.copy()
    if cfg.zoom_out > 1.0:
        for i in np.flatnonzero(shrink > 1.0):
            out[i] = zoom_out(out[i], float(shrink[i]), place[i])
    x = out.astype(np.float32) / 255.0
    if s > 0:
        x = stain_jitter(x, alpha, beta)
    if cfg.gamma > 0:
        x = np.power(x, gamma[:, None, None, None].astype(np.float32))
    x *= 255.0
    if cfg.blur_prob > 0 and (sigma > 0).any():
        from scipy.ndimage import gaussian_filter

        for i in np.flatnonzero(sigma > 0):
            # Separable Gaussian over rows and columns only; a stand-in for a defocused objective.
            x[i] = gaussian_filter(x[i], sigma=(sigma[i], sigma[i], 0), mode="reflect")
    if cfg.noise_std > 0:
        x += np.random.default_rng(noise_seed).standard_normal(x.shape, dtype=np.float32) \
            * noise_std[:, None, None, None].astype(np.float32)
    out = _to_uint8(x)
    for i in np.flatnonzero(quality > 0):
        out[i] = jpeg_roundtrip(out[i], int(quality[i]))
    return out


def stain_jitter(x: np.ndarray, alpha: np.ndarray, beta: np.ndarray) -> np.ndarray:
    """Scale and shift each image's haematoxylin, eosin and DAB optical densities (Tellez et al. 2018).

    ``x`` is float NHWC in [0, 1]; ``alpha`` and ``beta`` are (N, 3). skimage's ``rgb2hed`` then ``hed2rgb`` with the
    stains changed in between, folded into one affine map of the optical density per image (skimage's clip of
    negative stains is left out: it would make the round trip lossy even with no jitter). Returns [0, 1] floats.
    """
    log_floor = np.log(_OD_FLOOR)
    od = np.log(np.maximum(x, _OD_FLOOR)) / log_floor  # skimage's normalised optical density, >= 0
    m = (HED_FROM_RGB[None] * alpha[:, None, :]) @ RGB_FROM_HED[None]  # (N, 3, 3)
    shift = beta @ RGB_FROM_HED  # (N, 3)
    n = x.shape[0]
    od = np.matmul(od.reshape(n, -1, 3), m.astype(np.float32)) + shift[:, None, :].astype(np.float32)
    return np.clip(np.exp(od * log_floor), 0.0, 1.0).reshape(x.shape).astype(np.float32)


def border_colour(image: np.ndarray, width: int = 2) -> np.ndarray:
    """The median RGB of an HxWx3 image's outer ``width`` pixels: the slide background around a centred cell."""
    ring = np.concatenate([image[:width].reshape(-1, 3), image[-width:].reshape(-1, 3),
                           image[:, :width].reshape(-1, 3), image[:, -width:].reshape(-1, 3)])
    return np.median(ring, axis=0)


def zoom_out(image: np.ndarray, factor: float, place: np.ndarray | tuple[float, float] = (0.5, 0.5)) -> np.ndarray:
    """Shrink a uint8 HxWx3 image by ``factor`` (>= 1) and paste it on a canvas of the border's colour.

    The cell then looks as it would at a ``factor`` times lower magnification. ``place`` (two numbers in [0, 1])
    puts the shrunk image anywhere on the canvas (0.5, 0.5 = centred). Returns a new uint8 array of the same shape.
    """
    from PIL import Image

    h, w = image.shape[:2]
    sh, sw = max(1, int(round(h / factor))), max(1, int(round(w / factor)))
    small = np.asarray(Image.fromarray(image).resize((sw, sh), Image.BILINEAR))
    canvas = np.empty_like(image)
    canvas[...] = np.rint(border_colour(image)).astype(np.uint8)
    top, left = int(place[0] * (h - sh)), int(place[1] * (w - sw))
    canvas[top:top + sh, left:left + sw] = small
    return canvas


def jpeg_roundtrip(image: np.ndarray, quality: int) -> np.ndarray:
    """Encode a uint8 HxWx3 image as JPEG at ``quality`` with PIL and decode it again (a lab's compression)."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=int(quality))
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        return np.asarray(decoded.convert("RGB"), dtype=np.uint8)
