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

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from bloodray import storage
from bloodray.classes import CLASS_NAMES
from bloodray.nightly import contract
from bloodray.nightly.differential import compute_differentials, count_columns
from bloodray.nightly.plan import RunPlan


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
    visible = contract.visible_runs(plan.output_uri, plan.storage_options, plan.run_date)
    return visible.filter(pc.equal(visible.column("run_id"), plan.carried_from))


def staging_connection(plan: RunPlan):
    """DuckDB over the staged results, the listing errors and the rows an incremental run carries over."""
    import duckdb

    fs, _root = contract.output_root(plan.output_uri, plan.storage_options)
    con = duckdb.connect()
    # Large runs sort and aggregate out of core; keep DuckDB's spill files out of the CWD.
    spill = posixpath.join(tempfile.gettempdir(), "bloodray-duckdb").replace("'", "''")
    con.execute(f"SET temp_directory = '{spill}'")
    con.register("results", staged_dataset(fs, posixpath.join(plan.staging, "results"), contract.staged_schema()))
    con.register("list_errors", pa.Table.from_pylist(plan.listing.errors, schema=contract.errors_schema().remove(0)))
    carried = carried_runs(plan)
    for table in ("predictions", "errors", "thumbnails"):
        con.register(f"old_{table}", contract.table_dataset(plan.output_uri, table, carried, plan.storage_options))
    con.register("skip", pa.table({"sample_id": pa.array(sorted(plan.skip_samples), pa.string())}))
    return con


def write_image_tables(plan: RunPlan, con) -> None:
    """Split the per-image results into the staged predictions and errors tables."""
    fs, _root = contract.output_root(plan.output_uri, plan.storage_options)
    timer = time.monotonic()
    # Carried rows get the new run id and are re-judged against this run's threshold.
    review = "confidence < $threshold"
    new_predictions = contract.select_list("predictions", {
        "run_id": "$run_id", "needs_review": review, "model_name": "$model_name",
        "checkpoint_id": "$checkpoint_id"})
    old_predictions = contract.select_list("predictions", {"run_id": "$run_id", "needs_review": review})
    predictions_sql = f"""
        SELECT {new_predictions} FROM results WHERE error_type IS NULL
        UNION ALL
        SELECT {old_predictions} FROM old_predictions WHERE sample_id IN (SELECT sample_id FROM skip)
        ORDER BY sample_id, image_uri"""
    errors = contract.select_list("errors", {"run_id": "$run_id"})
    errors_sql = f"""
        SELECT {errors} FROM results WHERE error_type IS NOT NULL
        UNION ALL SELECT {errors} FROM list_errors
        UNION ALL SELECT {errors} FROM old_errors WHERE sample_id IN (SELECT sample_id FROM skip)
        ORDER BY sample_id NULLS FIRST, image_uri"""
    thumbnails = contract.select_list("thumbnails", {"run_id": "$run_id"})
    thumbnails_sql = f"""
        SELECT {thumbnails} FROM results WHERE error_type IS NULL
        UNION ALL
        SELECT {thumbnails} FROM old_thumbnails WHERE sample_id IN (SELECT sample_id FROM skip)
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
    per_class = ", ".join(f"count(*) FILTER (WHERE predicted_class = '{c}') AS {col}"
                          for c, col in zip(CLASS_NAMES, count_columns()))
    # Errors without a sample (paths that name none) have no differential to count toward.
    counts = con.sql(f"""
        WITH rows AS (
            SELECT sample_id, predicted_class, needs_review, FALSE AS is_error FROM p
            UNION ALL SELECT sample_id, NULL, FALSE, TRUE FROM e WHERE sample_id IS NOT NULL)
        SELECT sample_id, count(*) AS n_images, count(*) FILTER (WHERE NOT is_error) AS n_classified,
               count(*) FILTER (WHERE is_error) AS n_errors, count(*) FILTER (WHERE needs_review) AS n_review,
               {per_class}
        FROM rows GROUP BY sample_id ORDER BY sample_id""").to_arrow_table()
    diffs = compute_differentials(counts, plan.rules, plan.sample_metadata)
    diffs = diffs.add_column(0, "run_id", pa.array([plan.run_id] * diffs.num_rows, pa.string()))
    schema = contract.differentials_schema()
    diffs = diffs.select(schema.names).cast(schema)
    write_table(pa.RecordBatchReader.from_batches(schema, diffs.to_batches()), schema, fs,
                posixpath.join(plan.staging, "differentials"), plan.cfg.output.rows_per_file)
    (n_pred, n_review), = con.sql("SELECT count(*), count(*) FILTER (WHERE needs_review) FROM p").fetchall()
    (n_errors,), = con.sql("SELECT count(*) FROM e").fetchall()
    plan.stats.update(n_predictions=n_pred, n_review=n_review, n_errors=n_errors, n_samples=diffs.num_rows)
    plan.timings["aggregate"] = time.monotonic() - timer
