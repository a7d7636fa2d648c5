"""Runs that resume: a run of a date picks up the per-image results a killed run of the same date had staged.

A run streams its per-image rows into ``_staging/<run_id>/results/`` in small files, each closed (complete and
readable) after :data:`RESULT_FILE_ROWS` rows or :data:`RESULT_FILE_SECONDS` seconds, whichever comes first
(:func:`write_results`). A run that is killed (SIGKILL, a lost node, an OOM kill) leaves those files behind, with
its ``run.json`` marker. The next run of the same output and date, once it holds the date's lease
(:mod:`bloodray.nightly.lease`), looks for such staging (:func:`adopt_staged_results`) and, when the dead run's
``resume_key`` matches its own (same checkpoint, device, TTA, precision and read limits), copies the prediction rows
of images it still lists under the same sample into its own staging (``_staging/<run_id>/resumed/``) and does not
read those images again. Lost at most: the one results file that was open at the kill, and the batches in
flight, so a run killed after most of a large date re-reads only a few per cent of what was finished.

Exactly-once stays the commit's job (:func:`bloodray.nightly.aggregate.check_accounting`): adopted rows count as
listed images of this run, each URI is adopted at most once, and error rows are never adopted (an image that failed
is read again, as an incremental run does). Tar shards are always read whole.

What protects a dead run's staging until it is adopted: the staging of a run of the date is deleted only by the
cleanup after a later run of that date commits (:func:`bloodray.nightly.commit.cleanup_runs`), which has adopted
it first, or once older than ``STALE_STAGING_AGE``; ``bloodray vacuum`` deletes table files, never staging. The
adopting run copies the rows into its own staging, which its live lease protects, so nothing depends on the dead
run's files after planning. ``run.resume=false`` reads everything again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import posixpath
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from bloodray import storage
from bloodray.nightly import contract

log = logging.getLogger(__name__)

#: A staged results file is closed after this many rows ...
RESULT_FILE_ROWS = 1_000
#: ... or this many seconds after it was opened, whichever comes first: what a kill can lose.
RESULT_FILE_SECONDS = 10.0
#: Sub-directories of a run's staging that hold per-image result rows (its own, and those it adopted).
RESULTS, RESUMED = "results", "resumed"


def resume_key(cfg, checkpoint_id: str) -> str:
    """Hash of every setting that decides a staged row: rows staged under another key are never adopted."""
    decisive: dict[str, Any] = {
        "checkpoint_id": checkpoint_id, "device": cfg.model.device, "tta": cfg.model.tta,
        "precision": getattr(cfg.inference, "precision", None), "limits": dataclasses.asdict(cfg.limits),
    }
    return hashlib.sha256(json.dumps(decisive, sort_keys=True, default=str).encode()).hexdigest()[:16]


def write_results(batches: Iterable[pa.RecordBatch], schema: pa.Schema, fs, directory: str, max_rows: int,
                  max_seconds: float = RESULT_FILE_SECONDS) -> int:
    """Stream result rows into ``part-<i>.parquet`` files of at most ``max_rows`` rows, each closed no later than
    ``max_seconds`` after it was opened (when the next batch arrives); returns the row count.

    Every closed file is a complete Parquet file, so a kill loses only the open one. Always writes at least one
    file (possibly empty), so readers find the schema.
    """
    count, index, writer, sink, opened, rows = 0, 0, None, None, 0.0, 0

    def close() -> None:
        nonlocal writer, sink, index
        writer.close()
        sink.close()
        writer, sink, index = None, None, index + 1

    fs.makedirs(directory, exist_ok=True)
    for batch in batches:
        start = 0
        while start < batch.num_rows:
            if writer is None:
                sink = fs.open(posixpath.join(directory, f"part-{index}.parquet"), "wb")
                writer, opened, rows = pq.ParquetWriter(sink, schema), time.monotonic(), 0
            part = batch.slice(start, max_rows - rows)
            writer.write_batch(part)
            start, rows, count = start + part.num_rows, rows + part.num_rows, count + part.num_rows
            if rows >= max_rows or time.monotonic() - opened >= max_seconds:
                close()
                log.debug("staged results: %d rows in closed files", count)
    if writer is not None:
        close()
    elif count == 0:
        storage.put_bytes(fs, posixpath.join(directory, "part-0.parquet"), storage.parquet_bytes(schema.empty_table()))
    return count


def readable_files(fs, directory: str) -> Iterator[str]:
    """The complete Parquet files under ``directory`` (a file cut short by a kill has no footer: skipped)."""
    for path in contract.parquet_files(fs, directory):
        try:
            with fs.open(path, "rb") as fh:
                pq.read_metadata(fh)
        except Exception:  # noqa: BLE001 - truncated, empty or vanished: its images are read again
            log.info("resume: skipping %s (incomplete)", storage.full_uri(fs, path))
            continue
        yield path


@dataclass
class Adopted:
    """What :func:`adopt_staged_results` took over: the runs, and the image URIs now not read again."""

    from_runs: list[str]
    images: frozenset[str]


def adopt_staged_results(plan, markers: dict[str, dict[str, Any]], committed: Callable[[], set[str]]) -> Adopted:
    """Copy the prediction rows of dead same-date runs with this run's ``resume_key`` into this run's staging.

    ``markers`` maps run ids found under ``_staging`` to their ``run.json``; ``committed()`` returns the run ids
    already committed (their rows are the visible run's, never adopted; asked only when a candidate exists). Removes the adopted files from
    ``plan.listing.files`` (module docstring).
    """
    fs, root = contract.output_root(plan.output_uri, plan.storage_options)
    key = resume_key(plan.cfg, plan.checkpoint_id)
    candidates = sorted((m.get("started_at", ""), run_id) for run_id, m in markers.items()
                        if run_id != plan.run_id and m.get("run_date") == plan.run_date
                        and m.get("resume_key") == key)
    if candidates:
        done = committed()
        candidates = [c for c in candidates if c[1] not in done]
    listed = dict(plan.listing.files)
    schema = contract.staged_schema()
    parts: list[pa.Table] = []
    taken: set[str] = set()
    runs = []
    for _started, run_id in reversed(candidates):  # the latest run first: it holds what earlier ones had, too
        staging = contract.staging_dir(root, run_id)
        found = 0
        for sub in (RESULTS, RESUMED):
            for path in readable_files(fs, posixpath.join(staging, sub)):
                with fs.open(path, "rb") as fh:
                    rows = pq.read_table(fh, schema=schema)
                uris, samples = rows.column("image_uri").to_pylist(), rows.column("sample_id").to_pylist()
                keep = [e is None and listed.get(u, object()) == s and u not in taken
                        for u, s, e in zip(uris, samples, rows.column("error_type").to_pylist())]
                rows = rows.filter(pa.array(keep, pa.bool_()))
                if rows.num_rows:
                    # One row per image even if a file repeats one (a resumed run re-staging adopted rows).
                    rows = rows.take(pa.array(_first_of_each(rows.column("image_uri").to_pylist())))
                    taken.update(rows.column("image_uri").to_pylist())
                    parts.append(rows)
                    found += rows.num_rows
        if found:
            runs.append(run_id)
            log.info("resume: run %s of %s had staged %d image(s) still listed; not reading them again",
                     run_id, plan.run_date, found)
    adopted = pa.concat_tables(parts) if parts else schema.empty_table()
    if adopted.num_rows:
        write_results(adopted.to_batches(), schema, fs, posixpath.join(plan.staging, RESUMED),
                      plan.cfg.output.rows_per_file, max_seconds=float("inf"))
        plan.listing.files = [(u, s) for u, s in plan.listing.files if u not in taken]
    return Adopted(runs, frozenset(taken))


def _first_of_each(values: list[Any]) -> list[int]:
    seen: set[Any] = set()
    out = []
    for i, v in enumerate(values):
        if v not in seen:
            seen.add(v)
            out.append(i)
    return out


def staged_result_files(fs, staging: str) -> list[str]:
    """The result files of a run's staging: its own and the ones it adopted."""
    return contract.parquet_files(fs, posixpath.join(staging, RESULTS)) + \
        contract.parquet_files(fs, posixpath.join(staging, RESUMED))


__all__ = ["Adopted", "RESULT_FILE_ROWS", "RESULT_FILE_SECONDS", "adopt_staged_results", "readable_files",
           "resume_key", "staged_result_files", "write_results"]
