"""The output tables as Delta Lake tables: commits, reads, time travel and vacuum.

Every table of an output root (:data:`bloodray.nightly.contract.DELTA_TABLES`:
the four data tables, ``runs``, ``reviews``, ``signoffs`` and ``verified_differentials``) is a Delta Lake table at
``<output>/<table>/``, partitioned by ``run_date`` (hive-style directories,
the value in the Delta log, never a column inside the files). The data files
keep the layout of :mod:`bloodray.nightly.contract`; what makes a file part
of a table is the Delta log in ``<table>/_delta_log/``, written by
``deltalake`` (delta-rs), so every Delta reader -- ``deltalake``/pyarrow,
Spark, Trino, Athena, Polars, DuckDB's ``delta`` extension -- reads exactly
the committed rows.

How a nightly run lands (:func:`bloodray.nightly.commit.commit_run`): its
files are copied into place first (invisible: not in any log), then an intent
record ``_commits/run_date=<D>/<run_id>.json`` is written, then each data table
gets one Delta commit that replaces the date's partition (``mode=overwrite``
with a ``run_date`` partition filter: remove the old files, add the new, in
one log entry), and ``runs`` gets the manifest row appended last. Every commit
carries the Delta app transaction ``bloodray-run-<run_id>``, so completing a
half-done commit (:func:`complete_pending_commits`) skips the tables already
done. Superseded files stay in the table for time travel (``bloodray query
--as-of``) until ``bloodray vacuum`` (:func:`bloodray.nightly.pending.vacuum`).

Concurrent writers: delta-rs writes each log entry with a put-if-absent (on S3
a conditional write), so of two commits racing for one version exactly one
wins; the other re-reads the log, checks that it touched other partitions
(another date) and commits as the next version. bloodray's lease
(:mod:`bloodray.nightly.lease`) keeps to one writer per output and date, so
such races are only ever between different dates. An S3-compatible store
without conditional writes needs delta-rs's DynamoDB lock
(``AWS_S3_LOCKING_PROVIDER=dynamodb``, set in the environment).

Credentials: delta-rs does not use botocore, so for S3 the current credentials
of the standard AWS chain are resolved at each call and handed to it in
memory only (never logged or saved); data files themselves are read and
written through fsspec as everywhere else.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import posixpath
import random
import time
from typing import Any, Iterable, Mapping

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs

from bloodray import storage
from bloodray.nightly import contract, dictionary

log = logging.getLogger(__name__)

#: Default of ``bloodray vacuum --retain-hours``: Delta's own default (``delta.deletedFileRetentionDuration``).
DEFAULT_RETAIN_HOURS = 7 * 24
#: Order in which a run commits its tables; ``runs`` (the manifest) always last.
COMMIT_ORDER: tuple[str, ...] = ("thumbnails", "errors", "predictions", "differentials")
#: Tries of one table commit that lost a race delta-rs does not resolve itself (a concurrent metadata change).
COMMIT_ATTEMPTS = 5


class TableError(RuntimeError):
    """A Delta table of an output root cannot be read or committed; the message names the table URI."""


def app_id(run_id: str) -> str:
    """Delta app transaction id of a run's commits (one per table), or of a review import's (its review id)."""
    return f"bloodray-run-{run_id}"


# --------------------------------------------------------------------------- locations and options
def table_path(root: str, table: str) -> str:
    """fsspec path of one table's root (its ``_delta_log/`` lives here)."""
    return contract.table_dir(root, table)


def _table_uri(fs, root: str, table: str) -> str:
    return storage.full_uri(fs, table_path(root, table))


def delta_storage_options(fs, storage_options: Mapping[str, Any] | None = None) -> dict[str, str]:
    """delta-rs storage options for the filesystem of an output root ({} for local disk).

    The endpoint and region come from bloodray's storage options; the
    credentials are the current ones of botocore's chain (environment, shared
    config, ``credential_process``, instance or web identity), resolved now.
    """
    if storage.is_local(fs):
        return {}
    import botocore.session

    opts = dict(storage_options or {})
    client_kwargs = dict(opts.get("client_kwargs") or {})
    endpoint = opts.get("endpoint_url") or client_kwargs.get("endpoint_url")
    session = botocore.session.Session()
    region = client_kwargs.get("region_name") or session.get_config_variable("region") or "us-east-1"
    out = {"AWS_REGION": region}
    # The same connect and answer timeouts as bloodray's s3fs filesystems (storage.*_timeout_s).
    timeouts = dict(opts.get("config_kwargs") or {})
    out["connect_timeout"] = f"{int(1000 * timeouts.get('connect_timeout', storage.DEFAULT_CONNECT_TIMEOUT_S))}ms"
    out["timeout"] = f"{int(1000 * timeouts.get('read_timeout', storage.DEFAULT_READ_TIMEOUT_S))}ms"
    if endpoint:
        out["AWS_ENDPOINT_URL"] = endpoint
        if endpoint.startswith("http://"):
            out["AWS_ALLOW_HTTP"] = "true"
    creds = session.get_credentials()
    if creds is not None:
        frozen = creds.get_frozen_credentials()
        out["AWS_ACCESS_KEY_ID"] = frozen.access_key
        out["AWS_SECRET_ACCESS_KEY"] = frozen.secret_key
        if frozen.token:
            out["AWS_SESSION_TOKEN"] = frozen.token
    return out


def describe_table_error(uri: str, exc: BaseException) -> TableError:
    """One line for a delta-rs error on ``uri``: its first line, never the storage options."""
    # delta-rs errors span many lines (retry chains); keep the first, and never the options.
    first = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
    return TableError(f"{uri}: Delta table error: {first}")


def open_table(output_uri: str, table: str, storage_options: Mapping[str, Any] | None = None,
               as_of: dt.datetime | None = None):
    """The ``deltalake.DeltaTable`` of ``table``, or None when nothing was committed to it yet.

    ``as_of``: the table as it was at that time (Delta time travel: the
    latest version committed by then; before the first run, the empty
    version 0 that created the table).
    """
    from deltalake import DeltaTable
    from deltalake.exceptions import TableNotFoundError

    fs, root = contract.output_root(output_uri, storage_options)
    uri = _table_uri(fs, root, table)
    try:
        if not fs.exists(posixpath.join(table_path(root, table), "_delta_log")):
            return None
    except Exception as exc:  # noqa: BLE001
        raise storage.describe_storage_error(uri, exc) from exc
    try:
        delta = DeltaTable(uri, storage_options=delta_storage_options(fs, storage_options))
    except TableNotFoundError:
        return None
    except Exception as exc:  # noqa: BLE001
        raise describe_table_error(uri, exc) from exc
    if as_of is not None:
        # delta-rs loads the earliest version for a time before it; ours is always the empty CREATE TABLE.
        try:
            delta.load_as_version(as_of)
        except Exception as exc:  # noqa: BLE001
            raise describe_table_error(uri, exc) from exc
    return delta


def _schema(table: str) -> pa.Schema:
    # Column comments (the data dictionary) travel in the Delta schema, so any Delta reader can show them.
    return dictionary.documented_schema(table, contract.with_run_date(contract.SCHEMAS[table]()))


def _ensure_table(fs, root: str, table: str, storage_options: Mapping[str, Any] | None):
    """Open ``table``, creating it (empty, version 0) on first use; safe against a racing creator."""
    from deltalake import DeltaTable

    uri = _table_uri(fs, root, table)
    options = delta_storage_options(fs, storage_options)
    try:
        return DeltaTable(uri, storage_options=options)
    except Exception:  # noqa: BLE001 - not there yet
        pass
    try:
        DeltaTable.create(uri, schema=_schema(table), mode="ignore", partition_by=[contract.RUN_DATE],
                          name=table, storage_options=options)
    except Exception as exc:  # noqa: BLE001 - lost a race with another creator: open theirs
        log.debug("creating %s: %s", uri, exc)
    try:
        return DeltaTable(uri, storage_options=options)
    except Exception as exc:  # noqa: BLE001
        raise describe_table_error(uri, exc) from exc


def _evolve(delta, table: str):
    """Add the contract's columns a table created by an older bloodray lacks (its old files read them as null).

    Without this, other Delta readers (Spark, Trino, ``deltalake``) would keep
    the table's first schema and never show the newer columns.
    """
    from deltalake import Schema

    have = {f.name for f in delta.schema().fields}
    missing = [f for f in _schema(table) if f.name not in have]
    if missing:
        delta.alter.add_columns(list(Schema.from_arrow(pa.schema(missing)).fields))
        delta.update_incremental()
    return delta


def _add_action(fs, table_root: str, path: str, run_date: str):
    """A Delta ``add`` action for a Parquet file already in place (row count from its footer)."""
    import pyarrow.parquet as pq
    from deltalake.transaction import AddAction

    info = fs.info(path)
    with fs.open(path, "rb") as fh:
        rows = pq.ParquetFile(fh).metadata.num_rows
    mtime = info.get("mtime") or info.get("LastModified") or info.get("created")
    if isinstance(mtime, dt.datetime):
        millis = int(mtime.timestamp() * 1000)
    elif isinstance(mtime, (int, float)):
        millis = int(mtime * 1000)
    else:
        millis = int(time.time() * 1000)
    return AddAction(path=posixpath.relpath(path, table_root), size=int(info["size"]),
                     partition_values={contract.RUN_DATE: run_date}, modification_time=millis,
                     data_change=True, stats=json.dumps({"numRecords": rows}))


def commit_files(output_uri: str, table: str, run_date: str, run_id: str, files: Iterable[str], *,
                 replace_date: bool, storage_options: Mapping[str, Any] | None = None) -> bool:
    """Commit Parquet files already under the table's ``run_date=<D>/`` to ``table`` in one Delta commit.

    ``replace_date``: the commit also removes every file the date had
    (``overwrite`` of that partition), else it appends. Idempotent per run:
    returns False (nothing done) when the run's app transaction is already in
    the table's log.
    """
    from deltalake import CommitProperties, Transaction
    from deltalake.exceptions import CommitFailedError

    fs, root = contract.output_root(output_uri, storage_options)
    uri = _table_uri(fs, root, table)
    try:
        actions = [_add_action(fs, table_path(root, table), f, run_date) for f in files]
    except Exception as exc:  # noqa: BLE001
        raise storage.describe_storage_error(uri, exc) from exc
    props = CommitProperties(app_transactions=[Transaction(app_id(run_id), 1)],
                             custom_metadata={"bloodray.run_id": run_id, "bloodray.run_date": run_date})
    for attempt in range(COMMIT_ATTEMPTS):
        # Re-read the log on every attempt: delta-rs resolves racing commits of other partitions by itself, but
        # not one that raced a change of the table's metadata (two writers creating a fresh table).
        delta = _ensure_table(fs, root, table, storage_options)
        if delta.transaction_version(app_id(run_id)) is not None:
            return False
        try:
            _evolve(delta, table)
            delta.create_write_transaction(
                actions, mode="overwrite" if replace_date else "append", schema=_schema(table),
                partition_by=[contract.RUN_DATE],
                partition_filters=[(contract.RUN_DATE, "=", run_date)] if replace_date else None,
                commit_properties=props)
            return True
        except CommitFailedError as exc:
            if attempt + 1 == COMMIT_ATTEMPTS:
                raise describe_table_error(uri, exc) from exc
            log.debug("%s: commit of run %s conflicted (%s); retrying", uri, run_id, exc)
            time.sleep(random.uniform(0.05, 0.5) * (attempt + 1))
        except Exception as exc:  # noqa: BLE001
            raise describe_table_error(uri, exc) from exc
    raise AssertionError("unreachable")


def is_committed(output_uri: str, table: str, run_id: str,
                 storage_options: Mapping[str, Any] | None = None) -> bool:
    """True when ``run_id`` has committed to ``table`` (its app transaction is in the log)."""
    delta = open_table(output_uri, table, storage_options)
    return delta is not None and delta.transaction_version(app_id(run_id)) is not None


# --------------------------------------------------------------------------- reads
def arrow_subtree(fs, path: str) -> pafs.FileSystem:
    """A pyarrow filesystem rooted at ``path`` (Delta file paths are relative to the table root)."""
    return pafs.SubTreeFileSystem(path if not storage.is_local(fs) else posixpath.abspath(path),
                                  contract.arrow_filesystem(fs))


def dataset(output_uri: str, table: str, storage_options: Mapping[str, Any] | None = None, *,
            run_dates: Iterable[str] | None = None, as_of: dt.datetime | None = None,
            dated: bool = False) -> ds.Dataset:
    """A pyarrow dataset over the committed rows of ``table`` (``run_date`` included), lazy.

    The Delta log picks the files; pyarrow reads them through bloodray's
    fsspec filesystem. Empty, with the contract's columns, when the table has
    no commit (or had none at ``as_of``). ``run_dates`` prunes to those dates.
    ``dated``: ``run_date`` as readers see it, a date (:func:`bloodray.nightly.contract.dated`) rather than the
    stored text; the partition values are typed, so a filter on ``run_date`` still prunes files.
    """
    schema = contract.dated(_schema(table)) if dated else _schema(table)
    delta = open_table(output_uri, table, storage_options, as_of)
    if delta is None:
        return ds.dataset(schema.empty_table())
    fs, root = contract.output_root(output_uri, storage_options)
    dates = sorted(set(run_dates)) if run_dates is not None else None
    if dates is not None and not dates:
        return ds.dataset(schema.empty_table())
    partitions = [(contract.RUN_DATE, "in", dates)] if dates else None
    try:
        return delta.to_pyarrow_dataset(file_pruning_predicate=partitions, schema=schema,
                                        filesystem=arrow_subtree(fs, table_path(root, table)))
    except Exception as exc:  # noqa: BLE001
        raise describe_table_error(_table_uri(fs, root, table), exc) from exc


def read(output_uri: str, table: str, storage_options: Mapping[str, Any] | None = None, *,
         run_dates: Iterable[str] | None = None, as_of: dt.datetime | None = None,
         columns: list[str] | None = None) -> pa.Table:
    """The committed rows of ``table`` (see :func:`dataset`) as a pyarrow Table."""
    fs, root = contract.output_root(output_uri, storage_options)
    try:
        return dataset(output_uri, table, storage_options, run_dates=run_dates, as_of=as_of).to_table(
            columns=columns)
    except (TableError, storage.StorageError):
        raise
    except Exception as exc:  # noqa: BLE001
        raise storage.describe_storage_error(_table_uri(fs, root, table), exc) from exc


def committed_runs(output_uri: str, storage_options: Mapping[str, Any] | None = None,
                   run_date: str | None = None, as_of: dt.datetime | None = None) -> pa.Table:
    """Every committed run manifest (``runs`` table, ``run_date`` included), visible or superseded.

    ``as_of``: the ``runs`` table as it was then (its Delta version), as the data tables are read, so the
    manifests and the rows agree: a run's manifest is committed after its data.
    """
    return read(output_uri, contract.RUNS, storage_options, run_dates=[run_date] if run_date else None, as_of=as_of)


def visible_runs(output_uri: str, storage_options: Mapping[str, Any] | None = None,
                 run_date: str | None = None, as_of: dt.datetime | None = None) -> pa.Table:
    """The visible run of each date: the committed manifest with the latest ``committed_at``.

    Returns the manifest rows (schema :func:`bloodray.nightly.contract.runs_schema`
    plus ``run_date``), one per date, ordered by date; ``run_date`` restricts
    to one date, ``as_of`` to runs committed by then.
    """
    runs = committed_runs(output_uri, storage_options, run_date, as_of)
    if runs.num_rows == 0:
        return runs
    import duckdb

    con = duckdb.connect()
    try:
        con.register("manifests", runs)
        out = con.sql(contract.visible_runs_sql("manifests")).to_arrow_table()
    finally:
        con.close()
    return out.cast(_schema(contract.RUNS))


def run_rows(output_uri: str, table: str, runs: pa.Table,
             storage_options: Mapping[str, Any] | None = None) -> ds.Dataset:
    """The rows of ``table`` written by ``runs`` (manifest rows with ``run_date`` and ``run_id``), lazy."""
    dates = runs.column(contract.RUN_DATE).to_pylist()
    data = dataset(output_uri, table, storage_options, run_dates=dates)
    if not dates:
        return data
    return data.filter(ds.field("run_id").isin(runs.column("run_id").to_pylist()))


# --------------------------------------------------------------------------- intents and vacuum
def write_intent(output_uri: str, run_date: str, run_id: str, files: Mapping[str, list[str]],
                 storage_options: Mapping[str, Any] | None = None) -> None:
    """Record that ``run_id`` commits now, with the files of each table (paths relative to the output root)."""
    fs, root = contract.output_root(output_uri, storage_options)
    payload = {"run_id": run_id, "run_date": run_date, "files": dict(files)}
    storage.put_bytes(fs, contract.intent_path(root, run_date, run_id), json.dumps(payload, indent=1).encode(), atomic=True)


def pending_intents(output_uri: str, storage_options: Mapping[str, Any] | None = None,
                    run_date: str | None = None) -> list[dict[str, Any]]:
    """Commit intents of runs still on record: runs committing now, or stopped between their first table commit
    and their manifest (``_commits/run_date=<D>/<run_id>.json``; other intents, such as upgrade-output's, are not
    a run's)."""
    fs, root = contract.output_root(output_uri, storage_options)
    base = posixpath.join(root, contract.COMMITS)
    directory = posixpath.join(base, f"{contract.RUN_DATE_PREFIX}{run_date}") if run_date else base
    fs.invalidate_cache()
    try:
        paths = sorted(p for p in fs.find(directory) if p.endswith(".json")
                       and posixpath.basename(posixpath.dirname(p)).startswith(contract.RUN_DATE_PREFIX))
    except FileNotFoundError:
        return []
    intents = []
    for path in paths:
        try:
            intents.append(json.loads(fs.cat_file(path)))
        except Exception as exc:  # noqa: BLE001
            log.warning("%s: unreadable commit intent (%s)", storage.full_uri(fs, path), exc)
    return intents


def apply_intent(output_uri: str, intent: Mapping[str, Any],
                 storage_options: Mapping[str, Any] | None = None) -> list[str]:
    """Commit every table of an intent that does not have it yet, the manifest last; remove the intent.

    Returns the tables committed now. The caller holds the date's lease.
    """
    fs, root = contract.output_root(output_uri, storage_options)
    run_id, run_date = intent["run_id"], intent["run_date"]
    done = []
    for table in [*COMMIT_ORDER, contract.RUNS]:
        files = [posixpath.join(root, f) for f in intent["files"].get(table, [])]
        if not files:
            continue
        if commit_files(output_uri, table, run_date, run_id, files, replace_date=table != contract.RUNS,
                        storage_options=storage_options):
            done.append(table)
    path = contract.intent_path(root, run_date, run_id)
    try:
        fs.rm(path)
    except FileNotFoundError:
        pass
    return done


def missing_files(output_uri: str, intent: Mapping[str, Any],
                  storage_options: Mapping[str, Any] | None = None) -> list[str]:
    """Files an intent still has to commit (tables without its app transaction) that are gone."""
    fs, root = contract.output_root(output_uri, storage_options)
    fs.invalidate_cache()
    gone = []
    for table, files in intent["files"].items():
        if files and not is_committed(output_uri, table, intent["run_id"], storage_options):
            gone += [f for f in files if not fs.exists(posixpath.join(root, f))]
    return gone


def complete_pending_commits(output_uri: str, run_date: str,
                             storage_options: Mapping[str, Any] | None = None) -> list[str]:
    """Finish the commits of runs of ``run_date`` that stopped half-way; returns their run ids.

    Called by the next run of the date while it holds the date's lease, so the
    tables agree again before anything else is written. An intent whose files
    are gone (deleted by the vacuum of a bloodray from before vacuum kept
    them) cannot be completed: it is left, with a warning, and the commit of
    the run that replaces the date removes it (:func:`drop_superseded_intents`).
    """
    finished = []
    for intent in pending_intents(output_uri, storage_options, run_date):
        gone = missing_files(output_uri, intent, storage_options)
        if gone:
            log.warning("run %s of %s stopped half-way through its commit and cannot be completed: %d of its "
                        "files are gone (e.g. %s); the tables of %s disagree until this run replaces the date",
                        intent["run_id"], run_date, len(gone), gone[0], run_date)
            continue
        tables = apply_intent(output_uri, intent, storage_options)
        log.warning("run %s of %s had stopped half-way through its commit; completed it (%s)",
                    intent["run_id"], run_date, ", ".join(tables) or "nothing left to commit")
        finished.append(intent["run_id"])
    return finished


def drop_superseded_intents(output_uri: str, run_date: str, run_id: str,
                            storage_options: Mapping[str, Any] | None = None) -> list[str]:
    """Remove the intents of ``run_date`` other than ``run_id``'s, once ``run_id`` has committed every table.

    Such an intent could not be completed (:func:`complete_pending_commits`);
    the later run has replaced the date in every table, so nothing of it is
    wanted any more. Returns the run ids whose intents were removed.
    """
    fs, root = contract.output_root(output_uri, storage_options)
    dropped = []
    for intent in pending_intents(output_uri, storage_options, run_date):
        if intent["run_id"] != run_id:
            try:
                fs.rm(contract.intent_path(root, run_date, intent["run_id"]))
            except FileNotFoundError:
                pass
            log.warning("removed the commit intent of run %s of %s: run %s has replaced the date",
                        intent["run_id"], run_date, run_id)
            dropped.append(intent["run_id"])
    return dropped
