"""SQL access to a bloodray output root through DuckDB.

An output root (local path or ``s3://bucket/prefix``) is laid out as
:mod:`bloodray.nightly.contract` says; its tables are Delta Lake tables read
through :mod:`bloodray.nightly.tables`. The contract also owns the column
types of the views and the rule of which run is visible: each run of a date
replaces the date's rows of every table, and ``runs`` keeps the manifest of
every committed run. :func:`connect` returns a DuckDB connection with these views:

``runs``           the visible run of every date (one row per date)
``all_runs``       every committed manifest, superseded reruns included
``predictions``    the committed rows: the visible run of each date
``differentials``  idem
``errors``         idem
``thumbnails``     idem: a small JPEG (``jpeg`` BLOB) per classified image
``reviews``        every reviewer's correction, with ``review_status`` (:mod:`bloodray.analysis.review_views`)
``signoffs``       every sign-off (or reopening) of a sample
``verified_differentials``  differentials counted from verified classes where reviewed

Every view has ``run_date`` as a ``DATE`` (:data:`~bloodray.nightly.contract.RUN_DATE_TYPE`), so
``run_date + 1``, ``run_date >= current_date - 7`` and ``date_trunc('month', run_date)`` work. The tables store
it as text (the Delta partition value, ``'YYYY-MM-DD'``); the partition values are read typed, so a filter on
``run_date`` still reads only that date's files. Queries written when the views showed text keep working where
they compare with a string: DuckDB casts a string literal (or a ``?`` parameter) compared with a ``DATE`` to a
date (``run_date = '2026-11-30'``, ``IN ('...', '...')``, ``BETWEEN``). String functions need an explicit
cast: ``run_date::VARCHAR LIKE '2026-11-%'`` (or ``strftime(run_date, '%Y-%m')``).

The views read what a Delta reader reads: files of uncommitted or superseded
runs, and anything under ``_staging/``, never show. They are a snapshot of
the tables' versions when :func:`connect` ran (reconnect to see a run
committed later), or of the versions current at ``as_of`` (time travel).

The connection is read-only over the outputs and locked: the data views scan
pyarrow datasets registered on the connection (pyarrow reads the files,
through the same fsspec filesystem, credentials chain and ``endpoint_url`` as
the rest of bloodray), and then DuckDB's own settings turn file access off
(``enable_external_access=false``) and freeze every setting
(``lock_configuration=true``). SQL can therefore not read or write any file
(``COPY ... TO``, ``ATTACH``, ``read_csv``, ``read_text``, ``glob``), install or
load extensions, or change a setting to undo this. DuckDB's temp directory,
which it exempts from that switch, is turned off (``temp_directory=''``): a
query that outgrows memory fails rather than spill to disk. DuckDB's ``allowed_paths``
is not used: it admits writes to the allowed files as well as reads.
"""

from __future__ import annotations

import datetime as _dt
import logging
import posixpath
import re
import threading
from typing import Any, Mapping, Sequence

import duckdb
import pyarrow as pa

from bloodray import storage
from bloodray.analysis.formats import DEFAULT_MAX_ROWS, EXPORT_FORMATS, FORMATS, format_table, write_export
from bloodray.analysis.review_views import create_views as create_review_views
from bloodray.nightly import contract, dictionary, tables
from bloodray.nightly.legacy import refuse_legacy
from bloodray.nightly.pending import pending_commits

#: Data tables laid out as ``<table>/run_date=<D>/<run_id>/*.parquet``.
DATA_TABLES: tuple[str, ...] = contract.TABLES
#: Every view :func:`connect` creates.
VIEWS: tuple[str, ...] = ((contract.RUNS, "all_runs") + DATA_TABLES
                          + (contract.REVIEWS, contract.SIGNOFFS, contract.VERIFIED_DIFFERENTIALS))
#: Top-level folders of an output root (any one of them makes a folder an output root).
ROOT_FOLDERS: tuple[str, ...] = (contract.RUNS, contract.RUN_CONFIGS, contract.STAGING) + contract.TABLES

RUN_DATE_PREFIX = contract.RUN_DATE_PREFIX

log = logging.getLogger(__name__)


class QueryError(RuntimeError):
    """A query against an output root failed; the message names the root."""


# --------------------------------------------------------------------------- schemas
def _empty_view_sql(name: str) -> str:
    """A view with the contract's columns and no rows, so queries bind on a fresh root too."""
    cols = ", ".join(f"CAST(NULL AS {typ}) AS {_ident(col)}" for col, typ in contract.duckdb_columns(name))
    return f"SELECT {cols} WHERE false"


# --------------------------------------------------------------------------- helpers
def _sql_str(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def fetch_arrow(con: duckdb.DuckDBPyConnection, sql: str, params: Sequence[Any] | None = None) -> pa.Table:
    """Run ``sql`` on ``con`` and return every row as a pyarrow Table.

    Goes through ``con.sql`` (a relation) rather than ``con.execute``: DuckDB 2
    warns that Arrow output of a DB-API result costs an extra copy. DuckDB 1.4+
    turned ``.arrow()`` into a RecordBatchReader and added ``to_arrow_table()``;
    older releases only have ``fetch_arrow_table()``. A statement that returns
    nothing (DuckDB 1.x gives ``None``) yields an empty table.
    """
    rel = con.sql(sql, params=list(params)) if params else con.sql(sql)
    if rel is None:
        return pa.table({})
    fetch = getattr(rel, "to_arrow_table", None) or rel.fetch_arrow_table
    return fetch()


def _check_root(fs: Any, root: str, output_uri: str) -> None:
    """Refuse a root that does not exist, and a non-empty folder that holds none of the output folders.

    An empty folder is a root no run has written to yet (its views are empty).
    """
    try:
        exists = fs.isdir(root)
        names = {posixpath.basename(p.rstrip("/")) for p in fs.ls(root, detail=False)} if exists else set()
    except Exception as exc:  # noqa: BLE001 - re-raised with the URI attached
        raise storage.describe_storage_error(output_uri, exc) from exc
    if not exists:
        raise storage.StorageError(
            f"{output_uri}: no bloodray output here (the path does not exist or is empty); "
            "check --output and, for S3, the endpoint and credentials"
        )
    if names and not names & set(ROOT_FOLDERS):
        # Querying some other folder used to give empty views and exit 0: a typo looked like "no data".
        raise storage.StorageError(
            f"{output_uri}: not a bloodray output root (none of {', '.join(f'{n}/' for n in ROOT_FOLDERS)} "
            "in it); give the folder the classify job writes to (output.uri)"
        )


def _configure(con: duckdb.DuckDBPyConnection) -> None:
    """Session settings that do not touch files."""
    try:
        con.execute("SET TimeZone = 'UTC'")
    except duckdb.Error:  # ICU missing: timestamps still work, just in local time
        pass


def _lock(con: duckdb.DuckDBPyConnection) -> None:
    """Make the connection read-only over the outputs: no file access, no extensions, no setting changes.

    Runs after the views exist: they scan registered pyarrow datasets, which
    DuckDB's file-system switch does not govern, so they keep working while
    every file name in SQL is refused.
    """
    con.execute("SET autoinstall_known_extensions = false")
    con.execute("SET autoload_known_extensions = false")
    con.execute("SET allow_community_extensions = false")
    # DuckDB exempts its own temp directory (default <cwd>/.tmp) from enable_external_access: COPY ... TO and
    # read_text would reach files there. No temp directory at all: a query that outgrows memory fails instead
    # of spilling.
    con.execute("SET temp_directory = ''")
    con.execute("SET enable_external_access = false")
    con.execute("SET lock_configuration = true")


def create_view(con: duckdb.DuckDBPyConnection, name: str, data: Any, where: str | None = None,
                order: str | None = None) -> None:
    """Create view ``name`` over an Arrow table or dataset, with the clearer column names of
    :data:`bloodray.nightly.dictionary.ALIASES` beside the stored ones.

    The view scans ``data`` directly (a relation, not a registered name), so no internal ``_*_files`` object shows
    beside the public views in ``SHOW TABLES``. A table's ``run_date`` becomes a date
    (:func:`~bloodray.nightly.contract.dated`); a dataset brings its own (:func:`~bloodray.nightly.tables.dataset`
    with ``dated=True``).
    """
    rel = con.from_arrow(contract.dated(data) if isinstance(data, pa.Table) else data)
    if where:
        rel = rel.filter(where)
    if order:
        rel = rel.order(order)
    rel.project("*" + dictionary.alias_select(name)).create_view(name, replace=False)


def create_empty_view(con: duckdb.DuckDBPyConnection, name: str) -> None:
    """An empty view with the contract's columns (and the aliases), so queries bind on a fresh root too."""
    con.execute(f"CREATE VIEW {name} AS SELECT *{dictionary.alias_select(name)} FROM ({_empty_view_sql(name)})")


def _create_views(con: duckdb.DuckDBPyConnection, output_uri: str, storage_options: Mapping[str, Any] | None,
                  as_of: _dt.datetime | None) -> None:
    """Create ``runs``/``all_runs`` from the ``runs`` table, then one view per data table, all read through Delta."""
    # Materialised (one row per run): the view must not read files once locked.
    committed = tables.committed_runs(output_uri, storage_options, as_of=as_of)
    if committed.num_rows:
        create_view(con, "all_runs", committed, where=f"status = '{contract.COMMITTED}'",
                    order="run_date, committed_at")
    else:
        create_empty_view(con, "all_runs")
    # all_runs already has the aliases.
    con.execute(f"CREATE VIEW runs AS {contract.visible_runs_sql('all_runs')}")
    for table in DATA_TABLES:
        # The Delta log picks the files (the current version holds the latest committed run of each date);
        # pyarrow reads them lazily, with DuckDB's projection and filter pushdown.
        create_view(con, table, tables.dataset(output_uri, table, storage_options, as_of=as_of, dated=True))


def _warn_pending(output_uri: str, storage_options: Mapping[str, Any] | None) -> None:
    """A run in its commit window (committing now, or stopped half-way) leaves its date's tables disagreeing."""
    try:
        commits = pending_commits(output_uri, storage_options)
    except Exception:  # noqa: BLE001 - a warning only
        return
    for commit in commits:
        log.warning("%s: %s", output_uri, commit.describe())


def parse_as_of(value: str | _dt.datetime | None) -> _dt.datetime | None:
    """``--as-of``: an ISO timestamp (``2026-11-30T06:00``, UTC unless it names a zone) or a date (its end).

    Raises ValueError with the accepted forms.
    """
    if value is None or isinstance(value, _dt.datetime):
        return value if value is None or value.tzinfo else value.replace(tzinfo=_dt.timezone.utc)
    text = str(value).strip()
    try:
        if len(text) == 10:
            return _dt.datetime.combine(_dt.date.fromisoformat(text), _dt.time.max, _dt.timezone.utc)
        stamp = _dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"--as-of: {value!r} is not a time; give an ISO timestamp such as 2026-11-30T06:00:00Z "
                         "or a date such as 2026-11-30") from None
    return stamp if stamp.tzinfo else stamp.replace(tzinfo=_dt.timezone.utc)


# --------------------------------------------------------------------------- public API
def connect(output_uri: str, storage_options: Mapping[str, Any] | None = None,
            as_of: str | _dt.datetime | None = None) -> duckdb.DuckDBPyConnection:
    """Open an in-memory DuckDB connection with views over a bloodray output root.

    Args:
        output_uri: the output root (local path, ``file://`` or ``s3://bucket/prefix``).
        storage_options: fsspec options such as ``{"endpoint_url": ...}``; secrets
            come from the AWS chain, not from here.
        as_of: read every table as it was at this time (Delta time travel; see
            :func:`parse_as_of`); superseded versions stay reachable until
            ``bloodray vacuum`` deletes their files.

    Returns:
        A connection with the views ``runs``, ``all_runs``, ``predictions``,
        ``differentials`` and ``errors`` (see the module docstring). A table with
        no files for the visible runs gets an empty view with the contract's
        columns, so queries bind on a fresh root too. The session time zone is
        UTC, so timestamps print as stored. The connection is locked read-only
        (module docstring): SQL naming a file or changing a setting fails with
        ``duckdb.PermissionException`` or ``duckdb.InvalidInputException``.

    Raises:
        storage.StorageError: the root does not exist, cannot be listed, or is not an output root.
        QueryError: DuckDB cannot read the files behind the views.
    """
    fs, root = storage.filesystem(output_uri, storage_options)
    root = root.rstrip("/")
    # A cached fsspec instance (s3fs keeps one per option set) may hold a
    # directory listing from before the latest run committed.
    fs.invalidate_cache()
    _check_root(fs, root, output_uri)
    refuse_legacy(output_uri, storage_options)
    when = parse_as_of(as_of)
    if when is None:
        _warn_pending(output_uri, storage_options)

    con = duckdb.connect(":memory:")
    try:
        _configure(con)
        _create_views(con, output_uri, storage_options, when)
        create_review_views(con, output_uri, storage_options, when)
        _lock(con)
    except duckdb.Error as exc:
        con.close()
        raise QueryError(f"{output_uri}: cannot build the output views: {exc}") from exc
    except BaseException:
        con.close()
        raise
    return con


def run_query(output_uri: str, sql: str, storage_options: Mapping[str, Any] | None = None) -> pa.Table:
    """Run ``sql`` against the views of :func:`connect` and return a pyarrow Table.

    Raises:
        storage.StorageError: the root does not exist or cannot be read.
        QueryError: DuckDB rejected or failed the query; the message names the root.
    """
    con = connect(output_uri, storage_options)
    try:
        return _fetch_user_sql(con, sql, output_uri)
    finally:
        con.close()


def _refused(exc: duckdb.Error) -> bool:
    return isinstance(exc, duckdb.PermissionException) or "configuration has been locked" in str(exc)


#: ``SET name=value`` or ``SET name = value`` inside a DuckDB message (uppercase ``SET``: not ``UPDATE ... SET``).
_SET_HINT = re.compile(r"\bSET\s+\w+\s*=")


def _without_set_hints(text: str) -> str:
    """DuckDB's message without its advice to change a setting (settings are locked here).

    ``Use TRY(...) to return NULL for this expression, or SET error_on_division_by_zero=false ...`` keeps its first
    half; a sentence that only says ``SET x=y`` is dropped.
    """
    if not _SET_HINT.search(text):
        return text
    kept = []
    for sentence in re.split(r"(?<=\.)\s+", text):
        match = _SET_HINT.search(sentence)
        if not match:
            kept.append(sentence)
            continue
        head = sentence[:match.start()].rstrip()
        head = re.sub(r",?\s*(?:or|and)?\s*(?:\*|use|try)?\s*$", "", head, flags=re.I).rstrip()
        if head and head.lower() not in ("use", "try", "*"):
            kept.append(head + ".")
    return " ".join(kept) + " (settings cannot be changed in bloodray query)"


def _interruptible(con: duckdb.DuckDBPyConnection, sql: str) -> pa.Table:
    """:func:`fetch_arrow` in a worker thread, so a signal stops it.

    DuckDB runs a query in C++ without returning to Python, so a signal handler (SIGTERM, Ctrl-C) would run
    only once the query ends. Here the calling thread waits in Python: the handler's exception interrupts the
    query (``con.interrupt()``) and propagates as it is.
    """
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fetch_arrow(con, sql)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            box["error"] = exc

    worker = threading.Thread(target=target, name="bloodray-query", daemon=True)
    worker.start()
    try:
        while worker.is_alive():
            worker.join(0.1)
    except BaseException:
        con.interrupt()
        worker.join(10)
        raise
    if "error" in box:
        raise box["error"]
    return box["value"]


#: How a view's scan reports a data file that is gone: the filesystem's not-found error (local, S3) with the
#: file's path, ``.../<table>/run_date=<D>/...``.
_MISSING_FILE = re.compile(r"No such file|not found|NoSuchKey|does not exist", re.IGNORECASE)
_TABLE_IN_PATH = re.compile(r"/(\w+)/" + re.escape(contract.RUN_DATE_PREFIX))


def _missing_table(exc: BaseException) -> str | None:
    """The table whose data file a failed scan could not find, or None when the error is something else."""
    text = str(exc)
    if not _MISSING_FILE.search(text):
        return None
    found = _TABLE_IN_PATH.search(text)
    return found.group(1) if found else None


def _fetch_user_sql(con: duckdb.DuckDBPyConnection, sql: str, output_uri: str,
                    as_of: _dt.datetime | None = None) -> pa.Table:
    """Run analyst SQL on a locked connection; DuckDB's error becomes one line naming the root."""
    try:
        return _interruptible(con, sql)
    except duckdb.Error as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        first = _without_set_hints(first)
        missing = _missing_table(exc)
        if missing and as_of is not None:
            raise QueryError(f"{output_uri}: --as-of {as_of.isoformat()}: files of {missing} as it was then are "
                             "gone, deleted by `bloodray vacuum` (time travel reaches back only as far as its "
                             "--retain-hours); query a later time") from exc
        if missing:
            raise QueryError(f"{output_uri}: a data file of {missing} is missing (deleted outside bloodray?): "
                             f"{first}") from exc
        if _refused(exc):
            raise QueryError(f"query against {output_uri} refused: {first} (bloodray query is read-only: "
                             f"it reads the views {', '.join(VIEWS)}, and no files, extensions or settings)"
                             ) from exc
        raise QueryError(f"query against {output_uri} failed: {first}") from exc


def read_table(output_uri: str, name: str, storage_options: Mapping[str, Any] | None = None,
               run_date: str | _dt.date | None = None) -> pa.Table:
    """Read one view (``runs``, ``all_runs``, ``predictions``, ``differentials``, ``errors``).

    Args:
        run_date: keep only rows of this date (``YYYY-MM-DD`` or a date).

    Returns:
        A pyarrow Table with the view's rows, ``run_date`` included (a ``date32``, as in the views).
    """
    if name not in VIEWS:
        raise ValueError(f"unknown table {name!r}; expected one of {', '.join(VIEWS)}")
    con = connect(output_uri, storage_options)
    try:
        if run_date is None:
            return fetch_arrow(con, f"SELECT * FROM {name}")
        return fetch_arrow(con, f"SELECT * FROM {name} WHERE run_date = ?", [str(run_date)])
    except duckdb.Error as exc:
        raise QueryError(f"reading {name} from {output_uri} failed: {exc}") from exc
    finally:
        con.close()


def query_main(output_uri: str, sql: str, storage_options: Mapping[str, Any] | None = None,
               fmt: str = "table", max_rows: int | None = DEFAULT_MAX_ROWS) -> str:
    """Run ``sql`` on an output root and return the result formatted for the terminal.

    Backs ``bloodray query "SQL" --output URI [--format table|csv|json]``. Raises
    :class:`storage.StorageError` (bad root) or :class:`QueryError` (bad SQL),
    whose messages are fit to print as they are.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    return format_table(run_query(output_uri, sql, storage_options), fmt, max_rows)


def _check_export_target(out: str, output_uri: str, storage_options: Mapping[str, Any] | None) -> None:
    """Refuse an export file anywhere under the output root.

    Not only the data tables: ``reviews/``, ``_commits/``, ``_leases/`` and every other folder hold state that
    queries, reports, reviews and the next run read; a file written there could break them all.
    """
    fs_out, path_out = storage.filesystem(out, storage_options)
    fs_root, root = storage.filesystem(output_uri, storage_options)
    target = storage.full_uri(fs_out, path_out).rstrip("/")
    base = storage.full_uri(fs_root, root.rstrip("/"))
    if storage.is_local(fs_out) and storage.is_local(fs_root):
        import os

        target, base = os.path.realpath(path_out), os.path.realpath(root)
    if target == base or target.startswith(base.rstrip("/") + "/"):
        raise QueryError(f"--out {out}: refusing to write an export inside the output root {output_uri} "
                         "(it holds the tables, reviews and commit state); choose a file elsewhere")


def export(output_uri: str, sql: str, storage_options: Mapping[str, Any] | None = None, fmt: str = "table",
           out: str | None = None, max_rows: int | None = DEFAULT_MAX_ROWS,
           as_of: str | _dt.datetime | None = None) -> tuple[pa.Table, str | None]:
    """What ``bloodray query`` does: run ``sql`` read-only, and write the result to ``out`` if given.

    Logs a warning (one line) when the root holds no committed run, since
    every view is then empty and an empty answer is not "no cells".
    ``as_of``: query the tables as they were then (:func:`connect`).

    Returns:
        ``(result, text)``: ``text`` is the rendering to print (``None`` when
        the result went to ``out``).

    Raises:
        storage.StorageError: the root is missing or not an output root.
        QueryError: the SQL failed or was refused, or ``out`` lies inside the output's tables.
        ValueError: ``fmt`` is unknown, or parquet without ``out``.
    """
    try:
        when = parse_as_of(as_of)
    except ValueError as exc:
        raise QueryError(str(exc)) from None
    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(EXPORT_FORMATS)}")
    if fmt == "parquet" and not out:
        raise QueryError("--format parquet needs --out FILE (Parquet is binary)")
    if out and fmt == "table":
        raise QueryError("--out needs --format csv, json or parquet")
    if out:
        _check_export_target(out, output_uri, storage_options)
    con = connect(output_uri, storage_options, as_of=when)
    try:
        if con.execute("SELECT count(*) FROM all_runs").fetchall()[0][0] == 0:
            log.warning("%s holds no committed run %s: every view is empty", output_uri,
                        f"at {when.isoformat()}" if when else "yet")
        table = _fetch_user_sql(con, sql, output_uri, when)
    finally:
        con.close()
    if out:
        write_export(table, fmt, out, storage_options)
        return table, None
    return table, format_table(table, fmt, max_rows)
