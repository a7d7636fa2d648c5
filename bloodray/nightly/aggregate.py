"""The aggregation step of a nightly run: DuckDB over the staged rows into the run's tables.

After the Ray stages have staged one row per image read
(:func:`bloodray.nightly.contract.staged_schema`), the driver selects the
``predictions`` and ``errors`` tables from them (plus listing errors and, for an
incremental run, the rows carried over from the visible run), then counts
classes per sample into ``differentials`` (percentages and flags:
:func:`bloodray.nightly.differential.compute_differentials`). Everything is
written into the run's staging directory; nothing is visible until
:mod:`bloodray.nightly.commit` publishes it. Column lists come from
:mod:`bloodray.nightly.contract`.
"""

from __future__ import annotations

import posixpath
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from bloodray import storage
from bloodray.classes import CLASS_NAMES
from bloodray.nightly import contract, tables
from bloodray.nightly.config import ClassifyError
from bloodray.nightly.differential import compute_differentials, count_columns
from bloodray.nightly.plan import RunPlan
from bloodray.nightly.resume import staged_result_files
from bloodray.nightly.shift import apply_shift, reference_for_run


def sample_scores(con) -> tuple[dict[str, np.ndarray], dict[str, int], dict[str, np.ndarray]]:
    """Per sample of the staged predictions (``p``): its cells' OOD scores, its unidentified count, and the
    cells' predicted classes (in the order of the scores)."""
    counts = con.sql(f"""SELECT sample_id, count(*) FILTER (WHERE status = '{contract.UNIDENTIFIED}')
                         FROM p GROUP BY sample_id""").fetchall()
    cells = con.sql("""SELECT sample_id, ood_score, predicted_class FROM p WHERE ood_score IS NOT NULL
                       ORDER BY sample_id""").to_arrow_table()
    ids = np.asarray(cells.column("sample_id").to_pylist(), dtype=object)
    values = cells.column("ood_score").to_numpy(zero_copy_only=False).astype(np.float64)
    names = np.asarray(cells.column("predicted_class").to_pylist(), dtype=object)
    scores, classes = {sid: np.zeros(0) for sid, _ in counts}, {sid: np.zeros(0, dtype=object) for sid, _ in counts}
    # Rows are sorted by sample: each sample is one slice.
    bounds = np.flatnonzero(ids[1:] != ids[:-1]) + 1 if len(ids) else np.zeros(0, dtype=int)
    for lo, hi in zip(np.r_[0, bounds], np.r_[bounds, len(ids)]):
        if hi > lo:
            scores[ids[lo]], classes[ids[lo]] = values[lo:hi], names[lo:hi]
    return scores, {sid: int(k) for sid, k in counts}, classes


def write_table(reader: pa.RecordBatchReader, schema: pa.Schema, fs, directory: str, rows_per_file: int) -> int:
    """Stream ``reader`` into Parquet files of at most ``rows_per_file`` rows; returns the row count.

    Always writes at least one file, so every run has a (possibly empty) file
    per table and readers always find the schema.
    """
    count = 0

    def batches():
        nonlocal count
        for batch in reader:
            count += batch.num_rows
            yield batch.cast(schema)

    pfs = contract.arrow_filesystem(fs)
    ds.write_dataset(pa.RecordBatchReader.from_batches(schema, batches()), directory, filesystem=pfs,
                     format="parquet", basename_template="part-{i}.parquet", max_rows_per_file=rows_per_file,
                     min_rows_per_group=min(rows_per_file, 65_536), max_rows_per_group=min(rows_per_file, 65_536),
                     existing_data_behavior="delete_matching")
    if count == 0:
        storage.put_bytes(fs, posixpath.join(directory, "part-0.parquet"),
                          storage.parquet_bytes(schema.empty_table()))
    return count


def staged_dataset(fs, directory: str, schema: pa.Schema) -> ds.Dataset:
    """The Parquet files under a staging directory with an explicit schema (empty when there are none)."""
    files = contract.parquet_files(fs, directory)
    if not files:
        return ds.dataset(schema.empty_table())
    return ds.dataset(files, schema=schema, format="parquet", filesystem=contract.arrow_filesystem(fs))


def carried_runs(plan: RunPlan) -> pa.Table:
    """Manifest row of the run whose rows are carried over (empty when none)."""
    runs = contract.with_run_date(contract.runs_schema()).empty_table()
    if plan.carried_from is None:
        return runs
    visible = tables.visible_runs(plan.output_uri, plan.storage_options, plan.run_date)
    return visible.filter(pc.equal(visible.column("run_id"), plan.carried_from))


def staging_connection(plan: RunPlan):
    """DuckDB over the staged results, the listing errors and the rows an incremental run carries over."""
    import duckdb

    fs, _root = contract.output_root(plan.output_uri, plan.storage_options)
    con = duckdb.connect()
    # Large runs sort and aggregate out of core; keep DuckDB's spill files out of the CWD.
    spill = posixpath.join(tempfile.gettempdir(), "bloodray-duckdb").replace("'", "''")
    con.execute(f"SET temp_directory = '{spill}'")
    # This run's own result rows and those it adopted from a killed run of the date (bloodray.nightly.resume).
    files = staged_result_files(fs, plan.staging)
    con.register("results", ds.dataset(files, schema=contract.staged_schema(), format="parquet",
                                       filesystem=contract.arrow_filesystem(fs)) if files
                 else ds.dataset(contract.staged_schema().empty_table()))
    con.register("list_errors", pa.Table.from_pylist(plan.listing.errors, schema=contract.errors_schema().remove(0)))
    carried = carried_runs(plan)
    for table in ("predictions", "thumbnails"):
        con.register(f"old_{table}", tables.run_rows(plan.output_uri, table, carried, plan.storage_options))
    con.register("carry", pa.table({"image_uri": pa.array(sorted(plan.carried_images), pa.string())}))
    return con


def write_image_tables(plan: RunPlan, con) -> None:
    """Split the per-image results into the staged predictions and errors tables.

    An incremental run adds the carried predictions (:attr:`RunPlan.carried_images`); errors are never
    carried: an image that failed last time was read again.
    """
    fs, _root = contract.output_root(plan.output_uri, plan.storage_options)
    timer = time.monotonic()
    # Carried rows get the new run id and are re-judged against this run's threshold;
    # unidentified cells are not reviewed for their class (they are not counted at all).
    review = f"confidence < $threshold AND status IS DISTINCT FROM '{contract.UNIDENTIFIED}'"
    new_predictions = contract.select_list("predictions", {
        "run_id": "$run_id", "needs_review": review, "model_name": "$model_name",
        "checkpoint_id": "$checkpoint_id"})
    old_predictions = contract.select_list("predictions", {"run_id": "$run_id", "needs_review": review})
    predictions_sql = f"""
        SELECT {new_predictions} FROM results WHERE error_type IS NULL
        UNION ALL
        SELECT {old_predictions} FROM old_predictions WHERE image_uri IN (SELECT image_uri FROM carry)
        ORDER BY sample_id, image_uri"""
    errors = contract.select_list("errors", {"run_id": "$run_id"})
    errors_sql = f"""
        SELECT {errors} FROM results WHERE error_type IS NOT NULL
        UNION ALL SELECT {errors} FROM list_errors
        ORDER BY sample_id NULLS FIRST, image_uri"""
    thumbnails = contract.select_list("thumbnails", {"run_id": "$run_id"})
    thumbnails_sql = f"""
        SELECT {thumbnails} FROM results WHERE error_type IS NULL
        UNION ALL
        SELECT {thumbnails} FROM old_thumbnails WHERE image_uri IN (SELECT image_uri FROM carry)
        ORDER BY sample_id, image_uri"""
    params = {"run_id": plan.run_id, "threshold": plan.review_threshold, "model_name": plan.model_name,
              "checkpoint_id": plan.checkpoint_id}
    for table, sql in (("predictions", predictions_sql), ("errors", errors_sql), ("thumbnails", thumbnails_sql)):
        used = {k: v for k, v in params.items() if f"${k}" in sql}
        write_table(con.sql(sql, params=used).to_arrow_reader(65_536), contract.SCHEMAS[table](), fs,
                     posixpath.join(plan.staging, table), plan.cfg.output.rows_per_file)
    plan.stats["n_inputs"] = con.sql("SELECT count(*) FROM results").fetchall()[0][0] + len(plan.listing.errors)
    plan.timings["write"] = time.monotonic() - timer


def write_differentials(plan: RunPlan, con) -> None:
    """Count classes per sample over the staged tables (DuckDB), add percentages and flags."""
    fs, _root = contract.output_root(plan.output_uri, plan.storage_options)
    timer = time.monotonic()
    con.register("p", staged_dataset(fs, posixpath.join(plan.staging, "predictions"), contract.predictions_schema()))
    con.register("e", staged_dataset(fs, posixpath.join(plan.staging, "errors"), contract.errors_schema()))
    # Unidentified cells (out of distribution) keep their predicted class in predictions but are never counted.
    counted = f"status IS DISTINCT FROM '{contract.UNIDENTIFIED}'"
    per_class = ", ".join(f"count(*) FILTER (WHERE predicted_class = '{c}' AND {counted}) AS {col}"
                          for c, col in zip(CLASS_NAMES, count_columns()))
    # Errors without a sample (paths that name none) have no differential to count toward.
    counts = con.sql(f"""
        WITH rows AS (
            SELECT sample_id, predicted_class, needs_review, status, FALSE AS is_error FROM p
            UNION ALL SELECT sample_id, NULL, FALSE, NULL, TRUE FROM e WHERE sample_id IS NOT NULL)
        SELECT sample_id, count(*) AS n_images, count(*) FILTER (WHERE NOT is_error) AS n_classified,
               count(*) FILTER (WHERE is_error) AS n_errors, count(*) FILTER (WHERE needs_review) AS n_review,
               {per_class}
        FROM rows GROUP BY sample_id ORDER BY sample_id""").to_arrow_table()
    diffs = compute_differentials(counts, plan.rules, plan.sample_metadata)
    diffs = diffs.add_column(0, "run_id", pa.array([plan.run_id] * diffs.num_rows, pa.string()))
    scores, unidentified, classes = sample_scores(con)
    ood = reference_for_run(plan.ood, plan.inference_paths["precision"])
    diffs, plan.run_shift = apply_shift(diffs, scores, unidentified, ood, plan.shift_rule, classes)
    plan.stats.update(domain_shift=plan.run_shift["domain_shift"],
                      n_samples_shifted=plan.run_shift["n_samples_shifted"])
    schema = contract.differentials_schema()
    diffs = diffs.select(schema.names).cast(schema)
    write_table(pa.RecordBatchReader.from_batches(schema, diffs.to_batches()), schema, fs,
                posixpath.join(plan.staging, "differentials"), plan.cfg.output.rows_per_file)
    (n_pred, n_review), = con.sql("SELECT count(*), count(*) FILTER (WHERE needs_review) FROM p").fetchall()
    (n_errors,), = con.sql("SELECT count(*) FROM e").fetchall()
    plan.stats.update(n_predictions=n_pred, n_review=n_review, n_errors=n_errors, n_samples=diffs.num_rows)
    plan.timings["aggregate"] = time.monotonic() - timer


#: A listed shard's member rows are ``<shard>#<member>``; the shard part ends at the first ``.tar#``.
_SHARD_OF = r"regexp_extract(image_uri, '^(.*?\.[tT][aA][rR])(#|$)', 1)"


def check_accounting(plan: RunPlan) -> None:
    """Refuse a staged run whose rows do not account for its listed inputs, each exactly once.

    Every listed image file (read or carried over) and every listing error
    must have exactly one row in the staged predictions or errors; every
    other row must be a member (or the shard-level error) of a listed tar
    shard, again once. A shard's members are only known by reading it, so a
    shard with no image member has no row. Raises :class:`ClassifyError`
    naming the run and a few offending URIs: nothing is published.
    """
    import duckdb

    fs, _root = contract.output_root(plan.output_uri, plan.storage_options)
    expected = [u for u, _s in plan.listing.files] + sorted(plan.carried_images) + sorted(plan.resumed_images)
    expected += [e["image_uri"] for e in plan.listing.errors if e.get("image_uri")]
    con = duckdb.connect()
    try:
        con.register("p", staged_dataset(fs, posixpath.join(plan.staging, "predictions"),
                                         contract.predictions_schema()))
        con.register("e", staged_dataset(fs, posixpath.join(plan.staging, "errors"), contract.errors_schema()))
        con.register("expected", pa.table({"image_uri": pa.array(expected, pa.string())}))
        con.register("shards", pa.table({"shard": pa.array(plan.listing.shards, pa.string())}))
        con.execute("""
            CREATE TEMP TABLE seen AS
            SELECT image_uri, count(*) AS n FROM (SELECT image_uri FROM p UNION ALL SELECT image_uri FROM e)
            GROUP BY image_uri""")
        problems = []
        checks = (
            ("listed image(s) without a row",
             "SELECT image_uri FROM expected ANTI JOIN seen USING (image_uri)"),
            ("image(s) with more than one row", "SELECT image_uri FROM seen WHERE n > 1"),
            ("row(s) of no listed input",
             f"""SELECT image_uri FROM seen ANTI JOIN expected USING (image_uri)
                 WHERE image_uri IS NULL OR {_SHARD_OF} NOT IN (SELECT shard FROM shards)"""),
        )
        for what, sql in checks:
            n, example = con.sql(f"SELECT count(*), min(image_uri) FROM ({sql})").fetchall()[0]
            if n:
                problems.append(f"{n} {what} (e.g. {example})")
    finally:
        con.close()
    if problems:
        raise ClassifyError(f"{plan.output_uri}: run {plan.run_id} of {plan.run_date} is not published: its staged "
                            f"rows do not account for the listed inputs: {'; '.join(problems)}")
