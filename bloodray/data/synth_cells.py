"""Rendering of one synthetic blood-smear crop ("synthetic cell") per call.

:func:`render_cell` draws a cell-like RGB image with numpy and PIL only: a pale
smear background with a few faint red cells, and one central cell whose size,
colours, nucleus shape and granules follow the morphology cues of its class.
Classes are kept far apart so a small CNN learns them in about a minute of CPU
time, while jitter in position, rotation, size, colour, noise and blur keeps
them from being memorised pixel by pixel. All randomness comes from the
generator passed in, so the same generator state gives the same pixels.

Labelled datasets and slide archives built from these cells are written by
:mod:`bloodray.data.synth`.
"""

from __future__ import annotations

import math
from typing import Iterable

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from bloodray.classes import CLASS_NAMES, CLASS_TO_INDEX

__all__ = ["render_cell"]

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
