"""The nightly job as a scheduler reads it (issue 22, items 4 and 5): exit statuses, ``--json``, a quiet stderr,
defaults that work on any machine, and the date's report at the end of the run.

Runs go through the command (``bloodray.cli.run`` in-process on the session's real local Ray cluster, and one
``python -m bloodray -q`` subprocess with a Ray cluster of its own); nothing is mocked. The model is the packaged
one: as shipped (its OOD reference raises the domain-shift alarm on synthetic cells) and exported without the
OOD reference (no alarm, a clean run).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

from bloodray import cli, exit_codes
from bloodray.checkpoint import PACKAGED_CHECKPOINT, export_checkpoint, read_metadata
from bloodray.config import ConfigError, load_config
from bloodray.data import synth
from bloodray.nightly import contract, tables
from bloodray.nightly.config import ClassifyConfig, ClusterResourcesError, NothingToClassify, ShiftAlarmError
from bloodray.nightly.plan import gpus_per_actor
from bloodray.nightly.summary import SUMMARY_FORMAT
from bloodray.storage import StorageError

REPO = Path(__file__).resolve().parents[1]
DATE = "2026-11-30"
OTHER_DATE = "2026-12-01"
SIZE = 64


@pytest.fixture(scope="module")
def clean_checkpoint(tmp_path_factory):
    """The packaged model without its OOD reference: no domain-shift alarm, so a run can be clean.

    A run is clean only when its flags carry the model's val confusion (else it warns that they do not);
    a packaged model sealed before ``calibrate`` recorded one gets a perfect one here (identity counts).
    """
    meta = read_metadata(str(PACKAGED_CHECKPOINT))
    confusion = meta.val_confusion()
    if confusion is None:
        confusion = np.diag(np.full(len(meta.classes), 100))
    return export_checkpoint(str(PACKAGED_CHECKPOINT), str(tmp_path_factory.mktemp("model") / "no-ood"), ood={},
                             calibration={**meta.calibration, "val_confusion": confusion.tolist()})


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Path:
    """An archive root with two date folders; the first has 2 samples of 8 cells and one corrupt image."""
    root = tmp_path_factory.mktemp("archive")
    synth.write_archive(str(root / DATE), synth.default_samples(2, 8, seed=5), size=SIZE, seed=5)
    synth.write_archive(str(root / OTHER_DATE), synth.default_samples(1, 4, seed=6), size=SIZE, seed=6)
    sample = sorted(p for p in (root / DATE).iterdir() if p.is_dir())[0]
    (sample / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a JPEG")
    return root


def _args(archive: Path | str, out: Path | str, *extra: str, date: str | None = DATE) -> list[str]:
    args = ["classify", "--set", f"input.uri={archive}", "--set", f"output.uri={out}"]
    args += ["--date", date] if date else []
    for item in extra:
        args += ["--set", item]
    return args


def _json_run(argv: list[str], capsys) -> tuple[int, dict, str]:
    code = cli.run([*argv, "--json"])
    captured = capsys.readouterr()
    lines = captured.out.strip().splitlines()
    assert len(lines) == 1, captured.out  # one JSON object, nothing else on stdout
    summary = json.loads(lines[0])
    assert summary["format"] == SUMMARY_FORMAT and summary["exit_code"] == code
    assert summary["status"] == exit_codes.STATUS[code]
    return code, summary, captured.err


# --------------------------------------------------------------------------- exit statuses: one module
def test_exit_statuses_are_distinct_and_mapped_from_errors():
    import ray.exceptions

    codes = [code for code, _status in exit_codes.table()]
    assert codes == [0, 1, 2, 3, 4, 5, 6, 7] and len(set(exit_codes.STATUS.values())) == len(codes)
    assert exit_codes.REFUSED == 2  # the existing convention: a problem with the input, config or storage
    assert exit_codes.for_exception(ConfigError("run.date: bad")) == exit_codes.REFUSED
    assert exit_codes.for_exception(NothingToClassify("x")) == exit_codes.NOTHING_TO_DO
    assert exit_codes.for_exception(ShiftAlarmError("x")) == exit_codes.ALARM_NOT_PUBLISHED
    from bloodray.quality_gate import QualityGateError

    assert exit_codes.for_exception(QualityGateError("x")) == exit_codes.QUALITY_GATE
    assert exit_codes.for_exception(ClusterResourcesError("x")) == exit_codes.INFRASTRUCTURE
    assert exit_codes.for_exception(ray.exceptions.ActorDiedError()) == exit_codes.INFRASTRUCTURE
    assert ray.exceptions.RayError in exit_codes.infrastructure_errors()
    from bloodray.logs import RayStartError

    assert exit_codes.for_exception(RayStartError("Ray: could not start a local cluster")) == exit_codes.INFRASTRUCTURE
    # Storage: a wrong address or permission is the user's to fix; an unreachable store or a full disk is not.
    assert exit_codes.for_exception(StorageError("s3://b/x: not found")) == exit_codes.REFUSED
    for cause in (ConnectionRefusedError(111, "refused"), TimeoutError("read timed out"),
                  OSError(errno.ENOSPC, "No space left on device")):
        try:
            raise StorageError("s3://b/x: failed") from cause
        except StorageError as exc:
            assert exit_codes.for_exception(exc) == exit_codes.INFRASTRUCTURE, cause
    assert exit_codes.for_run(type("R", (), {"domain_shift": True})()) == exit_codes.COMMITTED_WITH_ALARM


# --------------------------------------------------------------------------- defaults that work anywhere
def test_num_gpus_auto_is_the_packaged_default():
    cfg = load_config(ClassifyConfig, REPO / "configs" / "classify" / "nightly.yaml", ["input.uri=a", "output.uri=b"])
    assert cfg.inference.num_gpus == "auto" and cfg.report.enabled is True
    assert ClassifyConfig(input={"uri": "a"}, output={"uri": "b"}).inference.num_gpus == "auto"
    assert gpus_per_actor("auto", 0) == 0.0 and gpus_per_actor("auto", 8) == 1.0
    assert gpus_per_actor(0.5, 0) == 0.5 and gpus_per_actor(0, 4) == 0.0
    assert load_config(ClassifyConfig, None, ["input.uri=a", "output.uri=b", "inference.num_gpus=2"]).inference.num_gpus == 2
    for bad in ("-1", "lots", ".inf"):
        with pytest.raises(ConfigError, match=r"^inference\.num_gpus: "):
            load_config(ClassifyConfig, None, ["input.uri=a", "output.uri=b", f"inference.num_gpus={bad}"])


def test_archive_root_of_dates_without_run_date_is_refused(archive, tmp_path, capsys):
    out = tmp_path / "out"
    code, summary, err = _json_run(_args(archive, out, date=None), capsys)
    assert code == exit_codes.REFUSED and summary["status"] == "refused"
    line = err.strip()
    assert line.count("\n") == 0 and line.startswith("bloodray classify: error: run.date: not set")
    assert DATE in line and OTHER_DATE in line and str(archive) in line and "--date" in line
    assert summary["error"] in line
    # Refused before anything: no lease, no staging, no run under today's date.
    assert not out.exists() or not any(out.rglob("*"))


def test_missing_or_empty_date_folder_is_nothing_to_do(archive, tmp_path, capsys):
    out = tmp_path / "out"
    code, summary, err = _json_run(_args(archive, out, date="2026-12-02"), capsys)
    assert code == exit_codes.NOTHING_TO_DO and summary["status"] == "nothing_to_do"
    assert summary["run_date"] == "2026-12-02" and summary["output_uri"] == str(out)
    assert "no folder for run.date 2026-12-02" in err and f"{DATE}, {OTHER_DATE}" in err
    empty = tmp_path / "archive2"
    (empty / DATE / "S1").mkdir(parents=True)
    (empty / DATE / "S1" / "notes.txt").write_text("not an image")
    code, summary, err = _json_run(_args(empty, out), capsys)
    assert code == exit_codes.NOTHING_TO_DO and "no images or tar shards found" in summary["error"]
    assert tables.committed_runs(str(out)).num_rows == 0
    # A missing archive root is the config's problem, not an empty night.
    assert cli.run(_args(tmp_path / "nowhere", out)) == exit_codes.REFUSED


def test_config_typo_is_refused_with_a_json_summary(tmp_path, capsys):
    code, summary, err = _json_run(_args(tmp_path, tmp_path / "out", "inference.batchsize=8"), capsys)
    assert code == exit_codes.REFUSED and "inference.batchsize: unknown key" in summary["error"]
    assert summary["run_date"] is None and err.startswith("bloodray classify: error: inference.batchsize")


# --------------------------------------------------------------------------- real runs on the local cluster
@pytest.mark.slow
def test_clean_run_json_summary_report_and_no_cleanup_message(archive, clean_checkpoint, tmp_path, capsys, caplog,
                                                              ray_cluster):
    out = tmp_path / "out"
    caplog.set_level(logging.INFO, logger="bloodray")
    code, summary, _err = _json_run(_args(archive, out, f"model.checkpoint={clean_checkpoint}"), capsys)
    assert code == exit_codes.COMMITTED and summary["status"] == "committed" and summary["error"] is None
    run = tables.visible_runs(str(out)).to_pylist()[0]
    assert (summary["run_id"], summary["run_date"], summary["output_uri"]) == (run["run_id"], DATE, str(out))
    assert set(summary["tables"]) == {*contract.TABLES, contract.RUNS}
    assert all(Path(uri).is_dir() for uri in summary["tables"].values())
    counts = summary["counts"]
    assert (counts["inputs"], counts["predictions"], counts["errors"], counts["samples"]) == (17, 16, 1, 2)
    assert summary["errors"]["total"] == 1 and sum(summary["errors"]["by_type"].values()) == 1
    # 8 white cells at most per sample: every sample is flagged "WBC count too low".
    assert [s["sample_id"] for s in summary["flagged_samples"]] == sorted(run_sample_ids(out))
    assert all(s["flags"] for s in summary["flagged_samples"]) and counts["flagged_samples"] == 2
    assert summary["alarm"] == {"domain_shift": False, "samples_shifted": 0, "samples": 2, "unidentified_cells": 0}
    report = Path(summary["report"]["uri"])
    assert report == out / "reports" / f"run_date={DATE}" / "report.html" and report.is_file()
    assert summary["report"]["error"] is None
    assert {"list", "read_decode_infer", "aggregate", "commit", "report"} <= set(summary["timings_s"])
    # A fresh output has nothing stale: no clean-up line.
    assert not [r for r in caplog.records if "stale path" in r.getMessage()]

    # A rerun whose report cannot be written: still committed, exit 0, the failure named.
    reports = out / "reports"
    for path in sorted(reports.rglob("*"), reverse=True):
        path.rmdir() if path.is_dir() else path.unlink()
    reports.rmdir()
    reports.write_text("a file where the reports folder goes")
    code = cli.run(_args(archive, out, f"model.checkpoint={clean_checkpoint}"))
    captured = capsys.readouterr()
    assert code == exit_codes.COMMITTED
    assert "report: not written (" in captured.out and "bad inputs: 1 (" in captured.out
    assert "domain-shift alarm: none" in captured.out
    assert "its report was not written" in captured.err
    assert tables.visible_runs(str(out)).column("run_id")[0].as_py() != run["run_id"]


def run_sample_ids(out: Path) -> set[str]:
    from bloodray.analysis.query import read_table

    return {r["sample_id"] for r in read_table(str(out), "differentials").to_pylist()}


@pytest.mark.slow
def test_alarm_and_infrastructure_exit_statuses(archive, tmp_path, capsys, ray_cluster):
    # The packaged model's OOD reference: synthetic cells are another lab's. Committed, under the alarm.
    code, summary, err = _json_run(_args(archive, tmp_path / "alarm"), capsys)
    assert code == exit_codes.COMMITTED_WITH_ALARM and summary["status"] == "committed_with_alarm"
    assert summary["alarm"]["domain_shift"] and summary["alarm"]["samples_shifted"] == 2
    assert summary["report"]["uri"] and "domain-shift alarm" in err
    code = cli.run(_args(archive, tmp_path / "alarm", "report.enabled=false"))
    human = capsys.readouterr().out
    assert code == exit_codes.COMMITTED_WITH_ALARM
    assert "domain-shift alarm: ON in 2 of 2 sample(s)" in human and "report: off" in human

    # shift.on_alarm=fail: nothing published.
    code, summary, err = _json_run(_args(archive, tmp_path / "fail", "shift.on_alarm=fail"), capsys)
    assert code == exit_codes.ALARM_NOT_PUBLISHED and "nothing was published" in summary["error"]
    assert tables.committed_runs(str(tmp_path / "fail")).num_rows == 0

    # A GPU asked for on a cluster without one: the infrastructure, not the input.
    code, summary, err = _json_run(_args(archive, tmp_path / "gpu", "inference.num_gpus=1"), capsys)
    assert code == exit_codes.INFRASTRUCTURE and summary["status"] == "infrastructure"
    assert "inference.num_gpus: 1 GPU(s) per actor, but the Ray cluster has 0" in err
    assert tables.committed_runs(str(tmp_path / "gpu")).num_rows == 0


@pytest.mark.slow
def test_quiet_clean_run_leaves_stderr_empty(archive, clean_checkpoint, tmp_path):
    """``bloodray -q classify`` with its own local Ray cluster and the packaged defaults (num_gpus: auto)."""
    ray_tmp = tempfile.mkdtemp(prefix="brq", dir="/tmp")
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_BACKEND_LOG_LEVEL")}
    env |= {"RAY_TMPDIR": ray_tmp, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))}
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "bloodray", "-q", *_args(archive, out, f"model.checkpoint={clean_checkpoint}"),
            "--json"]
    proc = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == exit_codes.COMMITTED, proc.stderr
    assert proc.stderr == ""
    summary = json.loads(proc.stdout)
    assert summary["status"] == "committed" and summary["counts"]["predictions"] == 16
    assert Path(summary["report"]["uri"]).is_file()
    # Ray's C++ lines are kept in its session logs, not lost.
    kept = list(Path(ray_tmp).rglob("bloodray-driver-*.err"))
    assert len(kept) == 1
