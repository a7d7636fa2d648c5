"""Runs that resume (issue 20 item 6), with a real kill: a ``bloodray classify`` driver in a subprocess, joined to
a real local Ray cluster, is SIGKILLed after most of a date is classified; the next run of the date picks up the
staged results, re-reads at most 5 % of what the killed run had finished, and every image is in predictions or
errors exactly once."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from bloodray.analysis import query
from bloodray.config import load_config
from bloodray.data import synth
from bloodray.nightly import contract, resume, tables
from bloodray.nightly.pipeline import ClassifyConfig, discard_run, plan_run, run_classification

REPO = Path(__file__).resolve().parents[1]
DATE = "2024-08-01"
KILLED = "run-killed"


def _sets(archive: Path, out: Path) -> list[str]:
    # Small files (16 rows) so that a kill of a few hundred images loses little; one actor, small batches so
    # the run lasts long enough on a busy 2-core machine to be killed part-way.
    return [f"input.uri={archive}", f"output.uri={out}", f"run.date={DATE}", "inference.batch_size=8",
            "inference.concurrency=1", "inference.num_gpus=0", "output.rows_per_file=16"]


def _staged_rows(directory: Path) -> int:
    total = 0
    for path in directory.glob("*.parquet"):
        try:
            total += pq.read_metadata(path).num_rows
        except Exception:  # noqa: BLE001 - the file being written
            pass
    return total


@pytest.mark.slow
def test_a_killed_run_resumes_and_reads_only_what_is_missing(tmp_path, ray_cluster):
    archive, out = tmp_path / "archive", tmp_path / "out"
    synth.write_archive(str(archive / DATE), synth.default_samples(8, 75, seed=21), size=64, seed=21)
    (archive / DATE / "S0002" / "broken.jpg").write_bytes(b"\xff\xd8 cut short")  # an error row, read again
    listed = {str(p) for p in (archive / DATE).rglob("*.jpg")}
    assert len(listed) == 601

    # The driver joins this session's cluster; its Ray job (actors, tasks) dies with it.
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address}
    cmd = [sys.executable, "-m", "bloodray", "-v", "classify", "--config", str(REPO / "configs/classify/nightly.yaml")]
    cmd += [a for s in _sets(archive, out) + [f"run.run_id={KILLED}"] for a in ("--set", s)]
    log = tmp_path / "killed.log"
    with open(log, "wb") as sink:
        proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        results = out / contract.STAGING / KILLED / resume.RESULTS
        deadline = time.monotonic() + 600
        while _staged_rows(results) < 0.7 * len(listed):
            assert proc.poll() is None, f"the run ended before it could be killed:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    received = [int(n) for n in re.findall(r"received (\d+) result rows", log.read_text())]
    finished = max(received)  # result rows that had reached the killed driver (a lower bound, logged per block)
    assert 0.7 * len(listed) <= finished < len(listed)
    assert tables.visible_runs(str(out), run_date=DATE).num_rows == 0  # nothing of the killed run is visible

    # run.resume=false plans to read everything (planning only: no Ray, nothing published, lease released).
    fresh = plan_run(load_config(ClassifyConfig, str(REPO / "configs/classify/nightly.yaml"),
                                 _sets(archive, out) + ["run.resume=false"]))
    assert not fresh.resumed_images and len(fresh.listing.files) == len(listed)
    discard_run(fresh)

    cfg = load_config(ClassifyConfig, str(REPO / "configs/classify/nightly.yaml"), _sets(archive, out))
    resumed = run_classification(cfg)
    read_again = (resumed.n_inputs - resumed.n_resumed) - (len(listed) - finished)
    print(f"killed after {finished} of {len(listed)} images had reached the driver; the resumed run took over "
          f"{resumed.n_resumed} and read {resumed.n_inputs - resumed.n_resumed}: {read_again} finished image(s) "
          f"read again ({read_again / finished:.1%})")
    assert resumed.n_resumed > 0 and read_again <= 0.05 * finished, (resumed, finished)
    assert resumed.n_inputs == len(listed)

    # Exactly once: every listed image in predictions or errors, once; the broken one read again and failed again.
    preds = query.read_table(str(out), "predictions")
    errors = query.read_table(str(out), "errors")
    uris = preds.column("image_uri").to_pylist() + errors.column("image_uri").to_pylist()
    assert sorted(uris) == sorted(listed)
    assert errors.column("image_uri").to_pylist() == [str(archive / DATE / "S0002" / "broken.jpg")]
    assert set(preds.column("run_id").to_pylist()) == {resumed.run_id}
    diffs = query.read_table(str(out), "differentials")
    assert sum(diffs.column("n_images").to_pylist()) == len(listed)
    # The killed run's staging went with the cleanup after the commit.
    assert not (out / contract.STAGING / KILLED).exists()


def test_results_files_close_by_rows_and_a_cut_file_is_skipped(tmp_path):
    import fsspec
    import pyarrow as pa

    fs = fsspec.filesystem("file")
    schema = pa.schema([("image_uri", pa.string())])
    batches = [pa.record_batch([pa.array([f"u{i}" for i in range(start, start + 7)])], schema=schema)
               for start in range(0, 35, 7)]
    directory = str(tmp_path / "results")
    assert resume.write_results(iter(batches), schema, fs, directory, max_rows=10) == 35
    files = sorted(Path(directory).glob("*.parquet"))
    assert [pq.read_metadata(f).num_rows for f in files] == [10, 10, 10, 5]
    # A file the kill cut short has no footer: skipped, its rows are read again by the next run.
    files[-1].write_bytes(files[-1].read_bytes()[:50])
    assert len(list(resume.readable_files(fs, directory))) == 3
    # Closed by time too: with max_seconds=0 every batch ends its file.
    timed = str(tmp_path / "timed")
    resume.write_results(iter(batches), schema, fs, timed, max_rows=1000, max_seconds=0)
    assert len(list(Path(timed).glob("*.parquet"))) == 5


def test_only_rows_staged_under_the_same_settings_are_adopted(tmp_path):
    def key(*extra: str, checkpoint: str = "bloodnet-aaaa") -> str:
        cfg = load_config(ClassifyConfig, None, [f"input.uri={tmp_path}", f"output.uri={tmp_path / 'o'}", *extra])
        return resume.resume_key(cfg, checkpoint)

    assert key() == key("inference.batch_size=8", "inference.concurrency=1")  # how, not what, is computed
    assert key() != key(checkpoint="bloodnet-bbbb")
    assert key() != key("model.tta=true")
    assert key() != key("limits.max_pixels=1000000")
