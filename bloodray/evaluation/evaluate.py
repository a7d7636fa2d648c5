"""Honest evaluation on images the model never saw, and calibration of a training run.

Metrics come from :mod:`bloodray.evaluation.metrics`, figures from
:mod:`bloodray.evaluation.plots`; inference goes through the same Ray Data
pipeline pieces as the nightly job (the read+decode stage of
:mod:`bloodray.data.stages`, then :class:`bloodray.predict.CellPredictor`).

Outputs (in the run's evaluation folder, see :func:`bloodray.rundir.eval_dir`,
or a chosen folder/prefix): ``metrics.json``, ``per_class.parquet``,
``predictions.parquet``, ``confusion_matrix.png``, ``table2.md`` (shaped like
the paper's Table 2) and ``training_curves.png`` when the checkpoint's run
carries a training history.
"""

from __future__ import annotations

import hashlib
import json
import logging
import posixpath
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np
import pyarrow as pa

from bloodray.logs import init_ray, progress
from bloodray import rundir, storage
from bloodray.classes import CLASS_NAMES, NUM_CLASSES
from bloodray.evaluation.metrics import classification_metrics, table2_markdown
from bloodray.evaluation.plots import confusion_matrix_png, training_curves_png

log = logging.getLogger(__name__)


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


def predict_rows(rows: list[dict[str, Any]], checkpoint: str, storage_options: Mapping[str, Any] | None = None,
                 *, batch_size: int = 64, tta: bool = False, concurrency: int | None = None,
                 decode_cpus: float = 1.0, return_features: bool = False, precision: str = "auto",
                 unchecked_precision: bool = False) -> pa.Table:
    """Run the read+decode stage and :class:`CellPredictor` over rows with ``uri`` (and ``label``) on Ray Data.

    The stage is :func:`bloodray.data.stages.read_decode_files`, as in the
    nightly job; input columns pass through, bad files come back with the
    stage's error columns. Resources follow the cluster: with GPUs, one model
    actor per GPU beside decode tasks of ``decode_cpus`` CPUs; on CPU only,
    decode and model ask for the same ``decode_cpus`` CPUs, so Ray fuses them,
    with one actor per such share of the cluster (at most one per input block).
    ``concurrency`` fixes the number of actors. ``return_features`` adds the
    OOD features (``ood_pen``, ``ood_early``) the OOD reference is fitted on.
    ``precision``/``unchecked_precision``: the predictor's (:class:`~bloodray.predict.CellPredictor`).
    """
    import ray

    from bloodray.checkpoint import read_metadata
    from bloodray.data.stages import cluster_cpu_slots, read_decode_files
    from bloodray.predict import CellPredictor

    init_ray()
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
                        fn_constructor_kwargs={"checkpoint": checkpoint, "storage_options": opts, "tta": tta,
                                               "return_features": return_features, "precision": precision,
                                               "unchecked_precision": unchecked_precision},
                        **model_resources)
    # Streamed rather than collected with to_arrow_refs() so the bar moves;
    # blocks arrive as they finish, so the rows are put back in input order.
    parts = []
    with progress(total=len(rows), desc="evaluate", unit="img") as bar:
        for block in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            bar.update(block.num_rows)
            parts.append(block)
    table = pa.concat_tables(parts, promote_options="default")
    position = {row["uri"]: i for i, row in enumerate(rows)}
    uris = table.column("uri").to_pylist()
    return table.take(sorted(range(table.num_rows), key=lambda i: position.get(uris[i], i)))


def _matrix(table: pa.Table, column: str) -> np.ndarray:
    """A fixed-width per-row vector column (``probs``, ``logits``) as an N x classes float array."""
    if not table.num_rows:
        return np.zeros((0, NUM_CLASSES), dtype=np.float32)
    return np.stack(table.column(column).to_numpy(zero_copy_only=False))


def _decoded(table: pa.Table) -> np.ndarray:
    """Mask of the rows that were decoded and classified (no ``error``)."""
    return np.array([not e for e in table.column("error").to_pylist()], dtype=bool)


def evaluate_rows(rows: list[dict[str, Any]], checkpoint: str | None, output_uri: str, *, split: str,
                  storage_options: Mapping[str, Any] | None = None, tta: bool = False) -> EvaluationResult:
    """Evaluate ``checkpoint`` on labelled ``rows`` (``uri``, ``label``) and write the metric files to ``output_uri``."""
    from bloodray.checkpoint import read_metadata, resolve_checkpoint

    if not rows:
        raise ValueError(f"nothing to evaluate: the {split!r} split is empty")
    checkpoint = resolve_checkpoint(checkpoint, storage_options)
    meta = read_metadata(checkpoint, storage_options)
    table = predict_rows(rows, checkpoint, storage_options, tta=tta)
    ok = _decoded(table)
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
    put("per_class.parquet", storage.parquet_bytes(per_class))
    probs = _matrix(table, "probs")
    preds = pa.table({
        "uri": table.column("uri"), "label": table.column("label"),
        "true_class": [CLASS_NAMES[i] for i in labels], "predicted_class": table.column("predicted_class"),
        "confidence": table.column("confidence"), "error": table.column("error"),
        **{f"prob_{c}": pa.array(probs[:, i].astype(np.float32)) for i, c in enumerate(CLASS_NAMES)},
    })
    put("predictions.parquet", storage.parquet_bytes(preds))
    put("confusion_matrix.png", confusion_matrix_png(metrics, f"{meta.model_name} on {split} (n={metrics['n']})"))
    put("table2.md", result.table().encode())
    history = training_history(checkpoint, storage_options)
    if history:
        put("training_curves.png", training_curves_png(history, f"{meta.model_name} training"))
    return result


def training_history(checkpoint_uri: str, storage_options: Mapping[str, Any] | None = None) -> list[dict[str, float]]:
    """The longest per-epoch history recorded by ``checkpoint_uri`` or the other checkpoints of its run.

    The best checkpoint may be an early one; its siblings in the run directory
    carry the history of the epochs after it. Unreadable siblings are skipped:
    curves are a nicety and never fail an evaluation.
    """
    from bloodray.checkpoint import read_metadata, run_checkpoints

    history = list(read_metadata(checkpoint_uri, storage_options).history)
    fs, path = storage.filesystem(checkpoint_uri, storage_options)
    parent = storage.full_uri(fs, posixpath.dirname(path.rstrip("/")))
    try:
        siblings = run_checkpoints(parent, storage_options)
    except Exception:  # noqa: BLE001 - see the docstring
        siblings = []
    for sibling in siblings:
        other = read_metadata(sibling, storage_options)
        if len(other.history) > len(history):
            history = list(other.history)
    return history


def evaluate_run(run_uri: str, split: str = "test", storage_options: Mapping[str, Any] | None = None,
                 output_uri: str | None = None, checkpoint: str | None = None, tta: bool = False) -> EvaluationResult:
    """Evaluate a training run's best checkpoint on its own split manifest (``split="all"``: every image)."""
    from bloodray.checkpoint import resolve_checkpoint
    from bloodray.data.labelled import read_parquet, rows_of

    checkpoint = checkpoint or resolve_checkpoint(run_uri, storage_options)
    manifest = read_parquet(rundir.split_manifest(run_uri), storage_options)
    rows = rows_of(manifest, None if split == "all" else split)
    return evaluate_rows(rows, checkpoint, output_uri or rundir.eval_dir(run_uri, split), split=split,
                         storage_options=storage_options, tta=tta)


def evaluate_folder(data_root: str, checkpoint: str | None, output_uri: str, split: str = "test", seed: int | None = None,
                    storage_options: Mapping[str, Any] | None = None, tta: bool = False) -> EvaluationResult:
    """Evaluate on a labelled folder/prefix: its deterministic ``split`` (or ``all`` images).

    The split is recomputed from the files' contents with the checkpoint's own
    split fractions and seed (unless ``seed`` is given), so the test images of
    a model trained on the same folder are exactly the ones it never saw.
    """
    from bloodray.checkpoint import resolve_checkpoint
    from bloodray.data.labelled import rows_of

    checkpoint = resolve_checkpoint(checkpoint, storage_options)
    rows = rows_of(checkpoint_split(data_root, checkpoint, seed, storage_options), None if split == "all" else split)
    return evaluate_rows(rows, checkpoint, output_uri, split=split, storage_options=storage_options, tta=tta)


def checkpoint_split(data_root: str, checkpoint: str, seed: int | None = None,
                     storage_options: Mapping[str, Any] | None = None) -> pa.Table:
    """The split table of a labelled folder under a checkpoint's own split fractions and seed (unless ``seed``)."""
    from bloodray.checkpoint import read_metadata
    from bloodray.data.labelled import SplitFractions, build_split

    split_cfg = (read_metadata(checkpoint, storage_options).config.get("data", {}) or {}).get("split", {})
    fractions = SplitFractions(split_cfg.get("train", 0.7), split_cfg.get("val", 0.1), split_cfg.get("test", 0.2))
    table, _ = build_split(data_root, fractions, split_cfg.get("seed", 0) if seed is None else seed, storage_options)
    return table


#: Arithmetics besides fp32 whose validation reference is fitted too (those the predictor may choose on a CPU).
REFERENCE_PRECISIONS = ("bf16",)
#: Smallest two-sample KS p-value (training cells outside the Gaussians' subset vs val) for them to join the reference.
TRAIN_REFERENCE_MIN_P = 0.05
#: Training cells the OOD Gaussians are fitted on (a fixed random subset: more adds little, costs inference).
OOD_TRAIN_CELLS = 3000


def _subset(rows: list[dict[str, Any]], limit: int | None, seed: int = 0) -> list[dict[str, Any]]:
    if limit is None or len(rows) <= limit:
        return rows
    keep = np.sort(np.random.default_rng(seed).choice(len(rows), limit, replace=False))
    return [rows[i] for i in keep]


def fit_ood_reference(checkpoint: str, train_rows: list[dict[str, Any]], val_rows: list[dict[str, Any]],
                      storage_options: Mapping[str, Any] | None = None, train_cells: int | None = OOD_TRAIN_CELLS):
    """Fit :class:`~bloodray.ood.OodReference` for ``checkpoint`` on labelled train and val rows.

    Features come from the same Ray Data pipeline as every prediction
    (:func:`predict_rows`); training rows are subsampled to ``train_cells``
    (seed 0). The per-class references are those of the classes the model
    predicts for the val cells. The features are fp32 (the reference
    arithmetic, as the self-check's logits); the val cells are scored again in
    each faster arithmetic the predictor may choose on this machine
    (:data:`REFERENCE_PRECISIONS` it supports: bf16), each giving the
    validation reference of cells scored that way (:mod:`bloodray.ood`).
    Returns the reference, the fp32 val prediction table (logits, labels),
    so a calibration needs no second pass over val, and the fp32 prediction
    table of every training cell scored (for :func:`training_cell_confusion`).

    The training cells left out of the Gaussians' subset join the reference
    distributions (quantiles, per-class references; not the standardisation
    or the threshold, which stay val's) when their scores are indistinguishable
    from the val cells' (two-sample KS p-value at least
    :data:`TRAIN_REFERENCE_MIN_P`): about five times the cells, so a
    hundred-odd val cells per class no longer set each class's reference
    alone. A model that fitted its training cells (lower scores) fails the
    check and keeps the val reference; the check is recorded as
    ``ood.train_reference``.
    """
    import torch

    from bloodray.checkpoint import load_checkpoint
    from bloodray.inference_precision import bf16_supported
    from bloodray.ood import early_layer, fit_ood

    loaded = load_checkpoint(checkpoint, storage_options)
    early = early_layer(loaded.model, loaded.metadata.input_size)
    classes = np.asarray(loaded.metadata.classes)

    def features(rows, precision="fp32"):
        table = predict_rows(rows, checkpoint, storage_options, return_features=True, precision=precision,
                             unchecked_precision=True)
        return table.filter(pa.array(_decoded(table)))

    from scipy import stats

    fitted_rows = _subset(train_rows, train_cells)
    fitted = {r["uri"] for r in fitted_rows}
    rest_rows = [r for r in train_rows if r["uri"] not in fitted]
    train = features(fitted_rows)
    train_args = (_matrix(train, "ood_pen"), np.asarray(train.column("label").to_pylist()), _matrix(train, "ood_early"))
    val = features(val_rows)
    cells = val
    check = {"cells": len(rest_rows), "joined": False}
    if rest_rows:
        rest = features(rest_rows)
        base = fit_ood(*train_args, _matrix(val, "ood_pen"), _matrix(val, "ood_early"), early)
        test = stats.ks_2samp(base.score(_matrix(rest, "ood_pen"), _matrix(rest, "ood_early")),
                              base.score(_matrix(val, "ood_pen"), _matrix(val, "ood_early")))
        check.update(cells=rest.num_rows, ks=float(test.statistic), p_value=float(test.pvalue),
                     joined=bool(test.pvalue >= TRAIN_REFERENCE_MIN_P))
        if check["joined"]:
            cells = pa.concat_tables([val, rest], promote_options="default")
        else:
            log.warning("the %d training cells outside the OOD Gaussians' subset score unlike the val cells (KS %.3f, "
                        "p %.2g): the reference stays the val cells'", rest.num_rows, test.statistic, test.pvalue)
    reference_only = np.arange(cells.num_rows) >= val.num_rows
    other = {}
    for precision in REFERENCE_PRECISIONS:
        if precision == "bf16" and not bf16_supported(torch.device("cpu")):
            log.warning("this machine has no fast bf16: the OOD reference gets no bf16 validation reference, so "
                        "a bf16 predictor compares its cells with the fp32 one; refit on a machine with bf16")
            continue
        table = features(val_rows + (rest_rows if check["joined"] else []), precision)
        other[precision] = (_matrix(table, "ood_pen"), _matrix(table, "ood_early"),
                            classes[_matrix(table, "logits").argmax(axis=1)])
    ref = fit_ood(*train_args, _matrix(cells, "ood_pen"), _matrix(cells, "ood_early"), early,
                  val_classes=classes[_matrix(cells, "logits").argmax(axis=1)], precision="fp32", other_val=other,
                  reference_only=reference_only)
    ref.extra["train_reference"] = check
    scored_train = pa.concat_tables([train, rest], promote_options="default") if rest_rows else train
    return ref, val, scored_train


def training_cell_confusion(train: pa.Table, val_confusion: Any) -> dict[str, Any]:
    """The check and confusion of the training cells :func:`fit_ood_reference` scored, as sealed in
    ``calibration.train_confusion`` (:func:`bloodray.evaluation.calibration.training_confusion`)."""
    from bloodray.evaluation.calibration import training_confusion

    return training_confusion(np.asarray(train.column("label").to_pylist()), _matrix(train, "logits").argmax(axis=1),
                              val_confusion)


def refit_ood(checkpoint: str | None, data_root: str, dest: str | None = None,
              storage_options: Mapping[str, Any] | None = None, train_cells: int | None = OOD_TRAIN_CELLS):
    """Refit a checkpoint's OOD reference (per-class format) on a labelled folder and re-seal it at ``dest``.

    The split is the checkpoint's own (its recorded fractions and seed), so
    the Gaussians are fitted on its training cells and the threshold and
    per-class references are set on validation cells it never trained on.
    Weights, temperature, review threshold and calibration stay as they are; a
    calibrated checkpoint's calibration gains (or renews) the training cells'
    confusion and its check (``train_confusion``), from the same cells.
    ``dest`` defaults to the checkpoint itself. Returns ``(dest, reference)``.
    """
    from bloodray.checkpoint import export_checkpoint, read_metadata, resolve_checkpoint
    from bloodray.data.labelled import rows_of

    source = resolve_checkpoint(checkpoint, storage_options)
    table = checkpoint_split(data_root, source, storage_options=storage_options)
    ref, _val, train = fit_ood_reference(source, rows_of(table, "train"), rows_of(table, "val"), storage_options,
                                         train_cells=train_cells)
    blob = ref.tensors_bytes()
    dest = dest or source
    updates: dict[str, Any] = {}
    meta = read_metadata(source, storage_options)
    if meta.val_confusion() is not None:
        # The same training cells are the flags' larger sample of the model's errors, when they pass the check.
        updates["calibration"] = dict(meta.calibration,
                                      train_confusion=training_cell_confusion(train, meta.val_confusion()))
    export_checkpoint(source, dest, storage_options, ood=ref.metadata(hashlib.sha256(blob).hexdigest()),
                      ood_file=blob, **updates)
    return dest, ref


def ood_test_report(ref, table: pa.Table, review_threshold: float, temperature: float) -> dict[str, Any]:
    """Share of cells unidentified, and unidentified or in review, of a prediction table with OOD features."""
    from bloodray.evaluation.calibration import softmax

    scores = ref.score(_matrix(table, "ood_pen"), _matrix(table, "ood_early"))
    confidence = softmax(_matrix(table, "logits"), temperature).max(axis=1)
    unidentified = scores > ref.threshold
    return {"n": int(len(scores)), "unidentified_share": float(unidentified.mean()) if len(scores) else 0.0,
            "unidentified_or_review_share": float((unidentified | (confidence < review_threshold)).mean())
            if len(scores) else 0.0}


def calibrate_run(run_uri: str, storage_options: Mapping[str, Any] | None = None,
                  max_flagged_share: float = 0.05, checkpoint: str | None = None,
                  force: bool = False) -> dict[str, Any]:
    """Fit temperature, review threshold and the OOD reference on the run's splits, report them on its test split.

    Works on the predictor's raw ``logits``, so the temperature already in the
    checkpoint plays no part. Writes the run's calibrated checkpoint
    (:func:`bloodray.rundir.calibrated_dir`: the best checkpoint's weights with
    the fitted ``temperature``, ``review_threshold`` and ``calibration``
    report, and the OOD reference (:mod:`bloodray.ood`) fitted on
    up to :data:`OOD_TRAIN_CELLS` training cells and standardised and
    thresholded on val), which :func:`~bloodray.checkpoint.resolve_checkpoint`
    then prefers for the run, and the precision self-check batch (:mod:`bloodray.inference_precision`).

    The quality gate (:mod:`bloodray.quality_gate`) checks the val metrics first: a checkpoint that misses its
    minimums is refused (:class:`~bloodray.quality_gate.QualityGateError`, nothing written, an earlier
    calibration kept) unless ``force``; the sealed ``calibration`` carries the val metrics and the ``gate`` record.
    """
    from bloodray import quality_gate
    from bloodray.checkpoint import best_run_checkpoint, export_checkpoint, read_metadata
    from bloodray.data.labelled import read_parquet, rows_of
    from bloodray.evaluation.calibration import calibrate, evaluate_calibration
    from bloodray.inference_precision import selfcheck_from_files, selfcheck_sample

    # Re-calibrate from the raw best checkpoint, never from an earlier calibration.
    checkpoint = checkpoint or best_run_checkpoint(run_uri, storage_options)
    manifest = read_parquet(rundir.split_manifest(run_uri), storage_options)

    def rows(split: str) -> list[dict[str, Any]]:
        found = rows_of(manifest, split)
        if not found:
            raise ValueError(f"{rundir.split_manifest(run_uri)}: the {split!r} split is empty; nothing to calibrate on")
        return found

    ref, val, train = fit_ood_reference(checkpoint, rows("train"), rows("val"), storage_options)
    val_logits, val_labels = _matrix(val, "logits"), np.asarray(val.column("label").to_pylist())
    report = calibrate(val_logits, val_labels, max_flagged_share)
    gate = quality_gate.check_calibration(report.to_dict(), checkpoint, force)
    test = predict_rows(rows("test"), checkpoint, storage_options, return_features=True)
    test = test.filter(pa.array(_decoded(test)))
    test_logits, test_labels = _matrix(test, "logits"), np.asarray(test.column("label").to_pylist())
    on_test = evaluate_calibration(test_logits, test_labels, report.temperature, report.review_threshold)
    on_test["ood"] = ood_test_report(ref, test, report.review_threshold, report.temperature)
    # The source by its id, not its path: metadata carries no local machine paths.
    calibration = report.to_dict() | {"test": on_test, "ece_bins": 15, "gate": gate,
                                      "source_checkpoint_id": read_metadata(checkpoint, storage_options).checkpoint_id,
                                      "train_confusion": training_cell_confusion(train, report.val_confusion)}
    dest = rundir.calibrated_dir(run_uri)
    fs, path = storage.filesystem(dest, storage_options)
    if fs.exists(path):
        fs.rm(path, recursive=True)
    blob = ref.tensors_bytes()
    # The precision self-check batch: val cells spread over the classes, with their fp32 logits.
    val_rows = rows("val")
    picked = selfcheck_sample(np.asarray([r["label"] for r in val_rows]))
    check = selfcheck_from_files(checkpoint, [val_rows[i]["uri"] for i in picked], storage_options)
    export_checkpoint(checkpoint, dest, storage_options, temperature=report.temperature,
                      review_threshold=report.review_threshold, calibration=calibration,
                      ood=ref.metadata(hashlib.sha256(blob).hexdigest()), ood_file=blob,
                      selfcheck=check.metadata(), selfcheck_file=check.to_bytes())
    return calibration | {"checkpoint": dest}
