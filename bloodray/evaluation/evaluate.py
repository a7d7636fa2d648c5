"""Honest evaluation on images the model never saw.

Metrics come from scikit-learn; inference goes through the same Ray Data
pipeline pieces as the nightly job (the read+decode stage of
:mod:`bloodray.data.stages`, then :class:`bloodray.predict.CellPredictor`).

Outputs (in ``<run>/eval/<split>/`` or a chosen folder/prefix):
``metrics.json``, ``per_class.parquet``, ``predictions.parquet``,
``confusion_matrix.png``, ``table2.md`` (shaped like the paper's Table 2) and
``training_curves.png`` when the checkpoint carries a training history.
"""

from __future__ import annotations

import io
import json
import posixpath
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import pyarrow as pa

from bloodray import storage
from bloodray.classes import CELL_CLASSES, CLASS_NAMES, NUM_CLASSES


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


@dataclass
class EvaluationResult:
    """Metrics of one evaluation and where its files were written."""

    metrics: dict[str, Any]
    checkpoint: str
    model_name: str
    split: str
    output_uri: str
    files: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """The headline numbers (for logs and the run summary)."""
        keys = ("n", "accuracy", "balanced_accuracy", "macro_f1", "macro_precision", "macro_recall")
        return {k: self.metrics[k] for k in keys} | {"checkpoint": self.checkpoint, "split": self.split,
                                                     "output_uri": self.output_uri}

    def table(self) -> str:
        """Markdown table shaped like the paper's Table 2."""
        return table2_markdown(self.model_name, self.metrics)


def table2_markdown(model_name: str, metrics: Mapping[str, Any]) -> str:
    """Per-class Truth / Classified / Accuracy / Precision / Recall / F1, like Asghar et al. Table 2.

    "Accuracy" per class is one-vs-rest accuracy ((TP + TN) / N), as in the
    paper; the overall rows below the table are the ones to quote.
    """
    cm = np.asarray(metrics["confusion_matrix"])
    n = cm.sum()
    lines = ["| Model | Type | Truth | Classified | Accuracy | Precision | Recall | F1 |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for i, cell in enumerate(CELL_CLASSES):
        pc = metrics["per_class"][cell.name]
        tp = cm[i, i]
        tn = n - cm[i, :].sum() - cm[:, i].sum() + tp
        lines.append(f"| {model_name} | {cell.label} | {pc['support']} | {pc['predicted']} | "
                     f"{(tp + tn) / n if n else float('nan'):.4f} | {pc['precision']:.4f} | {pc['recall']:.4f} | {pc['f1']:.4f} |")
    lines += ["", f"Overall on {metrics['n']} images: accuracy **{metrics['accuracy']:.4f}**, "
                  f"balanced accuracy {metrics['balanced_accuracy']:.4f}, macro-F1 **{metrics['macro_f1']:.4f}**."]
    return "\n".join(lines) + "\n"


def predict_rows(rows: list[dict[str, Any]], checkpoint: str, storage_options: Mapping[str, Any] | None = None,
                 *, batch_size: int = 64, tta: bool = False, concurrency: int | None = None,
                 decode_cpus: float = 1.0) -> pa.Table:
    """Run the read+decode stage and :class:`CellPredictor` over rows with ``uri`` (and ``label``) on Ray Data.

    The stage is :func:`bloodray.data.stages.read_decode_files`, as in the
    nightly job; input columns pass through, bad files come back with the
    stage's error columns. Resources follow the cluster: with GPUs, one model
    actor per GPU beside decode tasks of ``decode_cpus`` CPUs; on CPU only,
    decode and model ask for the same ``decode_cpus`` CPUs, so Ray fuses them,
    with one actor per such share of the cluster (at most one per input block).
    ``concurrency`` fixes the number of actors.
    """
    import ray

    from bloodray.checkpoint import read_metadata
    from bloodray.data.stages import cluster_cpu_slots, read_decode_files
    from bloodray.predict import CellPredictor

    if not ray.is_initialized():
        ray.init()
    opts = dict(storage_options or {})
    meta = read_metadata(checkpoint, opts)
    blocks = max(1, min(64, len(rows) // batch_size))
    gpus = int(ray.cluster_resources().get("GPU", 0))
    if gpus:
        actors, model_resources = concurrency or gpus, {"num_gpus": 1, "num_cpus": 0}
    else:
        actors = concurrency or min(cluster_cpu_slots(decode_cpus), blocks)
        model_resources = {"num_cpus": decode_cpus}
    ds = ray.data.from_items(rows, override_num_blocks=blocks)
    ds = ds.map_batches(read_decode_files, batch_size=batch_size, num_cpus=decode_cpus,
                        fn_kwargs={"preset": meta.preset(), "storage_options": opts})
    ds = ds.map_batches(CellPredictor, batch_size=batch_size, compute=ray.data.ActorPoolStrategy(size=actors),
                        fn_constructor_kwargs={"checkpoint": checkpoint, "storage_options": opts, "tta": tta},
                        **model_resources)
    return pa.concat_tables(ray.get(ds.to_arrow_refs()))


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    return buf.getvalue()


def confusion_matrix_png(metrics: Mapping[str, Any], title: str) -> bytes:
    """Confusion matrix heat map (counts, rows = truth)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    data = _png(fig)
    plt.close(fig)
    return data


def training_curves_png(history: Sequence[Mapping[str, float]], title: str) -> bytes:
    """Loss and validation accuracy / macro-F1 per epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    data = _png(fig)
    plt.close(fig)
    return data


def evaluate_rows(rows: list[dict[str, Any]], checkpoint: str | None, output_uri: str, *, split: str,
                  storage_options: Mapping[str, Any] | None = None, tta: bool = False) -> EvaluationResult:
    """Evaluate ``checkpoint`` on labelled ``rows`` and write the metric files to ``output_uri``."""
    from bloodray.checkpoint import read_metadata, resolve_checkpoint

    if not rows:
        raise ValueError(f"nothing to evaluate: the {split!r} split is empty")
    checkpoint = resolve_checkpoint(checkpoint, storage_options)
    meta = read_metadata(checkpoint, storage_options)
    table = predict_rows(rows, checkpoint, storage_options, tta=tta)
    errors = [e for e in table.column("error").to_pylist()]
    ok = np.array([not e for e in errors])
    labels = np.asarray(table.column("label").to_pylist())
    predicted = np.asarray(table.column("predicted_label").to_pylist())
    metrics = classification_metrics(labels[ok], predicted[ok])
    metrics["n_undecodable"] = int((~ok).sum())
    metrics["tta"] = tta
    metrics["checkpoint_id"] = meta.checkpoint_id
    result = EvaluationResult(metrics=metrics, checkpoint=checkpoint, model_name=meta.model_name, split=split,
                              output_uri=output_uri)

    def put(name: str, data: bytes) -> None:
        uri = storage.join(output_uri, name)
        storage.write_bytes(uri, data, storage_options)
        result.files.append(uri)

    put("metrics.json", json.dumps(metrics, indent=2).encode())
    per_class = pa.Table.from_pylist([{"class_name": k, **v} for k, v in metrics["per_class"].items()])
    put("per_class.parquet", _parquet_bytes(per_class))
    probs = np.stack(table.column("probs").to_numpy(zero_copy_only=False)) if table.num_rows else np.zeros((0, NUM_CLASSES))
    preds = pa.table({
        "uri": table.column("uri"), "label": table.column("label"),
        "true_class": [CLASS_NAMES[i] for i in labels], "predicted_class": table.column("predicted_class"),
        "confidence": table.column("confidence"), "error": table.column("error"),
        **{f"prob_{c}": pa.array(probs[:, i].astype(np.float32)) for i, c in enumerate(CLASS_NAMES)},
    })
    put("predictions.parquet", _parquet_bytes(preds))
    put("confusion_matrix.png", confusion_matrix_png(metrics, f"{meta.model_name} on {split} (n={metrics['n']})"))
    put("table2.md", result.table().encode())
    history = _longest_history(checkpoint, meta, storage_options)
    if history:
        put("training_curves.png", training_curves_png(history, f"{meta.model_name} training"))
    return result


def _parquet_bytes(table: pa.Table) -> bytes:
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def _longest_history(checkpoint: str, meta, storage_options) -> list[dict[str, float]]:
    """The best checkpoint may be early; its siblings in the run dir carry the longer history."""
    from bloodray.checkpoint import read_metadata

    from bloodray.checkpoint import run_checkpoints

    history = list(meta.history)
    fs, path = storage.filesystem(checkpoint, storage_options)
    parent = storage.full_uri(fs, posixpath.dirname(path.rstrip("/")))
    try:
        siblings = run_checkpoints(parent, storage_options)
    except Exception:  # noqa: BLE001 - curves are a nicety; never fail an evaluation for them
        siblings = []
    for sibling in siblings:
        other = read_metadata(sibling, storage_options)
        if len(other.history) > len(history):
            history = list(other.history)
    return history


def evaluate_run(run_uri: str, split: str = "test", storage_options: Mapping[str, Any] | None = None,
                 output_uri: str | None = None, checkpoint: str | None = None, tta: bool = False) -> EvaluationResult:
    """Evaluate a training run's best checkpoint on its own split manifest."""
    from bloodray.checkpoint import resolve_checkpoint
    from bloodray.data.labelled import read_parquet, rows_of
    from bloodray import rundir

    checkpoint = checkpoint or resolve_checkpoint(run_uri, storage_options)
    manifest = read_parquet(rundir.split_manifest(run_uri), storage_options)
    rows = rows_of(manifest, None if split == "all" else split)
    return evaluate_rows(rows, checkpoint, output_uri or storage.join(run_uri, "eval", split), split=split,
                         storage_options=storage_options, tta=tta)


def evaluate_folder(data_root: str, checkpoint: str | None, output_uri: str, split: str = "test", seed: int | None = None,
                    storage_options: Mapping[str, Any] | None = None, tta: bool = False) -> EvaluationResult:
    """Evaluate on a labelled folder/prefix: its deterministic ``split`` (or ``all`` images).

    The split is recomputed from the files' contents with the checkpoint's own
    split fractions and seed (unless ``seed`` is given), so the test images of
    a model trained on the same folder are exactly the ones it never saw.
    """
    from bloodray.checkpoint import read_metadata, resolve_checkpoint
    from bloodray.data.labelled import SplitFractions, build_split, rows_of

    checkpoint = resolve_checkpoint(checkpoint, storage_options)
    split_cfg = (read_metadata(checkpoint, storage_options).config.get("data", {}) or {}).get("split", {})
    fractions = SplitFractions(split_cfg.get("train", 0.7), split_cfg.get("val", 0.1), split_cfg.get("test", 0.2))
    table, _ = build_split(data_root, fractions, split_cfg.get("seed", 0) if seed is None else seed, storage_options)
    rows = rows_of(table, None if split == "all" else split)
    return evaluate_rows(rows, checkpoint, output_uri, split=split, storage_options=storage_options, tta=tta)


def calibrate_run(run_uri: str, storage_options: Mapping[str, Any] | None = None,
                  max_flagged_share: float = 0.05, checkpoint: str | None = None) -> dict[str, Any]:
    """Fit temperature and review threshold on the run's val split, report them on its test split.

    Writes ``<run>/calibrated/`` (the best checkpoint's weights with the fitted
    ``temperature``, ``review_threshold`` and ``calibration`` report), which
    :func:`~bloodray.checkpoint.resolve_checkpoint` then prefers for the run.
    """
    from bloodray.evaluation.calibration import calibrate, evaluate_calibration, log_probabilities
    from bloodray.checkpoint import METADATA_FILE, export_checkpoint, read_metadata, resolve_checkpoint
    from bloodray.data.labelled import read_parquet, rows_of
    from bloodray import rundir

    if checkpoint is None:
        fs, path = storage.filesystem(run_uri, storage_options)
        # Re-calibrate from the raw best checkpoint, never from an earlier calibration.
        if fs.exists(posixpath.join(path, rundir.CALIBRATED_DIR, METADATA_FILE)):
            fs.rm(posixpath.join(path, rundir.CALIBRATED_DIR), recursive=True)
        checkpoint = resolve_checkpoint(run_uri, storage_options)
    meta = read_metadata(checkpoint, storage_options)
    manifest = read_parquet(rundir.split_manifest(run_uri), storage_options)

    def logits_of(split: str):
        table = predict_rows(rows_of(manifest, split), checkpoint, storage_options)
        ok = np.array([not e for e in table.column("error").to_pylist()])
        probs = np.stack(table.column("probs").to_numpy(zero_copy_only=False))[ok]
        # The predictor applied the checkpoint's temperature; undo it to get logits (up to a row constant).
        return log_probabilities(probs) * float(meta.temperature or 1.0), np.asarray(table.column("label").to_pylist())[ok]

    val_logits, val_labels = logits_of("val")
    report = calibrate(val_logits, val_labels, max_flagged_share)
    test_logits, test_labels = logits_of("test")
    on_test = evaluate_calibration(test_logits, test_labels, report.temperature, report.review_threshold)
    calibration = report.to_dict() | {"test": on_test, "source_checkpoint": checkpoint, "ece_bins": 15}
    dest = rundir.calibrated_dir(run_uri)
    export_checkpoint(checkpoint, dest, storage_options, temperature=report.temperature,
                      review_threshold=report.review_threshold, calibration=calibration)
    return calibration | {"checkpoint": dest}
