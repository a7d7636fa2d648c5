"""The checkpoint quality gate: calibrate refuses to seal a useless model, classify refuses an unsealed or failing
one (exit status ``quality_gate``), and sealed metadata carries no local machine paths."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from bloodray import cli, exit_codes, quality_gate, rundir
from bloodray.checkpoint import (METADATA_FILE, PACKAGED_CHECKPOINT, CheckpointMetadata, export_checkpoint,
                                 read_metadata, write_checkpoint)
from bloodray.classes import CLASS_NAMES, NUM_CLASSES
from bloodray.data.synth import default_samples, write_archive
from bloodray.evaluation.calibration import calibrate
from bloodray.models import create_model

DATE = "2024-05-01"


def _chance_logits(n: int = 800, seed: int = 0):
    """A model that knows nothing: logits independent of the label (a 1-epoch run on 200 images)."""
    rng = np.random.default_rng(seed)
    return rng.normal(0, 0.01, size=(n, NUM_CLASSES)), rng.integers(0, NUM_CLASSES, n)


def _good_logits(n: int = 800, seed: int = 0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, NUM_CLASSES, n)
    logits = rng.normal(0, 1, size=(n, NUM_CLASSES))
    logits[np.arange(n), labels] += 4.0
    return logits, labels


def test_a_chance_level_model_misses_every_minimum():
    report = calibrate(*_chance_logits()).to_dict()
    missed = quality_gate.failures(report)
    assert report["temperature"] > quality_gate.MINIMUMS.max_temperature
    assert any(m.startswith("val accuracy") for m in missed)
    assert any("val recall" in m for m in missed)
    assert any(m.startswith("temperature") for m in missed)
    with pytest.raises(quality_gate.QualityGateError, match="ckpt-x: refused to seal: val accuracy"):
        quality_gate.check_calibration(report, "ckpt-x")
    forced = quality_gate.check_calibration(report, "ckpt-x", force=True)
    assert forced["passed"] is False and forced["forced"] is True and forced["failures"] == missed
    assert forced["minimums"]["val_accuracy"] == quality_gate.MINIMUMS.val_accuracy


def test_a_good_model_passes_and_is_not_marked_forced():
    report = calibrate(*_good_logits()).to_dict()
    assert quality_gate.failures(report) == []
    # A val split the model gets entirely right fits the lowest temperature: no fault.
    logits, labels = _good_logits()
    perfect = calibrate(logits * 0 + np.eye(NUM_CLASSES)[labels] * 10, labels).to_dict()
    assert perfect["temperature"] < 0.1 and quality_gate.failures(perfect) == []
    assert quality_gate.check_calibration(report, "ckpt", force=True) | {"minimums": None} == {
        "passed": True, "forced": False, "failures": [], "minimums": None}


def test_one_weak_class_or_a_missing_class_fails():
    logits, labels = _good_logits()
    weak = labels == 3
    logits[weak] = np.roll(logits[weak], 1, axis=1)  # class 3 is always called class 4
    assert quality_gate.failures(calibrate(logits, labels).to_dict()) == [f"{CLASS_NAMES[3]} val recall 0.000 < 0.50"]
    logits, labels = _good_logits()
    keep = labels != 6
    missed = quality_gate.failures(calibrate(logits[keep], labels[keep]).to_dict())
    assert missed == [f"no val cell of class {CLASS_NAMES[6]} (its recall is unknown)"]


def _meta(**kw) -> CheckpointMetadata:
    return CheckpointMetadata("bloodnet", list(CLASS_NAMES), 64, [0.5] * 3, [0.5] * 3, **kw)


def test_classify_side_refuses_unsealed_and_forced_checkpoints():
    with pytest.raises(quality_gate.QualityGateError, match=r"model.checkpoint /x/ck: fails the quality gate: not "
                                                            r"calibrated with val metrics"):
        quality_gate.check_checkpoint(_meta(), "/x/ck")
    report = calibrate(*_chance_logits()).to_dict()
    forced = report | {"gate": quality_gate.record(report, forced=True)}
    with pytest.raises(quality_gate.QualityGateError, match=r"\(sealed with --force\): val accuracy .*"
                                                            r"model.quality_gate=false"):
        quality_gate.check_checkpoint(_meta(calibration=forced), "/x/ck")
    good = calibrate(*_good_logits()).to_dict()
    quality_gate.check_checkpoint(_meta(calibration=good | {"gate": quality_gate.record(good, False)}), "/x/ck")


def test_every_packaged_model_passes_the_gate():
    from bloodray import packaged

    for model in packaged.models():
        meta = read_metadata(str(model.path))
        quality_gate.check_checkpoint(meta, str(model.path))
        assert meta.calibration["gate"] == {**meta.calibration["gate"], "passed": True, "forced": False}
        assert meta.val_confusion().sum() == meta.calibration["val_size"] > 900


def _local_strings(value) -> list[str]:
    if isinstance(value, dict):
        return [s for v in value.values() for s in _local_strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _local_strings(v)]
    return [value] if isinstance(value, str) and (value.startswith(("/", "file:", "~")) or "/tmp" in value) else []


def test_sealed_metadata_carries_no_local_paths(tmp_path):
    model = create_model("bloodnet", NUM_CLASSES, input_size=64, filters=[8] * 7, hidden=16)
    config = {"data": {"root": str(tmp_path / "cells"), "split": {"seed": 0}},
              "model": {"init_checkpoint": f"file://{tmp_path}/run/checkpoint_epoch0003", "weights_uri": "s3://b/w"},
              "run": {"storage_path": str(tmp_path / "runs"), "name": "r1"}, "pack": "C:\\packs\\pbc.parquet",
              "relative": "runs/here"}
    write_checkpoint(tmp_path / "ck", model, _meta(model_kwargs={"input_size": 64, "filters": [8] * 7, "hidden": 16},
                                                  config=config, calibration={"source_checkpoint": str(tmp_path)}))
    text = (tmp_path / "ck" / METADATA_FILE).read_text()
    stored = json.loads(text)
    assert str(tmp_path) not in text and _local_strings(stored) == []
    # What is kept: the last component (what data set, which checkpoint), object-store URIs, relative paths.
    assert stored["config"]["data"]["root"] == "<local>/cells"
    assert stored["config"]["model"] == {"init_checkpoint": "<local>/checkpoint_epoch0003", "weights_uri": "s3://b/w"}
    assert stored["config"]["pack"] == "<local>/pbc.parquet" and stored["config"]["relative"] == "runs/here"
    # A copy (export) of an old checkpoint that carried paths is stripped too, and every packaged model is.
    copy = Path(export_checkpoint(str(tmp_path / "ck"), str(tmp_path / "copy")))
    assert _local_strings(json.loads((copy / METADATA_FILE).read_text())) == []
    from bloodray import packaged

    for model in packaged.models():
        assert _local_strings(json.loads((model.path / METADATA_FILE).read_text())) == [], model.name


def _chance_run(tmp_path: Path) -> str:
    """A training run whose only checkpoint is an untrained network, with a split of synthetic cells."""
    from bloodray.data.labelled import SplitFractions, build_split, write_parquet
    from bloodray.data.synth import write_labelled_dataset

    data = str(tmp_path / "cells")
    write_labelled_dataset(data, 8, size=48, seed=5)
    manifest, _ = build_split(data, SplitFractions(0.5, 0.25, 0.25), seed=0)
    run = str(tmp_path / "run")
    write_parquet(manifest, rundir.split_manifest(run))
    torch.manual_seed(0)
    kwargs = {"input_size": 48, "filters": [8] * 7, "hidden": 16}
    meta = CheckpointMetadata("bloodnet", list(CLASS_NAMES), 48, [0.5] * 3, [0.5] * 3, model_kwargs=kwargs,
                              config={"data": {"root": data}})
    write_checkpoint(rundir.checkpoint_dir(run, 1), create_model("bloodnet", NUM_CLASSES, **kwargs), meta)
    return run


@pytest.mark.slow
def test_calibrate_refuses_a_useless_checkpoint_unless_forced_and_classify_refuses_it(tmp_path, ray_cluster, capsys):
    run = _chance_run(tmp_path)
    code = cli.run(["--quiet", "calibrate", "--run", run])
    err = capsys.readouterr().err
    assert code == exit_codes.QUALITY_GATE == 7, err
    assert "refused to seal" in err and "checkpoint_epoch0001" in err and "--force" in err
    # Nothing sealed: the run has no calibrated checkpoint.
    assert not Path(rundir.calibrated_dir(run)).exists()

    assert cli.run(["--quiet", "calibrate", "--run", run, "--force"]) == 0
    assert "FAILED, sealed anyway (--force)" in capsys.readouterr().out
    sealed = read_metadata(rundir.calibrated_dir(run))
    assert sealed.calibration["gate"]["forced"] is True and sealed.calibration["val_size"] > 0
    assert str(tmp_path) not in (Path(rundir.calibrated_dir(run)) / METADATA_FILE).read_text()

    archive = str(tmp_path / "archive")
    write_archive(f"{archive}/{DATE}", default_samples(1, 4, seed=1), size=48, seed=1)
    base = ["--quiet", "classify", "--set", f"input.uri={archive}", "--set", f"output.uri={tmp_path / 'out'}",
            "--set", f"run.date={DATE}", "--set", "inference.batch_size=8", "--set", f"model.checkpoint={run}"]
    code = cli.run(base)
    err = capsys.readouterr().err
    assert code == exit_codes.QUALITY_GATE, err
    lines = [line for line in err.strip().splitlines() if not line.startswith(("\x1b[36m(", "("))]
    assert len(lines) == 1 and rundir.calibrated_dir(run) in lines[0] and "(sealed with --force)" in lines[0]
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.parquet"))
    # The explicit opt-out classifies anyway (this useless model's cells also raise the domain-shift alarm).
    assert cli.run([*base, "--set", "model.quality_gate=false"]) in (exit_codes.COMMITTED,
                                                                     exit_codes.COMMITTED_WITH_ALARM)
    assert "model.quality_gate is false: classifying anyway" in capsys.readouterr().err


@pytest.mark.slow
def test_classify_refuses_an_unsealed_copy_of_the_packaged_model(tmp_path, capsys):
    unsealed = export_checkpoint(str(PACKAGED_CHECKPOINT), str(tmp_path / "unsealed"), calibration={})
    archive = str(tmp_path / "archive")
    write_archive(f"{archive}/{DATE}", default_samples(1, 4, seed=1), size=64, seed=1)
    code = cli.run(["--quiet", "classify", "--json", "--set", f"input.uri={archive}", "--set",
                    f"output.uri={tmp_path / 'out'}", "--set", f"run.date={DATE}", "--set",
                    f"model.checkpoint={unsealed}"])
    captured = capsys.readouterr()
    summary = json.loads(captured.out.strip().splitlines()[-1])
    assert code == exit_codes.QUALITY_GATE and summary["status"] == "quality_gate"
    assert unsealed in summary["error"] and "not calibrated with val metrics" in summary["error"]
