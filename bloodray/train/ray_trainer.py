"""Data-parallel training with Ray Train (``TorchTrainer``): the driver.

:func:`run_training` scans and splits the labelled data, builds Ray Datasets whose CPU map stages decode the
images, and starts a ``TorchTrainer`` whose workers run :func:`bloodray.train.ray_loop.train_loop_per_worker`.
Ray keeps the best K checkpoints by validation macro-F1, restarts failed workers from the latest checkpoint
(``FailureConfig``), and resumes a resubmitted run of the same name from its ``storage_path``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Any, Mapping

from bloodray.logs import init_ray
from bloodray import rundir, storage
from bloodray.config import save_config, to_dict
from bloodray.data.labelled import (DatasetError, SplitFractions, build_split, class_counts, decode_batch, drop_failed,
                                    read_parquet, rows_of, write_parquet)
from bloodray.train.adapt import mix_original, stain_reference, with_init_checkpoint
from bloodray.train.config import DataSection, TrainConfig, load_train_config
from bloodray.train.ray_loop import steps_per_epoch, train_loop_per_worker

#: Environment of the training worker processes. glibc's malloc hands freed blocks over
#: 128 KB-32 MB (activations and gradients: ~200 MB a step for bloodnet at 100 px, batch 32)
#: back to the OS and page-faults them in again on the next step, which cost a quarter of
#: a CPU training step (bench/train.py). Keeping them in the heap makes steps reuse memory.
TRAIN_WORKER_ENV = {
    "MALLOC_MMAP_THRESHOLD_": str(1 << 30),
    "MALLOC_TRIM_THRESHOLD_": str(1 << 32),
}


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


def prepare_split(run_uri: str, data: DataSection,
                  storage_options: Mapping[str, Any] | None = None) -> tuple[Any, list[dict[str, str]]]:
    """Build (or reuse) the split manifest of ``data`` in ``run_uri``; returns it and the inputs the listing dropped.

    An existing manifest is the split: a resumed run must train and validate on exactly the images it started
    with. The data report is written first and the manifest last, so a driver stopped between the two writes
    leaves no manifest and a resubmission simply splits again.
    """
    opts = dict(storage_options or {})
    manifest_uri = rundir.split_manifest(run_uri)
    report_uri = rundir.data_report(run_uri)
    fs, manifest_path = storage.filesystem(manifest_uri, opts)
    if fs.exists(manifest_path):
        return read_parquet(manifest_uri, opts), storage.read_json(report_uri, opts).get("dropped", [])
    sp = data.split
    table, dropped = build_split(data.root, SplitFractions(sp.train, sp.val, sp.test), sp.seed, opts,
                                 data.max_per_class)
    table, mixed = mix_original(table, data, opts)
    storage.write_json(report_uri, {"data_root": data.root, "kept": table.num_rows, "dropped": dropped,
                                    "class_counts": class_counts(table),
                                    **({"mixed_original": mixed} if mixed else {})}, opts)
    write_parquet(table, manifest_uri, opts)
    return table, dropped


def _decoded(rows: list[dict[str, Any]], cfg: TrainConfig):
    import ray

    ds = ray.data.from_items(rows, override_num_blocks=max(1, min(64, len(rows) // cfg.data.decode_batch_size)))
    return ds.map_batches(decode_batch, batch_size=cfg.data.decode_batch_size, num_cpus=cfg.data.cpus_per_task,
                          fn_kwargs={"input_size": cfg.input_size, "storage_options": cfg.storage.storage_options(),
                                     "max_pixels": cfg.data.max_pixels}).materialize()


def _stain_sample(rows: list[dict[str, Any]], cfg: TrainConfig):
    """Decoded uint8 images of the training rows the stain reference is fitted on (by sorted URI, so a resumed
    run fits the same reference)."""
    import numpy as np

    from bloodray.data.stain import reference_sample

    uris = sorted(row["uri"] for row in rows)
    uris = [uris[i] for i in reference_sample(len(uris))]
    batch = decode_batch({"uri": np.array(uris, dtype=object)}, input_size=cfg.input_size,
                         storage_options=cfg.storage.storage_options(), max_pixels=cfg.data.max_pixels)
    return np.stack([image for image, error in zip(batch["image"], batch["error"]) if not error])


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
    # The starting checkpoint's architecture, read (and its seal checked) before any data or cluster work.
    cfg = with_init_checkpoint(cfg)
    # Data problems (missing bucket, bad credentials, empty folder) surface before any cluster work.
    table, dropped = prepare_split(cfg.run_uri, cfg.data, opts)
    save_config(cfg, rundir.run_config(cfg.run_uri), opts)
    # Joins the cluster of `ray job submit` (RAY_ADDRESS) or starts a local one. The workers' own lines (one per
    # epoch, the resume notice) are the training's progress report, so they reach the console.
    init_ray(log_to_driver=True)
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
        report = storage.read_json(rundir.data_report(cfg.run_uri), opts)
        report["skipped_undecodable"] = skipped
        storage.write_json(rundir.data_report(cfg.run_uri), report, opts)
    datasets = {split: decoded[split].map_batches(drop_failed, batch_size=None, num_cpus=cfg.data.cpus_per_task)
                .materialize() for split in ("train", "val")}
    del decoded
    n_train = datasets["train"].count()
    if n_train == 0:
        raise ValueError(f"{cfg.data.root}: no decodable training images")
    # A new block order every epoch spreads different images over the workers; augmentation happens in the
    # workers' iterators (train_collate_fn), so no Ray Data stage runs beside the training workers.
    datasets["train"] = datasets["train"].randomize_block_order()

    reference = stain_reference(cfg.model.stain_norm, cfg.model.init_checkpoint,
                                lambda: _stain_sample(rows["train"], cfg), opts)
    if reference is not None:
        print(f"[bloodray] stain normalisation: Reinhard towards L*a*b* mean {list(reference.lab_mean)}, "
              f"std {list(reference.lab_std)} ({reference.images} images)", flush=True)

    storage_path, storage_fs = _ray_storage(cfg)
    resources = {"CPU": _cpus_per_worker(cfg)}
    if cfg.scaling.use_gpu:
        resources["GPU"] = cfg.scaling.gpus_per_worker
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": to_dict(cfg), "steps_per_epoch": steps_per_epoch(
            n_train, cfg.scaling.num_workers, cfg.train.batch_size),
            "stain_norm": reference.to_metadata() if reference is not None else {}},
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
    storage.write_json(rundir.summary(cfg.run_uri), dataclasses.asdict(outcome), opts)
    return outcome


__all__ = ["TRAIN_WORKER_ENV", "TrainConfig", "TrainResult", "load_train_config", "prepare_split", "run_training"]
