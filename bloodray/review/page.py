"""The interactive review page of ``bloodray review export``: one self-contained HTML file per run date.

The page holds every classified cell of the date's visible run, sample by
sample, in class galleries (unidentified cells first, then the classes with
cells to review, cells to review first within a class). A reviewer
reclassifies cells by click or key, confirms them, enlarges them, signs each
sample off, and downloads the decisions file (:data:`DECISIONS_FORMAT`) that
``bloodray review import`` takes. Nothing is sent anywhere: the page needs no
server, and keeps unsaved work in the browser's local storage until the
decisions are downloaded.

The sample's differential and flags update live. The page computes them in
JavaScript (``page.js``) from rule data this module exports from Python
(:func:`bloodray.nightly.differential.rules_data` of the run's own flag rules,
the sample metadata's WBC counts, the run's domain-shift alarm), so the page
and :mod:`bloodray.analysis.review_views` agree (``tests/test_review_page.py``
checks them against each other in Chromium).

Data flow: :func:`page_data` reads the run from the output root, :func:`render`
turns that data into the HTML document (the JSON sits in a
``<script type=application/json>`` element, the thumbnails in it as base64).
"""

from __future__ import annotations

import base64
import datetime as dt
import json
from importlib import resources
from typing import Any, Mapping

from bloodray.analysis import gallery, query
from bloodray.classes import CLASS_NAMES
from bloodray.nightly.shift import SHIFT_FLAG
from bloodray.nightly import contract
from bloodray.nightly.differential import count_columns, rules_data
from bloodray.nightly.sample_metadata import SAMPLE_ID_COLUMN, WBC_COLUMN
from bloodray.review import decisions
from bloodray.analysis.review_views import APPLIED_REVIEWS_SQL, confusion_column, run_flag_rules

#: ``format`` of the page's embedded data (bumped when page.js reads it differently).
PAGE_FORMAT = "bloodray-review-page/1"
#: ``format`` of the decisions file the page writes (defined by ``bloodray review import``).
DECISIONS_FORMAT = decisions.FORMAT
#: Classes a reviewer may give a cell, in key order: keys 1-8 are the cell classes, 0 is "unidentified".
REVIEW_CLASSES: tuple[str, ...] = decisions.VERIFIED_CLASSES
#: The element that holds the page's data (JSON; page.js reads it by this id).
_DATA_OPEN = "<script type=application/json id=review-data>"


class PageError(RuntimeError):
    """The page cannot be made (no committed run for the date); the message names the output root."""


#: Default name of the decisions file the page downloads for a date.
decisions_file_name = decisions.default_name


def _columns(con, view: str) -> set[str]:
    return {r[0] for r in con.execute(f"DESCRIBE {view}").fetchall()}


def _optional(have: set[str], name: str, sql_type: str) -> str:
    """A column that older outputs may lack, as NULL there."""
    return name if name in have else f"CAST(NULL AS {sql_type}) AS {name}"


def page_data(output_uri: str, run_date: str, storage_options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Everything the page shows of a date's visible run, as JSON-ready data (thumbnails base64).

    Raises :class:`PageError` when the date has no committed run.
    """
    con = query.connect(output_uri, storage_options)
    try:
        found = con.execute(f"SELECT run_id, config_yaml, {confusion_column(con)} FROM runs WHERE run_date = ?",
                            [str(run_date)]).fetchall()
        if not found:
            raise PageError(f"{output_uri}: no committed run for run_date={run_date}")
        run_id, config_yaml, confusion_json = found[0]
        have = _columns(con, "predictions")
        # Reviews already imported (of this run or an earlier one of the date) show as the cells' verified class.
        cells = con.execute(f"""
            WITH a AS ({APPLIED_REVIEWS_SQL})
            SELECT p.sample_id, p.image_uri, {_optional(have, 'image_sha256', 'VARCHAR')}, p.predicted_class,
                   p.confidence, p.needs_review, {_optional(have, 'status', 'VARCHAR')},
                   {_optional(have, 'ood_score', 'FLOAT')}, t.jpeg, a.new_class, a.reviewer, a.reviewed_at
            FROM predictions p LEFT JOIN thumbnails t USING (run_id, image_uri)
            LEFT JOIN a ON a.run_date = p.run_date AND a.image_uri = p.image_uri
            WHERE p.run_id = ? ORDER BY p.sample_id, p.image_uri""", [run_id]).fetchall()
        records = {row[0]: row[1:] for row in con.execute(
            f"SELECT sample_id, signoff_status, signed_off_by, signed_off_at, signoff_outdated, n_reviews_unmatched "
            f"FROM {contract.VERIFIED_DIFFERENTIALS} WHERE run_date = ?", [str(run_date)]).fetchall()}
        diff_have = _columns(con, "differentials")
        shift = "domain_shift" if "domain_shift" in diff_have else "false AS domain_shift"
        machine = {row[0]: row[1:] for row in con.execute(
            f"SELECT sample_id, {', '.join(count_columns())}, flags, {shift} FROM differentials "
            "WHERE run_id = ?", [run_id]).fetchall()}
    finally:
        con.close()
    rules, metadata = run_flag_rules(config_yaml, storage_options, confusion_json)
    wbc = {}
    if metadata is not None:
        wbc = {s: gallery.num(c) for s, c in zip(metadata.column(SAMPLE_ID_COLUMN).to_pylist(),
                                                 metadata.column(WBC_COLUMN).to_pylist())}
    samples: dict[str, dict[str, Any]] = {}
    for (sample_id, uri, sha, cls, conf, review, status, ood, jpeg, new_class, reviewer, reviewed_at) in cells:
        sample = samples.get(sample_id)
        if sample is None:
            stored = machine.get(sample_id)
            counts = dict(zip(CLASS_NAMES, stored[:len(CLASS_NAMES)])) if stored else None
            sample = samples[sample_id] = {
                "sample_id": sample_id, "wbc_count": wbc.get(sample_id),
                "domain_shift": bool(stored[-1]) if stored else False,
                "machine": {"counts": counts, "flags": list(stored[-2] or [])} if stored else None,
                **_records(records.get(sample_id)), "cells": []}
        sample["cells"].append({
            "uri": uri, "name": gallery.file_name(uri), "sha": sha, "cls": cls,
            "conf": gallery.num(conf), "review": bool(review), "status": status, "ood": gallery.num(ood),
            "thumb": base64.b64encode(bytes(jpeg)).decode("ascii") if jpeg is not None else None,
            "prev": None if new_class is None else {"cls": new_class, "reviewer": reviewer, "at": _iso(reviewed_at)}})
    return {
        "format": PAGE_FORMAT, "decisions_format": DECISIONS_FORMAT, "output_uri": output_uri,
        "run_date": str(run_date), "run_id": run_id,
        "exported_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "decisions_file": decisions_file_name(str(run_date)), "review_classes": list(REVIEW_CLASSES),
        "unidentified": contract.UNIDENTIFIED, "signed_off": contract.SIGNED_OFF, "reopened": contract.REOPENED,
        "shift_flag": SHIFT_FLAG, "rules": rules_data(rules),
        "samples": list(samples.values())}


def _iso(value: Any) -> Any:
    return value.isoformat() if hasattr(value, "isoformat") else value


def _records(row: tuple | None) -> dict[str, Any]:
    """A sample's latest stored sign-off (``outdated``: the verified cells changed since) and unmatched reviews."""
    if row is None:
        return {"signoff": None, "n_reviews_unmatched": 0}
    status, reviewer, at, outdated, unmatched = row
    signoff = None if status is None else {"status": status, "reviewer": reviewer, "at": _iso(at),
                                           "outdated": bool(outdated)}
    return {"signoff": signoff, "n_reviews_unmatched": int(unmatched or 0)}


def _asset(name: str) -> str:
    return resources.files("bloodray.review").joinpath(name).read_text(encoding="utf-8")


def _script_json(data: Mapping[str, Any]) -> str:
    # "</" would end the script element early; "<\/" is the same JSON string.
    return json.dumps(data, ensure_ascii=False, allow_nan=False, separators=(",", ":")).replace("</", "<\\/")


def embedded_data(html: str) -> dict[str, Any]:
    """The data a page made by :func:`render` embeds (what its script reads)."""
    start = html.index(_DATA_OPEN) + len(_DATA_OPEN)
    return json.loads(html[start:html.index("</script>", start)])


def render(data: Mapping[str, Any]) -> str:
    """The self-contained HTML document of :func:`page_data`'s data."""
    title = f"bloodray review {data['run_date']}"
    return ("<!DOCTYPE html><html lang=en><head><meta charset=utf-8>"
            '<meta name=viewport content="width=device-width, initial-scale=1">'
            f"<title>{gallery.e(title)}</title><style>{_asset('page.css')}</style></head><body>"
            f"<p class=ruo><b>Research use only.</b> {gallery.e(gallery.RESEARCH_USE.split('. ', 1)[1])}</p>"
            f"<noscript><p class=alarm>This review page needs JavaScript.</p></noscript>"
            f"<div id=app></div>{_DATA_OPEN}{_script_json(data)}</script>"
            f"<script>{_asset('page.js')}</script></body></html>\n")


def write_page(output_uri: str, run_date: str, storage_options: Mapping[str, Any] | None = None) -> tuple[str, int]:
    """``(html, n_cells)``: the review page of a date."""
    data = page_data(output_uri, run_date, storage_options)
    return render(data), sum(len(s["cells"]) for s in data["samples"])
