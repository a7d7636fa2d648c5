"""A static HTML report of one night's run, for analysts and lab staff.

:func:`write_report` reads the visible run of a date through the views of
:func:`bloodray.analysis.query.connect` and writes ``report.html`` plus the PNG figures
it links to (relative links, no JavaScript) into a local or object-storage
folder, by default ``<out>/reports/run_date=<D>/``. The report holds:

* a run summary (run id, checkpoint, counts, stage timings);
* flagged samples, with their flags and a chart of flag frequency;
* every sample's five-part WBC differential plotted against the reference ranges;
* a per-sample table of the differential, out-of-range values highlighted;
* the review queue (images needing review, per sample and overall);
* prediction summary (classes, confidence) and errors by stage and type.
"""

from __future__ import annotations

import datetime as _dt
import html
import io
import json
import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

from bloodray import storage

from bloodray.analysis import query
from bloodray.classes import DIFFERENTIAL_CLASSES, cell_class, reference_ranges
from bloodray.nightly.contract import RUN_DATE_PREFIX

REPORT_FILE = "report.html"
#: Samples per differential figure; more make rows too thin to read.
SAMPLES_PER_FIGURE = 40
#: Rows listed in the review-queue chart and the error examples.
TOP_N = 40

_OK, _LOW, _HIGH = "#2b7bba", "#d62728", "#d62728"


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
    figures: dict[str, bytes] = field(default_factory=dict)


# --------------------------------------------------------------------------- data
def _rows(con: Any, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
    return query.fetch_arrow(con, sql, params).to_pylist()


def _columns(con: Any, view: str) -> set[str]:
    return {r[0] for r in con.execute(f"DESCRIBE {view}").fetchall()}


def _load(output_uri: str, run_date: str | None, storage_options: Mapping[str, Any] | None) -> _Page:
    con = query.connect(output_uri, storage_options)
    try:
        dates = [r[0] for r in con.execute("SELECT run_date FROM runs ORDER BY run_date").fetchall()]
        if not dates:
            raise ReportError(f"{output_uri}: no committed run to report on (no manifest under runs/)")
        if run_date is None:
            run_date = dates[-1]
        elif run_date not in dates:
            recent = ", ".join(dates[-5:])
            raise ReportError(f"{output_uri}: no committed run for run_date={run_date} (latest dates: {recent})")
        run = _rows(con, "SELECT * FROM runs WHERE run_date = ?", [run_date])[0]
        superseded = _rows(
            con, "SELECT run_id, committed_at FROM all_runs WHERE run_date = ? AND run_id <> ? "
            "ORDER BY committed_at DESC", [run_date, run["run_id"]])
        samples = _rows(con, "SELECT * FROM differentials WHERE run_date = ? ORDER BY sample_id", [run_date])
        page = _Page(run=run, samples=samples, superseded=superseded)

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
        return page
    finally:
        con.close()


# --------------------------------------------------------------------------- flags
def _num(value: Any) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(out) else out


def _side(sample: Mapping[str, Any], cls: str) -> str | None:
    """``low``/``high`` when the sample's fraction of ``cls`` is out of range.

    The job's flag columns are authoritative; the reference range is only the
    fallback for outputs written before a flag column existed.
    """
    low, high = sample.get(f"flag_{cls}_low"), sample.get(f"flag_{cls}_high")
    if low is not None or high is not None:
        return "low" if low else "high" if high else None
    value, ref = _num(sample.get(f"pct_{cls}")), reference_ranges().get(cls)
    if value is None or ref is None:
        return None
    return "low" if value < ref.low and ref.flag_low else "high" if value > ref.high else None


def _flags(sample: Mapping[str, Any]) -> list[str]:
    flags = sample.get("flags")
    if flags is not None:
        return [str(f) for f in flags]
    out = [f"{c}_{s}" for c in DIFFERENTIAL_CLASSES if (s := _side(sample, c))]
    out += [name for name in ("erythroblasts", "ig", "low_wbc_count") if sample.get(f"flag_{name}")]
    return out


def _flagged(sample: Mapping[str, Any]) -> bool:
    any_flag = sample.get("any_flag")
    return bool(any_flag) if any_flag is not None else bool(_flags(sample))


def _review_pct(sample: Mapping[str, Any]) -> float | None:
    n_review = _num(sample.get("n_review"))
    denom = _num(sample.get("n_classified")) or _num(sample.get("n_images"))
    return None if n_review is None or not denom else 100.0 * n_review / denom


# --------------------------------------------------------------------------- figures
def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def _short(text: Any, n: int = 24) -> str:
    text = str(text)
    return text if len(text) <= n else text[: n - 1] + "…"


def _differential_figures(samples: list[dict[str, Any]]) -> dict[str, bytes]:
    # A bare Figure renders through Agg without pyplot, so no global backend is
    # switched in the caller's process and nothing opens a window.
    from matplotlib.figure import Figure

    ref = reference_ranges()
    # One x scale per class across all pages, so pages compare at a glance.
    xmax = {c: max([ref[c].high * 1.6] + [v * 1.08 for s in samples if (v := _num(s.get(f"pct_{c}"))) is not None])
            for c in DIFFERENTIAL_CLASSES}
    out: dict[str, bytes] = {}
    for page, start in enumerate(range(0, len(samples), SAMPLES_PER_FIGURE), start=1):
        chunk = samples[start:start + SAMPLES_PER_FIGURE]
        fig = Figure(figsize=(13, 1.4 + 0.3 * len(chunk)), layout="constrained")
        axes = fig.subplots(1, len(DIFFERENTIAL_CLASSES), sharey=True)
        ys = list(range(len(chunk)))
        for ax, cls in zip(axes, DIFFERENTIAL_CLASSES):
            rng = ref[cls]
            values = [_num(s.get(f"pct_{cls}")) for s in chunk]
            ax.axvspan(rng.low, rng.high, color="#2ca02c", alpha=0.18, lw=0)
            for y, s, v in zip(ys, chunk, values):
                if v is None:
                    continue
                side = _side(s, cls)
                ax.plot([v], [y], "o", ms=6, color=_OK if side is None else _HIGH if side == "high" else _LOW,
                        mfc="white" if side is None else None)
            ax.set_xlim(0, xmax[cls])
            ax.set_title(f"{cell_class(cls).label}\n{rng.low:g}–{rng.high:g} %", fontsize=10)
            ax.set_xlabel("% of WBC")
            ax.grid(axis="x", alpha=0.3)
            ax.set_ylim(len(chunk) - 0.5, -0.5)
        axes[0].set_yticks(ys, [_short(s.get("sample_id")) for s in chunk], fontsize=8)
        for label, s in zip(axes[0].get_yticklabels(), chunk):
            if _flagged(s):  # other flags (IG, low WBC count...) have no dot to colour
                label.set_color(_HIGH)
        fig.suptitle("WBC differential vs adult reference range (shaded); red = flagged", fontsize=11)
        out[f"differential_{page}.png"] = _png(fig)
    return out


def _barh(labels: Sequence[str], values: Sequence[float], title: str, xlabel: str, color: str,
          integer: bool = False) -> bytes:
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(8, 1.2 + 0.3 * len(labels)), layout="constrained")
    ax = fig.subplots()
    ys = list(range(len(labels)))
    ax.barh(ys, values, color=color)
    ax.set_yticks(ys, [_short(x, 32) for x in labels], fontsize=8)
    ax.set_ylim(len(labels) - 0.5, -0.5)
    ax.set_title(title, fontsize=11)
    ax.set_xlabel(xlabel)
    ax.grid(axis="x", alpha=0.3)
    if integer:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return _png(fig)


def _prediction_figure(classes: list[tuple[str, int, int]], bins: list[tuple[float, int]]) -> bytes:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 3.6), layout="constrained")
    ax1, ax2 = fig.subplots(1, 2)
    names = [c[0] for c in classes]
    ax1.bar(names, [c[1] - c[2] for c in classes], color=_OK, label="confident")
    ax1.bar(names, [c[2] for c in classes], bottom=[c[1] - c[2] for c in classes], color="#ff7f0e",
            label="needs review")
    ax1.set_title("Predicted class", fontsize=11)
    ax1.tick_params(axis="x", labelrotation=30, labelsize=8)
    ax1.legend(fontsize=8)
    ax2.bar([b + 0.025 for b, _ in bins], [n for _, n in bins], width=0.048, color=_OK)
    ax2.set_xlim(0, 1)
    ax2.set_title("Confidence of the predicted class", fontsize=11)
    ax2.set_xlabel("confidence")
    return _png(fig)


def _render_figures(page: _Page) -> None:
    if page.samples:
        page.figures.update(_differential_figures(page.samples))
    counts: dict[str, int] = {}
    for s in page.samples:
        for f in _flags(s):
            counts[f] = counts.get(f, 0) + 1
    if counts:
        top = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:TOP_N]
        page.figures["flags.png"] = _barh([k for k, _ in top], [v for _, v in top],
                                          "Samples per flag", "samples", _HIGH, integer=True)
    review = sorted(((s.get("sample_id"), p) for s in page.samples if (p := _review_pct(s))),
                    key=lambda kv: -kv[1])[:TOP_N]
    if review:
        page.figures["review.png"] = _barh([str(k) for k, _ in review], [v for _, v in review],
                                           "Share of images needing review (top samples)", "% of classified",
                                           "#ff7f0e")
    if page.classes:
        page.figures["predictions.png"] = _prediction_figure(page.classes, page.confidence_bins)


# --------------------------------------------------------------------------- HTML
_CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:1.5em;color:#222;max-width:1400px}
.alarm{background:#fdd;border:2px solid #c00;padding:0.6em;margin:0.8em 0}
h1{font-size:1.5em} h2{font-size:1.2em;margin-top:1.6em;border-bottom:1px solid #ccc}
table{border-collapse:collapse;font-size:0.85em;margin:0.5em 0}
th,td{border:1px solid #ccc;padding:2px 6px;text-align:left;vertical-align:top}
td.n{text-align:right;font-variant-numeric:tabular-nums}
th{background:#f2f2f2;position:sticky;top:0}
tr.flagged td:first-child{border-left:4px solid #d62728}
td.flag{background:#fde0e0;color:#a00;font-weight:bold}
.muted{color:#777} img{max-width:100%;border:1px solid #eee;margin:0.4em 0}
"""


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


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
    return f"<table><tr>{head}</tr>{body}</table>"


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
    flagged = [s for s in page.samples if _flagged(s)]
    parts = [f"<h2>Flagged samples ({len(flagged)} of {len(page.samples)})</h2>"]
    if not flagged:
        return parts[0] + "<p>No sample is flagged.</p>"
    parts.append(_table(("sample_id", "flags", "n_wbc"),
                        [(s.get("sample_id"), ", ".join(_flags(s)), s.get("n_wbc")) for s in flagged],
                        (False, False, True)))
    if "flags.png" in page.figures:
        parts.append('<img src="flags.png" alt="Number of samples per flag">')
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
        cells.append((_review_pct(s), True, False))
        low_wbc = bool(s.get("flag_low_wbc_count"))
        cells.append((_fmt(s.get("n_wbc")) + (" ↓" if low_wbc else ""), True, low_wbc))
        for c in DIFFERENTIAL_CLASSES:
            side = _side(s, c)
            value = _fmt(_num(s.get(f"pct_{c}")))
            cells.append((value + (" ↓" if side == "low" else " ↑" if side == "high" else ""), True, bool(side)))
        for col, flag in (("ig_per_100_wbc", "flag_ig"), ("erythroblast_per_100_wbc", "flag_erythroblasts")):
            raised = bool(s.get(flag))
            cells.append((_fmt(_num(s.get(col))) + (" ↑" if raised else ""), True, raised))
        cells.append((s.get("platelet_count"), True, False))
        cells.append((", ".join(_flags(s)), False, False))
        tds = "".join(f"<td{_td_class(num, flag)}>{_e(_fmt(v))}</td>" for v, num, flag in cells)
        rows.append(f"<tr{' class=flagged' if _flagged(s) else ''}>{tds}</tr>")
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    legend = ("<p class=muted>Highlighted cells (↓ low, ↑ high) are outside the adult reference range or "
              "otherwise flagged; a red bar marks flagged samples.</p>")
    return f"<h2>Per-sample differential</h2>{legend}<table><tr>{head}</tr>{''.join(rows)}</table>"


def _review_html(page: _Page) -> str:
    n_review = sum(int(_num(s.get("n_review")) or 0) for s in page.samples)
    n_classified = sum(int(_num(s.get("n_classified")) or 0) for s in page.samples)
    share = f" ({100.0 * n_review / n_classified:.1f} % of {n_classified} classified images)" if n_classified else ""
    parts = [f"<h2>Review queue</h2><p><b>{n_review}</b> images need review{_e(share)}; "
             "per-sample counts and shares are in the table above.</p>"]
    if "review.png" in page.figures:
        parts.append('<img src="review.png" alt="Share of images needing review per sample">')
    return "".join(parts)


def _predictions_html(page: _Page) -> str:
    if not page.classes:
        return "<h2>Predictions</h2><p>No predictions in this run.</p>"
    table = _table(("predicted_class", "images", "needs review"), page.classes, (False, True, True))
    img = '<img src="predictions.png" alt="Predicted classes and confidence">' if "predictions.png" in page.figures else ""
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
                              _short(r.get("message") or "", 300)) for r in page.error_examples]))
    return "".join(parts)


def _shift_banner(page: _Page) -> str:
    """The domain-shift alarm, shown first: these results are not to be read like any other night's."""
    if not page.run.get("domain_shift"):
        return ""
    shifted = [str(s.get("sample_id")) for s in page.samples if s.get("domain_shift")]
    return (f"<div class=alarm><strong>Domain-shift alarm: images unlike the training data.</strong> "
            f"{len(shifted)} of {len(page.samples)} sample(s) affected, {_e(page.run.get('n_unidentified'))} "
            f"cell(s) unidentified; their differentials are unreliable and their flags are withheld. "
            f"Samples: {_e(', '.join(shifted[:TOP_N]))}{' ...' if len(shifted) > TOP_N else ''}</div>")


def _html(page: _Page, output_uri: str) -> str:
    run = page.run
    figs = sorted((k for k in page.figures if k.startswith("differential_")),
                  key=lambda k: int(k.split("_")[1].split(".")[0]))
    diff = "".join(f'<img src="{_e(k)}" alt="WBC differential against reference ranges">' for k in figs)
    now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    return (
        "<!DOCTYPE html><html lang=en><head><meta charset=utf-8>"
        f"<title>bloodray report {_e(run.get('run_date'))}</title><style>{_CSS}</style></head><body>"
        f"<h1>bloodray report — run_date {_e(run.get('run_date'))}</h1>"
        + _shift_banner(page)
        + f"<p class=muted>Run {_e(run.get('run_id'))} from {_e(output_uri)}; generated {_e(now)}.</p>"
        + _summary_html(page)
        + _flagged_html(page)
        + "<h2>WBC differential against reference ranges</h2>"
        + (diff or "<p>No samples in this run.</p>")
        + _samples_html(page)
        + _review_html(page)
        + _predictions_html(page)
        + _errors_html(page)
        + "</body></html>\n"
    )


# --------------------------------------------------------------------------- public API
def write_report(output_uri: str, run_date: str | _dt.date | None = None, dest: str | None = None,
                 storage_options: Mapping[str, Any] | None = None) -> str:
    """Write the HTML report of one date's visible run and return the URI of ``report.html``.

    Args:
        output_uri: the output root the job wrote (local path or ``s3://``).
        run_date: ``YYYY-MM-DD``; default the latest date with a committed run.
        dest: folder for ``report.html`` and its PNGs; default
            ``<output_uri>/reports/run_date=<D>/``. May be local or on S3.
        storage_options: fsspec options used for both the output root and ``dest``.

    Raises:
        storage.StorageError: the root or ``dest`` cannot be read or written.
        ReportError: no committed run (for that date).
    """
    page = _load(output_uri, None if run_date is None else str(run_date), storage_options)
    _render_figures(page)
    document = _html(page, output_uri)

    dest = dest or storage.join(output_uri, "reports", f"{RUN_DATE_PREFIX}{page.run['run_date']}")
    fs, path = storage.filesystem(dest, storage_options)
    path = path.rstrip("/")
    try:
        # Figures first, the page last: a reader never opens a page whose images
        # are still being written.
        for name, data in page.figures.items():
            storage.put_bytes(fs, f"{path}/{name}", data)
        storage.put_bytes(fs, f"{path}/{REPORT_FILE}", document.encode("utf-8"))
    except Exception as exc:  # noqa: BLE001 - re-raised with the URI attached
        raise storage.describe_storage_error(dest, exc) from exc
    return storage.join(dest, REPORT_FILE)
