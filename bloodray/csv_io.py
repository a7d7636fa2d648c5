"""Every CSV file bloodray writes or reads goes through here.

Writing: text cells that a spreadsheet would run as a formula (starting with
``=``, ``+``, ``-``, ``@``, a tab or a carriage return) get a leading ``'``, as
OWASP's "CSV injection" guidance recommends, and every cell is quoted where the
CSV dialect needs it. Sample folder names, image names and reviewers' values
are data from outside, and ``review.csv``, ``labels.csv`` and ``query --format
csv`` are opened in spreadsheets. Numbers are written as numbers (``-0.5``
stays a number). :func:`restore` undoes the prefix on values read back.

Reading: a malformed file (a field over Python's 131,072-character limit, a
NUL byte) is one :class:`CSVFormatError` line naming the file and line, never
``_csv.Error``.
"""

from __future__ import annotations

import csv
import io
from typing import Any, Iterable, Iterator

#: First characters that make a spreadsheet evaluate a cell (OWASP CSV injection).
FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")
#: What a neutralised cell starts with.
ESCAPE = "'"


class CSVFormatError(ValueError):
    """A CSV file cannot be parsed; the message names the file and line."""


def neutralise(value: Any) -> Any:
    """``value`` with a leading ``'`` when it is text a spreadsheet would take for a formula; else unchanged."""
    if isinstance(value, str) and value.startswith(FORMULA_PREFIXES):
        return ESCAPE + value
    return value


def restore(value: str) -> str:
    """Undo :func:`neutralise` on a cell read back from a CSV bloodray wrote."""
    if value.startswith(ESCAPE) and value[1:].startswith(FORMULA_PREFIXES):
        return value[1:]
    return value


class SafeWriter:
    """``csv.writer`` whose every row goes through :func:`neutralise` (header included)."""

    def __init__(self, fh: Any):
        self._writer = csv.writer(fh, lineterminator="\n")
        # Python's writer quotes a field holding the line terminator ("\n") but not a lone "\r", which readers
        # take for a line end: rows with one are written fully quoted.
        self._quoted = csv.writer(fh, lineterminator="\n", quoting=csv.QUOTE_ALL)

    def writerow(self, row: Iterable[Any]) -> None:
        cells = [neutralise(v) for v in row]
        carriage_return = any(isinstance(v, str) and "\r" in v for v in cells)
        (self._quoted if carriage_return else self._writer).writerow(cells)

    def writerows(self, rows: Iterable[Iterable[Any]]) -> None:
        for row in rows:
            self.writerow(row)


def writer(fh: Any) -> SafeWriter:
    """A formula-safe CSV writer on a text stream (``\\n`` line ends)."""
    return SafeWriter(fh)


def dict_rows(text: str, where: str) -> tuple[list[str], Iterator[dict[str, str]], csv.DictReader]:
    """``(header, rows, reader)`` of CSV ``text``; a parse error while iterating is one :class:`CSVFormatError`.

    ``reader.line_num`` gives the current line for callers' own messages.
    """
    reader = csv.DictReader(io.StringIO(text))
    try:
        header = list(reader.fieldnames or [])
    except csv.Error as exc:
        raise _format_error(exc, where, reader) from None

    def rows() -> Iterator[dict[str, str]]:
        while True:
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                raise _format_error(exc, where, reader) from None
            yield row

    return header, rows(), reader


def _format_error(exc: csv.Error, where: str, reader: csv.DictReader) -> CSVFormatError:
    text = str(exc)
    if "field larger than field limit" in text:
        text = f"a field is longer than {csv.field_size_limit():,} characters; not a CSV file bloodray can read"
    return CSVFormatError(f"{where}: line {reader.line_num + 1}: malformed CSV ({text})")
