"""The review round trip behind ``bloodray review export|import|labels``.

``export`` writes ``review.html``, the interactive review page of every cell
of a date's visible run (:mod:`bloodray.review.page`: reclassify, sign off,
download the decisions file), and ``review.csv``: the cells to review -- cells
the job marked ``needs_review`` and, when the out-of-distribution check added
a ``status`` column, cells it marked ``unidentified`` -- with
``verified_class`` and ``reviewer`` empty, to fill in. ``import`` is
:func:`bloodray.review.records.import_decisions` (the CSV or the decisions
JSON of :mod:`bloodray.review.decisions`). ``labels`` writes every
reviewed cell as ``<dest>/<verified_class>/<sample_id>__<hash>__<file>`` -- an
ImageFolder that ``bloodray train`` and
:func:`bloodray.data.labelled.list_labelled_images` read directly.
"""

from __future__ import annotations

import hashlib
import io
import posixpath
import tarfile
from dataclasses import dataclass
from typing import Any, Mapping

from bloodray import csv_io, storage
from bloodray.analysis import gallery, query
from bloodray.analysis.review_views import APPLIED_REVIEWS_SQL
from bloodray.review.decisions import CSV_COLUMNS, ReviewError
from bloodray.data.stages import name_kind, read_many
from bloodray.nightly import contract
from bloodray.nightly.pending import refuse_pending
from bloodray.review.page import PageError, write_page

CSV_FILE, HTML_FILE = "review.csv", "review.html"
#: Listing of an exported label folder: where each image's bytes came from.
LABELS_MANIFEST = "labels.csv"


@dataclass(frozen=True)
class ExportResult:
    """What ``review export`` wrote: the review page, the CSV of cells to review, and their cell counts."""

    csv_uri: str
    html_uri: str
    n_review: int
    n_cells: int


def _visible_run(con, output_uri: str, run_date: str) -> dict[str, Any]:
    rows = query.fetch_arrow(con, "SELECT run_id, run_date FROM runs WHERE run_date = ?", [run_date]).to_pylist()
    if not rows:
        raise ReviewError(f"{output_uri}: no committed run for run_date={run_date}")
    return rows[0]


def review_cells(output_uri: str, run_date: str, storage_options: Mapping[str, Any] | None = None,
                 with_thumbnails: bool = True) -> tuple[str, list[dict[str, Any]], dict[str, bytes]]:
    """``(run_id, cells, thumbnails)``: the cells to review of a date's visible run and their JPEGs.

    Refuses (:class:`ReviewError`) while a run of the date is in its commit
    window: its tables would mix two runs (:mod:`bloodray.nightly.pending`).
    """
    refuse_pending(output_uri, str(run_date), ReviewError, storage_options)
    con = query.connect(output_uri, storage_options)
    try:
        run_id = _visible_run(con, output_uri, str(run_date))["run_id"]
        cols = {r[0] for r in con.execute("DESCRIBE predictions").fetchall()}
        extra = [c for c in ("status", "ood_score") if c in cols]
        wanted = "needs_review" + (f" OR status = '{gallery.UNIDENTIFIED}'" if "status" in cols else "")
        select = ", ".join(["run_id", "sample_id", "image_uri", "image_sha256", "predicted_class", "confidence",
                            "needs_review"] + extra)
        cells = query.fetch_arrow(con, f"SELECT {select} FROM predictions WHERE run_id = ? AND ({wanted}) "
                                       "ORDER BY sample_id, image_uri", [run_id]).to_pylist()
        thumbs: dict[str, bytes] = {}
        if with_thumbnails and cells:
            rows = con.execute("SELECT t.image_uri, t.jpeg FROM thumbnails t JOIN predictions p "
                               f"USING (run_id, image_uri) WHERE t.run_id = ? AND ({wanted})", [run_id]).fetchall()
            thumbs = {u: bytes(j) for u, j in rows if j is not None}
        return run_id, cells, thumbs
    finally:
        con.close()


def export_review(output_uri: str, run_date: str, dest: str,
                  storage_options: Mapping[str, Any] | None = None) -> ExportResult:
    """Write the review page ``review.html`` and ``review.csv`` for a date into ``dest``.

    The page (:mod:`bloodray.review.page`) holds every cell of the date; the
    CSV, kept for spreadsheets and scripts, lists the cells to review.
    """
    run_id, cells, _ = review_cells(output_uri, run_date, storage_options, with_thumbnails=False)
    buf = io.StringIO()
    writer = csv_io.writer(buf)
    writer.writerow(CSV_COLUMNS)
    for c in cells:
        writer.writerow([c["run_id"], c["sample_id"], c["image_uri"], c["image_sha256"], c["predicted_class"],
                         f"{c['confidence']:.4f}", "", ""])
    try:
        document, n_cells = write_page(output_uri, str(run_date), storage_options)
    except PageError as exc:
        raise ReviewError(str(exc)) from exc
    fs, path = storage.filesystem(dest, storage_options)
    path = path.rstrip("/")
    try:
        storage.put_bytes(fs, posixpath.join(path, HTML_FILE), document.encode("utf-8"))
        storage.put_bytes(fs, posixpath.join(path, CSV_FILE), buf.getvalue().encode("utf-8"))
    except Exception as exc:  # noqa: BLE001
        raise storage.describe_storage_error(dest, exc) from exc
    return ExportResult(csv_uri=storage.join(dest, CSV_FILE), html_uri=storage.join(dest, HTML_FILE),
                        n_review=len(cells), n_cells=n_cells)


def tar_member(uri: str, storage_options: Mapping[str, Any] | None = None,
               listed: dict[str, bool] | None = None) -> tuple[str, str] | None:
    """``(shard URI, member)`` when ``uri`` names a member of a tar shard, None for a plain file.

    Told apart by the store's listing, not by the character: ``<shard>#<member>``
    is a member when the part before a ``#`` is a ``.tar`` the store holds as a
    file and ``uri`` itself is not a file (``S#3/cell.jpg`` is a plain path).
    ``listed`` caches the answers per path.
    """
    cache = listed if listed is not None else {}

    def is_file(target: str) -> bool:
        if target not in cache:
            try:
                fs, path = storage.filesystem(target, storage_options)
                cache[target] = bool(fs.isfile(path))
            except Exception:  # noqa: BLE001 - unreachable: not listed
                cache[target] = False
        return cache[target]

    if "#" not in uri or is_file(uri):
        return None
    for at in (i for i, ch in enumerate(uri) if ch == "#"):
        shard = uri[:at]
        if name_kind(shard) == "tar" and is_file(shard):
            return shard, uri[at + 1:]
    return None


def _archive_bytes(uris: list[str], storage_options: Mapping[str, Any] | None) -> dict[str, bytes]:
    """Original bytes of the images still reachable (plain files and tar members); others are left out."""
    out: dict[str, bytes] = {}
    listed: dict[str, bool] = {}
    members: dict[str, dict[str, str]] = {}  # shard -> member -> image URI
    plain = []
    for uri in uris:
        found = tar_member(uri, storage_options, listed)
        if found:
            members.setdefault(found[0], {})[found[1]] = uri
        else:
            plain.append(uri)
    for uri, data in zip(plain, read_many(plain, storage_options) if plain else []):
        if isinstance(data, bytes):
            out[uri] = data
    for shard, wanted in members.items():
        try:
            fs, path = storage.filesystem(shard, storage_options)
            with fs.open(path, "rb") as fh, tarfile.open(fileobj=fh, mode="r|") as tar:
                for member in tar:
                    if member.name in wanted and member.isfile() and wanted[member.name] not in out:
                        out[wanted[member.name]] = tar.extractfile(member).read()
        except Exception:  # noqa: BLE001 - an unreachable shard: its cells fall back to thumbnails
            continue
    return out


def label_file_name(sample_id: str, image_uri: str) -> str:
    """``<sample_id>__<8 hex of the URI's SHA-256>__<file>``: unique per cell, still readable.

    ``<sample>__<file>`` alone collides: one sample can hold ``a/x.jpg`` and
    ``b/x.jpg``, and two shards the same member name.
    """
    digest = hashlib.sha256(image_uri.encode("utf-8")).hexdigest()[:8]
    return f"{sample_id}__{digest}__{posixpath.basename(image_uri)}"


def export_labels(output_uri: str, dest: str, storage_options: Mapping[str, Any] | None = None) -> dict[str, int]:
    """Write every reviewed cell of the visible runs as ``<dest>/<verified_class>/<name>`` (:func:`label_file_name`).

    The original image bytes are copied from the archive where it is still
    reachable, else the thumbnail is written (``<file>.thumb.jpg``);
    ``labels.csv`` in ``dest`` lists each file with its source
    (``archive``/``thumbnail``). Returns counts per source.
    """
    con = query.connect(output_uri, storage_options)
    try:
        # Every review that applies to a cell of a visible run, by the cell's current file; cells a reviewer
        # called unidentified are no class to train on.
        rows = con.execute(f"""WITH r AS ({APPLIED_REVIEWS_SQL})
            SELECT r.image_uri, p.sample_id, r.new_class, r.reviewer, t.jpeg FROM r
            JOIN predictions p USING (run_date, image_uri) LEFT JOIN thumbnails t USING (run_id, image_uri)
            WHERE r.new_class <> '{contract.UNIDENTIFIED}'
            ORDER BY r.new_class, p.sample_id, r.image_uri""").fetchall()
    finally:
        con.close()
    if not rows:
        raise ReviewError(f"{output_uri}: no reviewed cells to export (import a review first)")
    originals = _archive_bytes([r[0] for r in rows], storage_options)
    fs, base = storage.filesystem(dest, storage_options)
    base = base.rstrip("/")
    listing = io.StringIO()
    writer = csv_io.writer(listing)
    writer.writerow(["file", "class_name", "image_uri", "sample_id", "reviewer", "source"])
    counts = {"archive": 0, "thumbnail": 0, "missing": 0}
    try:
        for uri, sample_id, cls, who, jpeg in rows:
            name = label_file_name(str(sample_id), uri)
            data, source = originals.get(uri), "archive"
            if data is None:
                data, source = (bytes(jpeg) if jpeg is not None else None), "thumbnail"
                name = posixpath.splitext(name)[0] + ".thumb.jpg"
            if data is None:
                counts["missing"] += 1
                continue
            counts[source] += 1
            storage.put_bytes(fs, posixpath.join(base, cls, name), data)
            writer.writerow([f"{cls}/{name}", cls, uri, sample_id, who, source])
        storage.put_bytes(fs, posixpath.join(base, LABELS_MANIFEST), listing.getvalue().encode("utf-8"))
    except Exception as exc:  # noqa: BLE001
        raise storage.describe_storage_error(dest, exc) from exc
    return counts
