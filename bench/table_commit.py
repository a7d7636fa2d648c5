"""How long a run's Delta commits take: the window in which a crash leaves the tables disagreeing.

Run from the repository root (a minute or two)::

    .venv/bin/python bench/table_commit.py                 # local disk and the moto S3 server
    .venv/bin/python bench/table_commit.py --nights 10 --files 4

For each of ``--nights`` dates, one run's files are put in place (``--files``
Parquet files per data table, with the contract's schemas, plus the manifest)
and then committed exactly as the classify job commits them
(:func:`bloodray.nightly.tables.apply_intent`: one Delta commit per data
table, the manifest last). Reported per store: median and max seconds from
the first table commit to the manifest commit (the window in which a crash
leaves tables that disagree until the next run of the date), and the
time of a cold read of the predictions table through the Delta log. The S3
store is moto on loopback, a separate process: no network latency, so real
S3 adds its round trips (5 commits of a few requests each). Writes
``bench/results/table_commit.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import posixpath
import statistics
import tempfile
import time
import uuid

import pyarrow as pa

from _common import MotoS3, facts_markdown, machine_facts, run_facts, save, table
from bloodray import storage
from bloodray.nightly import contract, tables


def _rows(table_name: str, run_id: str, n: int) -> pa.Table:
    """``n`` rows of a data table with its contract schema (nulls except the ids)."""
    schema = contract.SCHEMAS[table_name]()
    return pa.Table.from_pylist([{"run_id": run_id, "sample_id": f"S{i % 10}", "image_uri": f"u{i}"}
                                 if "image_uri" in schema.names else {"run_id": run_id, "sample_id": f"S{i}"}
                                 for i in range(n)], schema=schema)


def one_store(out: str, so, nights: int, files: int) -> dict:
    fs, root = contract.output_root(out, so)
    windows = []
    for night in range(nights):
        run_date = (dt.date(2026, 1, 1) + dt.timedelta(days=night)).isoformat()
        run_id = f"bench-{night}-{uuid.uuid4().hex[:6]}"
        placed: dict[str, list[str]] = {}
        for name in tables.COMMIT_ORDER:
            target = contract.partition_dir(root, name, run_date, run_id)
            paths = []
            for k in range(files):
                path = posixpath.join(target, f"part-{k}.parquet")
                storage.put_bytes(fs, path, storage.parquet_bytes(_rows(name, run_id, 500)))
                paths.append(posixpath.relpath(path, root))
            placed[name] = paths
        manifest = contract.manifest_path(root, run_date, run_id)
        storage.put_bytes(fs, manifest, storage.parquet_bytes(pa.Table.from_pylist(
            [{"run_id": run_id, "status": contract.COMMITTED, "committed_at": dt.datetime.now(dt.timezone.utc)}],
            schema=contract.runs_schema())))
        placed[contract.RUNS] = [posixpath.relpath(manifest, root)]
        t0 = time.perf_counter()
        tables.apply_intent(out, {"run_id": run_id, "run_date": run_date, "files": placed}, so)
        windows.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    n = tables.read(out, "predictions", so).num_rows
    read_s = time.perf_counter() - t0
    return {"commit_window_s": {"median": statistics.median(windows), "max": max(windows),
                                "first": windows[0]},
            "cold_read_predictions_s": read_s, "rows_read": n}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nights", type=int, default=10)
    parser.add_argument("--files", type=int, default=4, help="Parquet files per data table per run")
    args = parser.parse_args()
    result = {"machine": machine_facts(), "run": run_facts(), "nights": args.nights, "files": args.files,
              "stores": {}}
    with tempfile.TemporaryDirectory() as tmp:
        result["stores"]["local"] = one_store(f"{tmp}/out", None, args.nights, args.files)
    with MotoS3() as s3:
        bucket = f"bench-{uuid.uuid4().hex[:8]}"
        s3.filesystem().mkdir(bucket)
        result["stores"]["s3 (moto, loopback)"] = one_store(f"s3://{bucket}/out", s3.storage_options, args.nights,
                                                             args.files)
    rows = [[store, f"{r['commit_window_s']['median']:.3f}", f"{r['commit_window_s']['max']:.3f}",
             f"{r['commit_window_s']['first']:.3f}", f"{r['cold_read_predictions_s']:.3f}", r["rows_read"]]
            for store, r in result["stores"].items()]
    markdown = (f"# Delta commit window of a run ({args.nights} nights, {args.files} files per table)\n\n"
                + table(["store", "median s", "max s", "first night s (creates the tables)",
                         "cold read of predictions s", "rows"], rows)
                + "\n" + facts_markdown(result))
    print(markdown)
    save("table_commit", result, markdown)


if __name__ == "__main__":
    main()
