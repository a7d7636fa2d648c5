"""The robustness augmentations of issue 12 (bloodray.data.augment.robust_batch and its train.augment.* keys)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from bloodray.config import ConfigError
from bloodray.data.augment import (AugmentConfig, augment_batch, border_colour, jpeg_roundtrip, robust_batch,
                                   stain_jitter, zoom_out)
from bloodray.train.config import load_train_config

OFF = AugmentConfig(flips=False, rotate90=False, color_jitter=0.0, hue_jitter=0.0, min_scale=1.0)
ALL = dataclasses.replace(OFF, zoom_out=2.0, zoom_out_prob=0.5, stain_jitter=0.1, gamma=0.3, blur_prob=0.5,
                          noise_std=8.0, jpeg_prob=0.5, jpeg_quality_min=20)
EACH = {"zoom_out": dict(zoom_out=2.0, zoom_out_prob=1.0), "stain_jitter": dict(stain_jitter=0.2),
        "gamma": dict(gamma=0.4), "blur": dict(blur_prob=1.0, blur_sigma=2.0), "noise": dict(noise_std=10.0),
        "jpeg": dict(jpeg_prob=1.0, jpeg_quality_min=10)}


def _cells(n: int = 8, size: int = 48, seed: int = 0) -> np.ndarray:
    """Dark purple discs of random radius on a light background, with a little texture."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    out = np.empty((n, size, size, 3), np.uint8)
    for i in range(n):
        radius = rng.uniform(0.15, 0.3) * size
        disc = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 < radius ** 2
        img = np.where(disc[..., None], [90, 40, 140], [235, 215, 220]).astype(np.float64)
        out[i] = np.clip(img + rng.normal(0, 6, img.shape), 0, 255).astype(np.uint8)
    return out


@pytest.mark.parametrize("cfg", [ALL, *(dataclasses.replace(OFF, **kw) for kw in EACH.values())],
                         ids=["all", *EACH])
def test_deterministic_given_a_seed_and_shape_dtype_kept(cfg):
    images = _cells()
    before = images.copy()
    first = augment_batch(images, np.random.default_rng(5), cfg)
    again = augment_batch(images, np.random.default_rng(5), cfg)
    other = augment_batch(images, np.random.default_rng(6), cfg)
    assert first.shape == images.shape and first.dtype == np.uint8
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other)
    assert not np.array_equal(first, images)  # each one really changes the images
    assert np.array_equal(images, before)  # the input is left alone


def test_off_by_default_so_earlier_runs_are_unchanged():
    assert not AugmentConfig().robust
    images = _cells()
    plain = dataclasses.replace(AugmentConfig(), zoom_out=1.0)
    assert np.array_equal(augment_batch(images, np.random.default_rng(1), AugmentConfig()),
                          augment_batch(images, np.random.default_rng(1), plain))
    assert np.array_equal(robust_batch(images, np.random.default_rng(1), OFF), images)


def test_stain_jitter_is_the_identity_without_jitter_and_stays_in_range():
    x = _cells().astype(np.float32) / 255.0
    n = len(x)
    same = stain_jitter(x, np.ones((n, 3)), np.zeros((n, 3)))
    assert np.abs(same - x).max() < 1e-5
    wild = stain_jitter(x, np.full((n, 3), 1.9), np.full((n, 3), 0.5))
    assert wild.min() >= 0.0 and wild.max() <= 1.0
    # More haematoxylin darkens the cell (the disc), where the stain is.
    darker = stain_jitter(x, np.tile([1.5, 1.0, 1.0], (n, 1)), np.zeros((n, 3)))
    assert darker[:, 24, 24].mean() < x[:, 24, 24].mean()


def test_zoom_out_really_shrinks_the_cell_onto_the_background():
    image = _cells(1)[0]
    dark = (image.mean(axis=2) < 150).sum()
    small = zoom_out(image, 2.0)
    assert small.shape == image.shape and small.dtype == np.uint8
    # Half the side: about a quarter of the area.
    assert 0.15 < (small.mean(axis=2) < 150).sum() / dark < 0.35
    # The padding is the border's colour, so no black frame teaches the model a shortcut.
    assert np.abs(small[0, 0].astype(int) - border_colour(image)).max() <= 1
    assert np.array_equal(zoom_out(image, 1.0), image)


def test_blur_smooths_and_jpeg_roundtrips():
    images = _cells(4)
    blurred = robust_batch(images, np.random.default_rng(0), dataclasses.replace(OFF, blur_prob=1.0, blur_sigma=2.0))
    assert np.abs(np.diff(blurred.astype(int), axis=2)).mean() < np.abs(np.diff(images.astype(int), axis=2)).mean()
    low = jpeg_roundtrip(images[0], 10)
    assert low.shape == images[0].shape and low.dtype == np.uint8 and not np.array_equal(low, images[0])


def test_config_keys_reach_the_augmentation_and_bad_values_name_the_key():
    cfg = load_train_config("configs/train/bloodnet.yaml", ["data.root=/tmp/x", "train.augment.stain_jitter=0.05",
                                                            "train.augment.zoom_out=1.5", "train.augment.jpeg_prob=0.3"])
    aug = cfg.train.augment.to_augment()
    assert aug.stain_jitter == 0.05 and aug.zoom_out == 1.5 and aug.jpeg_prob == 0.3 and aug.robust
    for key, value in [("zoom_out", 0.5), ("blur_prob", 2), ("jpeg_quality_min", 0), ("stain_jitter", 1.5)]:
        with pytest.raises(ConfigError, match=f"train.augment.{key}"):
            load_train_config("configs/train/bloodnet.yaml", ["data.root=/tmp/x", f"train.augment.{key}={value}"])
