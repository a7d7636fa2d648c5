"""The lab's review records: ``bloodray review import``, and the ``verified_differentials`` Delta table.

:func:`import_decisions` reads a decisions JSON or a review CSV
(:mod:`bloodray.review.decisions`), checks every entry against the date's
runs, and appends the reviews and sign-offs to the ``reviews`` and
``signoffs`` Delta tables, one whole file and one commit per table. Each
review is stored with the cell's image content and sample, so it applies to
the same image in every later run of the date (:mod:`bloodray.analysis.review_views`).
Then :func:`refresh_verified` commits the date's verified differentials.

Checking an entry against the date: a file exported from the date's visible
run must name its cells exactly (an unknown cell is an error, and nothing is
imported). A file exported from an earlier run of the date (the date was
rerun while the reviewer worked) is matched by content; an entry whose image
no longer exists with that content is still imported -- it is the reviewer's
record -- and reported as unmatched, as ``review_status = 'unmatched'`` in the
``reviews`` view and ``n_reviews_unmatched`` in ``verified_differentials``.

Importing the same file twice imports it once: each import is a Delta app
transaction keyed by the file's SHA-256.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import uuid
from dataclasses import dataclass, field
from typing import Any, Mapping

import pyarrow as pa

from bloodray import storage
from bloodray.bounded_read import InputReadError, read_file
from bloodray.analysis import query
from bloodray.analysis.review_views import verified_rows
from bloodray.nightly import contract, tables
from bloodray.nightly.pending import refuse_pending
from bloodray.review.decisions import Decisions, ReviewError, parse_decisions

log = logging.getLogger(__name__)

#: Tries of a verified refresh whose inputs changed while it computed (a run or another import committed).
REFRESH_ATTEMPTS = 5
#: The analyst's query that lists reviews that no longer match an image.
UNMATCHED_QUERY = f"SELECT * FROM reviews WHERE {contract.REVIEW_STATUS} = '{contract.REVIEW_UNMATCHED}'"


@dataclass(frozen=True)
class ImportResult:
    """What ``review import`` appended (``already_imported``: this very file was imported before; nothing new)."""

    uri: str
    run_id: str
    n_reviews: int
    n_changed: int
    n_unmatched: int = 0
    n_signoffs: int = 0
    notes: list[str] = field(default_factory=list)
    already_imported: bool = False
    verified_uri: str | None = None


@dataclass(frozen=True)
class VerifiedRefresh:
    """One commit of a date's ``verified_differentials`` rows."""

    uri: str
    run_date: str
    n_samples: int
    n_verified: int
    n_reviews_unmatched: int


def _read_file(review_file: str, storage_options: Mapping[str, Any] | None) -> bytes:
    try:
        return read_file(review_file, storage_options, what="review file")
    except FileNotFoundError as exc:
        raise ReviewError(f"{review_file}: review file not found") from exc
    except (InputReadError, storage.StorageError) as exc:
        raise ReviewError(str(exc)) from exc
    except Exception as exc:  # noqa: BLE001
        raise storage.describe_storage_error(review_file, exc) from exc


def _date_state(con, run_date: str) -> dict[str, Any]:
    """The visible run, committed runs and cells of a date, from a connection of :func:`query.connect`."""
    runs = query.fetch_arrow(con, "SELECT run_id FROM runs WHERE run_date = ?", [run_date]).to_pylist()
    if not runs:
        raise ReviewError(f"no committed run for run_date={run_date}")
    committed = {r for (r,) in con.execute("SELECT run_id FROM all_runs WHERE run_date = ?", [run_date]).fetchall()}
    cells = query.fetch_arrow(con, "SELECT sample_id, image_uri, image_sha256, predicted_class FROM predictions "
                                   "WHERE run_date = ?", [run_date]).to_pylist()
    samples = {s for (s,) in con.execute("SELECT sample_id FROM differentials WHERE run_date = ?",
                                         [run_date]).fetchall()}
    return {"run_id": runs[0]["run_id"], "committed": committed, "cells": cells, "samples": samples}


def resolve(decisions: Decisions, run_date: str, state: Mapping[str, Any], source: str,
            now: dt.datetime) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[str]]:
    """Check each entry against the date; ``(review rows, sign-off rows, notes)`` to store and report.

    Sign-off rows lack ``verified_digest`` (filled once the reviews are in).
    Raises :class:`ReviewError` naming the entry (see the module docstring).
    """
    where, visible = decisions.where, state["run_id"]
    by_content = {(c["sample_id"], c["image_sha256"]): c for c in state["cells"]}
    by_uri = {c["image_uri"]: c for c in state["cells"]}
    reviews, notes, unmatched = [], [], 0
    for d in decisions.reviews:
        at = f"{where}: {d.entry}"
        seen_run = d.run_id or visible
        if seen_run not in state["committed"]:
            raise ReviewError(f"{at}: run_id {seen_run!r} is not a committed run of {run_date} (export the review "
                              "list again)")
        if d.image_sha256 is None and seen_run != visible:
            # Without the content, only the file names the cell, and a rerun may have changed the file.
            raise ReviewError(f"{at}: run_id {seen_run!r} is not the visible run {visible!r} of {run_date} and the "
                              "row has no image_sha256 (export the review list again)")
        cell = by_content.get((d.sample_id, d.image_sha256)) if d.image_sha256 else by_uri.get(d.image_uri)
        if seen_run == visible and (cell is None or cell["image_uri"] != d.image_uri):
            at_uri = by_uri.get(d.image_uri)
            why = ("not a prediction of run " + visible if at_uri is None else
                   f"its image_sha256 is not that of the image in run {visible}" if d.image_sha256 else
                   f"not a cell of sample {d.sample_id} in run {visible}")
            raise ReviewError(f"{at}: unknown cell {d.image_uri!r} ({why})")
        if cell is None:
            unmatched += 1
        reviews.append({
            "run_id": seen_run, "image_uri": d.image_uri,
            "old_class": cell["predicted_class"] if cell and seen_run == visible else d.predicted_class,
            "new_class": d.verified_class, "reviewer": d.reviewer, "reviewed_at": d.reviewed_at or now,
            "sample_id": cell["sample_id"] if cell else d.sample_id,
            "image_sha256": cell["image_sha256"] if cell else d.image_sha256, "source": source})
    if unmatched:
        notes.append(f"{unmatched} review(s) name an image that run {visible} (which replaced run "
                     f"{decisions.run_id} the file was exported from) no longer has with that content: kept as "
                     f"unmatched, see `bloodray query \"{UNMATCHED_QUERY}\"`")
    signoffs = []
    for s in decisions.signoffs:
        seen_run = decisions.run_id or visible
        if s.sample_id not in state["samples"]:
            if seen_run == visible:
                raise ReviewError(f"{where}: {s.entry}: sample {s.sample_id!r} is not a sample of run {visible}")
            notes.append(f"sign-off of sample {s.sample_id} kept, but run {visible} of {run_date} no longer has "
                         "that sample")
        elif seen_run != visible:
            notes.append(f"sign-off of sample {s.sample_id} was made on run {seen_run}; {run_date} has been "
                         f"rerun since (run {visible}): kept, and shown as outdated")
        signoffs.append({"run_id": seen_run, "sample_id": s.sample_id, "status": s.status, "reviewer": s.reviewer,
                         "signed_at": s.signed_at, "verified_digest": None, "source": source})
    return reviews, signoffs, notes


def _commit_record(output_uri: str, table: str, run_date: str, import_id: str, rows: list[dict[str, Any]],
                   storage_options: Mapping[str, Any] | None) -> tuple[str, bool]:
    """Append ``rows`` to a record table as one file and one commit; ``(uri, committed now)``.

    Keyed by ``import_id``: a file already committed under it is left as it is.
    """
    fs, root = contract.output_root(output_uri, storage_options)
    path = contract.review_path(root, run_date, import_id, table)
    uri = storage.full_uri(fs, path)
    if tables.is_committed(output_uri, table, import_id, storage_options):
        return uri, False
    data = pa.Table.from_pylist(rows, schema=contract.SCHEMAS[table]())
    try:
        storage.put_bytes(fs, path, storage.parquet_bytes(data), atomic=True)
    except Exception as exc:  # noqa: BLE001
        raise storage.describe_storage_error(uri, exc) from exc
    # The file is invisible until this commit; a failed commit leaves nothing imported, and the import can simply
    # be repeated (the same file name is written again).
    done = tables.commit_files(output_uri, table, run_date, import_id, [path], replace_date=False,
                               storage_options=storage_options)
    return uri, done


def import_decisions(output_uri: str, run_date: str, review_file: str, reviewer: str | None = None,
                     storage_options: Mapping[str, Any] | None = None) -> ImportResult:
    """Validate a decisions JSON or review CSV and append it to ``reviews`` and ``signoffs``; refresh verified.

    Raises :class:`ReviewError` (nothing is written) when any entry is
    invalid, the file is for another date, or it holds no decision.
    """
    run_date = str(run_date)
    data = _read_file(review_file, storage_options)
    decisions = parse_decisions(data, review_file, reviewer)
    if decisions.run_date is not None and decisions.run_date != run_date:
        raise ReviewError(f"{review_file}: decisions for run_date {decisions.run_date}, not --date {run_date}")
    if not decisions.reviews and not decisions.signoffs:
        what = "no row has a verified_class" if decisions.kind == "csv" else "no review and no sign-off"
        raise ReviewError(f"{review_file}: {what}; nothing to import")
    # A date in its commit window mixes two runs: the decisions would be matched against the wrong cells.
    refuse_pending(output_uri, run_date, ReviewError, storage_options)
    con = query.connect(output_uri, storage_options)
    try:
        state = _date_state(con, run_date)
    except ReviewError as exc:
        raise ReviewError(f"{output_uri}: {exc}") from None
    finally:
        con.close()
    now = dt.datetime.now(dt.timezone.utc)
    reviews, signoffs, notes = resolve(decisions, run_date, state, review_file, now)
    if decisions.output_uri and decisions.output_uri.rstrip("/") != str(output_uri).rstrip("/"):
        # Informational only (a bucket may be mounted under another name), but worth a look.
        notes.append(f"the file was exported from {decisions.output_uri}, and is imported into {output_uri}")
    import_id = f"review-{hashlib.sha256(data).hexdigest()[:24]}"
    fs, root = contract.output_root(output_uri, storage_options)
    uri, fresh = storage.full_uri(fs, contract.review_path(root, run_date, import_id)), False
    if reviews:
        uri, fresh = _commit_record(output_uri, contract.REVIEWS, run_date, import_id, reviews, storage_options)
    if signoffs:
        _fill_digests(output_uri, run_date, state["run_id"], signoffs, storage_options)
        signoff_uri, done = _commit_record(output_uri, contract.SIGNOFFS, run_date, import_id, signoffs,
                                           storage_options)
        uri, fresh = (uri if reviews else signoff_uri), fresh or done
    refresh = refresh_verified(output_uri, run_date, storage_options)
    current = {(c["sample_id"], c["image_sha256"]) for c in state["cells"]}
    return ImportResult(uri=uri, run_id=state["run_id"], n_reviews=len(reviews),
                        n_changed=sum(r["old_class"] != r["new_class"] for r in reviews),
                        n_unmatched=sum((r["sample_id"], r["image_sha256"]) not in current for r in reviews),
                        n_signoffs=len(signoffs),
                        notes=notes, already_imported=not fresh, verified_uri=refresh.uri)


def _fill_digests(output_uri: str, run_date: str, visible: str, signoffs: list[dict[str, Any]],
                  storage_options: Mapping[str, Any] | None) -> None:
    """Record what each sign-off of the visible run signs: the fingerprint of the sample's verified cells now."""
    con = query.connect(output_uri, storage_options)
    try:
        rows = verified_rows(con, [run_date], storage_options, digests=True)
    finally:
        con.close()
    digest = dict(zip(rows.column("sample_id").to_pylist(), rows.column("verified_digest").to_pylist()))
    for s in signoffs:
        # Signed on an earlier run of the date: what was signed is not the visible run's, so it stays outdated.
        s["verified_digest"] = digest.get(s["sample_id"]) if s["run_id"] == visible else None


def _inputs(output_uri: str, run_date: str, storage_options: Mapping[str, Any] | None) -> tuple[Any, ...]:
    """What a date's verified rows depend on: its visible run and its record rows (both only ever grow)."""
    visible = tables.visible_runs(output_uri, storage_options, run_date).column("run_id").to_pylist()
    counts = tuple(tables.read(output_uri, t, storage_options, run_dates=[run_date], columns=["sample_id"]).num_rows
                   for t in contract.RECORD_TABLES)
    return (tuple(visible), *counts)


def refresh_verified(output_uri: str, run_date: str,
                     storage_options: Mapping[str, Any] | None = None) -> VerifiedRefresh:
    """Commit the verified differentials of a date's visible run as the date's rows of ``verified_differentials``.

    The rows are those of the ``verified_differentials`` view (one code
    path). A run or an import that commits meanwhile may make them stale: the
    inputs are read again after the commit, and the rows recomputed until
    they agree, so the last writer of a date always leaves it current.
    """
    fs, root = contract.output_root(output_uri, storage_options)
    run_date = str(run_date)
    for _attempt in range(REFRESH_ATTEMPTS):
        before = _inputs(output_uri, run_date, storage_options)
        con = query.connect(output_uri, storage_options)
        try:
            rows = query.fetch_arrow(con, f"SELECT * FROM {contract.VERIFIED_DIFFERENTIALS} WHERE run_date = ?",
                                     [run_date])
            n_unmatched = con.execute(f"SELECT count(*) FROM ({UNMATCHED_QUERY}) WHERE run_date = ?",
                                      [run_date]).fetchone()[0]
        finally:
            con.close()
        refresh_id = f"verified-{dt.datetime.now(dt.timezone.utc):%Y%m%dT%H%M%S%fZ}-{uuid.uuid4().hex[:8]}"
        path = contract.review_path(root, run_date, refresh_id, contract.VERIFIED_DIFFERENTIALS)
        # The stored columns only: the view also has run_date (the partition) and the clearer alias names.
        schema = contract.verified_differentials_schema()
        data = rows.select(schema.names).cast(schema)
        try:
            storage.put_bytes(fs, path, storage.parquet_bytes(data), atomic=True)
        except Exception as exc:  # noqa: BLE001
            raise storage.describe_storage_error(storage.full_uri(fs, path), exc) from exc
        tables.commit_files(output_uri, contract.VERIFIED_DIFFERENTIALS, run_date, refresh_id, [path],
                            replace_date=True, storage_options=storage_options)
        if _inputs(output_uri, run_date, storage_options) == before:
            break
        log.info("verified_differentials of %s: a run or import committed meanwhile; computing again", run_date)
    else:
        log.warning("verified_differentials of %s may be stale (its inputs kept changing); the next import or run "
                    "of the date refreshes it, and the query view is always current", run_date)
    return VerifiedRefresh(uri=storage.full_uri(fs, path), run_date=run_date, n_samples=data.num_rows,
                           n_verified=sum(v or 0 for v in data.column("n_verified").to_pylist()),
                           n_reviews_unmatched=n_unmatched)


def refresh_after_commit(output_uri: str, run_date: str, run_id: str,
                         storage_options: Mapping[str, Any] | None = None) -> None:
    """Apply the date's reviews and sign-offs to the run just committed: refresh ``verified_differentials``.

    The nightly job's ``after_commit`` (:func:`bloodray.nightly.commit.commit_run`, wired by
    :func:`bloodray.nightly_job.classify`). Best effort, as the run is committed: on failure the
    ``verified_differentials`` query view is still current, and the next import or run of the date
    commits the table. Reviews that no longer match an image of the run (changed or removed) are
    reported, never dropped.
    """
    try:
        refreshed = refresh_verified(output_uri, run_date, storage_options)
    except Exception as exc:  # noqa: BLE001 - the run is committed either way
        log.warning("run %s: verified_differentials of %s not refreshed (%s); the query view is current and the "
                    "next review import or run of the date refreshes the table", run_id, run_date, exc)
        return
    if refreshed.n_verified:
        log.info("run %s: %d reviewed cell(s) of %s applied to it", run_id, refreshed.n_verified, run_date)
    if refreshed.n_reviews_unmatched:
        log.warning("run %s: %d review(s) of %s no longer match an image of this run (changed or removed since "
                    "they were made); they are kept: bloodray query \"%s\" --output %s", run_id,
                    refreshed.n_reviews_unmatched, run_date, UNMATCHED_QUERY, output_uri)


def refresh_dates(output_uri: str, run_date: str | None = None,
                  storage_options: Mapping[str, Any] | None = None) -> list[VerifiedRefresh]:
    """``bloodray review refresh``: commit ``verified_differentials`` for one date, or for every committed date.

    Imports and runs keep the table current by themselves; this fills it for
    dates classified before it existed (an output upgraded from an older bloodray).
    """
    dates = [str(run_date)] if run_date else tables.visible_runs(output_uri, storage_options).column(
        contract.RUN_DATE).to_pylist()
    if not dates:
        raise ReviewError(f"{output_uri}: no committed run; nothing to refresh")
    if run_date and not tables.visible_runs(output_uri, storage_options, str(run_date)).num_rows:
        raise ReviewError(f"{output_uri}: no committed run for run_date={run_date}")
    return [refresh_verified(output_uri, d, storage_options) for d in dates]
