"""The evaluation preset, and training augmentation.

The evaluation preset (:class:`EvalPreset`) is the one and only preprocessing
used by evaluation and by the nightly classification job: decode to RGB
(:mod:`bloodray.data.decode`), resize to the model's square input size, then
normalize with the model's mean/std. Training augmentation (:func:`augment_batch`)
is separate and runs on already-resized uint8 images, so both paths see pixels
prepared the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from bloodray.data.decode import DEFAULT_MAX_PIXELS, decode_image


@dataclass(frozen=True)
class EvalPreset:
    """The shared evaluation/inference preset: resize to a square, normalize.

    Built from a model's :class:`~bloodray.models.ModelInfo` (or a checkpoint's
    metadata) so input size and normalization always match the weights.
    """

    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    max_pixels: int = DEFAULT_MAX_PIXELS

    def load(self, data: bytes) -> np.ndarray:
        """Decode bytes to a resized ``uint8`` HxWx3 array; raises :class:`~bloodray.data.decode.ImageDecodeError`."""
        image = decode_image(data, target_size=self.input_size, max_pixels=self.max_pixels)
        return self.resize(image)

    def resize(self, image: Image.Image) -> np.ndarray:
        """Resize a PIL RGB image to the square input size (cells are centred crops)."""
        if image.size != (self.input_size, self.input_size):
            image = image.resize((self.input_size, self.input_size), Image.BILINEAR, reducing_gap=None)
        return np.asarray(image, dtype=np.uint8)

    def normalize(self, images, device=None, dtype=None, channels_last: bool = False):
        """uint8 NHWC batch (numpy or tensor) -> normalized float NCHW tensor on ``device``."""
        import torch

        batch = torch.as_tensor(images)
        if device is not None:
            # Move uint8 first: a quarter of the bytes of float32 cross the bus.
            batch = batch.to(device, non_blocking=True)
        batch = batch.permute(0, 3, 1, 2).float().div_(255.0)
        mean = torch.tensor(self.mean, device=batch.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=batch.device).view(1, 3, 1, 1)
        batch = (batch - mean) / std
        if channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        if dtype is not None:
            batch = batch.to(dtype)
        return batch


@dataclass(frozen=True)
class AugmentConfig:
    """Training augmentation suited to cell crops (orientation carries no meaning)."""

    flips: bool = True
    rotate90: bool = True
    #: max relative change of brightness/contrast/saturation (stain variation).
    color_jitter: float = 0.1
    #: hue shift in [-hue, hue] as a fraction of the colour circle.
    hue_jitter: float = 0.02
    #: random zoom: crop a square of this fraction of the side (min), resized back.
    min_scale: float = 0.85


def augment_batch(images: np.ndarray, rng: np.random.Generator, cfg: AugmentConfig) -> np.ndarray:
    """Augment a uint8 NHWC batch of square images on the CPU; returns a new uint8 NHWC array.

    Per image, in this order: a random zoom (a square crop of ``min_scale``..1 of
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
    if cfg.min_scale < 1.0 and n:
        out = _random_zoom(images, rng, cfg.min_scale)  # float32
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


def _jitter_colors(images: np.ndarray, rng: np.random.Generator, cfg: AugmentConfig) -> np.ndarray:
    """Brightness, saturation, contrast and hue jitter of a NHWC batch (uint8 or float on 0..255) -> uint8.

    Each step is affine in RGB, so per image the chain folds into one 3x3
    matrix and an offset, applied in a single batched pass.
    """
    n = images.shape[0]
    j = cfg.color_jitter
    brightness = rng.uniform(1 - j, 1 + j, size=n).astype(np.float32)
    contrast = rng.uniform(1 - j, 1 + j, size=n).astype(np.float32)
    saturation = rng.uniform(1 - j, 1 + j, size=n).astype(np.float32)
    eye = np.eye(3, dtype=np.float32)
    grey = np.full((3, 3), 1.0 / 3.0, dtype=np.float32)  # x -> its channel mean, on every channel
    # brightness x*b, then saturation g + (x - g)*s with g the pixel's grey value.
    m = (saturation[:, None, None] * eye + (1 - saturation)[:, None, None] * grey) * brightness[:, None, None]
    # contrast: m + (x - m)*c about the image's mean over pixels and channels.
    flat = images.reshape(n, -1, 3).astype(np.float32, copy=False)
    channel_mean = (np.ones((1, flat.shape[1]), dtype=np.float32) @ flat)[:, 0] / flat.shape[1]  # (N, 3)
    image_mean = np.einsum("nij,nj->ni", m, channel_mean).mean(axis=1)                          # (N,)
    m = m * contrast[:, None, None]
    offset = ((1 - contrast) * image_mean)[:, None] * np.ones((1, 3), dtype=np.float32)       # (N, 3)
    if cfg.hue_jitter > 0:
        # A small hue shift is a rotation of the chroma plane around the grey axis.
        angle = (rng.uniform(-cfg.hue_jitter, cfg.hue_jitter, size=n) * 2 * np.pi).astype(np.float32)
        rotation = _hue_matrices(angle)
        m = rotation @ m
        offset = np.einsum("nij,nj->ni", rotation, offset)
    out = np.matmul(flat, m.transpose(0, 2, 1))
    out += offset[:, None, :]
    return _to_uint8(out).reshape(images.shape)


def _hue_matrices(angle: np.ndarray) -> np.ndarray:
    """(N, 3, 3) rotations of RGB by ``angle`` radians about the grey axis (1, 1, 1)."""
    cos, sin = np.cos(angle).astype(np.float32), np.sin(angle).astype(np.float32)
    k = np.float32(1.0 / 3.0)
    sq = np.float32(np.sqrt(1.0 / 3.0))
    diag = cos + (1 - cos) * k
    plus = k * (1 - cos) + sq * sin
    minus = k * (1 - cos) - sq * sin
    return np.stack([
        np.stack([diag, minus, plus], axis=-1),
        np.stack([plus, diag, minus], axis=-1),
        np.stack([minus, plus, diag], axis=-1),
    ], axis=1)


def _rotate_hue(x: np.ndarray, angle: np.ndarray) -> np.ndarray:
    """Rotate the hue of every image of a float NHWC batch by its own ``angle`` (radians), in one batched product."""
    n = x.shape[0]
    m = _hue_matrices(np.asarray(angle, dtype=np.float32))
    return np.matmul(x.reshape(n, -1, 3), m.transpose(0, 2, 1)).reshape(x.shape)
