"""The fast (uint8, OpenCV) Reinhard stain normalisation against the float reference of bloodray.data.stain."""

from __future__ import annotations

import numpy as np
import torch

from bloodray.classes import CLASS_NAMES
from bloodray.data.preset import EvalPreset
from bloodray.data.stain import UINT8_TOLERANCE, StainReference, reinhard, reinhard_uint8
from bloodray.data.synth import render_cell

#: The packaged model's reference (PBC), and a far-off one that moves every channel a lot.
REFERENCES = (StainReference((79.63, 10.87, 7.21), (15.35, 8.70, 13.84)),
              StainReference((60.0, 25.0, -10.0), (20.0, 12.0, 9.0)))


def _cells(n: int = 16, size: int = 96) -> np.ndarray:
    rng = np.random.default_rng(3)
    images = [np.asarray(render_cell(CLASS_NAMES[i % len(CLASS_NAMES)], np.random.default_rng([7, i]), size))
              for i in range(n)]
    # Another lab's colours: a per-image tint and contrast change, so the match has work to do.
    tinted = [np.clip(im * rng.uniform(0.7, 1.1, 3) + rng.uniform(-20, 20, 3), 0, 255) for im in images]
    return np.stack(tinted).astype(np.uint8)


def _reference(images: np.ndarray, ref: StainReference) -> np.ndarray:
    out = reinhard(torch.as_tensor(images).permute(0, 3, 1, 2).float() / 255.0, ref)
    return out.permute(0, 2, 3, 1).numpy() * 255.0


def test_fast_reinhard_matches_the_float_reference_within_the_documented_tolerance():
    images = _cells()
    for ref in REFERENCES:
        fast = reinhard_uint8(images, ref) * 255.0
        assert fast.dtype == np.float32 and fast.shape == images.shape
        diff = np.abs(fast - _reference(images, ref))
        assert diff.mean() <= UINT8_TOLERANCE["mean_levels"], diff.mean()
        assert (diff > UINT8_TOLERANCE["max_levels"]).mean() <= UINT8_TOLERANCE["share_above_max"]
        # It really normalised: far from the input when the reference is far from it.
        assert np.abs(fast - images).mean() > 5 * diff.mean()


def test_fast_reinhard_single_image_and_flat_image():
    images = _cells(2)
    ref = REFERENCES[0]
    assert np.array_equal(reinhard_uint8(images[0], ref), reinhard_uint8(images, ref)[0])
    # A flat image has no spread: the standard-deviation floor keeps it from blowing up (same as the reference).
    flat = np.full((1, 32, 32, 3), 128, np.uint8)
    diff = np.abs(reinhard_uint8(flat, ref) * 255.0 - _reference(flat, ref))
    assert diff.max() <= UINT8_TOLERANCE["max_levels"]


def test_preset_uses_the_fast_path_for_numpy_batches_and_the_reference_for_tensors():
    images = _cells(8, 64)
    preset = EvalPreset(64, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), stain=REFERENCES[0])
    fast = preset.normalize(images)
    slow = preset.normalize(torch.as_tensor(images))
    assert fast.shape == slow.shape == (8, 3, 64, 64)
    # mean/std 0.5: one output level of 255 is 2/255 in model input units.
    diff = (fast - slow).abs() * 255 / 2
    assert diff.mean() <= UINT8_TOLERANCE["mean_levels"]
    assert (diff > UINT8_TOLERANCE["max_levels"]).float().mean() <= UINT8_TOLERANCE["share_above_max"]
    # Without a stain reference both are the plain preset, bit for bit.
    plain = EvalPreset(64, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    assert torch.equal(plain.normalize(images), plain.normalize(torch.as_tensor(images)))
