"""Incremental runs reconcile per image (issue 14, defect 3), on a real local Ray cluster.

An image added to an already classified sample is classified, images and
samples deleted from the archive are not carried, an image that failed in the
previous run is read again, and everything else is carried unchanged.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow.compute as pc
import pytest

from bloodray.analysis import query
from bloodray.config import load_config
from bloodray.data import synth
from bloodray.nightly import contract, tables
from bloodray.nightly.pipeline import ClassifyConfig, run_classification

DATE = "2024-07-01"
KEEP = ["image_uri", "image_sha256", "predicted_class", "confidence"]


def _config(archive: Path, out: Path, *extra: str) -> ClassifyConfig:
    return load_config(ClassifyConfig, None, [f"input.uri={archive}", f"output.uri={out}", f"run.date={DATE}",
                                              "inference.batch_size=8", "inference.num_gpus=0", *extra])


def _by_uri(table) -> dict[str, dict]:
    return {r["image_uri"]: {k: r[k] for k in KEEP} for r in table.to_pylist()}


@pytest.mark.slow
def test_incremental_run_reconciles_per_image(tmp_path, ray_cluster):
    archive, out = tmp_path / "archive", tmp_path / "out"
    day = archive / DATE
    synth.write_archive(str(day), synth.default_samples(3, 4, seed=11), size=64, seed=11)
    s1, s2, s3 = (sorted((day / s).glob("*.jpg")) for s in ("S0001", "S0002", "S0003"))
    good_bytes = s1[0].read_bytes()
    (day / "S0001" / "later_fixed.jpg").write_bytes(b"\xff\xd8 cut short")  # fails in the first run
    first = run_classification(_config(archive, out))
    assert (first.n_predictions, first.n_errors) == (12, 1)
    before = _by_uri(query.read_table(str(out), "predictions"))

    # The archive changes between the runs.
    (day / "S0001" / "later_fixed.jpg").write_bytes(good_bytes)  # readable now
    shutil.copy(s2[0], day / "S0002" / "added_later.jpg")  # a new image in a classified sample
    s2[1].unlink()  # an image deleted from a classified sample
    shutil.rmtree(day / "S0003")  # a whole sample deleted
    synth.write_archive(str(day), [synth.SampleSpec("S0009", {"neutrophil": 2})], size=64, seed=12)  # a new sample

    inc = run_classification(_config(archive, out, "run.incremental=true"))
    listed = {str(p) for p in day.rglob("*.jpg")}
    preds = query.read_table(str(out), "predictions")
    uris = preds.column("image_uri").to_pylist()
    # Every listed image exactly once, nothing that is no longer listed, no errors left.
    assert sorted(uris) == sorted(listed) and len(uris) == len(set(uris)) == 5 + 4 + 2
    assert query.read_table(str(out), "errors").num_rows == 0
    # Only the new, re-tried and changed-sample images were read; the rest is carried unchanged.
    read_now = {str(day / "S0001" / "later_fixed.jpg"), str(day / "S0002" / "added_later.jpg")}
    read_now |= {str(p) for p in (day / "S0009").glob("*.jpg")}
    assert inc.n_inputs == len(read_now) == 4
    after = _by_uri(preds)
    assert {u: after[u] for u in listed - read_now} == {u: before[u] for u in listed - read_now}
    assert set(preds.column("run_id").to_pylist()) == {inc.run_id}
    # Per sample: S0001 and S0002 had images read, so no sample was skipped entirely; S0003 is gone.
    diffs = {r["sample_id"]: r for r in query.read_table(str(out), "differentials").to_pylist()}
    assert sorted(diffs) == ["S0001", "S0002", "S0009"]
    assert (diffs["S0001"]["n_classified"], diffs["S0001"]["n_errors"]) == (5, 0)
    assert diffs["S0002"]["n_images"] == 4
    assert inc.incremental_skipped_samples == 0
    run = tables.visible_runs(str(out)).to_pylist()[0]
    assert (run["run_id"], run["carried_from_run_id"], run["n_inputs"]) == (inc.run_id, first.run_id, 4)

    # Nothing changed since: everything is carried, nothing is read, each sample skipped.
    again = run_classification(_config(archive, out, "run.incremental=true"))
    assert (again.n_inputs, again.n_predictions, again.n_errors, again.incremental_skipped_samples) == (0, 11, 0, 3)
    kept = query.read_table(str(out), "predictions")
    assert _by_uri(kept) == after
    assert pc.all(pc.equal(kept.column("run_id"), again.run_id)).as_py()
    assert not (out / contract.STAGING).exists() or not any((out / contract.STAGING).iterdir())
