"""Tests for the nightly classification job (bloodray.nightly.pipeline) and its outputs (bloodray.nightly.contract).

End-to-end tests use a real local Ray cluster (``ray_cluster``) and a real
S3-compatible server (``s3_bucket``); nothing is mocked. Archives are tiny
(3 samples x 14 cells at 64 px) and one quickly trained checkpoint is shared
by the whole session.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import yaml
from helpers_bad_inputs import MAX_PIXELS_FOR_TESTS, write_bad_inputs, write_bad_tar
from helpers_model import train_quick_checkpoint

from bloodray import storage

from bloodray import cli
from bloodray.data import stages
from bloodray.nightly import aggregate, commit, plan
from bloodray.nightly import config as nightly_config
from bloodray.nightly import pipeline as classify

from bloodray.analysis import query
from bloodray.nightly import contract as outputs
from bloodray.nightly import tables

from bloodray.data import synth as synth
from bloodray.classes import CLASS_NAMES
from bloodray.nightly.pipeline import ClassifyConfig, list_inputs, run_classification
from bloodray.config import ConfigError, load_config
from bloodray.data.preset import EvalPreset
from bloodray.nightly.differential import LOW_WBC_FLAG

REPO = Path(__file__).resolve().parents[1]
SIZE = 64
DATE = "2024-05-01"
DECODE_KINDS = {"empty", "truncated", "corrupt", "not_image", "unsupported_mode", "too_large"}


@pytest.fixture(scope="session")
def trained_checkpoint(tmp_path_factory):
    """A BloodNet that separates synthetic cells (~30 s on 2 cores), shared by the session."""
    return train_quick_checkpoint(tmp_path_factory.mktemp("model") / "checkpoint", size=SIZE)


def _config(archive: str, out: str, checkpoint: str, storage_options: dict, *extra: str) -> ClassifyConfig:
    overrides = [f"input.uri={archive}", f"output.uri={out}", f"model.checkpoint={checkpoint}",
                 f"limits.max_pixels={MAX_PIXELS_FOR_TESTS}", "inference.batch_size=16", f"run.date={DATE}"]
    if storage_options.get("endpoint_url"):
        overrides.append(f"storage.endpoint_url={storage_options['endpoint_url']}")
    return load_config(ClassifyConfig, None, overrides + list(extra))


def _duckdb(out: str, storage_options: dict) -> duckdb.DuckDBPyConnection:
    """DuckDB with each table registered from the Delta format's own reader (deltalake -> pyarrow dataset).

    No bloodray code in the read path: what Spark, Trino or Polars would read. (DuckDB's ``delta``
    extension would read the same log, but cannot be installed offline.)
    """
    from deltalake import DeltaTable

    from bloodray.nightly.tables import delta_storage_options

    fs, root = storage.filesystem(out, storage_options)
    con = duckdb.connect()
    for table in outputs.DELTA_TABLES:
        uri = storage.full_uri(fs, f"{root.rstrip('/')}/{table}")
        if DeltaTable.is_deltatable(uri, storage_options=delta_storage_options(fs, storage_options)):
            con.register(table, DeltaTable(uri, storage_options=delta_storage_options(fs, storage_options))
                         .to_pyarrow_dataset())
    return con


# ---------------------------------------------------------------------------
# Configuration and command line (no Ray).
# ---------------------------------------------------------------------------


def test_nightly_config_loads_with_documented_defaults():
    cfg = load_config(ClassifyConfig, REPO / "configs" / "classify" / "nightly.yaml", ["run.date=2024-05-01"])
    assert cfg.run.date == "2024-05-01"
    assert cfg.review.threshold is None  # effective 0.7 unless the checkpoint sets one
    assert cfg.flags.reference_ranges is None  # the packaged ranges (configs/reference_ranges.yaml shows them)
    assert cfg.model.checkpoint is None
    defaults = ClassifyConfig(input=nightly_config.InputConfig(uri="a"), output=nightly_config.OutputConfig(uri="b"))
    assert defaults.inference.num_gpus == "auto" and defaults.output.rows_per_file == 100_000
    threshold = nightly_config.effective_threshold
    assert threshold(defaults, None) == nightly_config.DEFAULT_REVIEW_THRESHOLD == 0.7
    assert threshold(defaults, 0.55) == 0.55
    defaults.review.threshold = 0.9
    assert threshold(defaults, 0.55) == 0.9


@pytest.mark.parametrize("override, key", [
    ("review.threshold=1.5", "review.threshold"),
    ("run.date=2024/05/01", "run.date"),
    ("run.date=20240501", "run.date"),
    ("run.date=yesterday", "run.date"),
    ("run.run_id=a=b", "run.run_id"),
    ("input.layout=zip", "input.layout"),
    ("input.sample_id_from=grandparent", "input.sample_id_from"),
    ("inference.batch_size=0", "inference.batch_size"),
    ("model.device=tpu", "model.device"),
    ("flags.min_wbc=-1", "flags.min_wbc"),
    ("output.rows_per_file=0", "output.rows_per_file"),
    ("inference.batchsize=8", "inference.batchsize"),
])
def test_invalid_settings_name_the_dotted_key(override, key):
    with pytest.raises(ConfigError, match=rf"^{key.replace('.', r'[.]')}: "):
        load_config(ClassifyConfig, None, ["input.uri=/a", "output.uri=/b", override])


def test_missing_required_keys_and_cli_shortcuts():
    with pytest.raises(ConfigError, match="input, output: required"):
        load_config(ClassifyConfig, None, [])
    import argparse

    parser = argparse.ArgumentParser()
    cli.add_classify_arguments(parser)
    args = parser.parse_args(["--config", str(REPO / "configs" / "classify" / "nightly.yaml"), "--date", "2024-06-02",
                              "--incremental", "--set", "inference.num_gpus=0", "--set", "output.uri=/tmp/x"])
    cfg = cli.classify_config_from_args(args)
    assert (cfg.run.date, cfg.run.incremental, cfg.inference.num_gpus, cfg.output.uri) == \
        ("2024-06-02", True, 0.0, "/tmp/x")


def test_job_script_reports_config_errors_with_exit_code_2(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "jobs" / "classify.py"), "--config",
                           str(REPO / "configs" / "classify" / "nightly.yaml"), "--set", "review.threshold=2"],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 2
    assert "review.threshold: must be in (0, 1)" in proc.stderr


def test_cli_reports_missing_archive(tmp_path, trained_checkpoint, capsys):
    from bloodray import cli

    code = cli.run(["classify", "--set", f"input.uri={tmp_path / 'nowhere'}", "--set", f"output.uri={tmp_path / 'out'}",
                    "--set", f"model.checkpoint={trained_checkpoint}"])
    assert code == 2
    assert str(tmp_path / "nowhere") in capsys.readouterr().err
    assert not (tmp_path / "out" / "runs").exists()


# ---------------------------------------------------------------------------
# Listing and tar streaming (no Ray).
# ---------------------------------------------------------------------------


def _jpeg(seed: int = 0) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def test_listing_assigns_samples_by_parent_or_root(tmp_path):
    for rel in ("S1/a.jpg", "S1/field2/b.PNG", "top.jpg", "S2/notes.txt", "shards/part-0.tar"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    parent = list_inputs(str(tmp_path), "auto", "parent")
    assert sorted((Path(u).relative_to(tmp_path).as_posix(), s) for u, s in parent.files) == \
        [("S1/a.jpg", "S1"), ("S1/field2/b.PNG", "field2")]
    assert [Path(u).name for u in parent.shards] == ["part-0.tar"]
    assert [(Path(e["image_uri"]).name, e["stage"], e["error_type"]) for e in parent.errors] == \
        [("top.jpg", "list", "no_sample_id")]
    assert parent.ignored == 1
    root = list_inputs(str(tmp_path), "folders", "root")
    assert sorted(s for _, s in root.files) == ["S1", "S1"] and root.shards == []
    assert list_inputs(str(tmp_path), "tar").files == []


def test_symlinked_sample_folders_are_followed_and_loops_and_dangling_links_are_error_rows(tmp_path):
    """Issue 23 item 3: a linked sample folder is listed like a real one, under the link's path; nothing is silent."""
    archive, elsewhere = tmp_path / "archive" / "2024-01-01", tmp_path / "elsewhere"
    for rel in ("S1/a.jpg", "S1/b.jpg"):
        (archive / rel).parent.mkdir(parents=True, exist_ok=True)
        (archive / rel).write_bytes(b"x")
    for rel in ("S2/c.jpg", "S2/field/d.jpg", "S2/e.tar"):
        (elsewhere / rel).parent.mkdir(parents=True, exist_ok=True)
        (elsewhere / rel).write_bytes(b"x")
    (archive / "S2").symlink_to(elsewhere / "S2")  # a sample folder kept on another disk
    (archive / "S1" / "loop").symlink_to(archive)  # a link back up: would list the archive forever
    (archive / "S3").symlink_to(archive / "S1")  # a second path to a folder already listed
    (archive / "S4").symlink_to(tmp_path / "unmounted" / "S4")  # dangling: a folder on a disk not mounted
    listing = list_inputs(str(archive), "auto", "root")
    rel = sorted((Path(u).relative_to(archive).as_posix(), s) for u, s in listing.files)
    assert rel == [("S1/a.jpg", "S1"), ("S1/b.jpg", "S1"), ("S2/c.jpg", "S2"), ("S2/field/d.jpg", "S2")]
    assert [Path(u).relative_to(archive).as_posix() for u in listing.shards] == ["S2/e.tar"]
    errors = {Path(e["image_uri"]).relative_to(archive).as_posix(): (e["sample_id"], e["stage"], e["error_type"])
              for e in listing.errors}
    assert errors == {"S1/loop": ("S1", "list", "symlink_loop"), "S3": (None, "list", "linked_folder_listed"),
                      "S4": (None, "list", "broken_link")}
    messages = {Path(e["image_uri"]).name: e["message"] for e in listing.errors}
    assert str(archive) in messages["loop"] and str(archive / "S1") in messages["S3"]
    assert str(tmp_path / "unmounted" / "S4") in messages["S4"]
    assert listing.ignored == 0
    # The date folder itself may be a link (as before).
    (tmp_path / "dates").mkdir()
    (tmp_path / "dates" / "2024-01-01").symlink_to(archive)
    again = list_inputs(str(tmp_path / "dates" / "2024-01-01"), "auto", "root")
    assert len(again.files) == 4 and len(again.errors) == 3


def _tar(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _shard(path: Path, **kw) -> dict[str, list]:
    preset = EvalPreset(SIZE, (0.5,) * 3, (0.5,) * 3)
    args = dict(preset=preset, storage_options={}, sample_id_from="parent", skip_samples=frozenset(), chunk_rows=2)
    args.update(kw)
    batches = list(stages.shard_rows(str(path), **args))
    assert all(len(b["uri"]) <= 2 for b in batches)  # streamed in chunks
    return {k: [v for b in batches for v in b[k]] for k in ("sample_id", "uri", "error_type", "stage")}


def test_tar_shards_stream_members_and_report_broken_shards(tmp_path):
    good = tmp_path / "good.tar"
    good.write_bytes(_tar([("./S1/a.jpg", _jpeg(1)), ("S1/sub/b.jpg", _jpeg(2)), ("S2/c.jpg", _jpeg(3)),
                           ("S2/readme.txt", b"hi"), ("top.jpg", _jpeg(4))]))
    rows = _shard(good)
    assert rows["sample_id"] == ["S1", "sub", "S2", None]
    assert rows["error_type"] == ["", "", "", "no_sample_id"]
    assert rows["uri"][0] == f"{good}#./S1/a.jpg"
    rows = _shard(good, sample_id_from="root", skip_samples=frozenset({"S2"}))
    assert rows["sample_id"] == ["S1", "S1", None]

    cut = tmp_path / "cut.tar"
    with tarfile.open(good) as tar:
        second, third = tar.getmembers()[1:3]
    cut.write_bytes(good.read_bytes()[: second.offset_data + second.size // 2])  # ends inside the second member
    rows = _shard(cut)
    # The cut member, and the shard itself: the members after the cut are lost (issue 14, defect 11).
    assert rows["error_type"] == ["", "truncated", "corrupt_archive"]
    assert rows["uri"][1:] == [f"{cut}#S1/sub/b.jpg", str(cut)]
    cut_header = tmp_path / "cut-header.tar"
    cut_header.write_bytes(good.read_bytes()[: second.offset_data - 100])  # ends inside a member header
    rows = _shard(cut_header)
    assert rows["error_type"][-1] == "corrupt_archive" and rows["uri"][-1] == str(cut_header)
    damaged = bytearray(good.read_bytes())
    damaged[third.offset:third.offset + 512] = b"x" * 512  # a garbage header mid-archive
    (tmp_path / "damaged.tar").write_bytes(bytes(damaged))
    assert _shard(tmp_path / "damaged.tar")["error_type"] == ["", "", "corrupt_archive"]
    empty = tmp_path / "empty.tar"
    empty.write_bytes(b"")
    assert _shard(empty)["error_type"] == ["empty"]
    assert _shard(tmp_path / "missing.tar")["error_type"] == ["unreadable"]


def test_table_writer_splits_files_and_always_leaves_a_schema(tmp_path):
    import fsspec

    fs = fsspec.filesystem("file")
    schema = outputs.errors_schema()
    rows = pa.Table.from_pylist([{"run_id": "r", "image_uri": f"u{i}", "stage": "read"} for i in range(7)],
                                schema=schema)
    assert aggregate.write_table(pa.RecordBatchReader.from_batches(schema, rows.to_batches()), schema, fs,
                                 str(tmp_path / "errors"), rows_per_file=3) == 7
    files = sorted((tmp_path / "errors").glob("*.parquet"))
    assert [pq.read_metadata(f).num_rows for f in files] == [3, 3, 1]
    assert aggregate.write_table(pa.RecordBatchReader.from_batches(schema, []), schema, fs,
                                 str(tmp_path / "empty"), rows_per_file=3) == 0
    assert pq.read_schema(tmp_path / "empty" / "part-0.parquet") == schema


# ---------------------------------------------------------------------------
# End to end.
# ---------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("where", ["local", "s3"])
@pytest.mark.parametrize("layout", ["folders", "tar"])
def test_classify_archive_end_to_end(request, tmp_path, ray_cluster, trained_checkpoint, layout, where):
    root, so = request.getfixturevalue("s3_bucket") if where == "s3" else (str(tmp_path), {})
    day = storage.join(root, "archive", DATE)
    out = storage.join(root, "out")
    samples = synth.default_samples(3, 14, seed=5)  # normal, neutrophilia, normal
    images = synth.write_archive(day, samples, layout=layout, size=SIZE, seed=5, images_per_shard=20,
                                 storage_options=so)
    bad_sample = "S0001" if layout == "folders" else "S0002"
    bad = (write_bad_inputs(day, bad_sample, so) if layout == "folders"
           else write_bad_tar(day, bad_sample, storage_options=so))

    result = run_classification(_config(storage.join(root, "archive"), out, trained_checkpoint, so))

    # Every input appears exactly once, in predictions or in errors.
    preds = query.read_table(out, "predictions", so)
    errors = query.read_table(out, "errors", so)
    seen = Counter(preds.column("image_uri").to_pylist() + errors.column("image_uri").to_pylist())
    assert max(seen.values()) == 1
    assert set(seen) == {r["uri"] for r in images} | set(bad)
    assert result.n_inputs == len(images) + len(bad)
    assert (result.n_predictions, result.n_errors, result.n_samples) == (len(images), len(bad), 3)

    # Each bad input has its own error type, at the right stage.
    got = {r["image_uri"]: (r["stage"], r["error_type"]) for r in errors.to_pylist()}
    assert {u: t for u, (_, t) in got.items()} == bad
    assert all(stage == ("decode" if kind in DECODE_KINDS else "read") for stage, kind in got.values())

    # Predictions: calibrated probabilities per class, review flag from the effective threshold.
    assert preds.schema.field("confidence").type == pa.float32()
    probs = np.stack([preds.column(c).to_numpy() for c in outputs.prob_columns()], axis=1)
    assert np.allclose(probs.sum(axis=1), 1.0, atol=1e-4)
    assert np.allclose(preds.column("confidence").to_numpy(), probs.max(axis=1))
    assert preds.column("needs_review").to_pylist() == [c < 0.7 for c in preds.column("confidence").to_pylist()]
    assert set(preds.column("checkpoint_id").to_pylist()) == {result.checkpoint_id}
    assert all(len(h) == 64 for h in preds.column("image_sha256").to_pylist())

    # The predicted differentials match the known composition of each sample.
    expected = synth.expected_counts(samples)
    diffs = {r["sample_id"]: r for r in query.read_table(out, "differentials", so).to_pylist()}
    assert set(diffs) == set(expected)
    errors_per_sample = Counter(errors.column("sample_id").to_pylist())
    # Tar members whose path escapes the archive belong to no sample.
    assert errors_per_sample[None] == (0 if layout == "folders" else 3)
    assert errors_per_sample[bad_sample] == len(bad) - errors_per_sample[None]
    for sample_id, counts in expected.items():
        row = diffs[sample_id]
        off = sum(abs(row[f"count_{c}"] - counts[c]) for c in CLASS_NAMES)
        assert off <= 2, (sample_id, counts, {c: row[f"count_{c}"] for c in CLASS_NAMES})
        assert row["n_classified"] == sum(counts.values())
        assert row["n_errors"] == errors_per_sample[sample_id]
        assert row["n_images"] == row["n_classified"] + row["n_errors"]
        assert row["flag_low_wbc_count"] and LOW_WBC_FLAG in row["flags"]  # 14 cells < 100
    # 14 cells are too few for a flag to clear its counting-error interval; the percentages still show it.
    assert diffs["S0002"]["pct_neutrophil"] > 60 > diffs["S0001"]["pct_neutrophil"]
    assert diffs["S0002"]["pct_neutrophil_lo"] < diffs["S0002"]["pct_neutrophil"] < diffs["S0002"]["pct_neutrophil_hi"]
    assert not diffs["S0001"]["flag_neutrophil_high"]

    # The Delta tables through the format's own reader, queried with DuckDB; run_date is the partition value.
    con = _duckdb(out, so)
    for table, n in (("predictions", len(images)), ("errors", len(bad)), ("differentials", 3)):
        rows = con.sql(f"SELECT count(*), min(run_date)::VARCHAR, count(DISTINCT run_id) FROM {table}").fetchall()
        assert rows == [(n, DATE, 1)], table
    assert con.sql("SELECT count(*) FROM runs").fetchall() == [(1,)]
    # The files keep the hive layout: pyarrow's plain hive discovery of a single-run folder reads the same rows.
    fs, out_path = storage.filesystem(out, so)
    pa_fs = outputs.arrow_filesystem(fs)
    table = ds.dataset(f"{out_path}/predictions", filesystem=pa_fs, format="parquet", partitioning="hive",
                       exclude_invalid_files=True, ignore_prefixes=["_delta_log", ".", "_"]).to_table()
    assert table.num_rows == len(images) and set(table.column("run_date").to_pylist()) == {DATE}
    for name in outputs.TABLES:
        for path in outputs.parquet_files(fs, f"{out_path}/{name}"):
            assert "run_date" not in pq.read_schema(path, filesystem=pa_fs).names
    assert "run_date" not in pq.read_schema(f"{out_path}/runs/run_date={DATE}/{result.run_id}.parquet",
                                            filesystem=pa_fs).names

    # The manifest describes the run; the config is saved beside it; staging is gone.
    run = tables.visible_runs(out, so).to_pylist()[0]
    assert run["run_id"] == result.run_id and run["status"] == "committed" and run["run_date"] == DATE
    # How the actors ran: this test checkpoint has no self-check batch, so inference.precision=auto keeps fp32.
    assert (run["precision"], run["device"]) == ("fp32", "cpu")
    assert run["committed_at"] >= run["started_at"]
    assert set(json.loads(run["timings_json"])) == {"list", "read_decode_infer", "write", "aggregate", "commit"}
    assert run["input_uri"] == storage.join(root, "archive", DATE)
    assert yaml.safe_load(run["config_yaml"])["limits"]["max_pixels"] == MAX_PIXELS_FOR_TESTS
    assert fs.exists(f"{out_path}/run_configs/run_date={DATE}/{result.run_id}.yaml")
    fs.invalidate_cache()
    assert not [p for p in fs.find(f"{out_path}/_staging")]


@pytest.mark.slow
def test_rerun_crash_and_incremental_runs(s3_bucket, ray_cluster, trained_checkpoint):
    root, so = s3_bucket
    archive, out = storage.join(root, "archive"), storage.join(root, "out")
    day = storage.join(archive, DATE)
    synth.write_archive(day, synth.default_samples(3, 10, seed=7), size=SIZE, seed=7, storage_options=so)
    cfg = _config(archive, out, trained_checkpoint, so)
    fs, out_path = storage.filesystem(out, so)

    def run_dirs(table: str) -> set[str]:
        fs.invalidate_cache()
        return {Path(p).name for p in fs.ls(f"{out_path}/{table}/run_date={DATE}", detail=False)}

    first = run_classification(cfg)
    before = query.read_table(out, "predictions", so).sort_by("image_uri")
    assert before.num_rows == 30

    # A run that dies after staging, even halfway through publishing (data
    # files copied, no Delta commit), is invisible: readers still see the first run.
    crashed = plan.plan_run(cfg)
    classify.stage_run(crashed)
    commit.publish_files(crashed)
    # Its driver dies here: a dead driver's lease is free at once on its own host (elsewhere once it
    # expires); inside this test process that is the lease given up without a commit.
    crashed.lease.release()
    assert run_dirs("predictions") == {first.run_id, crashed.run_id}
    assert tables.visible_runs(out, so).column("run_id").to_pylist() == [first.run_id]
    assert query.read_table(out, "predictions", so).sort_by("image_uri").equals(before)
    con = _duckdb(out, so)
    assert con.sql("SELECT count(*), count(DISTINCT run_id) FROM predictions").fetchall() == [(30, 1)]

    # A rerun of the date replaces it: no duplicates, crashed data removed, superseded files kept for time travel.
    second = run_classification(cfg)
    after = query.read_table(out, "predictions", so)
    assert after.num_rows == 30 and len(set(after.column("image_uri").to_pylist())) == 30
    assert set(after.column("run_id").to_pylist()) == {second.run_id}
    assert all(run_dirs(t) == {first.run_id, second.run_id} for t in outputs.TABLES)
    assert sorted(tables.committed_runs(out, so).column("run_id").to_pylist()) == sorted([first.run_id, second.run_id])
    fs.invalidate_cache()
    assert not fs.exists(f"{out_path}/_staging/{crashed.run_id}")

    # Incremental: only the new sample is read; the others are carried over.
    synth.write_archive(day, [synth.SampleSpec("S0100", {"neutrophil": 5, "lymphocyte": 3})], size=SIZE, seed=8,
                        storage_options=so)
    inc = run_classification(_config(archive, out, trained_checkpoint, so, "run.incremental=true"))
    assert inc.incremental_skipped_samples == 3
    assert inc.n_inputs == 8 and inc.n_predictions == 38 and inc.n_samples == 4
    preds = query.read_table(out, "predictions", so)
    assert set(preds.column("run_id").to_pylist()) == {inc.run_id}
    carried = preds.filter(pa.compute.not_equal(preds.column("sample_id"), "S0100")).sort_by("image_uri")
    keep = ["image_uri", "image_sha256", "predicted_class", "confidence"]
    assert carried.select(keep).equals(after.sort_by("image_uri").select(keep))
    diffs = {r["sample_id"]: r for r in query.read_table(out, "differentials", so).to_pylist()}
    assert sorted(diffs) == ["S0001", "S0002", "S0003", "S0100"]
    assert diffs["S0100"]["n_classified"] == 8
    run = tables.visible_runs(out, so).to_pylist()[0]
    assert (run["run_id"], run["carried_from_run_id"], run["incremental_skipped_samples"]) == \
        (inc.run_id, second.run_id, 3)
    assert all(run_dirs(t) == {first.run_id, second.run_id, inc.run_id} for t in outputs.TABLES)
    assert all(set(tables.read(out, t, so).column("run_id").to_pylist()) <= {inc.run_id} for t in outputs.TABLES)

    # Nothing new: an incremental rerun reads nothing (no Ray work) and still publishes a complete run.
    again = run_classification(_config(archive, out, trained_checkpoint, so, "run.incremental=true"))
    assert (again.n_inputs, again.n_predictions, again.incremental_skipped_samples) == (0, 38, 4)
    assert query.read_table(out, "differentials", so).num_rows == 4


def test_visible_run_is_latest_committed_manifest(tmp_path):
    """Reader semantics on hand-written files: no Delta commit, no rows; the latest commit wins."""
    out = str(tmp_path)
    t0 = np.datetime64("2024-05-02T01:00:00", "us")

    def write_run(run_id: str, minutes: int | None, n: int) -> None:
        part = tmp_path / "predictions" / f"run_date={DATE}" / run_id
        part.mkdir(parents=True)
        table = outputs.predictions_schema().empty_table().to_pylist()
        rows = [{f.name: None for f in outputs.predictions_schema()} | {"run_id": run_id, "image_uri": f"u{i}"}
                for i in range(n)]
        pq.write_table(pa.Table.from_pylist(table + rows, schema=outputs.predictions_schema()),
                       part / "part-0.parquet")
        if minutes is not None:  # committed: the date's predictions replaced, then the manifest appended
            manifest = {f.name: None for f in outputs.runs_schema()} | {
                "run_id": run_id, "status": "committed", "committed_at": (t0 + np.timedelta64(minutes, "m")).item()}
            path = tmp_path / "runs" / f"run_date={DATE}" / f"{run_id}.parquet"
            path.parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(pa.Table.from_pylist([manifest], schema=outputs.runs_schema()), path)
            tables.commit_files(out, "predictions", DATE, run_id, [str(part / "part-0.parquet")], replace_date=True)
            tables.commit_files(out, "runs", DATE, run_id, [str(path)], replace_date=False)

    assert query.read_table(out, "predictions").num_rows == 0
    write_run("b-later-id-earlier-commit", 5, 2)
    write_run("a-earlier-id-later-commit", 10, 3)
    write_run("c-crashed", None, 7)
    assert tables.visible_runs(out).column("run_id").to_pylist() == ["a-earlier-id-later-commit"]
    got = query.read_table(out, "predictions")
    assert got.num_rows == 3 and {d.isoformat() for d in got.column("run_date").to_pylist()} == {DATE}  # a date
    assert query.read_table(out, "predictions", run_date="2099-01-01").num_rows == 0
    assert tables.committed_runs(out).num_rows == 2
    with pytest.raises(ValueError, match="unknown table 'predicitons'"):
        query.read_table(out, "predicitons")
