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
from bloodray.nightly_job import classify as run_job
from bloodray.review import decisions as dec

DATE = "2024-06-03"


def _config(archive: Path, out: str, checkpoint: str, *extra: str) -> ClassifyConfig:
    return load_config(ClassifyConfig, None, [f"input.uri={archive}", f"output.uri={out}", f"run.date={DATE}",
                                              f"model.checkpoint={checkpoint}", "inference.batch_size=8",
                                              "inference.num_gpus=0", "review.threshold=0.99", "report.enabled=false",
                                              *extra])


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


def _stored(row: dict, names) -> dict:
    """A view row as the Delta table stores it: the views show ``run_date`` as a date, the table holds the text."""
    return {k: row[k].isoformat() if k == contract.RUN_DATE else row[k] for k in names}


def _report(capsys, out: str, dest: Path) -> str:
    rc, printed, _ = _cli(capsys, "report", "--output", out, "--date", DATE, "--dest", str(dest))
    assert rc == 0 and "report:" in printed
    return (dest / "report.html").read_text()


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
    # The Delta table is exactly the view (which adds the clearer alias names of some columns).
    assert table == [_stored(r, table[0]) for r in view]
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
    first = run_job(_config(archive, out, checkpoint))
    assert first.n_predictions == 12
    # The nightly job (as `bloodray classify` runs it) itself commits verified_differentials: any Delta reader has
    # the machine's differential.
    machine = _rows(out, "SELECT * FROM differentials ORDER BY sample_id")
    assert [r["n_verified"] for r in _delta_verified(out)] == [0, 0]
    stored = contract.differentials_schema().names + [contract.RUN_DATE]  # the view adds alias names
    assert [{k: r[k] for k in stored} for r in _delta_verified(out)] == [_stored(r, stored) for r in machine]

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
    # The report after the import: verified and machine side by side, who reviewed and who signed off.
    page = _report(capsys, out, tmp_path / "report-1")
    assert "After review:" in page and "Machine alone:" in page and "4</b> cells reviewed by dr a" in page
    assert "2</b> of 2 samples signed off" in page and page.count("signed off by dr b, 2024-06-04 09:00 UTC") >= 4
    assert page.count("<th>machine %</th><th>machine 95 % interval</th><th>verified %</th>") == 2
    assert "Review and sign-off" in page and "no longer match" not in page and "OUTDATED" not in page
    assert page.count("<b>verified: ") == 4 and "<b>verified: unidentified</b>" in page  # on the cells themselves
    # The same file again: imported once.
    rc, printed, _ = _cli(capsys, "review", "import", str(path), "--output", out, "--date", DATE)
    assert rc == 0 and "imported before" in printed
    assert len(_rows(out, "SELECT * FROM reviews")) == 4 and len(_rows(out, "SELECT * FROM signoffs")) == 2

    # Incremental rerun: a late image in S0001. Every review applies again; S0001's signed-off cells changed.
    late = day / "S0001" / "late.jpg"
    synth.write_archive(str(tmp_path / "extra"), [synth.SampleSpec("S0001", {"lymphocyte": 1})], size=64, seed=99)
    shutil.copy(next((tmp_path / "extra" / "S0001").glob("*.jpg")), late)
    second = run_job(_config(archive, out, checkpoint, "run.incremental=true"))
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
        third = run_job(_config(archive, out, new_checkpoint))
    assert third.checkpoint_id != first.checkpoint_id and third.n_inputs == 13
    # The changed image's review no longer matches: reported on the console, in reviews and in the table.
    assert any("1 review(s) of 2024-06-03 no longer match an image" in r.getMessage() for r in caplog.records)
    reviews = _rows(out, "SELECT image_uri, image_sha256, new_class, review_status FROM reviews ORDER BY reviewed_at")
    assert len(reviews) == 4 and [r["review_status"] for r in reviews] == ["applied"] * 3 + ["unmatched"]
    del verdicts[doc["reviews"][3]["image_sha256"]]
    table = _check_verified(out, verdicts)
    assert [(r["n_verified"], r["n_reviews_unmatched"], r["signoff_status"], r["signoff_outdated"])
            for r in table] == [(2, 0, "signed_off", True), (1, 1, "signed_off", True)]

    page = _report(capsys, out, tmp_path / "report-3")
    assert "1 review(s) no longer match an image" in page and "Reviews that no longer match an image (1)" in page
    assert doc["reviews"][3]["image_uri"] in page and "OUTDATED: the sample&#x27;s cells changed" in page
    assert "0</b> of 2 samples signed off" in page

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
    # Dates classified before verified_differentials existed get it from `review refresh`.
    assert cli.run(["review", "refresh", "--output", out]) == 0
    assert "2024-03-01: 3 sample(s), 1 reviewed cell(s)" in capsys.readouterr().out
    assert {r["run_date"] for r in _delta_verified(out)} == {"2024-03-01", "2024-03-02"}
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


@pytest.fixture(params=["local", "s3"])
def two_dates(request, tmp_path):
    """``(uri, storage_options, cli options)``: the two-date output of test_query_report, local or on moto S3."""
    from test_query_report import build_tree

    if request.param == "local":
        uri, opts = str(tmp_path / "out"), None
    else:
        bucket, opts = request.getfixturevalue("s3_bucket")
        uri = f"{bucket}/out"
    build_tree(uri, opts)
    return uri, opts, (["--endpoint-url", opts["endpoint_url"]] if opts else [])


def _write(tmp_path: Path, name: str, doc: dict) -> str:
    (tmp_path / name).write_text(json.dumps(doc))
    return str(tmp_path / name)


def test_import_checks_each_entry_against_the_date_and_keeps_what_a_rerun_orphaned(two_dates, tmp_path, capsys):
    """A file of the visible run must name its cells; one of a superseded run is matched by content, and what no
    longer matches is kept and reported. The verified table is read by ``deltalake`` alone, on S3 too."""
    import os

    from deltalake import DeltaTable
    from test_query_report import D1, D2, D2_RUN, NEW, OLD

    uri, opts, endpoint = two_dates

    def review(sample: str, i: int, cls: str, when: str = "2024-03-03T08:00:00Z") -> dict:
        return {"sample_id": sample, "image_uri": f"s3://in/{sample}/{i}.jpg", "image_sha256": f"{i:064x}",
                "verified_class": cls, "reviewer": "dr a", "reviewed_at": when}

    def doc(run_date: str, run_id: str, reviews: list, signoffs: list = ()) -> dict:
        return {"format": dec.FORMAT, "run_date": run_date, "run_id": run_id, "reviews": reviews,
                "signoffs": [{"sample_id": s, "reviewer": "dr b", "status": "signed_off",
                              "signed_at": "2024-03-03T09:00:00Z"} for s in signoffs]}

    # Not a cell of the visible run, or the wrong date: one line naming the entry, nothing written.
    bad = _write(tmp_path, "bad.json", doc(D2, D2_RUN, [review("T1", 0, "ig"), review("T1", 7, "ig")]))
    rc, _, err = _cli(capsys, "review", "import", bad, "--output", uri, "--date", D2, *endpoint)
    assert rc == 2 and f"bad.json: reviews[1]: unknown cell 's3://in/T1/7.jpg' (not a prediction of run {D2_RUN})" in err
    rc, _, err = _cli(capsys, "review", "import", bad, "--output", uri, "--date", D1, *endpoint)
    assert rc == 2 and f"decisions for run_date {D2}, not --date {D1}" in err
    assert _rows_on(uri, opts, "SELECT * FROM reviews") == []

    good = _write(tmp_path, "good.json", doc(D2, D2_RUN, [review("T1", 0, "ig"), review("T1", 1, "unidentified")],
                                            ["T1"]))
    rc, printed, _ = _cli(capsys, "review", "import", good, "--output", uri, "--date", D2, *endpoint)
    assert rc == 0 and "imported 2 review(s) and 1 sign-off(s)" in printed

    # Exported from run OLD of D1, since replaced by NEW: S1's cell is still there (same content), S2 is gone.
    late = _write(tmp_path, "late.json", doc(D1, OLD, [review("S1", 2, "basophil"), review("S2", 3, "monocyte")],
                                            ["S1", "S2"]))
    rc, printed, _ = _cli(capsys, "review", "import", late, "--output", uri, "--date", D1, *endpoint)
    assert rc == 0 and "imported 2 review(s) and 2 sign-off(s)" in printed
    assert f"1 review(s) name an image that run {NEW} (which replaced run {OLD}" in printed
    assert "sign-off of sample S2 kept, but run" in printed and "sign-off of sample S1 was made on run" in printed
    statuses = {(r["sample_id"], r["review_status"]) for r in _rows_on(uri, opts, "SELECT * FROM reviews")}
    assert statuses == {("T1", "applied"), ("S1", "applied"), ("S2", "unmatched")}

    # Any Delta reader: deltalake alone, with nothing but the store's address and credentials.
    options = {}
    if opts:
        options = {"AWS_ENDPOINT_URL": opts["endpoint_url"], "AWS_ALLOW_HTTP": "true", "AWS_REGION": "us-east-1",
                   "AWS_ACCESS_KEY_ID": os.environ["AWS_ACCESS_KEY_ID"],
                   "AWS_SECRET_ACCESS_KEY": os.environ["AWS_SECRET_ACCESS_KEY"]}
    table = DeltaTable(f"{uri}/verified_differentials", storage_options=options).to_pyarrow_table().to_pylist()
    got = {(r["run_date"], r["sample_id"]): (r["n_verified"], r["signoff_status"], r["signoff_outdated"])
           for r in table}
    assert got[(D2, "T1")] == (2, "signed_off", False) and got[(D2, "T2")] == (0, None, None)
    # S1 was signed off on the replaced run: kept, shown as outdated.
    assert got[(D1, "S1")] == (1, "signed_off", True)
    t1 = next(r for r in table if r["sample_id"] == "T1")
    assert (t1["count_ig"], t1["reviewers"], t1["signed_off_by"]) == (1, "dr a", "dr b")


def _rows_on(uri: str, opts, sql: str) -> list[dict]:
    con = query.connect(uri, opts)
    try:
        return query.fetch_arrow(con, sql).to_pylist()
    finally:
        con.close()
