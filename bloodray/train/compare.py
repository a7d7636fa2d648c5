"""Train several models on one split and compare them: our version of the paper's Table 2.

:func:`run_comparison` builds the de-duplicated split of ``data`` once
(``<output.path>/split.parquet``), gives every model's run that same manifest,
trains each model with :func:`bloodray.train.ray_trainer.run_training`, evaluates its best
checkpoint on the shared test split, and writes under ``output.path``:

``comparison.json``
    the config, the hardware, the split (fingerprint and counts) and one record
    per model (status, init, params, input size, timings, test metrics);
``comparison.parquet``
    one row per model and class (``row_type = 'class'``: precision, recall,
    F1, support) and one per model (``row_type = 'summary'``: accuracy,
    balanced accuracy, macro-F1, params, timings...);
``table2.md``
    the per-class table shaped like the paper's Table 2 for all models, then a
    summary table.

Every run must train, validate and test on identical images: the split's
fingerprint (SHA-256 over each image's content hash, label and split) is checked
before and after each run and recorded. A model whose pretrained weights cannot
be loaded either fails with the reason recorded in the table
(``output.on_pretrained_error: fail``) or is trained from scratch and labelled
so (``scratch``). Finished models are recorded in
``runs/<label>/comparison_entry.json``; calling again skips them (and an
interrupted model resumes from its last checkpoint).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Mapping

import pyarrow as pa

from bloodray.logs import init_ray
from bloodray import __version__, rundir, storage
from bloodray.classes import NUM_CLASSES
from bloodray.config import ConfigError, to_dict
from bloodray.data.labelled import class_counts, read_parquet
from bloodray.train.compare_config import CompareConfig, ModelEntry, load_compare_config, train_config_for
from bloodray.train.compare_report import comparison_rows, describe_hardware, table2_markdown
from bloodray.train.config import TrainConfig
from bloodray.train.ray_trainer import prepare_split

COMPARISON_JSON = "comparison.json"
COMPARISON_PARQUET = "comparison.parquet"
TABLE2 = "table2.md"
SPLIT_INFO = "split.json"
ENTRY_RESULT = "comparison_entry.json"
STARTED = "comparison_started.json"
CONFIG_YAML = "config.yaml"


def split_fingerprint(table: pa.Table) -> str:
    """SHA-256 over (content hash, label, split) of every image: equal iff the splits hold identical images."""
    lines = sorted(f"{h}\t{lab}\t{s}" for h, lab, s in zip(table.column("sha256").to_pylist(),
                                                         table.column("label").to_pylist(),
                                                         table.column("split").to_pylist()))
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def _config_fingerprint(tc: TrainConfig) -> str:
    return hashlib.sha256(json.dumps(storage.redact(to_dict(tc)), sort_keys=True, default=str).encode()).hexdigest()


def _exists(uri: str, opts: Mapping[str, Any]) -> bool:
    fs, path = storage.filesystem(uri, opts)
    return fs.exists(path)


def _copy(src: str, dest: str, opts: Mapping[str, Any]) -> None:
    fs, path = storage.filesystem(src, opts)
    with fs.open(path, "rb") as fh:
        storage.write_bytes(dest, fh.read(), opts)


def _parameter_counts(tc: TrainConfig) -> tuple[int, int]:
    """(all, trainable) parameters, counted on the meta device: nothing allocated or downloaded."""
    import torch

    from bloodray.models import count_parameters, create_model

    with torch.device("meta"):
        model = create_model(tc.model.name, NUM_CLASSES, freeze_backbone=tc.model.freeze_backbone,
                             **tc.builder_kwargs())
    return count_parameters(model), count_parameters(model, trainable_only=True)


def _probe_pretrained(tc: TrainConfig) -> str | None:
    """Build the model with its pretrained weights; return why that failed, or None."""
    from bloodray.models import PretrainedWeightsError, create_model

    try:
        create_model(tc.model.name, NUM_CLASSES, pretrained=True, weights_uri=tc.model.weights_uri,
                     storage_options=tc.storage.storage_options(), **tc.builder_kwargs())
    except (PretrainedWeightsError, storage.StorageError, OSError) as exc:
        return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return None


# ----------------------------------------------------------------------------- the shared split


def _split_settings(cfg: CompareConfig) -> dict[str, Any]:
    return {"root": cfg.data.root, "split": to_dict(cfg.data.split), "max_per_class": cfg.data.max_per_class}


def prepare_shared_split(cfg: CompareConfig) -> tuple[pa.Table, str]:
    """Build the comparison's split once (or reuse it) as a run's split is built; returns it and its fingerprint."""
    opts = cfg.storage.storage_options()
    out = cfg.output.path
    info_uri = storage.join(out, SPLIT_INFO)
    settings = _split_settings(cfg)
    info = storage.read_json(info_uri, opts) if _exists(info_uri, opts) else None
    if info is not None and info.get("settings") != settings:
        raise ConfigError(f"output.path: {out} already holds a comparison split of other data "
                          f"({json.dumps(info.get('settings'))}); use a new output.path")
    table, _ = prepare_split(out, cfg.data, opts)
    fingerprint = split_fingerprint(table)
    if info is None:
        storage.write_json(info_uri, {"settings": settings, "fingerprint": fingerprint, "n": table.num_rows,
                                      "class_counts": class_counts(table)}, opts)
    elif fingerprint != info.get("fingerprint"):
        raise ConfigError(f"output.path: {rundir.split_manifest(out)} no longer matches its recorded fingerprint; "
                          "use a new output.path")
    return table, fingerprint


def _seed_run_split(cfg: CompareConfig, run_uri: str, fingerprint: str) -> None:
    """Give a model's run the shared manifest (``run_training`` then reuses it instead of splitting)."""
    opts = cfg.storage.storage_options()
    run_manifest = rundir.split_manifest(run_uri)
    if _exists(run_manifest, opts):
        if split_fingerprint(read_parquet(run_manifest, opts)) != fingerprint:
            raise ConfigError(f"output.path: {run_manifest} holds another split than the comparison's "
                              "(left from another comparison?); use a new output.path")
        return
    _copy(rundir.data_report(cfg.output.path), rundir.data_report(run_uri), opts)
    _copy(rundir.split_manifest(cfg.output.path), run_manifest, opts)


# ----------------------------------------------------------------------------- one model


def _check_started_run(cfg: CompareConfig, entry: ModelEntry, tc: TrainConfig) -> None:
    """A run resumes by name: refuse to resume one that was started with other settings (more epochs is fine)."""
    opts = cfg.storage.storage_options()
    settings = to_dict(tc)
    settings["train"].pop("epochs")
    fingerprint = hashlib.sha256(json.dumps(storage.redact(settings), sort_keys=True, default=str).encode()).hexdigest()
    uri = storage.join(tc.run_uri, STARTED)
    if _exists(uri, opts):
        if storage.read_json(uri, opts).get("fingerprint") != fingerprint:
            index = cfg.models.index(entry)
            raise ConfigError(f"models[{index}].label: the run {tc.run_uri} was started with other settings for "
                              f"{entry.run_name!r}; give the entry a new label (or delete that run)")
        return
    storage.write_json(uri, {"fingerprint": fingerprint, "settings": storage.redact(settings)}, opts)


def _base_record(entry: ModelEntry, tc: TrainConfig) -> dict[str, Any]:
    return {
        "label": entry.run_name, "model": entry.name, "status": "pending", "error": None,
        "pretrained_requested": entry.pretrained, "pretrained": tc.model.pretrained,
        "init": "pretrained" if tc.model.pretrained else "scratch", "init_note": None,
        "freeze_backbone": tc.model.freeze_backbone, "input_size": tc.input_size, "kwargs": dict(tc.model.kwargs),
        "epochs": tc.train.epochs, "batch_size_per_worker": tc.train.batch_size, "lr": tc.train.lr,
        "num_workers": tc.scaling.num_workers, "run_uri": tc.run_uri,
    }


def run_entry(cfg: CompareConfig, entry: ModelEntry, fingerprint: str) -> dict[str, Any]:
    """Train and evaluate one model (or return its finished record); never touches another model's run."""
    from bloodray.checkpoint import run_checkpoints
    from bloodray.evaluation.evaluate import evaluate_run, training_history
    from bloodray.train.ray_trainer import run_training

    opts = cfg.storage.storage_options()
    requested = train_config_for(cfg, entry)
    done_uri = storage.join(requested.run_uri, ENTRY_RESULT)
    requested_fp = _config_fingerprint(requested)
    if _exists(done_uri, opts):
        previous = storage.read_json(done_uri, opts)
        if previous.get("requested_fingerprint") == requested_fp and previous.get("split_sha256") == fingerprint:
            print(f"[bloodray] compare: {entry.run_name} already finished ({done_uri}); skipping", flush=True)
            return previous | {"skipped": True}

    tc = requested
    record = _base_record(entry, tc)
    params, trainable = _parameter_counts(tc)
    record |= {"params": params, "trainable_params": trainable}
    if entry.pretrained:
        reason = _probe_pretrained(tc)
        if reason:
            if cfg.output.on_pretrained_error == "fail":
                print(f"[bloodray] compare: {entry.run_name} FAILED: pretrained weights cannot be loaded: {reason}",
                      flush=True)
                return record | {"status": "failed", "init": "pretrained (unavailable)",
                                 "error": f"pretrained weights cannot be loaded: {reason}"}
            tc = train_config_for(cfg, entry, scratch=True)
            params, trainable = _parameter_counts(tc)
            record = _base_record(entry, tc) | {
                "params": params, "trainable_params": trainable, "init": "scratch (fallback)",
                "init_note": f"pretrained weights could not be loaded, trained from scratch instead: {reason}"}
            print(f"[bloodray] compare: {entry.run_name}: pretrained weights cannot be loaded ({reason}); "
                  "training from scratch as output.on_pretrained_error=scratch says", flush=True)

    _check_started_run(cfg, entry, tc)
    _seed_run_split(cfg, tc.run_uri, fingerprint)
    resumed = bool(run_checkpoints(tc.run_uri, opts))
    print(f"[bloodray] compare: training {entry.run_name} ({tc.model.name}, {record['init']}, {tc.input_size} px, "
          f"{tc.train.epochs} epochs){' -- resuming' if resumed else ''}", flush=True)
    started = time.perf_counter()
    result = run_training(tc)
    wall = time.perf_counter() - started

    used = split_fingerprint(read_parquet(rundir.split_manifest(tc.run_uri), opts))
    if used != fingerprint:
        raise RuntimeError(f"{tc.run_uri}: trained on another split ({used[:12]}) than the comparison's "
                           f"({fingerprint[:12]})")
    started = time.perf_counter()
    evaluation = evaluate_run(tc.run_uri, "test", opts, checkpoint=result.best_checkpoint)
    eval_seconds = time.perf_counter() - started
    metrics = evaluation.metrics
    history = training_history(result.best_checkpoint, opts)
    rates = [h["train_images_per_second"] for h in history if h.get("train_images_per_second")]
    best_epoch = max(history, key=lambda h: h.get("val_macro_f1", float("-inf")))["epoch"] if history else None
    record |= {
        "status": "ok", "split_sha256": used, "requested_fingerprint": requested_fp,
        "checkpoint": result.best_checkpoint, "eval_uri": evaluation.output_uri, "best_epoch": best_epoch,
        "epochs_trained": len(history),
        "train_seconds": float(sum(h.get("epoch_seconds", 0.0) for h in history)),
        "wall_seconds": wall, "resumed": resumed,
        "train_images_per_second": float(statistics.median(rates)) if rates else None,
        "eval_seconds": eval_seconds,
        "eval_images_per_second": metrics["n"] / eval_seconds if eval_seconds > 0 else None,
        "test": {k: metrics[k] for k in ("n", "accuracy", "balanced_accuracy", "macro_f1", "macro_precision",
                                         "macro_recall", "n_undecodable")},
        "per_class": metrics["per_class"], "confusion_matrix": metrics["confusion_matrix"],
        "history": history,
    }
    storage.write_json(done_uri, record, opts)
    print(f"[bloodray] compare: {entry.run_name}: test accuracy {metrics['accuracy']:.4f}, "
          f"macro-F1 {metrics['macro_f1']:.4f} (n={metrics['n']}); trained {storage.human_duration(record['train_seconds'])}", flush=True)
    return record


# ----------------------------------------------------------------------------- outputs


@dataclass
class ComparisonResult:
    """What :func:`run_comparison` wrote."""

    output_uri: str
    models: list[dict[str, Any]]
    split_sha256: str
    hardware: dict[str, Any]
    table: str
    files: list[str] = field(default_factory=list)

    @property
    def failed(self) -> list[dict[str, Any]]:
        return [m for m in self.models if m["status"] != "ok"]


def _write_outputs(cfg: CompareConfig, models: list[dict[str, Any]], split: dict[str, Any],
                   hardware: dict[str, Any]) -> ComparisonResult:
    opts = cfg.storage.storage_options()
    out = cfg.output.path
    public = [{k: v for k, v in m.items() if k not in ("history", "skipped")} for m in models]
    payload = {"created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "bloodray_version": __version__, "hardware": hardware, "split": split, "models": public,
               "config": storage.redact(to_dict(cfg))}
    table = table2_markdown(models, split, hardware, cfg)
    result = ComparisonResult(out, public, split["sha256"], hardware, table)
    for name, data in ((COMPARISON_JSON, json.dumps(payload, indent=2, default=str).encode()),
                       (COMPARISON_PARQUET, storage.parquet_bytes(comparison_rows(models, hardware))),
                       (TABLE2, table.encode()), (CONFIG_YAML, _config_yaml(cfg))):
        uri = storage.join(out, name)
        storage.write_bytes(uri, data, opts)
        result.files.append(uri)
    return result


def _config_yaml(cfg: CompareConfig) -> bytes:
    from bloodray.config import dump_yaml

    return dump_yaml(cfg).encode()


def run_comparison(cfg: CompareConfig) -> ComparisonResult:
    """Train and evaluate every model of ``cfg`` on one shared split; write the comparison tables.

    Safe to call again: models already finished with the same settings are
    skipped, an interrupted one resumes from its checkpoint. The tables are
    rewritten after each model, so they show progress during a long run.
    """
    opts = cfg.storage.storage_options()
    table, fingerprint = prepare_shared_split(cfg)
    storage.write_bytes(storage.join(cfg.output.path, CONFIG_YAML), _config_yaml(cfg), opts)
    init_ray()  # joins the cluster of `ray job submit` (RAY_ADDRESS) or starts a local one
    hardware = describe_hardware(cfg)
    split = {"sha256": fingerprint, "n": table.num_rows, "class_counts": class_counts(table),
             "uri": rundir.split_manifest(cfg.output.path)}
    print(f"[bloodray] compare: {len(cfg.models)} models on {table.num_rows} images, split {fingerprint[:16]}; "
          f"{hardware['summary']}", flush=True)
    models: list[dict[str, Any]] = []
    result = None
    for entry in cfg.models:
        models.append(run_entry(cfg, entry, fingerprint))
        result = _write_outputs(cfg, models, split, hardware)
    used = {m["split_sha256"] for m in models if m["status"] == "ok"}
    if used - {fingerprint}:
        raise RuntimeError(f"models trained on different splits: {sorted(used)}")
    assert result is not None
    return result


__all__ = ["CompareConfig", "ComparisonResult", "ModelEntry", "comparison_rows",
           "describe_hardware", "load_compare_config", "prepare_shared_split", "run_comparison", "run_entry",
           "split_fingerprint", "table2_markdown", "train_config_for"]
