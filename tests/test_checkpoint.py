"""Checkpoints load without executing code; tampered or foreign ones are refused with a clear error."""

from __future__ import annotations

import json
import pickle

import pytest
import torch

from bloodray.checkpoint import (CheckpointError, CheckpointMetadata, export_checkpoint, load_checkpoint,
                                 resolve_checkpoint, write_checkpoint)
from bloodray.classes import CLASS_NAMES
from bloodray.models import create_model


@pytest.fixture()
def checkpoint(tmp_path):
    model = create_model("bloodnet", input_size=32)
    meta = CheckpointMetadata(model_name="bloodnet", classes=list(CLASS_NAMES), input_size=32, mean=[0.5] * 3,
                              std=[0.5] * 3, model_kwargs={"input_size": 32}, metrics={"val_macro_f1": 0.5})
    write_checkpoint(tmp_path / "run" / "checkpoint_epoch0001", model, meta)
    return tmp_path / "run" / "checkpoint_epoch0001"


def test_round_trip_and_best_in_run_dir(checkpoint):
    loaded = load_checkpoint(str(checkpoint.parent))
    assert loaded.uri == str(checkpoint) and loaded.metadata.checkpoint_id.startswith("bloodnet-")
    assert loaded.model(torch.zeros(1, 3, 32, 32)).shape == (1, len(CLASS_NAMES))


def test_tampered_weights_are_refused(checkpoint):
    blob = bytearray((checkpoint / "model.safetensors").read_bytes())
    blob[-1] ^= 0xFF
    (checkpoint / "model.safetensors").write_bytes(bytes(blob))
    with pytest.raises(CheckpointError, match="tampered or corrupted"):
        load_checkpoint(str(checkpoint))


def test_foreign_metadata_and_pickles_are_refused(tmp_path, checkpoint):
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "bloodray.json").write_text(json.dumps({"model": "something else"}))
    with pytest.raises(CheckpointError, match="not a bloodray checkpoint"):
        load_checkpoint(str(tmp_path / "foreign"))
    # A pickle posing as weights (with a matching hash) is not a safetensors file and never unpickled.
    evil = tmp_path / "evil"
    export_checkpoint(str(checkpoint), str(evil))
    (evil / "model.safetensors").write_bytes(pickle.dumps({"x": 1}))
    meta = json.loads((evil / "bloodray.json").read_text())
    meta["weights_sha256"] = ""
    (evil / "bloodray.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="not a valid safetensors file"):
        load_checkpoint(str(evil))


def test_other_class_lists_are_refused(checkpoint):
    meta = json.loads((checkpoint / "bloodray.json").read_text())
    meta["classes"] = list(reversed(CLASS_NAMES))
    (checkpoint / "bloodray.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="differ from this version's"):
        load_checkpoint(str(checkpoint))


def test_missing_checkpoint_names_the_uri(tmp_path):
    with pytest.raises(CheckpointError, match=str(tmp_path / "nothing")):
        resolve_checkpoint(str(tmp_path / "nothing"))
