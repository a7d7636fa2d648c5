"""The comparison's outputs: the Table 2 markdown, the one-row-per-model-and-class table, the hardware record."""

from __future__ import annotations

import os
import platform
from typing import Any, Mapping

import pyarrow as pa

from bloodray.classes import CLASS_NAMES
from bloodray.storage import human_duration
from bloodray.train.compare_config import CompareConfig


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
        lines += table2_markdown_rows(rec["label"], {"per_class": rec["per_class"],
                                                     "confusion_matrix": rec["confusion_matrix"]})
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
            f"{human_duration(rec['train_seconds'])} | {_num(rec['train_images_per_second'], '.1f')} | "
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
