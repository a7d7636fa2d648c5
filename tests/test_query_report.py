"""DuckDB views and the HTML report over an output tree written in the contract layout.

The tree is written here with pyarrow and committed with the Delta layer
(:mod:`bloodray.nightly.tables`), not by the classification job, so these
tests pin the contract itself: only the visible (latest committed) run of each
date shows; uncommitted runs, superseded runs and ``_staging/`` never do.
"""

from __future__ import annotations

import datetime as dt
import json
import base64
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bloodray import storage

from bloodray.analysis import query as query

from bloodray.analysis import report as report
from bloodray.classes import CLASS_NAMES, DIFFERENTIAL_CLASSES, reference_ranges
from bloodray.nightly import tables

D1, D2 = "2024-03-01", "2024-03-02"
#: The same dates as the views show them: ``run_date`` is a DATE where readers see it (stored as text).
DAY1, DAY2 = dt.date.fromisoformat(D1), dt.date.fromisoformat(D2)
OLD, NEW, UNCOMMITTED, D2_RUN = "run-d1-old", "run-d1-new", "run-d1-uncommitted", "run-d2"
FLAGGED_SAMPLE = "S-high&neut"  # "&" checks HTML escaping


def _ts(hour: int) -> dt.datetime:
    return dt.datetime(2024, 3, 1, hour, tzinfo=dt.timezone.utc)


def _predictions(run_id: str, samples: list[str], per_sample: int, review_every: int = 3) -> pa.Table:
    rows = []
    for s in samples:
        for i in range(per_sample):
            cls = CLASS_NAMES[i % len(CLASS_NAMES)]
            row = {"run_id": run_id, "sample_id": s, "image_uri": f"s3://in/{s}/{i}.jpg",
                   "image_sha256": f"{i:064x}", "predicted_class": cls}
            row.update({f"prob_{c}": (0.9 if c == cls else 0.1 / 7) for c in CLASS_NAMES})
            rows.append(row)
    t = pa.Table.from_pylist(rows)
    n = t.num_rows
    t = t.append_column("confidence", pa.array([0.9 - 0.05 * (i % 5) for i in range(n)], pa.float32()))
    t = t.append_column("needs_review", pa.array([i % review_every == 0 for i in range(n)]))
    t = t.append_column("model_name", pa.array(["bloodnet"] * n))
    return t.append_column("checkpoint_id", pa.array(["ck-1"] * n))


def _differential(run_id: str, sample: str, pct: dict[str, float], n_wbc: int = 200) -> dict:
    ref = reference_ranges()
    row = {"run_id": run_id, "sample_id": sample, "n_images": n_wbc + 10, "n_classified": n_wbc + 8,
           "n_errors": 2, "n_review": 12}
    row.update({f"count_{c}": 1 for c in CLASS_NAMES})
    row.update({f"pct_{c}": pct[c] for c in DIFFERENTIAL_CLASSES})
    row.update({"ig_per_100_wbc": 0.0, "erythroblast_per_100_wbc": 0.0, "platelet_count": 5, "n_wbc": n_wbc})
    flags = []
    for c in DIFFERENTIAL_CLASSES:
        row[f"flag_{c}_low"] = pct[c] < ref[c].low
        row[f"flag_{c}_high"] = pct[c] > ref[c].high
        flags += [f"{c}_low"] * row[f"flag_{c}_low"] + [f"{c}_high"] * row[f"flag_{c}_high"]
    row.update({"flag_erythroblasts": False, "flag_ig": False, "flag_low_wbc_count": n_wbc < 100})
    if n_wbc < 100:
        flags.append("low_wbc_count")
    row.update({"flags": flags, "any_flag": bool(flags)})
    return row


NORMAL = {"neutrophil": 55.0, "lymphocyte": 30.0, "monocyte": 6.0, "eosinophil": 2.0, "basophil": 0.7}
ABNORMAL = {"neutrophil": 80.0, "lymphocyte": 12.0, "monocyte": 6.0, "eosinophil": 2.0, "basophil": 0.7}


def _errors(run_id: str, kinds: list[tuple[str, str]]) -> pa.Table:
    return pa.Table.from_pylist([
        {"run_id": run_id, "sample_id": "S1", "image_uri": f"s3://in/S1/bad{i}.jpg", "stage": stage,
         "error_type": etype, "message": f"cannot decode <img {i}>"}
        for i, (stage, etype) in enumerate(kinds)
    ])


def _manifest(run_id: str, run_date: str, committed: dt.datetime, n_pred: int, n_err: int, n_samples: int) -> pa.Table:
    return pa.table({
        "run_id": [run_id], "run_date": [run_date], "status": ["committed"],
        "started_at": pa.array([committed - dt.timedelta(minutes=5)], pa.timestamp("us", tz="UTC")),
        "committed_at": pa.array([committed], pa.timestamp("us", tz="UTC")),
        "checkpoint": ["s3://models/bloodnet/best"], "checkpoint_id": ["ck-1"], "model_name": ["bloodnet"],
        "input_uri": ["s3://in"], "output_uri": ["s3://out"], "config_yaml": ["batch_size: 8\n"],
        "n_inputs": [n_pred + n_err], "n_predictions": [n_pred], "n_errors": [n_err], "n_samples": [n_samples],
        "n_review": [4], "timings_json": [json.dumps({"read": 1.5, "infer": {"total": 12.25}})],
        "incremental_skipped_samples": [0],
    })


def build_tree(root: str, storage_options=None, *, with_errors: bool = True, delta: bool = True) -> dict:
    """Write a two-date output tree; returns the expected visible counts.

    ``delta=False`` writes the pre-Delta layout (manifest files, no Delta log), as bloodray did before.
    """
    fs, base = storage.filesystem(root, storage_options)
    base = base.rstrip("/")

    def put(rel: str, table: pa.Table) -> None:
        path = f"{base}/{rel}"
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        with fs.open(path, "wb") as f:
            pq.write_table(table, f)

    def commit(run_id: str, run_date: str) -> None:
        """Commit every file of the run to its tables, the manifest last (as the classify job does)."""
        if not delta:
            return
        for table in ("predictions", "errors", "differentials", "runs"):
            files = [p for p in fs.find(f"{base}/{table}/run_date={run_date}")
                     if (f"/{run_id}/part-" in p or p.endswith(f"/{run_id}.parquet"))]
            if files:
                tables.commit_files(root, table, run_date, run_id, files, replace_date=table != "runs",
                                    storage_options=storage_options)

    # Date 1: an older committed run, superseded by a newer one.
    put(f"predictions/run_date={D1}/{OLD}/part-0.parquet", _predictions(OLD, ["S1", "S2"], 7))
    put(f"differentials/run_date={D1}/{OLD}/part-0.parquet",
        pa.Table.from_pylist([_differential(OLD, "S1", NORMAL), _differential(OLD, "S2", NORMAL)]))
    if with_errors:
        put(f"errors/run_date={D1}/{OLD}/part-0.parquet", _errors(OLD, [("decode", "OSError")] * 5))
    put(f"runs/run_date={D1}/{OLD}.parquet", _manifest(OLD, D1, _ts(1), 14, 5, 2).drop_columns(["run_date"]))
    commit(OLD, D1)

    # The newer run writes two part files; the second lacks a column the first
    # has (union_by_name must fill NULLs, not fail).
    new_pred = _predictions(NEW, ["S1", FLAGGED_SAMPLE, "S3"], 4)
    put(f"predictions/run_date={D1}/{NEW}/part-0.parquet", new_pred.slice(0, 5))
    put(f"predictions/run_date={D1}/{NEW}/part-1.parquet", new_pred.slice(5).drop_columns(["image_sha256"]))
    put(f"differentials/run_date={D1}/{NEW}/part-0.parquet", pa.Table.from_pylist([
        _differential(NEW, "S1", NORMAL), _differential(NEW, FLAGGED_SAMPLE, ABNORMAL),
        _differential(NEW, "S3", NORMAL, n_wbc=40)]))
    if with_errors:
        put(f"errors/run_date={D1}/{NEW}/part-0.parquet",
            _errors(NEW, [("decode", "OSError"), ("decode", "OSError"), ("preprocess", "ValueError")]))
    put(f"runs/run_date={D1}/{NEW}.parquet",
        _manifest(NEW, D1, _ts(2), 12, 3 if with_errors else 0, 3).drop_columns(["run_date"]))
    commit(NEW, D1)

    # An uncommitted (crashed or still running) later run: data, no manifest.
    put(f"predictions/run_date={D1}/{UNCOMMITTED}/part-0.parquet", _predictions(UNCOMMITTED, ["S1"], 50))
    put(f"differentials/run_date={D1}/{UNCOMMITTED}/part-0.parquet",
        pa.Table.from_pylist([_differential(UNCOMMITTED, "S1", ABNORMAL)]))
    # Staging junk, including files that carry the visible run's id.
    put(f"_staging/{UNCOMMITTED}/predictions/part-0.parquet", _predictions(UNCOMMITTED, ["S9"], 9))
    put(f"predictions/run_date={D1}/_staging/part-0.parquet", _predictions(NEW, ["S9"], 9))
    put(f"predictions/run_date={D1}/{NEW}/_tmp-part-2.parquet", _predictions(NEW, ["S9"], 9))
    put(f"runs/_staging/{UNCOMMITTED}.parquet", _manifest(UNCOMMITTED, D1, _ts(5), 50, 0, 1))

    # Date 2: one committed run without any error.
    put(f"predictions/run_date={D2}/{D2_RUN}/part-0.parquet", _predictions(D2_RUN, ["T1", "T2"], 3))
    put(f"differentials/run_date={D2}/{D2_RUN}/part-0.parquet",
        pa.Table.from_pylist([_differential(D2_RUN, "T1", NORMAL), _differential(D2_RUN, "T2", NORMAL)]))
    # run_date is a Delta partition column: in the log and the path, never in the files.
    put(f"runs/run_date={D2}/{D2_RUN}.parquet",
        _manifest(D2_RUN, D2, _ts(3) + dt.timedelta(days=1), 6, 0, 2).drop_columns(["run_date"]))
    commit(D2_RUN, D2)
    return {"predictions": {D1: 12, D2: 6}, "differentials": {D1: 3, D2: 2},
            "errors": {D1: 3 if with_errors else 0}}


@pytest.fixture(params=["local", "s3"])
def output_root(request, tmp_path):
    """``(uri, storage_options, expected)`` for a tree on local disk or on the moto S3 server."""
    if request.param == "local":
        uri, opts = str(tmp_path / "out"), None
    else:
        bucket_uri, opts = request.getfixturevalue("s3_bucket")
        uri = f"{bucket_uri}/nightly/out"
    return uri, opts, build_tree(uri, opts)


def test_views_show_only_visible_runs(output_root):
    uri, opts, expected = output_root
    con = query.connect(uri, opts)
    try:
        runs = con.execute("SELECT run_date, run_id FROM runs ORDER BY run_date").fetchall()
        assert runs == [(DAY1, NEW), (DAY2, D2_RUN)]
        all_runs = con.execute("SELECT run_id FROM all_runs ORDER BY committed_at").fetchall()
        assert [r[0] for r in all_runs] == [OLD, NEW, D2_RUN]

        for table, per_date in expected.items():
            got = dict(con.execute(f"SELECT run_date, count(*) FROM {table} GROUP BY 1").fetchall())
            assert got == {dt.date.fromisoformat(d): n for d, n in per_date.items() if n}, table
            ids = {r[0] for r in con.execute(f"SELECT DISTINCT run_id FROM {table}").fetchall()}
            assert ids <= {NEW, D2_RUN}, table
        # Counts agree with the manifests of the visible runs.
        assert con.execute("SELECT sum(n_predictions) FROM runs").fetchone()[0] == 18
        assert con.execute("SELECT count(*) FROM predictions WHERE sample_id = 'S9'").fetchone()[0] == 0
        # union_by_name: the part file without image_sha256 reads as NULLs.
        assert con.execute("SELECT count(*) FROM predictions WHERE image_sha256 IS NULL").fetchone()[0] == 7
        types = dict(con.execute("SELECT column_name, column_type FROM (DESCRIBE predictions)").fetchall())
        assert types["run_date"] == "DATE" and types["confidence"] == "FLOAT"
        flagged = con.execute("SELECT sample_id, flags FROM differentials WHERE any_flag ORDER BY 1").fetchall()
        assert flagged == [(FLAGGED_SAMPLE, ["neutrophil_high", "lymphocyte_low"]), ("S3", ["low_wbc_count"])]
        # Views join on run_date/run_id like any tables.
        joined = con.execute(
            "SELECT r.run_id, count(*) FROM predictions p JOIN runs r USING (run_date, run_id) GROUP BY 1 ORDER BY 1"
        ).fetchall()
        assert joined == [(NEW, 12), (D2_RUN, 6)]
    finally:
        con.close()


def test_run_query_read_table_and_formats(output_root):
    uri, opts, _ = output_root
    table = query.run_query(uri, "SELECT error_type, count(*) AS n FROM errors GROUP BY 1 ORDER BY 1", opts)
    assert isinstance(table, pa.Table)
    assert table.to_pylist() == [{"error_type": "OSError", "n": 2}, {"error_type": "ValueError", "n": 1}]

    diffs = query.read_table(uri, "differentials", opts, run_date=D2)
    assert diffs.num_rows == 2 and set(diffs.column("run_date").to_pylist()) == {DAY2}
    assert diffs.schema.field("run_date").type == pa.date32()
    preds = query.read_table(uri, "predictions", opts)
    assert preds.num_rows == 18 and "run_date" in preds.column_names
    assert query.read_table(uri, "errors", opts, run_date=D2).num_rows == 0

    sql = "SELECT run_date, run_id, n_predictions, committed_at FROM runs ORDER BY run_date"
    text = query.query_main(uri, sql, opts)
    assert NEW in text and D2_RUN in text and OLD not in text and "(2 rows)" in text
    csv_text = query.query_main(uri, sql, opts, fmt="csv")
    assert csv_text.splitlines()[0] == "run_date,run_id,n_predictions,committed_at"
    assert csv_text.splitlines()[1].startswith(f"{D1},{NEW},12,2024-03-01T02:00:00")
    rows = json.loads(query.query_main(uri, "SELECT sample_id, flags, confidence FROM differentials "
                                             "JOIN (SELECT 0.9::FLOAT AS confidence) ON true WHERE any_flag "
                                             "ORDER BY 1", opts, fmt="json"))
    assert rows[0] == {"sample_id": FLAGGED_SAMPLE, "flags": ["neutrophil_high", "lymphocyte_low"],
                       "confidence": 0.9}
    with pytest.raises(query.QueryError, match=re.escape(uri)):
        query.run_query(uri, "SELECT nope FROM predictions", opts)


def test_report(output_root, tmp_path):
    uri, opts, _ = output_root
    out = report.write_report(uri, storage_options=opts)
    assert out == storage.join(uri, "reports", f"run_date={D2}", "report.html")

    out = report.write_report(uri, run_date=D1, storage_options=opts)
    fs, path = storage.filesystem(out, opts)
    fs.invalidate_cache()
    page = fs.cat_file(path).decode("utf-8")
    folder = path.rsplit("/", 1)[0]
    # One self-contained file: every figure is a data: URI, nothing else is written beside it.
    images = re.findall(r"<img class=fig src='data:image/png;base64,([^']+)' alt='([^']+)'", page)
    alts = {alt for _, alt in images}
    assert {"WBC differential against reference ranges", "Number of samples per flag",
            "Share of images needing review per sample"} <= alts
    for data, _ in images:
        assert base64.b64decode(data)[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.rsplit("/", 1)[-1] for p in fs.ls(folder, detail=False)] == ["report.html"]
    page = re.sub(r"data:image/[a-z]+;base64,[^'\"]+", "data:", page)  # base64 holds any short text by chance
    assert '<meta name=viewport content="width=device-width, initial-scale=1">' in page
    assert "Research use only" in page
    assert page.index("Sample S-high&amp;neut") < page.index("Engineering details")
    assert NEW in page and OLD in page  # OLD only as "superseded"
    assert UNCOMMITTED not in page and "S9" not in page
    assert "S-high&amp;neut" in page and "S-high&neut" not in page
    assert "neutrophil_high" in page and "low_wbc_count" in page
    assert "Flagged samples (2 of 3)" in page
    assert "ValueError" in page and "&lt;img 0&gt;" in page
    assert "<script" not in page

    # A destination elsewhere (local, whatever the root is).
    local = report.write_report(uri, run_date=D2, dest=str(tmp_path / "rep"), storage_options=opts)
    assert (tmp_path / "rep" / "report.html").read_text().count("T1") >= 1
    assert local == str(tmp_path / "rep" / "report.html")
    with pytest.raises(report.ReportError, match="2099-01-01"):
        report.write_report(uri, run_date="2099-01-01", storage_options=opts)


def test_tables_without_files_give_empty_views(tmp_path):
    uri = str(tmp_path / "out")
    build_tree(uri, with_errors=False)
    con = query.connect(uri)
    try:
        assert con.execute("SELECT count(*), count(sample_id) FROM errors").fetchone() == (0, 0)
        cols = [r[0] for r in con.execute("DESCRIBE errors").fetchall()]
        assert cols == ["run_id", "sample_id", "image_uri", "stage", "error_type", "message", "run_date"]
    finally:
        con.close()
    assert "No errors." in open(report.write_report(uri, storage_options=None)).read()

    # A root with nothing committed yet: every view exists and is empty.
    fresh = tmp_path / "fresh"
    (fresh / "predictions" / f"run_date={D1}" / UNCOMMITTED).mkdir(parents=True)
    pq.write_table(_predictions(UNCOMMITTED, ["S1"], 2),
                   fresh / "predictions" / f"run_date={D1}" / UNCOMMITTED / "part-0.parquet")
    for view in query.VIEWS:
        assert query.read_table(str(fresh), view).num_rows == 0
    with pytest.raises(report.ReportError, match="no committed run"):
        report.write_report(str(fresh))


def test_missing_root_names_the_uri(tmp_path, s3_bucket):
    missing = str(tmp_path / "does-not-exist")
    with pytest.raises(storage.StorageError, match=re.escape(missing)):
        query.query_main(missing, "SELECT * FROM runs", None)
    bucket_uri, opts = s3_bucket
    missing = f"{bucket_uri}/no/such/prefix"
    with pytest.raises(storage.StorageError, match=re.escape(missing)):
        query.run_query(missing, "SELECT * FROM runs", opts)
    with pytest.raises(ValueError, match="unknown table"):
        query.read_table(str(tmp_path), "runs; DROP TABLE x")


def test_torn_uncommitted_manifest_is_invisible(tmp_path):
    uri = str(tmp_path / "out")
    build_tree(uri)
    # A later run whose manifest write was cut short (before its Delta commit) must not hide the visible
    # run or break the views: no Delta version lists the file.
    torn = tmp_path / "out" / "runs" / f"run_date={D1}" / f"{UNCOMMITTED}.parquet"
    torn.write_bytes(b"PAR1 not really parquet")
    table = query.run_query(uri, "SELECT run_date, run_id FROM runs ORDER BY run_date")
    assert table.to_pylist() == [{"run_date": DAY1, "run_id": NEW}, {"run_date": DAY2, "run_id": D2_RUN}]


def test_views_list_no_internal_objects_and_carry_the_clearer_names(tmp_path):
    """`SHOW TABLES` lists exactly the public views; the clearer column names (issue 24) equal the stored columns
    they replace, which stay beside them for one release."""
    from deltalake import DeltaTable

    from bloodray.nightly.dictionary import ALIASES, comment

    uri = str(tmp_path / "out")
    build_tree(uri)
    # The data dictionary travels in the Delta schema as column comments, for any Delta reader.
    schema = json.loads(DeltaTable(f"{uri}/differentials").schema().to_json())
    fields = {f["name"]: f["metadata"] for f in schema["fields"]}
    assert fields["platelet_count"]["comment"] == comment("differentials", "platelet_count")
    assert "not a blood platelet count per litre" in fields["platelet_count"]["comment"]
    con = query.connect(uri)
    try:
        # The views scan their datasets directly, and the review views' helper tables live outside the search path.
        assert sorted(r[0] for r in con.execute("SHOW TABLES").fetchall()) == sorted(query.VIEWS)
        for view, aliases in ALIASES.items():
            columns = {r[0] for r in con.execute(f"DESCRIBE {view}").fetchall()}
            for new, expr, old in aliases:
                assert {new, old} <= columns, view
                differ = con.execute(f"SELECT count(*) FROM {view} WHERE {new} IS DISTINCT FROM {expr}").fetchone()[0]
                assert differ == 0, (view, new)
        assert con.execute("SELECT DISTINCT n_platelet_images FROM differentials").fetchall() == [(5,)]
    finally:
        con.close()
    empty = tmp_path / "empty"
    (empty / "runs").mkdir(parents=True)
    con = query.connect(str(empty))
    try:
        assert {r[0] for r in con.execute("DESCRIBE differentials").fetchall()} >= {"n_platelet_images",
                                                                                    "pct_unidentified"}
    finally:
        con.close()


def test_run_date_is_a_date_for_readers_and_old_string_comparisons_still_work(tmp_path):
    """Issue 24: every view shows ``run_date`` as a DATE (stored as text, the Delta partition value), so date
    arithmetic works; queries written when it was text keep working where they compare with a string; a filter on
    the date still reads only that date's files."""
    from deltalake import DeltaTable

    uri = str(tmp_path / "out")
    build_tree(uri)
    # Stored as before (text), so tables written by any bloodray need no rewrite.
    stored = DeltaTable(f"{uri}/predictions").schema().to_arrow()
    assert pa.schema(stored).field("run_date").type in (pa.string(), pa.large_string(), pa.string_view())
    con = query.connect(uri)
    try:
        for view in query.VIEWS:
            types = dict(con.execute(f"SELECT column_name, column_type FROM (DESCRIBE {view})").fetchall())
            assert types["run_date"] == "DATE", view
        next_days = con.execute("SELECT run_date + 1 FROM runs ORDER BY 1").fetchall()
        assert next_days == [(DAY2,), (DAY2 + dt.timedelta(days=1),)]
        assert con.execute("SELECT max(run_date) - min(run_date) FROM predictions").fetchone()[0] == 1
        # Written against text: a string literal or parameter compared with a DATE is cast to a date.
        old_style = {
            f"run_date = '{D2}'": 6, f"run_date <> '{D2}'": 12, f"run_date >= '{D2}'": 6,
            f"run_date IN ('{D1}', '{D2}')": 18, f"run_date BETWEEN '{D1}' AND '{D1}'": 12,
            f"run_date = DATE '{D1}'": 12, f"run_date::VARCHAR LIKE '2024-03-0%'": 18,
            f"strftime(run_date, '%Y-%m') = '2024-03'": 18, "run_date = current_date": 0}
        for where, n in old_style.items():
            assert con.execute(f"SELECT count(*) FROM predictions WHERE {where}").fetchone()[0] == n, where
        assert con.execute("SELECT count(*) FROM predictions WHERE run_date = ?", [D1]).fetchone()[0] == 12
        # A string function on the date needs the cast written out (the guide says so).
        with pytest.raises(Exception, match="(?i)LIKE|~~|no function matches"):
            con.execute("SELECT count(*) FROM predictions WHERE run_date LIKE '2024-03-0%'").fetchall()
    finally:
        con.close()
    assert query.run_query(uri, f"SELECT n_predictions FROM runs WHERE run_date = '{D2}'").to_pylist() == [
        {"n_predictions": 6}]
    # The partition values are read typed, so the date filter still prunes: with D1's files gone, D2 reads fine.
    for path in (tmp_path / "out" / "predictions" / f"run_date={D1}").rglob("*.parquet"):
        path.unlink()
    assert query.run_query(uri, f"SELECT count(*) AS n FROM predictions WHERE run_date = '{D2}'").to_pylist() == [
        {"n": 6}]
    with pytest.raises(query.QueryError, match="missing"):
        query.run_query(uri, "SELECT count(*) FROM predictions")


def test_date_options_are_checked_as_dates(tmp_path, capsys):
    """``--date`` of ``report`` and ``review`` is a date (the views' ``run_date`` is one): a word is refused by the
    parser with one line naming the option, before anything is read; ``write_report`` refuses it the same way."""
    from bloodray import cli

    uri = str(tmp_path / "out")
    build_tree(uri)
    for argv in (["report", "--output", uri, "--date", "yesterday"],
                 ["review", "export", "--output", uri, "--date", "2024-13-01", "--dest", str(tmp_path / "r")],
                 ["review", "refresh", "--output", uri, "--date", "last-night"]):
        with pytest.raises(SystemExit) as info:
            cli.run(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert info.value.code == 2 and "argument --date" in err[-1] and "give YYYY-MM-DD" in err[-1], argv
    with pytest.raises(report.ReportError, match="not a date"):
        report.write_report(uri, run_date="yesterday")
    # A date object is as good as its text.
    assert report.write_report(uri, run_date=DAY2, dest=str(tmp_path / "rep")).endswith("report.html")
