"""A self-contained HTML report of one night's run, for lab staff first and engineers last.

:func:`write_report` reads the visible run of a date through the views of
:func:`bloodray.analysis.query.connect` and writes ONE file, ``report.html``
(figures and cell thumbnails embedded as ``data:`` URIs, no JavaScript), into a
local or object-storage folder, by default ``<out>/reports/run_date=<D>/``. It
reads at phone (390 px) and desktop widths. In order:

* the research-use statement and a one-line summary (samples, flagged, cells to review; once
  anything was reviewed or signed off, the verified counts with the machine's beside them);
* flagged samples (by the verified flags once reviewed);
* review and sign-off: per sample who reviewed, what is left, who signed off; reviews that no longer
  match an image (:mod:`~bloodray.analysis.report_verified`);
* one section per sample: its differential with confidence intervals and
  flags (machine and verified side by side once reviewed), then its cell gallery grouped by class
  (unidentified and review cells first, each with file name, class, confidence and OOD score when present);
* overview figures: differentials against the reference ranges, flags, review share, predictions;
* errors by stage and type;
* engineering details: run manifest fields, stage timings, superseded runs.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

from bloodray import storage

from bloodray.analysis import gallery, query
from bloodray.analysis import report_figures as rfig
from bloodray.analysis import report_verified as rver
from bloodray.analysis.report_figures import TOP_N
from bloodray.analysis.review_views import APPLIED_REVIEWS_SQL
from bloodray.classes import DIFFERENTIAL_CLASSES, reference_ranges
from bloodray.nightly.contract import RUN_DATE_PREFIX, run_day
from bloodray.nightly.pending import pending_commits

REPORT_FILE = "report.html"

log = logging.getLogger(__name__)


class ReportError(RuntimeError):
    """No report can be made (no committed run, unknown date); the message names the URI."""


@dataclass
class _Page:
    """What the HTML needs; PNGs are kept as bytes until everything is rendered."""

    run: dict[str, Any]
    samples: list[dict[str, Any]]
    classes: list[tuple[str, int, int]] = field(default_factory=list)  # class, n, n_review
    confidence_bins: list[tuple[float, int]] = field(default_factory=list)
    errors_by_type: list[tuple[str, str, int]] = field(default_factory=list)
    error_examples: list[dict[str, Any]] = field(default_factory=list)
    superseded: list[dict[str, Any]] = field(default_factory=list)
    #: runs of the date in their commit window (:mod:`bloodray.nightly.pending`), one line each.
    commits: list[str] = field(default_factory=list)
    figures: dict[str, bytes] = field(default_factory=dict)
    cells: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # sample_id -> gallery cells
    thumbs: dict[str, bytes] = field(default_factory=dict)  # image_uri -> JPEG
    verified: rver.Verified = field(default_factory=rver.Verified)


# --------------------------------------------------------------------------- data
def _rows(con: Any, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
    return query.fetch_arrow(con, sql, params).to_pylist()


def _columns(con: Any, view: str) -> set[str]:
    return {r[0] for r in con.execute(f"DESCRIBE {view}").fetchall()}


def _day(run_date: str | _dt.date) -> _dt.date:
    """``run_date`` (``YYYY-MM-DD`` or a date) as a date, as the views hold it."""
    try:
        return run_day(run_date)
    except ValueError as exc:
        raise ReportError(f"run_date {exc}") from None


def _load(output_uri: str, run_date: _dt.date | None, storage_options: Mapping[str, Any] | None) -> _Page:
    con = query.connect(output_uri, storage_options)
    try:
        # Dates, as the views' run_date: the SQL below compares date with date.
        dates = [r[0] for r in con.execute("SELECT run_date FROM runs ORDER BY run_date").fetchall()]
        if not dates:
            raise ReportError(f"{output_uri}: no committed run to report on (no manifest under runs/)")
        if run_date is None:
            run_date = dates[-1]
        elif run_date not in dates:
            recent = ", ".join(d.isoformat() for d in dates[-5:])
            raise ReportError(f"{output_uri}: no committed run for run_date={run_date} (latest dates: {recent})")
        run = _rows(con, "SELECT * FROM runs WHERE run_date = ?", [run_date])[0]
        superseded = _rows(
            con, "SELECT run_id, committed_at FROM all_runs WHERE run_date = ? AND run_id <> ? "
            "ORDER BY committed_at DESC", [run_date, run["run_id"]])
        samples = _rows(con, "SELECT * FROM differentials WHERE run_date = ? ORDER BY sample_id", [run_date])
        page = _Page(run=run, samples=samples, superseded=superseded, verified=rver.load(con, run_date),
                     commits=[c.describe() for c in pending_commits(output_uri, storage_options,
                                                                    run_date.isoformat())])
        for line in page.commits:
            log.warning("%s: report of %s: %s", output_uri, run_date, line)

        pred_cols = _columns(con, "predictions")
        review = "count(*) FILTER (WHERE needs_review)" if "needs_review" in pred_cols else "0"
        if "predicted_class" in pred_cols:
            page.classes = [tuple(r) for r in con.execute(
                f"SELECT coalesce(predicted_class, '(none)'), count(*), {review} FROM predictions "
                "WHERE run_date = ? GROUP BY 1 ORDER BY 2 DESC", [run_date]).fetchall()]
        if "confidence" in pred_cols:
            # Binned in DuckDB so a night of a million images never leaves the engine.
            page.confidence_bins = [tuple(r) for r in con.execute(
                "SELECT least(floor(confidence * 20), 19) / 20.0 AS bin, count(*) FROM predictions "
                "WHERE run_date = ? AND confidence IS NOT NULL GROUP BY 1 ORDER BY 1", [run_date]).fetchall()]
        err_cols = _columns(con, "errors")
        stage = "coalesce(CAST(stage AS VARCHAR), '')" if "stage" in err_cols else "''"
        etype = "coalesce(CAST(error_type AS VARCHAR), '')" if "error_type" in err_cols else "''"
        page.errors_by_type = [tuple(r) for r in con.execute(
            f"SELECT {stage}, {etype}, count(*) FROM errors WHERE run_date = ? GROUP BY 1, 2 ORDER BY 3 DESC",
            [run_date]).fetchall()]
        page.error_examples = _rows(con, f"SELECT * FROM errors WHERE run_date = ? LIMIT {TOP_N}", [run_date])
        _load_cells(con, page, run_date, pred_cols)
        return page
    finally:
        con.close()


def _load_cells(con: Any, page: _Page, run_date: _dt.date, pred_cols: set[str]) -> None:
    """Gallery cells: every review/unidentified cell, the least confident few others per sample and class."""
    needed = {"sample_id", "image_uri", "predicted_class", "confidence", "needs_review"}
    if not needed <= pred_cols:
        return
    extra = [c for c in ("status", "ood_score") if c in pred_cols]
    special = "needs_review" + (f" OR status = '{gallery.UNIDENTIFIED}'" if "status" in extra else "")
    cols = ", ".join(sorted(needed) + extra)
    # Picked in DuckDB, so a night of a million images never leaves the engine.
    picked = (f"SELECT {cols} FROM predictions WHERE run_date = ? QUALIFY ({special}) OR row_number() OVER "
              f"(PARTITION BY sample_id, predicted_class, ({special}) ORDER BY confidence, image_uri) "
              f"<= {gallery.CONFIDENT_PER_CLASS}")
    verified = {}
    if page.verified.active:
        verified = dict(con.execute(f"SELECT image_uri, new_class FROM ({APPLIED_REVIEWS_SQL}) WHERE run_date = ?",
                                    [run_date]).fetchall())
    for cell in _rows(con, picked + " ORDER BY sample_id, image_uri", [run_date]):
        cell["verified_class"] = verified.get(cell["image_uri"])
        page.cells.setdefault(str(cell["sample_id"]), []).append(cell)
    rows = con.execute(f"SELECT t.image_uri, t.jpeg FROM thumbnails t JOIN ({picked}) p USING (image_uri) "
                       "WHERE t.run_date = ?", [run_date, run_date]).fetchall()
    page.thumbs = {u: bytes(j) for u, j in rows if j is not None}


# --------------------------------------------------------------------------- HTML


_e = gallery.e


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return "–" if math.isnan(value) else f"{value:.{digits}f}"
    if isinstance(value, _dt.datetime):
        return value.isoformat(sep=" ", timespec="seconds")
    return str(value)


def _table(header: Sequence[str], rows: Iterable[Sequence[Any]], numeric: Sequence[bool] | None = None) -> str:
    numeric = numeric or [False] * len(header)
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td{_td_class(n, False)}>{_e(_fmt(v))}</td>" for v, n in zip(row, numeric)) + "</tr>"
        for row in rows
    )
    return gallery.scroll(f"<table><tr>{head}</tr>{body}</table>")


def _timings(raw: Any) -> list[tuple[str, Any]]:
    if raw in (None, ""):
        return []
    try:
        data = json.loads(raw) if isinstance(raw, str) else raw
    except ValueError:
        return [("timings_json", raw)]
    out: list[tuple[str, Any]] = []

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, Mapping):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        else:
            out.append((prefix, round(value, 2) if isinstance(value, float) else value))

    walk("", data)
    return out


def _summary_html(page: _Page) -> str:
    run = page.run
    keys = ("run_id", "run_date", "status", "started_at", "committed_at", "model_name", "checkpoint",
            "checkpoint_id", "review_threshold", "input_uri", "output_uri", "n_inputs", "n_predictions",
            "n_errors", "n_samples", "n_review", "incremental_skipped_samples", "carried_from_run_id")
    rows = [(k, run.get(k)) for k in keys if k in run]
    started, committed = run.get("started_at"), run.get("committed_at")
    if isinstance(started, _dt.datetime) and isinstance(committed, _dt.datetime):
        rows.append(("wall time", f"{(committed - started).total_seconds():.1f} s"))
    parts = ["<h2>Run</h2>", _table(("field", "value"), rows)]
    if page.superseded:
        ids = ", ".join(_e(r["run_id"]) for r in page.superseded)
        parts.append(f"<p class=muted>Superseded committed runs of this date (not shown): {ids}</p>")
    timings = _timings(run.get("timings_json"))
    if timings:
        parts += ["<h3>Timings (s)</h3>", _table(("stage", "seconds"), timings, (False, True))]
    return "".join(parts)


def _flagged_html(page: _Page) -> str:
    if page.verified.active:  # what the lab acts on: the flags after review, the machine's beside them
        pairs = [(page.verified.samples.get(str(s.get("sample_id")), s), s) for s in page.samples]
        flagged = [(v, s) for v, s in pairs if rfig.flagged(v)]
        header, rows = ("sample_id", "flags after review", "machine flags", "n_wbc"), [
            (v.get("sample_id"), rfig.flag_text(v), rfig.flag_text(s), v.get("n_wbc"))
            for v, s in flagged]
    else:
        flagged = [(s, s) for s in page.samples if rfig.flagged(s)]
        header, rows = ("sample_id", "flags", "n_wbc"), [
            (s.get("sample_id"), rfig.flag_text(s), s.get("n_wbc")) for s, _ in flagged]
    parts = [f"<h2>Flagged samples ({len(flagged)} of {len(page.samples)})</h2>"]
    if not flagged:
        return parts[0] + "<p>No sample is flagged.</p>"
    parts.append(_table(header, rows, [False] * (len(header) - 1) + [True]))
    if "flags.png" in page.figures:
        parts.append(_img(page, "flags.png", "Number of samples per flag"))
    return "".join(parts)


def _td_class(numeric: bool, flag: bool) -> str:
    names = " ".join(n for n, on in (("n", numeric), ("flag", flag)) if on)
    return f' class="{names}"' if names else ""


def _samples_html(page: _Page) -> str:
    ref = reference_ranges()
    header = (["sample_id", "n_images", "n_classified", "n_errors", "n_review", "review %", "n_wbc"]
              + [f"{c} % ({ref[c].low:g}–{ref[c].high:g})" for c in DIFFERENTIAL_CLASSES]
              + ["IG /100 WBC", "erythroblast /100 WBC", "platelets", "flags"])
    rows = []
    for s in page.samples:
        cells: list[tuple[Any, bool, bool]] = [(s.get("sample_id"), False, False)]
        for k in ("n_images", "n_classified", "n_errors", "n_review"):
            cells.append((s.get(k), True, False))
        cells.append((rfig.review_pct(s), True, False))
        low_wbc = bool(s.get("flag_low_wbc_count"))
        cells.append((_fmt(s.get("n_wbc")) + (" ↓" if low_wbc else ""), True, low_wbc))
        for c in DIFFERENTIAL_CLASSES:
            side = rfig.side(s, c)
            value = _fmt(rfig.num(s.get(f"pct_{c}")))
            cells.append((value + (" ↓" if side == "low" else " ↑" if side == "high" else ""), True, bool(side)))
        for col, flag in (("ig_per_100_wbc", "flag_ig"), ("erythroblast_per_100_wbc", "flag_erythroblasts")):
            raised = bool(s.get(flag))
            cells.append((_fmt(rfig.num(s.get(col))) + (" ↑" if raised else ""), True, raised))
        cells.append((s.get("platelet_count"), True, False))
        cells.append((rfig.flag_text(s), False, False))
        tds = "".join(f"<td{_td_class(num, flag)}>{_e(_fmt(v))}</td>" for v, num, flag in cells)
        rows.append(f"<tr{' class=flagged' if rfig.flagged(s) else ''}>{tds}</tr>")
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    legend = ("<p class=muted>Highlighted cells (↓ low, ↑ high) are outside the adult reference range or "
              "otherwise flagged; a red bar marks flagged samples.</p>")
    return f"<h2>All samples</h2>{legend}" + gallery.scroll(f"<table><tr>{head}</tr>{''.join(rows)}</table>")


def _review_html(page: _Page) -> str:
    n_review = sum(int(rfig.num(s.get("n_review")) or 0) for s in page.samples)
    n_classified = sum(int(rfig.num(s.get("n_classified")) or 0) for s in page.samples)
    share = f" ({100.0 * n_review / n_classified:.1f} % of {n_classified} classified images)" if n_classified else ""
    parts = [f"<h2>Review queue</h2><p><b>{n_review}</b> images need review{_e(share)}; "
             "per-sample counts and shares are in the table above.</p>"]
    if "review.png" in page.figures:
        parts.append(_img(page, "review.png", "Share of images needing review per sample"))
    return "".join(parts)


def _predictions_html(page: _Page) -> str:
    if not page.classes:
        return "<h2>Predictions</h2><p>No predictions in this run.</p>"
    table = _table(("predicted_class", "images", "needs review"), page.classes, (False, True, True))
    img = _img(page, "predictions.png", "Predicted classes and confidence")
    return f"<h2>Predictions</h2>{table}{img}"


def _errors_html(page: _Page) -> str:
    total = sum(n for _, _, n in page.errors_by_type)
    if not total:
        return "<h2>Errors</h2><p>No errors.</p>"
    parts = [f"<h2>Errors ({total})</h2>",
             _table(("stage", "error_type", "count"), page.errors_by_type, (False, False, True))]
    if page.error_examples:
        parts.append(f"<h3>Examples (first {min(TOP_N, total)})</h3>")
        parts.append(_table(("sample_id", "image_uri", "stage", "error_type", "message"),
                            [(r.get("sample_id"), r.get("image_uri"), r.get("stage"), r.get("error_type"),
                              rfig.short(r.get("message") or "", 300)) for r in page.error_examples]))
    return "".join(parts)


def _shift_banner(page: _Page) -> str:
    """The domain-shift alarm, shown first: these results are not to be read like any other night's."""
    if not page.run.get("domain_shift"):
        return ""
    shifted = [str(s.get("sample_id")) for s in page.samples if s.get("domain_shift")]
    return (f"<div class=alarm><strong>Domain-shift alarm: images unlike the training data.</strong> "
            f"{len(shifted)} of {len(page.samples)} sample(s) affected, {_e(page.run.get('n_unidentified'))} "
            f"cell(s) unidentified; their differentials are unreliable and their flags are kept but unverified. "
            f"Samples: {_e(', '.join(shifted[:TOP_N]))}{' ...' if len(shifted) > TOP_N else ''}</div>")


def _commit_banner(page: _Page) -> str:
    """A run of the date in its commit window: this page may mix it with the date's previous run."""
    if not page.commits:
        return ""
    return ("<div class='alarm commit-warning'><strong>This date is being committed: the page may mix two runs."
            "</strong> " + " ".join(_e(line) + "." for line in page.commits)
            + " Make the report again once the commit has finished.</div>")


def _img(page: _Page, name: str, alt: str) -> str:
    """A figure embedded as a data: URI ("" when it was not rendered)."""
    data = page.figures.get(name)
    return f"<img class=fig src='{gallery.data_uri(data, 'image/png')}' alt='{_e(alt)}'>" if data else ""


def _interval(sample: Mapping[str, Any], col: str) -> str:
    lo, hi = rfig.num(sample.get(f"{col}_lo")), rfig.num(sample.get(f"{col}_hi"))
    return "–" if lo is None or hi is None else f"{lo:.1f}–{hi:.1f}"


def _sample_html(page: _Page, s: Mapping[str, Any]) -> str:
    """One sample: flags, its differential with intervals against the reference ranges, then its gallery."""
    ref = reference_ranges()
    sid = str(s.get("sample_id"))
    flags = rfig.flag_text(s)
    rows = []
    for c in DIFFERENTIAL_CLASSES:
        sd = rfig.side(s, c)
        mark = " ↓" if sd == "low" else " ↑" if sd == "high" else ""
        cells = [(c, False, False), (_fmt(rfig.num(s.get(f"pct_{c}"))) + mark, True, bool(sd)),
                 (_interval(s, f"pct_{c}"), True, False), (f"{ref[c].low:g}–{ref[c].high:g}", True, False),
                 (s.get(f"count_{c}"), True, False)]
        rows.append("<tr>" + "".join(f"<td{_td_class(n, f)}>{_e(_fmt(v))}</td>" for v, n, f in cells) + "</tr>")
    for label, col in (("IG /100 WBC", "ig_per_100_wbc"), ("erythroblasts /100 WBC", "erythroblast_per_100_wbc")):
        rows.append(f"<tr><td>{_e(label)}</td><td class=n>{_e(_fmt(rfig.num(s.get(col))))}</td>"
                    f"<td class=n>{_e(_interval(s, col))}</td><td></td><td></td></tr>")
    head = "".join(f"<th>{h}</th>" for h in ("class", "%", "95 % interval", "reference", "cells"))
    counts = (f"{_fmt(s.get('n_wbc'))} white cells, {_fmt(s.get('n_classified'))} classified, "
              f"{_fmt(s.get('n_review'))} to review, {_fmt(s.get('n_errors'))} unreadable")
    flag_line = (f"<p class=flags>Flags: {_e(flags)}</p>" if flags else "<p>No flags.</p>")
    corrected = s.get("flags_confusion_corrected")
    if corrected is not None:  # null: a run from before the column
        flag_line += ("<p class=muted>Intervals: of the true rates, corrected for the model's measured confusion.</p>"
                      if corrected else "<p class=muted>Intervals and flags assume every cell was classified right "
                      "(the checkpoint carries no val confusion matrix).</p>")
    cells = page.cells.get(sid, [])
    differential = (flag_line + gallery.scroll(f"<table><tr>{head}</tr>{''.join(rows)}</table>")
                    if not page.verified.active else rver.sample_block(s, page.verified.samples.get(sid)))
    return (f"<section id='sample-{_e(sid)}'><h2>Sample {_e(sid)}</h2><p class=muted>{_e(counts)}</p>"
            + differential + "<h3>Cells</h3>" + gallery.gallery(cells, page.thumbs) + "</section>")


def _html(page: _Page, output_uri: str) -> str:
    run = page.run
    figs = sorted((k for k in page.figures if k.startswith("differential_")),
                  key=lambda k: int(k.split("_")[1].split(".")[0]))
    diff = "".join(_img(page, k, "WBC differential against reference ranges") for k in figs)
    now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    body = (
        f"<h1>bloodray report — {_e(run.get('run_date'))}</h1>"
        + _commit_banner(page) + _shift_banner(page)
        + rver.headline(page.samples, page.verified)
        + _flagged_html(page)
        + rver.section(page.samples, page.verified)
        + "".join(_sample_html(page, s) for s in page.samples)
        + "<h2>Overview</h2>" + (diff or "<p>No samples in this run.</p>")
        + _samples_html(page) + _review_html(page) + _predictions_html(page) + _errors_html(page)
        + f"<h2>Engineering details</h2><p class=muted>Run {_e(run.get('run_id'))} from {_e(output_uri)}; "
        f"report generated {_e(now)}.</p>" + _summary_html(page).replace("<h2>Run</h2>", "", 1)
    )
    return gallery.page(f"bloodray report {run.get('run_date')}", body)


# --------------------------------------------------------------------------- public API
def write_report(output_uri: str, run_date: str | _dt.date | None = None, dest: str | None = None,
                 storage_options: Mapping[str, Any] | None = None) -> str:
    """Write the HTML report of one date's visible run and return the URI of ``report.html``.

    Args:
        output_uri: the output root the job wrote (local path or ``s3://``).
        run_date: ``YYYY-MM-DD``; default the latest date with a committed run.
        dest: folder for ``report.html`` (self-contained); default
            ``<output_uri>/reports/run_date=<D>/``. May be local or on S3.
        storage_options: fsspec options used for both the output root and ``dest``.

    Raises:
        storage.StorageError: the root or ``dest`` cannot be read or written.
        ReportError: no committed run (for that date), or ``run_date`` is not a date.
    """
    page = _load(output_uri, None if run_date is None else _day(run_date), storage_options)
    rfig.render_figures(page)
    document = _html(page, output_uri)

    dest = dest or storage.join(output_uri, "reports", f"{RUN_DATE_PREFIX}{page.run['run_date']}")
    fs, path = storage.filesystem(dest, storage_options)
    path = path.rstrip("/")
    try:
        storage.put_bytes(fs, f"{path}/{REPORT_FILE}", document.encode("utf-8"))
    except Exception as exc:  # noqa: BLE001 - re-raised with the URI attached
        raise storage.describe_storage_error(dest, exc) from exc
    return storage.join(dest, REPORT_FILE)
