"""The packaged default model: loads safely, has the registry's classes, classifies images."""

from __future__ import annotations

import numpy as np

from bloodray.checkpoint import PACKAGED_CHECKPOINT, load_checkpoint, resolve_checkpoint
from bloodray.classes import CLASS_NAMES
from bloodray.predict import CellPredictor
from bloodray.data.synth import render_cell


def test_default_checkpoint_is_packaged_and_small():
    assert resolve_checkpoint(None) == str(PACKAGED_CHECKPOINT)
    size = sum(p.stat().st_size for p in PACKAGED_CHECKPOINT.iterdir())
    assert size <= 25 * 1024 * 1024
    assert not (PACKAGED_CHECKPOINT / "train_state.pt").exists()


def test_default_checkpoint_loads_with_classes_in_registry_order():
    loaded = load_checkpoint(None)
    meta = loaded.metadata
    assert meta.classes == list(CLASS_NAMES)
    assert 0.01 < meta.temperature < 100 and 0.0 < (meta.review_threshold or 0.5) < 1.0
    assert meta.calibration.get("test", {}).get("ece_after") is not None


def test_default_checkpoint_classifies_synthetic_images():
    predictor = CellPredictor(None)
    size = predictor.meta.input_size
    images = np.stack([np.asarray(render_cell(name, np.random.default_rng([5, i]), 128).resize((size, size)))
                       for i, name in enumerate(CLASS_NAMES)])
    out = predictor({"image": images, "sample_id": np.array(["s"] * len(images), dtype=object)})
    assert out["probs"].shape == (len(CLASS_NAMES), len(CLASS_NAMES))
    assert np.allclose(out["probs"].sum(axis=1), 1.0, atol=1e-4)
    assert set(out["predicted_class"]) <= set(CLASS_NAMES)
    assert np.all((out["confidence"] > 0) & (out["confidence"] <= 1))
