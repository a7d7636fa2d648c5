"""The ``reviews`` and ``verified_differentials`` views of :func:`bloodray.analysis.query.connect`.

Reviews apply to the run they were made on: a review names ``(run_id,
image_uri)``, and only reviews of a date's *visible* run are shown (a rerun of
the date classifies afresh and starts a new review list). When a cell was
reviewed more than once, the latest review wins.

``verified_differentials`` has the columns of ``differentials`` plus
``n_verified``. For runs without reviews it is the stored differential
(``n_verified = 0``); for reviewed runs the class counts are recomputed in
DuckDB from ``predictions LEFT JOIN reviews`` (the verified class where a
review exists, the predicted class elsewhere), and percentages, intervals and
flags come from the same :func:`bloodray.nightly.differential.compute_differentials`
the nightly job uses, with the flag rules saved in the run's config
(``flags.*`` of ``runs.config_yaml``).
"""

from __future__ import annotations

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
from bloodray.nightly.differential import FlagRules, compute_differentials, count_columns, load_flag_rules
from bloodray.nightly.sample_metadata import load_sample_metadata
from bloodray.nightly.shift import SHIFT_COLUMNS, withhold_flags

#: SQL of the latest review of each reviewed cell (over the ``reviews`` view).
LATEST_REVIEWS_SQL = ("SELECT * FROM reviews QUALIFY row_number() OVER "
                      "(PARTITION BY run_id, image_uri ORDER BY reviewed_at DESC) = 1")


def _cols(view: str, skip: tuple[str, ...] = ()) -> list[tuple[str, str]]:
    return [(n, t) for n, t in contract.duckdb_columns(view) if n not in skip]


def _empty(view: str) -> str:
    return "SELECT " + ", ".join(f'CAST(NULL AS {t}) AS "{n}"' for n, t in _cols(view)) + " WHERE false"


def run_flag_rules(config_yaml: str | None, storage_options: Any = None) -> tuple[FlagRules, pa.Table | None]:
    """The flag rules and sample metadata a run used, from its saved config.

    A reference-range or sample-metadata file that can no longer be read is
    reported with a warning naming it, and the packaged defaults are used.
    """
    try:
        data = load_yaml_text(config_yaml or "") or {}
        flags = from_dict(FlagsConfig, data.get("flags") or {}, "flags")
    except Exception as exc:  # noqa: BLE001 - an old or foreign manifest
        warnings.warn(f"run config unreadable ({exc}); verified flags use the packaged defaults", stacklevel=3)
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


def verified_rows(con, run_ids: list[str], storage_options: Any = None) -> pa.Table:
    """Verified differentials of ``run_ids`` (runs with reviews), in the view's column order."""
    names = [n for n, _ in _cols(contract.VERIFIED_DIFFERENTIALS)]
    if not run_ids:
        return contract.view_schema(contract.VERIFIED_DIFFERENTIALS).empty_table()
    # As in the job: unidentified cells are not counted, unless a reviewer gave them a class.
    per_class = ", ".join(f"count(*) FILTER (WHERE cls = '{c}' AND counted) AS {col}"
                          for c, col in zip(CLASS_NAMES, count_columns()))
    # The alarm's statistics describe the images, not their classes: they stay as the run computed them.
    shift = ", ".join(f"any_value(d.{col}) AS {col}" for col in SHIFT_COLUMNS)
    ids = ", ".join("'" + r.replace("'", "''") + "'" for r in run_ids)
    counts = con.sql(f"""
        WITH r AS ({LATEST_REVIEWS_SQL}),
        cells AS (
            SELECT p.run_id, p.run_date, p.sample_id, coalesce(r.new_class, p.predicted_class) AS cls,
                   p.needs_review AND r.new_class IS NULL AS still_review, r.new_class IS NOT NULL AS verified,
                   p.status IS DISTINCT FROM '{contract.UNIDENTIFIED}' OR r.new_class IS NOT NULL AS counted
            FROM predictions p LEFT JOIN r USING (run_id, image_uri) WHERE p.run_id IN ({ids}))
        SELECT c.run_id, c.sample_id, any_value(d.n_images) AS n_images, count(*) AS n_classified,
               any_value(d.n_errors) AS n_errors, count(*) FILTER (WHERE still_review) AS n_review,
               {per_class}, count(*) FILTER (WHERE verified) AS n_verified, {shift}, c.run_date
        FROM cells c LEFT JOIN differentials d USING (run_id, sample_id)
        GROUP BY c.run_id, c.run_date, c.sample_id ORDER BY c.run_date, c.sample_id""").to_arrow_table()
    configs = dict(con.execute(f"SELECT run_id, config_yaml FROM runs WHERE run_id IN ({ids})").fetchall())
    parts = []
    for run_id in run_ids:
        mask = pc.equal(counts.column("run_id"), run_id)
        rules, meta = run_flag_rules(configs.get(run_id), storage_options)
        diffs = compute_differentials(counts.filter(mask), rules, meta)
        shifted = np.asarray(diffs.column("domain_shift").fill_null(False).to_pylist(), dtype=bool)
        parts.append(withhold_flags(diffs, shifted))
    table = pa.concat_tables(parts)
    return table.select(names).cast(contract.view_schema(contract.VERIFIED_DIFFERENTIALS))


def create_views(con, output_uri: str, storage_options: Any = None, as_of: Any = None) -> None:
    """Create ``reviews`` and ``verified_differentials`` on a connection that already has the run views.

    ``as_of``: the ``reviews`` Delta table as it was then (as the run views).
    """
    # Materialised (reviews are small): once the connection is locked, no view may read files.
    reviews = tables.read(output_uri, contract.REVIEWS, storage_options, as_of=as_of)
    # Views over relations rather than registered names, so no internal object shows beside the public views.
    if reviews.num_rows:
        visible = [r for (r,) in con.execute("SELECT run_id FROM runs").fetchall()]
        con.from_arrow(reviews.filter(pc.is_in(reviews.column("run_id"), pa.array(visible, pa.string())))
                       ).create_view(contract.REVIEWS)
    else:
        con.execute(f"CREATE VIEW reviews AS {_empty(contract.REVIEWS)}")
    reviewed = [r for (r,) in con.execute("SELECT DISTINCT run_id FROM reviews ORDER BY 1").fetchall()]
    recomputed = verified_rows(con, reviewed, storage_options)
    # Older or hand-written files may lack newer columns: those read as NULL, as in the other views.
    have = {r[0] for r in con.execute("DESCRIBE differentials").fetchall()}
    plain = ", ".join("CAST(0 AS BIGINT) AS n_verified" if n == "n_verified"
                      else f'CAST("{n}" AS {t}) AS "{n}"' if n in have else f'CAST(NULL AS {t}) AS "{n}"'
                      for n, t in _cols(contract.VERIFIED_DIFFERENTIALS))
    ids = ", ".join("'" + r.replace("'", "''") + "'" for r in reviewed) or "NULL"
    stored = con.sql(f"SELECT {plain} FROM differentials WHERE run_id NOT IN ({ids})")
    stored.union(con.from_arrow(recomputed)).project("*" + alias_select(contract.VERIFIED_DIFFERENTIALS)) \
        .create_view(contract.VERIFIED_DIFFERENTIALS)
