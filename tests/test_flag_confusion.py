"""Flags that account for the classifier's own errors (issue 21, item 3).

A confusion matrix shaped like the shipped model's on PBC val (a few
neutrophils and monocytes called "ig", lymphocytes called erythroblasts)
makes healthy samples look left-shifted to the counting-error rule; with the
matrix in :class:`FlagRules` the counts are corrected and the spurious flags
go, while truly abnormal samples keep theirs. Without a matrix the rule is
today's, and every output says so.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pyarrow as pa
import pytest

from bloodray.classes import CLASS_NAMES, CLASS_TO_INDEX
from bloodray.nightly.differential import (
    ConfusionError,
    FlagRules,
    ModelConfusion,
    checkpoint_confusion,
    compute_differentials,
    count_columns,
    differential,
    differential_fields,
    interval_columns,
    rules_data,
)
from bloodray.nightly.plan import RunResult
from bloodray.nightly.summary import run_summary
from bloodray.analysis.review_views import run_flag_rules

VAL_CELLS = {"basophil": 120, "eosinophil": 310, "erythroblast": 150, "ig": 290, "lymphocyte": 120,
             "monocyte": 140, "neutrophil": 330, "platelet": 230}
#: (true, predicted, share of the true class's val cells): the kind of errors the shipped model makes.
ERRORS = [("neutrophil", "ig", 0.028), ("monocyte", "ig", 0.024), ("ig", "neutrophil", 0.04),
          ("lymphocyte", "erythroblast", 0.02), ("ig", "monocyte", 0.02), ("basophil", "ig", 0.02)]
HEALTHY = {"neutrophil": 55.875, "lymphocyte": 35.875, "monocyte": 5.0, "eosinophil": 2.5, "basophil": 0.75}


def _confusion_counts(errors=ERRORS) -> np.ndarray:
    counts = np.diag([VAL_CELLS[c] for c in CLASS_NAMES]).astype(np.int64)
    for true, pred, share in errors:
        i, j = CLASS_TO_INDEX[true], CLASS_TO_INDEX[pred]
        moved = int(round(share * VAL_CELLS[true]))
        counts[i, j] += moved
        counts[i, i] -= moved
    return counts


CONFUSION = ModelConfusion.from_counts(_confusion_counts())
PLAIN = FlagRules(min_wbc=0)
AWARE = FlagRules(min_wbc=0, confusion=CONFUSION)


def _through_model(profile: dict[str, float], n: int, trials: int, seed: int) -> pa.Table:
    """Samples of ``n`` cells drawn from ``profile`` (% by true class), each cell classified through the confusion."""
    rng = np.random.default_rng(seed)
    p = np.array([profile.get(c, 0.0) for c in CLASS_NAMES])
    true = rng.multinomial(n, p / p.sum(), size=trials)
    observed = np.zeros_like(true)
    for i in range(len(CLASS_NAMES)):
        observed += np.stack([rng.multinomial(k, CONFUSION.rates[i]) for k in true[:, i]])
    return pa.table({col: observed[:, j] for j, col in enumerate(count_columns())})


def _rate(table: pa.Table, rules: FlagRules, column: str = "any_flag") -> float:
    return float(np.mean(compute_differentials(table, rules).column(column).to_numpy(zero_copy_only=False)))


def test_spurious_ig_no_longer_flags_a_healthy_sample_and_a_left_shift_still_does():
    healthy = {"neutrophil": 55, "lymphocyte": 34, "monocyte": 5, "eosinophil": 2, "ig": 4}
    assert differential(healthy, PLAIN)["flags"] == ["immature granulocytes"]  # 4 "ig" of 100: the old rule flags
    row = differential(healthy, AWARE)
    assert row["flags"] == [] and row["flags_confusion_corrected"]
    assert row["ig_per_100_wbc"] == 4.0  # the observed rate is still what was counted
    assert row["ig_per_100_wbc_lo"] < PLAIN.ig_percent < differential(healthy, PLAIN)["ig_per_100_wbc_lo"]
    left_shift = {"neutrophil": 120, "lymphocyte": 50, "monocyte": 10, "eosinophil": 4, "basophil": 1, "ig": 15}
    assert "immature granulocytes" in differential(left_shift, AWARE)["flags"]


def test_healthy_samples_through_the_model_are_rarely_flagged_abnormal_ones_still_are():
    healthy = _through_model(HEALTHY, 100, 3000, seed=1)
    assert _rate(healthy, PLAIN, "flag_ig") > 0.05  # the model's own "ig" flags healthy samples ...
    assert _rate(healthy, AWARE, "flag_ig") < 0.01  # ... not once its confusion is accounted for
    assert _rate(healthy, AWARE) <= 0.05 < _rate(healthy, PLAIN)
    # A left shift of 6 % ig: flagged at 400 cells (at 200, 0.87: the continuity correction's price, 0.90 without).
    left = _through_model(dict(HEALTHY, neutrophil=HEALTHY["neutrophil"] - 6.0, ig=6.0), 400, 1000, seed=2)
    assert _rate(left, AWARE, "flag_ig") >= 0.9
    scale = 20.0 / (100.0 - HEALTHY["neutrophil"])
    neutrophilia = _through_model({**{k: v * scale for k, v in HEALTHY.items()}, "neutrophil": 80.0}, 200, 1000, 3)
    assert _rate(neutrophilia, AWARE, "flag_neutrophil_high") >= 0.9


def test_a_perfect_confusion_gives_the_counting_error_intervals():
    rng = np.random.default_rng(0)
    counts = pa.table({col: rng.integers(0, 60, 40) for col in count_columns()})
    perfect = ModelConfusion.from_counts(np.diag(np.full(len(CLASS_NAMES), 500)))
    plain = compute_differentials(counts, PLAIN).to_pydict()
    # Taken at its word (no prior on the rows' rates: prior 0), a perfect confusion is exactly the counting error.
    exact = compute_differentials(counts, FlagRules(min_wbc=0, confusion=dataclasses.replace(perfect, prior=0.0)))
    # With the Jeffreys prior, 500 error-free val cells per class still leave room for errors never seen: the
    # intervals hold the counting-error ones and are barely wider.
    aware = compute_differentials(counts, FlagRules(min_wbc=0, confusion=perfect)).to_pydict()
    exact = exact.to_pydict()
    for col in interval_columns():
        np.testing.assert_allclose(np.array(exact[col], float), np.array(plain[col], float), rtol=1e-9, atol=1e-12)
        got, want = np.array(aware[col], float), np.array(plain[col], float)
        if col.endswith("_lo"):
            assert np.all((got <= want + 1e-12) & (got >= want - 0.05)), col
        else:
            assert np.all((got >= want - 1e-12) & (got <= want + 0.05)), col
    for name, _type in differential_fields():
        if name not in interval_columns() and not name.startswith("abs_") and name != "flags_confusion_corrected":
            assert exact[name] == plain[name], name
    assert set(plain["flags_confusion_corrected"]) == {False} and set(aware["flags_confusion_corrected"]) == {True}


def test_an_error_val_never_showed_still_widens_the_interval():
    # 0 of 500 neutrophils called basophils on val: the Jeffreys posterior still gives that error a variance, so
    # the basophil interval of a neutrophil-rich sample is wider than with the raw (zero) rate.
    perfect = ModelConfusion.from_counts(np.diag(np.full(len(CLASS_NAMES), 500)))
    counts = {"neutrophil": 150, "lymphocyte": 40, "monocyte": 6, "eosinophil": 2, "basophil": 2}
    raw = differential(counts, FlagRules(min_wbc=0, confusion=dataclasses.replace(perfect, prior=0.0)))
    jeffreys = differential(counts, FlagRules(min_wbc=0, confusion=perfect))
    assert jeffreys["pct_basophil_hi"] - jeffreys["pct_basophil_lo"] > raw["pct_basophil_hi"] - raw["pct_basophil_lo"]
    assert perfect.posterior_rates[0, 1] == pytest.approx(0.5 / 504) and perfect.posterior_cells[0] == 505.0


def test_the_confusion_estimate_uncertainty_widens_the_interval():
    counts = {"neutrophil": 120, "lymphocyte": 60, "monocyte": 12, "ig": 8}
    small_val = ModelConfusion.from_counts(_confusion_counts())  # the same rates, measured on 20 times fewer cells
    big_val = ModelConfusion.from_counts(_confusion_counts() * 20)
    widths = [differential(counts, FlagRules(min_wbc=0, confusion=c))["ig_per_100_wbc_hi"]
              - differential(counts, FlagRules(min_wbc=0, confusion=c))["ig_per_100_wbc_lo"]
              for c in (big_val, small_val)]
    assert widths[0] < widths[1]


@pytest.mark.parametrize("counts, message", [
    (np.eye(3), "8 x 8"),
    (-np.eye(len(CLASS_NAMES)), "integers >= 0"),
    (np.eye(len(CLASS_NAMES)) * 0.5, "integers >= 0"),
    (np.diag([0] + [5] * (len(CLASS_NAMES) - 1)), "no val cells of basophil"),
    (np.ones((len(CLASS_NAMES), len(CLASS_NAMES)), dtype=int), "singular"),
])
def test_a_matrix_that_cannot_correct_counts_is_refused_with_its_reason(counts, message):
    with pytest.raises(ConfusionError, match=message):
        ModelConfusion.from_counts(counts, "ckpt: val confusion")
    confusion, why = checkpoint_confusion(counts.tolist(), "ckpt")
    assert confusion is None and message.split()[0] in why and "every cell is classified right" in why


def test_without_a_matrix_the_fallback_is_visible_everywhere():
    confusion, why = checkpoint_confusion(None, "/models/old")
    assert confusion is None and "/models/old" in why and "no val confusion matrix" in why
    assert checkpoint_confusion(_confusion_counts().tolist(), "ckpt") == (CONFUSION, None)
    result = RunResult(run_id="r1", run_date="2026-12-01", output_uri="/out", manifest_uri="/out/m",
                       checkpoint_id="bloodnet-x", n_inputs=1, n_predictions=1, n_errors=0, n_samples=1,
                       n_review=0, incremental_skipped_samples=0, timings={}, flags_uncorrected=why)
    assert "flags: NOT corrected for the model's errors" in result.describe()
    assert "r1" in result.flags_warning() and why in result.flags_warning()
    assert run_summary(result)["flags"] == {"confusion_corrected": False, "note": why}
    corrected = RunResult(**{**result.to_dict(), "flags_uncorrected": None})
    assert corrected.flags_warning() is None and run_summary(corrected)["flags"]["confusion_corrected"]
    assert differential({"neutrophil": 50}, PLAIN)["flags_confusion_corrected"] is False


def test_the_review_path_gets_the_runs_confusion():
    rules, _ = run_flag_rules("flags: {ig_percent: 2.0}\n", None, json.dumps(CONFUSION.counts))
    assert rules.confusion == CONFUSION and rules.ig_percent == 2.0
    assert run_flag_rules("flags: {}\n", None, None)[0].confusion is None
    with pytest.warns(UserWarning, match="perfect classifier"):
        assert run_flag_rules("flags: {}\n", None, "[[1, 2]]")[0].confusion is None
    data = rules_data(rules)
    assert np.allclose(np.array(data["confusion"]["inverse_t"]) @ CONFUSION.rates.T, np.eye(len(CLASS_NAMES)))
    assert rules_data(PLAIN)["confusion"] is None


@pytest.mark.slow
def test_nightly_runs_say_whether_their_flags_carry_the_models_confusion(tmp_path, ray_cluster):
    from bloodray.analysis.query import read_table
    from bloodray.analysis.report import write_report
    from bloodray.checkpoint import export_checkpoint, read_metadata
    from bloodray.config import load_config
    from bloodray.data import synth
    from bloodray.nightly import tables
    from bloodray.nightly.config import ClassifyConfig
    from bloodray.nightly.pipeline import run_classification
    from helpers_model import train_quick_checkpoint

    trained = train_quick_checkpoint(tmp_path / "checkpoint", size=64)
    meta = read_metadata(trained)
    # The helper seals a val calibration with its own matrix: "plain" is one calibrated before the matrix existed.
    plain = export_checkpoint(trained, str(tmp_path / "plain"), calibration={
        k: v for k, v in meta.calibration.items() if not k.startswith("val_confusion")})
    sealed = export_checkpoint(trained, str(tmp_path / "calibrated"),
                               calibration={**meta.calibration, "val_confusion": _confusion_counts().tolist()})
    archive = tmp_path / "archive"
    synth.write_archive(str(archive), synth.default_samples(2, 40, seed=1), size=64, seed=3)
    for checkpoint, corrected in ((plain, False), (sealed, True)):
        out = tmp_path / f"out-{corrected}"
        cfg = load_config(ClassifyConfig, None, [f"input.uri={archive}", f"output.uri={out}",
                                                 f"model.checkpoint={checkpoint}", "inference.batch_size=32"])
        result = run_classification(cfg)
        diffs = read_table(str(out), "differentials").to_pylist()
        run = tables.visible_runs(str(out)).to_pylist()[0]
        assert diffs and all(d["flags_confusion_corrected"] is corrected for d in diffs)
        if corrected:
            assert result.flags_warning() is None and json.loads(run["flag_confusion_json"]) == list(
                map(list, CONFUSION.counts))
        else:
            assert "no val confusion matrix" in result.flags_warning() and run["flag_confusion_json"] is None
            assert "NOT corrected" in result.describe()
        # The night's report says which kind of intervals its samples show.
        html = open(write_report(str(out), dest=str(tmp_path / f"report-{corrected}"))).read()
        assert ("corrected for the model's measured confusion" in html) is corrected
        assert ("assume every cell was classified right" in html) is not corrected
        # The verified differential (no reviews yet) recomputes the flags with the run's own confusion.
        verified = read_table(str(out), "verified_differentials").to_pylist()
        assert [v["flags"] for v in verified] == [d["flags"] for d in sorted(diffs, key=lambda d: d["sample_id"])]


def test_cells_a_reviewer_verified_are_not_corrected():
    # 5 "ig" of 100 that a reviewer confirmed are immature granulocytes: the flag stands; unreviewed, it does not.
    counts = {"neutrophil": 56, "lymphocyte": 33, "monocyte": 4, "eosinophil": 2, "ig": 5}
    table = pa.table({**{col: [counts.get(n, 0)] * 2 for n, col in zip(CLASS_NAMES, count_columns())},
                      **{f"verified_{col}": [0, counts.get(n, 0) if n == "ig" else 0]
                         for n, col in zip(CLASS_NAMES, count_columns())}})
    rows = compute_differentials(table, AWARE).to_pylist()
    assert rows[0]["flags"] == [] and rows[1]["flags"] == ["immature granulocytes"]
    # Every cell verified: the plain counting-error interval.
    all_verified = pa.table({**{col: [counts.get(n, 0)] for n, col in zip(CLASS_NAMES, count_columns())},
                             **{f"verified_{col}": [counts.get(n, 0)] for n, col in zip(CLASS_NAMES, count_columns())}})
    got = compute_differentials(all_verified, AWARE).to_pylist()[0]
    want = differential(counts, PLAIN)
    for col in interval_columns():
        assert got[col] == pytest.approx(want[col], rel=1e-9, abs=1e-12), col
    with pytest.raises(ValueError, match="verified_count"):
        compute_differentials(pa.table({**{c: [1] for c in count_columns()},
                                        **{f"verified_{c}": [2] for c in count_columns()}}), AWARE)


def _cells(per_class: int, errors: dict[str, int], default: int):
    """(labels, predicted): ``per_class`` cells of every class, ``errors[class]`` (else ``default``) of them called
    the next class."""
    labels, predicted = [], []
    for i, name in enumerate(CLASS_NAMES):
        wrong = errors.get(name, default)
        labels += [i] * per_class
        predicted += [(i + 1) % len(CLASS_NAMES)] * wrong + [i] * (per_class - wrong)
    return np.array(labels), np.array(predicted)


def test_training_cells_join_the_flags_confusion_only_when_the_model_does_no_better_on_them():
    """Val's ~125 cells per class miss a model's rarer errors; training cells are a larger sample of them, unless the
    model fitted them (then their confusion would make the flags trust it more than it deserves)."""
    from bloodray.evaluation.calibration import TRAIN_CONFUSION_MIN_P, confusion_counts, training_confusion

    val = confusion_counts(*_cells(125, {"neutrophil": 6}, 3))
    # As robust-v2: about val's error rate on seven times the cells.
    alike = training_confusion(*_cells(875, {"neutrophil": 40}, 21), val)
    assert alike["joined"] and alike["p_value"] >= TRAIN_CONFUSION_MIN_P and alike["cells"] == 7000
    assert np.asarray(alike["confusion"]).sum() == 7000 and set(alike["class_p_values"]) == set(CLASS_NAMES)
    # A model that fitted its training cells (no errors on them) keeps val's confusion alone ...
    fitted = training_confusion(*_cells(875, {}, 0), val)
    assert not fitted["joined"] and fitted["p_value"] < TRAIN_CONFUSION_MIN_P
    # ... and so does one that fitted a single class, however alike the rest.
    one = training_confusion(*_cells(875, {"neutrophil": 0}, 21), val)
    assert one["p_value"] >= TRAIN_CONFUSION_MIN_P and not one["joined"]
    assert one["class_p_values"]["neutrophil"] < TRAIN_CONFUSION_MIN_P / len(CLASS_NAMES)


def test_the_flags_correct_with_val_plus_the_joined_training_cells():
    from bloodray.checkpoint import read_metadata
    from bloodray.packaged import models

    meta = read_metadata(str(next(m for m in models() if m.name == "robust-v2").path))
    val = meta.val_confusion()
    train = meta.calibration["train_confusion"]
    # robust-v2 (issue 21) does no better on its training cells than on val: they join.
    assert train["joined"] and train["cells"] > 6000
    assert (meta.flag_confusion() == val + np.asarray(train["confusion"])).all()
    refused = dataclasses.replace(meta, calibration=dict(meta.calibration, train_confusion=dict(train, joined=False)))
    assert (refused.flag_confusion() == val).all()
    bare = dataclasses.replace(meta, calibration={k: v for k, v in meta.calibration.items() if k != "train_confusion"})
    assert (bare.flag_confusion() == val).all()
    assert dataclasses.replace(meta, calibration={}).flag_confusion() is None
