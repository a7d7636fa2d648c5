"""The OOD score, its storage in the sealed checkpoint, and the domain-shift statistics (no Ray)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from bloodray.checkpoint import (OOD_FILE, CheckpointError, CheckpointMetadata, export_checkpoint, load_checkpoint,
                                 read_metadata, write_checkpoint)
from bloodray.classes import CLASS_NAMES
from bloodray.ood import (LEGACY_PRECISION, MIN_CLASS_CELLS, SHIFT_FLAG, OodReference, ShiftRule, early_layer,
                          fit_ood, for_precision, pooled_reference_note, precision_of, precisions_of,
                          shift_statistics)
from bloodray.models import create_model
from bloodray.nightly.differential import compute_differentials, count_columns, flag_columns
from bloodray.nightly.contract import FLAGS_UNVERIFIED
from bloodray.nightly.shift import apply_shift, group_statistics, reference_for_run
from bloodray.predict import CellPredictor


def _features(rng, n, shift=0.0):
    """Three classes in a 12-d 'penultimate' space and a 6-d 'early' space; ``shift`` moves the early statistics."""
    labels = rng.integers(0, 3, n)
    centres = np.eye(3, 12) * 6.0
    pen = centres[labels] + rng.normal(size=(n, 12))
    early = rng.normal(size=(n, 6)) @ np.diag([1, 2, 1, 0.5, 1, 1]) + shift
    return pen, labels, early


def _fitted(features, seed: int, n_val: int, per_class: bool):
    """A reference fitted on 3000 training and ``n_val`` validation cells of ``features`` (classes a, b, c)."""
    rng = np.random.default_rng(seed)
    train_pen, train_y, train_early = features(rng, 3000)
    val_pen, val_y, val_early = features(rng, n_val)
    return fit_ood(train_pen, train_y, train_early, val_pen, val_early, ("features.7", 0),
                   val_classes=np.array(["a", "b", "c"])[val_y] if per_class else None)


@pytest.fixture(scope="module")
def reference():
    return _fitted(_features, 0, 2000, per_class=False)


def test_ood_score_is_low_in_distribution_and_high_for_shifted_cells(reference):
    rng = np.random.default_rng(1)
    pen, _, early = _features(rng, 2000)
    normal = reference.score(pen, early)
    pen_s, _, early_s = _features(rng, 500, shift=5.0)
    shifted = reference.score(pen_s, early_s)
    # The threshold is the 99.5 % validation quantile: about 0.5 % of new in-distribution cells lie above it.
    assert np.mean(normal > reference.threshold) < 0.015
    assert np.mean(shifted > reference.threshold) > 0.95
    # Cells between the class clusters (like no class) are also out of distribution.
    between = reference.score(np.full((50, 12), 3.0), rng.normal(size=(50, 6)))
    assert np.mean(between > reference.threshold) > 0.95
    assert reference.val_unidentified_share == pytest.approx(0.005, abs=0.002)
    assert len(reference.val_quantiles) == 101


def test_shift_statistics_need_significance_and_effect(reference):
    rng = np.random.default_rng(2)
    args = (reference.threshold, reference.val_quantiles, reference.val_unidentified_share)
    # Ordinary samples of 100 cells: never the alarm, however they fall.
    for _ in range(20):
        pen, _, early = _features(rng, 100)
        assert not shift_statistics(reference.score(pen, early), *args)["domain_shift"]
    # Three odd cells in a hundred are significant against a 0.5 % rate, but below the minimum effect.
    pen, _, early = _features(rng, 100)
    scores = reference.score(pen, early)
    scores[:3] = reference.threshold + 10
    stats = shift_statistics(scores, *args)
    assert stats["n_unidentified"] >= 3 and stats["unidentified_p_value"] < 0.05 and not stats["domain_shift"]
    # A shifted sample raises it, through both tests.
    pen, _, early = _features(rng, 100, shift=5.0)
    stats = shift_statistics(reference.score(pen, early), *args)
    assert stats["domain_shift"] and stats["share_unidentified"] > 0.9 and stats["ood_ks"] > 0.9
    assert stats["unidentified_p_value"] < 1e-6 and stats["ood_ks_p_value"] < 1e-6
    # A stricter rule (a higher minimum effect than the shift gives) does not fire.
    pen, _, early = _features(rng, 100, shift=1.0)
    mild = shift_statistics(reference.score(pen, early), *args)
    assert not shift_statistics(reference.score(pen, early), *args, ShiftRule(min_effect=1.0))["domain_shift"]
    assert mild["ood_ks"] > 0.3
    assert shift_statistics(np.array([]), *args) == {
        "n_unidentified": 0, "share_unidentified": None, "unidentified_p_value": None, "ood_ks": None,
        "ood_ks_p_value": None, "domain_shift": False}


def _counts(rows):
    cols = {"sample_id": [r[0] for r in rows], "n_images": [sum(r[1].values()) for r in rows],
            "n_classified": [sum(r[1].values()) for r in rows], "n_errors": [0] * len(rows),
            "n_review": [0] * len(rows)}
    for cls, col in zip(CLASS_NAMES, count_columns()):
        cols[col] = [r[1].get(cls, 0) for r in rows]
    return pa.table(cols)


def test_a_sample_under_the_alarm_keeps_its_flags_marked_unverified(reference):
    abnormal = {"neutrophil": 160, "lymphocyte": 20, "monocyte": 10, "eosinophil": 10}
    diffs = compute_differentials(_counts([("a", abnormal), ("b", abnormal)]))
    assert all(diffs.column("any_flag").to_pylist()) and "neutrophilia" in diffs.column("flags")[0].as_py()
    rng = np.random.default_rng(3)
    normal = reference.score(*_features(rng, 200)[::2])
    shifted = reference.score(*_features(rng, 200, shift=5.0)[::2])
    meta = reference.metadata("0" * 64)
    out, run = apply_shift(diffs, {"a": normal, "b": shifted},
                           {"a": int((normal > reference.threshold).sum()), "b": 190}, meta)
    rows = out.to_pylist()
    assert not rows[0]["domain_shift"] and "neutrophilia" in rows[0]["flags"] and not rows[0][FLAGS_UNVERIFIED]
    # Under the alarm: the alarm's flag first, then every flag the sample had, their columns still set.
    assert rows[1]["domain_shift"] and rows[1]["any_flag"] and rows[1][FLAGS_UNVERIFIED]
    assert rows[1]["flags"] == [SHIFT_FLAG, *rows[0]["flags"]]
    assert all(rows[1][c] == rows[0][c] for c in flag_columns()) and rows[1]["flag_neutrophil_high"]
    assert rows[1]["n_unidentified"] == 190
    assert run["domain_shift"] and run["n_samples_shifted"] == 1
    # Without an OOD reference: null statistics, no alarm, flags untouched.
    plain, run = apply_shift(diffs, {}, {"a": 0, "b": 0}, None)
    assert plain.column("flags").to_pylist() == diffs.column("flags").to_pylist()
    assert plain.column("ood_ks").null_count == 2 and not run["domain_shift"]
    assert plain.column(FLAGS_UNVERIFIED).to_pylist() == [False, False]


# --------------------------------------------------------------------------- the per-class reference
#: Per class: spread of the penultimate features and offset of the early ones. Class 2 (think immature
#: granulocytes) lies further from its mean and its early statistics differ, so its scores run higher.
_SPREAD, _EARLY = np.array([0.8, 1.0, 1.7]), np.array([0.0, 0.3, 1.2])


def _skewed(rng, n, mix=(1 / 3, 1 / 3, 1 / 3), shift=0.0):
    """Cells of one laboratory whose score distribution differs by class, in class proportions ``mix``."""
    labels = rng.choice(3, n, p=mix)
    pen = np.eye(3, 12)[labels] * 8.0 + rng.normal(size=(n, 12)) * _SPREAD[labels, None]
    early = rng.normal(size=(n, 6)) + _EARLY[labels, None] + shift
    return pen, labels, early


@pytest.fixture(scope="module")
def skewed_reference():
    return _fitted(_skewed, 10, 1500, per_class=True)


def _alarm(ref, pen, classes, early, per_class=True):
    names = np.array(["a", "b", "c"])[classes]
    return shift_statistics(ref.score(pen, early), ref.threshold, ref.val_quantiles, ref.val_unidentified_share,
                            n_val=ref.n_val, classes=names if per_class else None,
                            per_class=ref.per_class if per_class else None)


def test_the_per_class_reference_is_fitted_on_the_predicted_classes_and_stored(skewed_reference):
    ref = skewed_reference
    assert sorted(ref.per_class) == ["a", "b", "c"] and sum(r.n_val for r in ref.per_class.values()) == ref.n_val
    assert all(len(r.val_quantiles) == 101 for r in ref.per_class.values())
    # The class whose cells score higher has its own, higher, reference.
    assert ref.per_class["c"].val_quantiles[50] > ref.per_class["a"].val_quantiles[50] + 1.0
    # Round trip through the checkpoint metadata; a reference from before the per-class format loads pooled.
    blob = ref.tensors_bytes()
    meta = ref.metadata(hashlib.sha256(blob).hexdigest())
    back = OodReference.from_parts(json.loads(json.dumps(meta)), blob, "ck/ood.safetensors")
    assert back.per_class == ref.per_class and "per_class" not in back.extra
    old = {k: v for k, v in meta.items() if k != "per_class"}
    assert OodReference.from_parts(old, blob, "ck/ood.safetensors").per_class is None
    note = pooled_reference_note(old, "s3://lab/models/ck")
    assert "s3://lab/models/ck" in note and "jobs/fit_ood_packaged.py --data" in note
    assert "--checkpoint s3://lab/models/ck" in note
    assert pooled_reference_note(meta, "ck") is None and pooled_reference_note(None, "ck") is None


@pytest.mark.parametrize("mix", [(0.05, 0.05, 0.9), (0.9, 0.05, 0.05), (0.0, 0.0, 1.0), (0.5, 0.0, 0.5)])
def test_skewed_class_mixes_of_the_same_laboratory_raise_no_alarm(skewed_reference, mix):
    rng = np.random.default_rng(11)
    # 100 cells: the minimum effect binds, never an alarm. 50 cells: the significance binds, so about alpha
    # (0.1 %) of any sample of the laboratory -- skewed or not -- raises it: at most 2 of 300 here.
    for n, most in ((100, 0), (50, 2)):
        alarms = [_alarm(skewed_reference, *_skewed(rng, n, mix))["domain_shift"] for _ in range(300)]
        assert sum(alarms) <= most, (mix, n, sum(alarms))


def test_the_pooled_reference_mistook_a_skewed_mix_for_a_shift_and_the_per_class_one_still_sees_one(
        skewed_reference):
    rng = np.random.default_rng(12)
    # What the pooled reference did with the same cells: a sample of the high-scoring class raises the alarm.
    pooled = [_alarm(skewed_reference, *_skewed(rng, 100, (0.05, 0.05, 0.9)), per_class=False) for _ in range(20)]
    assert np.mean([s["domain_shift"] for s in pooled]) > 0.5
    # Another laboratory's cells, whatever their mix, all raise it under the per-class reference.
    for mix in ((1 / 3, 1 / 3, 1 / 3), (0.05, 0.05, 0.9), (0.9, 0.05, 0.05)):
        for n in (50, 100):
            stats = _alarm(skewed_reference, *_skewed(rng, n, mix, shift=3.0))
            assert stats["domain_shift"] and stats["ood_ks"] > 0.5, (mix, n)
    # A class with too few validation cells for its own reference is compared with the pooled one.
    few = {"a": dataclasses.replace(skewed_reference.per_class["a"], n_val=MIN_CLASS_CELLS - 1,
                                    val_quantiles=[100.0] * 101)}
    pen, labels, early = _skewed(rng, 100, (1.0, 0.0, 0.0), shift=3.0)
    stats = shift_statistics(skewed_reference.score(pen, early), skewed_reference.threshold,
                             skewed_reference.val_quantiles, skewed_reference.val_unidentified_share,
                             classes=np.array(["a"] * 100), per_class=few)
    assert stats["domain_shift"]


# --------------------------------------------------------------------------- the reference per arithmetic
def _rounded(pen, early, rng, noise=0.7):
    """The same cells' features as a lower precision computes them: rounding noise, which lengthens every distance
    (what bf16 does to the packaged model's features: docs/RESULTS.md)."""
    return pen + rng.normal(size=pen.shape) * noise, early + rng.normal(size=early.shape) * noise


@pytest.fixture(scope="module")
def two_arithmetics():
    """A per-class reference fitted in fp32 with a bf16 validation reference of the same cells beside it."""
    rng = np.random.default_rng(20)
    train_pen, train_y, train_early = _skewed(rng, 3000)
    val_pen, val_y, val_early = _skewed(rng, 1500)
    names = np.array(["a", "b", "c"])
    bf16 = (*_rounded(val_pen, val_early, rng), names[val_y])
    return fit_ood(train_pen, train_y, train_early, val_pen, val_early, ("features.7", 0), val_classes=names[val_y],
                   precision="fp32", other_val={"bf16": bf16})


def test_the_reference_is_kept_per_arithmetic_and_a_skewed_mix_is_compared_with_its_own(two_arithmetics):
    ref = two_arithmetics
    blob = ref.tensors_bytes()
    meta = json.loads(json.dumps(ref.metadata(hashlib.sha256(blob).hexdigest())))
    assert meta["precision"] == "fp32" and set(meta["by_precision"]) == {"bf16"}
    assert set(meta["by_precision"]["bf16"]["per_class"]) == {"a", "b", "c"}
    back = OodReference.from_parts(meta, blob, "ck/ood.safetensors")
    assert back.by_precision == ref.by_precision and "by_precision" not in back.extra
    # Rounding lengthens the distances: the bf16 reference of the same cells sits higher, class by class.
    bf16 = back.for_precision("bf16")
    assert bf16.precision == "bf16" and bf16.threshold > ref.threshold
    for name in "abc":
        assert bf16.per_class[name].val_quantiles[50] > ref.per_class[name].val_quantiles[50]
    # The metadata form agrees with the object form (the job reads the one, the predictor the other), and the way
    # back gives the fp32 reference again.
    as_meta = for_precision(meta, "bf16")
    assert as_meta["threshold"] == bf16.threshold and as_meta["val_quantiles"] == bf16.val_quantiles
    assert "by_precision" not in as_meta and bf16.for_precision("fp32").threshold == ref.threshold
    # An OpenVINO path counts as its arithmetic; one without a reference, or none, gets the entry's own.
    assert precision_of("bf16 (openvino)") == "bf16" and precision_of("") is None
    assert for_precision(meta, "bf16 (openvino)")["precision"] == "bf16"
    assert for_precision(meta, "int8")["precision"] == "fp32" and for_precision(meta, None)["precision"] == "fp32"
    # A reference from before this format is fp32 (the only arithmetic then) and has nothing else.
    legacy = {k: v for k, v in meta.items() if k not in ("precision", "by_precision")}
    assert precisions_of(legacy) == [LEGACY_PRECISION] and for_precision(legacy, "bf16")["precision"] == "fp32"
    assert OodReference.from_parts(legacy, blob, "ck").precision == LEGACY_PRECISION
    assert precisions_of(meta) == ["fp32", "bf16"]

    # Skewed mixes of the training laboratory scored in bf16: against the fp32 reference they read as another
    # laboratory; against the bf16 one (what the job compares with) they raise no alarm. Another laboratory's
    # cells still do.
    rng = np.random.default_rng(21)
    names = np.array(["a", "b", "c"])
    wrong = right = 0
    for mix in ((0.05, 0.05, 0.9), (0.9, 0.05, 0.05), (1 / 3, 1 / 3, 1 / 3)):
        for _ in range(60):
            pen, labels, early = _skewed(rng, 100, mix)
            scores = ref.score(*_rounded(pen, early, rng))
            wrong += group_statistics(scores, names[labels], for_precision(meta, "fp32"))["domain_shift"]
            right += group_statistics(scores, names[labels], for_precision(meta, "bf16"))["domain_shift"]
        pen, labels, early = _skewed(rng, 50, mix, shift=3.0)
        assert group_statistics(ref.score(*_rounded(pen, early, rng)), names[labels],
                                for_precision(meta, "bf16"))["domain_shift"]
    assert right == 0 and wrong > 150, (right, wrong)  # of 180


def test_unseen_training_cells_join_the_reference_but_not_the_threshold():
    rng = np.random.default_rng(22)
    train_pen, train_y, train_early = _skewed(rng, 3000)
    val_pen, val_y, val_early = _skewed(rng, 600)
    more_pen, more_y, more_early = _skewed(rng, 2400)
    names = np.array(["a", "b", "c"])
    alone = fit_ood(train_pen, train_y, train_early, val_pen, val_early, ("features.7", 0), val_classes=names[val_y])
    both = fit_ood(train_pen, train_y, train_early, np.r_[val_pen, more_pen], np.r_[val_early, more_early],
                   ("features.7", 0), val_classes=names[np.r_[val_y, more_y]],
                   reference_only=np.arange(3000) >= 600)
    # Standardisation and threshold stay the val cells'; the distributions are of all 3,000 cells.
    assert (both.pen_scale, both.early_scale, both.threshold) == (alone.pen_scale, alone.early_scale, alone.threshold)
    assert both.n_val == 3000 and sum(r.n_val for r in both.per_class.values()) == 3000
    assert both.val_quantiles != alone.val_quantiles


def test_the_run_compares_with_the_reference_of_its_actors_arithmetic(two_arithmetics, caplog):
    meta = two_arithmetics.metadata("0" * 64)
    assert reference_for_run(None, {"bf16"}) is None
    assert reference_for_run(meta, {"bf16"})["precision"] == "bf16"
    assert reference_for_run(meta, {"bf16 (openvino)"})["precision"] == "bf16"
    assert reference_for_run(meta, {"fp32"})["precision"] == "fp32"
    # Every row resumed (no actor ran): the entry's own, silently.
    assert reference_for_run(meta, set())["precision"] == "fp32" and not caplog.records
    # Actors of several arithmetics (a mixed cluster): the entry's own, said aloud.
    assert reference_for_run(meta, {"bf16", "fp32"})["precision"] == "fp32"
    assert "fp32" in caplog.text and "bf16" in caplog.text
    caplog.clear()
    # A reference with no bf16 part (fitted before the format): fp32, and the warning names the refit.
    legacy = {k: v for k, v in meta.items() if k not in ("precision", "by_precision")}
    assert reference_for_run(legacy, {"bf16"})["precision"] == "fp32" and "fit_ood_packaged" in caplog.text


def _tiny_checkpoint(tmp_path: Path) -> str:
    model = create_model("bloodnet", len(CLASS_NAMES), pretrained=False, filters=(8, 8, 8, 8, 8, 8, 8),
                         batch_norm=True, input_size=32)
    meta = CheckpointMetadata("bloodnet", list(CLASS_NAMES), 32, [0.5] * 3, [0.5] * 3,
                              model_kwargs={"filters": [8] * 7, "batch_norm": True, "input_size": 32})
    write_checkpoint(tmp_path / "plain", model, meta)
    return str(tmp_path / "plain")


def test_the_checkpoint_seal_covers_the_ood_file(tmp_path, reference):
    plain = _tiny_checkpoint(tmp_path)
    assert "ood" not in json.loads((Path(plain) / "bloodray.json").read_text())
    assert load_checkpoint(plain).ood is None
    images = np.random.default_rng(0).integers(0, 255, (4, 32, 32, 3), dtype=np.uint8)
    out = CellPredictor(plain, device="cpu")({"image": images})
    assert np.isnan(out["ood_score"]).all() and not out["unidentified"].any()

    loaded = load_checkpoint(plain)
    assert early_layer(loaded.model, 32) == ("features.7", 0)  # BloodNet+BN: the ReLU of block 2
    predictor = CellPredictor(plain, device="cpu", return_features=True)
    feats = predictor({"image": np.random.default_rng(1).integers(0, 255, (40, 32, 32, 3), dtype=np.uint8)})
    labels = np.arange(40) % 3
    ref = fit_ood(feats["ood_pen"][:30].astype(float), labels[:30], feats["ood_early"][:30].astype(float),
                  feats["ood_pen"][30:].astype(float), feats["ood_early"][30:].astype(float),
                  early_layer(loaded.model, 32))
    blob = ref.tensors_bytes()
    with pytest.raises(CheckpointError, match="ood update needs"):
        export_checkpoint(plain, str(tmp_path / "x"), ood=ref.metadata("0" * 64), ood_file=blob)
    dest = export_checkpoint(plain, str(tmp_path / "ood"), ood=ref.metadata(hashlib.sha256(blob).hexdigest()),
                             ood_file=blob)
    assert read_metadata(dest).checkpoint_id != read_metadata(plain).checkpoint_id
    scored = CellPredictor(dest, device="cpu")({"image": images})
    assert np.isfinite(scored["ood_score"]).all()
    # A re-export (e.g. a new temperature) carries the OOD file along.
    again = export_checkpoint(dest, str(tmp_path / "again"), temperature=2.0)
    assert load_checkpoint(again).ood.threshold == pytest.approx(ref.threshold)

    # The predictor scores against the reference of the arithmetic it chose (load time): here a reference whose own
    # part is bf16 with an fp32 part beside it, and a checkpoint without a self-check, so fp32 runs.
    val_pen, val_early = feats["ood_pen"][30:].astype(float), feats["ood_early"][30:].astype(float)
    two = fit_ood(feats["ood_pen"][:30].astype(float), labels[:30], feats["ood_early"][:30].astype(float),
                  val_pen + 0.5, val_early + 0.5, early_layer(loaded.model, 32), precision="bf16",
                  other_val={"fp32": (val_pen, val_early, None)})
    blob2 = two.tensors_bytes()
    both = export_checkpoint(plain, str(tmp_path / "both"), ood=two.metadata(hashlib.sha256(blob2).hexdigest()),
                             ood_file=blob2)
    predictor = CellPredictor(both, device="cpu")
    assert predictor.precision == "fp32" and predictor.ood.precision == "fp32"
    assert predictor.ood.threshold == pytest.approx(two.by_precision["fp32"]["threshold"]) != two.threshold
    out = predictor({"image": images})
    assert (out["unidentified"] == (out["ood_score"] > two.by_precision["fp32"]["threshold"])).all()

    # Tampering with the OOD file, or with its metadata, is refused.
    (Path(again) / OOD_FILE).write_bytes(blob[:-8] + b"\0" * 8)
    with pytest.raises(CheckpointError, match="OOD file does not match"):
        load_checkpoint(again)
    meta_path = Path(dest) / "bloodray.json"
    raw = json.loads(meta_path.read_text())
    raw["ood"]["threshold"] = 1e9
    meta_path.write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match="seal"):
        load_checkpoint(dest)
