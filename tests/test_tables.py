"""The output tables as Delta Lake tables, read back with the format's standard reader.

A real classification run (local Ray cluster) commits a date; a rerun is
crashed between publishing its files and committing them; standard readers
(``deltalake`` -> pyarrow, and DuckDB over that reader) must still see
exactly the first run, and a later rerun must replace the date. The same on
the moto S3 server. Then: a run stopped half-way through its table commits is
completed by the next run of the date, commits of different dates race on S3
without losing one, ``bloodray query --as-of`` reads a superseded run, and
``bloodray vacuum`` deletes what no retained version needs.
"""

from __future__ import annotations

import datetime as dt
import threading
import time

import duckdb
import pyarrow as pa
import pytest
from deltalake import DeltaTable

from bloodray import storage
from bloodray.analysis import query
from bloodray.cli import run as cli_run
from bloodray.config import load_config
from bloodray.data import synth
from bloodray.nightly import commit, contract, pending, tables
from bloodray.nightly.pipeline import ClassifyConfig, plan_run, run_classification, stage_run

DATE = "2024-09-01"


class Crash(BaseException):
    """Stands in for the process dying: not an Exception, so nothing on the way up handles it."""


def _config(archive: str, out: str, so, *extra: str) -> ClassifyConfig:
    endpoint = [f"storage.endpoint_url={so['endpoint_url']}"] if so else []
    return load_config(ClassifyConfig, None, [f"input.uri={archive}", f"output.uri={out}", f"run.date={DATE}",
                                              "inference.batch_size=8", "inference.num_gpus=0", *endpoint, *extra])


def _standard(out: str, so, table: str) -> DeltaTable:
    """The table as any Delta reader opens it: the format's own reader, no bloodray code in the read path."""
    fs, root = contract.output_root(out, so)
    return DeltaTable(storage.full_uri(fs, f"{root}/{table}"), storage_options=tables.delta_storage_options(fs, so))


def _standard_runs(out: str, so, table: str) -> dict[str, int]:
    """``run_id -> rows`` of ``table`` through deltalake's pyarrow dataset, counted by DuckDB."""
    data = _standard(out, so, table).to_pyarrow_dataset()
    con = duckdb.connect()
    con.register("t", data)
    counts = dict(con.execute("SELECT run_id, count(*) FROM t GROUP BY run_id").fetchall())
    con.close()
    return counts


def _plain_glob_rows(out: str, so, table: str) -> int:
    """What a bare Parquet glob sees (not a reader of the format): every file in the folder."""
    fs, root = contract.output_root(out, so)
    files = [f for f in fs.find(f"{root}/{table}") if f.endswith(".parquet") and "/_delta_log/" not in f]
    import pyarrow.parquet as pq

    total = 0
    for f in files:
        with fs.open(f, "rb") as fh:
            total += pq.ParquetFile(fh).metadata.num_rows
    return total


def kill_on_third_table_commit(plan, monkeypatch) -> list[str]:
    """Commit ``plan`` and die as its third table commit starts (thumbnails and errors done); the tables tried."""
    real, calls = tables.commit_files, []

    def dies_on_the_third(*args, **kwargs):
        calls.append(args[1])
        if len(calls) == 3:
            raise Crash()
        return real(*args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(tables, "commit_files", dies_on_the_third)
        with pytest.raises(Crash):
            commit.commit_run(plan)
    return calls


@pytest.fixture(params=["local", "s3"])
def where(request, tmp_path):
    """``(archive, out, storage_options)`` on local disk or on the moto S3 server."""
    if request.param == "local":
        return str(tmp_path / "archive"), str(tmp_path / "out"), None
    bucket, so = request.getfixturevalue("s3_bucket")
    return storage.join(bucket, "archive"), storage.join(bucket, "out"), so


@pytest.mark.slow
def test_crash_between_files_and_commit_leaves_readers_with_the_previous_run(where, ray_cluster, monkeypatch,
                                                                            capsys):
    archive, out, so = where
    synth.write_archive(storage.join(archive, DATE), synth.default_samples(2, 5, seed=41), size=64, seed=41,
                        storage_options=so)
    first = run_classification(_config(archive, out, so))
    assert first.n_predictions == 10
    assert _standard_runs(out, so, "predictions") == {first.run_id: 10}
    before_rerun = dt.datetime.now(dt.timezone.utc)
    time.sleep(1.1)  # Delta time travel resolves commit times to the millisecond; keep the versions apart

    # The rerun dies after its files are in place and before its commit; a dead process cleans nothing up.
    plan = plan_run(_config(archive, out, so))
    stage_run(plan)
    with monkeypatch.context() as m:
        m.setattr(tables, "write_intent", lambda *a, **k: (_ for _ in ()).throw(Crash()))
        m.setattr(commit, "discard_run", lambda plan: None)
        with pytest.raises(Crash):
            commit.commit_run(plan)
    fs, root = contract.output_root(out, so)
    fs.invalidate_cache()
    assert fs.exists(contract.partition_dir(root, "predictions", DATE, plan.run_id))
    assert _plain_glob_rows(out, so, "predictions") == 20  # the crashed run's files are there...
    for table in ("predictions", "differentials", "thumbnails"):  # ...and no Delta reader sees them
        assert set(_standard_runs(out, so, table)) == {first.run_id}, table
    assert _standard_runs(out, so, "runs") == {first.run_id: 1}
    assert set(query.read_table(out, "predictions", so).column("run_id").to_pylist()) == {first.run_id}
    plan.lease.release()  # as its expiry would

    # A rerun replaces the date in one commit per table.
    rerun = run_classification(_config(archive, out, so))
    assert _standard_runs(out, so, "predictions") == {rerun.run_id: 10}
    assert set(_standard_runs(out, so, "differentials")) == {rerun.run_id}
    assert set(_standard_runs(out, so, "runs")) == {first.run_id, rerun.run_id}  # the history of what ran
    ops = [h["operation"] for h in _standard(out, so, "predictions").history()]
    assert ops == ["WRITE", "WRITE", "CREATE TABLE"]  # newest first: the rerun's single commit replaced the date
    assert not fs.exists(contract.partition_dir(root, "predictions", DATE, plan.run_id))  # crashed run cleaned up

    # Time travel: the superseded run is still there, and the CLI reads it.
    assert cli_run(["query", "SELECT DISTINCT run_id FROM predictions", "--output", out, "--format", "csv",
                    "--as-of", before_rerun.isoformat(), *(["--endpoint-url", so["endpoint_url"]] if so else [])]) == 0
    assert capsys.readouterr().out.split() == ["run_id", first.run_id]
    con = query.connect(out, so, as_of=before_rerun)
    try:
        assert con.execute("SELECT run_id FROM runs").fetchall() == [(first.run_id,)]
    finally:
        con.close()

    # Vacuum: the superseded run's files go; the current version still reads.
    assert cli_run(["vacuum", "--output", out, "--retain-hours", "0", "--dry-run",
                    *(["--endpoint-url", so["endpoint_url"]] if so else [])]) == 0
    assert "predictions: would delete 1 file(s)" in capsys.readouterr().out
    deleted = pending.vacuum(out, so, retain_hours=0).deleted
    assert len(deleted["predictions"]) == 1 and len(deleted["thumbnails"]) == 1
    fs.invalidate_cache()
    gone = contract.partition_dir(root, "predictions", DATE, first.run_id)
    assert not (fs.exists(gone) and fs.find(gone))
    assert _standard_runs(out, so, "predictions") == {rerun.run_id: 10}
    assert _plain_glob_rows(out, so, "predictions") == 10


@pytest.mark.slow
def test_a_run_stopped_between_table_commits_is_completed_by_the_next_run(tmp_path, ray_cluster, monkeypatch,
                                                                         caplog):
    archive, out = str(tmp_path / "archive"), str(tmp_path / "out")
    synth.write_archive(storage.join(archive, DATE), synth.default_samples(2, 3, seed=42), size=64, seed=42)
    first = run_classification(_config(archive, out, None))

    plan = plan_run(_config(archive, out, None))
    stage_run(plan)
    assert kill_on_third_table_commit(plan, monkeypatch) == ["thumbnails", "errors", "predictions"]
    # Past the commit point: thumbnails and errors have the new run, predictions and runs the old one.
    assert [i["run_id"] for i in tables.pending_intents(out)] == [plan.run_id]
    assert set(_standard_runs(out, None, "thumbnails")) == {plan.run_id}
    assert tables.is_committed(out, "errors", plan.run_id)
    assert set(_standard_runs(out, None, "predictions")) == {first.run_id}
    assert not tables.is_committed(out, "runs", plan.run_id)
    with caplog.at_level("WARNING", logger="bloodray.analysis.query"):
        query.connect(out).close()
    assert f"run {plan.run_id} of {DATE} stopped half-way through its commit" in caplog.text

    # The next run of the date completes it before anything else, under the date's lease.
    nxt = plan_run(_config(archive, out, None))
    try:
        assert tables.pending_intents(out) == []
        for table in ("thumbnails", "errors", "predictions", "differentials", "runs"):
            assert tables.is_committed(out, table, plan.run_id), table
        for table in ("thumbnails", "predictions", "differentials"):  # errors: this archive has no bad image
            assert set(_standard_runs(out, None, table)) == {plan.run_id}, table
        assert tables.visible_runs(out).column("run_id").to_pylist() == [plan.run_id]
    finally:
        commit.discard_run(nxt)


def test_commits_of_different_dates_race_on_s3_without_losing_one(s3_bucket):
    bucket, so = s3_bucket
    out = storage.join(bucket, "race")
    fs, root = contract.output_root(out, so)
    dates = [f"2024-10-{d:02d}" for d in range(1, 7)]
    for i, date in enumerate(dates):
        path = contract.manifest_path(root, date, f"run-{i}")
        row = {"run_id": f"run-{i}", "status": contract.COMMITTED, "committed_at": dt.datetime.now(dt.timezone.utc)}
        storage.put_bytes(fs, path, storage.parquet_bytes(pa.Table.from_pylist([row], schema=contract.runs_schema())))
    errors: list[BaseException] = []
    start = threading.Barrier(len(dates))

    def writer(i: int, date: str) -> None:
        try:
            start.wait()
            tables.commit_files(out, contract.RUNS, date, f"run-{i}", [contract.manifest_path(root, date, f"run-{i}")],
                                replace_date=False, storage_options=so)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(i, d)) for i, d in enumerate(dates)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert errors == []
    runs = tables.committed_runs(out, so)
    assert sorted(runs.column("run_date").to_pylist()) == dates
    # One log entry per commit, none lost or overwritten. (Writers that find no table all create it: a late
    # creator's CREATE TABLE, same schema, may land between the writes; the writes it raced retry.)
    history = _standard(out, so, "runs").history()
    writes = [h["version"] for h in history if h["operation"] == "WRITE"]
    assert len(set(writes)) == len(dates)
    assert {h["operation"] for h in history} == {"WRITE", "CREATE TABLE"}
    # Idempotent per run: committing a run again is a no-op, not a duplicate row.
    assert tables.commit_files(out, contract.RUNS, dates[0], "run-0", [contract.manifest_path(root, dates[0], "run-0")],
                               replace_date=False, storage_options=so) is False
    assert tables.committed_runs(out, so).num_rows == len(dates)


def test_a_pre_delta_output_root_is_refused_then_upgraded_in_place(tmp_path, capsys):
    from test_query_report import D1, D2, NEW, OLD, D2_RUN, build_tree

    out = str(tmp_path / "out")
    expected = build_tree(out, delta=False)  # the layout bloodray wrote before: manifests, no Delta log
    with pytest.raises(storage.StorageError, match=r"older bloodray .*bloodray upgrade-output --output"):
        query.connect(out)
    assert cli_run(["query", "SELECT 1", "--output", out]) == 2
    assert "bloodray upgrade-output --output" in capsys.readouterr().err

    assert cli_run(["upgrade-output", "--output", out]) == 0
    assert "committed 2 date(s), 3 run manifest(s)" in capsys.readouterr().out
    # What the old readers showed, now through the Delta log: the visible run of each date, all manifests.
    assert tables.visible_runs(out).column("run_id").to_pylist() == [NEW, D2_RUN]
    assert sorted(tables.committed_runs(out).column("run_id").to_pylist()) == sorted([OLD, NEW, D2_RUN])
    preds = query.read_table(out, "predictions")
    # The views' run_date is a date (stored as text).
    assert {d: preds.filter(pa.compute.equal(preds.column("run_date"), dt.date.fromisoformat(d))).num_rows
            for d in (D1, D2)} == expected["predictions"]
    assert set(_standard_runs(out, None, "predictions")) == {NEW, D2_RUN}
    # Idempotent: a second upgrade commits nothing.
    from bloodray.nightly.legacy import upgrade_output

    assert upgrade_output(out) == {"runs": 0, "dates": 0, "reviews": 0}
    assert _standard(out, None, "runs").version() == 3  # create + three manifests, no more
