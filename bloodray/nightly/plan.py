"""Planning a nightly run on the driver: dates, run id, checkpoint, flag rules, inputs, and actor sizing.

Everything decided before any image is read goes into a :class:`RunPlan`;
the Ray stages (:mod:`bloodray.nightly.pipeline`), the aggregation
(:mod:`bloodray.nightly.aggregate`) and the commit (:mod:`bloodray.nightly.commit`)
read it and add their timings and counts.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import posixpath
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from bloodray import storage
from bloodray.checkpoint import load_checkpoint, resolve_checkpoint
from bloodray.config import ConfigError
from bloodray.data.preset import EvalPreset
from bloodray.data.stages import cluster_cpu_slots
from bloodray.nightly import contract
from bloodray.nightly.config import ClassifyConfig, ClassifyError, InferenceConfig, effective_threshold
from bloodray.nightly.differential import (FlagRules, FlagRulesError, ReferenceRangeError, SampleMetadataError,
                                           load_flag_rules, load_sample_metadata)
from bloodray.nightly.listing import InputListing, list_inputs

log = logging.getLogger(__name__)

#: The file a run writes first into its staging dir, so cleanups of other runs can tell it is in flight.
RUN_MARKER = "run.json"


def now() -> dt.datetime:
    """The current UTC time (timestamps of the manifest)."""
    return dt.datetime.now(dt.timezone.utc)


@dataclass
class RunPlan:
    """Everything decided on the driver before any image is read (see :func:`plan_run`)."""

    cfg: ClassifyConfig
    run_id: str
    run_date: str
    input_uri: str
    output_uri: str
    storage_options: dict[str, Any]
    checkpoint_uri: str
    checkpoint_id: str
    model_name: str
    preset: EvalPreset
    review_threshold: float
    rules: FlagRules
    started_at: dt.datetime
    listing: InputListing
    skip_samples: frozenset[str] = frozenset()
    carried_from: str | None = None
    #: ``sample_id, wbc_count_10e9_per_l`` from ``flags.sample_metadata``, or None.
    sample_metadata: pa.Table | None = None
    timings: dict[str, float] = field(default_factory=dict)
    stats: dict[str, int] = field(default_factory=dict)

    @property
    def staging(self) -> str:
        """fsspec path of this run's staging directory."""
        return contract.staging_dir(contract.output_root(self.output_uri, self.storage_options)[1], self.run_id)


@dataclass
class RunResult:
    """Summary of a committed run (the manifest row, in Python)."""

    run_id: str
    run_date: str
    output_uri: str
    manifest_uri: str
    checkpoint_id: str
    n_inputs: int
    n_predictions: int
    n_errors: int
    n_samples: int
    n_review: int
    incremental_skipped_samples: int
    timings: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (for JSON)."""
        return dataclasses.asdict(self)

    def describe(self) -> str:
        """A few human-readable lines for the console."""
        carried = (f", {self.incremental_skipped_samples} sample(s) carried over"
                   if self.incremental_skipped_samples else "")
        timings = ", ".join(f"{k} {v:.1f}s" for k, v in self.timings.items())
        return (f"run {self.run_id} ({self.run_date}) committed with checkpoint {self.checkpoint_id}\n"
                f"  {self.n_inputs} input(s) read{carried}: {self.n_predictions} predictions "
                f"({self.n_review} for review), {self.n_errors} errors, {self.n_samples} samples\n"
                f"  manifest: {self.manifest_uri}\n"
                f"  timings: {timings}")


def plan_run(cfg: ClassifyConfig) -> RunPlan:
    """Resolve dates, run id, checkpoint and flag rules; list the inputs; pick samples to skip.

    Writes only ``_staging/<run_id>/run.json`` (:data:`RUN_MARKER`) (so cleanups of other runs can
    tell this run is in flight).
    """
    started = now()
    timer = time.monotonic()
    so = cfg.storage.storage_options()
    run_date = cfg.run.date or started.date().isoformat()
    input_uri = storage.join(cfg.input.uri.rstrip("/"), cfg.run.date) if cfg.run.date else cfg.input.uri
    output_uri = cfg.output.uri.rstrip("/")
    run_id = cfg.run.run_id or f"{started:%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:8]}"
    fs, root = contract.output_root(output_uri, so)

    try:
        fs.invalidate_cache()
        already = fs.exists(contract.manifest_path(root, run_date, run_id))
    except Exception as exc:  # noqa: BLE001
        raise storage.describe_storage_error(output_uri, exc) from exc
    if already:
        raise ClassifyError(f"run.run_id: run {run_id!r} is already committed for {run_date} under {output_uri}; "
                            "choose a new run id (or leave it unset)")

    # Checkpoint problems surface here, before Ray starts any actor: the whole checkpoint (seal, weights hash,
    # architecture) is verified by loading it once on the driver's CPU.
    checkpoint_uri = resolve_checkpoint(cfg.model.checkpoint, so)
    meta = load_checkpoint(checkpoint_uri, so, device="cpu").metadata
    flags = cfg.flags
    try:
        rules = load_flag_rules(flags.reference_ranges, so, ig_percent=flags.ig_percent, min_wbc=flags.min_wbc,
                                erythroblast_per_100_wbc=flags.erythroblast_per_100_wbc,
                                confidence=flags.confidence)
    except ReferenceRangeError as exc:
        raise ConfigError(f"flags.reference_ranges: {exc}") from exc
    except FlagRulesError as exc:
        raise ConfigError(str(exc)) from exc
    sample_metadata = None
    if flags.sample_metadata:
        try:
            sample_metadata = load_sample_metadata(flags.sample_metadata, so)
        except SampleMetadataError as exc:
            raise ConfigError(f"flags.sample_metadata: {exc}") from exc
    base = meta.preset()
    preset = EvalPreset(base.input_size, base.mean, base.std, cfg.limits.max_pixels)

    skip: frozenset[str] = frozenset()
    carried_from = None
    if cfg.run.incremental:
        visible = contract.visible_runs(output_uri, so, run_date)
        if visible.num_rows and visible.column("checkpoint_id")[0].as_py() == meta.checkpoint_id:
            carried_from = visible.column("run_id")[0].as_py()
            done = contract.table_dataset(output_uri, "differentials", visible, so).to_table(columns=["sample_id"])
            skip = frozenset(s for s in done.column("sample_id").to_pylist() if s is not None)
            log.info("incremental: %d sample(s) of run %s are skipped and carried over", len(skip), carried_from)
        elif visible.num_rows:
            log.info("incremental: the visible run of %s used checkpoint %s, not %s; classifying everything",
                     run_date, visible.column("checkpoint_id")[0].as_py(), meta.checkpoint_id)

    log.info("run %s (date %s): listing %s", run_id, run_date, input_uri)
    listing = list_inputs(input_uri, cfg.input.layout, cfg.input.sample_id_from, so)
    if not listing.files and not listing.shards and not listing.errors:
        raise ClassifyError(f"{input_uri}: no images or tar shards found "
                            f"(layout {cfg.input.layout}; images: *.jpg, *.jpeg, *.png, *.bmp, *.tif; shards: *.tar)")
    n_listed = len(listing.files)
    listing.files = [(u, s) for u, s in listing.files if s not in skip]
    # Listing error rows of a carried-over sample (a .gif in it...) come with its carried rows.
    listing.errors = [e for e in listing.errors if e["sample_id"] is None or e["sample_id"] not in skip]
    log.info("found %d image file(s) (%d skipped as already classified), %d tar shard(s), %d unassignable, "
             "%d other file(s) ignored", n_listed, n_listed - len(listing.files), len(listing.shards),
             len(listing.errors), listing.ignored)

    plan = RunPlan(cfg=cfg, run_id=run_id, run_date=run_date, input_uri=input_uri, output_uri=output_uri,
                   storage_options=so, checkpoint_uri=checkpoint_uri, checkpoint_id=meta.checkpoint_id,
                   model_name=meta.model_name, preset=preset,
                   review_threshold=effective_threshold(cfg, meta.review_threshold), rules=rules, sample_metadata=sample_metadata,
                   started_at=started, listing=listing, skip_samples=skip, carried_from=carried_from)
    try:
        storage.put_bytes(fs, posixpath.join(plan.staging, RUN_MARKER),
                          json.dumps({"run_id": run_id, "run_date": run_date, "started_at": started.isoformat()}).encode())
    except Exception as exc:  # noqa: BLE001 - missing bucket, path under a file, read-only or full disk
        raise storage.describe_storage_error(output_uri, exc) from exc
    plan.timings["list"] = time.monotonic() - timer
    return plan


def actor_pool(cfg: InferenceConfig, fused: bool = True, work_blocks: int | None = None):
    """Model actor pool: as configured, else one actor per GPU share, else one per ``decode_cpus`` CPUs.

    On a CPU-only cluster the actors ask for the CPUs of a read/decode task,
    so Ray fuses the two (``fused``): each actor does all the work of its
    batches and the actors take every CPU (the driver writes the results).
    When decode tasks run apart (image files and tar shards in one run: a
    union, which Ray does not fuse across) the pool autoscales up to one
    decode task's CPUs short of the cluster, so decoding always has a core.
    Never more fused actors than ``work_blocks`` (input blocks): an actor
    without a block would only load the model.
    """
    import ray

    if cfg.concurrency:
        return ray.data.ActorPoolStrategy(size=cfg.concurrency)
    resources = ray.cluster_resources()
    if cfg.num_gpus > 0:
        if resources.get("GPU", 0) < cfg.num_gpus:
            # Otherwise the actors would wait for a GPU forever.
            raise ClassifyError(f"inference.num_gpus: {cfg.num_gpus} GPU(s) per actor, but the Ray cluster has "
                                f"{resources.get('GPU', 0)}; set inference.num_gpus=0 for CPU inference, or "
                                "inference.concurrency to wait for autoscaled GPU nodes")
        return ray.data.ActorPoolStrategy(size=max(1, int(resources.get("GPU", 0) // cfg.num_gpus)))
    slots = cluster_cpu_slots(cfg.decode_cpus)
    if fused:
        return ray.data.ActorPoolStrategy(size=max(1, min(slots, work_blocks or slots)))
    return ray.data.ActorPoolStrategy(min_size=1, max_size=max(1, slots - 1))
