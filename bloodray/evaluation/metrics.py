"""Classification metrics of a labelled prediction set, and their Table-2 rendering.

:func:`classification_metrics` is the one definition of accuracy, balanced
accuracy, macro-F1 and the per-class numbers used by training (validation),
evaluation and model comparison. :func:`table2_rows` turns those metrics into
the per-class rows of Asghar et al.'s Table 2 as data; :func:`table2_markdown`
and :func:`table2_markdown_rows` only format those rows.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from bloodray.classes import CELL_CLASSES, CLASS_NAMES, NUM_CLASSES

#: Header of the Table-2 markdown table (two lines: titles and alignment).
TABLE2_HEADER = ("| Model | Type | Truth | Classified | Accuracy | Precision | Recall | F1 |",
                 "|---|---|---:|---:|---:|---:|---:|---:|")


def classification_metrics(labels: Sequence[int], predicted: Sequence[int]) -> dict[str, Any]:
    """Accuracy, balanced accuracy, macro-F1, per-class P/R/F1 and the confusion matrix."""
    from sklearn.metrics import (accuracy_score, balanced_accuracy_score, confusion_matrix,
                                 precision_recall_fscore_support)

    labels = np.asarray(labels)
    predicted = np.asarray(predicted)
    classes = list(range(NUM_CLASSES))
    precision, recall, f1, support = precision_recall_fscore_support(labels, predicted, labels=classes,
                                                                     zero_division=0)
    present = support > 0
    return {
        "n": int(len(labels)),
        "accuracy": float(accuracy_score(labels, predicted)),
        "balanced_accuracy": float(balanced_accuracy_score(labels, predicted)) if len(labels) else float("nan"),
        # Macro over classes present in the truth, so a small split without a class is not penalised.
        "macro_f1": float(f1[present].mean()) if present.any() else float("nan"),
        "macro_precision": float(precision[present].mean()) if present.any() else float("nan"),
        "macro_recall": float(recall[present].mean()) if present.any() else float("nan"),
        "per_class": {
            name: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                   "support": int(support[i]), "predicted": int((predicted == i).sum())}
            for i, name in enumerate(CLASS_NAMES)
        },
        "confusion_matrix": confusion_matrix(labels, predicted, labels=classes).tolist(),
    }


def table2_rows(metrics: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per class, in class index order: the columns of the paper's Table 2.

    Keys: ``class_name``, ``type`` (the paper's label), ``truth``, ``classified``,
    ``accuracy``, ``precision``, ``recall``, ``f1``. ``metrics`` needs
    ``per_class`` and ``confusion_matrix`` as :func:`classification_metrics`
    returns them. "Accuracy" per class is one-vs-rest accuracy ((TP + TN) / N),
    as in the paper.
    """
    cm = np.asarray(metrics["confusion_matrix"])
    n = cm.sum()
    rows = []
    for i, cell in enumerate(CELL_CLASSES):
        pc = metrics["per_class"][cell.name]
        tp = cm[i, i]
        tn = n - cm[i, :].sum() - cm[:, i].sum() + tp
        rows.append({"class_name": cell.name, "type": cell.label, "truth": int(pc["support"]),
                     "classified": int(pc["predicted"]), "accuracy": float((tp + tn) / n) if n else float("nan"),
                     "precision": float(pc["precision"]), "recall": float(pc["recall"]), "f1": float(pc["f1"])})
    return rows


def table2_markdown_rows(model_name: str, metrics: Mapping[str, Any]) -> list[str]:
    """The per-class markdown rows of :func:`table2_markdown` (no header), for tables of several models."""
    return [f"| {model_name} | {r['type']} | {r['truth']} | {r['classified']} | {r['accuracy']:.4f} | "
            f"{r['precision']:.4f} | {r['recall']:.4f} | {r['f1']:.4f} |" for r in table2_rows(metrics)]


def table2_markdown(model_name: str, metrics: Mapping[str, Any]) -> str:
    """Per-class Truth / Classified / Accuracy / Precision / Recall / F1, like Asghar et al. Table 2.

    The overall line below the table (accuracy, balanced accuracy, macro-F1)
    holds the numbers to quote; per-class accuracy is one-vs-rest.
    """
    lines = [*TABLE2_HEADER, *table2_markdown_rows(model_name, metrics)]
    lines += ["", f"Overall on {metrics['n']} images: accuracy **{metrics['accuracy']:.4f}**, "
                  f"balanced accuracy {metrics['balanced_accuracy']:.4f}, macro-F1 **{metrics['macro_f1']:.4f}**."]
    return "\n".join(lines) + "\n"
