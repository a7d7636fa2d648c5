"""Temperature scaling and the review threshold on constructed logits with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from bloodray.evaluation.calibration import (calibrate, choose_review_threshold, expected_calibration_error, fit_temperature,
                                  review_tradeoff, softmax)


def _sample(true_temperature: float, n: int = 20000, classes: int = 8, seed: int = 0):
    """Labels drawn from softmax(z / T): logits z are over-confident by exactly T."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 3, size=(n, classes))
    probs = softmax(logits, true_temperature)
    labels = np.array([rng.choice(classes, p=p) for p in probs])
    return logits, labels


@pytest.mark.parametrize("true_t", [0.5, 1.0, 2.5])
def test_fit_temperature_recovers_the_true_temperature(true_t):
    logits, labels = _sample(true_t)
    assert fit_temperature(logits, labels) == pytest.approx(true_t, rel=0.06)


def test_calibration_lowers_ece():
    logits, labels = _sample(2.0, seed=1)
    report = calibrate(logits, labels)
    assert report.val_ece_before > 0.05
    assert report.val_ece_after < 0.02
    assert report.val_nll_after < report.val_nll_before


def test_ece_known_values():
    # Perfectly calibrated bins: confidence 0.8 right 80 % of the time.
    probs = np.tile([[0.8, 0.2]], (10, 1))
    labels = np.array([0] * 8 + [1] * 2)
    assert expected_calibration_error(probs, labels) == pytest.approx(0.0)
    # Always 100 % confident, right half the time: ECE 0.5.
    probs = np.tile([[1.0, 0.0]], (10, 1))
    labels = np.array([0] * 5 + [1] * 5)
    assert expected_calibration_error(probs, labels) == pytest.approx(0.5)


def test_review_threshold_respects_the_budget_and_catches_low_confidence_errors():
    confidence = np.array([0.30, 0.40, 0.55, 0.90, 0.95, 0.96, 0.97, 0.98, 0.99, 0.995] * 10)
    correct = np.array([False, False, True, True, True, True, True, True, True, True] * 10)
    threshold = choose_review_threshold(confidence, correct, max_flagged_share=0.2)
    assert threshold == pytest.approx(0.475)  # between 0.40 and 0.55: flags exactly the 20 % least confident
    tradeoff = review_tradeoff(confidence, correct, threshold)
    assert tradeoff.flagged_share == pytest.approx(0.2)
    assert tradeoff.errors_caught == pytest.approx(1.0)
    # A smaller budget flags fewer cells and can only catch fewer errors.
    small = review_tradeoff(confidence, correct, choose_review_threshold(confidence, correct, 0.1))
    assert small.flagged_share == pytest.approx(0.1) and small.errors_caught == pytest.approx(0.5)


def test_review_threshold_with_ties_never_exceeds_the_budget():
    confidence = np.array([0.5] * 10 + [0.9] * 90)
    correct = np.ones(100, dtype=bool)
    threshold = choose_review_threshold(confidence, correct, 0.05)
    assert review_tradeoff(confidence, correct, threshold).flagged_share <= 0.05


def test_calibration_seals_val_size_accuracy_recall_and_confusion():
    from bloodray.classes import CLASS_NAMES
    from bloodray.checkpoint import CheckpointMetadata

    logits, labels = _sample(1.5, n=2000, seed=2)
    report = calibrate(logits, labels)
    predicted = logits.argmax(axis=1)
    assert report.val_size == len(labels) == report.n_val
    assert report.val_accuracy == pytest.approx(float((predicted == labels).mean()))
    confusion = np.asarray(report.val_confusion)
    assert confusion.shape == (len(CLASS_NAMES), len(CLASS_NAMES)) and confusion.sum() == len(labels)
    # Rows are the true class, columns the predicted one, in CLASS_NAMES order.
    assert confusion[2, 5] == int(((labels == 2) & (predicted == 5)).sum())
    for i, name in enumerate(CLASS_NAMES):
        assert report.val_recall[name] == pytest.approx(float((predicted[labels == i] == i).mean()))
    # The confident matrix counts only cells not sent to review (confidence at or above the threshold).
    confident = softmax(logits, report.temperature).max(axis=1) >= report.review_threshold
    assert np.asarray(report.val_confusion_confident).sum() == confident.sum() < len(labels)
    # The one accessor readers use, on the metadata calibrate seals.
    meta = CheckpointMetadata("bloodnet", list(CLASS_NAMES), 64, [0.5] * 3, [0.5] * 3, calibration=report.to_dict())
    np.testing.assert_array_equal(meta.val_confusion(), confusion)
    assert meta.val_confusion(confident=True).sum() == confident.sum()
    assert CheckpointMetadata("bloodnet", list(CLASS_NAMES), 64, [0.5] * 3, [0.5] * 3).val_confusion() is None


def test_a_class_without_val_cells_has_no_recall():
    from bloodray.classes import CLASS_NAMES

    logits, labels = _sample(1.0, n=500, seed=3)
    keep = labels != 4
    report = calibrate(logits[keep], labels[keep])
    assert report.val_recall[CLASS_NAMES[4]] is None
