"""Upgrading an output root written before the tables were Delta Lake tables.

Before, a run was committed when its manifest file existed under
``runs/run_date=<D>/``, and the visible run of a date was the manifest with
the latest ``committed_at``; the data files sat where they sit now. Such a
root has Parquet files in its table folders and no ``_delta_log/``, so the
Delta readers would see empty tables. :func:`upgrade_output` commits it into
the Delta format in place, without copying or rewriting a data file:

* every readable manifest is appended to ``runs`` (one commit per run, oldest
  first), so ``all_runs`` keeps the history;
* for each date, the files of its visible run replace the date in each data
  table (files of superseded and crashed runs stay out of every version, and
  ``bloodray vacuum`` deletes them);
* every review file is appended to ``reviews``.

Commits carry the usual app transactions, so running it again (say, after an
interruption) skips what is done. Before its first commit it records every
file it will commit in ``_commits/upgrade-output.json``
(:func:`bloodray.nightly.contract.upgrade_intent_path`), removed after its
last: while that intent is there (an interrupted upgrade), readers, the
classify job, ``review import`` and ``vacuum`` refuse the root with a message
saying to run ``bloodray upgrade-output`` again, and no vacuum deletes a file
it lists. Readers and the classify job refuse a pre-Delta root with a message
naming ``bloodray upgrade-output``.
"""

from __future__ import annotations

import json
import logging
import posixpath
from typing import Any, Mapping

import pyarrow.parquet as pq

from bloodray import storage
from bloodray.nightly import contract, tables

log = logging.getLogger(__name__)


class LegacyOutputError(storage.StorageError):
    """The output root is in the pre-Delta layout; the message says how to upgrade it."""


def _dated(fs, table_dir: str) -> list[tuple[str, str]]:
    """``(run_date, path)`` of the files directly under ``<table>/run_date=<D>/`` (manifests, review files)."""
    out = []
    for path in contract.parquet_files(fs, table_dir):
        folder = posixpath.basename(posixpath.dirname(path))
        if folder.startswith(contract.RUN_DATE_PREFIX) and posixpath.dirname(posixpath.dirname(path)) == table_dir:
            out.append((folder.removeprefix(contract.RUN_DATE_PREFIX), path))
    return out


def is_legacy(output_uri: str, storage_options: Mapping[str, Any] | None = None) -> bool:
    """True when ``runs/`` holds manifest files but no Delta log (a root written by bloodray before Delta)."""
    fs, root = contract.output_root(output_uri, storage_options)
    runs = contract.table_dir(root, contract.RUNS)
    try:
        if fs.exists(posixpath.join(runs, "_delta_log")):
            return False
        return bool(contract.parquet_files(fs, runs))
    except Exception as exc:  # noqa: BLE001
        raise storage.describe_storage_error(output_uri, exc) from exc


def upgrade_pending(output_uri: str, storage_options: Mapping[str, Any] | None = None) -> bool:
    """True when an ``upgrade-output`` of this root started and has not finished (its intent is on record)."""
    fs, root = contract.output_root(output_uri, storage_options)
    try:
        return fs.exists(contract.upgrade_intent_path(root))
    except Exception as exc:  # noqa: BLE001
        raise storage.describe_storage_error(output_uri, exc) from exc


def refuse_legacy(output_uri: str, storage_options: Mapping[str, Any] | None = None) -> None:
    """Raise :class:`LegacyOutputError` for a pre-Delta or half-upgraded root, naming the command that upgrades it."""
    if upgrade_pending(output_uri, storage_options):
        raise LegacyOutputError(
            f"{output_uri}: an interrupted `bloodray upgrade-output` left this root half-upgraded (tables it had not "
            f"committed yet, reviews included, would read as empty); run `bloodray upgrade-output --output "
            f"{output_uri}` again")
    if is_legacy(output_uri, storage_options):
        raise LegacyOutputError(
            f"{output_uri}: written by an older bloodray (plain Parquet, no Delta log); upgrade it once with "
            f"`bloodray upgrade-output --output {output_uri}` (in place, no data is rewritten)")


def upgrade_output(output_uri: str, storage_options: Mapping[str, Any] | None = None) -> dict[str, int]:
    """Commit a pre-Delta output root into Delta tables in place; returns counts of what was committed.

    Idempotent. Unreadable manifests are skipped with a warning (their run
    was never readable as committed either).
    """
    fs, root = contract.output_root(output_uri, storage_options)
    manifests = []
    for run_date, path in _dated(fs, contract.table_dir(root, contract.RUNS)):
        try:
            with fs.open(path, "rb") as fh:
                row = pq.read_table(fh, columns=["run_id", "status", "committed_at"]).to_pylist()[0]
        except Exception as exc:  # noqa: BLE001
            log.warning("%s: unreadable manifest, skipped (%s)", storage.full_uri(fs, path), exc)
            continue
        if row["status"] == contract.COMMITTED:
            manifests.append((row["committed_at"], run_date, row["run_id"], path))
    manifests.sort(key=lambda m: (m[0], m[2]))
    visible: dict[str, str] = {}
    for _at, run_date, run_id, _path in manifests:
        visible[run_date] = run_id  # sorted by commit time: the last one wins, as the old readers had it
    data = {run_date: {table: contract.parquet_files(fs, contract.partition_dir(root, table, run_date, run_id))
                       for table in tables.COMMIT_ORDER}
            for run_date, run_id in sorted(visible.items())}
    reviews = _dated(fs, contract.table_dir(root, contract.REVIEWS))
    # The intent lists everything this upgrade commits, before its first commit: until it is removed, readers
    # refuse the root (naming this command) and vacuum keeps those files, whatever the tables say.
    intent: dict[str, list[str]] = {}
    for per_table in data.values():
        for table, files in per_table.items():
            intent.setdefault(table, []).extend(posixpath.relpath(f, root) for f in files)
    intent[contract.RUNS] = [posixpath.relpath(m[3], root) for m in manifests]
    intent[contract.REVIEWS] = [posixpath.relpath(p, root) for _d, p in reviews]
    intent_path = contract.upgrade_intent_path(root)
    storage.put_bytes(fs, intent_path, json.dumps({"kind": "upgrade-output", "files": intent}, indent=1).encode(),
                      atomic=True)
    counts = {"runs": 0, "dates": 0, "reviews": 0}
    for run_date, run_id in sorted(visible.items()):
        done = False
        for table, files in data[run_date].items():
            if files:
                done |= tables.commit_files(output_uri, table, run_date, run_id, files, replace_date=True,
                                            storage_options=storage_options)
        counts["dates"] += done
    for _at, run_date, run_id, path in manifests:
        counts["runs"] += tables.commit_files(output_uri, contract.RUNS, run_date, run_id, [path],
                                              replace_date=False, storage_options=storage_options)
    for run_date, path in reviews:
        review_id = posixpath.basename(path).removesuffix(".parquet")
        counts["reviews"] += tables.commit_files(output_uri, contract.REVIEWS, run_date, review_id, [path],
                                                 replace_date=False, storage_options=storage_options)
    fs.rm(intent_path)
    return counts
