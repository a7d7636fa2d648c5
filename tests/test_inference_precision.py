"""Inference precision: selection per device, the checkpoint's sealed self-check, and the fallback towards fp32."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from bloodray.checkpoint import PACKAGED_CHECKPOINT, SELFCHECK_FILE, CheckpointError, export_checkpoint, load_checkpoint
from bloodray.classes import CLASS_NAMES
from bloodray.data.synth import render_cell
from bloodray.inference_precision import (PROB_TOLERANCE, SELF_CHECK_IMAGES, SelfCheckBatch, bf16_supported, candidates,
                                compare, export_with_selfcheck, load_selfcheck, selfcheck_sample)
from bloodray.predict import CellPredictor

CPU = torch.device("cpu")
#: What ``auto`` must pick on this machine's CPU for the packaged model (its self-check passes in bf16).
FASTEST = "bf16" if bf16_supported(CPU) else "fp32"


def _cells(n: int = 8, size: int = 128) -> np.ndarray:
    return np.stack([np.asarray(render_cell(CLASS_NAMES[i % len(CLASS_NAMES)], np.random.default_rng([11, i]),
                                            size)) for i in range(n)])


def test_candidates_follow_the_request_and_the_device(caplog):
    assert candidates("fp32", CPU) == ["fp32"]
    assert candidates("auto", CPU) == ([FASTEST, "fp32"] if FASTEST != "fp32" else ["fp32"])
    assert candidates("bf16", CPU) == candidates("auto", CPU)
    with caplog.at_level(logging.WARNING):
        assert candidates("int8", CPU) == candidates("auto", CPU)
    assert "no int8 path" in caplog.text
    with pytest.raises(ValueError, match="precision must be one of auto, fp32, bf16, int8"):
        candidates("fp16", CPU)


def test_compare_names_what_failed():
    ref = np.array([[2.0, 0.0, -1.0], [0.0, 3.0, 1.0]], dtype=np.float32)
    assert compare(ref + 0.01, ref, 1.0) is None
    assert "2 of 2 reference cells change class" in compare(ref[:, [1, 0, 2]], ref, 1.0)
    assert "moves by" in compare(ref + np.array([[0, 1.5, 0], [0, 0, 0]], np.float32), ref, 1.0)
    assert compare(np.full_like(ref, np.nan), ref, 1.0) == "non-finite logits"


def test_packaged_model_runs_the_fastest_path_that_passes_its_self_check(caplog):
    with caplog.at_level(logging.INFO, logger="bloodray.predict"):
        auto = CellPredictor(None, device="cpu")
    assert auto.precision == FASTEST and not auto.refused
    assert f"precision {FASTEST} on cpu: self-check passed ({SELF_CHECK_IMAGES} reference cells)" in caplog.text
    fp32 = CellPredictor(None, device="cpu", precision="fp32")
    assert fp32.precision == "fp32"
    # The micro-batch is sized per precision: bf16 activations take half the bytes.
    if FASTEST == "bf16":
        assert auto.micro_batch >= 2 * fp32.micro_batch - 1 and auto.channels_last
    images = _cells()
    a, b = auto({"image": images}), fp32({"image": images})
    assert list(a["predicted_class"]) == list(b["predicted_class"])
    assert np.abs(a["probs"] - b["probs"]).max() <= PROB_TOLERANCE


def test_a_failed_self_check_falls_back_to_fp32_and_says_why(caplog):
    with caplog.at_level(logging.WARNING, logger="bloodray.predict"):
        strict = CellPredictor(None, device="cpu", precision="bf16", self_check_tolerance=1e-12)
    assert strict.precision == "fp32" and not strict.autocast.__class__.__name__ == "autocast"
    if FASTEST == "bf16":
        assert "moves by" in strict.refused["bf16"]
        assert "precision bf16 on cpu failed the self-check" in caplog.text and "falling back to fp32" in caplog.text


def test_a_sealed_class_mismatch_refuses_every_fast_path(tmp_path, caplog):
    """Sealed logits that disagree on the class (here: the classes rolled by one) fail bf16 and fp32 alike:
    the predictor runs the reference arithmetic, fp32, and logs an error."""
    check = load_selfcheck(str(PACKAGED_CHECKPOINT), load_checkpoint(None).metadata)
    wrong = SelfCheckBatch(check.images, np.roll(check.logits, 1, axis=1))
    dest = export_checkpoint(None, str(tmp_path / "wrong"), selfcheck=wrong.metadata(), selfcheck_file=wrong.to_bytes())
    with caplog.at_level(logging.WARNING, logger="bloodray.predict"):
        predictor = CellPredictor(dest, device="cpu", precision="auto")
    assert predictor.precision == "fp32"
    assert "change class" in predictor.refused["fp32"]
    assert "precision fp32 on cpu failed the checkpoint's self-check" in caplog.text


def test_without_a_self_check_batch_only_fp32_is_trusted(tmp_path):
    dest = export_checkpoint(None, str(tmp_path / "plain"), selfcheck={})
    assert not (Path(dest) / SELFCHECK_FILE).exists()
    assert CellPredictor(dest, device="cpu", precision="bf16").precision == "fp32"


def test_self_check_batch_is_sealed_by_export_and_tampering_is_refused(tmp_path):
    folder = tmp_path / "cells"
    folder.mkdir()
    from PIL import Image

    for i, image in enumerate(_cells(10, 96)):
        Image.fromarray(image).save(folder / f"{CLASS_NAMES[i % 8]}_{i}.png")
    dest = export_with_selfcheck(str(PACKAGED_CHECKPOINT), str(tmp_path / "ckpt"), str(folder))
    meta = load_checkpoint(dest).metadata
    check = load_selfcheck(dest, meta)
    assert meta.selfcheck["images"] == 10 and check.images.shape == (10, 128, 128, 3)
    # The sealed logits are the unfolded fp32 model's on the float stain transform.
    assert CellPredictor(dest, device="cpu", precision="fp32").refused == {}
    blob = (Path(dest) / SELFCHECK_FILE).read_bytes()
    (Path(dest) / SELFCHECK_FILE).write_bytes(blob[:-4] + b"\0\0\0\0")
    with pytest.raises(CheckpointError, match="selfcheck.safetensors: does not match the hash"):
        CellPredictor(dest, device="cpu")


def test_selfcheck_sample_spreads_over_classes():
    labels = np.array([0] * 50 + [1] * 3 + [2] * 50)
    picked = selfcheck_sample(labels, 9)
    assert len(picked) == 9 and sorted(np.bincount(labels[picked])) == [3, 3, 3]
