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


def test_packaged_models_by_short_name():
    import pytest

    from bloodray import packaged
    from bloodray.checkpoint import CheckpointError

    names = [m.name for m in packaged.models()]
    assert {"pbc-only", "robust-v1", "robust-v2"} <= set(names) and packaged.models()[0].default
    for alias in (None, "", "default", "packaged:default", f"packaged:{names[0]}"):
        assert resolve_checkpoint(alias) == str(PACKAGED_CHECKPOINT)
    pbc_only = load_checkpoint("packaged:pbc-only")
    assert pbc_only.uri == str(packaged.ASSETS / "packaged" / "pbc-only") and not pbc_only.metadata.stain_norm
    with pytest.raises(CheckpointError, match=r"'packaged:nope': no packaged model of that name \(packaged models: "
                                              r"packaged:default, packaged:robust-v2, packaged:robust-v1, packaged:pbc-only"):
        resolve_checkpoint("packaged:nope")
    # Every command that takes a checkpoint takes the short name: prediction, and adaptation's starting point.
    assert CellPredictor("packaged:pbc-only").meta.checkpoint_id == pbc_only.metadata.checkpoint_id


def test_manifest_facts_match_the_checkpoints_and_the_results_doc():
    """The manifest is the one place of the packaged models' facts; what can be derived is checked here."""
    from pathlib import Path

    from bloodray import packaged
    from bloodray.checkpoint import read_metadata

    results = (Path(__file__).resolve().parents[1] / "docs" / "RESULTS.md").read_text()
    for model in packaged.models():
        meta = read_metadata(str(model.path))
        assert meta.checkpoint_id == model.checkpoint_id, model.name
        # The PBC figures are the ones its calibration sealed (val) and measured on the test split.
        assert model.figures["pbc_val_accuracy"] == round(meta.calibration["val_accuracy"], 4), model.name
        assert model.figures["pbc_test_accuracy"] == round(meta.calibration["test"]["accuracy"], 4), model.name
        # The chula figures (a development set, not in the repo) are the ones docs/RESULTS.md gives with commands.
        for key in ("chula_zero_shot_accuracy", "chula_k20_adaptation_accuracy"):
            assert f"{model.figures[key]:.3f}" in results, (model.name, key)
        assert not (model.path / "train_state.pt").exists()


def test_ml_engineer_guide_table_is_the_manifest():
    """The guide's table of packaged models repeats the manifest's figures; a copy that drifts fails here."""
    from pathlib import Path

    from bloodray import packaged

    guide = (Path(__file__).resolve().parents[1] / "docs" / "guides" / "ml-engineer.md").read_text()
    for model in packaged.models():
        rows = [line for line in guide.splitlines() if line.startswith(f"| `packaged:{model.name}`")]
        assert len(rows) == 1, (model.name, rows)
        cells = [c.strip() for c in rows[0].strip("|").split("|")]
        expected = [f"{model.figures[k]:.3f}" for k in
                    ("pbc_test_accuracy", "chula_zero_shot_accuracy", "chula_k20_adaptation_accuracy")]
        assert cells[-3:] == expected, (model.name, cells[-3:], expected)


def test_package_data_stays_under_the_wheel_limit():
    """The wheel must stay under 30 MB: the package files it ships (code, defaults, every packaged model)."""
    from pathlib import Path

    package = Path(__file__).resolve().parents[1] / "bloodray"
    total = sum(p.stat().st_size for p in package.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    assert total < 25 * 1024 * 1024, f"{total / 2**20:.1f} MiB of package files (wheel limit 30 MB, compressed)"
