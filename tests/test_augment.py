"""Unit tests of the batched training augmentation (bloodray.data.augment)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from bloodray.data.augment import (AugmentConfig, WarpAugmentConfig, _dihedral, _jitter_colors, augment_batch,
                                   augment_on_device, hue_matrices, zoom_crops)

OFF = AugmentConfig(flips=False, rotate90=False, color_jitter=0.0, hue_jitter=0.0, min_scale=1.0)


def _batch(n: int = 16, size: int = 24, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def _dihedral_images(img: np.ndarray) -> list[np.ndarray]:
    return [np.rot90(img, k)[:, ::-1] if flip else np.rot90(img, k) for k in range(4) for flip in (False, True)]


@pytest.mark.parametrize("cfg", [AugmentConfig(), OFF, AugmentConfig(min_scale=0.5, color_jitter=0.3, hue_jitter=0.1)])
def test_shape_dtype_and_input_untouched(cfg):
    images = _batch()
    before = images.copy()
    out = augment_batch(images, np.random.default_rng(1), cfg)
    assert out.shape == images.shape and out.dtype == np.uint8
    assert out is not images and not np.shares_memory(out, images)
    assert np.array_equal(images, before)


@pytest.mark.parametrize("n", [0, 1])
def test_tiny_batches(n):
    images = _batch(n)
    out = augment_batch(images, np.random.default_rng(0), AugmentConfig())
    assert out.shape == images.shape and out.dtype == np.uint8


def test_deterministic_given_the_rng():
    images = _batch(32)
    first = augment_batch(images, np.random.default_rng(7), AugmentConfig())
    again = augment_batch(images, np.random.default_rng(7), AugmentConfig())
    other = augment_batch(images, np.random.default_rng(8), AugmentConfig())
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other)


def test_identity_when_everything_is_off():
    images = _batch()
    out = augment_batch(images, np.random.default_rng(3), OFF)
    assert np.array_equal(out, images) and out is not images


def test_flips_only_mirror_left_right():
    images = _batch(64)
    cfg = AugmentConfig(flips=True, rotate90=False, color_jitter=0.0, hue_jitter=0.0, min_scale=1.0)
    out = augment_batch(images, np.random.default_rng(4), cfg)
    flipped = [np.array_equal(o, i[:, ::-1]) for o, i in zip(out, images)]
    kept = [np.array_equal(o, i) for o, i in zip(out, images)]
    assert all(f or k for f, k in zip(flipped, kept))
    assert 16 < sum(flipped) < 48  # about half


def test_rot90_only_rotates_by_quarter_turns():
    images = _batch(64)
    cfg = AugmentConfig(flips=False, rotate90=True, color_jitter=0.0, hue_jitter=0.0, min_scale=1.0)
    out = augment_batch(images, np.random.default_rng(5), cfg)
    turns = []
    for o, i in zip(out, images):
        matches = [k for k in range(4) if np.array_equal(o, np.rot90(i, k))]
        assert len(matches) == 1
        turns.append(matches[0])
    assert set(turns) == {0, 1, 2, 3}


def test_rotations_and_flips_together_give_the_eight_symmetries():
    images = _batch(96)
    cfg = AugmentConfig(flips=True, rotate90=True, color_jitter=0.0, hue_jitter=0.0, min_scale=1.0)
    out = augment_batch(images, np.random.default_rng(6), cfg)
    seen = set()
    for o, i in zip(out, images):
        matches = [g for g, d in enumerate(_dihedral_images(i)) if np.array_equal(o, d)]
        assert len(matches) == 1
        seen.add(matches[0])
    assert seen == set(range(8))


def test_dihedral_maps_pixels_like_numpy():
    # A marker pixel shows where each pixel goes: np.rot90 turns counter-clockwise, the flip mirrors left-right.
    img = np.zeros((1, 5, 5, 3), dtype=np.uint8)
    img[0, 0, 1] = (255, 0, 0)  # top row, second column
    expected = {(1, False): (3, 0), (2, False): (4, 3), (3, False): (1, 4), (0, True): (0, 3)}
    for (k, flip), (row, col) in expected.items():
        out = _dihedral(img, np.array([k]), np.array([flip]))[0]
        assert tuple(np.argwhere(out[..., 0] == 255)[0]) == (row, col)
    images = _batch(16, size=7)
    turns, flips = np.arange(16) % 4, (np.arange(16) // 4) % 2 == 1
    out = _dihedral(images, turns, flips)
    for o, i, k, f in zip(out, images, turns, flips):
        assert np.array_equal(o, np.rot90(i, k)[:, ::-1] if f else np.rot90(i, k))


def test_zoom_matches_pil_bilinear():
    images = _batch(4, size=40, seed=9)
    top, left, side = np.array([0, 3, 6, 1]), np.array([0, 5, 0, 7]), np.array([40, 34, 30, 33])
    out = zoom_crops(images, top, left, side)
    assert out.dtype == np.float32
    assert np.array_equal(out[0], images[0].astype(np.float32))  # the whole image: unchanged
    for o, img, t, l, s in zip(out, images, top, left, side):
        crop = Image.fromarray(img[t:t + s, l:l + s]).resize((40, 40), Image.BILINEAR)
        # PIL works in fixed point: its result may differ by one level.
        assert np.abs(np.rint(o) - np.asarray(crop, dtype=np.float32)).max() <= 1


def test_zoom_keeps_content_inside_the_crop():
    images = np.zeros((2, 20, 20, 3), dtype=np.uint8)
    images[:, 5:15, 5:15] = 200
    cfg = AugmentConfig(flips=False, rotate90=False, color_jitter=0.0, hue_jitter=0.0, min_scale=0.6)
    out = augment_batch(images, np.random.default_rng(0), cfg)
    # Zooming in makes the bright square larger, never smaller.
    assert ((out[..., 0] > 100).sum(axis=(1, 2)) >= 100).all()


def _rotate_hue(x: np.ndarray, angle: np.ndarray) -> np.ndarray:
    """Rotate the hue of every image of a float NHWC batch by its own angle (radians)."""
    m = hue_matrices(torch.from_numpy(np.asarray(angle, dtype=np.float32))).numpy()
    n = x.shape[0]
    return np.matmul(x.reshape(n, -1, 3), m.transpose(0, 2, 1)).reshape(x.shape)


def _jitter_reference(images: np.ndarray, rng: np.random.Generator, cfg: AugmentConfig) -> np.ndarray:
    """The jitter as a chain of steps (brightness, saturation, contrast, hue), one after the other."""
    n = images.shape[0]
    x = images.astype(np.float64) / 255.0
    j = cfg.color_jitter
    brightness, contrast, saturation = (rng.uniform(1 - j, 1 + j, size=(n, 1, 1, 1)) for _ in range(3))
    x = x * brightness
    grey = x.mean(axis=3, keepdims=True)
    x = grey + (x - grey) * saturation
    mean = x.mean(axis=(1, 2, 3), keepdims=True)
    x = mean + (x - mean) * contrast
    angle = rng.uniform(-cfg.hue_jitter, cfg.hue_jitter, size=n) * 2 * np.pi
    x = _rotate_hue(x.astype(np.float32), angle.astype(np.float32))
    return (np.clip(x, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def test_colour_jitter_equals_the_step_by_step_chain():
    images = _batch(16, seed=2)
    cfg = AugmentConfig(color_jitter=0.3, hue_jitter=0.05)
    folded = _jitter_colors(images, np.random.default_rng(11), cfg)
    chain = _jitter_reference(images, np.random.default_rng(11), cfg)
    assert np.abs(folded.astype(int) - chain).max() <= 1


def test_rotate_hue_is_batched_per_image():
    x = np.random.default_rng(0).random((3, 4, 4, 3), dtype=np.float32)
    angles = np.array([0.0, 2 * np.pi / 3, -2 * np.pi / 3], dtype=np.float32)
    out = _rotate_hue(x, angles)
    assert np.allclose(out[0], x[0], atol=1e-6)
    # A third of a turn about the grey axis moves R to G, G to B and B to R.
    assert np.allclose(out[1], x[1][..., [2, 0, 1]], atol=1e-5)
    assert np.allclose(out[2], x[2][..., [1, 2, 0]], atol=1e-5)


def test_grey_images_stay_grey_under_hue_rotation():
    images = np.full((4, 8, 8, 3), 120, dtype=np.uint8)
    cfg = AugmentConfig(flips=False, rotate90=False, color_jitter=0.0, hue_jitter=0.5, min_scale=1.0)
    out = augment_batch(images, np.random.default_rng(0), cfg)
    assert np.array_equal(out, images)


def test_rotate90_refuses_non_square_images():
    images = np.zeros((2, 8, 10, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="square"):
        augment_batch(images, np.random.default_rng(0), AugmentConfig())
    flips_only = AugmentConfig(flips=True, rotate90=False, color_jitter=0.0, hue_jitter=0.0, min_scale=1.0)
    assert augment_batch(images, np.random.default_rng(0), flips_only).shape == images.shape


def test_train_collate_fn_returns_tensors_and_is_seeded():
    import torch

    from bloodray.train.ray_loop import train_collate_fn

    batch = {"image": _batch(8), "label": np.arange(8, dtype=np.int32)}
    first = train_collate_fn(AugmentConfig(), (0, 1, 2))(batch)
    again = train_collate_fn(AugmentConfig(), (0, 1, 2))(batch)
    assert first["image"].dtype == torch.uint8 and first["image"].shape == (8, 24, 24, 3)
    assert first["label"].dtype == torch.int64 and first["label"].tolist() == list(range(8))
    assert torch.equal(first["image"], again["image"])
    plain = train_collate_fn(None, (0, 1, 2))(batch)
    assert np.array_equal(plain["image"].numpy(), batch["image"])
    # For precise BN the first batches are also kept un-augmented.
    keeping = train_collate_fn(AugmentConfig(), (0, 1, 2), keep_clean=1)
    keeping(batch), keeping(batch)
    assert len(keeping.clean) == 1 and np.array_equal(keeping.clean[0].numpy(), batch["image"])


def test_device_augmentation_is_batched_bounded_and_seeded():
    images = torch.randint(0, 256, (6, 32, 32, 3), dtype=torch.uint8)
    cfg = WarpAugmentConfig()
    a = augment_on_device(images, cfg, torch.Generator().manual_seed(0))
    b = augment_on_device(images, cfg, torch.Generator().manual_seed(0))
    assert a.shape == (6, 3, 32, 32) and a.dtype == torch.float32
    assert torch.equal(a, b) and 0.0 <= float(a.min()) and float(a.max()) <= 1.0
    off = WarpAugmentConfig(rotate=False, flips=False, min_scale=1.0, max_scale=1.0, translate=0.0,
                            color_jitter=0.0, hue_jitter=0.0)
    same = augment_on_device(images, off, torch.Generator().manual_seed(0))
    assert torch.allclose(same, images.permute(0, 3, 1, 2).float() / 255.0, atol=1e-5)


def test_numpy_and_torch_paths_share_the_colour_jitter():
    # No geometry: the device path's colour jitter must equal the step-by-step chain with the draws it made.
    images = _batch(8, seed=4)
    cfg = WarpAugmentConfig(rotate=False, flips=False, min_scale=1.0, max_scale=1.0, translate=0.0,
                            color_jitter=0.3, hue_jitter=0.05)
    out = augment_on_device(torch.from_numpy(images), cfg, torch.Generator().manual_seed(5))
    gen = torch.Generator().manual_seed(5)
    n = len(images)
    # augment_on_device draws, in order: angle (off: none), scale, mirror (off: none), shift, then the jitter.
    torch.rand(n, generator=gen), torch.rand(n, 2, generator=gen)
    b, s, c = (torch.rand(n, generator=gen) * 0.6 + 0.7 for _ in range(3))
    hue = (torch.rand(n, generator=gen) * 0.1 - 0.05) * 2 * np.pi
    x = images.astype(np.float64) / 255.0 * b.numpy()[:, None, None, None]
    grey = x.mean(axis=3, keepdims=True)
    x = grey + (x - grey) * s.numpy()[:, None, None, None]
    mean = x.mean(axis=(1, 2, 3), keepdims=True)
    x = mean + (x - mean) * c.numpy()[:, None, None, None]
    chain = np.clip(_rotate_hue(x.astype(np.float32), hue.numpy()), 0.0, 1.0)
    assert np.abs(out.permute(0, 2, 3, 1).numpy() - chain).max() < 1e-4
