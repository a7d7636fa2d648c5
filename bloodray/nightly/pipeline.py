"""Nightly classification of slide archives with Ray Data: the job's entry point and its Ray graph.

One run classifies every cell image of an archive and writes per-image
predictions, per-image errors and per-sample differentials as Parquet (layout
and schemas: :mod:`bloodray.nightly.contract`). The run::

    plan (driver, :mod:`~bloodray.nightly.plan`): checkpoint, flag rules, listing (:mod:`~bloodray.nightly.listing`)
      -> ray.data.from_items(work items: image URIs, or one item per tar shard)
      -> map_batches(read bytes + SHA-256 + decode + resize + thumbnail)   CPU tasks (*), :mod:`bloodray.data.stages`
         (GPU inference: read bytes + SHA-256 only; the actors decode on the GPU, :mod:`bloodray.data.device_decode`)
      -> map_batches(CellPredictorResults: model + staged rows)  actor pool (GPU or CPU)
      -> driver streams the rows into small Parquet files          _staging/<run_id>/results/
    aggregate (driver, DuckDB, :mod:`~bloodray.nightly.aggregate`):
      -> predictions / errors / differentials                    _staging/<run_id>/<table>/
    commit (:mod:`~bloodray.nightly.commit`): partitions, config, manifest LAST, cleanup

(*) With GPU actors the decode tasks run apart from the model actors. On a
CPU-only cluster both request ``inference.decode_cpus`` CPUs, so Ray's
optimizer fuses them (decode runs inside the actors: no copy through the
object store), and there is one actor per ``decode_cpus`` CPUs of the
cluster (:func:`bloodray.nightly.plan.actor_pool`). The result rows (a few
hundred bytes per image) are written by the driver as they arrive, so no
write task waits for a core the actors hold.

A bad input never fails the run: unreadable files, undecodable images and
unsafe tar members become rows of the errors table, so every input image
appears exactly once, in predictions or in errors.

Reruns: every run has its own ``run_id``; the visible run of a date is the
committed manifest with the latest ``committed_at``, so a rerun replaces the
date's results. ``run.incremental`` reconciles per image: listed image files
already classified in the visible run of the date (same checkpoint) are not
read again and their predictions are copied into the new run; new images and
images that failed last time are read; images no longer listed are dropped.
Each run is complete on its own. A run killed part-way leaves its staged
results; the next run of the date with the same settings picks them up and
reads only the rest (``run.resume``, :mod:`~bloodray.nightly.resume`).

One writer per output and date: a run holds the date's lease
(:mod:`~bloodray.nightly.lease`) from planning to commit, and the commit
refuses to publish rows that do not account for every listed input exactly
once. A run that fails removes its staging and releases its lease.
"""

from __future__ import annotations

import logging
import math
import posixpath
import time
from typing import Iterator

import numpy as np
import pyarrow as pa

from bloodray.logs import init_ray, progress
from bloodray.classes import CLASS_NAMES
from bloodray.data.decode import CellImageLimits
from bloodray.data.device_decode import decode_on_device, read_files
from bloodray.data.stages import (
    ERROR_COLUMNS,
    THUMBNAIL_SIZE,
    cluster_cpu_slots,
    read_decode_files,
    read_decode_shards,
    thumbnails,
)
from bloodray.nightly import contract
from bloodray.nightly.aggregate import staging_connection, write_differentials, write_image_tables
from bloodray.nightly.commit import AfterCommit, cleanup_runs, commit_run, discard_run, publish_files
from bloodray.nightly.config import ClassifyConfig, ClassifyError, ShiftAlarmError
from bloodray.nightly.listing import InputListing, list_inputs
from bloodray.nightly.plan import RunPlan, RunResult, actor_pool, gpus_per_actor, plan_run
from bloodray.nightly.resume import RESULT_FILE_ROWS, RESULTS, write_results
from bloodray.nightly.summary import add_details
from bloodray.predict import CellPredictor

log = logging.getLogger(__name__)
#: Schema metadata keys of a staged block that say how its actor ran (the runs table's precision and device).
PATH_METADATA = {"precision": b"bloodray.precision", "device": b"bloodray.device"}

__all__ = ["CellPredictorResults", "ClassifyConfig", "ClassifyError", "InputListing", "RunPlan", "RunResult",
           "build_dataset", "classify_to_staging", "cleanup_runs", "commit_run", "discard_run", "list_inputs",
           "plan_run", "publish_files", "run_classification", "stage_run", "to_staged_rows"]


def _text(values) -> list[str | None]:
    """Object column -> strings, with "" and None as null."""
    return [None if v is None or v == "" else str(v) for v in values]


def to_staged_rows(batch: dict[str, np.ndarray]) -> pa.Table:
    """Predictor output -> typed staged rows (:func:`bloodray.nightly.contract.staged_schema`, no tensors).

    Rows the model scored NaN or infinite become ``infer`` errors.
    """
    schema = contract.staged_schema()
    n = len(batch["uri"])
    stage, error_type, message = (np.array(["" if v is None else str(v) for v in batch[c]], dtype=object)
                                  for c in ERROR_COLUMNS)
    probs = np.asarray(batch["probs"], dtype=np.float32).reshape(n, len(CLASS_NAMES))
    ok = error_type == ""
    bad = ok & ~np.isfinite(probs).all(axis=1)
    if bad.any():
        error_type[bad], stage[bad] = "non_finite_output", "infer"
        message[bad] = "the model returned NaN or infinite probabilities"
        ok &= ~bad
    columns = {
        "sample_id": pa.array(_text(batch["sample_id"]), pa.string()),
        "image_uri": pa.array([str(u) for u in batch["uri"]], pa.string()),
        "image_sha256": pa.array(_text(batch["image_sha256"]), pa.string()),
        "stage": pa.array(_text(stage), pa.string()),
        "error_type": pa.array(_text(error_type), pa.string()),
        "message": pa.array(_text(message), pa.string()),
        "predicted_class": pa.array([str(c) if k else None for c, k in zip(batch["predicted_class"], ok)],
                                    pa.string()),
        "confidence": pa.array(np.asarray(batch["confidence"], dtype=np.float32), pa.float32(), mask=~ok),
        # Thumbnails of rows that failed inference are dropped with the row's prediction.
        "jpeg": pa.array([t if k else None for t, k in zip(batch.get("jpeg", [None] * n), ok)], pa.binary()),
    }
    for j, col in enumerate(contract.prob_columns()):
        columns[col] = pa.array(probs[:, j], pa.float32(), mask=~ok)
    ood = np.asarray(batch.get("ood_score", np.full(n, np.nan)), dtype=np.float32)
    columns["ood_score"] = pa.array(ood, pa.float32(), mask=~ok | ~np.isfinite(ood))
    unidentified = np.asarray(batch.get("unidentified", np.zeros(n, bool)), dtype=bool)
    columns["status"] = pa.array([(contract.UNIDENTIFIED if u else contract.CLASSIFIED) if k else None
                                  for u, k in zip(unidentified, ok)], pa.string())
    return pa.table({name: columns[name] for name in schema.names}, schema=schema)


class CellPredictorResults(CellPredictor):
    """The job's model actor: :class:`CellPredictor`, then the typed staged rows in the same call.

    Converting in the actor saves a task per batch and a copy of the
    probabilities through the object store. Batches of undecoded files
    (a ``data`` column, :func:`~bloodray.data.device_decode.read_files`) are
    decoded here first, on the model's device (GPU inference).
    """

    def __init__(self, *args, cell_limits: CellImageLimits | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.cell_limits = cell_limits

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        on_device = None
        if "data" in batch:
            batch, on_device = decode_on_device(batch, self.preset, self.device, self.cell_limits)
        if "jpeg" not in batch:
            # Decoded here (GPU decode): the thumbnail is made from the resized image this actor has. Batches of
            # the decode stage bring theirs (``jpeg``, made there before the resize), and it passes through.
            batch = {**batch, "jpeg": thumbnails(batch)}
        if on_device is not None:
            batch = {**batch, "image": on_device}
        out = super().__call__(batch)
        # How this actor ran, for the runs table: schema metadata costs no column and no bytes per row.
        precision = self.precision if self.runtime == "torch" else f"{self.precision} ({self.runtime})"
        return to_staged_rows(out).replace_schema_metadata({PATH_METADATA["precision"]: precision,
                                                            PATH_METADATA["device"]: str(self.device)})


def build_dataset(plan: RunPlan):
    """The lazy Ray Data pipeline from work items to typed result rows."""
    import ray

    cfg = plan.cfg
    bs = cfg.inference.batch_size
    read_args = {"num_cpus": cfg.inference.decode_cpus}
    parts = []
    work_blocks = len(plan.listing.shards)
    num_gpus = gpus_per_actor(cfg.inference.num_gpus, ray.cluster_resources().get("GPU", 0))
    # GPU inference decodes image files in the model actors, on the GPU (tar shards still decode in CPU tasks,
    # so an archive with shards keeps one decode path for all its rows).
    device_decode = num_gpus > 0 and not plan.listing.shards
    if plan.listing.files:
        items = [{"uri": u, "sample_id": s} for u, s in plan.listing.files]
        # A small archive is cut into one read batch per CPU slot rather than a few full batches.
        read_bs = min(bs, max(1, math.ceil(len(items) / cluster_cpu_slots(cfg.inference.decode_cpus))))
        blocks = max(1, min(math.ceil(len(items) / read_bs), 100_000))
        work_blocks += blocks
        read_kwargs = {"storage_options": plan.storage_options, "limits": cfg.limits.read_limits()}
        parts.append(ray.data.from_items(items, override_num_blocks=blocks).map_batches(
            read_files if device_decode else read_decode_files, batch_size=read_bs,
            fn_kwargs=read_kwargs if device_decode else {"preset": plan.preset, "thumbnail_size": THUMBNAIL_SIZE,
                                                         **read_kwargs},
            **read_args))
    if plan.listing.shards:
        shards = [{"uri": u} for u in plan.listing.shards]
        parts.append(ray.data.from_items(shards, override_num_blocks=len(shards)).map_batches(
            read_decode_shards, batch_size=1,
            fn_kwargs={"preset": plan.preset, "storage_options": plan.storage_options,
                       "sample_id_from": cfg.input.sample_id_from, "chunk_rows": bs,
                       "limits": cfg.limits.read_limits(), "thumbnail_size": THUMBNAIL_SIZE},
            **read_args))
    data = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
    log.info("model actors on %s", f"{num_gpus:g} GPU(s) each" if num_gpus else "CPU")
    # CPU inference: the actors ask for what the decode tasks ask for, so Ray fuses the two.
    gpu_args = {"num_gpus": num_gpus} if num_gpus > 0 else read_args
    return data.map_batches(
        CellPredictorResults, batch_size=bs,
        compute=actor_pool(cfg.inference, fused=len(parts) == 1, work_blocks=work_blocks),
        fn_constructor_kwargs={"checkpoint": plan.checkpoint_uri, "storage_options": plan.storage_options,
                               "device": cfg.model.device, "tta": cfg.model.tta,
                               "precision": cfg.inference.precision, "runtime": cfg.inference.runtime,
                               "cell_limits": cfg.limits.read_limits().cell if device_decode else None},
        **gpu_args)


def stage_run(plan: RunPlan) -> None:
    """Classify everything and write the run's tables into its staging directory.

    After this, ``_staging/<run_id>/{predictions,errors,differentials}/`` hold
    the complete tables of the run, but nothing is visible to readers.
    """
    classify_to_staging(plan)
    con = staging_connection(plan)
    try:
        write_image_tables(plan, con)
        write_differentials(plan, con)
    finally:
        con.close()


def classify_to_staging(plan: RunPlan) -> None:
    """The streaming part: Ray Data from work items to ``_staging/<run_id>/results/``."""
    if not (plan.listing.files or plan.listing.shards):
        plan.timings["read_decode_infer"] = 0.0
        return
    init_ray(dashboard=False)  # a local cluster, or the one RAY_ADDRESS names (Ray Jobs set it)
    require_device(plan.cfg.model.device)
    fs, _root = contract.output_root(plan.output_uri, plan.storage_options)
    timer = time.monotonic()
    log.info("run %s: classifying %d image file(s) and %d tar shard(s)", plan.run_id,
             len(plan.listing.files), len(plan.listing.shards))
    schema = contract.staged_schema()

    # Images (classified or failed) as they arrive; tar shards' member counts
    # are known only once read, so with shards the bar counts without a total.
    total = None if plan.listing.shards else len(plan.listing.files)

    def batches() -> Iterator[pa.RecordBatch]:
        # Output blocks as the actors finish them; Ray Data retries lost work, so each arrives once.
        received = 0
        with progress(total=total, desc="classify", unit="img") as bar:
            for block in build_dataset(plan).iter_batches(batch_size=None, batch_format="pyarrow"):
                bar.update(block.num_rows)
                meta = block.schema.metadata or {}
                for key, name in PATH_METADATA.items():
                    if name in meta:
                        plan.inference_paths[key].add(meta[name].decode())
                received += block.num_rows
                log.debug("received %d result rows", received)
                yield from block.cast(schema).to_batches()

    # Files of up to RESULT_FILE_ROWS rows (or output.rows_per_file if smaller), closed at least every
    # RESULT_FILE_SECONDS: each closed file survives a kill and the next run of the date resumes from it.
    write_results(batches(), schema, fs, posixpath.join(plan.staging, RESULTS),
                  min(plan.cfg.output.rows_per_file, RESULT_FILE_ROWS))
    plan.timings["read_decode_infer"] = time.monotonic() - timer


def require_device(device: str) -> None:
    """Refuse ``model.device`` naming hardware the Ray cluster lacks, before any actor starts.

    Without this, every model actor failed to start and Ray printed a long traceback asking to report a Ray bug.
    """
    if device.startswith("cuda"):
        import ray

        if not ray.cluster_resources().get("GPU", 0):
            raise ClassifyError(f"model.device={device}: the Ray cluster has no GPU; use model.device=auto "
                                "(a GPU when there is one) or cpu")
    elif device == "mps":
        import torch

        if not torch.backends.mps.is_available():
            raise ClassifyError("model.device=mps: this machine has no Apple MPS device; use model.device=auto or cpu")


def run_classification(cfg: ClassifyConfig, after_commit: AfterCommit | None = None) -> RunResult:
    """Classify an archive and commit the results; the one entry point of the nightly job.

    Re-running a date replaces that date's visible results; with
    ``run.incremental`` only images without a prediction in the visible run
    are classified and the rest carried over. A second run of the same date
    and output while this one holds the lease raises
    :class:`~bloodray.nightly.lease.LeaseHeldError`. Raises :class:`~bloodray.config.ConfigError`,
    :class:`~bloodray.storage.StorageError`,
    :class:`~bloodray.checkpoint.CheckpointError` or :class:`ClassifyError`
    for problems with the run as a whole; bad images never raise. The job as the command runs it, with the
    date's report after the commit (``report.enabled``), is :func:`bloodray.nightly_job.classify`; it passes
    ``after_commit`` (run under the lease once the run is committed, see
    :func:`~bloodray.nightly.commit.commit_run`) to refresh the date's ``verified_differentials``.
    """
    plan = plan_run(cfg)
    try:
        stage_run(plan)
        if plan.stats.get("domain_shift") and cfg.shift.on_alarm == "fail":
            raise ShiftAlarmError(f"run {plan.run_id} ({plan.run_date}): domain-shift alarm, images unlike the "
                                  f"training data in {plan.stats['n_samples_shifted']} of {plan.stats['n_samples']} "
                                  "sample(s); shift.on_alarm is 'fail', so nothing was published")
    except BaseException:
        discard_run(plan)  # a failed run leaves no staging and holds no lease
        raise
    result = commit_run(plan, after_commit)
    # Committed: from here nothing fails the run. The summary's details are read back from the committed
    # tables; a failure is logged and leaves them None.
    add_details(result, plan.storage_options)
    return result
