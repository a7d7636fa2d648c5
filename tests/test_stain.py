"""Reinhard stain normalisation (issue 12): the transform, its reference in the checkpoint, and the one preset
that training, evaluation and the nightly job share."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from bloodray.checkpoint import (METADATA_FILE, CheckpointError, CheckpointMetadata, load_checkpoint, read_metadata,
                                 write_checkpoint)
from bloodray.classes import CLASS_NAMES
from bloodray.data.preset import EvalPreset
from bloodray.data.stain import (UINT8_TOLERANCE, StainReference, StainReferenceError, fit_reference, lab_to_rgb, reinhard,
                                  rgb_to_lab)
from bloodray.models import create_model
from bloodray.predict import CellPredictor

SIZE = 32
TINY = {"filters": [4, 4, 8, 8, 8, 8, 8], "hidden": 8, "dropout": 0.0}


def _cells(seed: int, n: int = 6, tint=(0, 0, 0)) -> np.ndarray:
    """uint8 NHWC images with smooth structure (a bright background and a darker disc) and a colour cast."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    images = []
    for _ in range(n):
        disc = ((yy - SIZE / 2) ** 2 + (xx - SIZE / 2) ** 2) < rng.uniform(40, 90)
        base = np.where(disc[..., None], rng.uniform(60, 120, 3), rng.uniform(180, 230, 3))
        images.append(np.clip(base + np.array(tint) + rng.normal(0, 6, base.shape), 0, 255))
    return np.stack(images).astype(np.uint8)


def _float(images: np.ndarray) -> torch.Tensor:
    return torch.as_tensor(images).permute(0, 3, 1, 2).float() / 255.0


def test_lab_round_trip_is_lossless_to_a_grey_level():
    images = _float(_cells(0))
    assert torch.allclose(lab_to_rgb(rgb_to_lab(images)), images, atol=1 / 255)
    # White is L* = 100, a* = b* = 0.
    white = rgb_to_lab(torch.ones(1, 3, 2, 2))
    assert torch.allclose(white[:, 0], torch.full((1, 2, 2), 100.0), atol=0.05)
    assert white[:, 1:].abs().max() < 0.05


def test_reinhard_moves_each_image_onto_the_reference_statistics():
    reference = fit_reference(_cells(1))
    # Another lab: darker, with a blue cast.
    other = _cells(2, tint=(-60, -50, 10))
    normalised = reinhard(_float(other), reference)
    lab = rgb_to_lab(normalised)
    assert normalised.min() >= 0 and normalised.max() <= 1
    means = lab.mean(dim=(2, 3))
    # Close to the target: only clipping at the gamut's edge keeps it from being exact.
    assert torch.allclose(means, torch.tensor(reference.lab_mean).expand_as(means), atol=3.0)
    before = rgb_to_lab(_float(other)).mean(dim=(2, 3))
    assert (means - torch.tensor(reference.lab_mean)).abs().sum() < (before - torch.tensor(reference.lab_mean)).abs().sum() / 4


def test_a_flat_image_stays_finite():
    reference = fit_reference(_cells(1))
    flat = torch.full((2, 3, SIZE, SIZE), 0.7)
    out = reinhard(flat, reference)
    assert torch.isfinite(out).all() and out.min() >= 0 and out.max() <= 1


def test_fit_reference_is_deterministic_and_refuses_nothing_to_fit():
    images = _cells(3)
    assert fit_reference(images) == fit_reference(images.copy())
    assert fit_reference(images).images == len(images)
    with pytest.raises(StainReferenceError, match="at least one"):
        fit_reference(images[:0])


def test_reference_metadata_round_trip_and_bad_values_name_where():
    reference = fit_reference(_cells(4))
    assert StainReference.from_metadata(json.loads(json.dumps(reference.to_metadata())), "x") == reference
    assert StainReference.from_metadata({}, "x") is None
    with pytest.raises(StainReferenceError, match="somewhere: stain_norm.method"):
        StainReference.from_metadata({"method": "macenko"}, "somewhere")
    with pytest.raises(StainReferenceError, match="somewhere: stain_norm"):
        StainReference.from_metadata({"method": "reinhard", "lab_mean": [1, 2, 3], "lab_std": [1, 0, 1]}, "somewhere")


def test_preset_applies_the_reference_before_mean_and_std():
    reference = fit_reference(_cells(5))
    images = _cells(6, tint=(-40, -40, 0))
    plain = EvalPreset(SIZE, (0.5,) * 3, (0.25,) * 3)
    stained = dataclasses.replace(plain, stain=reference)
    expected = (reinhard(_float(images), reference) - 0.5) / 0.25
    assert torch.allclose(stained.normalize(torch.as_tensor(images)), expected, atol=1e-5)
    assert torch.allclose(plain.normalize(images), (_float(images) - 0.5) / 0.25, atol=1e-6)
    # The packed trainer's float path is the same transform.
    assert torch.allclose(stained.standardize(_float(images)), stained.normalize(torch.as_tensor(images)), atol=1e-6)
    # numpy batches (evaluation, the nightly job on CPU) take the fast uint8 path, within its documented tolerance.
    levels = (stained.normalize(images) - expected).abs() * 0.25 * 255
    assert levels.mean() <= UINT8_TOLERANCE["mean_levels"]
    assert (levels > UINT8_TOLERANCE["max_levels"]).float().mean() <= UINT8_TOLERANCE["share_above_max"]


def _checkpoint(directory, stain_norm):
    torch.manual_seed(0)
    model = create_model("bloodnet", len(CLASS_NAMES), input_size=SIZE, **TINY)
    meta = CheckpointMetadata(model_name="bloodnet", classes=list(CLASS_NAMES), input_size=SIZE, mean=[0.5] * 3,
                              std=[0.5] * 3, model_kwargs=dict(TINY, input_size=SIZE), stain_norm=stain_norm)
    write_checkpoint(directory, model, meta)
    return model


def test_checkpoint_carries_the_reference_into_inference(tmp_path):
    reference = fit_reference(_cells(7))
    model = _checkpoint(tmp_path / "stained", reference.to_metadata())
    loaded = load_checkpoint(str(tmp_path / "stained"))
    assert loaded.metadata.preset().stain == reference
    predictor = CellPredictor(str(tmp_path / "stained"), device="cpu")
    assert predictor.preset.stain == reference
    images = _cells(8, tint=(-50, -30, 20))
    out = predictor({"image": images, "error": np.array([""] * len(images), dtype=object)})
    with torch.inference_mode():
        expected = torch.softmax(model.eval()(loaded.metadata.preset().normalize(images)), 1).numpy()
    np.testing.assert_allclose(out["probs"], expected, atol=1e-4)

    # A checkpoint without it keeps its old id: stain_norm is left out of bloodray.json when empty.
    _checkpoint(tmp_path / "plain", {})
    assert "stain_norm" not in json.loads((tmp_path / "plain" / METADATA_FILE).read_text())
    assert read_metadata(str(tmp_path / "plain")).preset().stain is None


def test_a_bad_reference_in_a_checkpoint_is_refused_with_its_path(tmp_path):
    with pytest.raises(CheckpointError, match=f"bad.*{METADATA_FILE}.*stain_norm"):
        _checkpoint(tmp_path / "bad", {"method": "reinhard", "lab_mean": [50, 0, 0], "lab_std": [10, -1, 5]})
