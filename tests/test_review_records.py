"""Reviews and sign-offs are lab records (issue 22, items 1 and 3), on a real local Ray cluster.

A date is classified, a reviewer's decisions file (the JSON the review page
downloads) is imported, then the date is rerun -- incrementally with a late
image, then in full with a new checkpoint after one reviewed image changed --
and vacuumed. Every review and sign-off must survive each step and apply to
the same image content; the review whose image changed is reported as
unmatched, never dropped. ``verified_differentials`` is read with the
``deltalake`` package alone, and the report shows it beside the machine's.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest

from bloodray import cli
from bloodray.analysis import query
from bloodray.checkpoint import export_checkpoint
from bloodray.classes import CLASS_NAMES
from bloodray.config import load_config
from bloodray.data import synth
from bloodray.nightly import contract
from bloodray.nightly.config import ClassifyConfig
from bloodray.nightly.pipeline import run_classification
from bloodray.review import decisions as dec

DATE = "2024-06-03"


def _config(archive: Path, out: str, checkpoint: str, *extra: str) -> ClassifyConfig:
    return load_config(ClassifyConfig, None, [f"input.uri={archive}", f"output.uri={out}", f"run.date={DATE}",
                                              f"model.checkpoint={checkpoint}", "inference.batch_size=8",
                                              "inference.num_gpus=0", "review.threshold=0.99", *extra])


def _cli(capsys, *argv: str) -> tuple[int, str, str]:
    rc = cli.run(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def _rows(out: str, sql: str) -> list[dict]:
    con = query.connect(out)
    try:
        return query.fetch_arrow(con, sql).to_pylist()
    finally:
        con.close()


def _delta_verified(out: str) -> list[dict]:
    """``verified_differentials`` as any Delta reader sees it: the ``deltalake`` package and nothing of bloodray."""
    from deltalake import DeltaTable

    rows = DeltaTable(str(Path(out) / "verified_differentials")).to_pyarrow_table().to_pylist()
    return sorted(rows, key=lambda r: (r["run_date"], r["sample_id"]))


def _other_class(cls: str) -> str:
    return next(c for c in ("basophil", "eosinophil", "monocyte") if c != cls)


def _decisions(run: dict, cells: list[dict]) -> dict:
    """What the review page downloads: S1's first cell relabelled, its second called unidentified; S2's first
    confirmed, its second relabelled; both samples signed off."""
    s1 = [c for c in cells if c["sample_id"] == "S0001"]
    s2 = [c for c in cells if c["sample_id"] == "S0002"]
    verdicts = [(s1[0], _other_class(s1[0]["predicted_class"])), (s1[1], "unidentified"),
                (s2[0], s2[0]["predicted_class"]), (s2[1], _other_class(s2[1]["predicted_class"]))]
    return {
        "format": dec.FORMAT, "output_uri": run["output_uri"], "run_date": DATE, "run_id": run["run_id"],
        "exported_at": "2024-06-04T07:00:00Z",
        "reviews": [{"sample_id": c["sample_id"], "image_uri": c["image_uri"], "image_sha256": c["image_sha256"],
                     "predicted_class": c["predicted_class"], "verified_class": v, "reviewer": "dr a",
                     "reviewed_at": f"2024-06-04T08:0{i}:00Z"} for i, (c, v) in enumerate(verdicts)],
        "signoffs": [{"sample_id": s, "reviewer": "dr b", "status": "signed_off", "signed_at": "2024-06-04T09:00:00Z"}
                     for s in ("S0001", "S0002")],
    }


def _expected_counts(out: str, verdicts: dict[str, str]) -> dict[str, dict[str, int]]:
    """Per sample: each class count from the verified class of every cell (predicted where not reviewed)."""
    counts: dict[str, dict[str, int]] = {}
    for p in _rows(out, "SELECT sample_id, image_sha256, predicted_class, status FROM predictions"):
        cls = verdicts.get(p["image_sha256"], p["predicted_class"])
        sample = counts.setdefault(p["sample_id"], {c: 0 for c in CLASS_NAMES})
        if cls in sample and (p["image_sha256"] in verdicts or p["status"] != "unidentified"):
            sample[cls] += 1
    return counts


def _check_verified(out: str, verdicts: dict[str, str]) -> list[dict]:
    view = _rows(out, "SELECT * FROM verified_differentials ORDER BY run_date, sample_id")
    table = _delta_verified(out)
    assert table == view  # the Delta table is exactly the view
    expected = _expected_counts(out, verdicts)
    for row in table:
        assert {c: row[f"count_{c}"] for c in CLASS_NAMES} == expected[row["sample_id"]], row["sample_id"]
    return table


@pytest.mark.slow
def test_reviews_and_signoffs_survive_reruns_and_vacuum(tmp_path, ray_cluster, capsys, caplog):
    archive, out = tmp_path / "archive", str(tmp_path / "out")
    day = archive / DATE
    synth.write_archive(str(day), synth.default_samples(2, 6, seed=21), size=64, seed=21)
    # The packaged model without its OOD reference (these synthetic cells are not PBC cells).
    checkpoint = export_checkpoint("default", str(tmp_path / "ckpt-a"), ood={})
    first = run_classification(_config(archive, out, checkpoint))
    assert first.n_predictions == 12
    # The nightly run itself commits verified_differentials: any Delta reader has the machine's differential.
    machine = _rows(out, "SELECT * FROM differentials ORDER BY sample_id")
    assert [r["n_verified"] for r in _delta_verified(out)] == [0, 0]
    assert [{k: r[k] for k in machine[0]} for r in _delta_verified(out)] == machine

    # A reviewer's decisions from the page, imported.
    run = _rows(out, "SELECT run_id, output_uri FROM runs")[0]
    cells = _rows(out, "SELECT sample_id, image_uri, image_sha256, predicted_class FROM predictions "
                       "ORDER BY sample_id, image_uri")
    doc = _decisions(run, cells)
    path = tmp_path / dec.default_name(DATE)
    path.write_text(json.dumps(doc))
    rc, printed, _ = _cli(capsys, "review", "import", str(path), "--output", out, "--date", DATE)
    assert rc == 0 and "imported 4 review(s) and 2 sign-off(s)" in printed and "3 class change(s)" in printed
    verdicts = {r["image_sha256"]: r["verified_class"] for r in doc["reviews"]}
    table = _check_verified(out, verdicts)
    assert [(r["sample_id"], r["n_verified"], r["reviewers"], r["signoff_status"], r["signed_off_by"],
             r["signoff_outdated"], r["n_reviews_unmatched"]) for r in table] == [
        ("S0001", 2, "dr a", "signed_off", "dr b", False, 0), ("S0002", 2, "dr a", "signed_off", "dr b", False, 0)]
    assert {r["review_status"] for r in _rows(out, "SELECT review_status FROM reviews")} == {"applied"}
    # The same file again: imported once.
    rc, printed, _ = _cli(capsys, "review", "import", str(path), "--output", out, "--date", DATE)
    assert rc == 0 and "imported before" in printed
    assert len(_rows(out, "SELECT * FROM reviews")) == 4 and len(_rows(out, "SELECT * FROM signoffs")) == 2

    # Incremental rerun: a late image in S0001. Every review applies again; S0001's signed-off cells changed.
    late = day / "S0001" / "late.jpg"
    synth.write_archive(str(tmp_path / "extra"), [synth.SampleSpec("S0001", {"lymphocyte": 1})], size=64, seed=99)
    shutil.copy(next((tmp_path / "extra" / "S0001").glob("*.jpg")), late)
    second = run_classification(_config(archive, out, checkpoint, "run.incremental=true"))
    assert second.n_inputs == 1 and second.n_predictions == 13
    table = _check_verified(out, verdicts)
    assert [(r["n_verified"], r["signoff_status"], r["signoff_outdated"]) for r in table] == [
        (2, "signed_off", True), (2, "signed_off", False)]
    assert {r["review_status"] for r in _rows(out, "SELECT review_status FROM reviews")} == {"applied"}

    # Full rerun with a new checkpoint, after S0002's relabelled image was replaced by other content.
    changed = Path(doc["reviews"][3]["image_uri"])
    changed.write_bytes(late.read_bytes())
    new_checkpoint = export_checkpoint("default", str(tmp_path / "ckpt-b"), ood={}, temperature=1.5)
    with caplog.at_level(logging.WARNING, logger="bloodray"):
        third = run_classification(_config(archive, out, new_checkpoint))
    assert third.checkpoint_id != first.checkpoint_id and third.n_inputs == 13
    # The changed image's review no longer matches: reported on the console, in reviews and in the table.
    assert any("1 review(s) of 2024-06-03 no longer match an image" in r.getMessage() for r in caplog.records)
    reviews = _rows(out, "SELECT image_uri, image_sha256, new_class, review_status FROM reviews ORDER BY reviewed_at")
    assert len(reviews) == 4 and [r["review_status"] for r in reviews] == ["applied"] * 3 + ["unmatched"]
    del verdicts[doc["reviews"][3]["image_sha256"]]
    table = _check_verified(out, verdicts)
    assert [(r["n_verified"], r["n_reviews_unmatched"], r["signoff_status"], r["signoff_outdated"])
            for r in table] == [(2, 0, "signed_off", True), (1, 1, "signed_off", True)]

    # Vacuum (no retention) deletes superseded runs' files, never a review or a sign-off.
    rc, printed, _ = _cli(capsys, "vacuum", "--output", out, "--retain-hours", "0")
    assert rc == 0 and "reviews:" not in printed and "signoffs:" not in printed
    assert len(_rows(out, "SELECT * FROM reviews")) == 4 and len(_rows(out, "SELECT * FROM signoffs")) == 2
    assert _check_verified(out, verdicts) == table
    for folder in ("reviews", "signoffs"):
        assert len(list((Path(out) / folder / f"run_date={DATE}").glob("*.parquet"))) == 1


def test_reviews_of_an_older_bloodray_survive_upgrade_output_and_new_imports(tmp_path, capsys):
    """Review files written before reviews carried the image content: committed by upgrade-output, applied by
    file name, kept by a second upgrade and by vacuum; a new import then adds the content columns to the table."""
    import datetime as dt

    import pyarrow as pa
    import pyarrow.parquet as pq
    from deltalake import DeltaTable
    from test_query_report import D1, NEW, build_tree

    out = str(tmp_path / "out")
    build_tree(out, delta=False)
    old_schema = pa.schema([(n, contract.reviews_schema().field(n).type) for n in
                            ("run_id", "image_uri", "old_class", "new_class", "reviewer", "reviewed_at")])
    legacy = tmp_path / "out" / "reviews" / f"run_date={D1}" / "20240302T080000Z-legacy1.parquet"
    legacy.parent.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist([{
        "run_id": NEW, "image_uri": "s3://in/S1/1.jpg", "old_class": "eosinophil", "new_class": "monocyte",
        "reviewer": "dr old", "reviewed_at": dt.datetime(2024, 3, 2, 8, tzinfo=dt.timezone.utc)}],
        schema=old_schema), legacy)
    for _ in range(2):  # a second upgrade (say, after an interruption) keeps it once
        assert cli.run(["upgrade-output", "--output", out]) == 0
    capsys.readouterr()
    assert cli.run(["vacuum", "--output", out, "--retain-hours", "0"]) == 0
    assert legacy.exists()
    (review,) = _rows(out, "SELECT * FROM reviews")
    assert (review["reviewer"], review["image_sha256"], review["review_status"]) == ("dr old", None, "applied")
    s1 = _rows(out, f"SELECT * FROM verified_differentials WHERE run_date = '{D1}' AND sample_id = 'S1'")[0]
    assert (s1["n_verified"], s1["reviewers"]) == (1, "dr old")

    # A page's decisions on top: the reviews table gains the content columns, for every Delta reader.
    doc = {"format": dec.FORMAT, "run_date": D1, "run_id": NEW, "signoffs": [], "reviews": [
        {"sample_id": "S1", "image_uri": "s3://in/S1/2.jpg", "image_sha256": f"{2:064x}", "verified_class": "ig",
         "reviewer": "dr new", "reviewed_at": "2024-03-03T08:00:00Z"}]}
    path = tmp_path / "decisions.json"
    path.write_text(json.dumps(doc))
    assert cli.run(["review", "import", str(path), "--output", out, "--date", D1]) == 0
    fields = {f.name for f in DeltaTable(str(Path(out) / "reviews")).schema().fields}
    assert {"sample_id", "image_sha256", "source"} <= fields
    assert [r["review_status"] for r in _rows(out, "SELECT * FROM reviews ORDER BY reviewed_at")] == ["applied"] * 2
    delta_s1 = [r for r in _delta_verified(out) if r["sample_id"] == "S1"]
    assert [(r["n_verified"], r["reviewers"]) for r in delta_s1] == [(2, "dr new, dr old")]
