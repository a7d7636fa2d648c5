"""Layout and schemas of the nightly classification outputs.

Everything the classification job (:mod:`bloodray.nightly.pipeline`) writes lives under
one output root. The four data tables, ``runs``, the lab's records (``reviews``
and ``signoffs``) and ``verified_differentials`` are Delta Lake tables
(:data:`DELTA_TABLES`; commits, reads, time travel and vacuum:
:mod:`bloodray.nightly.tables`), partitioned hive-style by ``run_date``::

    <output>/predictions/_delta_log/                                      the table's Delta log
    <output>/predictions/run_date=<YYYY-MM-DD>/<run_id>/part-*.parquet   one row per classified image
    <output>/errors/run_date=<YYYY-MM-DD>/<run_id>/part-*.parquet        one row per image that failed
    <output>/differentials/run_date=<YYYY-MM-DD>/<run_id>/part-*.parquet one row per sample
    <output>/thumbnails/run_date=<YYYY-MM-DD>/<run_id>/part-*.parquet    one small JPEG per classified image
    <output>/reviews/run_date=<YYYY-MM-DD>/<review_id>.parquet            reviewers' corrections (one file per import)
    <output>/signoffs/run_date=<YYYY-MM-DD>/<review_id>.parquet           sample sign-offs (one file per import)
    <output>/verified_differentials/run_date=<YYYY-MM-DD>/<id>.parquet    differentials from the verified classes
    <output>/runs/run_date=<YYYY-MM-DD>/<run_id>.parquet                  the run manifest (one row)
    <output>/run_configs/run_date=<YYYY-MM-DD>/<run_id>.yaml              the run's final config (plain file)
    <output>/_staging/<run_id>/...                                        work in progress (ignored by readers)
    <output>/_leases/run_date=<YYYY-MM-DD>.json                           who is writing that date (ignored by readers)
    <output>/_commits/run_date=<YYYY-MM-DD>/<run_id>.json                 a run committing right now (ignored by readers)
    <output>/_commits/upgrade-output.json                                 an upgrade-output in progress (readers refuse)

``run_date`` is a Delta partition column: its value is in the Delta log and
in the ``run_date=`` directory names, never a column inside the files. What
belongs to a table is what its Delta log says: a file in a table's folder
that no committed version lists (a run that crashed before its commit, or a
superseded run kept for time travel) is never read by a Delta reader. Each
run of a date replaces that date's rows in one Delta commit per table, so the
current version of each table holds the latest committed run of every date;
``runs`` keeps one manifest row per committed run (superseded reruns
included), and the *visible* run of a date is the one with the latest
``committed_at``.

``reviews`` and ``signoffs`` are the lab's records (:data:`RECORD_TABLES`):
only ever appended to by ``bloodray review import``, never replaced by a run
and never vacuumed. A review names the cell's image content
(``sample_id``, ``image_sha256``), so it applies to that image in whichever
run of the date is visible (:mod:`bloodray.analysis.review_views`).
``verified_differentials`` is derived from them and the visible run: each
review import and each run of a date replaces that date's rows.

Plain Parquet globs over a table folder are not a reader of this format: they
also see files no version lists. Use a Delta reader
(``deltalake.DeltaTable(uri).to_pyarrow_dataset()``, Spark, Trino, Polars'
``read_delta``, DuckDB's ``delta_scan``) or bloodray's own
(:mod:`bloodray.analysis.query`).

This module is the one owner of that contract: one pyarrow schema per table
(:data:`SCHEMAS`); the staged per-image rows of a run (:func:`staged_schema`),
the SQL select lists that fill the tables (:func:`select_list`), the DuckDB
column types of the query views (:func:`duckdb_columns`; ``run_date`` a
DATE there, :data:`RUN_DATE_TYPE`), the Delta table schemas
(:func:`with_run_date`; ``run_date`` stored as text) and the visible-run rule
(:func:`visible_runs_sql`) are derived from it.
"""

from __future__ import annotations

import datetime as dt
import posixpath
from typing import Any, Mapping

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs

from bloodray import storage
from bloodray.classes import CLASS_NAMES
from bloodray.data.stages import ERROR_COLUMNS
from bloodray.nightly.differential import count_columns, differential_fields

#: Data tables, one directory each under the output root.
TABLES: tuple[str, ...] = ("predictions", "errors", "differentials", "thumbnails")
#: Reviewers' corrections: appended by ``bloodray review import``, one whole file per import.
REVIEWS = "reviews"
#: Reviewers' sign-off (or reopening) of a sample: appended by ``bloodray review import``, beside the reviews.
SIGNOFFS = "signoffs"
#: The lab's records: append-only, never replaced by a run, never deleted by ``bloodray vacuum``.
RECORD_TABLES: tuple[str, ...] = (REVIEWS, SIGNOFFS)
#: Differentials counted from the verified classes: a Delta table (each import and each run of a date replaces the
#: date's rows) and a query view of the same name computed when bloodray connects.
VERIFIED_DIFFERENTIALS = "verified_differentials"
RUNS = "runs"
RUN_CONFIGS = "run_configs"
#: Tables stored as Delta Lake tables (:mod:`bloodray.nightly.tables`).
DELTA_TABLES: tuple[str, ...] = TABLES + (RUNS,) + RECORD_TABLES + (VERIFIED_DIFFERENTIALS,)
#: Leading underscore: pyarrow dataset discovery skips it, and no table glob matches it.
STAGING = "_staging"
#: One lease object per run date (:mod:`bloodray.nightly.lease`); never read as a table.
LEASES = "_leases"
#: Commit intents of runs committing right now (:mod:`bloodray.nightly.tables`); never read as a table.
COMMITS = "_commits"
#: Status of a committed run (the only status a manifest is ever written with).
COMMITTED = "committed"
#: Hive partition column of every table; it lives in the paths, never inside the files.
RUN_DATE = "run_date"
RUN_DATE_PREFIX = RUN_DATE + "="
#: Type of ``run_date`` where readers see it (the query views, reports, ``read_table``): a date, so ``run_date + 1``
#: and date comparisons work. Stored as text (``'YYYY-MM-DD'``: the Delta partition value and the ``run_date=``
#: folder names), so tables written by any bloodray stay readable and need no rewrite (issue 24).
RUN_DATE_TYPE = pa.date32()

PARTITIONING = ds.partitioning(pa.schema([(RUN_DATE, pa.string())]), flavor="hive")

_TS = pa.timestamp("us", tz="UTC")

#: Column of ``differentials``: the sample's flags were counted from cells under the domain-shift alarm, so they
#: are kept but unverified (:mod:`bloodray.nightly.shift`).
FLAGS_UNVERIFIED = "flags_unverified"


def prob_columns() -> list[str]:
    """``prob_<class>`` column names in class index order."""
    return [f"prob_{name}" for name in CLASS_NAMES]


def predictions_schema() -> pa.Schema:
    """Schema of the files under ``predictions/``."""
    return pa.schema(
        [("run_id", pa.string()), ("sample_id", pa.string()), ("image_uri", pa.string()),
         ("image_sha256", pa.string()), ("predicted_class", pa.string()), ("confidence", pa.float32())]
        + [(c, pa.float32()) for c in prob_columns()]
        + [("needs_review", pa.bool_()), ("model_name", pa.string()), ("checkpoint_id", pa.string())]
        + trust_prediction_fields())


def errors_schema() -> pa.Schema:
    """Schema of the files under ``errors/``: the image, and the read+decode stage's error columns."""
    return pa.schema([("run_id", pa.string()), ("sample_id", pa.string()), ("image_uri", pa.string())]
                     + [(c, pa.string()) for c in ERROR_COLUMNS])


def differentials_schema() -> pa.Schema:
    """Schema of the files under ``differentials/``."""
    fields = [("run_id", pa.string()), ("sample_id", pa.string()), ("n_images", pa.int64()),
              ("n_classified", pa.int64()), ("n_errors", pa.int64()), ("n_review", pa.int64())]
    fields += [(c, pa.int64()) for c in count_columns()]
    fields += differential_fields()
    fields += shift_fields() + [(FLAGS_UNVERIFIED, pa.bool_())]
    return pa.schema(fields)


def runs_schema() -> pa.Schema:
    """Schema of a run manifest file under ``runs/`` (``run_date`` comes from the path).

    ``n_inputs`` counts the inputs this run read itself (images, tar members
    and broken shards); ``n_predictions``, ``n_errors``, ``n_samples`` and
    ``n_review`` count the run's tables, including rows an incremental run
    carried over from ``carried_from_run_id``. ``timings_json`` holds seconds
    per stage: ``list``, ``read_decode_infer`` (the streaming Ray Data part,
    staging write included), ``write`` (predictions and errors tables),
    ``aggregate`` (differentials) and ``commit`` (checks, files into place and the
    manifest file; the Delta log commits that follow are not in it).
    ``flag_confusion_json``: the confusion counts the run's flags were corrected with (val's, plus the training
    cells' when they passed calibrate's check: :meth:`bloodray.checkpoint.CheckpointMetadata.flag_confusion`; JSON, 8 x 8, rows true,
    columns predicted; null: the flags assume a perfect classifier), so that reviews recompute them alike.
    ``precision`` and ``device`` say how the model actors ran (e.g. ``bf16`` on ``cpu``; ``bf16 (openvino)`` with
    ``inference.runtime: openvino``; values of several
    actors joined by ``,``; null when the run classified nothing itself): :mod:`bloodray.inference_precision`.
    """
    return pa.schema([
        ("run_id", pa.string()), ("status", pa.string()), ("started_at", _TS), ("committed_at", _TS),
        ("checkpoint", pa.string()), ("checkpoint_id", pa.string()), ("model_name", pa.string()),
        ("review_threshold", pa.float64()), ("input_uri", pa.string()), ("output_uri", pa.string()),
        ("config_yaml", pa.string()), ("n_inputs", pa.int64()), ("n_predictions", pa.int64()),
        ("n_errors", pa.int64()), ("n_samples", pa.int64()), ("n_review", pa.int64()),
        ("timings_json", pa.string()), ("incremental_skipped_samples", pa.int64()),
        ("carried_from_run_id", pa.string()),
    ] + shift_fields() + [("n_samples_shifted", pa.int64()), ("precision", pa.string()), ("device", pa.string()),
                          ("flag_confusion_json", pa.string())])


#: Status of a classified cell: counted in the differential, or out of distribution and not counted.
CLASSIFIED, UNIDENTIFIED = "classified", "unidentified"


def trust_prediction_fields() -> list[tuple[str, pa.DataType]]:
    """Per-cell OOD columns of ``predictions``: ``ood_score`` (null when the checkpoint has no OOD reference)
    and ``status`` (:data:`CLASSIFIED` or :data:`UNIDENTIFIED`)."""
    return [("ood_score", pa.float32()), ("status", pa.string())]


def shift_fields() -> list[tuple[str, pa.DataType]]:
    """Domain-shift columns of ``differentials`` (per sample) and ``runs`` (the whole run).

    ``n_unidentified`` cells were not counted; the statistics
    (:func:`bloodray.ood.shift_statistics`) are null without an OOD
    reference, and ``domain_shift`` is then false.
    """
    return [("n_unidentified", pa.int64()), ("share_unidentified", pa.float64()),
            ("unidentified_p_value", pa.float64()), ("ood_ks", pa.float64()), ("ood_ks_p_value", pa.float64()),
            ("domain_shift", pa.bool_())]


def thumbnails_schema() -> pa.Schema:
    """Schema of the files under ``thumbnails/``: a small JPEG of every classified image.

    A side table rather than a predictions column, so analysts' scans of
    predictions stay small; join on ``(run_id, image_uri)``. The JPEG (at most
    :data:`bloodray.data.stages.THUMBNAIL_SIZE` px a side) is made in the decode
    stage from the image the model's input is resized from
    (:func:`bloodray.data.stages.thumbnail_jpeg`), so a review needs no access to the archive.
    """
    return pa.schema([("run_id", pa.string()), ("sample_id", pa.string()), ("image_uri", pa.string()),
                      ("jpeg", pa.binary())])


def reviews_schema() -> pa.Schema:
    """Schema of the files under ``reviews/``: one row per reviewed cell.

    A review belongs to the image content and sample (``sample_id``,
    ``image_sha256``): it applies to that image in every later run of the
    date. ``run_id`` and ``image_uri`` say which run and file the reviewer saw;
    ``old_class`` is the class that run predicted, ``new_class`` the verified
    one (equal when the reviewer confirmed the prediction; ``unidentified``:
    not a countable cell). ``source`` is the imported file. Reviews written
    before the content columns existed have them null and apply by
    ``image_uri``.
    """
    return pa.schema([("run_id", pa.string()), ("image_uri", pa.string()), ("old_class", pa.string()),
                      ("new_class", pa.string()), ("reviewer", pa.string()), ("reviewed_at", _TS),
                      ("sample_id", pa.string()), ("image_sha256", pa.string()), ("source", pa.string())])


#: Computed column of the ``reviews`` query view: ``applied`` (the latest review of an image of the date's visible
#: run), ``superseded`` (a later review of the same image applies) or ``unmatched`` (no image of the visible run has
#: that content any more: it changed or was removed; the review is kept and reported).
REVIEW_STATUS = "review_status"
REVIEW_APPLIED, REVIEW_SUPERSEDED, REVIEW_UNMATCHED = "applied", "superseded", "unmatched"
#: ``status`` of a sign-off row.
SIGNED_OFF, REOPENED = "signed_off", "reopened"


def signoffs_schema() -> pa.Schema:
    """Schema of the files under ``signoffs/``: one row per sign-off (or reopening) of a sample.

    ``status`` is :data:`SIGNED_OFF` or :data:`REOPENED` (the latest row of a
    sample counts); ``run_id`` is the run the reviewer signed off;
    ``verified_digest`` fingerprints the sample's verified cells (image
    content and verified class of each) when signed, so a later run that
    changes them marks the sign-off outdated (null: signed on a run the date no
    longer shows).
    """
    return pa.schema([("run_id", pa.string()), ("sample_id", pa.string()), ("status", pa.string()),
                      ("reviewer", pa.string()), ("signed_at", _TS), ("verified_digest", pa.string()),
                      ("source", pa.string())])


def verified_differentials_schema() -> pa.Schema:
    """Schema of ``verified_differentials`` (Delta table and query view): :func:`differentials_schema` and more.

    Same columns as ``differentials``, counted from the verified class of each
    cell where a review applies (the predicted class elsewhere); ``n_review``
    counts cells still needing review, ``n_verified`` the reviewed cells,
    ``n_reviews_unmatched`` the sample's reviews that no longer match any of
    its images. ``reviewers`` lists who reviewed the sample's cells; the
    ``signoff_*`` columns are its latest sign-off (null when none), and
    ``signoff_outdated`` is true when the verified cells are no longer the
    ones signed off (a later run changed them).
    """
    return differentials_schema().append(pa.field("n_verified", pa.int64())) \
        .append(pa.field("n_reviews_unmatched", pa.int64())).append(pa.field("reviewers", pa.string())) \
        .append(pa.field("signoff_status", pa.string())).append(pa.field("signed_off_by", pa.string())) \
        .append(pa.field("signed_off_at", _TS)).append(pa.field("signoff_outdated", pa.bool_()))


SCHEMAS = {"predictions": predictions_schema, "errors": errors_schema,
           "differentials": differentials_schema, "thumbnails": thumbnails_schema, RUNS: runs_schema,
           REVIEWS: reviews_schema, SIGNOFFS: signoffs_schema,
           VERIFIED_DIFFERENTIALS: verified_differentials_schema}

#: Prediction columns a run sets for every row (run id, review rule, model), not the model per image.
RUN_LEVEL_PREDICTION_COLUMNS: tuple[str, ...] = ("run_id", "needs_review", "model_name", "checkpoint_id")


def staged_schema() -> pa.Schema:
    """Schema of a run's staged per-image rows (``_staging/<run_id>/results/``).

    One row per image read, good or bad: the per-image columns of
    ``predictions`` (null on error rows), then the error columns of ``errors``
    (null on good rows). The predictions and errors tables are selected from it.
    """
    pred = predictions_schema()
    fields = [f for f in pred if f.name not in RUN_LEVEL_PREDICTION_COLUMNS]
    fields += [errors_schema().field(c) for c in ERROR_COLUMNS]
    # The thumbnail travels with its image's row until the thumbnails table is selected from it.
    fields += [f for f in thumbnails_schema() if f.name not in {x.name for x in fields} | {"run_id"}]
    return pa.schema(fields)


def with_run_date(schema: pa.Schema) -> pa.Schema:
    """``schema`` plus the ``run_date`` column readers get from the path."""
    return schema.append(pa.field(RUN_DATE, pa.string()))


def run_day(value: str | dt.date) -> dt.date:
    """A run date (``YYYY-MM-DD`` text, as stored, or a date) as a date, as readers see ``run_date``.

    Raises ValueError naming the value.
    """
    if isinstance(value, dt.date):
        return value
    try:
        return dt.date.fromisoformat(str(value).strip())
    except ValueError:
        raise ValueError(f"{value!r} is not a date; give YYYY-MM-DD") from None


def dated(data: pa.Schema | pa.Table) -> pa.Schema | pa.Table:
    """A schema or table with ``run_date`` as readers see it (:data:`RUN_DATE_TYPE`) instead of the stored text.

    Anything without a ``run_date`` column is returned as it is.
    """
    schema = data if isinstance(data, pa.Schema) else data.schema
    at = schema.get_field_index(RUN_DATE)
    if at < 0 or schema.field(at).type == RUN_DATE_TYPE:
        return data
    typed = schema.set(at, schema.field(at).with_type(RUN_DATE_TYPE))
    return typed if isinstance(data, pa.Schema) else data.cast(typed)


def select_list(table: str, exprs: Mapping[str, str] | None = None) -> str:
    """SQL select list producing ``table``'s columns in schema order.

    ``exprs`` gives the SQL expression of some columns (``{"run_id": "$run_id"}``);
    every other column is selected by name.
    """
    exprs = dict(exprs or {})
    names = SCHEMAS[table]().names
    unknown = set(exprs) - set(names)
    if unknown:
        raise ValueError(f"{table}: no column(s) {sorted(unknown)} in the contract")
    return ", ".join(f"{exprs[n]} AS {n}" if n in exprs else n for n in names)


def view_schema(view: str) -> pa.Schema:
    """Arrow schema of a query view (``runs``, ``all_runs`` or a table), ``run_date`` included as a date.

    ``run_date`` has the readers' type :data:`RUN_DATE_TYPE` here, not the stored text of :func:`with_run_date`.
    The ``reviews`` view adds :data:`REVIEW_STATUS` after ``run_date``.
    """
    schema = dated(with_run_date(SCHEMAS[RUNS if view in (RUNS, "all_runs") else view]()))
    return schema.append(pa.field(REVIEW_STATUS, pa.string())) if view == REVIEWS else schema


def duckdb_columns(view: str) -> list[tuple[str, str]]:
    """Column names and DuckDB types of a query view, as DuckDB itself maps the Arrow schema."""
    import duckdb

    con = duckdb.connect()
    try:
        rel = con.from_arrow(view_schema(view).empty_table())
        return [(name, str(typ)) for name, typ in zip(rel.columns, rel.types)]
    finally:
        con.close()


def visible_runs_sql(manifests: str) -> str:
    """SQL selecting the visible run of each date from a relation of committed manifests.

    The visible run of a date is the committed manifest with the latest
    ``committed_at``; ties (clock resolution) go to the later run id.
    """
    return (f"SELECT * FROM {manifests} WHERE status = '{COMMITTED}' QUALIFY row_number() OVER "
            f"(PARTITION BY {RUN_DATE} ORDER BY committed_at DESC, run_id DESC) = 1 ORDER BY {RUN_DATE}")


# ---------------------------------------------------------------------------
# Paths (fsspec paths without protocol, as returned by storage.filesystem).
# ---------------------------------------------------------------------------


def table_dir(root: str, table: str) -> str:
    """Directory of one table under the output root path."""
    return posixpath.join(root, table)


def partition_dir(root: str, table: str, run_date: str, run_id: str) -> str:
    """Directory holding one run's files of a data table."""
    return posixpath.join(root, table, f"{RUN_DATE_PREFIX}{run_date}", run_id)


def manifest_path(root: str, run_date: str, run_id: str) -> str:
    """Path of a run's manifest file."""
    return posixpath.join(root, RUNS, f"{RUN_DATE_PREFIX}{run_date}", f"{run_id}.parquet")


def config_path(root: str, run_date: str, run_id: str) -> str:
    """Path of a run's saved config YAML."""
    return posixpath.join(root, RUN_CONFIGS, f"{RUN_DATE_PREFIX}{run_date}", f"{run_id}.yaml")


def review_path(root: str, run_date: str, review_id: str, table: str = REVIEWS) -> str:
    """Path of one review import's file of ``table`` (reviews or signoffs; written whole, atomically).

    Also one refresh of ``verified_differentials`` (``table``, with a refresh id).
    """
    return posixpath.join(root, table, f"{RUN_DATE_PREFIX}{run_date}", f"{review_id}.parquet")


def staging_dir(root: str, run_id: str) -> str:
    """A run's private staging directory."""
    return posixpath.join(root, STAGING, run_id)


def intent_path(root: str, run_date: str, run_id: str) -> str:
    """A run's commit intent: written once its files are in place, removed once every table has committed it."""
    return posixpath.join(root, COMMITS, f"{RUN_DATE_PREFIX}{run_date}", f"{run_id}.json")


def upgrade_intent_path(root: str) -> str:
    """The intent of ``bloodray upgrade-output``: every file it commits, from before its first commit to after its last."""
    return posixpath.join(root, COMMITS, "upgrade-output.json")


def lease_path(root: str, run_date: str) -> str:
    """The lease object of one run date (one writer per output and date)."""
    return posixpath.join(root, LEASES, f"{RUN_DATE_PREFIX}{run_date}.json")


def output_root(output_uri: str, storage_options: Mapping[str, Any] | None = None):
    """``(fs, root path)`` of an output URI, without a trailing slash."""
    fs, root = storage.filesystem(output_uri, storage_options)
    return fs, root.rstrip("/")


def arrow_filesystem(fs) -> pafs.FileSystem:
    """A pyarrow filesystem over an fsspec one (native for local paths)."""
    if storage.is_local(fs):
        return pafs.LocalFileSystem()
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs))


def parquet_files(fs, directory: str) -> list[str]:
    """All ``*.parquet`` files under ``directory`` (one recursive listing; [] if absent)."""
    # Other processes (Ray workers, other runs) write here: never trust a cached listing.
    fs.invalidate_cache()
    try:
        found = fs.find(directory)
    except FileNotFoundError:
        return []
    # Hidden and underscore names are temporary files (a manifest being renamed into place) or another writer's
    # bookkeeping (a Delta log's checkpoint Parquet under _delta_log/), never data.
    return sorted(p for p in found if p.endswith(".parquet") and not any(
        part.startswith((".", "_")) for part in posixpath.relpath(p, directory).split("/")))


