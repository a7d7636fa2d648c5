"""`make demo`'s entry point, end to end at a small size (local Ray, local disk)."""

from __future__ import annotations

import datetime as dt

import pytest

from bloodray.demo import load_demo_config, run_demo
from bloodray.analysis.query import run_query

pytestmark = pytest.mark.slow


def test_demo_runs_end_to_end(tmp_path, ray_cluster, capsys):
    cfg = load_demo_config("configs/demo.yaml", [
        f"workdir={tmp_path / 'demo'}", "date=2026-01-02", "data.per_class=16", "data.size=64",
        "archive.samples=2", "archive.cells_per_sample=20", "train.epochs=2", "train.input_size=48",
        # 2 epochs on 16 cells per class test the plumbing, not the model: it misses the quality gate, so say so.
        "force_gate=true"])
    result = run_demo(cfg)
    out = capsys.readouterr().out
    assert "[demo] the model misses the quality gate (val accuracy" in out
    assert "Per-sample differential" in out and "S0001" in out and "S0002" in out
    assert result.report.endswith("report.html")
    runs = run_query(result.output_uri, "SELECT run_date, n_predictions, n_errors FROM runs").to_pylist()
    assert runs == [{"run_date": dt.date(2026, 1, 2), "n_predictions": 40, "n_errors": 0}]
    samples = run_query(result.output_uri, "SELECT sample_id, n_images FROM differentials ORDER BY 1").to_pylist()
    assert samples == [{"sample_id": "S0001", "n_images": 20}, {"sample_id": "S0002", "n_images": 20}]
