"""The ``bloodray`` command as a user runs it: from a directory outside the repository, read-only queries.

Most commands run as a subprocess (``python -m bloodray``) with the working
directory set to ``tmp_path``, so nothing may depend on ``configs/`` being
next to the caller. The query lock-down cases (issue 14, defect 2) run against
a committed output tree on local disk and on the moto S3 server.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bloodray import __version__, cli, storage
from bloodray.analysis import query
from bloodray.defaults import packaged_configs

from test_query_report import D1, NEW, build_tree

REPO = Path(__file__).resolve().parents[1]


def bloodray(*args: str, cwd: Path, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run ``python -m bloodray ARGS`` in ``cwd`` with this checkout's package first on the path."""
    full_env = dict(os.environ if env is None else env)
    full_env["PYTHONPATH"] = os.pathsep.join([str(REPO), full_env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return subprocess.run([sys.executable, "-m", "bloodray", *args], cwd=cwd, env=full_env, capture_output=True,
                          text=True, timeout=timeout)


# --------------------------------------------------------------------------- packaging and help
def test_packaged_configs_are_the_configs_folder():
    """bloodray/defaults/ (what commands use without --config) and configs/ (what users edit) must not drift."""
    folder = sorted(p.relative_to(REPO / "configs").as_posix() for p in (REPO / "configs").rglob("*.yaml"))
    assert packaged_configs() == folder
    for name in folder:
        assert (REPO / "bloodray" / "defaults" / name).read_bytes() == (REPO / "configs" / name).read_bytes(), \
            f"bloodray/defaults/{name} differs from configs/{name}: copy the edited one over the other"


def test_version_help_and_models_from_outside_the_repo(tmp_path):
    proc = bloodray("--version", cwd=tmp_path)
    assert proc.returncode == 0 and proc.stdout.strip() == f"bloodray {__version__}"

    proc = bloodray("--help", cwd=tmp_path)
    assert proc.returncode == 0
    description = proc.stdout.split("\n\n")[1]
    assert description.startswith("bloodray classifies peripheral blood cell images")
    assert "Research use only" in proc.stdout and "Subcommands:" not in proc.stdout

    proc = bloodray("models", cwd=tmp_path)
    assert proc.returncode == 0 and "bloodnet" in proc.stdout and proc.stderr == ""


def test_default_configs_load_from_any_directory(tmp_path, monkeypatch):
    from bloodray.demo import load_demo_config
    from bloodray.nightly.config import ClassifyConfig
    from bloodray.config import load_config
    from bloodray.train.compare import load_compare_config
    from bloodray.train.ray_trainer import load_train_config

    monkeypatch.chdir(tmp_path)
    parser = cli.build_parser()
    train = parser.parse_args(["train"])
    assert Path(train.config).is_file() and load_train_config(train.config, []).model.name == "bloodnet"
    classify = parser.parse_args(["classify", "--set", "input.uri=in", "--set", "output.uri=out"])
    cfg = cli.classify_config_from_args(classify)
    assert cfg.flags.reference_ranges is None and cfg.output.uri == "out"
    assert load_demo_config(parser.parse_args(["demo"]).config, []).workdir == "demo-output"
    assert load_compare_config(parser.parse_args(["compare"]).config, []).models
    # A --config given by the user is relative to the working directory.
    (tmp_path / "mine.yaml").write_text("input: {uri: here}\noutput: {uri: there}\n")
    mine = load_config(ClassifyConfig, parser.parse_args(["classify", "--config", "mine.yaml"]).config)
    assert (mine.input.uri, mine.output.uri) == ("here", "there")
    code = cli.run(["classify", "--config", "missing.yaml"])
    assert code == 2


def test_logging_levels_and_ray_settings(capsys, monkeypatch):
    import logging
    import warnings

    from bloodray import logs

    monkeypatch.setattr(logs, "_verbosity", None)
    monkeypatch.delenv("RAY_DATA_LOG_LEVEL", raising=False)
    assert logs.ray_init_kwargs() == {}  # a library user keeps Ray's defaults
    log = logging.getLogger("bloodray.nightly.pipeline")

    logs.setup_logging(logs.QUIET)
    log.info("progress line")
    log.warning("something odd in s3://b/x")
    with logs.progress(total=3, desc="classify") as bar:
        bar.update(3)
    assert capsys.readouterr().err == "bloodray WARNING: something odd in s3://b/x\n"

    logs.setup_logging(logs.DEFAULT)
    log.info("run %s: classifying", "r1")
    log.debug("details")
    warnings.warn("s3://b/runs/x.parquet: unreadable run manifest", UserWarning)
    assert capsys.readouterr().err.splitlines() == [
        "bloodray: run r1: classifying", "bloodray WARNING: s3://b/runs/x.parquet: unreadable run manifest"]
    assert logs.ray_init_kwargs() == {"log_to_driver": False, "logging_level": logging.WARNING}
    assert os.environ["RAY_DATA_LOG_LEVEL"] == "WARNING"

    logs.setup_logging(logs.VERBOSE)
    log.debug("details")
    assert capsys.readouterr().err == "bloodray DEBUG: details\n"
    assert logs.ray_init_kwargs() == {} and "RAY_DATA_LOG_LEVEL" not in os.environ
    # Flags before or after the command.
    assert cli.build_parser().parse_args(["-q", "models"]).verbosity == logs.QUIET
    assert cli.build_parser().parse_args(["models", "--verbose"]).verbosity == logs.VERBOSE
    assert cli.build_parser().parse_args(["models"]).verbosity == logs.DEFAULT


# --------------------------------------------------------------------------- read-only query
ATTACKS = {
    "copy_over_committed": "COPY (SELECT * FROM predictions LIMIT 0) TO '{victim}' (FORMAT parquet)",
    "copy_no_tmp_file": "COPY (SELECT * FROM predictions LIMIT 0) TO '{victim}' (FORMAT parquet, USE_TMP_FILE false)",
    "copy_new_file": "COPY (SELECT 1 AS a) TO '{root}/predictions/x.csv'",
    "attach": "ATTACH '{scratch}/other.duckdb' AS other",
    "read_csv": "SELECT * FROM read_csv('/etc/passwd')",
    "read_text": "SELECT * FROM read_text('/etc/hostname')",
    "read_blob": "SELECT * FROM read_blob('{victim}')",
    "read_parquet_committed": "SELECT count(*) FROM read_parquet('{victim}')",
    "replacement_scan": "SELECT count(*) FROM '{victim}'",
    "glob": "SELECT * FROM glob('/root/**')",
    "install": "INSTALL httpfs",
    "load": "LOAD httpfs",
    "unlock_external": "SET enable_external_access = true",
    "unlock_config": "SET lock_configuration = false",
    "reset_lock": "RESET lock_configuration",
    "export_database": "EXPORT DATABASE '{scratch}/dump'",
}


def _victim(uri: str, opts) -> tuple[str, bytes]:
    """A committed predictions file of the visible D1 run, and its bytes."""
    fs, root = storage.filesystem(uri, opts)
    fs.invalidate_cache()
    path = sorted(fs.glob(f"{root}/predictions/run_date={D1}/{NEW}/*.parquet"))[0]
    return storage.full_uri(fs, path), fs.cat_file(path)


@pytest.fixture(params=["local", "s3"])
def committed_root(request, tmp_path):
    if request.param == "local":
        uri, opts = str(tmp_path / "out"), None
    else:
        bucket_uri, opts = request.getfixturevalue("s3_bucket")
        uri = f"{bucket_uri}/nightly/out"
    build_tree(uri, opts)
    return uri, opts


def test_query_refuses_files_extensions_and_settings(committed_root, tmp_path):
    uri, opts = committed_root
    victim, before = _victim(uri, opts)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    for name, sql in ATTACKS.items():
        sql = sql.format(victim=victim, root=uri, scratch=scratch)
        with pytest.raises(query.QueryError) as info:
            query.run_query(uri, sql, opts)
        message = str(info.value)
        assert "\n" not in message, name
        assert "refused" in message and "read-only" in message, (name, message)
    assert _victim(uri, opts)[1] == before
    assert list(scratch.iterdir()) == []
    fs, root = storage.filesystem(uri, opts)
    fs.invalidate_cache()
    assert not fs.exists(f"{root}/predictions/x.csv")

    # The same through the command: one line on stderr, exit 2, nothing written.
    args = ["query", ATTACKS["copy_over_committed"].format(victim=victim), "--output", uri]
    if opts:
        args += ["--endpoint-url", opts["endpoint_url"]]
    proc = bloodray(*args, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("bloodray query: error: query against")
    assert _victim(uri, opts)[1] == before


def test_analyst_queries_over_every_view_still_work(committed_root):
    uri, opts = committed_root
    con = query.connect(uri, opts)
    try:
        counts = {view: con.execute(f"SELECT count(*) FROM {view}").fetchone()[0] for view in query.VIEWS}
        assert counts == {"runs": 2, "all_runs": 3, "predictions": 18, "differentials": 5, "errors": 3,
                          "thumbnails": 0, "reviews": 0, "signoffs": 0, "verified_differentials": 5}
        # Filters, joins, window functions and CTEs over the registered datasets.
        rows = con.execute(
            "WITH p AS (SELECT run_date, run_id, sample_id, confidence FROM predictions WHERE confidence < 0.85) "
            "SELECT r.run_date, count(*), max(p.confidence) FROM p JOIN runs r USING (run_date, run_id) "
            "GROUP BY 1 ORDER BY 1").fetchall()
        assert [r[0].isoformat() for r in rows] == ["2024-03-01", "2024-03-02"]  # run_date: a DATE
        ranked = con.execute("SELECT sample_id, row_number() OVER (PARTITION BY run_date ORDER BY sample_id) "
                             "FROM differentials ORDER BY run_date, 2").fetchall()
        assert len(ranked) == 5
        assert con.execute("SELECT current_setting('enable_external_access')").fetchone()[0] is False
    finally:
        con.close()


# --------------------------------------------------------------------------- query command: output and export
def test_query_command_exports_and_renders(tmp_path):
    out = tmp_path / "out"
    build_tree(str(out))
    sql = "SELECT run_date, image_uri, confidence, needs_review FROM predictions ORDER BY run_date, image_uri"

    proc = bloodray("query", sql, "--output", "out", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    # Long URIs are cut from the left: every row shows its own file name.
    uris = [line.split("|")[1].strip() for line in proc.stdout.splitlines()[2:-1]]
    assert len(uris) == 18 and all(u.endswith(".jpg") for u in uris)
    assert len(set(uris)) == 18
    assert "(18 rows)" in proc.stdout

    for fmt in ("csv", "json", "parquet"):
        proc = bloodray("query", sql, "--output", "out", "--format", fmt, "--out", f"exports/result.{fmt}",
                        cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout == "" and f"wrote 18 row(s) to exports/result.{fmt}" in proc.stderr
    table = pq.read_table(tmp_path / "exports" / "result.parquet")
    assert table.num_rows == 18
    assert table.schema.field("confidence").type == pa.float32() and table.schema.field("run_date").type == pa.date32()
    exported = json.loads((tmp_path / "exports" / "result.json").read_text())
    assert len(exported) == 18 and exported[0]["run_date"] == "2024-03-01"  # a DATE, written as ISO text
    assert (tmp_path / "exports" / "result.csv").read_text().splitlines()[0] == \
        "run_date,image_uri,confidence,needs_review"

    # Parquet to a terminal, an export inside the output's tables: one-line errors, exit 2.
    proc = bloodray("query", sql, "--output", "out", "--format", "parquet", cwd=tmp_path)
    assert proc.returncode == 2 and "--out" in proc.stderr and proc.stderr.count("\n") == 1
    proc = bloodray("query", sql, "--output", "out", "--format", "csv", "--out", "out/predictions/x.csv",
                    cwd=tmp_path)
    assert proc.returncode == 2 and "out/predictions/x.csv" in proc.stderr
    assert not (out / "predictions" / "x.csv").exists()


def test_query_closed_pipe_exits_without_traceback(tmp_path):
    build_tree(str(tmp_path / "out"))
    env = dict(os.environ, PYTHONPATH=str(REPO))
    script = (f"{sys.executable} -m bloodray query 'SELECT * FROM range(300000)' --output out --format csv "
              "| head -n 2; echo \"status=${PIPESTATUS[0]}\"")
    proc = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.stdout.splitlines()[:2] == ["range", "0"]
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr
    assert "status=141" in proc.stdout


def test_query_warns_on_empty_root_and_refuses_other_folders(tmp_path):
    fresh = tmp_path / "fresh"
    (fresh / "predictions").mkdir(parents=True)
    proc = bloodray("query", "SELECT count(*) AS n FROM predictions", "--output", "fresh", cwd=tmp_path)
    assert proc.returncode == 0
    assert proc.stderr.strip().splitlines() == ["bloodray WARNING: fresh holds no committed run yet: every view is empty"]

    other = tmp_path / "photos"
    other.mkdir()
    (other / "holiday.jpg").write_bytes(b"not an output")
    proc = bloodray("query", "SELECT * FROM runs", "--output", "photos", cwd=tmp_path)
    assert proc.returncode == 2
    assert re.fullmatch(r"bloodray query: error: photos: not a bloodray output root .*\n", proc.stderr)


# --------------------------------------------------------------------------- the whole round, real Ray
@pytest.mark.slow
def test_classify_query_report_from_outside_the_repo(tmp_path):
    """synth -> classify (its own local Ray) -> query -> report, all from tmp_path with relative paths."""
    ray_tmp = tempfile.mkdtemp(prefix="brcli", dir="/tmp")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAY_TMPDIR": ray_tmp}
    date = "2026-01-01"
    proc = bloodray("synth", "archive", "--out", f"archive/{date}", "--samples", "2", "--cells", "12", "--size", "64",
                    cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr

    proc = bloodray("classify", "--set", "input.uri=archive", "--set", "output.uri=out", "--set",
                    "inference.num_gpus=0", "--date", date, cwd=tmp_path, env=env, timeout=600)
    # The packaged model's OOD reference takes synthetic cells for another lab's: committed under the alarm.
    assert proc.returncode == 4, proc.stderr
    assert "24 predictions" in proc.stdout
    # bloodray's own progress lines at INFO; Ray's per-operator progress and execution banners are gone.
    assert "bloodray: run " in proc.stderr and "classifying 24 image file(s)" in proc.stderr
    assert "Running Dataset" not in proc.stderr and "Starting execution of Dataset" not in proc.stderr
    assert "Progress bars disabled" not in proc.stderr

    proc = bloodray("query", "SELECT sample_id, n_classified FROM differentials ORDER BY 1", "--output", "out",
                    "--format", "json", cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr
    assert [r["n_classified"] for r in json.loads(proc.stdout)] == [12, 12]

    proc = bloodray("report", "--output", "out", cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "out" / "reports" / f"run_date={date}" / "report.html").is_file()

    # --quiet: the result on stdout, none of bloodray's progress lines on stderr; the rerun replaces the date.
    proc = bloodray("--quiet", "classify", "--set", "input.uri=archive", "--set", "output.uri=out", "--set",
                    "inference.num_gpus=0", "--date", date, cwd=tmp_path, env=env, timeout=600)
    assert proc.returncode == 4, proc.stderr
    assert "24 predictions" in proc.stdout and "bloodray: " not in proc.stderr
    proc = bloodray("query", "SELECT (SELECT count(*) FROM runs) AS visible, (SELECT count(*) FROM all_runs) AS runs",
                    "--output", "out", "--format", "csv", cwd=tmp_path, env=env)
    assert proc.stdout.splitlines() == ["visible,runs", "1,2"]


@pytest.mark.slow
def test_the_wheel_holds_every_packaged_model_and_stays_under_30_mb(tmp_path):
    """Builds the wheel as a user's pip would (no network: the venv's setuptools) and reads its listing."""
    import zipfile

    from bloodray import packaged

    import shutil

    root = Path(__file__).resolve().parents[1]
    # From a copy of what the sdist holds, so the build leaves no build/ or egg-info in the checkout.
    src = tmp_path / "src"
    shutil.copytree(root / "bloodray", src / "bloodray", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(root / name, src / name)
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w",
                           str(tmp_path), str(src)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (wheel,) = tmp_path.glob("bloodray-*.whl")
    print(f"wheel: {wheel.stat().st_size / 1e6:.1f} MB")
    assert wheel.stat().st_size < 30 * 1000 * 1000, wheel.stat().st_size
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "bloodray/assets/models.json" in names
    for model in packaged.models():
        for item in model.path.iterdir():
            assert f"bloodray/assets/{model.folder}/{item.name}" in names
