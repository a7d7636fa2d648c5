"""Issue 23's guards: a sealed query sandbox, bounded reads of every config-named file, formula-safe CSV,
and one clear line for each failure of item 11 (SET hints, huge CSV fields, SIGTERM, a silent S3 endpoint).
"""

from __future__ import annotations

import csv
import io
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bloodray import csv_io, storage
from bloodray.analysis import query
from bloodray.analysis.formats import format_table
from bloodray.bounded_read import InputReadError, read_file
from bloodray.config import ConfigError, StorageConfig, read_yaml
from bloodray.nightly import tables
from bloodray.nightly.differential import ReferenceRangeError, load_flag_rules
from bloodray.nightly.sample_metadata import SampleMetadataError, load_sample_metadata

from test_cli import bloodray
from test_query_report import D1, _manifest, _predictions, _ts, build_tree

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "bloodray"


# --------------------------------------------------------------------------- item 5: no temp directory
def test_query_sandbox_has_no_writable_temp_directory(tmp_path, monkeypatch):
    """DuckDB exempts its temp directory (<cwd>/.tmp) from enable_external_access; the sandbox has none."""
    build_tree(str(tmp_path / "out"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".tmp").mkdir()
    (tmp_path / ".tmp" / "other.csv").write_text("secret\n")
    attacks = ["COPY (SELECT 1 AS a) TO '.tmp/x.csv'",
               f"COPY (SELECT 1 AS a) TO '{tmp_path}/.tmp/x.csv'",
               "COPY (SELECT 2 AS a) TO '.tmp/other.csv'",
               "SELECT * FROM read_text('.tmp/*')",
               "SELECT * FROM read_csv('.tmp/other.csv')"]
    for sql in attacks:
        with pytest.raises(query.QueryError, match="refused") as info:
            query.run_query("out", sql)
        assert "\n" not in str(info.value)
    assert sorted(p.name for p in (tmp_path / ".tmp").iterdir()) == ["other.csv"]
    assert (tmp_path / ".tmp" / "other.csv").read_text() == "secret\n"
    con = query.connect("out")
    try:
        assert con.execute("SELECT current_setting('temp_directory')").fetchone()[0] == ""
        # Ordinary queries still work without a temp directory.
        assert con.execute("SELECT count(*) FROM predictions").fetchone()[0] == 18
    finally:
        con.close()


# --------------------------------------------------------------------------- item 6: --out under the root
def test_query_out_refuses_anything_under_the_output_root(tmp_path):
    out = tmp_path / "out"
    build_tree(str(out))
    (out / "reviews" / "_delta_log").mkdir(parents=True)
    log_file = out / "reviews" / "_delta_log" / "00000000000000000009.json"
    targets = [log_file, out / "_commits" / "x.json", out / "_leases" / "2024-03-01.json", out / "notes.csv",
               out / "reports" / "q.csv", out]
    sql = "SELECT run_date, run_id FROM runs"
    for target in targets:
        with pytest.raises(query.QueryError) as info:
            query.export(str(out), sql, fmt="json", out=str(target))
        message = str(info.value)
        assert "\n" not in message and str(target) in message and "output root" in message
    assert not log_file.exists() and not (out / "_commits").exists() and not (out / "notes.csv").exists()
    # Through a symlink that leads back into the root, too.
    (tmp_path / "alias").symlink_to(out, target_is_directory=True)
    with pytest.raises(query.QueryError, match="output root"):
        query.export(str(out), sql, fmt="csv", out=str(tmp_path / "alias" / "_leases" / "x"))
    # The command: one line, exit 2; a file beside the root is fine.
    proc = bloodray("query", sql, "--output", "out", "--format", "json", "--out",
                    "out/reviews/_delta_log/00000000000000000009.json", cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "00000000000000000009.json" in proc.stderr
    assert not log_file.exists()
    table, _ = query.export(str(out), sql, fmt="csv", out=str(tmp_path / "beside.csv"))
    assert table.num_rows == 2 and (tmp_path / "beside.csv").exists()


# --------------------------------------------------------------------------- item 8: config-named files
def _fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


@pytest.mark.parametrize("kind", ["dev_zero", "fifo", "directory", "too_large"])
def test_config_named_files_are_read_with_the_archive_guards(tmp_path, kind):
    """/dev/zero used to grow the process to the OOM killer; a FIFO blocked forever. Now: one line, at once."""
    target = tmp_path / "named.csv"  # .csv: what flags.sample_metadata accepts
    if kind == "dev_zero":
        target.symlink_to("/dev/zero")
    elif kind == "fifo":
        _fifo(target)
    elif kind == "directory":
        target.mkdir()
    else:
        with open(target, "wb") as fh:
            fh.truncate(65 * 2**20)  # sparse: over the 64 MiB cap without writing it
    expected = "size limit" if kind == "too_large" else "not a regular file"
    started = time.monotonic()
    for load, error in ((lambda: load_flag_rules(str(target)), ReferenceRangeError),
                        (lambda: load_sample_metadata(str(target)), SampleMetadataError),
                        (lambda: read_yaml(target), ConfigError)):
        with pytest.raises(error) as info:
            load()
        message = str(info.value)
        assert "\n" not in message and str(target) in message and re.search(expected, message), message
    assert time.monotonic() - started < 10


def test_read_file_guards_name_the_role_and_time_out_on_a_silent_server(tmp_path, silent_endpoint):
    good = tmp_path / "ranges.yaml"
    good.write_text("reference_ranges: {}\n")
    assert read_file(str(good), what="flags.reference_ranges") == b"reference_ranges: {}\n"
    with pytest.raises(InputReadError) as info:
        read_file("/dev/zero", what="flags.reference_ranges")
    assert info.value.kind == "not_regular_file" and str(info.value).startswith("flags.reference_ranges /dev/zero:")
    # An object store that accepts the connection and never answers: the read timeout, not a hang.
    opts = StorageConfig(endpoint_url=silent_endpoint, connect_timeout_s=1, read_timeout_s=1,
                         options={"config_kwargs": {"retries": {"mode": "legacy", "max_attempts": 0}}}
                         ).storage_options()
    started = time.monotonic()
    with pytest.raises((InputReadError, storage.StorageError)) as info:
        read_file("s3://bucket/ranges.yaml", opts, what="flags.reference_ranges", timeout_s=20)
    assert time.monotonic() - started < 15
    assert "flags.reference_ranges s3://bucket/ranges.yaml" in str(info.value) and "\n" not in str(info.value)


def test_classify_refuses_dev_zero_reference_ranges_in_one_line(tmp_path):
    proc = bloodray("classify", "--set", "input.uri=in", "--set", "output.uri=out", "--set",
                    "flags.reference_ranges=/dev/zero", cwd=tmp_path, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and "/dev/zero" in proc.stderr and "not a regular file" in proc.stderr


# --------------------------------------------------------------------------- item 9: formula-safe CSV
HOSTILE = ['=HYPERLINK("http://evil.example/x","click")', "+1+cmd", "-2+3", "@SUM(A1)", "\tTAB", "\rCR",
           "=cmd|' /C calc'!A0"]


def test_csv_cells_that_spreadsheets_would_evaluate_are_neutralised():
    for value in HOSTILE:
        assert csv_io.neutralise(value) == "'" + value
        assert csv_io.restore(csv_io.neutralise(value)) == value
    for value in ("S1", "neutrophil", "s3://in/S1/a.jpg", "", "'quoted", 3, -0.5, None):
        assert csv_io.neutralise(value) == value
    table = pa.table({"sample_id": HOSTILE, "n": list(range(-3, len(HOSTILE) - 3)),
                      "x": [-0.5] * len(HOSTILE)})
    rows = list(csv.reader(io.StringIO(format_table(table, "csv"), newline="")))
    assert [r[0] for r in rows[1:]] == ["'" + v for v in HOSTILE]
    assert [r[1] for r in rows[1:]] == [str(n) for n in range(-3, len(HOSTILE) - 3)]  # numbers stay numbers
    assert all(r[2] == "-0.5" for r in rows[1:])


def test_every_csv_writer_goes_through_the_one_helper():
    """No module but bloodray/csv_io.py makes a csv writer: every CSV bloodray writes is formula-safe."""
    offenders = [f"{p.relative_to(REPO)}:{n}" for p in PACKAGE.rglob("*.py") if p.name != "csv_io.py"
                 for n, line in enumerate(p.read_text().splitlines(), 1)
                 if re.search(r"csv\.(writer|DictWriter)\(|\.to_csv\(|pyarrow\.csv|write_csv\(", line)]
    assert not offenders, offenders


def _hostile_tree(root: Path, sample: str) -> None:
    """One committed run of D1 whose sample folder name is a formula."""
    run_id = "run-hostile"
    preds = _predictions(run_id, [sample], 3, review_every=1)
    files = []
    for rel, table in ((f"predictions/run_date={D1}/{run_id}/part-0.parquet", preds),
                       (f"runs/run_date={D1}/{run_id}.parquet",
                        _manifest(run_id, D1, _ts(1), 3, 0, 1).drop_columns(["run_date"]))):
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, path)
        files.append((rel.split("/")[0], str(path)))
    for table, path in files:
        tables.commit_files(str(root), table, D1, run_id, [path], replace_date=table != "runs")


def test_review_csv_and_query_csv_neutralise_folder_names_and_reviewer_values(tmp_path):
    from bloodray.review.records import import_decisions
    from bloodray.review.roundtrip import CSV_FILE, export_review

    out = tmp_path / "out"
    sample = HOSTILE[0]
    _hostile_tree(out, sample)
    export_review(str(out), D1, str(tmp_path / "review"))
    text = (tmp_path / "review" / CSV_FILE).read_text()
    rows = list(csv.DictReader(text.splitlines()))
    assert rows and all(r["sample_id"] == "'" + sample for r in rows)
    assert not any(cell.startswith(tuple("=+-@")) for r in rows for cell in r.values())
    # A reviewer fills it in with a formula as their name; the import undoes the escapes and keeps the value.
    filled = [dict(r, verified_class="neutrophil", reviewer=csv_io.neutralise("=cmd|' /C calc'!A0")) for r in rows]
    with open(tmp_path / "filled.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(filled)
    import_decisions(str(out), D1, str(tmp_path / "filled.csv"))
    result = query.run_query(str(out), "SELECT reviewer FROM reviews")
    assert set(result.column("reviewer").to_pylist()) == {"=cmd|' /C calc'!A0"}
    proc = bloodray("query", "SELECT reviewer, sample_id FROM reviews",
                    "--output", "out", "--format", "csv", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    printed = list(csv.reader(proc.stdout.splitlines()))[1:]
    assert printed and all(r == ["'=cmd|' /C calc'!A0", "'" + sample] for r in printed)


# --------------------------------------------------------------------------- item 11: one clear line
def test_huge_csv_field_is_one_line_naming_the_file(tmp_path):
    from bloodray.review.decisions import ReviewError, parse_review_csv

    text = "run_id,image_uri,verified_class\nr," + "x" * 200_000 + ",neutrophil\n"
    with pytest.raises(ReviewError) as info:
        parse_review_csv(text, "review.csv", "ann")
    assert "\n" not in str(info.value) and "review.csv: line" in str(info.value) and "131,072" in str(info.value)
    meta = tmp_path / "meta.csv"
    meta.write_text("sample_id,wbc_count_10e9_per_l\nS1," + "9" * 200_000 + "\n")
    with pytest.raises(SampleMetadataError) as info:
        load_sample_metadata(str(meta))
    assert "\n" not in str(info.value) and str(meta) in str(info.value) and "131,072" in str(info.value)


def test_query_errors_never_suggest_a_locked_setting(tmp_path):
    build_tree(str(tmp_path / "out"))
    with pytest.raises(query.QueryError) as info:
        query.run_query(str(tmp_path / "out"), "SELECT 1 // 0")
    message = str(info.value)
    assert "Division by zero" in message and "TRY(" in message
    assert not re.search(r"\bSET\s+\w+\s*=", message) and "settings cannot be changed" in message


def test_query_stopped_by_sigterm_says_so_in_one_line(tmp_path):
    build_tree(str(tmp_path / "out"))
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-m", "bloodray", "query",
                             "SELECT count(*) FROM range(100000000000) a, range(10) b", "--output", "out"],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(12)  # imports and the views; then the query runs for hours
        assert proc.poll() is None
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert time.monotonic() - started < 30
    assert proc.returncode == 143
    assert err == "bloodray query: stopped by SIGTERM\n"


@pytest.fixture
def silent_endpoint():
    """``http://127.0.0.1:<port>``: a TCP server that accepts every connection and never answers."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    held, stop = [], threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    stop.set()
    thread.join(5)
    for conn in held:
        conn.close()
    server.close()


def test_storage_timeouts_are_config_keys_applied_to_every_s3_filesystem(silent_endpoint):
    cfg = StorageConfig(endpoint_url=silent_endpoint)
    opts = cfg.storage_options()
    assert (opts["config_kwargs"]["connect_timeout"], opts["config_kwargs"]["read_timeout"]) == (10.0, 60.0)
    fs, _ = storage.filesystem("s3://bucket/out", {"endpoint_url": silent_endpoint})
    assert (fs.config_kwargs["connect_timeout"], fs.config_kwargs["read_timeout"], fs.retries) == (10.0, 60.0, 1)
    delta = tables.delta_storage_options(fs, opts)
    assert (delta["connect_timeout"], delta["timeout"]) == ("10000ms", "60000ms")
    with pytest.raises(ConfigError, match="storage.read_timeout_s"):
        StorageConfig(read_timeout_s=0).validate("storage")

    # The silent endpoint, as `bloodray query` meets it: one line naming the URI and the keys, in seconds.
    opts = StorageConfig(endpoint_url=silent_endpoint, connect_timeout_s=1, read_timeout_s=1).storage_options()
    opts["config_kwargs"]["retries"] = {"mode": "legacy", "max_attempts": 1}
    started = time.monotonic()
    with pytest.raises(storage.StorageError) as info:
        query.connect("s3://bucket/out", opts)
    elapsed = time.monotonic() - started
    message = str(info.value)
    assert "\n" not in message and "s3://bucket/out" in message and "storage.read_timeout_s" in message, message
    assert elapsed < 20, elapsed


DRIVER = """
import sys, time
from bloodray import logs
logs.init_ray(num_cpus=1, include_dashboard=False)
print("READY", flush=True)
time.sleep(600)
"""


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir("/proc"), reason="the watchdog reads /proc (Linux)")
def test_ray_processes_end_soon_after_their_driver_is_sigkilled(tmp_path):
    """DashboardAgent and RuntimeEnvAgent outlived a SIGKILLed driver by a minute or more; now a few seconds."""
    from bloodray import ray_watchdog

    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("RAY_ADDRESS", None)
    driver = subprocess.Popen([sys.executable, "-c", DRIVER], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True)
    started: dict[int, str] = {}
    try:
        assert driver.stdout.readline().strip() == "READY"
        deadline = time.monotonic() + 60
        names: list[str] = []
        while time.monotonic() < deadline and not any("RuntimeEnvAgent" in n for n in names):
            time.sleep(1)
            started = ray_watchdog.ray_processes(driver.pid)
            names = [Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace") for pid in started
                     if Path(f"/proc/{pid}/cmdline").exists()]
        assert any("raylet" in n for n in names) and any("RuntimeEnvAgent" in n for n in names), names
        time.sleep(2)  # let the watchdog take its next look
        driver.kill()
        driver.wait(30)
        killed = time.monotonic()
        left = started
        while left and time.monotonic() - killed < 40:
            time.sleep(0.5)
            left = {p: s for p, s in started.items() if (ray_watchdog._stat(p) or (0, ""))[1] == s}
        assert not left, f"still running {time.monotonic() - killed:.0f} s after the driver's SIGKILL: {left}"
        assert time.monotonic() - killed < 15
    finally:
        if driver.poll() is None:
            driver.kill()
        for pid, start in started.items():  # only processes this driver started
            if (ray_watchdog._stat(pid) or (0, ""))[1] == start:
                os.kill(pid, signal.SIGKILL)


def test_model_device_without_the_device_is_one_line(tmp_path, ray_cluster, capsys):
    """It used to be a long Ray traceback from every model actor, asking to report a Ray bug."""
    from bloodray import cli
    from bloodray.data import synth

    synth.write_archive(str(tmp_path / "in"), [synth.SampleSpec("S1", {"neutrophil": 2})], size=64, seed=1)
    for device in ("cuda", "cuda:1", "mps"):
        code = cli.run(["classify", "--set", f"input.uri={tmp_path / 'in'}", "--set", f"output.uri={tmp_path / 'out'}",
                        "--set", f"model.device={device}", "--quiet"])
        err = capsys.readouterr().err
        assert code == 2, err
        assert err.count("\n") == 1 and f"model.device={device}:" in err and "Traceback" not in err, err


# --------------------------------------------------------------------------- item 7: decode budget
def test_decode_budget_turns_scan_bombs_into_error_rows(tmp_path):
    from bloodray.data.decode import DecodeBudget, ImageDecodeError, decode_image, jpeg_scans
    from bloodray.data.synth import scan_bomb_jpeg
    from bloodray.data.preset import EvalPreset
    from bloodray.data.stages import ReadLimits, read_decode_files

    normal = scan_bomb_jpeg(0)
    assert jpeg_scans(normal) == 10 and decode_image(normal).size == (128, 128)
    bomb = scan_bomb_jpeg(60_000)  # 60,010 scans x 16,384 px: ~1 s of a core, 4 MB
    started = time.monotonic()
    with pytest.raises(ImageDecodeError) as info:
        decode_image(bomb)
    assert info.value.kind == "decode_budget" and "limits.max_decode_work" in str(info.value)
    assert time.monotonic() - started < 0.5  # refused from the header, before decoding
    # Under the work budget, the clock stops it.
    started = time.monotonic()
    with pytest.raises(ImageDecodeError) as info:
        decode_image(bomb, budget=DecodeBudget(max_work=10**15, timeout_s=0.05))
    assert info.value.kind == "decode_budget" and "limits.decode_timeout_s" in str(info.value)
    assert time.monotonic() - started < 0.6

    # In the read+decode stage: an error row with the reason, the other images classified.
    paths = []
    for name, data in (("ok.jpg", normal), ("bomb.jpg", bomb)):
        (tmp_path / name).write_bytes(data)
        paths.append(str(tmp_path / name))
    preset = EvalPreset(input_size=64, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    out = read_decode_files({"uri": np.array(paths, dtype=object)}, preset=preset, limits=ReadLimits())
    assert list(out["error_type"]) == ["", "decode_budget"]
    assert out["stage"][1] == "decode" and "pixel-scans" in out["message"][1]
