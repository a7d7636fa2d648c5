"""One writer per output and date, a commit that accounts for every input, no leftovers (issue 14, defects 1, 10).

Real runs only: ``jobs/classify.py`` subprocesses (each its own driver and,
for the one that classifies, its own local Ray cluster), the shared local Ray
cluster of the session, and the moto S3 server for the lease on S3.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.compute as pc
import pytest

from bloodray import storage
from bloodray.analysis import query
from bloodray.config import ConfigError, load_config
from bloodray.data import synth
from bloodray.nightly import commit, contract, lease, tables
from bloodray.nightly.config import ClassifyError
from bloodray.nightly.pipeline import ClassifyConfig, run_classification, stage_run
from bloodray.nightly.plan import plan_run

REPO = Path(__file__).resolve().parents[1]
DATE = "2024-08-01"


def _overrides(archive: str, out: str, *extra: str) -> list[str]:
    return [f"input.uri={archive}", f"output.uri={out}", f"run.date={DATE}", "inference.batch_size=8",
            "inference.num_gpus=0", *extra]


def _config(archive: str, out: str, storage_options: dict | None = None, *extra: str) -> ClassifyConfig:
    endpoint = (storage_options or {}).get("endpoint_url")
    more = [f"storage.endpoint_url={endpoint}"] if endpoint else []
    return load_config(ClassifyConfig, None, _overrides(archive, out, *more, *extra))


def _job(archive: str, out: str, *extra: str) -> list[str]:
    args = [sys.executable, str(REPO / "jobs" / "classify.py")]
    for item in _overrides(archive, out, *extra):
        args += ["--set", item]
    return args


def _wait_for_lease(path: Path, run_id: str, proc: subprocess.Popen) -> dict:
    """Poll until ``run_id`` holds the lease file (or the process ends, which fails the test)."""
    while True:
        if path.exists():
            try:
                record = json.loads(path.read_text())
            except ValueError:  # a rename in progress
                record = {}
            if record.get("run_id") == run_id:
                return record
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)


def _staging_runs(out: Path) -> list[str]:
    staging = out / contract.STAGING
    return sorted(p.name for p in staging.iterdir()) if staging.exists() else []


@pytest.mark.slow
def test_two_real_runs_of_one_date_one_fails_fast_and_the_other_commits(tmp_path):
    out = tmp_path / "out"
    big, small = tmp_path / "big", tmp_path / "small"
    images = synth.write_archive(str(big / DATE), synth.default_samples(5, 30, seed=21), size=64, seed=21)
    synth.write_archive(str(small / DATE), synth.default_samples(1, 3, seed=22), size=64, seed=22)
    env = dict(os.environ)
    winner = subprocess.Popen(_job(str(big), str(out), "run.run_id=winner-run", "model.tta=true",
                                   "inference.concurrency=1"),
                              cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              start_new_session=True)
    try:
        _wait_for_lease(out / contract.LEASES / f"run_date={DATE}.json", "winner-run", winner)
        loser = subprocess.run(_job(str(small), str(out), "run.run_id=loser-run"), cwd=REPO, env=env,
                               capture_output=True, text=True, timeout=600)
        # The winner is still streaming its archive: the loser was refused, not serialised after it.
        assert winner.poll() is None
        assert "winner-run" in _staging_runs(out) and (out / contract.STAGING / "winner-run" / "run.json").exists()
        assert "loser-run" not in _staging_runs(out)
        assert loser.returncode == 2, loser.stderr
        message = loser.stderr.strip()
        assert len(message.splitlines()) == 1, message
        assert str(out) in message and DATE in message and "winner-run" in message and "Traceback" not in message
        stdout, stderr = winner.communicate(timeout=900)
    finally:
        if winner.poll() is None:
            os.killpg(winner.pid, signal.SIGKILL)
    # Committed (the packaged model takes synthetic cells for another lab's: 4, committed under the alarm).
    assert winner.returncode in (0, 4), stderr[stderr.find("Traceback"):][:4000] or stderr[-4000:]
    # The date holds exactly the winner's rows; the loser left nothing anywhere.
    visible = tables.visible_runs(str(out)).to_pylist()
    assert [r["run_id"] for r in visible] == ["winner-run"]
    assert tables.committed_runs(str(out)).column("run_id").to_pylist() == ["winner-run"]
    preds = query.read_table(str(out), "predictions")
    errors = query.read_table(str(out), "errors")
    uris = preds.column("image_uri").to_pylist() + errors.column("image_uri").to_pylist()
    assert sorted(uris) == sorted(r["uri"] for r in images)
    assert pc.all(pc.equal(preds.column("run_id"), "winner-run")).as_py()
    for table in contract.TABLES:
        assert sorted(p.name for p in (out / table / f"run_date={DATE}").iterdir()) == ["winner-run"]
    assert _staging_runs(out) == []
    assert not (out / contract.LEASES / f"run_date={DATE}.json").exists()  # released


@pytest.mark.slow
def test_a_killed_run_frees_its_lease_for_a_rerun_on_the_same_host(tmp_path):
    out = tmp_path / "out"
    archive = tmp_path / "archive"
    synth.write_archive(str(archive / DATE), synth.default_samples(1, 3, seed=23), size=64, seed=23)
    killed = subprocess.Popen(_job(str(archive), str(out), "run.run_id=killed-run"), cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        held = _wait_for_lease(out / contract.LEASES / f"run_date={DATE}.json", "killed-run", killed)
    finally:
        os.killpg(killed.pid, signal.SIGKILL)
        killed.communicate()
    assert held["pid"] == killed.pid and held["host"] == socket.gethostname()
    # Its lease has not expired, but its process is gone: the rerun takes over at once.
    plan = plan_run(_config(str(archive), str(out)))
    try:
        assert plan.lease.record["run_id"] == plan.run_id
        assert lease.live_holders(str(out)) == {plan.run_id}
    finally:
        commit.discard_run(plan)
    assert lease.live_holders(str(out)) == set()
    assert not (out / contract.STAGING / plan.run_id).exists()


def test_lease_on_s3_excludes_live_holders_and_takes_over_expired_ones(s3_bucket):
    root, so = s3_bucket
    out = storage.join(root, "out")
    fs, out_path = contract.output_root(out, so)
    path = contract.lease_path(out_path, DATE)
    now = dt.datetime.now(dt.timezone.utc)

    def other(expires_in_s: float) -> None:
        fs.pipe_file(path, json.dumps({"run_id": "elsewhere-run", "host": "another-host", "pid": 1,
                                       "acquired_at": now.isoformat(),
                                       "expires_at": (now + dt.timedelta(seconds=expires_in_s)).isoformat(),
                                       "released": False, "nonce": "x"}).encode())

    other(600)
    with pytest.raises(lease.LeaseHeldError) as info:
        lease.acquire_lease(out, DATE, "mine", 60, so)
    message = str(info.value)
    assert out in message and DATE in message and "elsewhere-run" in message and "another-host" in message
    other(-1)  # its holder stopped renewing: expired
    mine = lease.acquire_lease(out, DATE, "mine", 60, so)
    try:
        assert lease.live_holders(out, so) == {"mine"}
        with pytest.raises(lease.LeaseHeldError, match="run mine"):
            lease.acquire_lease(out, DATE, "third", 60, so)
        mine.renew()
        other(600)  # taken over behind our back (say, after a long pause of this driver)
        with pytest.raises(lease.LeaseLostError, match="elsewhere-run"):
            mine.renew()
    finally:
        mine.release()
    # A lost lease is not released by its former holder: the taker keeps it.
    assert lease.live_holders(out, so) == {"elsewhere-run"}
    other(-1)
    again = lease.acquire_lease(out, DATE, "again", 60, so)
    again.release()
    assert json.loads(fs.cat_file(path))["released"] is True and lease.live_holders(out, so) == set()


@pytest.mark.slow
def test_commit_refuses_a_run_that_lost_its_lease_on_s3(s3_bucket, ray_cluster):
    root, so = s3_bucket
    archive, out = storage.join(root, "archive"), storage.join(root, "out")
    synth.write_archive(storage.join(archive, DATE), synth.default_samples(1, 3, seed=24), size=64, seed=24,
                        storage_options=so)
    fs, out_path = contract.output_root(out, so)
    plan = plan_run(_config(archive, out, so))
    stage_run(plan)
    now = dt.datetime.now(dt.timezone.utc)
    # Another run took the date over (as it may once this run's lease expired).
    fs.pipe_file(contract.lease_path(out_path, DATE), json.dumps({
        "run_id": "usurper-run", "host": "another-host", "pid": 1, "acquired_at": now.isoformat(),
        "expires_at": (now + dt.timedelta(minutes=10)).isoformat(), "released": False, "nonce": "y"}).encode())
    with pytest.raises(lease.LeaseLostError, match="usurper-run"):
        commit.commit_run(plan)
    fs.invalidate_cache()
    assert tables.committed_runs(out, so).num_rows == 0
    assert not fs.exists(contract.staging_dir(out_path, plan.run_id))
    assert not any(fs.exists(contract.partition_dir(out_path, t, DATE, plan.run_id)) for t in contract.TABLES)
    assert lease.live_holders(out, so) == {"usurper-run"}


@pytest.mark.slow
def test_commit_refuses_staged_rows_that_do_not_account_for_the_listing(tmp_path, ray_cluster):
    archive, out = tmp_path / "archive", tmp_path / "out"
    synth.write_archive(str(archive / DATE), synth.default_samples(2, 3, seed=25), size=64, seed=25)
    (archive / DATE / "S0001" / "broken.jpg").write_bytes(b"\xff\xd8 cut")
    cfg = _config(str(archive), str(out))

    # Staged predictions gone (as when another run deleted this run's staging): 6 images without a row.
    plan = plan_run(cfg)
    stage_run(plan)
    for part in (out / contract.STAGING / plan.run_id / "predictions").glob("*.parquet"):
        part.unlink()
    with pytest.raises(ClassifyError, match=r"not published: .*6 listed image\(s\) without a row"):
        commit.commit_run(plan)
    assert _staging_runs(out) == [] and not (out / contract.RUNS).exists()
    assert not (out / "predictions" / f"run_date={DATE}" / plan.run_id).exists()

    # An image with two rows.
    plan = plan_run(cfg)
    stage_run(plan)
    errors = out / contract.STAGING / plan.run_id / "errors"
    (errors / "part-9.parquet").write_bytes((errors / "part-0.parquet").read_bytes())
    with pytest.raises(ClassifyError, match=r"1 image\(s\) with more than one row \(e\.g\. .*broken\.jpg\)"):
        commit.commit_run(plan)
    assert _staging_runs(out) == [] and tables.committed_runs(str(out)).num_rows == 0

    # Untouched, it commits: every listed image once.
    result = commit.commit_run(_staged(cfg))
    assert (result.n_predictions, result.n_errors) == (6, 1)
    assert _staging_runs(out) == []


def _staged(cfg: ClassifyConfig):
    plan = plan_run(cfg)
    stage_run(plan)
    return plan


@pytest.mark.slow
def test_failed_runs_leave_no_staging_and_free_the_lease(tmp_path, ray_cluster):
    archive, out = tmp_path / "archive", tmp_path / "out"
    synth.write_archive(str(archive / DATE), synth.default_samples(1, 2, seed=26), size=64, seed=26)
    lease_file = out / contract.LEASES / f"run_date={DATE}.json"

    # Fails while planning, after the lease was taken.
    with pytest.raises(ConfigError, match="flags.sample_metadata"):
        run_classification(_config(str(archive), str(out), None, f"flags.sample_metadata={tmp_path / 'no.csv'}"))
    assert _staging_runs(out) == [] and not lease_file.exists()

    # Fails in the Ray stage, after run.json was written.
    with pytest.raises(ClassifyError, match="inference.num_gpus"):
        run_classification(_config(str(archive), str(out), None, "inference.num_gpus=1"))
    assert _staging_runs(out) == [] and not lease_file.exists()
    assert not (out / contract.RUNS).exists()
