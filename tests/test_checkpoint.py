"""Checkpoints load without executing code; tampered, unsealed or foreign ones are refused with a clear error.

The seal (``seal_sha256``) covers every metadata field, the weights through ``weights_sha256``; the checkpoint id
derives from it. Values are validated on load, so even a consistently re-sealed bad value is refused.
"""

from __future__ import annotations

import hashlib
import json
import pickle

import pytest
import torch

from bloodray.checkpoint import (FORMAT, CheckpointError, CheckpointMetadata, export_checkpoint, load_checkpoint,
                                 read_metadata, resolve_checkpoint, seal_of, write_checkpoint)
from bloodray.train.resume_state import load_resume_state
from bloodray.classes import CLASS_NAMES
from bloodray.models import create_model


@pytest.fixture()
def checkpoint(tmp_path):
    model = create_model("bloodnet", input_size=32)
    meta = CheckpointMetadata(model_name="bloodnet", classes=list(CLASS_NAMES), input_size=32, mean=[0.5] * 3,
                              std=[0.5] * 3, model_kwargs={"input_size": 32}, metrics={"val_macro_f1": 0.5})
    write_checkpoint(tmp_path / "run" / "checkpoint_epoch0001", model, meta, {"epoch": 1})
    return tmp_path / "run" / "checkpoint_epoch0001"


def edit_metadata(directory, reseal: bool = False, **changes):
    """Change ``bloodray.json`` by hand; ``reseal=True`` also recomputes the seal (a tamperer who knows the scheme)."""
    path = directory / "bloodray.json"
    meta = json.loads(path.read_text())
    meta.update(changes)
    if reseal:
        meta["seal_sha256"] = seal_of(meta)
    path.write_text(json.dumps(meta, indent=2))


def test_round_trip_and_best_in_run_dir(checkpoint):
    loaded = load_checkpoint(str(checkpoint.parent))
    meta = loaded.metadata
    assert loaded.uri == str(checkpoint) and meta.format == FORMAT
    assert meta.checkpoint_id == f"bloodnet-{meta.seal_sha256[:12]}"
    assert meta.weights_sha256 == hashlib.sha256((checkpoint / "model.safetensors").read_bytes()).hexdigest()
    assert loaded.model(torch.zeros(1, 3, 32, 32)).shape == (1, len(CLASS_NAMES))
    resumed = load_resume_state(checkpoint)
    assert resumed.train_state == {"epoch": 1} and set(resumed.weights) == set(loaded.model.state_dict())


def test_tampered_weights_are_refused(checkpoint):
    blob = bytearray((checkpoint / "model.safetensors").read_bytes())
    blob[-1] ^= 0xFF
    (checkpoint / "model.safetensors").write_bytes(bytes(blob))
    with pytest.raises(CheckpointError, match="tampered or corrupted"):
        load_checkpoint(str(checkpoint))
    with pytest.raises(CheckpointError, match="tampered or corrupted"):
        load_resume_state(checkpoint)
    # export never launders tampered weights into a freshly sealed checkpoint
    with pytest.raises(CheckpointError, match="tampered or corrupted"):
        export_checkpoint(str(checkpoint), str(checkpoint.parent / "laundered"))


@pytest.mark.parametrize("field", ["weights_sha256", "seal_sha256"])
@pytest.mark.parametrize("blank", ["", None, "absent"])
def test_missing_or_blank_hash_is_refused(checkpoint, field, blank):
    path = checkpoint / "bloodray.json"
    meta = json.loads(path.read_text())
    if blank == "absent":
        del meta[field]
    else:
        meta[field] = blank
    path.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=rf"{checkpoint}: .*no valid {field}"):
        load_checkpoint(str(checkpoint))


def test_blanked_hash_does_not_let_tampered_weights_through(checkpoint):
    """The old hole: blanking the hash turned the weights check off (id 'bloodnet-')."""
    blob = bytearray((checkpoint / "model.safetensors").read_bytes())
    blob[-1] ^= 0xFF
    (checkpoint / "model.safetensors").write_bytes(bytes(blob))
    edit_metadata(checkpoint, reseal=True, weights_sha256="")
    with pytest.raises(CheckpointError, match="no valid weights_sha256"):
        load_checkpoint(str(checkpoint))


@pytest.mark.parametrize("changes", [
    {"temperature": -1.0},
    {"mean": [0.1, 0.2, 0.3], "std": [0.9, 0.9, 0.9]},
    {"review_threshold": 5.0},
    {"input_size": 64},
    {"model_kwargs": {"input_size": 32, "dropout": 0.9}},
    {"metrics": {"val_macro_f1": 0.99}},
    {"calibration": {"temperature": 3.0}},
])
def test_tampered_metadata_is_refused(checkpoint, changes):
    edit_metadata(checkpoint, **changes)
    with pytest.raises(CheckpointError, match=rf"{checkpoint}: bloodray.json does not match its seal"):
        load_checkpoint(str(checkpoint))
    with pytest.raises(CheckpointError, match="does not match its seal"):
        read_metadata(str(checkpoint))


def test_unknown_metadata_keys_are_ignored(checkpoint):
    """Keys bloodray does not know are never used, so the seal does not need to cover them."""
    before = read_metadata(str(checkpoint)).checkpoint_id
    edit_metadata(checkpoint, unexpected="field")
    assert load_checkpoint(str(checkpoint)).metadata.checkpoint_id == before


@pytest.mark.parametrize("changes, field", [
    ({"temperature": -1.0}, "temperature"),
    ({"temperature": 0.0}, "temperature"),
    ({"temperature": float("inf")}, "temperature"),
    ({"temperature": float("nan")}, "temperature"),
    ({"temperature": "1.0"}, "temperature"),
    ({"review_threshold": 5.0}, "review_threshold"),
    ({"review_threshold": -0.1}, "review_threshold"),
    ({"mean": [0.5, 0.5]}, "mean"),
    ({"mean": [0.5, 0.5, 1.5]}, "mean"),
    ({"mean": [0.5, 0.5, float("nan")]}, "mean"),
    ({"std": [0.5, 0.5, 0.0]}, "std"),
    ({"std": [0.5, -0.5, 0.5]}, "std"),
    ({"std": [0.5, 0.5, float("inf")]}, "std"),
    ({"input_size": 0}, "input_size"),
    ({"input_size": 10**6}, "input_size"),
    ({"input_size": 32.5}, "input_size"),
])
def test_out_of_range_values_are_refused_even_when_resealed(checkpoint, changes, field):
    edit_metadata(checkpoint, reseal=True, **changes)
    with pytest.raises(CheckpointError, match=rf"{checkpoint}: bloodray.json: {field} must"):
        load_checkpoint(str(checkpoint))


def test_out_of_range_values_are_never_written(tmp_path, checkpoint):
    model = create_model("bloodnet", input_size=32)
    bad = CheckpointMetadata(model_name="bloodnet", classes=list(CLASS_NAMES), input_size=32, mean=[0.5] * 3,
                             std=[0.5] * 3, temperature=-1.0)
    with pytest.raises(CheckpointError, match="temperature must be a finite number > 0"):
        write_checkpoint(tmp_path / "bad", model, bad)
    assert not (tmp_path / "bad").exists()
    with pytest.raises(CheckpointError, match="review_threshold must be"):
        export_checkpoint(str(checkpoint), str(tmp_path / "bad2"), review_threshold=5.0)
    with pytest.raises(CheckpointError, match="set by the writer"):
        export_checkpoint(str(checkpoint), str(tmp_path / "bad3"), weights_sha256="0" * 64)


def test_id_derives_from_metadata_and_weights(tmp_path, checkpoint):
    original = read_metadata(str(checkpoint))
    # export with new calibration (what `bloodray calibrate` does): same weights, new seal, new id, loads
    calibrated = export_checkpoint(str(checkpoint), str(tmp_path / "calibrated"), temperature=0.7,
                                   review_threshold=0.9)
    meta = load_checkpoint(calibrated).metadata
    assert meta.temperature == 0.7 and meta.review_threshold == 0.9
    assert meta.weights_sha256 == original.weights_sha256
    assert meta.seal_sha256 != original.seal_sha256 and meta.checkpoint_id != original.checkpoint_id
    # a plain export keeps the id (content-derived, stable across copies)
    copy = load_checkpoint(export_checkpoint(str(checkpoint), str(tmp_path / "copy"))).metadata
    assert copy.checkpoint_id == original.checkpoint_id
    # other weights, same metadata: another id
    other = write_checkpoint(tmp_path / "other", create_model("bloodnet", input_size=32),
                             CheckpointMetadata(**{k: v for k, v in vars(original).items()
                                                   if k not in ("weights_sha256", "seal_sha256")}))
    assert other.weights_sha256 != original.weights_sha256 and other.checkpoint_id != original.checkpoint_id
    # the id follows any metadata edit (in memory too)
    assert CheckpointMetadata(**(vars(original) | {"epoch": 2})).checkpoint_id != original.checkpoint_id


def test_format_1_is_refused_with_advice_and_reexport_reseals(tmp_path, checkpoint):
    path = checkpoint / "bloodray.json"
    meta = json.loads(path.read_text())
    del meta["seal_sha256"]
    meta["format"] = "bloodray-checkpoint/1"
    path.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=rf"{checkpoint}: checkpoint format 'bloodray-checkpoint/1' .*"
                                              r"re-seal it with `bloodray export --checkpoint"):
        load_checkpoint(str(checkpoint))
    resealed = export_checkpoint(str(checkpoint.parent), str(tmp_path / "resealed"))
    assert load_checkpoint(resealed).metadata.format == FORMAT
    # a format-1 checkpoint with a wrong weights hash is not re-sealed
    blob = bytearray((checkpoint / "model.safetensors").read_bytes())
    blob[-1] ^= 0xFF
    (checkpoint / "model.safetensors").write_bytes(bytes(blob))
    with pytest.raises(CheckpointError, match="tampered or corrupted"):
        export_checkpoint(str(checkpoint), str(tmp_path / "nope"))


def test_foreign_metadata_and_pickles_are_refused(tmp_path, checkpoint):
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "bloodray.json").write_text(json.dumps({"model": "something else"}))
    with pytest.raises(CheckpointError, match="not a bloodray checkpoint"):
        load_checkpoint(str(tmp_path / "foreign"))
    # A pickle posing as weights (with a matching hash and seal) is not a safetensors file and never unpickled.
    evil = tmp_path / "evil"
    export_checkpoint(str(checkpoint), str(evil))
    payload = pickle.dumps({"x": 1})
    (evil / "model.safetensors").write_bytes(payload)
    edit_metadata(evil, reseal=True, weights_sha256=hashlib.sha256(payload).hexdigest())
    with pytest.raises(CheckpointError, match="not a valid safetensors file"):
        load_checkpoint(str(evil))


def test_other_class_lists_are_refused(checkpoint):
    edit_metadata(checkpoint, reseal=True, classes=list(reversed(CLASS_NAMES)))
    with pytest.raises(CheckpointError, match="differ from this version's"):
        load_checkpoint(str(checkpoint))


def test_missing_checkpoint_names_the_uri(tmp_path):
    with pytest.raises(CheckpointError, match=str(tmp_path / "nothing")):
        resolve_checkpoint(str(tmp_path / "nothing"))


def test_packaged_default_is_sealed_and_loads():
    """The weights hash is the one docs/RESULTS.md and the model card measured (the from-scratch robust model of
    issue 21, ``robust-v2``): shipping other weights must come with new measurements."""
    loaded = load_checkpoint(None)
    meta = loaded.metadata
    assert meta.format == FORMAT and meta.seal_sha256 == meta.compute_seal()
    assert meta.weights_sha256 == "58c446d711101222d2fce3677ffae4cbcf923e11ab8d078374cb0c37d0937dd0"
    # Trained with stain normalisation in its preset: the reference travels in the checkpoint.
    assert meta.stain_norm.get("method") == "reinhard" and meta.preset().stain is not None
    assert meta.checkpoint_id == f"bloodnet-{meta.seal_sha256[:12]}"
    # The precision self-check batch (issue 20): 32 PBC val cells and their fp32 logits, sealed with the weights.
    # Its hash is pinned like the weights': replacing the batch changes the checkpoint id on purpose.
    assert meta.selfcheck == {"file_sha256": "d9f23dc470c6acc34465407b10ffc03754e61002f0759bf4b8dfd6bf8cf7865e",
                              "images": 32}
    # Its OOD reference is per predicted class (issue 21: refitted by jobs/fit_ood_packaged.py), each class with
    # enough val cells for its own reference.
    assert set(meta.ood["per_class"]) == set(CLASS_NAMES) and loaded.ood.per_class is not None
    assert all(ref["n_val"] >= 100 for ref in meta.ood["per_class"].values())
    # Calibrated by issue 21's calibrate (val metrics, confusion matrix, quality gate, per-class OOD reference): the
    # id is the manifest's, which tests/test_packaged_model.py checks.
    # Its OOD reference has a validation reference per arithmetic (fp32, bf16): the job compares bf16 cells with the
    # bf16 one (bloodray.ood).
    assert meta.ood["precision"] == "fp32" and set(meta.ood["by_precision"]) == {"bf16"}
    assert loaded.ood.for_precision("bf16").per_class is not None
    # Its reference distributions include the training cells outside the Gaussians' subset, which score like val's.
    assert meta.ood["train_reference"]["joined"] and meta.ood["n_val"] > 4000
    assert meta.checkpoint_id == "bloodnet-89a89b37558c"


def test_numpy_values_are_written_as_numbers(tmp_path):
    import numpy as np

    meta = CheckpointMetadata(model_name="bloodnet", classes=list(CLASS_NAMES), input_size=np.int64(32),
                              mean=[np.float32(0.5)] * 3, std=[0.5] * 3, epoch=np.int64(3),
                              temperature=np.float32(0.75), metrics={"val_macro_f1": np.float64(0.5)})
    written = write_checkpoint(tmp_path / "c", create_model("bloodnet", input_size=32), meta)
    loaded = load_checkpoint(str(tmp_path / "c")).metadata
    assert loaded.epoch == 3 and loaded.temperature == 0.75 and loaded.checkpoint_id == written.checkpoint_id
