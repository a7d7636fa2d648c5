"""SQL access to a bloodray output root through DuckDB.

An output root (local path or ``s3://bucket/prefix``) is laid out as
:mod:`bloodray.nightly.contract` says, which also owns the column types of the
views and the rule of which run is visible: a run is committed iff its
manifest exists, and the *visible* run of a date is the committed one with the
latest ``committed_at``. :func:`connect` returns a
DuckDB connection with these views:

``runs``           the visible run of every date (one row per date)
``all_runs``       every committed manifest, superseded reruns included
``predictions``    rows of visible runs only
``differentials``  idem
``errors``         idem
``thumbnails``     idem: a small JPEG (``jpeg`` BLOB) per classified image
``reviews``        reviewers' corrections of visible runs (:mod:`bloodray.review.verified`)
``verified_differentials``  differentials counted from verified classes where reviewed

Every view has ``run_date`` as ``VARCHAR`` (``'YYYY-MM-DD'``), taken from the
``run_date=`` path segment; cast with ``run_date::DATE`` for date arithmetic.

Data of uncommitted or superseded runs, and anything under ``_staging/``, never
shows in the views: the files behind each view are picked in Python from the
manifests, and each view reads exactly that list. The views are therefore a
snapshot of the root taken when :func:`connect` ran; reconnect to see a run
committed later.

S3 (and any other non-local fsspec protocol) is read through the fsspec
filesystem registered on the connection, not DuckDB's httpfs extension, so the
same credentials chain and ``endpoint_url`` as the rest of bloodray apply.
"""

from __future__ import annotations

import csv
import datetime as _dt
import decimal
import io
import json
import math
import posixpath
import warnings
from typing import Any, Mapping, Sequence

import duckdb
import pyarrow as pa

from bloodray import storage
from bloodray.nightly import contract

#: Data tables laid out as ``<table>/run_date=<D>/<run_id>/*.parquet``.
DATA_TABLES: tuple[str, ...] = contract.TABLES
#: Every view :func:`connect` creates.
VIEWS: tuple[str, ...] = (contract.RUNS, "all_runs") + DATA_TABLES + (contract.REVIEWS, contract.VERIFIED_DIFFERENTIALS)
#: Output formats understood by :func:`format_table` / :func:`query_main`.
FORMATS: tuple[str, ...] = ("table", "csv", "json")
#: Rows printed by the terminal ``table`` format unless told otherwise.
DEFAULT_MAX_ROWS = 200

RUN_DATE_PREFIX = contract.RUN_DATE_PREFIX


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


def _file_list(uris: Sequence[str]) -> str:
    return "[" + ", ".join(_sql_str(u) for u in uris) + "]"


def _hidden(name: str) -> bool:
    # Writers (Arrow, Spark, our own job) keep temporary and marker files behind
    # a leading "_" or "."; they are never data.
    return name.startswith(("_", "."))


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


def _glob(fs: Any, pattern: str, uri: str) -> list[str]:
    try:
        return sorted(fs.glob(pattern))
    except FileNotFoundError:
        return []
    except Exception as exc:  # noqa: BLE001 - re-raised with the URI attached
        raise storage.describe_storage_error(uri, exc) from exc


def _check_root(fs: Any, root: str, output_uri: str) -> None:
    try:
        exists = fs.isdir(root)
    except Exception as exc:  # noqa: BLE001 - re-raised with the URI attached
        raise storage.describe_storage_error(output_uri, exc) from exc
    if not exists:
        raise storage.StorageError(
            f"{output_uri}: no bloodray output here (the path does not exist or is empty); "
            "check --output and, for S3, the endpoint and credentials"
        )


def _readable_manifests(con: duckdb.DuckDBPyConnection, uris: list[str]) -> list[str]:
    """Drop manifests DuckDB cannot read, with a warning naming each one.

    A torn or foreign file under ``runs/`` must not take every view down with
    it; a run whose manifest cannot be read is treated as not committed.
    """
    try:
        con.execute(f"SELECT count(*) FROM read_parquet({_file_list(uris)}, union_by_name=true)").fetchall()
        return uris
    except duckdb.Error:
        pass
    good = []
    for uri in uris:
        try:
            con.execute(f"SELECT count(*) FROM read_parquet({_sql_str(uri)})").fetchall()
            good.append(uri)
        except duckdb.Error as exc:
            warnings.warn(f"{uri}: unreadable run manifest, run treated as uncommitted ({exc})", stacklevel=3)
    return good


def _run_key(path: str, table_root: str) -> tuple[str, str] | None:
    """``(run_date, run_id)`` of a data file at ``<table>/run_date=D/<run_id>/<file>``."""
    rel = path[len(table_root):].strip("/").split("/")
    if len(rel) != 3 or not rel[0].startswith(RUN_DATE_PREFIX) or _hidden(rel[1]) or _hidden(rel[2]):
        return None
    return rel[0][len(RUN_DATE_PREFIX):], rel[1]


def _configure(con: duckdb.DuckDBPyConnection, fs: Any) -> None:
    """Session settings, and the fsspec filesystem for non-local roots."""
    try:
        con.execute("SET TimeZone = 'UTC'")
    except duckdb.Error:  # ICU missing: timestamps still work, just in local time
        pass
    try:
        # Files of a committed run never change, and on S3 every footer read is
        # a round trip through Python; caching them makes repeated queries cheap.
        con.execute("SET parquet_metadata_cache = true")
    except duckdb.Error:
        pass
    if not storage.is_local(fs):
        # httpfs cannot be downloaded everywhere and would not share our endpoint
        # or credentials; a registered fsspec filesystem serves s3:// (etc.) paths.
        con.register_filesystem(fs)


def _create_views(con: duckdb.DuckDBPyConnection, fs: Any, root: str, output_uri: str) -> None:
    """Create ``runs``/``all_runs`` from the manifests, then the data views over visible runs only."""

    def uri_of(path: str) -> str:
        return storage.full_uri(fs, path)

    manifests = [
        p for p in _glob(fs, f"{root}/{contract.RUNS}/{RUN_DATE_PREFIX}*/*.parquet", output_uri)
        if not _hidden(posixpath.basename(p))
    ]
    manifest_uris = _readable_manifests(con, [uri_of(p) for p in manifests]) if manifests else []
    if manifest_uris:
        # run_date comes from the path, as for the data views: the job's
        # manifests may or may not repeat it as a column, and where they do the
        # hive value replaces it. VARCHAR (not DuckDB's DATE autocast) so it
        # joins with the data views and compares with '2024-03-01' literals.
        con.execute(
            f"CREATE VIEW all_runs AS SELECT * FROM read_parquet({_file_list(manifest_uris)}, "
            "union_by_name=true, hive_partitioning=true, hive_types={'run_date': VARCHAR}) "
            f"WHERE status = '{contract.COMMITTED}' ORDER BY run_date, committed_at"
        )
        con.execute(f"CREATE VIEW runs AS {contract.visible_runs_sql('all_runs')}")
    else:
        con.execute(f"CREATE VIEW all_runs AS {_empty_view_sql('all_runs')}")
        con.execute(f"CREATE VIEW runs AS {_empty_view_sql('runs')}")

    visible = {(str(d), str(r)) for d, r in con.execute("SELECT run_date, run_id FROM runs").fetchall()}

    for table in DATA_TABLES:
        table_root = f"{root}/{table}"
        files = []
        if visible:
            for path in _glob(fs, f"{table_root}/{RUN_DATE_PREFIX}*/*/*.parquet", output_uri):
                key = _run_key(path, table_root)
                if key is not None and key in visible:
                    files.append(uri_of(path))
        if files:
            # hive run_date is typed VARCHAR (DuckDB would autocast to DATE) to
            # match runs.run_date; the <run_id>/ segment has no "=" and is ignored.
            con.execute(
                f"CREATE VIEW {table} AS SELECT * FROM read_parquet({_file_list(files)}, "
                "hive_partitioning=true, union_by_name=true, hive_types={'run_date': VARCHAR})"
            )
        else:
            con.execute(f"CREATE VIEW {table} AS {_empty_view_sql(table)}")


# --------------------------------------------------------------------------- public API
def connect(output_uri: str, storage_options: Mapping[str, Any] | None = None) -> duckdb.DuckDBPyConnection:
    """Open an in-memory DuckDB connection with views over a bloodray output root.

    Args:
        output_uri: the output root (local path, ``file://`` or ``s3://bucket/prefix``).
        storage_options: fsspec options such as ``{"endpoint_url": ...}``; secrets
            come from the AWS chain, not from here.

    Returns:
        A connection with the views ``runs``, ``all_runs``, ``predictions``,
        ``differentials`` and ``errors`` (see the module docstring). A table with
        no files for the visible runs gets an empty view with the contract's
        columns, so queries bind on a fresh root too. The session time zone is
        UTC, so timestamps print as stored.

    Raises:
        storage.StorageError: the root does not exist or cannot be listed.
        QueryError: DuckDB cannot read the files behind the views.
    """
    fs, root = storage.filesystem(output_uri, storage_options)
    root = root.rstrip("/")
    # A cached fsspec instance (s3fs keeps one per option set) may hold a
    # directory listing from before the latest run committed.
    fs.invalidate_cache()
    _check_root(fs, root, output_uri)

    con = duckdb.connect(":memory:")
    try:
        _configure(con, fs)
        _create_views(con, fs, root, output_uri)
        from bloodray.review.verified import create_views as create_review_views

        create_review_views(con, fs, root, storage_options)
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
        return fetch_arrow(con, sql)
    except duckdb.Error as exc:
        raise QueryError(f"query against {output_uri} failed: {exc}") from exc
    finally:
        con.close()


def read_table(output_uri: str, name: str, storage_options: Mapping[str, Any] | None = None,
               run_date: str | _dt.date | None = None) -> pa.Table:
    """Read one view (``runs``, ``all_runs``, ``predictions``, ``differentials``, ``errors``).

    Args:
        run_date: keep only rows of this date (``YYYY-MM-DD`` or a date).

    Returns:
        A pyarrow Table with the view's rows, ``run_date`` included.
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


# --------------------------------------------------------------------------- formatting
def _plain(value: Any, float32: bool = False) -> Any:
    """A JSON-safe Python value (NaN -> None, timestamps -> ISO strings)."""
    if value is None:
        return None
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return None
        # float32 columns widen to noisy doubles (0.8999999761...); 7 digits is
        # all a float32 holds.
        return float(f"{value:.7g}") if float32 else value
    if isinstance(value, (_dt.datetime, _dt.date, _dt.time)):
        return value.isoformat()
    if isinstance(value, _dt.timedelta):
        return value.total_seconds()
    if isinstance(value, decimal.Decimal):
        return float(value)
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, dict):
        return {str(k): _plain(v, float32) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v, float32) for v in value]
    return value


def _columns(table: pa.Table) -> list[list[Any]]:
    return [
        [_plain(v, pa.types.is_float32(table.schema.field(i).type)) for v in table.column(i).to_pylist()]
        for i in range(table.num_columns)
    ]


def _cell_text(value: Any, width: int | None = None) -> str:
    if value is None:
        text = "NULL"
    elif isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, float):
        text = f"{value:.6g}"
    elif isinstance(value, (list, dict)):
        text = json.dumps(value, ensure_ascii=False)
    else:
        text = str(value)
    text = text.replace("\n", "\\n").replace("\t", " ")
    if width is not None and len(text) > width:
        text = text[: max(width - 1, 1)] + "…"
    return text


def format_table(table: pa.Table, fmt: str = "table", max_rows: int | None = DEFAULT_MAX_ROWS,
                 max_width: int = 48) -> str:
    """Render a pyarrow Table for a terminal or a file.

    Args:
        fmt: ``table`` (aligned text, numbers right-aligned, long cells cut at
            ``max_width``), ``csv`` (header + all rows; lists/structs as JSON) or
            ``json`` (an array of objects, timestamps ISO 8601, NaN as null).
        max_rows: rows shown by ``table`` (``None`` for all); csv and json
            always hold every row.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    names = table.column_names
    if fmt == "json":
        cols = _columns(table)
        rows = [dict(zip(names, row)) for row in zip(*cols)] if cols else []
        return json.dumps(rows, ensure_ascii=False, indent=1)
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(names)
        for row in zip(*_columns(table)):
            writer.writerow(
                "" if v is None else json.dumps(v, ensure_ascii=False) if isinstance(v, (list, dict))
                else ("true" if v else "false") if isinstance(v, bool) else v
                for v in row
            )
        return buf.getvalue()

    shown = table if max_rows is None else table.slice(0, max_rows)
    cols = _columns(shown)
    numeric = [pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t)
               for t in table.schema.types]
    text_cols = [[_cell_text(v, max_width) for v in col] for col in cols]
    widths = [max([len(n)] + [len(c) for c in col]) for n, col in zip(names, text_cols)]

    def line(cells: Sequence[str]) -> str:
        return " | ".join(c.rjust(w) if num else c.ljust(w)
                          for c, w, num in zip(cells, widths, numeric)).rstrip()

    out = [line(names), "-+-".join("-" * w for w in widths)]
    out.extend(line(row) for row in zip(*text_cols))
    total = table.num_rows
    if shown.num_rows < total:
        out.append(f"({shown.num_rows} of {total} rows shown; use --format csv or json for all)")
    else:
        out.append(f"({total} row{'s' if total != 1 else ''})")
    return "\n".join(out)


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
