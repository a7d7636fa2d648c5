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
import io
import json
import os
import platform
import re
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping

import pyarrow as pa

from bloodray import __version__, rundir, storage
from bloodray.classes import CLASS_NAMES, NUM_CLASSES
from bloodray.config import (ConfigError, StorageConfig, apply_overrides, from_dict, load_config, to_dict, validate_tree)
from bloodray.data.labelled import SplitFractions, build_split, class_counts, read_parquet, write_parquet
from bloodray.models import UnknownModelError, get_model_info
from bloodray.train.ray_trainer import (DataSection, OptimSection, ScalingSection, TrainConfig,
                    model_kwargs)

COMPARISON_JSON = "comparison.json"
COMPARISON_PARQUET = "comparison.parquet"
TABLE2 = "table2.md"
SPLIT_INFO = "split.json"
ENTRY_RESULT = "comparison_entry.json"
STARTED = "comparison_started.json"
#: Sections a model entry's ``overrides`` may change; data, run and storage are shared by construction.
OVERRIDABLE = ("model", "train", "scaling")


# ----------------------------------------------------------------------------- config


@dataclass
class ModelEntry:
    """One model of the comparison; unset fields take the shared ``train`` section's values."""

    name: str
    #: row name in the tables and run directory name (default: ``name``); must be unique.
    label: str | None = None
    pretrained: bool = False
    #: local path or s3:// URI of pretrained weights instead of torchvision's download.
    weights_uri: str | None = None
    freeze_backbone: bool = False
    #: input side in px; None = the registry's native size.
    input_size: int | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)
    epochs: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    #: further ``dotted.key=value`` settings of this model's training config (model.*, train.*, scaling.*).
    overrides: list[str] = field(default_factory=list)

    @property
    def run_name(self) -> str:
        return self.label or self.name

    def validate(self, prefix: str) -> None:
        try:
            info = get_model_info(self.name)
        except UnknownModelError as exc:
            raise ConfigError(f"{prefix}.name: {exc}") from None
        if self.label is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._+-]*", self.label):
            raise ConfigError(f"{prefix}.label: {self.label!r} must be a name of letters, digits, '.', '_', '+', '-'")
        if self.weights_uri and not self.pretrained:
            raise ConfigError(f"{prefix}.weights_uri: set {prefix}.pretrained=true to load it")
        if self.pretrained and not self.weights_uri and not info.imagenet_weights:
            raise ConfigError(f"{prefix}.pretrained: {self.name} has no ImageNet weights; "
                              f"set {prefix}.weights_uri or pretrained=false")
        if self.freeze_backbone and not self.pretrained:
            raise ConfigError(f"{prefix}.freeze_backbone: needs {prefix}.pretrained=true "
                              "(a frozen random backbone learns nothing)")
        if self.input_size is not None and self.input_size < 16:
            raise ConfigError(f"{prefix}.input_size: must be >= 16")
        if self.epochs is not None and self.epochs < 1:
            raise ConfigError(f"{prefix}.epochs: must be >= 1")
        if self.batch_size is not None and self.batch_size < 1:
            raise ConfigError(f"{prefix}.batch_size: must be >= 1")
        if self.lr is not None and not self.lr > 0:
            raise ConfigError(f"{prefix}.lr: must be > 0")
        for text in self.overrides:
            section = text.split("=", 1)[0].strip().split(".", 1)[0]
            if section not in OVERRIDABLE:
                raise ConfigError(f"{prefix}.overrides: {text!r} may not change '{section}'; every model shares "
                                  f"data, run and storage (allowed: {', '.join(s + '.*' for s in OVERRIDABLE)})")


@dataclass
class OutputSection:
    #: local folder or s3:// prefix; runs live in <path>/runs/<label>, the tables at <path>/.
    path: str = "compare"
    #: best K checkpoints per model kept (by validation macro-F1).
    keep_checkpoints: int = 1
    max_failures: int = 3
    #: a model whose pretrained weights cannot be loaded: ``fail`` its entry (reason in the table)
    #: or train it from ``scratch`` (labelled so in the table).
    on_pretrained_error: Literal["fail", "scratch"] = "fail"

    def validate(self, prefix: str) -> None:
        if not self.path:
            raise ConfigError(f"{prefix}.path: required (a local folder or s3:// prefix)")
        if self.keep_checkpoints < 1:
            raise ConfigError(f"{prefix}.keep_checkpoints: must be >= 1")
        if self.max_failures < 0:
            raise ConfigError(f"{prefix}.max_failures: must be >= 0")


@dataclass
class CompareConfig:
    """The comparison job's configuration (``configs/compare/*.yaml`` + ``--set``).

    ``data``, ``train``, ``scaling`` and ``storage`` are the training job's
    sections, shared by every model; each entry of ``models`` may change its
    architecture, initialisation, input size and a few recipe settings.
    """

    data: DataSection
    models: list[ModelEntry]
    train: OptimSection = field(default_factory=OptimSection)
    scaling: ScalingSection = field(default_factory=ScalingSection)
    output: OutputSection = field(default_factory=OutputSection)
    storage: StorageConfig = field(default_factory=StorageConfig)

    def validate(self, prefix: str = "") -> None:
        if not self.models:
            raise ConfigError("models: list at least one model")
        seen: dict[str, int] = {}
        for i, entry in enumerate(self.models):
            where = f"models[{i}]"
            entry.validate(where)
            if entry.run_name in seen:
                raise ConfigError(f"{where}.label: {entry.run_name!r} is already used by models[{seen[entry.run_name]}]; "
                                  f"give each entry its own label")
            seen[entry.run_name] = i
            try:
                train_config_for(self, entry)
            except ConfigError as exc:
                raise ConfigError(f"{where} ({entry.run_name}): {exc}") from None

    @property
    def runs_uri(self) -> str:
        return storage.join(self.output.path, "runs")


def load_compare_config(path: str | None, overrides: list[str] | tuple[str, ...] = ()) -> CompareConfig:
    """Load and validate a comparison config from YAML plus ``dotted.key=value`` overrides.

    A ``--set`` can reach into one model entry by index or label:
    ``models.1.epochs=2``, ``models.resnet50.weights_uri=s3://bucket/resnet50.pth``.
    """
    return load_config(CompareConfig, path, _entry_overrides(path, overrides))


def _entry_overrides(path: str | None, overrides) -> list[str]:
    """Turn ``models.<index or label>.key=value`` into one override of the whole list (which
    :func:`~bloodray.config.apply_overrides` can apply: it walks mappings only)."""
    from bloodray.config import parse_override, read_yaml

    plain, targeted = [], []
    for text in overrides:
        keys, value = parse_override(text)
        (targeted if keys[0] == "models" and len(keys) > 2 else plain).append((text, keys, value))
    if not targeted:
        return [text for text, _, _ in plain]
    models = apply_overrides(read_yaml(path) if path else {}, [text for text, _, _ in plain]).get("models")
    if not isinstance(models, list) or not all(isinstance(m, Mapping) for m in models):
        raise ConfigError("models: expected a list of model entries to set keys of")
    models = [dict(m) for m in models]
    labels = [str(m.get("label") or m.get("name")) for m in models]
    for text, keys, value in targeted:
        which = keys[1]
        if which.isdigit():
            if int(which) >= len(models):
                raise ConfigError(f"models.{which}: no such entry (the config lists {len(models)} models)")
            index = int(which)
        elif labels.count(which) == 1:
            index = labels.index(which)
        else:
            raise ConfigError(f"models.{which}: no entry labelled {which!r}" if which not in labels else
                              f"models.{which}: several entries are labelled {which!r}; use the index")
        node = models[index]
        for key in keys[2:-1]:
            node[key] = dict(node.get(key) or {})
            node = node[key]
        node[keys[-1]] = value
    return [text for text, _, _ in plain] + [f"models={json.dumps(models)}"]


def train_config_for(cfg: CompareConfig, entry: ModelEntry, *, scratch: bool = False) -> TrainConfig:
    """The training config of one entry: the shared sections plus the entry's own settings.

    ``scratch`` drops the pretrained weights (and the frozen backbone) for the
    fallback when they cannot be loaded.
    """
    train = to_dict(cfg.train) | {"evaluate_test": False}  # the comparison evaluates (and times) it itself
    for key in ("epochs", "batch_size", "lr"):
        if getattr(entry, key) is not None:
            train[key] = getattr(entry, key)
    data = {
        "data": to_dict(cfg.data),
        "model": {"name": entry.name, "pretrained": entry.pretrained and not scratch,
                  "weights_uri": None if scratch else entry.weights_uri,
                  "freeze_backbone": entry.freeze_backbone and not scratch,
                  "input_size": entry.input_size, "kwargs": dict(entry.kwargs)},
        "train": train,
        "scaling": to_dict(cfg.scaling),
        "run": {"name": entry.run_name, "storage_path": cfg.runs_uri,
                "keep_checkpoints": cfg.output.keep_checkpoints, "max_failures": cfg.output.max_failures},
        "storage": to_dict(cfg.storage),
    }
    tc = from_dict(TrainConfig, apply_overrides(data, entry.overrides))
    validate_tree(tc)
    return tc


# ----------------------------------------------------------------------------- helpers


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


def _read_json(uri: str, opts: Mapping[str, Any]) -> Any:
    fs, path = storage.filesystem(uri, opts)
    with fs.open(path, "rb") as fh:
        return json.loads(fh.read())


def _write_json(uri: str, payload: Any, opts: Mapping[str, Any]) -> None:
    storage.write_bytes(uri, json.dumps(payload, indent=2, default=str).encode(), opts)


def _copy(src: str, dest: str, opts: Mapping[str, Any]) -> None:
    fs, path = storage.filesystem(src, opts)
    with fs.open(path, "rb") as fh:
        storage.write_bytes(dest, fh.read(), opts)


def _human(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def describe_hardware(cfg: CompareConfig) -> dict[str, Any]:
    """What the models were trained on: the Ray cluster's CPUs/GPUs and this machine's CPU model."""
    import ray
    import torch

    resources = ray.cluster_resources()
    nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
    gpu_types = sorted(k.split(":", 1)[1] for k in resources if k.startswith("accelerator_type:"))
    cpus = float(resources.get("CPU", 0))
    gpus = float(resources.get("GPU", 0))
    cpu = _cpu_model()
    where = f"{nodes} Ray nodes" if nodes > 1 else "1 machine"
    workers = f"{cfg.scaling.num_workers} Ray Train worker{'s' if cfg.scaling.num_workers != 1 else ''}"
    if cfg.scaling.use_gpu:
        gpu = ", ".join(gpu_types) or "GPU"
        summary = f"{cfg.scaling.num_workers} x {gpu} GPU ({gpus:g} GPUs, {cpus:g} CPUs on {where}; {workers})"
        short = f"{cfg.scaling.num_workers} x {gpu} GPU"
    else:
        summary = f"CPU only: {cpu}, {cpus:g} cores ({where}; {workers})"
        short = f"{cpus:g}-core {cpu} CPU"
    return {"summary": summary, "short": short, "cpu_model": cpu, "cpu_count_driver": os.cpu_count(), "ray_nodes": nodes,
            "ray_cpus": cpus, "ray_gpus": gpus, "gpu_types": gpu_types, "use_gpu": cfg.scaling.use_gpu,
            "num_workers": cfg.scaling.num_workers, "platform": platform.platform(), "torch": torch.__version__,
            "ray": ray.__version__}


def _parameter_counts(tc: TrainConfig) -> tuple[int, int]:
    """(all, trainable) parameters, counted on the meta device: nothing allocated or downloaded."""
    import torch

    from bloodray.models import count_parameters, create_model

    with torch.device("meta"):
        model = create_model(tc.model.name, NUM_CLASSES, freeze_backbone=tc.model.freeze_backbone,
                             **model_kwargs(tc))
    return count_parameters(model), count_parameters(model, trainable_only=True)


def _probe_pretrained(tc: TrainConfig) -> str | None:
    """Build the model with its pretrained weights; return why that failed, or None."""
    from bloodray.models import PretrainedWeightsError, create_model

    try:
        create_model(tc.model.name, NUM_CLASSES, pretrained=True, weights_uri=tc.model.weights_uri,
                     storage_options=tc.storage.storage_options(), **model_kwargs(tc))
    except (PretrainedWeightsError, storage.StorageError, OSError) as exc:
        return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return None


# ----------------------------------------------------------------------------- the shared split


def _split_settings(cfg: CompareConfig) -> dict[str, Any]:
    return {"root": cfg.data.root, "split": to_dict(cfg.data.split), "max_per_class": cfg.data.max_per_class}


def prepare_shared_split(cfg: CompareConfig) -> tuple[pa.Table, str]:
    """Build the comparison's split once (or reuse it); returns the manifest and its fingerprint."""
    opts = cfg.storage.storage_options()
    out = cfg.output.path
    manifest_uri, info_uri = rundir.split_manifest(out), storage.join(out, SPLIT_INFO)
    settings = _split_settings(cfg)
    if _exists(manifest_uri, opts) and _exists(info_uri, opts):
        info = _read_json(info_uri, opts)
        if info.get("settings") != settings:
            raise ConfigError(f"output.path: {out} already holds a comparison split of other data "
                              f"({json.dumps(info.get('settings'))}); use a new output.path")
        table = read_parquet(manifest_uri, opts)
        if split_fingerprint(table) != info.get("fingerprint"):
            raise ConfigError(f"output.path: {manifest_uri} no longer matches its recorded fingerprint; "
                              "use a new output.path")
        return table, info["fingerprint"]
    sp = cfg.data.split
    table, dropped = build_split(cfg.data.root, SplitFractions(sp.train, sp.val, sp.test), sp.seed, opts,
                                 cfg.data.max_per_class)
    fingerprint = split_fingerprint(table)
    write_parquet(table, manifest_uri, opts)
    _write_json(rundir.data_report(out), {"data_root": cfg.data.root, "kept": table.num_rows,
                                                 "dropped": dropped, "class_counts": class_counts(table)}, opts)
    _write_json(info_uri, {"settings": settings, "fingerprint": fingerprint, "n": table.num_rows,
                           "class_counts": class_counts(table)}, opts)
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


def _history(checkpoint: str, opts: Mapping[str, Any]) -> list[dict[str, Any]]:
    from bloodray.evaluation.evaluate import training_history

    return training_history(checkpoint, opts)


def _check_started_run(cfg: CompareConfig, entry: ModelEntry, tc: TrainConfig) -> None:
    """A run resumes by name: refuse to resume one that was started with other settings (more epochs is fine)."""
    opts = cfg.storage.storage_options()
    settings = to_dict(tc)
    settings["train"].pop("epochs")
    fingerprint = hashlib.sha256(json.dumps(storage.redact(settings), sort_keys=True, default=str).encode()).hexdigest()
    uri = storage.join(tc.run_uri, STARTED)
    if _exists(uri, opts):
        if _read_json(uri, opts).get("fingerprint") != fingerprint:
            index = cfg.models.index(entry)
            raise ConfigError(f"models[{index}].label: the run {tc.run_uri} was started with other settings for "
                              f"{entry.run_name!r}; give the entry a new label (or delete that run)")
        return
    _write_json(uri, {"fingerprint": fingerprint, "settings": storage.redact(settings)}, opts)


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
    from bloodray.evaluation.evaluate import evaluate_run
    from bloodray.train.ray_trainer import run_training

    opts = cfg.storage.storage_options()
    requested = train_config_for(cfg, entry)
    done_uri = storage.join(requested.run_uri, ENTRY_RESULT)
    requested_fp = _config_fingerprint(requested)
    if _exists(done_uri, opts):
        previous = _read_json(done_uri, opts)
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
    fs, run_path = storage.filesystem(tc.run_uri, opts)
    resumed = bool(fs.glob(f"{run_path.rstrip('/')}/checkpoint_*"))
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
    history = _history(result.best_checkpoint, opts)
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
    _write_json(done_uri, record, opts)
    print(f"[bloodray] compare: {entry.run_name}: test accuracy {metrics['accuracy']:.4f}, "
          f"macro-F1 {metrics['macro_f1']:.4f} (n={metrics['n']}); trained {_human(record['train_seconds'])}", flush=True)
    return record


# ----------------------------------------------------------------------------- outputs


def _num(value: Any, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def table2_markdown(models: list[dict[str, Any]], split: Mapping[str, Any], hardware: Mapping[str, Any],
                    cfg: CompareConfig) -> str:
    """The comparison as markdown: per-class rows like the paper's Table 2, then one summary row per model."""
    from bloodray.evaluation.metrics import table2_markdown_rows

    counts = split["class_counts"]
    sizes = {s: sum(c.values()) for s, c in counts.items()}
    lines = [
        "# Model comparison on one split",
        "",
        f"Data: `{cfg.data.root}`, {split['n']:,} images after de-duplication, split "
        f"{sizes['train']:,} train / {sizes['val']:,} val / {sizes['test']:,} test (seed {cfg.data.split.seed}, "
        f"split fingerprint `{split['sha256'][:16]}`, identical for every model).",
        f"Hardware: {hardware['summary']}.",
        "",
        "## Per class (test split)",
        "",
        "| Model | Type | Truth | Classified | Accuracy | Precision | Recall | F1 |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for rec in models:
        if rec["status"] != "ok":
            lines.append(f"| {rec['label']} | {rec['status']} (see notes) | | | | | | |")
            continue
        metrics = {"per_class": rec["per_class"], "confusion_matrix": rec["confusion_matrix"]} | rec["test"]
        lines += table2_markdown_rows(rec["label"], metrics)
    lines += [
        "",
        "Per-class \"Accuracy\" is one-vs-rest ((TP + TN) / N) as in the paper; the overall numbers are below.",
        "",
        "## Summary",
        "",
        "| Model | Architecture | Init | Input | Params | Epochs | Accuracy | Balanced acc. | Macro-F1 | "
        "Train time | Train img/s | Eval img/s | Hardware |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    notes = []
    for rec in models:
        params = f"{rec['params'] / 1e6:.3g} M" if rec.get("params") else "-"
        if rec.get("trainable_params") and rec["trainable_params"] != rec.get("params"):
            params += f" ({rec['trainable_params'] / 1e6:.3g} M trained)"
        init = rec["init"] + (" (frozen backbone)" if rec.get("freeze_backbone") else "")
        if rec["status"] != "ok":
            lines.append(f"| {rec['label']} | {rec['model']} | {init} | {rec['input_size']} px | {params} | "
                         f"{rec['epochs']} | {rec['status']} (see notes) | | | | | | {hardware['short']} |")
            continue
        test = rec["test"]
        epochs = f"{rec['epochs_trained']} (best {rec['best_epoch']})" if rec.get("best_epoch") else rec["epochs_trained"]
        lines.append(
            f"| {rec['label']} | {rec['model']} | {init} | {rec['input_size']} px | {params} | {epochs} | "
            f"{test['accuracy']:.4f} | {test['balanced_accuracy']:.4f} | {test['macro_f1']:.4f} | "
            f"{_human(rec['train_seconds'])} | {_num(rec['train_images_per_second'], '.1f')} | "
            f"{_num(rec['eval_images_per_second'], '.1f')} | {hardware['short']} |")
        if rec.get("init_note"):
            notes.append(f"- {rec['label']}: {rec['init_note']}")
    failed = [r for r in models if r["status"] != "ok"]
    lines += [
        "",
        "Epochs: trained (best = the checkpoint by validation macro-F1 that was tested). "
        "Train time: the sum of the epochs' training + validation loops (data decoding and start-up excluded). "
        "Train img/s: median over epochs of training images per second across all workers. Eval img/s: test "
        "images through the Ray Data evaluation pipeline (decode + inference, one predictor) over its wall time. "
        "Init: `scratch` = random initialisation; `pretrained` = ImageNet weights.",
    ]
    if notes or failed:
        lines += ["", "Notes:", ""] + notes + [f"- {r['label']}: **{r['status']}**: {r['error']}" for r in failed]
    return "\n".join(lines) + "\n"


def comparison_rows(models: list[dict[str, Any]], hardware: Mapping[str, Any]) -> pa.Table:
    """One row per model and class (``row_type='class'``) and one per model (``row_type='summary'``)."""
    rows = []
    for rec in models:
        base = {"model": rec["label"], "architecture": rec["model"], "status": rec["status"], "error": rec["error"],
                "init": rec["init"], "pretrained": bool(rec.get("pretrained")),
                "freeze_backbone": bool(rec.get("freeze_backbone")), "input_size": rec["input_size"],
                "params": rec.get("params"), "trainable_params": rec.get("trainable_params"),
                "epochs": rec.get("epochs_trained", rec.get("epochs")), "hardware": hardware["summary"],
                "split_sha256": rec.get("split_sha256")}
        empty_class = {"class_name": None, "precision": None, "recall": None, "f1": None, "support": None,
                       "predicted": None}
        summary = {"n": None, "accuracy": None, "balanced_accuracy": None, "macro_f1": None,
                   "macro_precision": None, "macro_recall": None, "train_seconds": None, "wall_seconds": None,
                   "train_images_per_second": None, "eval_images_per_second": None}
        if rec["status"] == "ok":
            summary |= {k: rec["test"][k] for k in ("n", "accuracy", "balanced_accuracy", "macro_f1",
                                                    "macro_precision", "macro_recall")}
            summary |= {k: rec.get(k) for k in ("train_seconds", "wall_seconds", "train_images_per_second",
                                                "eval_images_per_second")}
            for name in CLASS_NAMES:
                pc = rec["per_class"][name]
                rows.append({"row_type": "class", **base, **empty_class, **{k: None for k in summary},
                             "class_name": name, "precision": pc["precision"], "recall": pc["recall"],
                             "f1": pc["f1"], "support": pc["support"], "predicted": pc["predicted"]})
        rows.append({"row_type": "summary", **base, **empty_class, **summary})
    schema = pa.schema([
        ("row_type", pa.string()), ("model", pa.string()), ("architecture", pa.string()), ("status", pa.string()),
        ("error", pa.string()), ("init", pa.string()), ("pretrained", pa.bool_()), ("freeze_backbone", pa.bool_()),
        ("input_size", pa.int32()), ("params", pa.int64()), ("trainable_params", pa.int64()), ("epochs", pa.int32()),
        ("hardware", pa.string()), ("split_sha256", pa.string()), ("class_name", pa.string()),
        ("precision", pa.float64()), ("recall", pa.float64()), ("f1", pa.float64()), ("support", pa.int64()),
        ("predicted", pa.int64()), ("n", pa.int64()), ("accuracy", pa.float64()),
        ("balanced_accuracy", pa.float64()), ("macro_f1", pa.float64()), ("macro_precision", pa.float64()),
        ("macro_recall", pa.float64()), ("train_seconds", pa.float64()), ("wall_seconds", pa.float64()),
        ("train_images_per_second", pa.float64()), ("eval_images_per_second", pa.float64()),
    ])
    return pa.Table.from_pylist(rows, schema=schema)


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
    import pyarrow.parquet as pq

    opts = cfg.storage.storage_options()
    out = cfg.output.path
    public = [{k: v for k, v in m.items() if k not in ("history", "skipped")} for m in models]
    payload = {"created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "bloodray_version": __version__, "hardware": hardware, "split": split, "models": public,
               "config": storage.redact(to_dict(cfg))}
    table = table2_markdown(models, split, hardware, cfg)
    result = ComparisonResult(out, public, split["sha256"], hardware, table)
    buf = io.BytesIO()
    pq.write_table(comparison_rows(models, hardware), buf)
    for name, data in ((COMPARISON_JSON, json.dumps(payload, indent=2, default=str).encode()),
                       (COMPARISON_PARQUET, buf.getvalue()), (TABLE2, table.encode()),
                       ("config.yaml", _config_yaml(cfg))):
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
    import ray

    opts = cfg.storage.storage_options()
    table, fingerprint = prepare_shared_split(cfg)
    storage.write_bytes(storage.join(cfg.output.path, "config.yaml"), _config_yaml(cfg), opts)
    if not ray.is_initialized():
        ray.init()  # joins the cluster of `ray job submit` (RAY_ADDRESS) or starts a local one
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


__all__ = ["CompareConfig", "ComparisonResult", "ModelEntry", "OutputSection", "comparison_rows",
           "describe_hardware", "load_compare_config", "prepare_shared_split", "run_comparison", "run_entry",
           "split_fingerprint", "table2_markdown", "train_config_for"]
