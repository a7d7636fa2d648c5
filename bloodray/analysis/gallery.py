"""Self-contained HTML pieces shared by the report and the review export: page shell and cell galleries.

Everything is inline: figures and cell thumbnails are ``data:`` URIs, so one
HTML file works when mailed, opened from a presigned URL or read offline. The
page has a viewport meta and wraps every wide table in a horizontal scroll
container, so it reads at phone width (390 px) without the page overflowing.
"""

from __future__ import annotations

import base64
import html
import math
import posixpath
from typing import Any, Iterable, Mapping, Sequence

#: Printed at the top of every page bloodray renders.
RESEARCH_USE = ("For research use only. Not for use in diagnostic procedures: every result here is a "
                "machine classification that a qualified person must verify before any clinical use.")
#: ``status`` value (column added by the out-of-distribution check) of a cell the model could not identify.
UNIDENTIFIED = "unidentified"
#: Confident cells shown per class and sample; review and unidentified cells are always all shown.
CONFIDENT_PER_CLASS = 12
#: Longest side (px) of a thumbnail embedded in a gallery: cards show cells at 96 px, so the stored thumbnails
#: (up to :data:`bloodray.data.stages.THUMBNAIL_SIZE`, made large for the review page's enlarged view) are scaled
#: down to it and a report stays as small as with the 80 px thumbnails of old.
CARD_IMAGE_SIZE = 96

CSS = """
*{box-sizing:border-box}
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:0 auto;padding:0.8em;color:#222;
max-width:1400px;line-height:1.4;overflow-wrap:anywhere}
h1{font-size:1.4em;margin:0.3em 0} h2{font-size:1.2em;margin-top:1.6em;border-bottom:1px solid #ccc}
h3{font-size:1.05em;margin:1em 0 0.3em}
.ruo{background:#fff4d6;border:1px solid #e5c46b;padding:0.5em 0.8em;border-radius:4px}
.scroll{overflow-x:auto;max-width:100%;-webkit-overflow-scrolling:touch}
table{border-collapse:collapse;font-size:0.85em;margin:0.5em 0}
th,td{border:1px solid #ccc;padding:2px 6px;text-align:left;vertical-align:top;overflow-wrap:normal}
td.n{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
th{background:#f2f2f2}
tr.flagged td:first-child{border-left:4px solid #d62728}
td.flag{background:#fde0e0;color:#a00;font-weight:bold}
.muted{color:#666} img.fig{max-width:100%;height:auto;border:1px solid #eee;margin:0.4em 0}
.flags{color:#a00;font-weight:bold}
.alarm{background:#fdd;border:2px solid #c00;padding:0.6em;margin:0.8em 0}
.gallery{display:flex;flex-wrap:wrap;gap:6px;margin:0.3em 0 0.8em}
.cell{width:104px;font-size:0.72em;border:2px solid #ddd;border-radius:4px;padding:3px;background:#fafafa}
.cell img{width:96px;height:96px;object-fit:contain;display:block;image-rendering:auto}
.cell.review{border-color:#ff7f0e} .cell.unidentified{border-color:#7b3fbf}
.cell .name{white-space:nowrap;overflow:hidden;text-overflow:ellipsis}
details{margin:0.3em 0} summary{cursor:pointer}
"""


def e(value: Any) -> str:
    """HTML-escaped text (``None`` -> empty)."""
    return html.escape("" if value is None else str(value), quote=True)


def data_uri(data: bytes, mime: str) -> str:
    """``data:`` URI of ``data`` (base64)."""
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def page(title: str, body: str) -> str:
    """A complete self-contained HTML document with the research-use statement at the top."""
    return ("<!DOCTYPE html><html lang=en><head><meta charset=utf-8>"
            '<meta name=viewport content="width=device-width, initial-scale=1">'
            f"<title>{e(title)}</title><style>{CSS}</style></head><body>"
            f"<p class=ruo><b>Research use only.</b> {e(RESEARCH_USE.split('. ', 1)[1])}</p>"
            f"{body}</body></html>\n")


def scroll(inner: str) -> str:
    """Wrap a wide element so it scrolls by itself instead of widening the page."""
    return f"<div class=scroll>{inner}</div>"


def file_name(uri: Any) -> str:
    """Last path component of an image URI (a tar member's own name for ``shard.tar#dir/x.jpg``)."""
    text = str(uri or "")
    return posixpath.basename(text.split("#", 1)[-1]) or text


def num(value: Any) -> float | None:
    """A number from a table cell (None for missing, booleans, text and NaN)."""
    if value is None or isinstance(value, bool):
        return None
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(out) else out


def is_unidentified(cell: Mapping[str, Any]) -> bool:
    """True for a cell the out-of-distribution check marked (``status`` column, when present)."""
    return str(cell.get("status") or "") == UNIDENTIFIED


def card_jpeg(jpeg: bytes) -> bytes:
    """``jpeg`` scaled down to :data:`CARD_IMAGE_SIZE` when larger (unreadable bytes are returned as they are)."""
    import io

    from PIL import Image

    from bloodray.data.stages import thumbnail_jpeg

    try:
        with Image.open(io.BytesIO(jpeg)) as image:
            if max(image.size) <= CARD_IMAGE_SIZE:
                return jpeg
            image.draft("RGB", (CARD_IMAGE_SIZE, CARD_IMAGE_SIZE))  # DCT scaling: most of the work skipped
            return thumbnail_jpeg(image.convert("RGB"), CARD_IMAGE_SIZE)
    except Exception:  # noqa: BLE001 - the browser shows what it can of a damaged thumbnail
        return jpeg


def cell_card(cell: Mapping[str, Any], jpeg: bytes | None) -> str:
    """One gallery cell: thumbnail, file name, class, confidence, (when present) OOD score and verified class."""
    kind = "unidentified" if is_unidentified(cell) else "review" if cell.get("needs_review") else ""
    name = file_name(cell.get("image_uri"))
    conf = num(cell.get("confidence"))
    lines = [f"<div class=name title='{e(cell.get('image_uri'))}'>{e(name)}</div>",
             f"<div>{e(cell.get('predicted_class'))}</div>",
             f"<div>conf {conf:.2f}</div>" if conf is not None else ""]
    ood = num(cell.get("ood_score"))
    if ood is not None:
        lines.append(f"<div>OOD {ood:.2f}</div>")
    if kind:
        lines.append(f"<div><b>{'unidentified' if kind == 'unidentified' else 'review'}</b></div>")
    if cell.get("verified_class"):  # a reviewer's class (the report), shown under the machine's
        lines.append(f"<div><b>verified: {e(cell['verified_class'])}</b></div>")
    img = (f"<img src='{data_uri(card_jpeg(jpeg), 'image/jpeg')}' alt='{e(name)}' loading=eager>" if jpeg
           else "<div class=muted style='height:96px'>no thumbnail</div>")
    return f"<div class='cell {kind}'>{img}{''.join(lines)}</div>"


def _order(cells: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    return sorted(cells, key=lambda c: (not c.get("needs_review"), num(c.get("confidence")) or 0.0,
                                        str(c.get("image_uri"))))


def gallery(cells: Iterable[Mapping[str, Any]], thumbs: Mapping[str, bytes],
            confident_per_class: int | None = CONFIDENT_PER_CLASS) -> str:
    """Cells grouped by class: unidentified cells first, then classes with review cells first.

    Within a class, cells needing review come first (lowest confidence
    first); at most ``confident_per_class`` confident cells are shown per class.
    """
    cells = list(cells)
    unidentified = [c for c in cells if is_unidentified(c)]
    by_class: dict[str, list[Mapping[str, Any]]] = {}
    for c in cells:
        if not is_unidentified(c):
            by_class.setdefault(str(c.get("predicted_class")), []).append(c)
    parts = []
    if unidentified:
        cards = "".join(cell_card(c, thumbs.get(str(c.get("image_uri")))) for c in _order(unidentified))
        parts.append(f"<h3>Unidentified ({len(unidentified)})</h3><div class=gallery>{cards}</div>")
    groups = sorted(by_class.items(), key=lambda kv: (-sum(bool(c.get("needs_review")) for c in kv[1]),
                                                      -len(kv[1]), kv[0]))
    for cls, group in groups:
        ordered = _order(group)
        review = [c for c in ordered if c.get("needs_review")]
        confident = [c for c in ordered if not c.get("needs_review")]
        shown = review + (confident if confident_per_class is None else confident[:confident_per_class])
        hidden = len(group) - len(shown)
        note = f", {len(review)} to review" if review else ""
        more = f"<div class=muted>{hidden} more confident cell(s) not shown</div>" if hidden else ""
        cards = "".join(cell_card(c, thumbs.get(str(c.get("image_uri")))) for c in shown)
        parts.append(f"<h3>{e(cls)} ({len(group)}{note})</h3><div class=gallery>{cards}</div>{more}")
    return "".join(parts) or "<p class=muted>No classified cells.</p>"
