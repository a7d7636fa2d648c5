"""PNG figures of an evaluation: the confusion matrix and the training curves.

matplotlib is imported inside the functions with the non-interactive Agg
backend, so importing this module costs nothing and works on headless nodes.
"""

from __future__ import annotations

import io
from typing import Any, Mapping, Sequence

import numpy as np

from bloodray.classes import CLASS_NAMES, NUM_CLASSES


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(plt, fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def confusion_matrix_png(metrics: Mapping[str, Any], title: str) -> bytes:
    """Confusion matrix heat map (counts, rows = truth) of :func:`~bloodray.evaluation.metrics.classification_metrics`."""
    plt = _pyplot()
    cm = np.asarray(metrics["confusion_matrix"])
    fig, ax = plt.subplots(figsize=(7, 6))
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(NUM_CLASSES), CLASS_NAMES, rotation=45, ha="right")
    ax.set_yticks(range(NUM_CLASSES), CLASS_NAMES)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    threshold = cm.max() / 2 if cm.size else 0
    for i in range(NUM_CLASSES):
        for j in range(NUM_CLASSES):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=8,
                    color="white" if cm[i, j] > threshold else "black")
    return _png(plt, fig)


def training_curves_png(history: Sequence[Mapping[str, float]], title: str) -> bytes:
    """Loss and validation accuracy / macro-F1 per epoch, from a checkpoint's ``history``."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    # Trainers record different series (the pack trainer has no val loss but an EMA); plot what is there.
    for axis, series in ((left, (("train_loss", "train loss"), ("val_loss", "val loss"))),
                         (right, (("val_accuracy", "val accuracy"), ("val_macro_f1", "val macro-F1"),
                                  ("val_accuracy_ema", "val accuracy (EMA weights)")))):
        for key, label in series:
            points = [(h["epoch"], h[key]) for h in history if key in h]
            if points:
                axis.plot(*zip(*points), label=label)
        axis.set_xlabel("epoch")
        axis.legend()
    fig.suptitle(title)
    return _png(plt, fig)
