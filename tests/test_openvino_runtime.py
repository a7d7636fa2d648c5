"""``runtime="openvino"``: the CPU forward pass in OpenVINO, under the same self-check and fallback as torch's."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from bloodray.classes import CLASS_NAMES
from bloodray.data.synth import render_cell
from bloodray.inference_precision import PROB_TOLERANCE, bf16_supported
from bloodray.predict import CellPredictor

FASTEST = "bf16" if bf16_supported(torch.device("cpu")) else "fp32"


def _cells(n: int = 16, size: int = 128) -> np.ndarray:
    return np.stack([np.asarray(render_cell(CLASS_NAMES[i % len(CLASS_NAMES)], np.random.default_rng([12, i]),
                                            size)) for i in range(n)])


def test_openvino_runs_the_packaged_model_like_torch_with_its_ood_score(caplog):
    with caplog.at_level(logging.INFO, logger="bloodray.predict"):
        ov = CellPredictor(None, device="cpu", runtime="openvino")
    assert (ov.runtime, ov.precision, ov.refused) == ("openvino", FASTEST, {})
    assert f"runtime openvino, precision {FASTEST}: self-check passed" in caplog.text
    ref = CellPredictor(None, device="cpu", precision="fp32")
    images = _cells()
    a, b = ov({"image": images}), ref({"image": images})
    assert list(a["predicted_class"]) == list(b["predicted_class"])
    assert np.abs(a["probs"] - b["probs"]).max() <= PROB_TOLERANCE
    # The OOD features come out of OpenVINO's model (no torch hooks fire): the same score, the same decision.
    assert np.isfinite(a["ood_score"]).all()
    np.testing.assert_allclose(a["ood_score"], b["ood_score"], rtol=0.05, atol=0.5)
    assert list(a["unidentified"]) == list(b["unidentified"])
    # An OpenVINO fp32 pass matches torch fp32 to float rounding, features included.
    exact = CellPredictor(None, device="cpu", precision="fp32", runtime="openvino", return_features=True)
    c, d = exact({"image": images}), CellPredictor(None, device="cpu", precision="fp32", return_features=True)(
        {"image": images})
    assert exact.runtime == "openvino"
    for column in ("logits", "ood_pen", "ood_early"):
        np.testing.assert_allclose(c[column], d[column], rtol=1e-4, atol=1e-4)


def test_openvino_failing_its_self_check_falls_back_to_torch(caplog):
    with caplog.at_level(logging.WARNING, logger="bloodray.predict"):
        strict = CellPredictor(None, device="cpu", precision="fp32", runtime="openvino", self_check_tolerance=1e-12)
    assert strict.runtime == "torch" and strict.precision == "fp32"
    assert "moves by" in strict.refused["openvino fp32"]
    assert "runtime openvino, precision fp32 failed the self-check" in caplog.text
    assert "no precision passed the self-check; using torch" in caplog.text
    out = strict({"image": _cells(4)})
    assert np.isfinite(out["probs"]).all()


def test_runtime_must_be_known():
    with pytest.raises(ValueError, match="runtime must be one of torch, openvino"):
        CellPredictor(None, device="cpu", runtime="onnx")


def test_the_job_actor_records_the_runtime_beside_the_precision(tmp_path):
    """The runs table's ``precision`` says ``bf16 (openvino)``: the schema metadata each actor batch carries."""
    from PIL import Image

    from bloodray.data.decode import CellImageLimits
    from bloodray.data.stages import ReadLimits, read_decode_files
    from bloodray.nightly.pipeline import PATH_METADATA, CellPredictorResults

    uris = []
    for i, image in enumerate(_cells(3)):
        Image.fromarray(image).save(tmp_path / f"c{i}.png")
        uris.append(str(tmp_path / f"c{i}.png"))
    actor = CellPredictorResults(None, device="cpu", runtime="openvino")
    batch = read_decode_files({"uri": np.array(uris, dtype=object), "sample_id": np.array(["s"] * 3, dtype=object)},
                              preset=actor.preset, limits=ReadLimits(cell=CellImageLimits()))
    table = actor(batch)
    assert table.num_rows == 3 and all(c for c in table.column("predicted_class").to_pylist())
    assert table.schema.metadata[PATH_METADATA["precision"]] == f"{FASTEST} (openvino)".encode()
