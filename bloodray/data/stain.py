"""Stain normalisation: Reinhard colour transfer in CIE L*a*b*, per image.

Another laboratory's smears differ from the training lab's mostly in colour: stain batch and staining time, lamp,
camera white balance. Reinhard normalisation moves each image's L*a*b* channel means and standard deviations onto
those of the training lab (the :class:`StainReference`), so the network sees every lab's cells in one colour space.
Measured on the chula_wbc cells with the old packaged model (trained without it): 0.6 % -> 27.8 % zero-shot
(docs/RESULTS.md, ``bench/stain_norm.py``).

It is part of the evaluation preset (:class:`bloodray.data.preset.EvalPreset`) and runs inside its ``normalize``,
on the batch the model is about to see, so training (after augmentation), evaluation and nightly inference all
apply the same transform. The reference is fitted once on training images and travels in the checkpoint's
metadata (``stain_norm``).

Two implementations of the one transform:

* :func:`reinhard` -- float L*a*b* in torch, on float tensors (any device). Training uses it after augmentation,
  the GPU path uses it on decoded GPU tensors, and it is the reference the fast path is tested against.
* :func:`reinhard_uint8` -- the CPU hot loop's version for uint8 images (evaluation, calibration and the
  nightly job on CPU): OpenCV's float L*a*b* conversions, one per image each way, with the per-image
  statistics and the match (one affine map) in between. Several times faster than the torch path on one
  core (``bench/stain_fast.py``); tolerance against :func:`reinhard`: :data:`UINT8_TOLERANCE`; accuracy on
  the PBC test split and on chula: BENCHMARKS.md (``bench/precision.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

#: The one method offered; ``none`` turns normalisation off.
METHODS = ("none", "reinhard")
#: Training images a run's reference is measured on (an even spread over the training split).
REFERENCE_IMAGES = 400
#: sRGB (D65) -> CIE XYZ.
_RGB_TO_XYZ = ((0.4124, 0.3576, 0.1805), (0.2126, 0.7152, 0.0722), (0.0193, 0.1192, 0.9505))
_WHITE = (0.95047, 1.0, 1.08883)
#: A flat image (one colour) has no spread to match; this floor keeps it from exploding into noise.
_MIN_STD = 1.0
#: How far :func:`reinhard_uint8` may be from :func:`reinhard` (in 0-255 levels of the output RGB), on cell images:
#: the mean absolute difference, and the share of pixel values off by more than ``max_levels``. OpenCV's sRGB
#: and white-point constants differ from ours in the 4th digit and it clips out-of-gamut colours its own way.
#: Measured: 0.26 levels mean on 128 chula cells; PBC: bench/stain_fast.py.
UINT8_TOLERANCE = {"mean_levels": 0.5, "max_levels": 8, "share_above_max": 0.001}


class StainReferenceError(ValueError):
    """A stain reference that cannot be used (bad numbers in a checkpoint or config)."""


@dataclass(frozen=True)
class StainReference:
    """Target L*a*b* statistics of the training lab: per-channel mean and standard deviation."""

    lab_mean: tuple[float, float, float]
    lab_std: tuple[float, float, float]
    #: how many training images the statistics were measured on (provenance only).
    images: int = 0
    method: str = "reinhard"

    def to_metadata(self) -> dict[str, Any]:
        """The JSON form kept in a checkpoint's ``stain_norm`` field."""
        return {"method": self.method, "lab_mean": [float(x) for x in self.lab_mean],
                "lab_std": [float(x) for x in self.lab_std], "images": int(self.images)}

    @classmethod
    def from_metadata(cls, data: dict[str, Any], where: str) -> "StainReference | None":
        """Parse a checkpoint's ``stain_norm`` (empty = none); errors name ``where``."""
        if not data:
            return None
        if data.get("method") != "reinhard":
            raise StainReferenceError(f"{where}: stain_norm.method must be 'reinhard' (got {data.get('method')!r})")
        try:
            mean = tuple(float(x) for x in data["lab_mean"])
            std = tuple(float(x) for x in data["lab_std"])
        except (KeyError, TypeError, ValueError) as exc:
            raise StainReferenceError(f"{where}: stain_norm needs lab_mean and lab_std, 3 numbers each ({exc})") from exc
        if len(mean) != 3 or len(std) != 3 or not all(np.isfinite(mean + std)) or min(std) <= 0:
            raise StainReferenceError(f"{where}: stain_norm.lab_mean/lab_std must be 3 finite numbers each, "
                                      f"standard deviations > 0 (got {mean}, {std})")
        return cls(mean, std, int(data.get("images", 0)))


def rgb_to_lab(rgb):
    """Float sRGB in [0, 1], NCHW tensor -> L*a*b* (L in 0..100), same shape."""
    import torch

    matrix = torch.tensor(_RGB_TO_XYZ, dtype=rgb.dtype, device=rgb.device)
    white = torch.tensor(_WHITE, dtype=rgb.dtype, device=rgb.device).view(1, 3, 1, 1)
    linear = torch.where(rgb > 0.04045, ((rgb + 0.055) / 1.055) ** 2.4, rgb / 12.92)
    xyz = torch.einsum("ij,njhw->nihw", matrix, linear) / white
    f = torch.where(xyz > 0.008856, xyz.clamp_min(1e-12) ** (1.0 / 3.0), 7.787 * xyz + 16.0 / 116.0)
    fx, fy, fz = f.unbind(1)
    return torch.stack([116.0 * fy - 16.0, 500.0 * (fx - fy), 200.0 * (fy - fz)], 1)


def lab_to_rgb(lab):
    """L*a*b* NCHW tensor -> float sRGB in [0, 1] (out-of-gamut colours clipped)."""
    import torch

    inverse = torch.linalg.inv(torch.tensor(_RGB_TO_XYZ, dtype=torch.float64)).to(lab.dtype).to(lab.device)
    white = torch.tensor(_WHITE, dtype=lab.dtype, device=lab.device).view(1, 3, 1, 1)
    fy = (lab[:, 0] + 16.0) / 116.0
    f = torch.stack([fy + lab[:, 1] / 500.0, fy, fy - lab[:, 2] / 200.0], 1)
    xyz = torch.where(f > 0.2069, f ** 3, (f - 16.0 / 116.0) / 7.787) * white
    linear = torch.einsum("ij,njhw->nihw", inverse, xyz).clamp(0.0, 1.0)
    return torch.where(linear > 0.0031308, 1.055 * linear.clamp_min(1e-12) ** (1 / 2.4) - 0.055, 12.92 * linear)


def reinhard(rgb, reference: StainReference):
    """Match each image's L*a*b* channel statistics to ``reference``; float NCHW in [0, 1] in and out."""
    import torch

    lab = rgb_to_lab(rgb.float())
    mean = lab.mean(dim=(2, 3), keepdim=True)
    std = lab.std(dim=(2, 3), keepdim=True, unbiased=False).clamp_min(_MIN_STD)
    target_mean = torch.tensor(reference.lab_mean, dtype=lab.dtype, device=lab.device).view(1, 3, 1, 1)
    target_std = torch.tensor(reference.lab_std, dtype=lab.dtype, device=lab.device).view(1, 3, 1, 1)
    return lab_to_rgb((lab - mean) / std * target_std + target_mean).to(rgb.dtype)


def reinhard_uint8(images: np.ndarray, reference: StainReference) -> np.ndarray:
    """:func:`reinhard` for a uint8 NHWC (or one HWC) RGB batch on CPU: float32 RGB in [0, 1] out, same shape.

    Within :data:`UINT8_TOLERANCE` of the float transform; needs OpenCV (``opencv-python-headless``).
    """
    import cv2

    images = np.ascontiguousarray(images, dtype=np.uint8)
    single = images.ndim == 3
    batch = images[None] if single else images
    out = np.empty(batch.shape, dtype=np.float32)
    target_mean = np.array(reference.lab_mean)
    target_std = np.array(reference.lab_std)
    scale = np.float32(1.0 / 255.0)
    for i, image in enumerate(batch):
        # Float L*a*b*, not OpenCV's 8-bit: its rounding (1 unit of a*, b*) is amplified by the match on
        # low-contrast images of other labs (chula: 1.1 levels mean error against 0.26 in float).
        lab = cv2.cvtColor(image.astype(np.float32) * scale, cv2.COLOR_RGB2Lab)
        mean, std = (v.ravel() for v in cv2.meanStdDev(lab))
        gain = target_std / np.maximum(std, _MIN_STD)
        # The match as one affine map over the three channels (one pass).
        matrix = np.zeros((3, 4))
        matrix[:, :3] = np.diag(gain)
        matrix[:, 3] = target_mean - gain * mean
        cv2.cvtColor(cv2.transform(lab, matrix.astype(np.float32)), cv2.COLOR_Lab2RGB, dst=out[i])
    return out[0] if single else out


def reference_sample(count: int) -> list[int]:
    """Indices of the (at most :data:`REFERENCE_IMAGES`) images of ``count`` a reference is fitted on, evenly spread."""
    return list(range(0, count, max(1, count // REFERENCE_IMAGES)))[:REFERENCE_IMAGES]


def fit_reference(images: np.ndarray, batch_size: int = 64) -> StainReference:
    """The average per-image L*a*b* mean and standard deviation of ``images`` (uint8 NHWC, the training lab's)."""
    import torch

    if len(images) == 0:
        raise StainReferenceError("a stain reference needs at least one training image")
    means, stds = [], []
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            batch = torch.as_tensor(np.ascontiguousarray(images[start:start + batch_size]))
            lab = rgb_to_lab(batch.permute(0, 3, 1, 2).float().div_(255.0))
            means.append(lab.mean(dim=(2, 3)))
            stds.append(lab.std(dim=(2, 3), unbiased=False))
    mean = torch.cat(means).mean(0).tolist()
    std = torch.cat(stds).mean(0).tolist()
    return StainReference(tuple(round(x, 4) for x in mean), tuple(round(x, 4) for x in std), len(images))
