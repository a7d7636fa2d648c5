"""The seams of evaluation: decode failure kinds, the predictor's logits, metrics as data, calibration on logits."""

from __future__ import annotations

import numpy as np
import pytest

from bloodray import rundir
from bloodray.checkpoint import export_checkpoint, load_checkpoint, read_metadata, resolve_checkpoint
from bloodray.classes import CLASS_NAMES, NUM_CLASSES
from bloodray.data.decode import FAILURE_KINDS, ImageDecodeError, decode_image
from bloodray.data.synth import render_cell
from bloodray.evaluation.calibration import fit_temperature, softmax
from bloodray.evaluation.metrics import classification_metrics, table2_markdown, table2_markdown_rows, table2_rows
from bloodray.predict import CellPredictor
from helpers_bad_inputs import MAX_PIXELS_FOR_TESTS, bad_files


def test_every_bad_file_fails_with_a_documented_kind():
    for name, (data, kind) in bad_files().items():
        assert kind in FAILURE_KINDS
        with pytest.raises(ImageDecodeError) as info:
            decode_image(data, max_pixels=MAX_PIXELS_FOR_TESTS)
        assert info.value.kind == kind, name


def _images(size: int, n: int = 2 * NUM_CLASSES) -> np.ndarray:
    return np.stack([np.asarray(render_cell(CLASS_NAMES[i % NUM_CLASSES], np.random.default_rng([7, i]), 128)
                                .resize((size, size))) for i in range(n)])


@pytest.fixture(scope="module")
def hot_checkpoint(tmp_path_factory):
    """The packaged model with a temperature far from its calibrated one."""
    dest = str(tmp_path_factory.mktemp("hot") / "ckpt")
    return export_checkpoint(resolve_checkpoint(None), dest, temperature=4.0)


def test_predictor_logits_are_raw_and_probabilities_are_their_calibrated_softmax(hot_checkpoint):
    packaged = CellPredictor(None)
    hot = CellPredictor(hot_checkpoint)
    assert packaged.temperature != pytest.approx(hot.temperature)
    images = _images(packaged.preset.input_size)
    error = np.array([""] * len(images), dtype=object)
    error[3] = "corrupt: cannot decode image data"
    a = packaged({"image": images, "error": error})
    b = hot({"image": images, "error": error})
    ok = error == ""
    assert a["logits"].dtype == np.float32 and a["logits"].shape == (len(images), NUM_CLASSES)
    # Same weights: the logits do not depend on the checkpoint's temperature, the probabilities do.
    np.testing.assert_allclose(a["logits"][ok], b["logits"][ok], rtol=1e-5, atol=1e-5)
    assert not np.allclose(a["probs"][ok], b["probs"][ok], atol=1e-3)
    for out, predictor in ((a, packaged), (b, hot)):
        expected = softmax(out["logits"][ok], predictor.temperature)
        np.testing.assert_allclose(out["probs"][ok], expected, atol=1e-5)
        assert np.isnan(out["logits"][~ok]).all() and np.isnan(out["probs"][~ok]).all()
        assert out["predicted_label"][3] == -1 and out["predicted_class"][3] == ""


def test_metrics_and_table2_from_known_predictions():
    labels = [0, 0, 1, 1, 2]
    predicted = [0, 1, 1, 1, 2]
    m = classification_metrics(labels, predicted)
    assert m["n"] == 5 and m["accuracy"] == pytest.approx(0.8)
    assert m["per_class"][CLASS_NAMES[0]] == pytest.approx(
        {"precision": 1.0, "recall": 0.5, "f1": 2 / 3, "support": 2, "predicted": 1})
    assert m["per_class"][CLASS_NAMES[1]]["precision"] == pytest.approx(2 / 3)
    # Macro over the classes present in the truth only.
    assert m["macro_f1"] == pytest.approx((2 / 3 + 0.8 + 1.0) / 3)
    assert m["confusion_matrix"][0][:3] == [1, 1, 0] and np.asarray(m["confusion_matrix"]).sum() == 5

    rows = table2_rows(m)
    assert [r["class_name"] for r in rows] == list(CLASS_NAMES)
    # One-vs-rest accuracy of class 0: TP 1 + TN 3 of 5; an absent class is right about every image.
    assert rows[0]["accuracy"] == pytest.approx(4 / 5)
    assert rows[5]["truth"] == 0 and rows[5]["accuracy"] == pytest.approx(1.0)
    text = table2_markdown("tiny", m)
    for line in table2_markdown_rows("tiny", m):
        assert line in text.splitlines()
    assert "accuracy **0.8000**" in text


def test_table2_rows_need_only_the_stored_structure():
    """Comparison records keep per_class and the confusion matrix, not the predictions: that is enough."""
    cm = np.zeros((NUM_CLASSES, NUM_CLASSES), dtype=int)
    cm[0, 0], cm[1, 0] = 3, 1
    per_class = {name: {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0, "predicted": 0}
                 for name in CLASS_NAMES}
    per_class[CLASS_NAMES[0]] = {"precision": 0.75, "recall": 1.0, "f1": 6 / 7, "support": 3, "predicted": 4}
    per_class[CLASS_NAMES[1]] = {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1, "predicted": 0}
    rows = table2_rows({"per_class": per_class, "confusion_matrix": cm.tolist()})
    assert rows[0]["truth"] == 3 and rows[0]["classified"] == 4
    assert rows[0]["accuracy"] == pytest.approx(3 / 4) and rows[1]["accuracy"] == pytest.approx(3 / 4)


@pytest.mark.slow
def test_calibrate_run_fits_the_temperature_on_raw_logits(tmp_path, ray_cluster, hot_checkpoint):
    from bloodray.data.labelled import SplitFractions, build_split, write_parquet
    from bloodray.data.synth import write_labelled_dataset
    from bloodray.evaluation.evaluate import calibrate_run

    data = str(tmp_path / "cells")
    write_labelled_dataset(data, 8, size=96, seed=3)
    manifest, _ = build_split(data, SplitFractions(0.5, 0.25, 0.25), seed=0)
    run = str(tmp_path / "run")
    write_parquet(manifest, rundir.split_manifest(run))
    # The run's only checkpoint carries a wrong temperature; calibration must not depend on it.
    export_checkpoint(hot_checkpoint, rundir.checkpoint_dir(run, 1), temperature=4.0)

    # The packaged PBC model on synthetic cells misses the quality gate: sealed with --force, and recorded so.
    result = calibrate_run(run, max_flagged_share=0.1, force=True)

    # The reference: the model's own logits on the val images, computed here without Ray.
    loaded = load_checkpoint(hot_checkpoint)
    preset = loaded.metadata.preset()
    val = [r for r in manifest.to_pylist() if r["split"] == "val"]
    images = np.stack([preset.load(open(r["uri"], "rb").read()) for r in val])
    logits = CellPredictor(loaded=loaded).logits(images).numpy()
    expected = fit_temperature(logits, np.array([r["label"] for r in val]))
    assert result["temperature"] == pytest.approx(expected, rel=1e-2)
    assert result["n_val"] == result["val_size"] == len(val)
    assert result["gate"]["forced"] is not result["gate"]["passed"]
    assert result["test"]["review"]["n"] == sum(r["split"] == "test" for r in manifest.to_pylist())
    assert result["checkpoint"] == rundir.calibrated_dir(run)
    assert resolve_checkpoint(run) == rundir.calibrated_dir(run)
    assert read_metadata(result["checkpoint"]).temperature == pytest.approx(result["temperature"])
    # The val confusion matrix sealed with it is the model's own argmax on the val images.
    labels = np.array([r["label"] for r in val])
    sealed = read_metadata(result["checkpoint"]).val_confusion()
    assert sealed.sum() == len(val) and sealed.trace() == int((logits.argmax(1) == labels).sum())
    assert sealed[labels[0]].sum() == int((labels == labels[0]).sum())
    # The training cells' confusion is sealed beside it with its check; the flags add it only when it joined.
    train = read_metadata(result["checkpoint"]).calibration["train_confusion"]
    n_train = sum(r["split"] == "train" for r in manifest.to_pylist())
    assert train["cells"] == np.asarray(train["confusion"]).sum() == n_train and isinstance(train["joined"], bool)
    expected_flags = sealed + (np.asarray(train["confusion"]) if train["joined"] else 0)
    assert (read_metadata(result["checkpoint"]).flag_confusion() == expected_flags).all()
    # The precision self-check batch is sealed with the calibration: val cells and their fp32 logits.
    calibrated = CellPredictor(result["checkpoint"], device="cpu", precision="fp32")
    assert read_metadata(result["checkpoint"]).selfcheck["images"] == min(32, len(val))
    assert calibrated.refused == {}
