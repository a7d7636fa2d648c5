"""Data-parallel training with Ray Train (``TorchTrainer``).

The driver (:func:`run_training`) scans and splits the labelled data, builds
Ray Datasets whose CPU map stages decode and augment the images, and starts a
``TorchTrainer``. Each worker runs :func:`train_loop_per_worker`: it reads its
shard with ``get_dataset_shard``, wraps the model with ``prepare_model`` and
reports metrics with a checkpoint every epoch. Ray keeps the best K checkpoints
by validation macro-F1, restarts failed workers from the latest checkpoint
(``FailureConfig``), and resumes a resubmitted run of the same name from its
``storage_path``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping

import numpy as np

from bloodray import rundir, storage
from bloodray.classes import CLASS_NAMES, NUM_CLASSES
from bloodray.config import ConfigError, StorageConfig, from_dict, load_config, save_config, to_dict
from bloodray.data.labelled import (DatasetError, SplitFractions, build_split, class_counts, decode_batch, drop_failed, read_parquet,
                   rows_of, write_parquet)
from bloodray.models import UnknownModelError, get_model_info
from bloodray.data.decode import DEFAULT_MAX_PIXELS
from bloodray.data.preset import AugmentConfig, EvalPreset, augment_batch

log = logging.getLogger(__name__)

#: Environment of the training worker processes. glibc's malloc hands freed blocks over
#: 128 KB-32 MB (activations and gradients: ~200 MB a step for bloodnet at 100 px, batch 32)
#: back to the OS and page-faults them in again on the next step, which cost a quarter of
#: a CPU training step (bench/train.py). Keeping them in the heap makes steps reuse memory.
TRAIN_WORKER_ENV = {
    "MALLOC_MMAP_THRESHOLD_": str(1 << 30),
    "MALLOC_TRIM_THRESHOLD_": str(1 << 32),
}


# ----------------------------------------------------------------------------- config


@dataclass
class SplitSection:
    train: float = 0.7
    val: float = 0.1
    test: float = 0.2
    seed: int = 0

    def validate(self, prefix: str) -> None:
        for name in ("train", "val", "test"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"{prefix}.{name}: must be between 0 and 1")
        if abs(self.train + self.val + self.test - 1.0) > 1e-6:
            raise ConfigError(f"{prefix}: train + val + test must sum to 1 (got {self.train + self.val + self.test:g})")
        if self.train <= 0 or self.val <= 0:
            raise ConfigError(f"{prefix}: train and val fractions must be > 0")


@dataclass
class DataSection:
    """Where the labelled images are and how they are split and fed."""

    root: str
    split: SplitSection = field(default_factory=SplitSection)
    #: keep at most this many images per class (deterministic by content); for quick runs.
    max_per_class: int | None = None
    #: CPUs each decode/augment task asks Ray for; fractional so stages fit beside the workers.
    cpus_per_task: float = 0.5
    max_pixels: int = DEFAULT_MAX_PIXELS
    decode_batch_size: int = 64

    def validate(self, prefix: str) -> None:
        if not self.root:
            raise ConfigError(f"{prefix}.root: required (a local folder or s3:// prefix of <class>/ folders)")
        if self.max_per_class is not None and self.max_per_class < 1:
            raise ConfigError(f"{prefix}.max_per_class: must be >= 1")
        if self.cpus_per_task <= 0:
            raise ConfigError(f"{prefix}.cpus_per_task: must be > 0")


@dataclass
class ModelSection:
    name: str = "bloodnet"
    pretrained: bool = False
    #: local path or s3:// URI of ImageNet weights (a torchvision state_dict) to use instead of downloading.
    weights_uri: str | None = None
    freeze_backbone: bool = False
    #: override the registry's input size (px); None = the model's own.
    input_size: int | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)

    def validate(self, prefix: str) -> None:
        try:
            get_model_info(self.name)
        except UnknownModelError as exc:
            raise ConfigError(f"{prefix}.name: {exc}") from None
        if self.weights_uri and not self.pretrained:
            raise ConfigError(f"{prefix}.weights_uri: set {prefix}.pretrained=true to load it")
        if self.input_size is not None and self.input_size < 16:
            raise ConfigError(f"{prefix}.input_size: must be >= 16")


@dataclass
class AugmentSection:
    enabled: bool = True
    flips: bool = True
    rotate90: bool = True
    color_jitter: float = 0.1
    hue_jitter: float = 0.02
    min_scale: float = 0.85

    def validate(self, prefix: str) -> None:
        if not 0.0 < self.min_scale <= 1.0:
            raise ConfigError(f"{prefix}.min_scale: must be in (0, 1]")
        if not 0.0 <= self.color_jitter < 1.0:
            raise ConfigError(f"{prefix}.color_jitter: must be in [0, 1)")

    def to_augment(self) -> AugmentConfig:
        return AugmentConfig(self.flips, self.rotate90, self.color_jitter, self.hue_jitter, self.min_scale)


@dataclass
class OptimSection:
    """The training recipe. Defaults are the paper's: Adam, lr 1e-3, cross-entropy."""

    epochs: int = 150
    #: images per worker per step.
    batch_size: int = 32
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.9
    schedule: Literal["constant", "cosine"] = "constant"
    warmup_epochs: int = 0
    label_smoothing: float = 0.0
    #: weight of Inception's auxiliary classifier loss.
    aux_loss_weight: float = 0.4
    #: bf16 autocast and channels_last on GPU (ignored on CPU).
    mixed_precision: bool = True
    channels_last: bool = True
    shuffle_buffer: int = 512
    seed: int = 0
    augment: AugmentSection = field(default_factory=AugmentSection)
    #: evaluate the best checkpoint on the test split when training ends.
    evaluate_test: bool = True

    def validate(self, prefix: str) -> None:
        if self.epochs < 1:
            raise ConfigError(f"{prefix}.epochs: must be >= 1")
        if self.batch_size < 1:
            raise ConfigError(f"{prefix}.batch_size: must be >= 1")
        if not self.lr > 0:
            raise ConfigError(f"{prefix}.lr: must be > 0")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ConfigError(f"{prefix}.label_smoothing: must be in [0, 1)")
        if self.warmup_epochs < 0 or self.warmup_epochs >= self.epochs and self.warmup_epochs > 0:
            raise ConfigError(f"{prefix}.warmup_epochs: must be >= 0 and < epochs")


@dataclass
class ScalingSection:
    num_workers: int = 2
    use_gpu: bool = False
    #: CPUs per training worker; None = fit the cluster, leaving room for the data stages.
    cpus_per_worker: float | None = None
    gpus_per_worker: float = 1.0

    def validate(self, prefix: str) -> None:
        if self.num_workers < 1:
            raise ConfigError(f"{prefix}.num_workers: must be >= 1")
        if self.cpus_per_worker is not None and self.cpus_per_worker <= 0:
            raise ConfigError(f"{prefix}.cpus_per_worker: must be > 0")


@dataclass
class RunSection:
    name: str = "bloodnet"
    #: local folder or s3:// prefix; the run lives in <storage_path>/<name>.
    storage_path: str = "runs"
    #: best K checkpoints by val macro-F1 are kept.
    keep_checkpoints: int = 2
    #: worker failures survived by restarting from the latest checkpoint.
    max_failures: int = 3

    def validate(self, prefix: str) -> None:
        if not self.name or "/" in self.name:
            raise ConfigError(f"{prefix}.name: must be a non-empty name without '/'")
        if self.keep_checkpoints < 1:
            raise ConfigError(f"{prefix}.keep_checkpoints: must be >= 1")


@dataclass
class TrainConfig:
    """The training job's configuration (``configs/train/*.yaml`` + ``--set``)."""

    data: DataSection
    model: ModelSection = field(default_factory=ModelSection)
    train: OptimSection = field(default_factory=OptimSection)
    scaling: ScalingSection = field(default_factory=ScalingSection)
    run: RunSection = field(default_factory=RunSection)
    storage: StorageConfig = field(default_factory=StorageConfig)

    @property
    def run_uri(self) -> str:
        return storage.join(self.run.storage_path, self.run.name)

    @property
    def input_size(self) -> int:
        return self.model.input_size or get_model_info(self.model.name).input_size


def load_train_config(path: str | None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Load and validate a training config from YAML plus ``dotted.key=value`` overrides."""
    return load_config(TrainConfig, path, overrides)


# ----------------------------------------------------------------------------- worker side


def model_kwargs(cfg: TrainConfig) -> dict[str, Any]:
    """Builder kwargs recorded in the checkpoint so the model can be rebuilt exactly."""
    kwargs = dict(cfg.model.kwargs)
    info = get_model_info(cfg.model.name)
    # Only builders whose architecture depends on the input size take it (bloodnet's dense layer).
    if cfg.model.input_size and "input_size" in inspect.signature(info.builder).parameters:
        kwargs["input_size"] = cfg.model.input_size
    return kwargs


def _lr_lambda(cfg: OptimSection):
    def factor(epoch: int) -> float:
        if cfg.warmup_epochs and epoch < cfg.warmup_epochs:
            return (epoch + 1) / cfg.warmup_epochs
        if cfg.schedule == "cosine":
            span = max(1, cfg.epochs - cfg.warmup_epochs)
            return 0.5 * (1 + math.cos(math.pi * (epoch - cfg.warmup_epochs) / span))
        return 1.0
    return factor


def build_optimizer(model, cfg: OptimSection):
    """Optimizer over trainable parameters (a frozen backbone is left out)."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=True)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def classification_loss(outputs, targets, criterion, aux_weight: float):
    """Cross-entropy; Inception's training-mode output adds its auxiliary head's loss."""
    aux = getattr(outputs, "aux_logits", None)
    logits = getattr(outputs, "logits", outputs)
    loss = criterion(logits, targets)
    if aux is not None:
        loss = loss + aux_weight * criterion(aux, targets)
    return loss, logits


def _all_gather(array: np.ndarray) -> np.ndarray:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return array
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, array)
    return np.concatenate(parts)


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train worker: train for the configured epochs, report and checkpoint each one."""
    import ray.train
    import ray.train.torch
    import torch
    from torch import nn

    from bloodray.checkpoint import CheckpointMetadata, load_resume_state, write_checkpoint
    from bloodray.evaluation.metrics import classification_metrics
    from bloodray.models import create_model

    cfg = from_dict(TrainConfig, loop_config["config"])
    opt = cfg.train
    context = ray.train.get_context()
    rank = context.get_world_rank()
    torch.manual_seed(opt.seed + rank)
    threads = _worker_threads()
    # One intra-op thread per CPU the worker holds; more only fight over the same cores.
    torch.set_num_threads(threads)
    device = ray.train.torch.get_device()
    on_gpu = device.type == "cuda"
    info = get_model_info(cfg.model.name)
    preset = EvalPreset(cfg.input_size, info.mean, info.std)
    kwargs = model_kwargs(cfg)
    model = create_model(cfg.model.name, NUM_CLASSES, pretrained=cfg.model.pretrained,
                         weights_uri=cfg.model.weights_uri, freeze_backbone=cfg.model.freeze_backbone,
                         storage_options=cfg.storage.storage_options(), **kwargs)

    start_epoch, history, train_state = 0, [], None
    resume_from = ray.train.get_checkpoint()
    if resume_from is not None:
        with resume_from.as_directory() as directory:
            resumed = load_resume_state(directory)
        model.load_state_dict(resumed.weights)
        history, train_state = resumed.history, resumed.train_state
        start_epoch = int(train_state["epoch"]) if train_state else len(history)
        if rank == 0:
            print(f"[bloodray] resuming {cfg.run.name} from the checkpoint of epoch {start_epoch}", flush=True)

    channels_last = on_gpu and opt.channels_last
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    model = ray.train.torch.prepare_model(model)
    optimizer = build_optimizer(model, opt)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(opt))
    if train_state:
        optimizer.load_state_dict(train_state["optimizer"])
        scheduler.load_state_dict(train_state["scheduler"])
    criterion = nn.CrossEntropyLoss(label_smoothing=opt.label_smoothing)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if on_gpu and opt.mixed_precision
                else contextlib.nullcontext())

    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")
    batch_types = {"image": torch.uint8, "label": torch.int64}
    augment = opt.augment.to_augment() if opt.augment.enabled else None

    for epoch in range(start_epoch, opt.epochs):
        started = time.perf_counter()
        model.train()
        loss_sum, seen = 0.0, 0
        # Augmentation runs in the iterator's prefetch thread, on the batch the model will see next,
        # seeded by (seed, rank, epoch) so a resumed epoch draws the same transforms.
        collate = train_collate_fn(augment, (opt.seed, rank, epoch))
        for batch in train_shard.iter_torch_batches(batch_size=opt.batch_size, collate_fn=collate, device=device,
                                                    local_shuffle_buffer_size=opt.shuffle_buffer,
                                                    drop_last=False):
            images = preset.normalize(batch["image"], device=device, channels_last=channels_last)
            targets = batch["label"]
            with autocast:
                loss, _ = classification_loss(model(images), targets, criterion, opt.aux_loss_weight)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += float(loss.detach()) * len(targets)
            seen += len(targets)
        scheduler.step()
        train_seconds = time.perf_counter() - started
        train_ended = time.time()

        model.eval()
        val_logits, val_labels = [], []
        with torch.inference_mode(), autocast:
            for batch in val_shard.iter_torch_batches(batch_size=max(64, opt.batch_size), dtypes=batch_types,
                                                      device=device):
                images = preset.normalize(batch["image"], device=device, channels_last=channels_last)
                val_logits.append(model(images).float().cpu().numpy())
                val_labels.append(batch["label"].cpu().numpy())
        logits = _all_gather(np.concatenate(val_logits) if val_logits else np.zeros((0, NUM_CLASSES), np.float32))
        labels = _all_gather(np.concatenate(val_labels) if val_labels else np.zeros((0,), np.int64))
        totals = _all_gather(np.array([loss_sum, seen], dtype=np.float64)).reshape(-1, 2).sum(axis=0)
        val_loss = float(nn.functional.cross_entropy(torch.from_numpy(logits), torch.from_numpy(labels))) if len(labels) else float("nan")
        metrics_all = classification_metrics(labels, logits.argmax(axis=1)) if len(labels) else {}
        epoch_seconds = time.perf_counter() - started
        metrics = {
            "epoch": epoch + 1,
            "train_loss": float(totals[0] / max(totals[1], 1)),
            "val_loss": val_loss,
            "val_accuracy": float(metrics_all.get("accuracy", float("nan"))),
            "val_macro_f1": float(metrics_all.get("macro_f1", float("nan"))),
            "lr": float(scheduler.get_last_lr()[0]),
            "epoch_seconds": epoch_seconds,
            "train_images_per_second": float(totals[1] / train_seconds) if train_seconds > 0 else 0.0,
            # rank 0's training part of the epoch (no validation/checkpoint), for throughput benchmarks.
            "train_seconds": train_seconds,
            "train_ended_unix": train_ended,
            "torch_threads": threads,
        }
        history.append(metrics)
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if rank == 0:
                meta = CheckpointMetadata(
                    model_name=cfg.model.name, classes=list(CLASS_NAMES), input_size=preset.input_size,
                    mean=list(info.mean), std=list(info.std), model_kwargs=kwargs, epoch=epoch + 1,
                    metrics=metrics, history=history, config=to_dict(cfg) | {"storage": storage.redact(to_dict(cfg.storage))})
                write_checkpoint(tmp, model, meta, {"epoch": epoch + 1, "optimizer": optimizer.state_dict(),
                                                    "scheduler": scheduler.state_dict()})
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
                left = (opt.epochs - epoch - 1) * epoch_seconds
                print(f"[bloodray] epoch {epoch + 1}/{opt.epochs}  train_loss {metrics['train_loss']:.4f}  "
                      f"val_loss {val_loss:.4f}  val_acc {metrics['val_accuracy']:.4f}  "
                      f"val_macro_f1 {metrics['val_macro_f1']:.4f}  {epoch_seconds:.1f}s/epoch  "
                      f"{metrics['train_images_per_second'] * 1:.0f} img/s  ~{_human(left)} left", flush=True)
            ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=rundir.checkpoint_dir_name(epoch + 1))


def _worker_threads() -> int:
    """Torch intra-op threads for this worker: the whole CPUs Ray gave it (at least one)."""
    import ray

    try:
        cpus = float(ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0))
    except Exception:  # noqa: BLE001 - outside an actor (local tests): one thread per core
        cpus = float(os.cpu_count() or 1)
    return max(1, int(cpus))


def train_collate_fn(augment: AugmentConfig | None, seed: tuple[int, ...]):
    """``collate_fn`` for ``iter_torch_batches``: augment a numpy batch, return uint8/int64 tensors.

    Ray Data calls it in the iterator's prefetch thread(s), so augmentation of
    the next batch overlaps the current step instead of running as a separate
    Ray Data stage (tasks, object-store round trips and CPUs beside the
    workers) every epoch. Each batch draws its own child seed under a lock, so
    the result does not depend on which thread runs it.
    """
    import threading

    import torch
    from ray.data.collate_fn import NumpyBatchCollateFn

    class TrainCollate(NumpyBatchCollateFn):
        def __init__(self) -> None:
            self._seeds = np.random.default_rng(list(seed))
            self._lock = threading.Lock()

        def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
            images = np.ascontiguousarray(batch["image"], dtype=np.uint8)
            if augment is not None:
                with self._lock:
                    child = int(self._seeds.integers(0, 2**63))
                images = augment_batch(images, np.random.default_rng(child), augment)
            return {"image": torch.from_numpy(images),
                    "label": torch.from_numpy(np.asarray(batch["label"], dtype=np.int64))}

    return TrainCollate()


def _human(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


# ----------------------------------------------------------------------------- driver side


@dataclass
class TrainResult:
    """What a finished training run left behind."""

    run_uri: str
    best_checkpoint: str
    metrics: dict[str, Any]
    test_metrics: dict[str, Any] | None = None


def _ray_storage(cfg: TrainConfig):
    """``(storage_path, storage_filesystem)`` for ``RunConfig``: S3 goes through the same s3fs as the data."""
    import pyarrow.fs as pafs

    if storage.protocol_of(cfg.run.storage_path) == "file":
        return os.path.abspath(cfg.run.storage_path), None
    fs, path = storage.filesystem(cfg.run.storage_path, cfg.storage.storage_options())
    return path, pafs.PyFileSystem(pafs.FSSpecHandler(fs))


def _checkpoint_uri(cfg: TrainConfig, checkpoint) -> str:
    if storage.protocol_of(cfg.run.storage_path) == "file":
        return checkpoint.path
    return f"{storage.protocol_of(cfg.run.storage_path)}://{checkpoint.path}"


def _cpus_per_worker(cfg: TrainConfig) -> float:
    import ray

    if cfg.scaling.cpus_per_worker is not None:
        return cfg.scaling.cpus_per_worker
    total = float(ray.cluster_resources().get("CPU", 1.0))
    # Leave one data task's worth of CPU so decode/augment stages can run beside the workers.
    return max(0.25, min(1.0, (total - cfg.data.cpus_per_task) / cfg.scaling.num_workers))


def prepare_split(cfg: TrainConfig) -> tuple[Any, list[dict[str, str]]]:
    """Build (or, on resume, reuse) the run's split manifest; returns it and the dropped inputs."""
    opts = cfg.storage.storage_options()
    manifest_uri = rundir.split_manifest(cfg.run_uri)
    report_uri = rundir.data_report(cfg.run_uri)
    fs, manifest_path = storage.filesystem(manifest_uri, opts)
    if fs.exists(manifest_path):
        # A resumed run must train and validate on exactly the images it started with.
        table = read_parquet(manifest_uri, opts)
        with fs.open(storage.filesystem(report_uri, opts)[1], "r") as fh:
            dropped = json.load(fh).get("dropped", [])
        return table, dropped
    sp = cfg.data.split
    table, dropped = build_split(cfg.data.root, SplitFractions(sp.train, sp.val, sp.test), sp.seed, opts,
                                 cfg.data.max_per_class)
    write_parquet(table, manifest_uri, opts)
    _write_json(report_uri, {"data_root": cfg.data.root, "kept": table.num_rows, "dropped": dropped,
                             "class_counts": class_counts(table)}, opts)
    return table, dropped


def _write_json(uri: str, payload: Mapping[str, Any], storage_options: Mapping[str, Any]) -> None:
    storage.write_bytes(uri, json.dumps(payload, indent=2, default=str).encode(), storage_options)


def _decoded(rows: list[dict[str, Any]], cfg: TrainConfig):
    import ray

    ds = ray.data.from_items(rows, override_num_blocks=max(1, min(64, len(rows) // cfg.data.decode_batch_size)))
    return ds.map_batches(decode_batch, batch_size=cfg.data.decode_batch_size, num_cpus=cfg.data.cpus_per_task,
                          fn_kwargs={"input_size": cfg.input_size, "storage_options": cfg.storage.storage_options(),
                                     "max_pixels": cfg.data.max_pixels}).materialize()


def run_training(cfg: TrainConfig) -> TrainResult:
    """Train ``cfg.model`` on ``cfg.data`` with Ray Train and return the best checkpoint.

    Safe to call again with the same ``run.name``: the run resumes from its
    latest checkpoint and split manifest.
    """
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.v2.api.config import LoggingConfig
    from ray.train.torch import TorchTrainer

    opts = cfg.storage.storage_options()
    # Data problems (missing bucket, bad credentials, empty folder) surface before any cluster work.
    table, dropped = prepare_split(cfg)
    save_config(cfg, rundir.run_config(cfg.run_uri), opts)
    if not ray.is_initialized():
        ray.init()  # joins the cluster of `ray job submit` (RAY_ADDRESS) or starts a local one
    print(f"[bloodray] {table.num_rows} images after de-duplication ({len(dropped)} dropped); "
          f"split {json.dumps({s: int(sum(c.values())) for s, c in class_counts(table).items()})}", flush=True)

    rows = {split: rows_of(table, split) for split in ("train", "val", "test")}
    for split in ("train", "val"):
        if not rows[split]:
            raise DatasetError(f"{cfg.data.root}: the {split} split is empty ({table.num_rows} usable images); "
                               f"add images or change data.split.{split}")
    # The test split is decoded too, only so that every bad file is listed in the run's report now.
    decoded = {split: _decoded(split_rows, cfg) for split, split_rows in rows.items() if split_rows}
    skipped = []
    for ds in decoded.values():
        bad = ds.select_columns(["uri", "error"]).to_pandas()
        skipped += bad[bad["error"] != ""].to_dict("records")
    if skipped:
        print(f"[bloodray] skipping {len(skipped)} unreadable image(s), listed in {rundir.data_report(cfg.run_uri)}",
              flush=True)
        report_fs, report_path = storage.filesystem(rundir.data_report(cfg.run_uri), opts)
        with report_fs.open(report_path, "r") as fh:
            report = json.load(fh)
        report["skipped_undecodable"] = skipped
        _write_json(rundir.data_report(cfg.run_uri), report, opts)
    datasets = {split: decoded[split].map_batches(drop_failed, batch_size=None, num_cpus=cfg.data.cpus_per_task)
                .materialize() for split in ("train", "val")}
    del decoded
    if datasets["train"].count() == 0:
        raise ValueError(f"{cfg.data.root}: no decodable training images")
    # A new block order every epoch spreads different images over the workers; augmentation happens in the
    # workers' iterators (train_collate_fn), so no Ray Data stage runs beside the training workers.
    datasets["train"] = datasets["train"].randomize_block_order()

    storage_path, storage_fs = _ray_storage(cfg)
    resources = {"CPU": _cpus_per_worker(cfg)}
    if cfg.scaling.use_gpu:
        resources["GPU"] = cfg.scaling.gpus_per_worker
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": to_dict(cfg)},
        scaling_config=ScalingConfig(num_workers=cfg.scaling.num_workers, use_gpu=cfg.scaling.use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(
            name=cfg.run.name, storage_path=storage_path, storage_filesystem=storage_fs,
            # Ray's print patch would echo every worker line twice on the driver console;
            # TRAIN_WORKER_ENV keeps the step's memory in the heap.
            worker_runtime_env={"env_vars": {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0", **TRAIN_WORKER_ENV}},
            # Our own per-epoch line says what matters; Ray's per-report INFO lines would bury it.
            logging_config=LoggingConfig(log_level="WARNING"),
            failure_config=FailureConfig(max_failures=cfg.run.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.run.keep_checkpoints,
                                               checkpoint_score_attribute="val_macro_f1",
                                               checkpoint_score_order="max")),
        datasets=datasets,
    )
    result = trainer.fit()
    best = result.get_best_checkpoint(metric="val_macro_f1", mode="max") or result.checkpoint
    if best is None:
        raise RuntimeError(f"{cfg.run_uri}: training finished without a checkpoint")
    best_uri = _checkpoint_uri(cfg, best)
    outcome = TrainResult(run_uri=cfg.run_uri, best_checkpoint=best_uri, metrics=dict(result.metrics or {}))
    if cfg.train.evaluate_test:
        from bloodray.evaluation.evaluate import evaluate_run

        outcome.test_metrics = evaluate_run(cfg.run_uri, storage_options=opts).summary()
    _write_json(rundir.summary(cfg.run_uri), dataclasses.asdict(outcome), opts)
    return outcome
