"""What a pending commit, a live lease or an interrupted upgrade holds is never lost (issue 23, items 1, 2, 10, 11).

- ``bloodray vacuum`` keeps every file a pending commit intent (``_commits/``)
  or a live lease still needs: a run killed between its table commits stays
  completable after a default vacuum seven days later and after
  ``--retain-hours 0``, and a vacuum in the middle of a classify's commit
  leaves it whole (real Ray runs, the kill points of ``test_tables.py``);
- an interrupted ``upgrade-output`` is named by every reader and by vacuum,
  and nothing it has not committed yet (legacy review files) is deleted;
- readers that meet a commit in progress say so, and tell a live commit
  (lease held) from one that stopped half-way;
- a garbage lease file is named when taken over; time travel to a version
  whose files vacuum deleted is one line, not a raw IOError.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bloodray import storage
from bloodray.analysis import query, report
from bloodray.cli import run as cli_run
from bloodray.data import synth
from bloodray.nightly import commit, contract, lease, pending, tables
from bloodray.nightly.legacy import LegacyOutputError, upgrade_output
from bloodray.nightly.pipeline import plan_run, run_classification, stage_run
from bloodray.review import roundtrip
from test_query_report import D1, D2, D2_RUN, NEW, OLD, UNCOMMITTED, _manifest, _predictions, _ts, build_tree
from test_tables import DATE, Crash, _config, _standard_runs, kill_on_third_table_commit, where  # noqa: F401 (fixture)

EIGHT_DAYS = 8 * 24 * 3600


def _age(paths, seconds: float) -> None:
    """Make local files look ``seconds`` old (what a vacuum a week after a crash sees)."""
    then = time.time() - seconds
    for path in paths:
        os.utime(path, (then, then))


def _run_files(root: str, run_date: str, run_id: str) -> list[str]:
    """Local paths of every data file and the manifest file of one run."""
    found = []
    for table in contract.TABLES:
        d = contract.partition_dir(root, table, run_date, run_id)
        if os.path.isdir(d):
            found += [os.path.join(d, f) for f in os.listdir(d)]
    manifest = contract.manifest_path(root, run_date, run_id)
    return found + ([manifest] if os.path.exists(manifest) else [])


# --------------------------------------------------------------------------- item 1: vacuum and pending commits
@pytest.mark.slow
def test_a_run_killed_between_table_commits_stays_completable_after_any_vacuum(tmp_path, ray_cluster, monkeypatch,
                                                                              capsys):
    archive, out = str(tmp_path / "archive"), str(tmp_path / "out")
    synth.write_archive(storage.join(archive, DATE), synth.default_samples(2, 3, seed=43), size=64, seed=43)
    first = run_classification(_config(archive, out, None))
    plan = plan_run(_config(archive, out, None))
    stage_run(plan)
    kill_on_third_table_commit(plan, monkeypatch)  # the kill point of test_tables: after thumbnails and errors
    root = out
    crashed = _run_files(root, DATE, plan.run_id)
    assert len(crashed) == 5  # four tables and the manifest
    # A week later: the crashed run's files are older than the default retention.
    _age(crashed, EIGHT_DAYS)
    for argv in (["vacuum", "--output", out], ["vacuum", "--output", out, "--retain-hours", "0"]):
        assert cli_run(argv) == 0
        printed = capsys.readouterr().out
        assert all(os.path.exists(p) for p in crashed), (argv, printed)
        assert "kept" in printed and plan.run_id in printed, printed
    # The next run of the date completes the commit: every table has the crashed run, nothing disagrees.
    nxt = plan_run(_config(archive, out, None))
    try:
        assert tables.pending_intents(out) == []
        for table in ("thumbnails", "predictions", "differentials"):
            assert set(_standard_runs(out, None, table)) == {plan.run_id}, table
        assert tables.visible_runs(out).column("run_id").to_pylist() == [plan.run_id]
        assert first.run_id in tables.committed_runs(out).column("run_id").to_pylist()
    finally:
        commit.discard_run(nxt)


@pytest.mark.slow
def test_a_vacuum_during_a_classify_commit_leaves_the_commit_whole(where, ray_cluster, monkeypatch):
    archive, out, so = where
    synth.write_archive(storage.join(archive, DATE), synth.default_samples(2, 3, seed=44), size=64, seed=44,
                        storage_options=so)
    first = run_classification(_config(archive, out, so))
    plan = plan_run(_config(archive, out, so))
    stage_run(plan)
    vacuumed: list[dict] = []
    real_intent, real_commit = tables.write_intent, tables.commit_files

    def vacuum_now() -> None:
        vacuumed.append(pending.vacuum(out, so, retain_hours=0).deleted)

    def intent_after_a_vacuum(*args, **kwargs):  # files in place, no intent yet: the live lease protects them
        vacuum_now()
        return real_intent(*args, **kwargs)

    def commit_after_a_vacuum(*args, **kwargs):  # between two table commits: the intent protects them
        if args[1] == "predictions":
            vacuum_now()
        return real_commit(*args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(tables, "write_intent", intent_after_a_vacuum)
        m.setattr(tables, "commit_files", commit_after_a_vacuum)
        result = commit.commit_run(plan)
    assert len(vacuumed) == 2
    assert not any(plan.run_id in path for deleted in vacuumed for files in deleted.values() for path in files)
    assert result.n_predictions == 6
    for table in ("thumbnails", "predictions", "differentials"):
        assert set(_standard_runs(out, so, table)) == {plan.run_id}, table
    assert tables.visible_runs(out, so).column("run_id").to_pylist() == [plan.run_id]
    assert tables.pending_intents(out, so) == []
    assert query.read_table(out, "predictions", so).num_rows == 6
    # What the rerun superseded went with the second vacuum at the latest (thumbnails and errors by then).
    assert any(first.run_id in path for deleted in vacuumed for files in deleted.values() for path in files)


# --------------------------------------------------------------------------- item 2: interrupted upgrade-output
def _legacy_review(root: str) -> str:
    path = contract.review_path(root, D1, "20240302T000000Z-legacy01")
    rows = [{"run_id": NEW, "image_uri": "s3://in/S1/0.jpg", "old_class": "basophil", "new_class": "monocyte",
             "reviewer": "dr a", "reviewed_at": _ts(4)}]
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=contract.reviews_schema()), path)
    return path


def test_an_interrupted_upgrade_is_named_and_nothing_it_has_not_moved_is_vacuumed(tmp_path, monkeypatch, capsys):
    out = str(tmp_path / "out")
    build_tree(out, delta=False)
    review_file = _legacy_review(out)
    _age([review_file], 30 * 24 * 3600)  # written long before the upgrade
    real = tables.commit_files

    def dies_before_reviews(output_uri, table, *args, **kwargs):
        if table == contract.REVIEWS:
            raise Crash()
        return real(output_uri, table, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(tables, "commit_files", dies_before_reviews)
        with pytest.raises(Crash):
            upgrade_output(out)
    assert tables.committed_runs(out).num_rows == 3  # runs are in: the root looks upgraded
    # Every reader names the problem and the way out; nothing can write into the half-upgraded root.
    with pytest.raises(LegacyOutputError, match=r"interrupted.*bloodray upgrade-output --output .* again"):
        query.connect(out)
    csv_path = tmp_path / "review.csv"
    csv_path.write_text("image_uri,verified_class,reviewer\ns3://in/S1/1.jpg,monocyte,dr b\n")
    for argv in (["query", "SELECT count(*) FROM reviews", "--output", out],
                 ["review", "import", str(csv_path), "--output", out, "--date", D1],
                 ["vacuum", "--output", out], ["vacuum", "--output", out, "--retain-hours", "0"]):
        assert cli_run(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "upgrade-output" in err and "again" in err, (argv, err)
    assert os.path.exists(review_file)
    # Running it again finishes it; the review survives every vacuum after that.
    assert upgrade_output(out)["reviews"] == 1
    assert cli_run(["vacuum", "--output", out, "--retain-hours", "0"]) == 0
    capsys.readouterr()
    assert os.path.exists(review_file)
    assert tables.read(out, contract.REVIEWS).column("new_class").to_pylist() == ["monocyte"]


# --------------------------------------------------------------------------- item 10: readers during the commit window
def _half_committed(out: str) -> dict[str, list[str]]:
    """UNCOMMITTED past its commit point: its intent written, predictions committed, the other tables not yet."""
    fs, root = contract.output_root(out)
    manifest = contract.manifest_path(root, D1, UNCOMMITTED)
    pq.write_table(_manifest(UNCOMMITTED, D1, _ts(6), 50, 0, 1).drop_columns(["run_date"]), manifest)
    files = {t: [os.path.relpath(os.path.join(d, f), root) for f in sorted(os.listdir(d))]
             for t in ("predictions", "differentials")
             for d in [contract.partition_dir(root, t, D1, UNCOMMITTED)]}
    files[contract.RUNS] = [os.path.relpath(manifest, root)]
    tables.write_intent(out, D1, UNCOMMITTED, files)
    tables.commit_files(out, "predictions", D1, UNCOMMITTED, [os.path.join(root, p) for p in files["predictions"]],
                        replace_date=True)
    return files


def test_readers_in_the_commit_window_say_so_and_tell_live_from_stopped(tmp_path, caplog):
    out = str(tmp_path / "out")
    build_tree(out)
    _half_committed(out)
    dest = str(tmp_path / "review")

    # Stopped half-way (no live lease): the warning says so and names the way out.
    with caplog.at_level(logging.WARNING):
        query.connect(out).close()
    assert f"run {UNCOMMITTED} of {D1} stopped half-way through its commit" in caplog.text
    with pytest.raises(roundtrip.ReviewError, match=rf"{UNCOMMITTED} of {D1} stopped half-way.*run the date again"):
        roundtrip.export_review(out, D1, dest)
    page = open(report.write_report(out, run_date=D1)).read()
    assert "commit-warning" in page and f"run {UNCOMMITTED}" in page and "stopped half-way" in page
    # Another date is not concerned.
    assert "commit-warning" not in open(report.write_report(out, run_date="2024-03-02")).read()

    # Committing right now (its lease is live): never "stopped half-way".
    held = lease.acquire_lease(out, D1, UNCOMMITTED, 60)
    try:
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            query.connect(out).close()
        assert f"run {UNCOMMITTED} of {D1} is committing right now" in caplog.text
        assert "stopped half-way" not in caplog.text
        with pytest.raises(roundtrip.ReviewError, match="committing right now.*when it has finished"):
            roundtrip.export_review(out, D1, dest)
        page = open(report.write_report(out, run_date=D1)).read()
        assert "committing right now" in page and "stopped half-way" not in page
    finally:
        held.release()

    # Completed: the readers are quiet and the review list is the new run's.
    tables.complete_pending_commits(out, D1)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        query.connect(out).close()
    assert "half-way" not in caplog.text and "committing" not in caplog.text
    exported = roundtrip.export_review(out, D1, dest)
    assert exported.n_cells > 0 and "commit-warning" not in open(report.write_report(out, run_date=D1)).read()


def test_vacuum_keeps_what_a_pending_intent_lists(tmp_path):
    out = str(tmp_path / "out")
    build_tree(out)
    files = _half_committed(out)
    _age([os.path.join(out, p) for ps in files.values() for p in ps], EIGHT_DAYS)
    result = pending.vacuum(out, retain_hours=0)
    assert all(os.path.exists(os.path.join(out, p)) for ps in files.values() for p in ps)
    assert sorted(result.kept) == ["differentials", "runs"]  # predictions has them committed already
    assert any(OLD in p for p in result.deleted["predictions"])  # the superseded run still goes
    assert tables.complete_pending_commits(out, D1) == [UNCOMMITTED]
    assert tables.visible_runs(out, None, D1).column("run_id").to_pylist() == [UNCOMMITTED]


# --------------------------------------------------------------------------- item 11: one line naming the problem
def test_a_garbage_lease_file_is_named_when_taken_over(tmp_path, caplog):
    out = str(tmp_path / "out")
    path = contract.lease_path(out, DATE)
    os.makedirs(os.path.dirname(path))
    for garbage in (b"\x00\x01 not json", json.dumps({"hello": "world"}).encode()):
        with open(path, "wb") as fh:
            fh.write(garbage)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="bloodray.nightly.lease"):
            held = lease.acquire_lease(out, DATE, "run-1", 60)
        held.release()
        lines = [r.getMessage() for r in caplog.records]
        assert len(lines) == 1 and path in lines[0] and "not a bloodray lease" in lines[0], lines


def test_time_travel_to_a_vacuumed_version_is_one_line(tmp_path, capsys):
    out = str(tmp_path / "out")
    build_tree(out)
    time.sleep(1.1)  # Delta time travel resolves commit times to the millisecond; keep the versions apart
    as_of = dt.datetime.now(dt.timezone.utc).isoformat()
    time.sleep(1.1)
    # A rerun of D2 replaces D2_RUN's rows.
    rerun = "run-d2-rerun"
    part = contract.partition_dir(out, "predictions", D2, rerun) + "/part-0.parquet"
    os.makedirs(os.path.dirname(part))
    pq.write_table(_predictions(rerun, ["T1"], 2), part)
    tables.commit_files(out, "predictions", D2, rerun, [part], replace_date=True)
    manifest = contract.manifest_path(out, D2, rerun)
    pq.write_table(_manifest(rerun, D2, _ts(23), 2, 0, 1).drop_columns(["run_date"]), manifest)
    tables.commit_files(out, contract.RUNS, D2, rerun, [manifest], replace_date=False)
    sql = f"SELECT DISTINCT run_id FROM predictions WHERE run_date = '{D2}'"
    assert cli_run(["query", sql, "--output", out, "--as-of", as_of, "--format", "csv"]) == 0
    assert capsys.readouterr().out.split() == ["run_id", D2_RUN]
    pending.vacuum(out, retain_hours=0)
    assert cli_run(["query", sql, "--output", out, "--as-of", as_of, "--format", "csv"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert "--as-of" in err and "vacuum" in err and "predictions" in err, err
    # The current version still reads.
    assert cli_run(["query", sql, "--output", out, "--format", "csv"]) == 0
    assert capsys.readouterr().out.split() == ["run_id", rerun]


def test_an_intent_whose_files_are_gone_no_longer_blocks_the_date(tmp_path, caplog):
    """A root stranded by the vacuum of an older bloodray: the next run is not refused, and its commit clears it."""
    out = str(tmp_path / "out")
    build_tree(out)
    files = _half_committed(out)
    os.remove(os.path.join(out, files["differentials"][0]))  # what the old vacuum deleted
    with caplog.at_level(logging.WARNING, logger="bloodray.nightly.tables"):
        assert tables.complete_pending_commits(out, D1) == []  # before: "not found", every rerun exited 2
    assert "cannot be completed" in caplog.text and files["differentials"][0] in caplog.text
    assert [i["run_id"] for i in tables.pending_intents(out)] == [UNCOMMITTED]
    # Once the next run has replaced the date in every table, the stale intent goes.
    assert tables.drop_superseded_intents(out, D1, "run-d1-next") == [UNCOMMITTED]
    assert tables.pending_intents(out) == [] and pending.pending_commits(out) == []
