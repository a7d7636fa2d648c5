"""Rendering and export of query results: an aligned terminal table, CSV, JSON and Parquet.

Used by :mod:`bloodray.analysis.query` (``bloodray query --format ... --out ...``)
and the demo; works on any pyarrow Table.
"""

from __future__ import annotations

import datetime as _dt
import decimal
import io
import json
import math
from typing import Any, Mapping, Sequence

import pyarrow as pa

from bloodray import csv_io, storage

#: Text formats understood by :func:`format_table`.
FORMATS: tuple[str, ...] = ("table", "csv", "json")
#: Formats of ``bloodray query --format``; parquet needs ``--out``.
EXPORT_FORMATS: tuple[str, ...] = FORMATS + ("parquet",)
#: Rows printed by the terminal ``table`` format unless told otherwise.
DEFAULT_MAX_ROWS = 200


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
        if "/" in text:
            # URIs and paths differ in their last segments (sample folder, file
            # name), so a long one keeps its end: "…/S001/cell_0042.jpg".
            text = "…" + text[-max(width - 1, 1):]
        else:
            text = text[: max(width - 1, 1)] + "…"
    return text


def format_table(table: pa.Table, fmt: str = "table", max_rows: int | None = DEFAULT_MAX_ROWS,
                 max_width: int = 48) -> str:
    """Render a pyarrow Table for a terminal or a file.

    Args:
        fmt: ``table`` (aligned text, numbers right-aligned, long cells cut at
            ``max_width``: URIs and paths from the left so the file name shows,
            other text from the right), ``csv`` (header + all rows; lists/structs as JSON) or
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
        writer = csv_io.writer(buf)
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


def write_export(table: pa.Table, fmt: str, out: str, storage_options: Mapping[str, Any] | None = None) -> str:
    """Write a query result to ``out`` (local path, relative to the CWD, or ``s3://...``) as csv, json or parquet.

    Returns the URI written. Parquet goes through pyarrow and keeps the column
    types (timestamps with time zone, float32, lists); csv and json are the
    text of :func:`format_table`.
    """
    if fmt not in EXPORT_FORMATS or fmt == "table":
        raise ValueError(f"cannot export as {fmt!r}; expected one of csv, json, parquet")
    if fmt == "parquet":
        data = storage.parquet_bytes(table)
    else:
        data = format_table(table, fmt, max_rows=None).encode("utf-8")
    storage.write_bytes(out, data, storage_options)
    return out
