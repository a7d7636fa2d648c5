"""The reviewers' part of the nightly report: the verified differential beside the machine's, and who signed off.

Read from the ``verified_differentials``, ``reviews`` and ``signoffs`` views
(:mod:`bloodray.analysis.review_views`) of the date. A date nobody reviewed or
signed off shows the machine's results alone, as before; once a review or a
sign-off exists, every sample shows machine and verified values side by side,
the headline counts are the verified ones, and reviews that no longer match
an image (it changed or was removed by a rerun) are listed, never hidden.
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass, field
from typing import Any, Mapping

from bloodray.analysis import gallery
from bloodray.analysis import report_figures as rfig
from bloodray.analysis.gallery import e, num
from bloodray.classes import DIFFERENTIAL_CLASSES, reference_ranges
from bloodray.nightly import contract


@dataclass
class Verified:
    """The date's review state; ``active`` when anything was reviewed or signed off."""

    samples: dict[str, dict[str, Any]] = field(default_factory=dict)  # sample_id -> verified_differentials row
    status_counts: dict[str, int] = field(default_factory=dict)  # review_status -> reviews
    unmatched: list[dict[str, Any]] = field(default_factory=list)
    n_signoffs: int = 0

    @property
    def active(self) -> bool:
        return bool(self.status_counts) or self.n_signoffs > 0


def load(con: Any, run_date: _dt.date | str) -> Verified:
    """The date's verified differentials, review counts by status, and unmatched reviews."""
    def rows(sql: str) -> list[dict[str, Any]]:
        rel = con.sql(sql, params=[run_date])
        fetch = getattr(rel, "to_arrow_table", None) or rel.fetch_arrow_table
        return fetch().to_pylist()

    out = Verified()
    out.samples = {str(r["sample_id"]): r for r in rows(
        f"SELECT * FROM {contract.VERIFIED_DIFFERENTIALS} WHERE run_date = ? ORDER BY sample_id")}
    out.status_counts = {r["s"]: r["n"] for r in rows(
        f"SELECT {contract.REVIEW_STATUS} AS s, count(*) AS n FROM {contract.REVIEWS} WHERE run_date = ? GROUP BY 1")}
    out.unmatched = rows(f"SELECT sample_id, image_uri, new_class, reviewer, reviewed_at, run_id FROM "
                         f"{contract.REVIEWS} WHERE run_date = ? AND {contract.REVIEW_STATUS} = "
                         f"'{contract.REVIEW_UNMATCHED}' ORDER BY sample_id, image_uri")
    out.n_signoffs = rows(f"SELECT count(*) AS n FROM {contract.SIGNOFFS} WHERE run_date = ?")[0]["n"]
    return out


def _when(value: Any) -> str:
    if isinstance(value, _dt.datetime):
        return value.astimezone(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return "" if value is None else str(value)


def signoff_text(v: Mapping[str, Any] | None) -> str:
    """One line on the sample's sign-off (plain text)."""
    if not v or not v.get("signoff_status"):
        return "not signed off"
    who, when = v.get("signed_off_by"), _when(v.get("signed_off_at"))
    if v["signoff_status"] == contract.REOPENED:
        return f"reopened by {who}, {when}"
    text = f"signed off by {who}, {when}"
    return text + (" — OUTDATED: the sample's cells changed after sign-off (a rerun)" if v.get("signoff_outdated")
                   else "")


def headline(samples: list[Mapping[str, Any]], verified: Verified) -> str:
    """The summary sentence: verified counts first once anything was reviewed, the machine's beside them."""
    n_flagged = sum(rfig.flagged(s) for s in samples)
    n_review = sum(int(num(s.get("n_review")) or 0) for s in samples)
    if not verified.active:
        return (f"<p><b>{len(samples)}</b> samples, <b>{n_flagged}</b> flagged, <b>{n_review}</b> cells to review. "
                "Each sample below shows its differential (with 95 % intervals) and its cells, review cells "
                "first.</p>")
    rows = list(verified.samples.values())
    v_flagged = sum(rfig.flagged(v) for v in rows)
    v_review = sum(int(num(v.get("n_review")) or 0) for v in rows)
    n_verified = sum(int(num(v.get("n_verified")) or 0) for v in rows)
    signed = sum(v.get("signoff_status") == contract.SIGNED_OFF and not v.get("signoff_outdated") for v in rows)
    reviewers = sorted({name.strip() for v in rows for name in (v.get("reviewers") or "").split(",") if name.strip()})
    unmatched = (f" <b class=flags>{len(verified.unmatched)} review(s) no longer match an image</b> (listed under "
                 "Review and sign-off)." if verified.unmatched else "")
    return (f"<p><b>{len(samples)}</b> samples. After review: <b>{v_flagged}</b> flagged, <b>{v_review}</b> cells "
            f"still to review, <b>{n_verified}</b> cells reviewed by {e(', '.join(reviewers) or 'nobody')}, "
            f"<b>{signed}</b> of {len(samples)} samples signed off. Machine alone: {n_flagged} flagged, "
            f"{n_review} cells to review.{unmatched} Each sample below shows the machine's and the verified "
            "differential side by side (with 95 % intervals) and its cells, review cells first.</p>")


def _interval(sample: Mapping[str, Any] | None, col: str) -> str:
    if not sample:
        return "–"
    lo, hi = num(sample.get(f"{col}_lo")), num(sample.get(f"{col}_hi"))
    return "–" if lo is None or hi is None else f"{lo:.1f}–{hi:.1f}"


def _pct(sample: Mapping[str, Any] | None, col: str, cls: str | None = None) -> tuple[str, bool]:
    if not sample:
        return "–", False
    value = num(sample.get(col))
    text = "–" if value is None else f"{value:.1f}"
    sd = rfig.side(sample, cls) if cls else None
    return text + (" ↓" if sd == "low" else " ↑" if sd == "high" else ""), bool(sd)


def _td(text: Any, numeric: bool = True, flag: bool = False) -> str:
    names = " ".join(n for n, on in (("n", numeric), ("flag", flag)) if on)
    attr = f' class="{names}"' if names else ""
    return f"<td{attr}>{e(text)}</td>"


def sample_block(machine: Mapping[str, Any], v: Mapping[str, Any] | None) -> str:
    """A sample's flags, review state, and machine and verified differentials side by side (HTML)."""
    ref = reference_ranges()
    rows = []
    for c in DIFFERENTIAL_CLASSES:
        m_pct, m_flag = _pct(machine, f"pct_{c}", c)
        v_pct, v_flag = _pct(v, f"pct_{c}", c)
        counts = f"{machine.get(f'count_{c}')} / {v.get(f'count_{c}') if v else '–'}"
        rows.append("<tr>" + _td(c, numeric=False) + _td(m_pct, flag=m_flag) + _td(_interval(machine, f"pct_{c}"))
                    + _td(v_pct, flag=v_flag) + _td(_interval(v, f"pct_{c}")) + _td(f"{ref[c].low:g}–{ref[c].high:g}")
                    + _td(counts) + "</tr>")
    for label, col, flag in (("IG /100 WBC", "ig_per_100_wbc", "flag_ig"),
                             ("erythroblasts /100 WBC", "erythroblast_per_100_wbc", "flag_erythroblasts")):
        m_pct, _ = _pct(machine, col)
        v_pct, _ = _pct(v, col)
        rows.append("<tr>" + _td(label, numeric=False) + _td(m_pct, flag=bool(machine.get(flag)))
                    + _td(_interval(machine, col)) + _td(v_pct, flag=bool(v and v.get(flag)))
                    + _td(_interval(v, col)) + "<td></td><td></td></tr>")
    head = "".join(f"<th>{h}</th>" for h in ("class", "machine %", "machine 95 % interval", "verified %",
                                             "verified 95 % interval", "reference", "cells machine / verified"))
    m_flags, v_flags = rfig.flag_text(machine, "none"), rfig.flag_text(v) if v else "–"
    changed = v is not None and m_flags != (v_flags or "none")
    flag_line = (f"<p{' class=flags' if rfig.flagged(v or machine) else ''}>Flags after review: {e(v_flags or 'none')}"
                 f"{'' if not changed else f' (machine: {e(m_flags)})'}</p>")
    review = (f"<p class=muted>{e(v.get('n_verified') if v else 0)} cell(s) reviewed"
              f"{(' by ' + e(v['reviewers'])) if v and v.get('reviewers') else ''}, {e(v.get('n_review') if v else '–')} "
              f"still to review; {e(signoff_text(v))}."
              + (f" <b class=flags>{e(v['n_reviews_unmatched'])} review(s) no longer match an image.</b>"
                 if v and v.get("n_reviews_unmatched") else "") + "</p>")
    return flag_line + review + gallery.scroll(f"<table><tr>{head}</tr>{''.join(rows)}</table>")


def section(samples: list[Mapping[str, Any]], verified: Verified) -> str:
    """"Review and sign-off": one row per sample, then the reviews that no longer match an image."""
    if not verified.active:
        return ""
    head = "".join(f"<th>{h}</th>" for h in ("sample_id", "machine flags", "flags after review", "cells reviewed",
                                             "still to review", "reviewers", "sign-off"))
    body = []
    for s in samples:
        v = verified.samples.get(str(s.get("sample_id")))
        body.append("<tr>" + _td(s.get("sample_id"), numeric=False)
                    + _td(rfig.flag_text(s), numeric=False)
                    + _td(rfig.flag_text(v) if v else "–", numeric=False, flag=bool(v and rfig.flagged(v)))
                    + _td(v.get("n_verified") if v else 0) + _td(v.get("n_review") if v else "–")
                    + _td((v or {}).get("reviewers") or "", numeric=False)
                    + _td(signoff_text(v), numeric=False, flag=bool(v and v.get("signoff_outdated"))) + "</tr>")
    counts = ", ".join(f"{n} {k}" for k, n in sorted(verified.status_counts.items()))
    parts = [f"<h2>Review and sign-off</h2><p class=muted>Reviews of this date: {e(counts or 'none')}. A review "
             "belongs to the image's content and sample, so it applies again after any rerun of the date.</p>",
             gallery.scroll(f"<table><tr>{head}</tr>{''.join(body)}</table>")]
    if verified.unmatched:
        parts.append(f"<h3 class=flags>Reviews that no longer match an image ({len(verified.unmatched)})</h3>"
                     "<p>The image changed or was removed after the review (a rerun of the date); the review is "
                     "kept but no longer counted. Review the sample again.</p>")
        parts.append(gallery.scroll("<table><tr><th>sample_id</th><th>image_uri</th><th>verified as</th>"
                                    "<th>reviewer</th><th>reviewed at</th><th>on run</th></tr>" + "".join(
                                        "<tr>" + "".join(_td(x, numeric=False) for x in (
                                            u["sample_id"], u["image_uri"], u["new_class"], u["reviewer"],
                                            _when(u["reviewed_at"]), u["run_id"])) + "</tr>"
                                        for u in verified.unmatched) + "</table>"))
    return "".join(parts)
