"""GPU decode in the model actor (bloodray.data.device_decode), run on the CPU device: the same code path."""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

from bloodray.classes import CLASS_NAMES
from bloodray.data.decode import CellImageLimits
from bloodray.data.device_decode import decode_on_device, read_files
from bloodray.data.stages import read_decode_files
from bloodray.data.synth import render_cell
from bloodray.nightly.pipeline import CellPredictorResults

CELL = CellImageLimits()


def _jpeg(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=92)
    return buf.getvalue()


def _inputs(tmp_path) -> dict[str, str]:
    """name -> path: good JPEGs of every class, a PNG, a truncated JPEG, a tiny and a blank JPEG, a missing file."""
    files = {}
    for i, name in enumerate(CLASS_NAMES):
        files[f"good{i}.jpg"] = _jpeg(np.asarray(render_cell(name, np.random.default_rng([2, i]), 360)))
    png = io.BytesIO()
    Image.fromarray(np.asarray(render_cell("neutrophil", np.random.default_rng(9), 200))).save(png, format="PNG")
    files["cell.png"] = png.getvalue()
    files["cut.jpg"] = files["good0.jpg"][: len(files["good0.jpg"]) // 2]
    files["tiny.jpg"] = _jpeg(np.full((10, 10, 3), 90, np.uint8))
    files["blank.jpg"] = _jpeg(np.full((200, 200, 3), 200, np.uint8))
    paths = {}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
        paths[name] = str(tmp_path / name)
    paths["missing.jpg"] = str(tmp_path / "missing.jpg")
    return paths


def test_device_decode_on_cpu_matches_the_cpu_stage_row_for_row(tmp_path):
    from bloodray.checkpoint import load_checkpoint

    preset = load_checkpoint(None).metadata.preset()
    paths = _inputs(tmp_path)
    batch = {"uri": np.array(list(paths.values()), dtype=object)}
    read = read_files(batch)
    assert read["data"][0][:3] == b"\xff\xd8\xff" and read["error_type"][-1] == "unreadable"
    out, on_device = decode_on_device(read, preset, torch.device("cpu"), CELL)
    reference = read_decode_files(batch, preset=preset, limits=_limits())
    # Same rows, same error kinds and stages: the truncated JPEG refused by the device decoder fails on the CPU
    # too (truncated), the header limits refuse the tiny one, contrast the blank one; the PNG goes the CPU way.
    for key in ("stage", "error_type", "image_sha256"):
        assert list(out[key]) == list(reference[key]), key
    kinds = dict(zip(paths, out["error_type"]))
    assert kinds["cut.jpg"] == "truncated" and kinds["tiny.jpg"] == kinds["blank.jpg"] == "not_a_cell_image"
    assert kinds["cell.png"] == "" and kinds["missing.jpg"] == "unreadable"
    assert "data" not in out and on_device.shape == out["image"].shape == (len(paths), 128, 128, 3)
    assert torch.equal(on_device, torch.from_numpy(out["image"]))
    good = [i for i, name in enumerate(paths) if name.startswith("good")]
    # Full-size decode + antialiased resize vs DCT-scaled decode + PIL resize: a few levels apart.
    diff = np.abs(out["image"][good].astype(float) - reference["image"][good].astype(float))
    assert diff.mean() < 3.0
    assert not out["image"][[i for i, k in enumerate(out["error_type"]) if k]].any()


def _limits():
    from bloodray.data.stages import ReadLimits

    return ReadLimits(cell=CELL)


def test_actor_decodes_undecoded_batches_and_classifies_like_the_cpu_path(tmp_path):
    paths = _inputs(tmp_path)
    batch = {"uri": np.array(list(paths.values()), dtype=object),
             "sample_id": np.array(["s1"] * len(paths), dtype=object)}
    actor = CellPredictorResults(None, device="cpu", precision="fp32", cell_limits=CELL)
    on_device = actor(read_files(batch)).to_pylist()
    on_cpu = actor(read_decode_files(batch, preset=actor.preset, limits=_limits())).to_pylist()
    assert [r["error_type"] for r in on_device] == [r["error_type"] for r in on_cpu]
    assert [r["image_uri"] for r in on_device] == list(paths.values())
    classified = [r for r in on_device if r["error_type"] is None]
    assert len(classified) == len(CLASS_NAMES) + 1 and all(r["jpeg"] for r in classified)
    same = sum(a["predicted_class"] == b["predicted_class"] for a, b in zip(on_device, on_cpu)
               if a["error_type"] is None)
    assert same >= len(classified) - 1
