"""The ``reviews``, ``signoffs`` and ``verified_differentials`` views of :func:`bloodray.analysis.query.connect`.

Reviews are the lab's records, and they survive reruns: a review names the
cell's image content and sample (``image_sha256``, ``sample_id``), and applies
to the image with that content in the sample in whichever run of its date is
visible -- full or incremental, with the same checkpoint or another. Reviews
written before they carried the content apply by ``image_uri``. When an image
was reviewed more than once, the latest review wins. The ``reviews`` view
shows every review ever imported with its :data:`~bloodray.nightly.contract.REVIEW_STATUS`:
``applied``, ``superseded``, or ``unmatched`` (no image of the visible run has
that content any more: it changed or was removed; kept and reported, never
dropped). ``signoffs`` shows every sign-off.

``verified_differentials`` has the columns of
:func:`~bloodray.nightly.contract.verified_differentials_schema`. For dates
without reviews or sign-offs it is the stored differential (``n_verified =
0``); for the others the class counts are recomputed in DuckDB from the
visible run's predictions and the applied reviews (the verified class where a
review applies, the predicted class elsewhere; ``unidentified`` cells are not
counted), and percentages, intervals and flags come from the same
:func:`bloodray.nightly.differential.compute_differentials` the nightly job
uses, with the flag rules saved in the run's config (``flags.*`` of
``runs.config_yaml``) and the confusion its flags were corrected with
(``runs.flag_confusion_json``), which corrects only the cells no reviewer
verified. The same rows are committed as the
``verified_differentials`` Delta table (:mod:`bloodray.review.records`), so
any Delta reader gets them.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import warnings
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from bloodray.classes import CLASS_NAMES
from bloodray.config import from_dict, load_yaml_text
from bloodray.nightly import contract, tables
from bloodray.nightly.dictionary import alias_select
from bloodray.nightly.config import FlagsConfig
from bloodray.nightly.differential import (FlagRules, ModelConfusion, compute_differentials, count_columns,
                                           load_flag_rules, verified_count_columns)
from bloodray.nightly.sample_metadata import load_sample_metadata
from bloodray.nightly.shift import SHIFT_COLUMNS, mark_unverified

#: SQL of the review that applies to each cell of the visible runs: ``run_date``, ``image_uri`` (of the cell now),
#: ``new_class``, ``reviewer``, ``reviewed_at``, ``review_image_uri`` (the file the reviewer saw).
APPLIED_REVIEWS_SQL = ("SELECT m.run_date, m.image_uri, r.new_class, r.reviewer, r.reviewed_at, "
                       "r.image_uri AS review_image_uri FROM bloodray_internal._review_matches m JOIN bloodray_internal._reviews_all r USING (_row) "
                       "WHERE m.chosen")


def _cols(view: str, skip: tuple[str, ...] = ()) -> list[tuple[str, str]]:
    return [(n, t) for n, t in contract.duckdb_columns(view) if n not in skip]


def run_flag_rules(config_yaml: str | None, storage_options: Any = None,
                   confusion_json: str | None = None) -> tuple[FlagRules, pa.Table | None]:
    """The flag rules and sample metadata a run used, from its saved config and ``runs.flag_confusion_json``.

    A reference-range or sample-metadata file that can no longer be read is
    reported with a warning naming it, and the packaged defaults are used. The
    confusion the run's flags were corrected with (None: they were not) comes
    with the rules, so verified flags are decided the way the run's were.
    """
    confusion = None
    if confusion_json:
        try:
            confusion = ModelConfusion.from_counts(json.loads(confusion_json), "runs.flag_confusion_json")
        except ValueError as exc:  # not JSON, or a ConfusionError
            warnings.warn(f"{exc}; verified flags assume a perfect classifier", stacklevel=3)
    rules, meta = _run_rules(config_yaml, storage_options)
    return dataclasses.replace(rules, confusion=confusion), meta


def _run_rules(config_yaml: str | None, storage_options: Any) -> tuple[FlagRules, pa.Table | None]:
    try:
        data = load_yaml_text(config_yaml or "") or {}
        flags = from_dict(FlagsConfig, data.get("flags") or {}, "flags")
    except Exception as exc:  # noqa: BLE001 - an old or foreign manifest
        warnings.warn(f"run config unreadable ({exc}); verified flags use the packaged defaults", stacklevel=4)
        return FlagRules(), None
    try:
        rules = load_flag_rules(flags.reference_ranges, storage_options, ig_percent=flags.ig_percent,
                                min_wbc=flags.min_wbc, erythroblast_per_100_wbc=flags.erythroblast_per_100_wbc,
                                confidence=flags.confidence)
    except Exception as exc:  # noqa: BLE001
        warnings.warn(f"flags.reference_ranges: {exc}; verified flags use the packaged reference ranges",
                      stacklevel=3)
        rules = FlagRules(ig_percent=flags.ig_percent, min_wbc=flags.min_wbc,
                          erythroblast_per_100_wbc=flags.erythroblast_per_100_wbc, confidence=flags.confidence)
    meta = None
    if flags.sample_metadata:
        try:
            meta = load_sample_metadata(flags.sample_metadata, storage_options)
        except Exception as exc:  # noqa: BLE001
            warnings.warn(f"flags.sample_metadata: {exc}; verified flags use percentages only", stacklevel=3)
    return rules, meta


def confusion_column(con) -> str:
    """``flag_confusion_json`` of the ``runs`` view, or NULL for outputs written before it existed."""
    have = {r[0] for r in con.execute("DESCRIBE runs").fetchall()}
    return "flag_confusion_json" if "flag_confusion_json" in have else "CAST(NULL AS VARCHAR) AS flag_confusion_json"


def _run_days(dates: list[Any]) -> list[dt.date]:
    return [contract.run_day(d) for d in dates]


def _dates_sql(dates: list[dt.date]) -> str:
    return ", ".join(f"DATE '{d.isoformat()}'" for d in dates)


def _register_matches(con, dates: list[dt.date]) -> None:
    """``_review_matches``: each review paired with the cells of its date's visible run it names.

    By content (sample and SHA-256), or by file for reviews written before
    reviews carried the content. ``chosen`` marks the review that applies to
    a cell: the latest of those naming it.
    """
    if not dates:
        _keep(con, "_review_matches", pa.table({
            "_row": pa.array([], pa.int64()), "run_date": pa.array([], contract.RUN_DATE_TYPE),
            "image_uri": pa.array([], pa.string()), "chosen": pa.array([], pa.bool_())}))
        return
    # Two equality joins rather than one join on an OR: DuckDB hashes both, a night of a million cells included.
    matches = con.sql(f"""
        WITH p AS (SELECT run_date, sample_id, image_uri, image_sha256 FROM predictions
                   WHERE run_date IN ({_dates_sql(dates)})),
        cand AS (
            SELECT r._row, p.run_date, p.image_uri, r.reviewed_at FROM bloodray_internal._reviews_all r JOIN p
                ON p.run_date = r.run_date AND p.sample_id = r.sample_id AND p.image_sha256 = r.image_sha256
            UNION ALL
            SELECT r._row, p.run_date, p.image_uri, r.reviewed_at FROM bloodray_internal._reviews_all r JOIN p
                ON r.image_sha256 IS NULL AND p.run_date = r.run_date AND p.image_uri = r.image_uri)
        SELECT _row, run_date, image_uri, row_number() OVER (
            PARTITION BY run_date, image_uri ORDER BY reviewed_at DESC, _row DESC) = 1 AS chosen FROM cand
        """).to_arrow_table()
    _keep(con, "_review_matches", matches)


def verified_rows(con, run_dates: list[str | dt.date], storage_options: Any = None,
                  digests: bool = False) -> pa.Table:
    """Verified differentials of the visible runs of ``run_dates`` (``YYYY-MM-DD`` or dates), in the view's column
    order (``run_date`` a date, as in the views).

    Needs the connection's ``_reviews_all``, ``_signoffs_all`` and
    ``_review_matches`` (:func:`create_views`). ``digests``: add
    ``verified_digest``, the fingerprint a sign-off records
    (:func:`~bloodray.nightly.contract.signoffs_schema`).
    """
    names = [n for n, _ in _cols(contract.VERIFIED_DIFFERENTIALS)]
    if not run_dates:
        return contract.view_schema(contract.VERIFIED_DIFFERENTIALS).empty_table()
    run_dates = _run_days(run_dates)
    dates = _dates_sql(run_dates)
    # As in the job: unidentified cells are not counted, unless a reviewer gave them a class.
    per_class = ", ".join(f"count(*) FILTER (WHERE cls = '{c}' AND counted) AS {col}"
                          for c, col in zip(CLASS_NAMES, count_columns()))
    # The reviewed part of each count: no model error there, so the confusion correction leaves it alone.
    per_class += ", " + ", ".join(f"count(*) FILTER (WHERE cls = '{c}' AND counted AND verified) AS {col}"
                                  for c, col in zip(CLASS_NAMES, verified_count_columns()))
    # The alarm's statistics describe the images, not their classes: they stay as the run computed them.
    shift = ", ".join(f"any_value(d.{col}) AS {col}" for col in SHIFT_COLUMNS)
    unid = contract.UNIDENTIFIED
    counts = con.sql(f"""
        WITH a AS ({APPLIED_REVIEWS_SQL}),
        cells AS (
            SELECT p.run_id, p.run_date, p.sample_id, coalesce(p.image_sha256, p.image_uri) AS content,
                   coalesce(a.new_class, p.predicted_class) AS cls, a.reviewer,
                   p.needs_review AND a.new_class IS NULL AS still_review, a.new_class IS NOT NULL AS verified,
                   CASE WHEN a.new_class IS NOT NULL THEN a.new_class <> '{unid}'
                        ELSE p.status IS DISTINCT FROM '{unid}' END AS counted
            FROM predictions p LEFT JOIN a USING (run_date, image_uri) WHERE p.run_date IN ({dates})),
        unmatched AS (
            SELECT run_date, sample_id, count(DISTINCT coalesce(image_sha256, image_uri)) AS n
            FROM bloodray_internal._reviews_all WHERE run_date IN ({dates}) AND _row NOT IN (SELECT _row FROM bloodray_internal._review_matches)
            GROUP BY ALL),
        s AS (SELECT * FROM bloodray_internal._signoffs_all WHERE run_date IN ({dates}) QUALIFY row_number() OVER (
              PARTITION BY run_date, sample_id ORDER BY signed_at DESC) = 1),
        v AS (
            SELECT c.run_id, c.sample_id, any_value(d.n_images) AS n_images, count(*) AS n_classified,
                   any_value(d.n_errors) AS n_errors, count(*) FILTER (WHERE still_review) AS n_review,
                   {per_class}, count(*) FILTER (WHERE verified) AS n_verified, {shift}, c.run_date,
                   string_agg(DISTINCT reviewer, ', ' ORDER BY reviewer) AS reviewers,
                   md5(string_agg(content || '=' || CASE WHEN counted THEN cls ELSE '{unid}' END, ','
                                  ORDER BY content, cls)) AS verified_digest
            FROM cells c LEFT JOIN differentials d USING (run_id, sample_id)
            GROUP BY c.run_id, c.run_date, c.sample_id)
        SELECT v.*, coalesce(u.n, 0) AS n_reviews_unmatched, s.status AS signoff_status,
               s.reviewer AS signed_off_by, s.signed_at AS signed_off_at,
               CASE WHEN s.status = '{contract.SIGNED_OFF}' THEN s.verified_digest IS DISTINCT FROM v.verified_digest
               END AS signoff_outdated
        FROM v LEFT JOIN unmatched u USING (run_date, sample_id) LEFT JOIN s USING (run_date, sample_id)
        ORDER BY v.run_date, v.sample_id""").to_arrow_table()
    runs = dict(con.execute(f"SELECT run_date, run_id FROM runs WHERE run_date IN ({dates})").fetchall())
    confusion = confusion_column(con)
    configs = {row[0]: row[1:] for row in con.execute(
        f"SELECT run_id, config_yaml, {confusion} FROM runs WHERE run_date IN ({dates})").fetchall()}
    parts = []
    for run_date in run_dates:
        run_id = runs.get(run_date)
        mask = pc.equal(counts.column("run_date"), pa.scalar(run_date, contract.RUN_DATE_TYPE))
        if run_id is None or not pc.any(mask).as_py():
            continue
        config_yaml, confusion_json = configs.get(run_id, (None, None))
        rules, meta = run_flag_rules(config_yaml, storage_options, confusion_json)
        diffs = compute_differentials(counts.filter(mask), rules, meta)
        shifted = np.asarray(diffs.column("domain_shift").fill_null(False).to_pylist(), dtype=bool)
        parts.append(mark_unverified(diffs, shifted))
    schema = contract.view_schema(contract.VERIFIED_DIFFERENTIALS)
    if digests:
        names, schema = names + ["verified_digest"], schema.append(pa.field("verified_digest", pa.string()))
    if not parts:
        return schema.empty_table()
    return pa.concat_tables(parts).select(names).cast(schema)


#: Schema of the connection's internal tables (materialised copies of the small record tables): outside the
#: search path, so ``SHOW TABLES`` lists only the public views.
INTERNAL = "bloodray_internal"


def _keep(con, name: str, table: pa.Table) -> None:
    con.execute(f"CREATE SCHEMA IF NOT EXISTS {INTERNAL}")
    con.execute(f"DROP TABLE IF EXISTS {INTERNAL}.{name}")
    con.from_arrow(table).to_table(f"{INTERNAL}.{name}")


def create_views(con, output_uri: str, storage_options: Any = None, as_of: Any = None) -> None:
    """Create ``reviews``, ``signoffs`` and ``verified_differentials`` on a connection that has the run views.

    ``as_of``: the record tables as they were then (as the run views).
    """
    # Materialised (records are small): once the connection is locked, no view may read files.
    reviews = tables.read(output_uri, contract.REVIEWS, storage_options, as_of=as_of)
    reviews = reviews.append_column("_row", pa.array(np.arange(reviews.num_rows), pa.int64()))
    signoffs = tables.read(output_uri, contract.SIGNOFFS, storage_options, as_of=as_of)
    # run_date a date, as in every view (stored as text).
    _keep(con, "_reviews_all", contract.dated(reviews))
    _keep(con, "_signoffs_all", contract.dated(signoffs))
    dates = _run_days(sorted({d for d in reviews.column(contract.RUN_DATE).to_pylist() if d}
                         | {d for d in signoffs.column(contract.RUN_DATE).to_pylist() if d}))
    _register_matches(con, dates)
    review_cols = ", ".join(f'r."{n}"' for n, _ in _cols(contract.REVIEWS) if n != contract.REVIEW_STATUS)
    con.execute(f"""CREATE VIEW {contract.REVIEWS} AS SELECT {review_cols},
        CASE WHEN m.chosen THEN '{contract.REVIEW_APPLIED}' WHEN m._row IS NOT NULL THEN '{contract.REVIEW_SUPERSEDED}'
             ELSE '{contract.REVIEW_UNMATCHED}' END AS {contract.REVIEW_STATUS}
        FROM bloodray_internal._reviews_all r LEFT JOIN (SELECT _row, bool_or(chosen) AS chosen FROM bloodray_internal._review_matches GROUP BY _row) m
        USING (_row) ORDER BY r.run_date, r.reviewed_at""")
    con.execute(f"CREATE VIEW {contract.SIGNOFFS} AS SELECT * FROM bloodray_internal._signoffs_all ORDER BY run_date, signed_at")
    _keep(con, "_verified_reviewed_runs", verified_rows(con, dates, storage_options))
    # Older or hand-written files may lack newer columns: those read as NULL, as in the other views.
    have = {r[0] for r in con.execute("DESCRIBE differentials").fetchall()}
    zero = {"n_verified", "n_reviews_unmatched"}
    plain = ", ".join(f'CAST(0 AS BIGINT) AS "{n}"' if n in zero
                      else f'CAST("{n}" AS {t}) AS "{n}"' if n in have else f'CAST(NULL AS {t}) AS "{n}"'
                      for n, t in _cols(contract.VERIFIED_DIFFERENTIALS))
    # The clearer column names of the dictionary's ALIASES sit beside the stored ones (issue 24).
    con.execute(f"""CREATE VIEW {contract.VERIFIED_DIFFERENTIALS} AS
        SELECT *{alias_select(contract.VERIFIED_DIFFERENTIALS)} FROM (
        SELECT {plain} FROM differentials WHERE run_date NOT IN (SELECT run_date FROM bloodray_internal._verified_reviewed_runs)
        UNION ALL SELECT * FROM bloodray_internal._verified_reviewed_runs)""")
