"""The review decisions file: what a reviewer decided about a date's cells, as ``bloodray review import`` reads it.

Two forms are accepted, both parsed here into one :class:`Decisions`:

* the **decisions JSON** (:data:`FORMAT`), written by the interactive review
  page's "download decisions" (default name :func:`default_name`,
  ``decisions-<run_date>.json``). UTF-8, one object::

    {
      "format": "bloodray-review-decisions/1",
      "output_uri": "<output root the page was exported from>",
      "run_date": "YYYY-MM-DD",
      "run_id": "<the run the page was exported from>",
      "exported_at": "<ISO 8601>",
      "reviews": [{"sample_id": str, "image_uri": str, "image_sha256": "<64 hex>",
                   "predicted_class": str, "verified_class": str,
                   "reviewer": str, "reviewed_at": "<ISO 8601>"}, ...],
      "signoffs": [{"sample_id": str, "reviewer": str, "status": "signed_off" | "reopened",
                    "signed_at": "<ISO 8601>"}, ...]
    }

  ``verified_class`` is one of :data:`VERIFIED_CLASSES`: the eight class
  names of :mod:`bloodray.classes`, or ``unidentified`` (not a countable cell:
  an artefact, a smudge, a cell the reviewer cannot name; it is left out of
  the verified differential as the job leaves out-of-distribution cells out).
  ``predicted_class`` is informational. Times are ISO 8601; one without a
  zone is UTC. Keys not listed here are ignored, so a newer page can add some.
  ``signoffs`` may be empty or absent, ``reviews`` may be empty.
* the **review CSV** of ``bloodray review export`` (``review.csv``), filled in
  by hand: one row per cell, rows with an empty ``verified_class`` skipped.
  ``verified_class`` also takes the class folder spellings of
  :func:`bloodray.classes.class_from_folder` (``Neutrophils``, ``IG``...).

Validation is of the file as a whole: the first bad entry raises
:class:`ReviewError` with one line naming the file and the entry
(``reviews[3]``, ``signoffs[0]``, ``row 5``), and nothing is imported.
Whether each entry names a cell of the date is checked on import
(:mod:`bloodray.review.records`).
"""

from __future__ import annotations

import datetime as dt
import json
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

from bloodray import csv_io
from bloodray.classes import CLASS_NAMES, class_from_folder
from bloodray.nightly.contract import REOPENED, SIGNED_OFF, UNIDENTIFIED

#: Value of the ``format`` key of a decisions JSON this bloodray reads.
FORMAT = "bloodray-review-decisions/1"
#: Values a reviewer may give as ``verified_class``: a class name, or ``unidentified`` (not counted).
VERIFIED_CLASSES: tuple[str, ...] = CLASS_NAMES + (UNIDENTIFIED,)
#: Values of a sign-off's ``status``: the latest of a sample counts.
SIGNOFF_STATUSES: tuple[str, ...] = (SIGNED_OFF, REOPENED)
#: Columns of ``review.csv``; ``verified_class`` and ``reviewer`` are the reviewer's.
CSV_COLUMNS: tuple[str, ...] = ("run_id", "sample_id", "image_uri", "image_sha256", "predicted_class", "confidence",
                                "verified_class", "reviewer")

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")


class ReviewError(RuntimeError):
    """A review file or request is invalid; the message names the file and entry. Nothing was applied."""


@dataclass(frozen=True)
class ReviewDecision:
    """One cell's verified class, as the reviewer gave it.

    ``run_id`` is the run the reviewer saw (None: a CSV row without one, meaning the visible run);
    ``image_sha256`` is None only for CSV files exported before the column existed.
    """

    entry: str
    sample_id: str | None
    image_uri: str
    image_sha256: str | None
    predicted_class: str | None
    verified_class: str
    reviewer: str
    reviewed_at: dt.datetime | None
    run_id: str | None


@dataclass(frozen=True)
class SignOff:
    """A sample signed off (or reopened) by a reviewer."""

    entry: str
    sample_id: str
    reviewer: str
    status: str
    signed_at: dt.datetime


@dataclass(frozen=True)
class Decisions:
    """A parsed decisions file (JSON or CSV); ``kind`` is ``"json"`` or ``"csv"``."""

    where: str
    kind: str
    run_date: str | None
    run_id: str | None
    output_uri: str | None = None
    exported_at: dt.datetime | None = None
    reviews: list[ReviewDecision] = field(default_factory=list)
    signoffs: list[SignOff] = field(default_factory=list)


def default_name(run_date: str) -> str:
    """Default file name of a date's decisions JSON."""
    return f"decisions-{run_date}.json"


def parse_time(value: Any, where: str) -> dt.datetime:
    """An ISO 8601 time (``Z`` or an offset; none means UTC) as an aware UTC datetime."""
    if not isinstance(value, str) or not value.strip():
        raise ReviewError(f"{where}: missing time (ISO 8601, e.g. 2026-12-04T09:30:00Z)")
    try:
        stamp = dt.datetime.fromisoformat(value.strip().replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise ReviewError(f"{where}: {value!r} is not an ISO 8601 time (e.g. 2026-12-04T09:30:00Z)") from None
    stamp = stamp if stamp.tzinfo else stamp.replace(tzinfo=dt.timezone.utc)
    return stamp.astimezone(dt.timezone.utc)


def _text(obj: Mapping[str, Any], key: str, where: str, required: bool = True) -> str | None:
    value = obj.get(key)
    if value is None or (isinstance(value, str) and not value.strip()):
        if required:
            raise ReviewError(f"{where}: missing {key}")
        return None
    if not isinstance(value, str):
        raise ReviewError(f"{where}: {key} must be a string, not {type(value).__name__}")
    return value.strip()


def _verified_class(raw: str, where: str, aliases: bool) -> str:
    value = raw.strip()
    if value in VERIFIED_CLASSES:
        return value
    alias = class_from_folder(value) if aliases else None
    if alias is None:
        raise ReviewError(f"{where}: unknown class {raw!r}; expected one of {', '.join(VERIFIED_CLASSES)}")
    return alias


def _sha(value: str | None, where: str) -> str | None:
    if value is None:
        return None
    sha = value.lower()
    if not _SHA256.match(sha):
        raise ReviewError(f"{where}: image_sha256 {value!r} is not a SHA-256 (64 hex digits)")
    return sha


def _cell(uri: str, sample: str | None) -> str:
    return f"(sample {sample}, image {uri})" if sample else f"(image {uri})"


def _check_duplicates(reviews: list[ReviewDecision], where: str) -> None:
    """One decision per cell: a repeated file, or one image content given two classes, is refused."""
    by_uri: dict[str, ReviewDecision] = {}
    by_content: dict[tuple[str | None, str], ReviewDecision] = {}
    for r in reviews:
        first = by_uri.get(r.image_uri)
        if first is not None:
            raise ReviewError(f"{where}: {r.entry}: duplicate cell {r.image_uri!r} (also {first.entry})")
        by_uri[r.image_uri] = r
        if r.image_sha256 is None:
            continue
        twin = by_content.setdefault((r.sample_id, r.image_sha256), r)
        if twin is not r and twin.verified_class != r.verified_class:
            raise ReviewError(f"{where}: {r.entry}: same image content as {twin.entry} in sample {r.sample_id} "
                              f"but verified as {r.verified_class!r}, not {twin.verified_class!r}")


def parse_decisions_json(text: str, where: str) -> Decisions:
    """Validate a decisions JSON (:data:`FORMAT`) as a whole; raises :class:`ReviewError` naming the entry."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ReviewError(f"{where}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from None
    if not isinstance(data, dict):
        raise ReviewError(f"{where}: expected a JSON object with \"format\": \"{FORMAT}\"")
    fmt = data.get("format")
    if fmt != FORMAT:
        raise ReviewError(f"{where}: format {fmt!r} is not {FORMAT!r} (a decisions file of another bloodray "
                          "version, or not a decisions file)")
    run_date = _text(data, "run_date", where)
    if not _DATE.match(run_date):
        raise ReviewError(f"{where}: run_date {run_date!r} is not YYYY-MM-DD")
    run_id = _text(data, "run_id", where)
    exported = data.get("exported_at")
    exported_at = parse_time(exported, f"{where}: exported_at") if exported is not None else None
    output_uri = _text(data, "output_uri", where, required=False)
    raw_reviews, raw_signoffs = data.get("reviews", []), data.get("signoffs", [])
    for key, value in (("reviews", raw_reviews), ("signoffs", raw_signoffs)):
        if not isinstance(value, list):
            raise ReviewError(f"{where}: {key} must be a list")
    reviews = []
    for i, item in enumerate(raw_reviews):
        at = f"{where}: reviews[{i}]"
        if not isinstance(item, dict):
            raise ReviewError(f"{at}: expected an object")
        uri, sample = _text(item, "image_uri", at), _text(item, "sample_id", at)
        at = f"{at} {_cell(uri, sample)}"
        predicted = _text(item, "predicted_class", at, required=False)
        if predicted is not None and predicted not in VERIFIED_CLASSES:
            raise ReviewError(f"{at}: unknown predicted_class {predicted!r}")
        reviews.append(ReviewDecision(
            entry=f"reviews[{i}]", sample_id=sample, image_uri=uri,
            image_sha256=_sha(_text(item, "image_sha256", at), at), predicted_class=predicted,
            verified_class=_verified_class(_text(item, "verified_class", at), at, aliases=False),
            reviewer=_text(item, "reviewer", at), reviewed_at=parse_time(item.get("reviewed_at"), f"{at}: reviewed_at"),
            run_id=run_id))
    _check_duplicates(reviews, where)
    signoffs = []
    for i, item in enumerate(raw_signoffs):
        at = f"{where}: signoffs[{i}]"
        if not isinstance(item, dict):
            raise ReviewError(f"{at}: expected an object")
        sample = _text(item, "sample_id", at)
        at = f"{at} (sample {sample})"
        status = _text(item, "status", at)
        if status not in SIGNOFF_STATUSES:
            raise ReviewError(f"{at}: status {status!r} is not one of {', '.join(SIGNOFF_STATUSES)}")
        signoffs.append(SignOff(entry=f"signoffs[{i}]", sample_id=sample, reviewer=_text(item, "reviewer", at),
                                status=status, signed_at=parse_time(item.get("signed_at"), f"{at}: signed_at")))
    return Decisions(where=where, kind="json", run_date=run_date, run_id=run_id, output_uri=output_uri,
                     exported_at=exported_at, reviews=reviews, signoffs=signoffs)


def _restored(reader):
    """Rows of a review CSV with the formula escapes of :mod:`bloodray.csv_io` undone; parse errors as ReviewError."""
    try:
        for row in reader:
            yield {k: csv_io.restore(v) if isinstance(v, str) else v for k, v in row.items()}
    except csv_io.CSVFormatError as exc:
        raise ReviewError(str(exc)) from None


def parse_review_csv(text: str, where: str, reviewer: str | None = None) -> Decisions:
    """Validate a filled ``review.csv`` as a whole; rows with an empty ``verified_class`` are skipped.

    ``reviewer`` fills rows whose ``reviewer`` column is empty. Raises
    :class:`ReviewError` naming the first bad row.
    """
    try:
        header, reader, _ = csv_io.dict_rows(text, where)
    except csv_io.CSVFormatError as exc:
        raise ReviewError(str(exc)) from None
    missing = [c for c in ("image_uri", "verified_class") if c not in header]
    if missing:
        raise ReviewError(f"{where}: missing column(s) {', '.join(missing)}; expected {', '.join(CSV_COLUMNS)}")
    reviews = []
    for line, row in enumerate(_restored(reader), start=2):
        at = f"{where}: row {line}"
        raw = (row.get("verified_class") or "").strip()
        if not raw:
            continue
        verified = _verified_class(raw, at, aliases=True)
        who = (row.get("reviewer") or "").strip() or reviewer
        if not who:
            raise ReviewError(f"{at}: no reviewer (fill the reviewer column or pass --reviewer)")
        reviews.append(ReviewDecision(
            entry=f"row {line}", sample_id=(row.get("sample_id") or "").strip() or None,
            image_uri=(row.get("image_uri") or "").strip(),
            image_sha256=_sha((row.get("image_sha256") or "").strip() or None, at),
            predicted_class=(row.get("predicted_class") or "").strip() or None, verified_class=verified,
            reviewer=who, reviewed_at=None, run_id=(row.get("run_id") or "").strip() or None))
    _check_duplicates(reviews, where)
    ids = {r.run_id for r in reviews if r.run_id}
    return Decisions(where=where, kind="csv", run_date=None, run_id=ids.pop() if len(ids) == 1 else None,
                     reviews=reviews)


def parse_decisions(data: bytes, where: str, reviewer: str | None = None) -> Decisions:
    """A decisions JSON or a review CSV, told apart by content (a JSON object starts with ``{``)."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ReviewError(f"{where}: not a UTF-8 text file ({exc})") from None
    if text.lstrip().startswith("{"):
        if reviewer:
            raise ReviewError(f"{where}: --reviewer is for review CSV files; a decisions JSON names the reviewer "
                              "of every entry")
        return parse_decisions_json(text, where)
    return parse_review_csv(text, where, reviewer)


def to_json(decisions: Decisions) -> str:
    """The decisions JSON of ``decisions`` (what the review page downloads), for tools and tests."""
    def iso(t: dt.datetime | None) -> str | None:
        return None if t is None else t.astimezone(dt.timezone.utc).isoformat().replace("+00:00", "Z")

    return json.dumps({
        "format": FORMAT, "output_uri": decisions.output_uri, "run_date": decisions.run_date,
        "run_id": decisions.run_id, "exported_at": iso(decisions.exported_at),
        "reviews": [{"sample_id": r.sample_id, "image_uri": r.image_uri, "image_sha256": r.image_sha256,
                     "predicted_class": r.predicted_class, "verified_class": r.verified_class,
                     "reviewer": r.reviewer, "reviewed_at": iso(r.reviewed_at)} for r in decisions.reviews],
        "signoffs": [{"sample_id": s.sample_id, "reviewer": s.reviewer, "status": s.status,
                      "signed_at": iso(s.signed_at)} for s in decisions.signoffs],
    }, indent=1)
