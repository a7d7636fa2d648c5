"""Commits in progress: what readers are told about them, and what ``bloodray vacuum`` keeps for them.

A run is in its *commit window* from the moment its commit intent
(``_commits/run_date=<D>/<run_id>.json``, :mod:`bloodray.nightly.commit`) is
written until its manifest is committed and the intent removed. In that
window the tables of the date mix it with the date's previous run: some
tables have it, others not yet. The window is either

* *live*: the run still holds the date's lease (:mod:`bloodray.nightly.lease`):
  it is committing right now and closes the window within seconds; or
* *stopped*: its process died (or lost its lease) half-way; the next run of
  the date completes the commit before anything else
  (:func:`bloodray.nightly.tables.complete_pending_commits`).

Readers name which (:func:`pending_commits`, :meth:`PendingCommit.describe`):
``query`` warns, ``report`` warns in the HTML too, ``review export`` and
``review import`` refuse.

The vacuum rule (:func:`vacuum`): a file goes only when all of these hold

1. Delta's own vacuum lists it: no version younger than the retention needs it;
2. no pending intent lists it: neither a run's nor ``upgrade-output``'s
   (``_commits/upgrade-output.json``) -- so a crashed commit stays completable
   after any vacuum;
3. it is not a file of a run that holds a live lease (files put in place
   before its intent is written);
4. it is not in a records table (:data:`bloodray.nightly.contract.RECORD_TABLES`: reviews and sign-offs
   are never vacuumed, committed or not);
5. the current version of its table does not list it (read again after 2 and
   3, for a commit that finished in between).

Vacuum never touches ``_staging/``, ``_commits/``, ``_leases/`` or
``run_configs/``; :func:`protected_paths` also names the staging folders of
live and pending runs, for any other clean-up to keep.
"""

from __future__ import annotations

import json
import logging
import posixpath
from dataclasses import dataclass, field
from typing import Any, Mapping

from bloodray import storage
from bloodray.nightly import contract, tables
from bloodray.nightly.lease import holder_is_live, lease_records
from bloodray.nightly.legacy import refuse_legacy

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PendingCommit:
    """A run in its commit window; ``live`` while it holds the date's lease."""

    run_id: str
    run_date: str
    live: bool
    expires_at: str | None = None

    def describe(self) -> str:
        """One line: which run, which date, live or stopped, and what the reader should do."""
        if self.live:
            return (f"run {self.run_id} of {self.run_date} is committing right now (it holds the date's lease "
                    f"until {self.expires_at}): until it has finished, the tables of {self.run_date} mix it with "
                    "the date's previous run")
        return (f"run {self.run_id} of {self.run_date} stopped half-way through its commit: the tables of "
                f"{self.run_date} mix it with the date's previous run until the next run of the date completes "
                "it; run the date again")

    def advice(self) -> str:
        """What to do before reading the date again."""
        return "try again when it has finished" if self.live else "then try again"


def pending_commits(output_uri: str, storage_options: Mapping[str, Any] | None = None,
                    run_date: str | None = None) -> list[PendingCommit]:
    """Runs in their commit window (of ``run_date``, or of every date), live or stopped."""
    intents = tables.pending_intents(output_uri, storage_options, run_date)
    if not intents:
        return []
    leases = lease_records(output_uri, storage_options)
    found = []
    for intent in intents:
        record = leases.get(str(intent["run_date"]), {})
        live = record.get("run_id") == intent["run_id"] and holder_is_live(record)
        found.append(PendingCommit(str(intent["run_id"]), str(intent["run_date"]), live,
                                   str(record.get("expires_at")) if live else None))
    return found


def refuse_pending(output_uri: str, run_date: str, error: type[Exception],
                   storage_options: Mapping[str, Any] | None = None) -> None:
    """Raise ``error`` (one line) when a run of ``run_date`` is in its commit window."""
    for commit in pending_commits(output_uri, storage_options, run_date):
        raise error(f"{output_uri}: {commit.describe()}; {commit.advice()}")


# --------------------------------------------------------------------------- what vacuum keeps
@dataclass
class Protected:
    """Paths relative to the output root: whole files, and folders (``prefix/``) with everything under them."""

    files: dict[str, str] = field(default_factory=dict)  # path -> why
    folders: dict[str, str] = field(default_factory=dict)  # "prefix/" -> why

    def why(self, path: str) -> str | None:
        """Why ``path`` (relative to the root) must be kept, or None."""
        if path in self.files:
            return self.files[path]
        return next((why for prefix, why in self.folders.items() if path.startswith(prefix)), None)


def protected_paths(output_uri: str, storage_options: Mapping[str, Any] | None = None) -> Protected:
    """Everything a pending intent (a run's or upgrade-output's) or a live lease still needs."""
    fs, root = contract.output_root(output_uri, storage_options)
    keep = Protected()
    base = posixpath.join(root, contract.COMMITS)
    fs.invalidate_cache()
    try:
        intents = sorted(p for p in fs.find(base) if p.endswith(".json"))
    except FileNotFoundError:
        intents = []
    for path in intents:
        try:
            intent = json.loads(fs.cat_file(path))
            run_id = intent.get("run_id")
            why = (f"needed by the pending commit of run {run_id}" if run_id
                   else f"listed by the pending {posixpath.basename(path)}")
            for files in intent.get("files", {}).values():
                keep.files.update((str(f), why) for f in files)
        except FileNotFoundError:
            continue  # finished in between: its files are in the tables now (rule 5)
        except Exception as exc:  # noqa: BLE001 - cannot tell what it needs: delete nothing
            raise storage.StorageError(f"{storage.full_uri(fs, path)}: unreadable commit intent ({exc}); "
                                       "vacuum deletes nothing while it cannot tell what a pending commit "
                                       "needs") from exc
        if run_id:
            keep.folders[posixpath.join(contract.STAGING, str(run_id)) + "/"] = why
    for run_date, record in lease_records(output_uri, storage_options).items():
        if not holder_is_live(record):
            continue
        run_id = str(record.get("run_id"))
        why = f"needed by run {run_id}, live (it holds the lease of {run_date})"
        for table in contract.TABLES:
            keep.folders[posixpath.relpath(contract.partition_dir(root, table, run_date, run_id), root) + "/"] = why
        keep.files[posixpath.relpath(contract.manifest_path(root, run_date, run_id), root)] = why
        keep.folders[posixpath.join(contract.STAGING, run_id) + "/"] = why
    return keep


@dataclass
class VacuumResult:
    """Per table: the files deleted (or deletable, with ``dry_run``) and those kept, with why; relative to the table."""

    deleted: dict[str, list[str]] = field(default_factory=dict)
    kept: dict[str, dict[str, str]] = field(default_factory=dict)


def vacuum(output_uri: str, storage_options: Mapping[str, Any] | None = None, *,
           retain_hours: int = tables.DEFAULT_RETAIN_HOURS, dry_run: bool = False) -> VacuumResult:
    """Delete, in every Delta table, the files the vacuum rule (module docstring) lets go.

    Superseded runs' files (removed from a table by a later run of the date),
    and files of runs that never committed and never will, go once older than
    ``retain_hours``; ``bloodray query --as-of`` cannot go back further than
    that afterwards. Refuses a pre-Delta root and a half-upgraded one
    (:class:`bloodray.nightly.legacy.LegacyOutputError`).
    """
    refuse_legacy(output_uri, storage_options)
    fs, root = contract.output_root(output_uri, storage_options)
    candidates: dict[str, list[str]] = {}
    for table in contract.DELTA_TABLES:
        if table in contract.RECORD_TABLES:
            continue  # rule 4
        delta = tables.open_table(output_uri, table, storage_options)
        if delta is None:
            continue
        try:
            candidates[table] = delta.vacuum(retention_hours=retain_hours, dry_run=True,
                                             enforce_retention_duration=False, full=True)
        except Exception as exc:  # noqa: BLE001
            raise tables.describe_table_error(delta.table_uri, exc) from exc
    # Read after the listing: a run whose files were listed was in flight (lease or intent) when it was taken.
    keep = protected_paths(output_uri, storage_options)
    result = VacuumResult()
    for table, files in candidates.items():
        delta = tables.open_table(output_uri, table, storage_options)  # the current version, now
        current = set(delta.get_add_actions(flatten=True).column("path").to_pylist())
        kept: dict[str, str] = {}
        deleted = []
        for rel in files:
            why = keep.why(posixpath.join(table, rel))
            if why:
                kept[rel] = why
            elif rel not in current:
                deleted.append(rel)
        if deleted and not dry_run:
            paths = [posixpath.join(contract.table_dir(root, table), rel) for rel in deleted]
            try:
                fs.rm(paths)
                delta.cleanup_metadata()
            except Exception as exc:  # noqa: BLE001
                raise storage.describe_storage_error(storage.full_uri(fs, contract.table_dir(root, table)),
                                                     exc) from exc
        result.deleted[table] = deleted
        if kept:
            result.kept[table] = kept
            log.info("%s: kept %d file(s) vacuum would have deleted (%s)", table, len(kept),
                     "; ".join(sorted(set(kept.values()))))
    return result
