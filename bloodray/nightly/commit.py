"""Committing a staged nightly run: its files into the tables, then one Delta commit per table, the manifest last.

The commit protocol (layout: :mod:`bloodray.nightly.contract`; Delta: :mod:`bloodray.nightly.tables`)::

    check the staged rows account for the listing            else refuse: nothing published
    renew the lease of (output, date)                        else refuse: another run took over
    copy staged files into <table>/run_date=<D>/<run_id>/    invisible: no Delta log lists them
    write run_configs/... and the manifest file runs/run_date=<D>/<run_id>.parquet
    renew the lease again
    write _commits/run_date=<D>/<run_id>.json                the commit point: from here the run rolls forward
    Delta commit per data table: replace the date's rows     thumbnails, errors, predictions, differentials
    Delta commit to runs: append the manifest row            LAST: the run is listed as committed
    remove the intent; delete stale staging and uncommitted leftovers; release the lease

A run that fails before its intent is written removes its own staging and
files (:func:`discard_run`): readers still see the previous run of the date.
One that stops after it (killed between two table commits) is completed by
the next run of the date (:func:`bloodray.nightly.tables.complete_pending_commits`),
which skips the tables already done. Superseded runs' files stay for time
travel until ``bloodray vacuum``.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import posixpath
import time
from typing import Any, Callable, Mapping

import pyarrow as pa

from bloodray import storage
from bloodray.config import dump_yaml, save_config
from bloodray.nightly import contract, tables
from bloodray.nightly.config import ClassifyError
from bloodray.nightly.aggregate import check_accounting
from bloodray.nightly.lease import live_holders
from bloodray.nightly.plan import RUN_MARKER, RunPlan, RunResult, now, remove_staging

log = logging.getLogger(__name__)


def publish_files(plan: RunPlan) -> dict[str, list[str]]:
    """Commit step 1: copy the staged tables into their partitions and save the config.

    Nothing becomes visible: no Delta log lists these files yet. Returns the
    files of each table, relative to the output root.
    """
    fs, root = contract.output_root(plan.output_uri, plan.storage_options)
    files: dict[str, list[str]] = {}
    for table in contract.TABLES:
        staged = contract.parquet_files(fs, posixpath.join(plan.staging, table))
        if not staged:
            raise ClassifyError(f"{storage.full_uri(fs, plan.staging)}: staged {table} are missing; "
                                "was this run's staging deleted by another run?")
        target = contract.partition_dir(root, table, plan.run_date, plan.run_id)
        if fs.exists(target):  # leftovers of an interrupted commit of this same run id
            fs.rm(target, recursive=True)
        if storage.is_local(fs):
            fs.makedirs(target, exist_ok=True)
        # Server-side copies on object storage: no bytes pass through the driver.
        targets = [posixpath.join(target, posixpath.basename(p)) for p in staged]
        fs.copy(staged, targets)
        files[table] = [posixpath.relpath(p, root) for p in targets]
    save_config(plan.cfg, storage.full_uri(fs, contract.config_path(root, plan.run_date, plan.run_id)),
                plan.storage_options)
    return files


def discard_run(plan: RunPlan) -> None:
    """Undo an uncommitted run: delete its staging, partition files, manifest file and config; release its lease.

    Best effort and only this run's own paths (its run id); a run past its
    commit point (intent written) is committed and is left alone.
    """
    fs, root = contract.output_root(plan.output_uri, plan.storage_options)
    try:
        fs.invalidate_cache()
        if not fs.exists(contract.intent_path(root, plan.run_date, plan.run_id)) and not tables.is_committed(
                plan.output_uri, contract.RUNS, plan.run_id, plan.storage_options):
            paths = [contract.partition_dir(root, t, plan.run_date, plan.run_id) for t in contract.TABLES]
            paths += [contract.config_path(root, plan.run_date, plan.run_id),
                      contract.manifest_path(root, plan.run_date, plan.run_id)]
            for path in paths:
                if fs.exists(path):
                    fs.rm(path, recursive=True)
    except Exception as exc:  # noqa: BLE001 - never hide the failure that got us here
        log.warning("run %s: could not remove its unpublished files (%s); they are invisible to readers",
                    plan.run_id, exc)
    remove_staging(fs, plan.staging)
    if plan.lease is not None:
        plan.lease.release()


def _manifest(plan: RunPlan, committed_at: dt.datetime) -> dict[str, Any]:
    """The run's manifest row (:func:`bloodray.nightly.contract.runs_schema`)."""
    return {
        "run_id": plan.run_id, "status": contract.COMMITTED, "started_at": plan.started_at,
        "committed_at": committed_at, "checkpoint": plan.checkpoint_uri, "checkpoint_id": plan.checkpoint_id,
        "model_name": plan.model_name, "review_threshold": plan.review_threshold, "input_uri": plan.input_uri,
        "output_uri": plan.output_uri, "config_yaml": dump_yaml(plan.cfg), "n_inputs": plan.stats["n_inputs"],
        "n_predictions": plan.stats["n_predictions"], "n_errors": plan.stats["n_errors"],
        "n_samples": plan.stats["n_samples"], "n_review": plan.stats["n_review"],
        "timings_json": json.dumps({k: round(v, 3) for k, v in plan.timings.items()}),
        "incremental_skipped_samples": len(plan.skip_samples), "carried_from_run_id": plan.carried_from,
        **plan.run_shift,
        **{key: ",".join(sorted(values)) or None for key, values in plan.inference_paths.items()},
        "flag_confusion_json": None if plan.rules.confusion is None else json.dumps(plan.rules.confusion.counts),
    }


#: What a caller runs once a run is committed, still under the run's lease: ``(output_uri, run_date, run_id,
#: storage_options)``. The job passes the review package's refresh of ``verified_differentials``
#: (:func:`bloodray.review.records.refresh_after_commit`, wired by :func:`bloodray.nightly_job.classify`), so the
#: nightly package needs nothing of the review one.
AfterCommit = Callable[[str, str, str, "Mapping[str, Any] | None"], None]


def commit_run(plan: RunPlan, after_commit: AfterCommit | None = None) -> RunResult:
    """Publish a staged run: check it, put its files in place, then commit every table, the manifest LAST.

    Refuses (:class:`ClassifyError`, nothing published, the run discarded)
    when the staged rows do not account for every listed input exactly once
    (:func:`bloodray.nightly.aggregate.check_accounting`) or when the run no
    longer holds its lease (:class:`~bloodray.nightly.lease.LeaseLostError`).

    Until its commit intent is written the run is invisible to every reader
    and a failure discards it; from then on it is committed, and if this
    process stops before every table has it the next run of the date
    completes it (module docstring). Afterwards stale staging and files of
    runs that never committed are deleted (best effort, see :func:`cleanup_runs`). Then ``after_commit``
    runs, before the lease is released; it cannot fail the committed run (a failure is logged).
    """
    timer = time.monotonic()
    fs, root = contract.output_root(plan.output_uri, plan.storage_options)
    try:
        check_accounting(plan)
        if plan.lease is not None:
            plan.lease.renew()
        files = publish_files(plan)
        committed_at = now()
        plan.timings["commit"] = time.monotonic() - timer
        manifest_path = contract.manifest_path(root, plan.run_date, plan.run_id)
        storage.put_bytes(fs, manifest_path, storage.parquet_bytes(
            pa.Table.from_pylist([_manifest(plan, committed_at)], schema=contract.runs_schema())), atomic=True)
        files[contract.RUNS] = [posixpath.relpath(manifest_path, root)]
        if plan.lease is not None:
            # Proof that the lease is still ours, and a full lease period for the table commits.
            plan.lease.renew()
        tables.write_intent(plan.output_uri, plan.run_date, plan.run_id, files, plan.storage_options)
    except BaseException:
        discard_run(plan)
        raise
    try:
        tables.apply_intent(plan.output_uri, {"run_id": plan.run_id, "run_date": plan.run_date, "files": files},
                            plan.storage_options)
    except BaseException:
        remove_staging(fs, plan.staging)
        if plan.lease is not None:
            plan.lease.release()
        log.error("run %s of %s is committed but not every table has it yet; the next run of the date "
                  "completes the commit", plan.run_id, plan.run_date)
        raise
    timings = {k: round(v, 3) for k, v in plan.timings.items()}
    log.info("run %s committed: %d predictions, %d errors, %d samples (%d need review)", plan.run_id,
             plan.stats["n_predictions"], plan.stats["n_errors"], plan.stats["n_samples"], plan.stats["n_review"])
    try:
        tables.drop_superseded_intents(plan.output_uri, plan.run_date, plan.run_id, plan.storage_options)
    except Exception as exc:  # noqa: BLE001 - the run is committed; readers keep warning about the old intent
        log.warning("run %s: could not remove superseded commit intents (%s)", plan.run_id, exc)
    cleanup_runs(plan.output_uri, plan.run_date, plan.run_id, plan.storage_options)
    if after_commit is not None:
        # Still under the lease: no other run of the date can commit while e.g. the reviews are applied to this one.
        try:
            after_commit(plan.output_uri, plan.run_date, plan.run_id, plan.storage_options)
        except Exception as exc:  # noqa: BLE001 - the run is committed either way
            log.warning("run %s of %s is committed; what follows the commit failed: %s", plan.run_id,
                        plan.run_date, exc)
    if plan.lease is not None:
        plan.lease.release()
    return RunResult(run_id=plan.run_id, run_date=plan.run_date, output_uri=plan.output_uri,
                     manifest_uri=storage.full_uri(fs, manifest_path), checkpoint_id=plan.checkpoint_id,
                     n_inputs=plan.stats["n_inputs"], n_predictions=plan.stats["n_predictions"],
                     n_errors=plan.stats["n_errors"], n_samples=plan.stats["n_samples"],
                     n_review=plan.stats["n_review"], incremental_skipped_samples=len(plan.skip_samples),
                     n_resumed=len(plan.resumed_images),
                     timings=timings, n_unidentified=plan.run_shift["n_unidentified"],
                     domain_shift=plan.run_shift["domain_shift"], n_samples_shifted=plan.run_shift["n_samples_shifted"],
                     flags_uncorrected=plan.flags_uncorrected)


def run_marker(fs, root: str, run_id: str) -> dict[str, Any] | None:
    """The ``run.json`` a run writes first into its staging dir; None when absent (run finished or junk)."""
    try:
        info = json.loads(fs.cat_file(posixpath.join(contract.staging_dir(root, run_id), RUN_MARKER)))
        return {"run_date": str(info["run_date"]), "started_at": dt.datetime.fromisoformat(info["started_at"])}
    except Exception:  # noqa: BLE001
        return None


def subdirs(fs, path: str) -> list[str]:
    try:
        entries = fs.ls(path, detail=True)
    except FileNotFoundError:
        return []
    return [posixpath.basename(e["name"].rstrip("/")) for e in entries if e.get("type") == "directory"]


#: Staging of a run for *another* date is only removed once this old: backfills
#: of several dates may legitimately run side by side into one output.
STALE_STAGING_AGE = dt.timedelta(days=2)


def cleanup_runs(output_uri: str, run_date: str, run_id: str,
                 storage_options: Mapping[str, Any] | None = None) -> list[str]:
    """Delete what the committed run ``run_id`` supersedes; returns the deleted paths.

    For ``run_date``: data directories, manifest files and configs of runs
    that never committed and started before it (crashed runs; no Delta
    version lists their files). Staging: its own, that of committed runs, of
    runs of the same date that started before it, and of any run older than
    :data:`STALE_STAGING_AGE`. A run still in flight (started later, or of
    another date) is left alone. Files of superseded committed runs stay, for
    time travel, until ``bloodray vacuum``; their manifests stay as the
    history of what ran. Best effort: failures are logged, never raised.

    Staging of a run that holds a live lease (:mod:`bloodray.nightly.lease`)
    is never deleted: with one writer per output and date, a same-date run
    that started earlier and holds no lease is dead, or has lost its lease and
    cannot publish.
    """
    fs, root = contract.output_root(output_uri, storage_options)
    deleted: list[str] = []
    try:
        runs = tables.committed_runs(output_uri, storage_options, run_date)
        pending = {i["run_id"] for i in tables.pending_intents(output_uri, storage_options, run_date)}
        committed = dict(zip(runs.column("run_id").to_pylist(), runs.column("committed_at").to_pylist()))
        if run_id not in committed:
            raise ClassifyError(f"run {run_id} is not committed; nothing is cleaned up")
        ours = run_marker(fs, root, run_id)
        ours_started = ours["started_at"] if ours else committed[run_id]

        def crashed(other: str) -> bool:
            """Same-date run that never committed and started before this one: its files may go."""
            if other == run_id or other in committed or other in pending:
                return False
            marker = run_marker(fs, root, other)
            return marker is None or marker["started_at"] < ours_started

        for table in contract.TABLES:
            date_dir = posixpath.join(root, table, f"{contract.RUN_DATE_PREFIX}{run_date}")
            deleted += [posixpath.join(date_dir, other) for other in subdirs(fs, date_dir) if crashed(other)]
        manifest_dir = posixpath.join(root, contract.RUNS, f"{contract.RUN_DATE_PREFIX}{run_date}")
        try:
            manifest_files = fs.ls(manifest_dir, detail=False)
        except FileNotFoundError:
            manifest_files = []
        deleted += [p for p in manifest_files
                    if p.endswith(".parquet") and crashed(posixpath.basename(p).removesuffix(".parquet"))]
        config_dir = posixpath.join(root, contract.RUN_CONFIGS, f"{contract.RUN_DATE_PREFIX}{run_date}")
        try:
            config_files = fs.ls(config_dir, detail=False)
        except FileNotFoundError:
            config_files = []
        for path in config_files:
            other = posixpath.basename(path).removesuffix(".yaml")
            if crashed(other):
                deleted.append(path)
        staging_root = posixpath.join(root, contract.STAGING)
        holders = live_holders(output_uri, storage_options) - {run_id}
        for other in subdirs(fs, staging_root):
            marker = run_marker(fs, root, other)
            if other in holders:
                continue
            if (other == run_id or other in committed or marker is None
                    or (marker["run_date"] == run_date and marker["started_at"] < ours_started)
                    or marker["started_at"] < ours_started - STALE_STAGING_AGE):
                deleted.append(posixpath.join(staging_root, other))
        for path in deleted:
            fs.rm(path, recursive=True)
        # The run's own staging always goes; only leftovers of other runs are worth a line.
        stale = [p for p in deleted if p != posixpath.join(staging_root, run_id)]
        if stale:
            log.info("cleanup after run %s: removed %d stale path(s)", run_id, len(stale))
    except Exception as exc:  # noqa: BLE001 - cleanup never fails a committed run
        log.warning("cleanup after run %s incomplete (%s); leftovers are invisible to readers and are "
                    "removed by a later run", run_id, exc)
    return deleted
