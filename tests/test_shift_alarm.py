"""The unidentified status and the domain-shift alarm in real nightly runs (local Ray cluster).

A BloodNet trained on synthetic cells gets an OOD reference fitted on other
synthetic cells; an archive like its training cells runs without alarm, one
whose colours and scale differ trips it (and with ``shift.on_alarm=fail``
publishes nothing). A sample under the alarm keeps its flags, marked
unverified, in the table and the report.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bloodray.checkpoint import export_checkpoint
from bloodray.classes import CLASS_NAMES, CLASS_TO_INDEX
from bloodray.config import load_config
from bloodray.data import synth
from bloodray.data.labelled import list_labelled_images
from bloodray.evaluation.evaluate import fit_ood_reference
from bloodray.ood import MIN_CLASS_CELLS, SHIFT_FLAG
from bloodray.analysis.report_figures import UNVERIFIED_MARK
from bloodray.checkpoint import read_metadata
from bloodray.nightly.differential import flag_labels
from bloodray.nightly.shift import group_statistics
from bloodray.nightly import contract, tables
from bloodray.nightly.config import ClassifyConfig, ClassifyError
from bloodray.nightly.differential import count_columns
from bloodray.nightly.pipeline import run_classification
from helpers_model import train_quick_checkpoint

pytestmark = pytest.mark.slow
SIZE = 64


@pytest.fixture(scope="module")
def ood_checkpoint(tmp_path_factory, ray_cluster):
    base = tmp_path_factory.mktemp("shift")
    plain = train_quick_checkpoint(base / "checkpoint", size=SIZE)
    cells = base / "cells"
    # 64 cells per class, half of them val: enough val cells per predicted class for its own reference.
    synth.write_labelled_dataset(str(cells), 64, size=SIZE, seed=7)
    rows = [{"uri": uri, "label": CLASS_TO_INDEX[name]} for uri, name in list_labelled_images(str(cells))]
    ref, _, _ = fit_ood_reference(plain, rows[0::2], rows[1::2])
    blob = ref.tensors_bytes()
    return export_checkpoint(plain, str(base / "with-ood"), ood=ref.metadata(hashlib.sha256(blob).hexdigest()),
                             ood_file=blob)


def _shift_images(root: Path) -> None:
    """Another lab: channels permuted (stain, camera) and cells at half scale on a flat background."""
    for path in root.rglob("*.jpg"):
        arr = np.asarray(Image.open(path).convert("RGB"))[..., [2, 0, 1]]
        small = Image.fromarray(arr).resize((arr.shape[1] // 2, arr.shape[0] // 2))
        canvas = Image.new("RGB", (arr.shape[1], arr.shape[0]), tuple(int(v) for v in arr.reshape(-1, 3).mean(0)))
        canvas.paste(small, (arr.shape[1] // 4, arr.shape[0] // 4))
        canvas.save(path, quality=95)


def _config(archive: Path, out: Path, checkpoint: str, *extra: str) -> ClassifyConfig:
    return load_config(ClassifyConfig, None, [f"input.uri={archive}", f"output.uri={out}",
                                              f"model.checkpoint={checkpoint}", "inference.batch_size=32",
                                              *extra])


def _tables(out: Path):
    from bloodray.analysis.query import read_table

    return read_table(str(out), "predictions").to_pylist(), read_table(str(out), "differentials").to_pylist()


def test_unidentified_cells_and_the_domain_shift_alarm(tmp_path, ood_checkpoint, capsys):
    samples = synth.default_samples(2, 60, seed=1)
    normal, shifted = tmp_path / "normal", tmp_path / "shifted"
    # A third sample of the training laboratory dominated by one class (a left shift): no alarm either.
    skewed = synth.SampleSpec("S0003", {"ig": 45, "neutrophil": 10, "lymphocyte": 5})
    synth.write_archive(str(normal), [*samples, skewed], size=SIZE, seed=11)
    synth.write_archive(str(shifted), samples, size=SIZE, seed=12)
    _shift_images(shifted)

    # Cells like the training cells: scored, counted, no alarm.
    result = run_classification(_config(normal, tmp_path / "out-normal", ood_checkpoint))
    preds, diffs = _tables(tmp_path / "out-normal")
    assert not result.domain_shift and result.shift_warning() is None
    assert all(r["ood_score"] is not None for r in preds)
    assert np.mean([r["status"] == contract.UNIDENTIFIED for r in preds]) < 0.1
    assert not any(d["domain_shift"] or d[contract.FLAGS_UNVERIFIED] for d in diffs) and len(diffs) == 3
    # The job compared each cell with its own predicted class's reference (the checkpoint's per-class one).
    ood = read_metadata(ood_checkpoint).ood
    assert sum(ref["n_val"] >= MIN_CLASS_CELLS for ref in ood["per_class"].values()) >= 2
    for d in diffs:
        own = [r for r in preds if r["sample_id"] == d["sample_id"]]
        stats = group_statistics(np.array([r["ood_score"] for r in own]),
                                 np.array([r["predicted_class"] for r in own]), ood)
        assert d["ood_ks"] == pytest.approx(stats["ood_ks"])

    # Another lab's cells: unidentified, not counted, every sample under the alarm with the one flag.
    result = run_classification(_config(shifted, tmp_path / "out-shifted", ood_checkpoint))
    preds, diffs = _tables(tmp_path / "out-shifted")
    unidentified = [r for r in preds if r["status"] == contract.UNIDENTIFIED]
    assert len(unidentified) > 0.5 * len(preds)
    # They keep their predicted class and confidence, and are not sent to review for their class.
    assert all(r["predicted_class"] and r["confidence"] is not None and not r["needs_review"] for r in unidentified)
    labels = flag_labels()
    for d in diffs:
        # Under the alarm: its flag first, then every flag the sample's counts raised, kept and marked unverified.
        assert d["domain_shift"] and d["flags"][0] == SHIFT_FLAG and d["any_flag"] and d[contract.FLAGS_UNVERIFIED]
        assert d["flags"][1:] == [label for col, label in labels.items() if d[col]] and len(d["flags"]) > 1
        assert d["n_unidentified"] == sum(r["status"] == contract.UNIDENTIFIED for r in preds
                                          if r["sample_id"] == d["sample_id"])
        assert sum(d[c] for c in count_columns()) == d["n_classified"] - d["n_unidentified"]
    assert result.domain_shift and result.n_samples_shifted == len(diffs) == 2
    assert result.n_unidentified == len(unidentified)
    warning = result.shift_warning()
    assert result.run_id in warning and "2 of 2 sample(s) (100%)" in warning
    runs = tables.visible_runs(str(tmp_path / "out-shifted")).to_pylist()
    assert runs[0]["domain_shift"] and runs[0]["n_samples_shifted"] == 2

    # The report shows the alarm before anything else.
    from bloodray.analysis.report import write_report

    html = Path(write_report(str(tmp_path / "out-shifted"), dest=str(tmp_path / "report"))).read_text()
    assert "Domain-shift alarm" in html and html.index("Domain-shift alarm") < html.index("<section")
    assert "kept but unverified" in html and diffs[0]["flags"][1] + UNVERIFIED_MARK in html

    # shift.on_alarm=fail: the run fails and publishes nothing.
    with pytest.raises(ClassifyError, match="domain-shift alarm.*nothing was published"):
        run_classification(_config(shifted, tmp_path / "out-fail", ood_checkpoint, "shift.on_alarm=fail"))
    assert tables.committed_runs(str(tmp_path / "out-fail")).num_rows == 0

    # The command line: one warning line naming the run and the share of samples affected.
    from bloodray import cli

    capsys.readouterr()
    code = cli.run(["classify", "--set", f"input.uri={shifted}", "--set", f"output.uri={tmp_path / 'out-cli'}",
                    "--set", f"model.checkpoint={ood_checkpoint}", "--set", "inference.batch_size=32",
                    "--set", "inference.num_gpus=0"])
    assert code == 4  # committed, under the alarm (bloodray.exit_codes.COMMITTED_WITH_ALARM)
    run_id = tables.visible_runs(str(tmp_path / "out-cli")).column("run_id")[0].as_py()
    warnings = [line for line in capsys.readouterr().err.splitlines() if "domain-shift alarm" in line]
    assert len(warnings) == 1 and run_id in warnings[0] and "2 of 2 sample(s) (100%)" in warnings[0]


def _refit_job():
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "jobs" / "fit_ood_packaged.py"
    spec = importlib.util.spec_from_file_location("fit_ood_packaged", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_the_refit_job_gives_any_checkpoint_a_per_class_reference(tmp_path, ood_checkpoint):
    import torch

    from bloodray.checkpoint import load_checkpoint
    from bloodray.evaluation.evaluate import TRAIN_REFERENCE_MIN_P
    from bloodray.inference_precision import bf16_supported
    from bloodray.ood import pooled_reference_note

    # A checkpoint whose reference predates the per-class format: it loads, pooled, and is named for a refit.
    meta = read_metadata(ood_checkpoint)
    blob = (Path(ood_checkpoint) / "ood.safetensors").read_bytes()
    # Calibrated (a val confusion sealed), so the refit also seals the training cells' confusion for the flags.
    val_confusion = (np.eye(len(CLASS_NAMES), dtype=int) * 16).tolist()
    old = export_checkpoint(ood_checkpoint, str(tmp_path / "old"),
                            ood={k: v for k, v in meta.ood.items() if k != "per_class"}, ood_file=blob,
                            calibration=dict(meta.calibration, val_confusion=val_confusion))
    assert load_checkpoint(old).ood.per_class is None and old in pooled_reference_note(read_metadata(old).ood, old)
    cells = tmp_path / "cells"
    synth.write_labelled_dataset(str(cells), 24, size=SIZE, seed=8)
    # Into a copy, then in place: weights, temperature and review threshold stay; the reference is per class.
    assert _refit_job()(["--data", str(cells), "--checkpoint", old, "--dest", str(tmp_path / "copy")]) == 0
    # In place with Gaussians of 60 training cells: the others are checked against val and, when they score alike,
    # join the reference (issue 21: ~120 val cells per class alone made a chance offset every sample met again).
    assert _refit_job()(["--data", str(cells), "--checkpoint", old, "--train-cells", "60"]) == 0
    assert read_metadata(str(tmp_path / "copy")).ood["train_reference"] == {"cells": 0, "joined": False}
    check, n_val = read_metadata(old).ood["train_reference"], read_metadata(str(tmp_path / "copy")).ood["n_val"]
    assert check["cells"] > 0 and check["joined"] == (check["p_value"] >= TRAIN_REFERENCE_MIN_P)
    assert read_metadata(old).ood["n_val"] == n_val + (check["cells"] if check["joined"] else 0)
    for refitted in (str(tmp_path / "copy"), old):
        new = read_metadata(refitted)
        assert new.ood["per_class"] and pooled_reference_note(new.ood, refitted) is None
        # Fitted in fp32, with the val cells scored again in bf16 where this CPU has it (bloodray.ood).
        assert new.ood["precision"] == "fp32"
        assert set(new.ood.get("by_precision", {})) == ({"bf16"} if bf16_supported(torch.device("cpu")) else set())
        assert (new.weights_sha256, new.temperature, new.review_threshold) == (
            meta.weights_sha256, meta.temperature, meta.review_threshold)
        assert load_checkpoint(refitted).ood.per_class
        # A calibrated checkpoint's calibration gains the training cells' confusion and its check (the flags').
        train = new.calibration["train_confusion"]
        assert train["cells"] > 0 and new.calibration["val_confusion"] == val_confusion
        assert (new.flag_confusion() == np.asarray(val_confusion) + (
            np.asarray(train["confusion"]) if train["joined"] else 0)).all()
