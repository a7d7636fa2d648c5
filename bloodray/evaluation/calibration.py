"""Confidence that means something: temperature scaling and the review threshold.

Both are fitted on the validation split and stored in the checkpoint
(``temperature``, ``review_threshold``, ``calibration``), where
:class:`~bloodray.predict.CellPredictor` and the classify job pick them up.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np

from bloodray.classes import CLASS_NAMES


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Softmax of ``logits / temperature`` (rows)."""
    return np.exp(_log_softmax(np.asarray(logits, dtype=np.float64) / temperature))


def negative_log_likelihood(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    """Mean cross-entropy of temperature-scaled logits."""
    logp = _log_softmax(np.asarray(logits, dtype=np.float64) / temperature)
    return float(-logp[np.arange(len(labels)), labels].mean())


def fit_temperature(logits: np.ndarray, labels: np.ndarray, bounds: tuple[float, float] = (0.01, 100.0)) -> float:
    """The temperature minimising validation NLL (Guo et al. 2017), by bounded scalar search.

    Log-probabilities work as well as logits: softmax is shift-invariant per row.
    """
    from scipy.optimize import minimize_scalar

    labels = np.asarray(labels, dtype=np.int64)
    logits = np.asarray(logits, dtype=np.float64)
    # Search log T so the optimiser treats "2x too hot" and "2x too cold" alike.
    result = minimize_scalar(lambda log_t: negative_log_likelihood(logits, labels, float(np.exp(log_t))),
                             bounds=(np.log(bounds[0]), np.log(bounds[1])), method="bounded",
                             options={"xatol": 1e-4})
    return float(np.exp(result.x))


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> float:
    """ECE with ``n_bins`` equal-width confidence bins: sum over bins of |accuracy - confidence| x share."""
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels)
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # Right-closed bins so a confidence of exactly 1.0 lands in the last bin.
    bins = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, n_bins - 1)
    ece = 0.0
    for b in range(n_bins):
        in_bin = bins == b
        if in_bin.any():
            ece += in_bin.mean() * abs(correct[in_bin].mean() - confidence[in_bin].mean())
    return float(ece)


@dataclass(frozen=True)
class ReviewTradeoff:
    """What a review threshold does on a labelled set."""

    threshold: float
    #: share of all cells sent to review.
    flagged_share: float
    #: share of the model's errors that are among the flagged cells.
    errors_caught: float
    n: int
    n_errors: int


def review_tradeoff(confidence: np.ndarray, correct: np.ndarray, threshold: float) -> ReviewTradeoff:
    """Flagged share and errors caught when cells under ``threshold`` go to review."""
    confidence = np.asarray(confidence, dtype=np.float64)
    correct = np.asarray(correct, dtype=bool)
    flagged = confidence < threshold
    errors = ~correct
    caught = float((flagged & errors).sum() / errors.sum()) if errors.any() else 1.0
    return ReviewTradeoff(float(threshold), float(flagged.mean()) if len(flagged) else 0.0, caught,
                          int(len(confidence)), int(errors.sum()))


def choose_review_threshold(confidence: np.ndarray, correct: np.ndarray, max_flagged_share: float = 0.05) -> float:
    """The highest threshold that flags at most ``max_flagged_share`` of cells.

    A higher threshold only adds cells to review, so under a review budget it
    catches the most errors. Thresholds sit halfway between observed
    confidences so ties cannot push the flagged share over the budget.
    """
    confidence = np.sort(np.asarray(confidence, dtype=np.float64))
    budget = int(np.floor(max_flagged_share * len(confidence)))
    if budget <= 0:
        return float(confidence[0]) if len(confidence) else 0.0
    if budget >= len(confidence):
        return 1.0
    # Flag exactly the `budget` least confident cells: threshold between #budget-1 and #budget.
    low, high = confidence[budget - 1], confidence[budget]
    if low == high:
        # Ties at the boundary: flag only strictly lower values.
        return float(high)
    return float((low + high) / 2.0)


@dataclass
class CalibrationReport:
    """Before/after numbers of a calibration, stored in the checkpoint metadata."""

    temperature: float
    review_threshold: float
    val_ece_before: float
    val_ece_after: float
    val_nll_before: float
    val_nll_after: float
    val_review: dict[str, Any]
    max_flagged_share: float
    n_val: int
    #: the val metrics the quality gate reads (:mod:`bloodray.quality_gate`) and confusion-aware flags use:
    #: number of val cells, accuracy, recall per class (None for a class with no val cell), and the confusion
    #: matrices (rows = true class, columns = predicted class, order :data:`bloodray.classes.CLASS_NAMES`)
    #: of all val cells and of the cells at or above the review threshold (those not sent to review).
    val_size: int = 0
    val_accuracy: float = 0.0
    val_recall: dict[str, float | None] = dataclasses.field(default_factory=dict)
    val_confusion: list[list[int]] = dataclasses.field(default_factory=list)
    val_confusion_confident: list[list[int]] = dataclasses.field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def calibrate(logits: np.ndarray, labels: np.ndarray, max_flagged_share: float = 0.05) -> CalibrationReport:
    """Fit temperature and review threshold on validation logits."""
    labels = np.asarray(labels, dtype=np.int64)
    temperature = fit_temperature(logits, labels)
    before, after = softmax(logits), softmax(logits, temperature)
    confidence, predicted = after.max(axis=1), after.argmax(axis=1)
    correct = predicted == labels
    threshold = choose_review_threshold(confidence, correct, max_flagged_share)
    confusion = confusion_counts(labels, predicted)
    support = confusion.sum(axis=1)
    confident = confidence >= threshold
    return CalibrationReport(
        temperature=temperature, review_threshold=threshold,
        val_ece_before=expected_calibration_error(before, labels),
        val_ece_after=expected_calibration_error(after, labels),
        val_nll_before=negative_log_likelihood(logits, labels),
        val_nll_after=negative_log_likelihood(logits, labels, temperature),
        val_review=dataclasses.asdict(review_tradeoff(confidence, correct, threshold)),
        max_flagged_share=max_flagged_share, n_val=int(len(labels)),
        val_size=int(len(labels)), val_accuracy=float(correct.mean()) if len(labels) else 0.0,
        val_recall={name: (float(confusion[i, i] / support[i]) if support[i] else None)
                    for i, name in enumerate(CLASS_NAMES)},
        val_confusion=confusion.tolist(),
        val_confusion_confident=confusion_counts(labels[confident], predicted[confident]).tolist())


def confusion_counts(labels: np.ndarray, predicted: np.ndarray) -> np.ndarray:
    """Counts (rows = true class, columns = predicted class) over :data:`~bloodray.classes.CLASS_NAMES`."""
    n = len(CLASS_NAMES)
    flat = np.asarray(labels, dtype=np.int64) * n + np.asarray(predicted, dtype=np.int64)
    return np.bincount(flat, minlength=n * n).reshape(n, n)


#: Training cells join the confusion the flags correct with only when the model does not classify them better
#: than its val cells: one-sided Fisher exact tests on the error counts, all cells at this level and each class at
#: this level divided by the number of classes (:func:`training_confusion`).
TRAIN_CONFUSION_MIN_P = 0.05


def training_confusion(labels: np.ndarray, predicted: np.ndarray, val_confusion: Any) -> dict[str, Any]:
    """The training cells' confusion and whether the flags may add it to val's (sealed as
    ``calibration.train_confusion``; :meth:`bloodray.checkpoint.CheckpointMetadata.flag_confusion`).

    Why: val has ~125 cells per class, too few to show a model's rarer errors (issue 21: robust-v2 called 3 of 125
    val neutrophils "ig", 13 of 250 test ones), and every other labelled cell the model did not train on is test.
    A model usually classifies its training cells better than new ones, and their confusion would then make the
    flags trust it more than it deserves; a model trained with strong augmentation may not
    (robust-v2: 0.984 on its training cells, 0.986 on val). So the training cells join only when a one-sided
    Fisher exact test finds no sign that the model does better on them, over all cells (p >=
    :data:`TRAIN_CONFUSION_MIN_P`) and for each class (p >= that / the number of classes). The record says what
    was tested and ``joined``.
    """
    from scipy import stats

    train = confusion_counts(labels, predicted)
    val = np.asarray(val_confusion, dtype=np.int64)

    def p_better(t_err: int, t_n: int, v_err: int, v_n: int) -> float:
        # H1: the error odds on training cells are lower than on val cells (the model fitted them).
        return float(stats.fisher_exact([[t_err, t_n - t_err], [v_err, v_n - v_err]], alternative="less").pvalue)

    t_n, v_n = int(train.sum()), int(val.sum())
    t_err, v_err = t_n - int(np.trace(train)), v_n - int(np.trace(val))
    overall = p_better(t_err, t_n, v_err, v_n) if t_n and v_n else 0.0
    per_class = {name: p_better(int(train[i].sum() - train[i, i]), int(train[i].sum()),
                                int(val[i].sum() - val[i, i]), int(val[i].sum()))
                 for i, name in enumerate(CLASS_NAMES) if train[i].sum() and val[i].sum()}
    joined = bool(t_n and v_n and overall >= TRAIN_CONFUSION_MIN_P
                  and min(per_class.values(), default=1.0) >= TRAIN_CONFUSION_MIN_P / len(CLASS_NAMES))
    return {"cells": t_n, "accuracy": float(np.trace(train) / t_n) if t_n else 0.0,
            "val_accuracy": float(np.trace(val) / v_n) if v_n else 0.0, "p_value": overall,
            "class_p_values": per_class, "min_p": TRAIN_CONFUSION_MIN_P, "joined": joined,
            "confusion": train.tolist()}


def evaluate_calibration(logits: np.ndarray, labels: np.ndarray, temperature: float,
                         threshold: float) -> dict[str, Any]:
    """Accuracy, ECE before/after and the review trade-off on a held-out set (the test split)."""
    labels = np.asarray(labels, dtype=np.int64)
    after = softmax(logits, temperature)
    confidence = after.max(axis=1)
    correct = after.argmax(axis=1) == labels
    return {
        "accuracy": float(correct.mean()) if len(labels) else 0.0,
        "ece_before": expected_calibration_error(softmax(logits), labels),
        "ece_after": expected_calibration_error(after, labels),
        "review": dataclasses.asdict(review_tradeoff(confidence, correct, threshold)),
    }

