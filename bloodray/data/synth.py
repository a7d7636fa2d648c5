"""Deterministic synthetic blood-smear crops ("synthetic cells") for tests and demos.

Real PBC images cannot ship with the repository, yet every stage -- training,
batch classification of slide archives, differential reports -- needs labelled
images whose true class and per-sample composition are known. This module draws
cell-like RGB images with numpy and PIL only: a pale smear background with a
few faint red cells, and one central cell whose size, colours, nucleus shape
and granules follow the morphology cues of its class. Classes are kept far
apart so a small CNN learns them in about a minute of CPU time, while jitter in
position, rotation, size, colour, noise and blur keeps them from being
memorised pixel by pixel.

Everything is reproducible: each image draws from its own
``numpy.random.default_rng([...])`` seeded by (seed, stream, class, index), so
an image is byte-identical across runs and does not depend on how many other
images are generated. All writes go through :mod:`bloodray.storage`, so output
may be a local folder or an ``s3://`` prefix.
"""

from __future__ import annotations

import hashlib
import io
import math
import posixpath
import tarfile
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from bloodray import storage
from bloodray.classes import CELL_CLASSES, CLASS_NAMES, CLASS_TO_INDEX, reference_ranges

__all__ = [
    "ARCHIVE_LAYOUTS",
    "JPEG_QUALITY",
    "SampleSpec",
    "default_samples",
    "expected_counts",
    "render_cell",
    "write_archive",
    "write_labelled_dataset",
]

#: archive layouts understood by :func:`write_archive`.
ARCHIVE_LAYOUTS: tuple[str, ...] = ("folders", "tar")
JPEG_QUALITY = 90

# Separate RNG streams so dataset images, archive images and shuffles never
# share random numbers: a model trained on the labelled dataset is then always
# evaluated on archive images it has not seen, even with the same seed.
_STREAM_DATASET = 0
_STREAM_ARCHIVE = 1
_STREAM_SHUFFLE = 2
_STREAM_SAMPLES = 3

# All geometry below is designed for a 128 px crop and scaled by size / 128.
_REF_SIZE = 128.0
_MIN_SIZE = 32


# --------------------------------------------------------------------------
# Low-level drawing helpers (float32 images in 0..255, shape (S, S, 3)).
# --------------------------------------------------------------------------


class _Canvas:
    """Pixel grid and compositing for one image.

    Shapes are drawn as soft-edged alpha masks from analytic distance fields,
    evaluated only inside each shape's bounding box; the grid is kept as
    broadcastable row/column vectors, so no (S, S) coordinate arrays are built.
    """

    def __init__(self, size: int, background: np.ndarray):
        self.size = size
        self.scale = size / _REF_SIZE
        coords = np.arange(size, dtype=np.float32) + 0.5
        self.ys = coords[:, None]
        self.xs = coords[None, :]
        self.img = np.empty((size, size, 3), dtype=np.float32)
        self.img[...] = background

    # --- masks -----------------------------------------------------------
    def _soft(self, signed_distance: np.ndarray, edge: float) -> np.ndarray:
        # Linear ramp of ~edge px across the boundary gives anti-aliased edges
        # without supersampling.
        return np.clip(0.5 - signed_distance / max(edge, 1e-3), 0.0, 1.0)

    def _window(self, x0: float, y0: float, x1: float, y1: float):
        """Row/column slices covering a box, clipped to the image (None if empty).

        Shapes are evaluated only inside their bounding box; the rest of the
        mask stays zero, which keeps per-shape cost proportional to its area.
        """
        c0, c1 = max(int(math.floor(x0)), 0), min(int(math.ceil(x1)) + 1, self.size)
        r0, r1 = max(int(math.floor(y0)), 0), min(int(math.ceil(y1)) + 1, self.size)
        if c0 >= c1 or r0 >= r1:
            return None
        return slice(r0, r1), slice(c0, c1)

    def _masked(self, box, values: np.ndarray | None) -> np.ndarray:
        mask = np.zeros((self.size, self.size), dtype=np.float32)
        if box is not None:
            mask[box] = values
        return mask

    def circle(self, cx: float, cy: float, r: float, edge: float = 1.0) -> np.ndarray:
        reach = r + edge + 1.0
        box = self._window(cx - reach, cy - reach, cx + reach, cy + reach)
        if box is None:
            return self._masked(None, None)
        xs, ys = self.xs[:, box[1]], self.ys[box[0], :]
        d = np.sqrt((xs - cx) ** 2 + (ys - cy) ** 2) - r
        return self._masked(box, self._soft(d, edge))

    def ellipse(self, cx: float, cy: float, a: float, b: float, angle: float,
                edge: float = 1.0, wobble: Iterable[tuple[int, float, float]] = ()) -> np.ndarray:
        """Rotated ellipse; ``wobble`` = (harmonic, amplitude, phase) bumps the rim."""
        wobble = list(wobble)
        reach = max(a, b) * (1.0 + sum(abs(amp) for _, amp, _ in wobble)) + edge + 1.0
        box = self._window(cx - reach, cy - reach, cx + reach, cy + reach)
        if box is None:
            return self._masked(None, None)
        dx, dy = self.xs[:, box[1]] - cx, self.ys[box[0], :] - cy
        c, s = math.cos(angle), math.sin(angle)
        u = dx * c + dy * s
        v = -dx * s + dy * c
        rho = np.sqrt((u / a) ** 2 + (v / b) ** 2)
        if wobble:
            # Real cell outlines are never perfect ellipses; low harmonics of the
            # polar angle make them irregular but still convex-looking.
            theta = np.arctan2(v / b, u / a)
            rim = np.ones_like(theta)
            for k, amp, phase in wobble:
                rim += amp * np.cos(k * theta + phase)
            rho = rho / rim
        return self._masked(box, self._soft((rho - 1.0) * math.sqrt(a * b), edge))

    def capsule(self, x0: float, y0: float, x1: float, y1: float, r: float,
                edge: float = 1.0) -> np.ndarray:
        """Thick segment: the chromatin strands that join nuclear lobes."""
        reach = r + edge + 1.0
        box = self._window(min(x0, x1) - reach, min(y0, y1) - reach, max(x0, x1) + reach, max(y0, y1) + reach)
        if box is None:
            return self._masked(None, None)
        xs, ys = self.xs[:, box[1]], self.ys[box[0], :]
        vx, vy = x1 - x0, y1 - y0
        length2 = max(vx * vx + vy * vy, 1e-6)
        t = np.clip(((xs - x0) * vx + (ys - y0) * vy) / length2, 0.0, 1.0)
        d = np.sqrt((xs - x0 - t * vx) ** 2 + (ys - y0 - t * vy) ** 2) - r
        return self._masked(box, self._soft(d, edge))

    # --- painting ----------------------------------------------------------
    def paint(self, mask: np.ndarray, colour: np.ndarray, alpha: float = 1.0) -> None:
        """Blend ``colour`` (RGB triple or per-pixel (S, S, 3)) through ``mask``."""
        # Only touch the mask's bounding box: most shapes cover a small part of
        # the image and the 3-channel blend dominates the render time.
        rows = np.flatnonzero(mask.any(axis=1))
        if rows.size == 0:
            return
        cols = np.flatnonzero(mask.any(axis=0))
        box = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
        colour = np.asarray(colour, dtype=np.float32)
        if colour.ndim == 3:
            colour = colour[box]
        target = self.img[box]
        target += (colour - target) * (mask[box] * alpha)[..., None]


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Zero-mean, unit-ish smooth noise field: blotchy stain and chromatin texture."""
    cells = max(2, int(cells))
    small = rng.standard_normal((cells, cells)).astype(np.float32)
    field = Image.fromarray(small).resize((size, size), Image.BICUBIC)
    return np.asarray(field, dtype=np.float32)


def _jitter_colour(rng: np.random.Generator, rgb: tuple[float, float, float], amount: float) -> np.ndarray:
    return np.clip(np.asarray(rgb, dtype=np.float32) + rng.uniform(-amount, amount, 3).astype(np.float32), 0, 255)


def _textured(base: np.ndarray, texture: np.ndarray, strength: float) -> np.ndarray:
    """Per-pixel colour: ``base`` lightened/darkened by a noise ``texture``."""
    return np.clip(base[None, None, :] * (1.0 + strength * texture[..., None]), 0, 255)


def _granule_mask(rng: np.random.Generator, size: int, cx: float, cy: float, radius: float,
                  count: int, r_min: float, r_max: float) -> np.ndarray:
    """Mask of ``count`` small dots scattered uniformly over a disc.

    PIL's ellipse drawing is far cheaper per dot than a distance field, which
    matters for the hundreds of granules of eosinophils and basophils. Dots are
    hard-edged here; the final defocus blur of the whole image softens them.
    """
    layer = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(layer)
    rr = radius * np.sqrt(rng.uniform(0.0, 1.0, count))
    th = rng.uniform(0.0, 2 * math.pi, count)
    gr = rng.uniform(r_min, r_max, count)
    gx = cx + rr * np.cos(th)
    gy = cy + rr * np.sin(th)
    for x, y, r in zip(gx.tolist(), gy.tolist(), gr.tolist()):
        draw.ellipse((x - r, y - r, x + r, y + r), fill=255)
    return np.asarray(layer, dtype=np.float32) / 255.0


# --------------------------------------------------------------------------
# Scene: background and red cells.
# --------------------------------------------------------------------------


def _background(rng: np.random.Generator, size: int) -> _Canvas:
    # Mostly a brightness shift with a little hue drift: smears vary in
    # thickness more than in stain colour.
    base = _jitter_colour(rng, (234, 220, 212), 3) + np.float32(rng.uniform(-6, 6))
    canvas = _Canvas(size, base)
    # Uneven stain across the field, a few grey levels only.
    canvas.img += 4.0 * _smooth_noise(rng, size, 4)[..., None]
    return canvas


def _red_cells(canvas: _Canvas, rng: np.random.Generator, count: int) -> None:
    """Faint pale-red discs with central pallor, drawn under the main cell."""
    size, k = canvas.size, canvas.scale
    rbc = _jitter_colour(rng, (222, 166, 164), 8)
    for _ in range(count):
        r = rng.uniform(13.0, 17.0) * k
        cx = rng.uniform(-0.1, 1.1) * size
        cy = rng.uniform(-0.1, 1.1) * size
        disc = canvas.ellipse(cx, cy, r, r * rng.uniform(0.9, 1.0), rng.uniform(0, math.pi), edge=1.5 * k)
        pallor = canvas.circle(cx, cy, r * rng.uniform(0.35, 0.5), edge=6.0 * k)
        canvas.paint(disc * (1.0 - 0.55 * pallor), rbc, alpha=rng.uniform(0.45, 0.7))


# --------------------------------------------------------------------------
# Per-class central cells. Each receives the canvas, rng and a centre/size
# already jittered; they only differ in morphology cues.
# --------------------------------------------------------------------------


def _cell_body(canvas: _Canvas, rng: np.random.Generator, cx: float, cy: float, radius: float,
               colour: tuple[float, float, float], colour_jitter: float = 6.0,
               texture: float = 0.04) -> np.ndarray:
    """Paint a slightly irregular round cytoplasm and return its mask."""
    wobble = [(k, rng.uniform(0.0, 0.03), rng.uniform(0, 2 * math.pi)) for k in (2, 3, 5)]
    mask = canvas.ellipse(cx, cy, radius, radius * rng.uniform(0.9, 1.0), rng.uniform(0, math.pi),
                          edge=1.5 * canvas.scale, wobble=wobble)
    base = _jitter_colour(rng, colour, colour_jitter)
    canvas.paint(mask, _textured(base, _smooth_noise(rng, canvas.size, 10), texture))
    return mask


def _nucleus_paint(canvas: _Canvas, rng: np.random.Generator, mask: np.ndarray,
                   colour: tuple[float, float, float], clumping: float, jitter: float = 8.0) -> None:
    """Chromatin: a base colour with coarse (clumped) plus fine texture."""
    size = canvas.size
    texture = 0.7 * _smooth_noise(rng, size, 14) + 0.3 * _smooth_noise(rng, size, 32)
    canvas.paint(mask, _textured(_jitter_colour(rng, colour, jitter), texture, clumping))


def _lobe_chain(canvas: _Canvas, rng: np.random.Generator, cx: float, cy: float, radius: float,
                n_lobes: int, lobe_r: float, path_r: float, arc: float, strand: float) -> np.ndarray:
    """Lobes placed along an arc around the centre, joined by thin strands."""
    start = rng.uniform(0, 2 * math.pi)
    angles = start + np.linspace(0.0, arc, n_lobes) + rng.uniform(-0.15, 0.15, n_lobes)
    dist = path_r * rng.uniform(0.8, 1.1, n_lobes)
    px = cx + dist * np.cos(angles)
    py = cy + dist * np.sin(angles)
    mask = np.zeros((canvas.size, canvas.size), dtype=np.float32)
    for i in range(n_lobes):
        lr = lobe_r * rng.uniform(0.85, 1.15)
        lobe = canvas.ellipse(px[i], py[i], lr, lr * rng.uniform(0.7, 0.95), rng.uniform(0, math.pi),
                              edge=1.2 * canvas.scale)
        np.maximum(mask, lobe, out=mask)
        if i:
            link = canvas.capsule(px[i - 1], py[i - 1], px[i], py[i], strand, edge=1.0 * canvas.scale)
            np.maximum(mask, link, out=mask)
    return mask


def _draw_neutrophil(canvas, rng, cx, cy, k):
    radius = rng.uniform(23.0, 27.0) * k
    body = _cell_body(canvas, rng, cx, cy, radius, (226, 196, 214))
    # Fine, faint lilac granules: the "neutral" staining of the cytoplasm.
    gran = _granule_mask(rng, canvas.size, cx, cy, radius * 0.95, int(rng.integers(120, 180)),
                         0.5 * k, 0.9 * k)
    canvas.paint(gran * body, _jitter_colour(rng, (196, 150, 190), 8), alpha=0.45)
    n_lobes = int(rng.integers(3, 6))
    nucleus = _lobe_chain(canvas, rng, cx, cy, radius, n_lobes, lobe_r=radius * 0.24,
                          path_r=radius * 0.45, arc=rng.uniform(2.4, 3.6), strand=radius * 0.06)
    _nucleus_paint(canvas, rng, nucleus, (112, 54, 146), clumping=0.12)


def _draw_eosinophil(canvas, rng, cx, cy, k):
    radius = rng.uniform(26.0, 30.0) * k
    body = _cell_body(canvas, rng, cx, cy, radius, (232, 190, 170))
    # Two big lobes ("spectacles") first, then granules packed over the cytoplasm
    # but not the nucleus.
    nucleus = _lobe_chain(canvas, rng, cx, cy, radius, 2, lobe_r=radius * 0.33,
                          path_r=radius * 0.42, arc=rng.uniform(2.2, 3.0), strand=radius * 0.09)
    _nucleus_paint(canvas, rng, nucleus, (108, 56, 138), clumping=0.12)
    gran = _granule_mask(rng, canvas.size, cx, cy, radius * 0.97, int(rng.integers(260, 340)),
                         1.3 * k, 1.9 * k)
    canvas.paint(gran * body * (1.0 - 0.85 * nucleus), _jitter_colour(rng, (226, 110, 66), 10), alpha=0.9)


def _draw_basophil(canvas, rng, cx, cy, k):
    radius = rng.uniform(21.0, 25.0) * k
    body = _cell_body(canvas, rng, cx, cy, radius, (196, 172, 210))
    nucleus = canvas.ellipse(cx + rng.uniform(-3, 3) * k, cy + rng.uniform(-3, 3) * k, radius * 0.55,
                             radius * 0.45, rng.uniform(0, math.pi), edge=2.0 * k)
    _nucleus_paint(canvas, rng, nucleus, (110, 70, 150), clumping=0.08)
    # Dense, coarse dark granules spill over the nucleus and hide it.
    gran = _granule_mask(rng, canvas.size, cx, cy, radius * 0.98, int(rng.integers(170, 230)),
                         1.4 * k, 2.3 * k)
    canvas.paint(gran * body, _jitter_colour(rng, (52, 26, 92), 8), alpha=0.92)


def _draw_lymphocyte(canvas, rng, cx, cy, k):
    radius = rng.uniform(16.0, 19.0) * k
    _cell_body(canvas, rng, cx, cy, radius, (150, 188, 232), colour_jitter=8)
    # Round nucleus filling most of the cell, a little eccentric so the blue
    # rim is wider on one side.
    off = radius * rng.uniform(0.04, 0.12)
    ang = rng.uniform(0, 2 * math.pi)
    nr = radius * rng.uniform(0.78, 0.86)
    nucleus = canvas.ellipse(cx + off * math.cos(ang), cy + off * math.sin(ang), nr, nr * rng.uniform(0.9, 1.0),
                             rng.uniform(0, math.pi), edge=1.3 * k,
                             wobble=[(3, rng.uniform(0, 0.03), rng.uniform(0, 6.3))])
    _nucleus_paint(canvas, rng, nucleus, (78, 38, 118), clumping=0.18)


def _draw_monocyte(canvas, rng, cx, cy, k):
    radius = rng.uniform(29.0, 33.0) * k
    body = _cell_body(canvas, rng, cx, cy, radius, (178, 176, 206), texture=0.06)
    # Vacuoles: small clear holes in the grey-blue cytoplasm.
    for _ in range(int(rng.integers(0, 5))):
        rr = radius * math.sqrt(rng.uniform(0.3, 0.8))
        th = rng.uniform(0, 2 * math.pi)
        vac = canvas.circle(cx + rr * math.cos(th), cy + rr * math.sin(th), rng.uniform(1.5, 3.5) * k, edge=1.0 * k)
        canvas.paint(vac * body, np.array((228, 224, 236), np.float32), alpha=0.8)
    # Kidney/folded nucleus: an off-centre ellipse with a bite taken out of it.
    ang = rng.uniform(0, 2 * math.pi)
    ncx = cx + radius * 0.12 * math.cos(ang)
    ncy = cy + radius * 0.12 * math.sin(ang)
    a, b = radius * rng.uniform(0.58, 0.66), radius * rng.uniform(0.40, 0.46)
    ell = canvas.ellipse(ncx, ncy, a, b, ang + math.pi / 2, edge=1.5 * k,
                         wobble=[(2, rng.uniform(0, 0.05), rng.uniform(0, 6.3))])
    # The notch faces the cell centre, which gives the bean shape.
    notch = canvas.circle(ncx - b * 1.05 * math.cos(ang), ncy - b * 1.05 * math.sin(ang),
                          b * rng.uniform(0.55, 0.75), edge=2.0 * k)
    _nucleus_paint(canvas, rng, ell * (1.0 - notch), (140, 100, 172), clumping=0.16)


def _draw_ig(canvas, rng, cx, cy, k):
    radius = rng.uniform(27.0, 31.0) * k
    body = _cell_body(canvas, rng, cx, cy, radius, (206, 170, 222))
    gran = _granule_mask(rng, canvas.size, cx, cy, radius * 0.95, int(rng.integers(35, 60)),
                         0.9 * k, 1.5 * k)
    canvas.paint(gran * body, _jitter_colour(rng, (170, 70, 140), 10), alpha=0.7)
    # Large oval nucleus, eccentric, with a shallow indentation and fine, pale
    # chromatin (a young cell).
    ang = rng.uniform(0, 2 * math.pi)
    ncx = cx + radius * 0.15 * math.cos(ang)
    ncy = cy + radius * 0.15 * math.sin(ang)
    a, b = radius * rng.uniform(0.6, 0.68), radius * rng.uniform(0.5, 0.56)
    ell = canvas.ellipse(ncx, ncy, a, b, ang + math.pi / 2, edge=1.5 * k)
    dent = canvas.circle(ncx - b * 1.25 * math.cos(ang), ncy - b * 1.25 * math.sin(ang),
                         b * rng.uniform(0.35, 0.55), edge=2.0 * k)
    _nucleus_paint(canvas, rng, ell * (1.0 - dent), (152, 96, 186), clumping=0.08)


def _draw_erythroblast(canvas, rng, cx, cy, k):
    radius = rng.uniform(19.0, 23.0) * k
    _cell_body(canvas, rng, cx, cy, radius, (198, 160, 182), texture=0.03)
    nr = radius * rng.uniform(0.5, 0.6)
    ang = rng.uniform(0, 2 * math.pi)
    off = radius * rng.uniform(0.0, 0.12)
    # Pyknotic nucleus: very round and sharp-edged, almost black.
    nucleus = canvas.circle(cx + off * math.cos(ang), cy + off * math.sin(ang), nr, edge=1.0 * k)
    _nucleus_paint(canvas, rng, nucleus, (44, 22, 56), clumping=0.10, jitter=5)


def _draw_platelet(canvas, rng, cx, cy, k):
    # No leukocyte: a loose cluster of small granular fragments.
    for _ in range(int(rng.integers(3, 8))):
        r = rng.uniform(2.0, 6.0) * k
        spread = rng.uniform(0.0, 22.0) * k
        th = rng.uniform(0, 2 * math.pi)
        px, py = cx + spread * math.cos(th), cy + spread * math.sin(th)
        frag = canvas.ellipse(px, py, r, r * rng.uniform(0.6, 1.0), rng.uniform(0, math.pi), edge=1.0 * k,
                              wobble=[(3, rng.uniform(0, 0.12), rng.uniform(0, 6.3))])
        canvas.paint(frag, _jitter_colour(rng, (176, 136, 204), 10), alpha=0.85)
        # Granulomere: a darker purple granular centre.
        core = _granule_mask(rng, canvas.size, px, py, r * 0.6, int(rng.integers(3, 8)),
                             0.5 * k, 1.0 * k)
        canvas.paint(core * frag, _jitter_colour(rng, (110, 56, 150), 10), alpha=0.9)


_DRAWERS = {
    "neutrophil": _draw_neutrophil,
    "eosinophil": _draw_eosinophil,
    "basophil": _draw_basophil,
    "lymphocyte": _draw_lymphocyte,
    "monocyte": _draw_monocyte,
    "ig": _draw_ig,
    "erythroblast": _draw_erythroblast,
    "platelet": _draw_platelet,
}


def render_cell(class_name: str, rng: np.random.Generator, size: int = 128) -> Image.Image:
    """Render one synthetic blood-smear crop of class ``class_name``.

    Args:
        class_name: canonical class name from :data:`bloodray.classes.CLASS_NAMES`.
        rng: source of all randomness; the same generator state gives the same
            pixels.
        size: width and height in pixels (at least 32); geometry scales with it.

    Returns:
        An RGB :class:`PIL.Image.Image` of ``size`` x ``size`` pixels.

    Raises:
        ValueError: for an unknown class name or a too-small size.
    """
    if class_name not in CLASS_TO_INDEX:
        raise ValueError(f"unknown cell class {class_name!r}; expected one of {', '.join(CLASS_NAMES)}")
    drawer = _DRAWERS.get(class_name)
    if drawer is None:  # classes.py gained a class this renderer does not know yet
        raise ValueError(f"no synthetic renderer for cell class {class_name!r}")
    size = int(size)
    if size < _MIN_SIZE:
        raise ValueError(f"size must be at least {_MIN_SIZE} px, got {size}")

    k = size / _REF_SIZE
    canvas = _background(rng, size)
    n_red = int(rng.integers(5, 10)) if class_name == "platelet" else int(rng.integers(3, 7))
    _red_cells(canvas, rng, n_red)
    cx = size / 2 + rng.uniform(-7.0, 7.0) * k
    cy = size / 2 + rng.uniform(-7.0, 7.0) * k
    drawer(canvas, rng, cx, cy, k)

    # Whole-slide stain variation, sensor noise and slight defocus.
    canvas.img *= rng.uniform(0.97, 1.03, 3).astype(np.float32)
    canvas.img += rng.standard_normal(canvas.img.shape, dtype=np.float32) * np.float32(rng.uniform(2.0, 4.0))
    image = Image.fromarray(np.clip(canvas.img + 0.5, 0, 255).astype(np.uint8))
    return image.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 0.8) * k))


# --------------------------------------------------------------------------
# Writing images.
# --------------------------------------------------------------------------


def _jpeg_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


def _is_local(fs: Any) -> bool:
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
    return any(p in ("file", "local") for p in protocols)


def _ensure_dir(fs: Any, path: str) -> None:
    # Object stores have no directories; creating "folders" there would at best
    # write marker objects and at worst try to create a bucket.
    if _is_local(fs):
        fs.makedirs(path, exist_ok=True)


def _write_bytes(fs: Any, path: str, data: bytes) -> None:
    with fs.open(path, "wb") as fh:
        fh.write(data)


def write_labelled_dataset(out_uri: str, per_class: int, *, size: int = 128, seed: int = 0,
                           storage_options: dict | None = None) -> dict[str, int]:
    """Write a labelled ImageFolder dataset of synthetic cells.

    Layout: ``<out_uri>/<class_name>/<PREFIX>_<6-digit index>.jpg`` (PREFIX is the
    class's first PBC file prefix), JPEG quality 90, so both the folder and
    the file name identify the class exactly as with the real PBC dataset.

    Args:
        out_uri: local folder or ``s3://`` prefix.
        per_class: images per class (0 writes nothing but still returns counts).
        size: image side in pixels.
        seed: dataset seed; image ``i`` of a class depends only on (seed, class, i).
        storage_options: fsspec options for object storage (endpoint etc.).

    Returns:
        Number of images written per class name, in class index order.
    """
    per_class = int(per_class)
    if per_class < 0:
        raise ValueError(f"per_class must be >= 0, got {per_class}")
    fs, root = storage.filesystem(out_uri, storage_options)
    counts: dict[str, int] = {}
    for cls in CELL_CLASSES:
        class_idx = CLASS_TO_INDEX[cls.name]
        folder = storage.join(root, cls.name)
        if per_class:
            _ensure_dir(fs, folder)
        prefix = cls.file_prefixes[0]
        for i in range(per_class):
            rng = np.random.default_rng([seed, _STREAM_DATASET, class_idx, i])
            image = render_cell(cls.name, rng, size)
            _write_bytes(fs, storage.join(folder, f"{prefix}_{i:06d}.jpg"), _jpeg_bytes(image))
        counts[cls.name] = per_class
    return counts


# --------------------------------------------------------------------------
# Samples (slides) with a known differential.
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class SampleSpec:
    """Composition of one synthetic sample (slide).

    Attributes:
        sample_id: identifier, used as the sample's folder / tar member prefix.
        counts: number of cells per class name; a class that is absent counts 0.
        profile: how the composition was chosen (``"normal"``, ``"neutrophilia"``,
            ...); ``"custom"`` for hand-made specs. Informational only.
    """

    sample_id: str
    counts: dict[str, int]
    profile: str = "custom"


# White-cell fractions per profile. Normal sits comfortably inside the adult
# reference ranges so that jitter cannot push it out; each abnormal profile
# moves one class well past its range.
_NORMAL_WBC = {"neutrophil": 0.55, "lymphocyte": 0.33, "monocyte": 0.06, "eosinophil": 0.03, "basophil": 0.0075}
_ABNORMAL_PROFILES: tuple[tuple[str, dict[str, float], str], ...] = (
    # (profile name, WBC fractions, class that defines the abnormality)
    ("neutrophilia", {"neutrophil": 0.80, "lymphocyte": 0.13, "monocyte": 0.05, "eosinophil": 0.015,
                      "basophil": 0.005}, "neutrophil"),
    ("lymphocytosis", {"neutrophil": 0.28, "lymphocyte": 0.61, "monocyte": 0.07, "eosinophil": 0.03,
                       "basophil": 0.01}, "lymphocyte"),
    ("eosinophilia", {"neutrophil": 0.50, "lymphocyte": 0.28, "monocyte": 0.06, "eosinophil": 0.12,
                      "basophil": 0.01}, "eosinophil"),
    ("erythroblasts", dict(_NORMAL_WBC), "erythroblast"),
    ("immature_granulocytes", {"neutrophil": 0.53, "lymphocyte": 0.30, "monocyte": 0.06, "eosinophil": 0.03,
                               "basophil": 0.01, "ig": 0.05}, "ig"),
    ("monocytosis", {"neutrophil": 0.50, "lymphocyte": 0.26, "monocyte": 0.20, "eosinophil": 0.03,
                     "basophil": 0.01}, "monocyte"),
)
_PLATELET_FRACTION = 0.05  # of all cells in a sample
_ERYTHROBLAST_FRACTION = 0.10  # of all cells, erythroblast profile only


def _apportion(total: int, fractions: Mapping[str, float]) -> dict[str, int]:
    """Integer counts summing exactly to ``total`` (largest-remainder method)."""
    norm = sum(fractions.values())
    raw = {name: total * f / norm for name, f in fractions.items()}
    counts = {name: int(math.floor(v)) for name, v in raw.items()}
    left = total - sum(counts.values())
    # Ties broken by class index so the result never depends on dict order.
    order = sorted(raw, key=lambda n: (-(raw[n] - counts[n]), CLASS_TO_INDEX[n]))
    for name in order[:left]:
        counts[name] += 1
    return counts


def _fit_reference_ranges(counts: dict[str, int], n_wbc: int) -> None:
    """Nudge a normal differential into every adult reference range it can reach.

    Rounding alone can push a narrow range out (basophils 0.5-1 %: 2 of 190
    white cells is 1.05 %); the difference is taken from or given to the
    neutrophils, whose range is wide. Ranges no integer count can meet (any
    basophil count with fewer than 100 white cells) are left alone.
    """
    for name, rr in reference_ranges().items():
        if name == "neutrophil":
            continue
        lo = math.ceil(rr.low * n_wbc / 100.0 - 1e-9)
        hi = math.floor(rr.high * n_wbc / 100.0 + 1e-9)
        if lo > hi:
            continue
        delta = min(max(counts[name], lo), hi) - counts[name]
        counts[name] += delta
        counts["neutrophil"] -= delta


def _sample_counts(profile: Mapping[str, float], defining: str | None, total: int,
                   rng: np.random.Generator) -> dict[str, int]:
    n_plt = int(round(_PLATELET_FRACTION * total)) if total >= 10 else 0
    n_erb = max(1, int(round(_ERYTHROBLAST_FRACTION * total))) if defining == "erythroblast" and total >= 2 else 0
    n_wbc = total - n_plt - n_erb
    # +-5 % relative jitter keeps samples of one profile from being identical
    # while staying far from the reference-range limits.
    jittered = {name: f * float(rng.uniform(0.95, 1.05)) for name, f in sorted(profile.items())}
    counts = {name: 0 for name in CLASS_NAMES}
    counts.update(_apportion(n_wbc, jittered))
    counts["platelet"] += n_plt
    counts["erythroblast"] += n_erb
    if defining in (None, "erythroblast"):
        # Only the defining finding should be abnormal in these samples.
        _fit_reference_ranges(counts, n_wbc)
    # A rare defining class (ig at 5 %) must still show up in a small sample.
    if defining in profile and counts[defining] == 0 and n_wbc >= 2:
        donor = max(profile, key=lambda n: counts[n])
        counts[donor] -= 1
        counts[defining] += 1
    return counts


def default_samples(n_samples: int = 6, cells_per_sample: int = 60, *, seed: int = 0) -> list[SampleSpec]:
    """A deterministic mix of normal and abnormal samples.

    Even positions are normal (neutrophils ~55 %, lymphocytes ~33 %, monocytes
    ~6 %, eosinophils ~3 %, basophils ~1 % of white cells, a few platelets, no
    erythroblasts or immature granulocytes); odd positions cycle through
    neutrophilia, lymphocytosis, eosinophilia, circulating erythroblasts,
    immature granulocytes and monocytosis. So with ``n_samples >= 2`` there is
    always at least one of each kind. The profile name is kept in
    :attr:`SampleSpec.profile`.

    Normal samples (and the white cells of the erythroblast profile) fall
    inside every adult reference range only from about 105 cells per sample:
    with fewer than 100 white cells a single basophil is already above 1 %.

    Args:
        n_samples: number of samples, ids ``S0001``, ``S0002``, ...
        cells_per_sample: images per sample (white cells plus platelets and,
            for the erythroblast profile, erythroblasts).
        seed: changes the small jitter of the fractions.

    Returns:
        One :class:`SampleSpec` per sample, counts for every class (0 when absent).
    """
    if n_samples < 0 or cells_per_sample < 0:
        raise ValueError("n_samples and cells_per_sample must be >= 0")
    specs = []
    for i in range(n_samples):
        rng = np.random.default_rng([seed, _STREAM_SAMPLES, i])
        if i % 2 == 0:
            name, fractions, defining = "normal", _NORMAL_WBC, None
        else:
            name, fractions, defining = _ABNORMAL_PROFILES[(i // 2) % len(_ABNORMAL_PROFILES)]
        counts = _sample_counts(fractions, defining, int(cells_per_sample), rng)
        specs.append(SampleSpec(sample_id=f"S{i + 1:04d}", counts=counts, profile=name))
    return specs


def expected_counts(samples: Iterable[SampleSpec]) -> dict[str, dict[str, int]]:
    """Map sample id -> count for every class name (absent classes as 0)."""
    return {s.sample_id: {name: int(s.counts.get(name, 0)) for name in CLASS_NAMES} for s in samples}


def _validate_samples(samples: list[SampleSpec]) -> None:
    seen: set[str] = set()
    for spec in samples:
        sid = spec.sample_id
        if not sid or "/" in sid or sid in (".", "..") or "#" in sid:
            raise ValueError(f"invalid sample id {sid!r}: must be a non-empty name without '/' or '#'")
        if sid in seen:
            raise ValueError(f"duplicate sample id {sid!r}")
        seen.add(sid)
        for name, n in spec.counts.items():
            if name not in CLASS_TO_INDEX:
                raise ValueError(f"sample {sid}: unknown cell class {name!r}; expected one of {', '.join(CLASS_NAMES)}")
            if int(n) < 0:
                raise ValueError(f"sample {sid}: negative count {n} for {name}")


def _sample_key(sample_id: str) -> int:
    # Stable across processes (unlike hash()), so a sample's images depend only
    # on its id and the seed, not on its position in the list.
    return int.from_bytes(hashlib.sha256(sample_id.encode("utf-8")).digest()[:8], "little")


def _sample_images(spec: SampleSpec, seed: int) -> list[tuple[str, str, int]]:
    """(image_name, class_name, index within class) in shuffled order."""
    key = _sample_key(spec.sample_id)
    cells = [(name, i) for name in CLASS_NAMES for i in range(int(spec.counts.get(name, 0)))]
    order = np.random.default_rng([seed, _STREAM_SHUFFLE, key]).permutation(len(cells))
    # Names carry the shuffled position only, so the class cannot be read from them.
    return [(f"cell_{pos:06d}.jpg", cells[j][0], cells[j][1]) for pos, j in enumerate(order.tolist())]


def _render_sample_image(spec: SampleSpec, class_name: str, index: int, seed: int, size: int) -> bytes:
    rng = np.random.default_rng([seed, _STREAM_ARCHIVE, _sample_key(spec.sample_id),
                                 CLASS_TO_INDEX[class_name], index])
    return _jpeg_bytes(render_cell(class_name, rng, size))


def _tar_shard(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            # Fixed metadata keeps shards byte-identical between runs.
            info.mtime = 0
            info.mode = 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def write_archive(out_uri: str, samples: list[SampleSpec], *, layout: str = "folders", size: int = 128,
                  seed: int = 0, images_per_shard: int = 100,
                  storage_options: dict | None = None) -> list[dict]:
    """Write an unlabelled slide archive whose true composition is known.

    Layouts:
        ``"folders"``: ``<out_uri>/<sample_id>/cell_<6 digits>.jpg``;
        ``"tar"``: ``<out_uri>/shard-00000.tar``, ... (uncompressed), members
        ``<sample_id>/cell_<6 digits>.jpg``, at most ``images_per_shard`` each.
    Image names never reveal the class and each sample's images are in a
    deterministic shuffled order.

    Args:
        out_uri: local folder or ``s3://`` prefix.
        samples: compositions, e.g. from :func:`default_samples`.
        layout: one of :data:`ARCHIVE_LAYOUTS`.
        size: image side in pixels.
        seed: archive seed; images differ from :func:`write_labelled_dataset`
            images for the same seed.
        images_per_shard: tar layout only, at least 1.
        storage_options: fsspec options for object storage.

    Returns:
        One row per image, in write order: ``sample_id``, ``image_name``,
        ``true_class`` and ``uri`` (file URI, or ``<shard uri>#<member path>``).

    Raises:
        ValueError: for an unknown layout, bad shard size or invalid samples.
    """
    if layout not in ARCHIVE_LAYOUTS:
        raise ValueError(f"unknown archive layout {layout!r}; expected one of {', '.join(ARCHIVE_LAYOUTS)}")
    if layout == "tar" and int(images_per_shard) < 1:
        raise ValueError(f"images_per_shard must be >= 1, got {images_per_shard}")
    samples = list(samples)
    _validate_samples(samples)
    fs, root = storage.filesystem(out_uri, storage_options)
    rows: list[dict] = []

    if layout == "folders":
        for spec in samples:
            images = _sample_images(spec, seed)
            if images:
                _ensure_dir(fs, storage.join(root, spec.sample_id))
            for image_name, class_name, index in images:
                data = _render_sample_image(spec, class_name, index, seed, size)
                _write_bytes(fs, storage.join(root, spec.sample_id, image_name), data)
                rows.append({"sample_id": spec.sample_id, "image_name": image_name, "true_class": class_name,
                             "uri": storage.join(out_uri, spec.sample_id, image_name)})
        return rows

    # tar: fill shards in sample order; a sample may span two shards, as real
    # sharded archives do.
    _ensure_dir(fs, root)
    pending: list[tuple[str, bytes, dict]] = []
    shard_no = 0

    def flush() -> None:
        nonlocal shard_no
        if not pending:
            return
        shard_name = f"shard-{shard_no:05d}.tar"
        _write_bytes(fs, storage.join(root, shard_name), _tar_shard([(m, d) for m, d, _ in pending]))
        shard_uri = storage.join(out_uri, shard_name)
        for member, _, row in pending:
            row["uri"] = f"{shard_uri}#{member}"
            rows.append(row)
        pending.clear()
        shard_no += 1

    for spec in samples:
        for image_name, class_name, index in _sample_images(spec, seed):
            member = posixpath.join(spec.sample_id, image_name)
            data = _render_sample_image(spec, class_name, index, seed, size)
            pending.append((member, data, {"sample_id": spec.sample_id, "image_name": image_name,
                                           "true_class": class_name}))
            if len(pending) >= int(images_per_shard):
                flush()
    flush()
    return rows
