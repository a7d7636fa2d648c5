"""The optional sample-metadata table: each sample's absolute white-cell count.

A laboratory that knows a sample's WBC count (from its haematology analyser)
can give it to the nightly job as a small table, CSV or Parquet, local or on
object storage::

    sample_id,wbc_count_10e9_per_l
    S0001,7.4
    S0002,12.9
    S0003,            <- empty: count unknown, the sample is flagged on percentages

With a count, :func:`bloodray.nightly.differential.compute_differentials`
judges the five mature leukocytes on absolute reference ranges (10^9/L), as
clinicians do. Other columns are ignored. Every problem is reported with the
URI, the row (and CSV line) and the field.
"""

from __future__ import annotations

import io
import math
from typing import Any, Iterable, Mapping

import pyarrow as pa
import pyarrow.parquet as pq

from bloodray import csv_io, storage
from bloodray.bounded_read import InputReadError, read_file

SAMPLE_ID_COLUMN = "sample_id"
WBC_COLUMN = "wbc_count_10e9_per_l"
#: No blood holds more white cells than this (10^9/L); larger values are
#: nearly always counts per microlitre typed into the 10^9/L column.
MAX_WBC_10E9_PER_L = 1000.0

SCHEMA = pa.schema([(SAMPLE_ID_COLUMN, pa.string()), (WBC_COLUMN, pa.float64())])


class SampleMetadataError(ValueError):
    """The sample-metadata table is unreadable or invalid; the message names the URI, row and field."""


def load_sample_metadata(uri: str, storage_options: Mapping[str, Any] | None = None) -> pa.Table:
    """Read and validate a sample-metadata table (``.csv`` or ``.parquet``/``.pq``).

    Returns a table with exactly the columns ``sample_id`` (string) and
    ``wbc_count_10e9_per_l`` (float64, null where the count is unknown), one
    row per sample. Raises :class:`SampleMetadataError` naming ``uri`` (and the
    row and field) on any problem.
    """
    lower = uri.lower().rstrip("/")
    if lower.endswith(".csv"):
        kind = "csv"
    elif lower.endswith((".parquet", ".pq")):
        kind = "parquet"
    else:
        raise SampleMetadataError(f"{uri}: sample metadata must be a .csv or .parquet file")
    try:
        data = read_file(uri, storage_options, what="sample-metadata file")
    except FileNotFoundError as exc:
        raise SampleMetadataError(f"{uri}: sample-metadata file not found") from exc
    except (InputReadError, storage.StorageError) as exc:
        raise SampleMetadataError(str(exc)) from exc
    except Exception as exc:  # noqa: BLE001 - storage failures become one readable line
        raise SampleMetadataError(str(storage.describe_storage_error(uri, exc))) from exc
    if kind == "csv":
        columns, rows = _csv_rows(data, uri)
        return _parse(columns, rows, uri, first_line=2)
    try:
        table = pq.read_table(io.BytesIO(data))
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for a bad file
        raise SampleMetadataError(f"{uri}: not a readable Parquet file ({exc})") from exc
    return _parse(table.column_names, table.to_pylist(), uri)


def validate_sample_metadata(table: pa.Table, where: str = "sample metadata") -> pa.Table:
    """Validate an in-memory metadata table the way :func:`load_sample_metadata` does."""
    return _parse(table.column_names, table.to_pylist(), where)


def _csv_rows(data: bytes, uri: str) -> tuple[list[str], list[dict[str, Any]]]:
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise SampleMetadataError(f"{uri}: not UTF-8 text ({exc})") from exc
    try:
        header, records, reader = csv_io.dict_rows(text, uri)
    except csv_io.CSVFormatError as exc:
        raise SampleMetadataError(str(exc)) from None
    if not header:
        raise SampleMetadataError(f"{uri}: empty file; expected a header line "
                                  f"'{SAMPLE_ID_COLUMN},{WBC_COLUMN}'")
    columns = [c.strip() for c in header]
    rows = []
    for raw in _records(records):
        if None in raw:  # more fields than the header has
            raise SampleMetadataError(f"{uri}: line {reader.line_num}: more fields than the header's "
                                      f"{len(columns)}")
        rows.append({c.strip(): v for c, v in raw.items()})
    return columns, rows


def _records(records):
    try:
        yield from records
    except csv_io.CSVFormatError as exc:
        raise SampleMetadataError(str(exc)) from None


def _parse(columns: Iterable[str], rows: list[dict[str, Any]], where: str, first_line: int | None = None) -> pa.Table:
    missing = [c for c in (SAMPLE_ID_COLUMN, WBC_COLUMN) if c not in columns]
    if missing:
        raise SampleMetadataError(f"{where}: missing column(s) {', '.join(missing)}; expected "
                                  f"{SAMPLE_ID_COLUMN}, {WBC_COLUMN} (found: {', '.join(columns) or 'none'})")
    ids: list[str] = []
    counts: list[float | None] = []
    seen: dict[str, int] = {}
    for i, row in enumerate(rows, start=1):
        at = f"{where}: row {i}" + (f" (line {first_line + i - 1})" if first_line is not None else "")
        sample_id = _sample_id(row[SAMPLE_ID_COLUMN], at)
        if sample_id in seen:
            raise SampleMetadataError(f"{at}: {SAMPLE_ID_COLUMN} {sample_id!r} repeats row {seen[sample_id]}")
        seen[sample_id] = i
        ids.append(sample_id)
        counts.append(_wbc(row[WBC_COLUMN], f"{at}, {SAMPLE_ID_COLUMN} {sample_id!r}: {WBC_COLUMN}"))
    return pa.table([pa.array(ids, pa.string()), pa.array(counts, pa.float64())], schema=SCHEMA)


def _sample_id(value: Any, at: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise SampleMetadataError(f"{at}: {SAMPLE_ID_COLUMN}: expected text, got {value!r}")
    text = str(value).strip()
    if not text:
        raise SampleMetadataError(f"{at}: {SAMPLE_ID_COLUMN} is empty")
    return text


def _wbc(value: Any, at: str) -> float | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None  # unknown count: this sample is flagged on percentages
    if isinstance(value, bool):
        raise SampleMetadataError(f"{at}: expected a number (10^9/L), got {value!r}")
    try:
        number = float(value.strip()) if isinstance(value, str) else float(value)
    except (TypeError, ValueError):
        raise SampleMetadataError(f"{at}: expected a number (10^9/L), got {value!r}") from None
    if math.isnan(number):
        return None
    if not 0.0 <= number <= MAX_WBC_10E9_PER_L:
        hint = " (a count per microlitre? give 10^9/L, e.g. 7.5 for 7500/uL)" if number > MAX_WBC_10E9_PER_L else ""
        raise SampleMetadataError(f"{at}: {value!r} is not a white-cell count in [0, "
                                  f"{MAX_WBC_10E9_PER_L:g}] x 10^9/L{hint}")
    return number
