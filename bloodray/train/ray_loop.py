"""The Ray Train worker: what each training process runs inside ``TorchTrainer``.

:func:`train_loop_per_worker` reads its shard with ``get_dataset_shard``, wraps the model with ``prepare_model``,
trains with the shared recipe (:mod:`bloodray.train.recipe`) and reports metrics with a checkpoint every epoch.
With ``train.ema_decay`` the weights' moving average is scored on val beside the raw weights and the better one is
checkpointed; with ``train.precise_bn_batches`` BatchNorm statistics are re-estimated from clean training batches
before validation. ``train.precision`` (:mod:`bloodray.precision`) picks bf16 autocast or fp32 once per worker; each
epoch's metrics say which ran and why.
"""

from __future__ import annotations

import os
import tempfile
import threading
import time
from typing import Any

import numpy as np

from bloodray import rundir, storage
from bloodray.classes import CLASS_NAMES, NUM_CLASSES
from bloodray.config import from_dict, to_dict
from bloodray.data.augment import AugmentConfig, augment_batch
from bloodray.data.preset import EvalPreset
from bloodray.data.stain import StainReference
from bloodray.models import get_model_info
from bloodray.precision import resolve_precision
from bloodray.train.adapt import backbone_parameters, load_init_weights, set_backbone_norm_eval
from bloodray.train.config import TrainConfig
from bloodray.train.recipe import TrainingState, precise_bn, start_training, train_step


def steps_per_epoch(train_rows: int, num_workers: int, batch_size: int) -> int:
    """Optimizer steps per epoch of one worker: its equal share of the rows in batches (the last one partial)."""
    return max(1, -(-(train_rows // max(1, num_workers)) // batch_size))


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train worker: train for the configured epochs, report and checkpoint each one.

    ``loop_config`` holds ``config`` (the :class:`TrainConfig` as a dict) and ``steps_per_epoch`` (for the
    per-step learning-rate schedule).
    """
    import ray.train
    import ray.train.torch
    import torch

    from bloodray.checkpoint import CheckpointMetadata, write_checkpoint
    from bloodray.train.resume_state import load_resume_state
    from bloodray.models import create_model

    cfg = from_dict(TrainConfig, loop_config["config"])
    opt = cfg.train
    recipe = opt.recipe()
    rank = ray.train.get_context().get_world_rank()
    torch.manual_seed(opt.seed + rank)
    threads = _worker_threads()
    # One intra-op thread per CPU the worker holds; more only fight over the same cores.
    torch.set_num_threads(threads)
    device = ray.train.torch.get_device()
    info = get_model_info(cfg.model.name)
    stain_norm = dict(loop_config.get("stain_norm") or {})
    preset = EvalPreset(cfg.input_size, info.mean, info.std,
                        stain=StainReference.from_metadata(stain_norm, "train_loop_config"))
    kwargs = cfg.builder_kwargs()
    model = create_model(cfg.model.name, NUM_CLASSES, pretrained=cfg.model.pretrained,
                         weights_uri=cfg.model.weights_uri, freeze_backbone=cfg.model.freeze_backbone,
                         storage_options=cfg.storage.storage_options(), **kwargs)

    start_epoch, history, train_state = 0, [], None
    resume_from = ray.train.get_checkpoint()
    if cfg.model.init_checkpoint and resume_from is None:
        source = load_init_weights(model, cfg)
        if rank == 0:
            print(f"[bloodray] starting from the weights of {source}", flush=True)
    if resume_from is not None:
        with resume_from.as_directory() as directory:
            resumed = load_resume_state(directory)
        history, train_state = resumed.history, resumed.train_state
        # A checkpoint of averaged weights keeps the raw ones, which training continues from, beside them.
        model.load_state_dict((train_state or {}).get("raw_weights") or resumed.weights)
        start_epoch = int(train_state["epoch"]) if train_state else len(history)
        if rank == 0:
            print(f"[bloodray] resuming {cfg.run.name} from the checkpoint of epoch {start_epoch}", flush=True)

    precision = resolve_precision(opt.precision, device.type)
    if rank == 0:
        print(f"[bloodray] training in {precision.name} ({precision.reason})", flush=True)
    channels_last = opt.channels_last
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    model = ray.train.torch.prepare_model(model)
    state = start_training(model, recipe, int(loop_config.get("steps_per_epoch", 1)))
    if train_state and "optimizer" in train_state:
        state.load_state_dict(train_state)
    autocast = precision.autocast()

    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")
    augment = opt.augment.to_augment() if opt.augment.enabled else None

    def normalize(images):
        return preset.normalize(images, device=device, channels_last=channels_last)

    for epoch in range(start_epoch, opt.epochs):
        started = time.perf_counter()
        model.train()
        frozen = backbone_parameters(model, cfg.model.name) if epoch < opt.freeze_backbone_epochs else []
        if frozen:
            set_backbone_norm_eval(model, cfg.model.name)
        loss_sum, seen = 0.0, 0
        # Augmentation runs in the iterator's prefetch thread, on the batch the model will see next,
        # seeded by (seed, rank, epoch) so a resumed epoch draws the same transforms.
        collate = train_collate_fn(augment, (opt.seed, rank, epoch), keep_clean=recipe.precise_bn_batches)
        for batch in train_shard.iter_torch_batches(batch_size=opt.batch_size, collate_fn=collate, device=device,
                                                    local_shuffle_buffer_size=opt.shuffle_buffer,
                                                    drop_last=False):
            loss = train_step(state, normalize(batch["image"]), batch["label"], recipe, autocast, frozen)
            loss_sum += float(loss) * len(batch["label"])
            seen += len(batch["label"])
        train_seconds = time.perf_counter() - started
        train_ended = time.time()

        if recipe.precise_bn_batches:
            for net in state.candidates().values():
                precise_bn(getattr(net, "module", net), (normalize(b) for b in collate.clean), autocast)
        scores = _validate(state, val_shard, normalize, max(64, opt.batch_size), device, autocast)
        # The better of the raw and averaged weights (by val macro-F1) is what this epoch checkpoints.
        chosen = max(scores, key=lambda which: (scores[which]["val_macro_f1"], which == "raw"))
        totals = _all_gather(np.array([loss_sum, seen], dtype=np.float64)).reshape(-1, 2).sum(axis=0)
        epoch_seconds = time.perf_counter() - started
        metrics = {
            "epoch": epoch + 1,
            "train_loss": float(totals[0] / max(totals[1], 1)),
            **scores[chosen],
            "weights": chosen,
            **({f"{k}_{which}": v for which, s in scores.items() for k, v in s.items()} if len(scores) > 1 else {}),
            "lr": state.last_lr(),
            "epoch_seconds": epoch_seconds,
            "train_images_per_second": float(totals[1] / train_seconds) if train_seconds > 0 else 0.0,
            # rank 0's training part of the epoch (no validation/checkpoint), for throughput benchmarks.
            "train_seconds": train_seconds,
            "train_ended_unix": train_ended,
            "torch_threads": threads,
            **precision.to_dict(),
        }
        history.append(metrics)
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if rank == 0:
                meta = CheckpointMetadata(
                    model_name=cfg.model.name, classes=list(CLASS_NAMES), input_size=preset.input_size,
                    mean=list(info.mean), std=list(info.std), stain_norm=stain_norm, model_kwargs=kwargs,
                    epoch=epoch + 1,
                    metrics=metrics, history=history, config=to_dict(cfg) | {"storage": storage.redact(to_dict(cfg.storage))})
                resume = {"epoch": epoch + 1, **state.state_dict()}
                if chosen != "raw":
                    resume["raw_weights"] = {k: v.detach().cpu() for k, v in
                                             getattr(model, "module", model).state_dict().items()}
                write_checkpoint(tmp, state.candidates()[chosen], meta, resume)
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
                left = (opt.epochs - epoch - 1) * epoch_seconds
                print(f"[bloodray] epoch {epoch + 1}/{opt.epochs}  train_loss {metrics['train_loss']:.4f}  "
                      f"val_loss {metrics['val_loss']:.4f}  val_acc {metrics['val_accuracy']:.4f}  "
                      f"val_macro_f1 {metrics['val_macro_f1']:.4f}{' (ema)' if chosen == 'ema' else ''}  "
                      f"{epoch_seconds:.1f}s/epoch  {metrics['train_images_per_second']:.0f} img/s  "
                      f"~{storage.human_duration(left)} left", flush=True)
            ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=rundir.checkpoint_dir_name(epoch + 1))


def _validate(state: TrainingState, val_shard, normalize, batch_size: int, device, autocast) -> dict[str, dict]:
    """Val loss, accuracy and macro-F1 of every candidate (raw, ema) over all workers' shards, in one pass."""
    import torch
    from torch import nn

    from bloodray.evaluation.metrics import classification_metrics

    nets = state.candidates()
    for net in nets.values():
        net.eval()
    logits: dict[str, list[np.ndarray]] = {which: [] for which in nets}
    labels = []
    with torch.inference_mode(), autocast:
        for batch in val_shard.iter_torch_batches(batch_size=batch_size, device=device,
                                                  dtypes={"image": torch.uint8, "label": torch.int64}):
            images = normalize(batch["image"])
            for which, net in nets.items():
                logits[which].append(net(images).float().cpu().numpy())
            labels.append(batch["label"].cpu().numpy())
    y = _all_gather(np.concatenate(labels) if labels else np.zeros((0,), np.int64))
    scores = {}
    for which, parts in logits.items():
        z = _all_gather(np.concatenate(parts) if parts else np.zeros((0, NUM_CLASSES), np.float32))
        found = classification_metrics(y, z.argmax(axis=1)) if len(y) else {}
        scores[which] = {
            "val_loss": float(nn.functional.cross_entropy(torch.from_numpy(z), torch.from_numpy(y))) if len(y)
            else float("nan"),
            "val_accuracy": float(found.get("accuracy", float("nan"))),
            "val_macro_f1": float(found.get("macro_f1", float("nan"))),
        }
    return scores


def _all_gather(array: np.ndarray) -> np.ndarray:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return array
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, array)
    return np.concatenate(parts)


def _worker_threads() -> int:
    """Torch intra-op threads for this worker: the whole CPUs Ray gave it (at least one)."""
    import ray

    try:
        cpus = float(ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0))
    except Exception:  # noqa: BLE001 - outside an actor (local tests): one thread per core
        cpus = float(os.cpu_count() or 1)
    return max(1, int(cpus))


def train_collate_fn(augment: AugmentConfig | None, seed: tuple[int, ...], keep_clean: int = 0):
    """``collate_fn`` for ``iter_torch_batches``: augment a numpy batch, return uint8/int64 tensors.

    Ray Data calls it in the iterator's prefetch thread(s), so augmentation of the next batch overlaps the current
    step instead of running as a separate Ray Data stage (tasks, object-store round trips and CPUs beside the
    workers) every epoch. Each batch draws its own child seed under a lock, so the result does not depend on which
    thread runs it. The first ``keep_clean`` batches are also kept un-augmented in ``.clean`` (uint8 tensors), for
    precise BatchNorm.
    """
    import torch
    from ray.data.collate_fn import NumpyBatchCollateFn

    class TrainCollate(NumpyBatchCollateFn):
        def __init__(self) -> None:
            self._seeds = np.random.default_rng(list(seed))
            self._lock = threading.Lock()
            self.clean: list[torch.Tensor] = []

        def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
            images = np.ascontiguousarray(batch["image"], dtype=np.uint8)
            with self._lock:
                child = int(self._seeds.integers(0, 2**63))
                if len(self.clean) < keep_clean:
                    self.clean.append(torch.from_numpy(images.copy()))
            if augment is not None:
                images = augment_batch(images, np.random.default_rng(child), augment)
            return {"image": torch.from_numpy(images),
                    "label": torch.from_numpy(np.asarray(batch["label"], dtype=np.int64))}

    return TrainCollate()
