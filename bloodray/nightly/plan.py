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
from typing import Any, Mapping

import pyarrow as pa

from bloodray import quality_gate, storage
from bloodray.checkpoint import load_checkpoint, resolve_checkpoint
from bloodray.config import ConfigError
from bloodray.data.preset import EvalPreset
from bloodray.data.stages import cluster_cpu_slots
from bloodray.nightly import contract, resume, tables
from bloodray.nightly.config import (ClassifyConfig, ClassifyError, ClusterResourcesError, InferenceConfig,
                                     NothingToClassify, effective_threshold)
from bloodray.nightly.differential import (FlagRules, FlagRulesError, ReferenceRangeError, SampleMetadataError,
                                           checkpoint_confusion, load_flag_rules, load_sample_metadata)
from bloodray.nightly.lease import Lease, acquire_lease
from bloodray.nightly.legacy import refuse_legacy
from bloodray.nightly.listing import ArchiveNotFoundError, InputListing, date_folders, list_inputs
from bloodray.nightly.shift import ShiftRule, no_shift
from bloodray.ood import pooled_reference_note

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
    #: samples of which every listed image is carried over (nothing of them is read).
    skip_samples: frozenset[str] = frozenset()
    #: URIs of listed image files whose predictions are carried over from ``carried_from``.
    carried_images: frozenset[str] = frozenset()
    carried_from: str | None = None
    #: URIs of listed image files whose rows were adopted from a killed run's staging (not read again), and its id.
    resumed_images: frozenset[str] = frozenset()
    resumed_from: tuple[str, ...] = ()
    #: this run's hold on (output, date), released by the commit (:mod:`bloodray.nightly.lease`).
    lease: Lease | None = None
    #: ``sample_id, wbc_count_10e9_per_l`` from ``flags.sample_metadata``, or None.
    sample_metadata: pa.Table | None = None
    #: the checkpoint's OOD reference metadata (threshold, validation quantiles...); None = no OOD score, no alarm.
    ood: dict[str, Any] | None = None
    #: why the flags do not account for the model's errors (no val confusion matrix); None = they do.
    flags_uncorrected: str | None = None
    #: the alarm's tests (``shift.alpha``, ``shift.min_effect``).
    shift_rule: ShiftRule = ShiftRule()
    #: run-level shift columns of the manifest, set by the aggregation.
    run_shift: dict[str, Any] = field(default_factory=no_shift)
    timings: dict[str, float] = field(default_factory=dict)
    stats: dict[str, int] = field(default_factory=dict)
    #: ``precision`` and ``device`` values the model actors reported (the runs table joins each set with ",").
    inference_paths: dict[str, set[str]] = field(default_factory=lambda: {"precision": set(), "device": set()})

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
    #: cells out of distribution (not counted), and the domain-shift alarm of the run.
    n_unidentified: int = 0
    domain_shift: bool = False
    n_samples_shifted: int = 0
    #: images whose rows were picked up from a killed run of the date (counted in ``n_inputs``, not read again).
    n_resumed: int = 0
    #: set after the commit (:mod:`bloodray.nightly.summary`): samples with a flag (``sample_id``, ``flags``),
    #: bad inputs per ``error_type``; None when they could not be read back.
    flagged_samples: list[dict[str, Any]] | None = None
    errors_by_type: dict[str, int] | None = None
    #: the date's report (``report.enabled``), or why it was not written.
    report_uri: str | None = None
    report_error: str | None = None
    #: why the flags do not account for the model's errors (``flags_confusion_corrected`` false); None = they do.
    flags_uncorrected: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (for JSON)."""
        return dataclasses.asdict(self)

    def describe(self) -> str:
        """A few human-readable lines for the console: counts, bad inputs, flags, the alarm, report, timings."""
        carried = (f", {self.incremental_skipped_samples} sample(s) carried over"
                   if self.incremental_skipped_samples else "")
        if self.n_resumed:
            carried += f", {self.n_resumed} resumed from a killed run's staging"
        timings = ", ".join(f"{k} {v:.1f}s" for k, v in self.timings.items())
        flagged = "" if self.flagged_samples is None else f" ({len(self.flagged_samples)} flagged)"
        kinds = ", ".join(f"{n} {kind}" for kind, n in (self.errors_by_type or {}).items())
        alarm = "none"
        if self.domain_shift:
            alarm = (f"ON in {self.n_samples_shifted} of {self.n_samples} sample(s), {self.n_unidentified} cell(s) "
                     "unidentified: results unreliable")
        report = self.report_uri or (f"not written ({self.report_error})" if self.report_error else "off")
        return (f"run {self.run_id} ({self.run_date}) committed with checkpoint {self.checkpoint_id}\n"
                f"  {self.n_inputs} input(s) read{carried}: {self.n_predictions} predictions "
                f"({self.n_review} for review), {self.n_samples} samples{flagged}\n"
                f"  bad inputs: {self.n_errors}{f' ({kinds})' if kinds else ''} (errors table)\n"
                f"  flags: {self.flags_note()}\n"
                f"  domain-shift alarm: {alarm}\n"
                f"  report: {report}\n"
                f"  manifest: {self.manifest_uri}\n"
                f"  timings: {timings}")

    def flags_note(self) -> str:
        """Whether the flags account for the model's measured confusion, in words."""
        if self.flags_uncorrected:
            return f"NOT corrected for the model's errors ({self.flags_uncorrected})"
        return "corrected for the model's confusion measured on val (flags_confusion_corrected)"

    def flags_warning(self) -> str | None:
        """The warning line of a run whose flags assume a perfect classifier; None when they carry its confusion."""
        if not self.flags_uncorrected:
            return None
        return f"WARNING: run {self.run_id} ({self.run_date}): flags do not account for the model's errors: " \
               f"{self.flags_uncorrected}"

    def shift_warning(self) -> str | None:
        """The one warning line of a run under the domain-shift alarm; None when there is no alarm."""
        if not self.domain_shift:
            return None
        share = self.n_samples_shifted / self.n_samples if self.n_samples else 0.0
        return (f"WARNING: run {self.run_id} ({self.run_date}): domain-shift alarm, images unlike the training "
                f"data in {self.n_samples_shifted} of {self.n_samples} sample(s) ({share:.0%}); "
                f"{self.n_unidentified} cell(s) unidentified; their results are unreliable")


def plan_run(cfg: ClassifyConfig) -> RunPlan:
    """Take the lease of (output, date); resolve run id, checkpoint and flag rules; list the inputs.

    Raises :class:`~bloodray.nightly.lease.LeaseHeldError` (one line naming
    the output, the date and the holder) while another run writes the same
    date into the same output. Writes the lease and
    ``_staging/<run_id>/run.json`` (:data:`RUN_MARKER`, so cleanups of other
    runs can tell this run is in flight); on failure neither is left held or
    behind. The returned plan holds the lease until
    :func:`bloodray.nightly.commit.commit_run` or
    :func:`bloodray.nightly.commit.discard_run` releases it.
    """
    started = now()
    timer = time.monotonic()
    so = cfg.storage.storage_options()
    run_date = cfg.run.date or started.date().isoformat()
    output_uri = cfg.output.uri.rstrip("/")
    run_id = cfg.run.run_id or f"{started:%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:8]}"
    fs, root = contract.output_root(output_uri, so)
    if cfg.run.date is None:
        refuse_date_folders(cfg.input.uri, so)

    refuse_legacy(output_uri, so)  # a new run would hide every older date of a pre-Delta root
    try:
        fs.invalidate_cache()
        already = tables.is_committed(output_uri, contract.RUNS, run_id, so)
    except Exception as exc:  # noqa: BLE001
        raise storage.describe_storage_error(output_uri, exc) from exc
    if already:
        raise ClassifyError(f"run.run_id: run {run_id!r} is already committed for {run_date} under {output_uri}; "
                            "choose a new run id (or leave it unset)")

    lease = acquire_lease(output_uri, run_date, run_id, cfg.run.lease_seconds, so)
    try:
        # A run of this date that stopped half-way through its table commits is finished first, under the lease,
        # so every table agrees on the date's run before this one replaces it.
        tables.complete_pending_commits(output_uri, run_date, so)
        return _plan(cfg, lease, started, timer)
    except BaseException:
        remove_staging(fs, contract.staging_dir(root, run_id))
        lease.release()
        raise


def refuse_date_folders(input_uri: str, storage_options: Mapping[str, Any]) -> None:
    """Refuse an archive root of date folders without ``run.date``: it would be filed whole under today's date."""
    dates = date_folders(input_uri, storage_options)
    if dates:
        shown = ", ".join(dates[-5:]) + (f" and {len(dates) - 5} earlier" if len(dates) > 5 else "")
        raise ConfigError(f"run.date: not set, but input.uri {input_uri} holds date folders ({shown}); "
                          "give the date to classify (--date YYYY-MM-DD), or point input.uri at one folder")


def _list(cfg: ClassifyConfig, input_uri: str, storage_options: Mapping[str, Any]) -> InputListing:
    """List the run's inputs; a missing or empty date folder is :class:`NothingToClassify`."""
    try:
        listing = list_inputs(input_uri, cfg.input.layout, cfg.input.sample_id_from, storage_options)
    except ArchiveNotFoundError:
        root_fs, root = storage.filesystem(cfg.input.uri, storage_options)
        if cfg.run.date is None or not root_fs.exists(root.rstrip("/")):
            raise
        dates = date_folders(cfg.input.uri, storage_options)
        raise NothingToClassify(f"{input_uri}: no folder for run.date {cfg.run.date}; nothing to classify "
                                f"(date folders under {cfg.input.uri}: "
                                f"{', '.join(dates[-5:]) if dates else 'none'})") from None
    if not listing.files and not listing.shards and not listing.errors:
        raise NothingToClassify(f"{input_uri}: no images or tar shards found; nothing to classify (layout "
                                f"{cfg.input.layout}; images: *.jpg, *.jpeg, *.png, *.bmp, *.tif; shards: *.tar)")
    return listing


def _plan(cfg: ClassifyConfig, lease: Lease, started: dt.datetime, timer: float) -> RunPlan:
    so = cfg.storage.storage_options()
    run_id, run_date, output_uri = lease.run_id, lease.run_date, lease.output_uri
    input_uri = storage.join(cfg.input.uri.rstrip("/"), cfg.run.date) if cfg.run.date else cfg.input.uri
    fs, _root = contract.output_root(output_uri, so)
    # Checkpoint problems surface here, before Ray starts any actor: the whole checkpoint (seal, weights hash,
    # architecture) is verified by loading it once on the driver's CPU.
    checkpoint_uri = resolve_checkpoint(cfg.model.checkpoint, so)
    meta = load_checkpoint(checkpoint_uri, so, device="cpu").metadata
    try:
        quality_gate.check_checkpoint(meta, checkpoint_uri)
    except quality_gate.QualityGateError as exc:
        if cfg.model.quality_gate:
            raise
        log.warning("model.quality_gate is false: classifying anyway with %s", exc)
    flags = cfg.flags
    try:
        rules = load_flag_rules(flags.reference_ranges, so, ig_percent=flags.ig_percent, min_wbc=flags.min_wbc,
                                erythroblast_per_100_wbc=flags.erythroblast_per_100_wbc,
                                confidence=flags.confidence)
    except ReferenceRangeError as exc:
        raise ConfigError(f"flags.reference_ranges: {exc}") from exc
    except FlagRulesError as exc:
        raise ConfigError(str(exc)) from exc
    # The flags carry the model's measured confusion when the checkpoint has it; when not, the run says so.
    confusion, flags_uncorrected = checkpoint_confusion(meta.flag_confusion(), checkpoint_uri)
    if flags_uncorrected:
        log.warning("flags do not account for the model's errors: %s", flags_uncorrected)
    rules = dataclasses.replace(rules, confusion=confusion)
    sample_metadata = None
    if flags.sample_metadata:
        try:
            sample_metadata = load_sample_metadata(flags.sample_metadata, so)
        except SampleMetadataError as exc:
            raise ConfigError(f"flags.sample_metadata: {exc}") from exc
    preset = dataclasses.replace(meta.preset(), max_pixels=cfg.limits.max_pixels)

    carried_from, previous = None, frozenset()
    if cfg.run.incremental:
        carried_from, previous = previous_predictions(output_uri, run_date, meta.checkpoint_id, so)

    note = pooled_reference_note(meta.ood, checkpoint_uri)
    if note:
        log.warning("%s", note)
    log.info("run %s (date %s): listing %s", run_id, run_date, input_uri)
    listing = _list(cfg, input_uri, so)
    carried, skip = reconcile(listing, previous)
    log.info("found %d image file(s) (%d carried over as already classified), %d tar shard(s), %d unassignable, "
             "%d other file(s) ignored", len(listing.files) + len(carried), len(carried), len(listing.shards),
             len(listing.errors), listing.ignored)

    plan = RunPlan(cfg=cfg, run_id=run_id, run_date=run_date, input_uri=input_uri, output_uri=output_uri,
                   storage_options=so, checkpoint_uri=checkpoint_uri, checkpoint_id=meta.checkpoint_id,
                   model_name=meta.model_name, preset=preset,
                   review_threshold=effective_threshold(cfg, meta.review_threshold), rules=rules, sample_metadata=sample_metadata,
                   started_at=started, listing=listing, skip_samples=skip, carried_images=carried,
                   carried_from=carried_from if carried else None, lease=lease,
                   ood=dict(meta.ood) or None, shift_rule=ShiftRule(cfg.shift.alpha, cfg.shift.min_effect),
                   flags_uncorrected=flags_uncorrected)
    marker = {"run_id": run_id, "run_date": run_date, "started_at": started.isoformat(),
              "checkpoint_id": meta.checkpoint_id, "resume_key": resume.resume_key(cfg, meta.checkpoint_id)}
    try:
        storage.put_bytes(fs, posixpath.join(plan.staging, RUN_MARKER), json.dumps(marker).encode())
        if cfg.run.resume and listing.files:
            adopted = resume.adopt_staged_results(plan, staging_markers(fs, _root), lambda: set(
                tables.committed_runs(output_uri, so, run_date).column("run_id").to_pylist()))
            plan.resumed_images, plan.resumed_from = adopted.images, tuple(adopted.from_runs)
    except Exception as exc:  # noqa: BLE001 - missing bucket, path under a file, read-only or full disk
        raise storage.describe_storage_error(output_uri, exc) from exc
    plan.timings["list"] = time.monotonic() - timer
    return plan


def staging_markers(fs, root: str) -> dict[str, dict[str, Any]]:
    """``run.json`` of every run under ``_staging`` (run id -> marker); runs without a readable one are left out."""
    out = {}
    fs.invalidate_cache()
    for path in fs.glob(posixpath.join(root, contract.STAGING, "*", RUN_MARKER)):
        try:
            out[posixpath.basename(posixpath.dirname(path))] = json.loads(fs.cat_file(path))
        except Exception:  # noqa: BLE001 - half-written or vanished: not resumable
            continue
    return out


def remove_staging(fs, staging: str) -> None:
    """Delete a run's staging directory, best effort (a failed run must leave none behind)."""
    try:
        fs.invalidate_cache()
        if fs.exists(staging):
            fs.rm(staging, recursive=True)
    except Exception as exc:  # noqa: BLE001 - never hide the failure that got us here
        log.warning("could not remove %s (%s)", storage.full_uri(fs, staging), exc)


def previous_predictions(output_uri: str, run_date: str, checkpoint_id: str,
                         storage_options) -> tuple[str | None, frozenset[str]]:
    """``(run id, image URIs)`` of the predictions of the visible run of the date, if it used ``checkpoint_id``.

    Only predictions: images that failed last time are read again.
    """
    visible = tables.visible_runs(output_uri, storage_options, run_date)
    if not visible.num_rows:
        return None, frozenset()
    if visible.column("checkpoint_id")[0].as_py() != checkpoint_id:
        log.info("incremental: the visible run of %s used checkpoint %s, not %s; classifying everything",
                 run_date, visible.column("checkpoint_id")[0].as_py(), checkpoint_id)
        return None, frozenset()
    done = tables.run_rows(output_uri, "predictions", visible, storage_options).to_table(columns=["image_uri"])
    return visible.column("run_id")[0].as_py(), frozenset(done.column("image_uri").to_pylist())


def reconcile(listing: InputListing, previous: frozenset[str]) -> tuple[frozenset[str], frozenset[str]]:
    """Per image: drop listed files already classified from ``listing``; returns ``(carried URIs, skipped samples)``.

    An image carried over must still be listed (deleted images and samples are
    not carried); a listed image without a previous prediction (new, or an
    error last time) is read. Tar shards are always read whole: their members
    are only known by reading them. A skipped sample is one none of whose
    listed images is read.
    """
    if not previous:
        return frozenset(), frozenset()
    carried = frozenset(u for u, _s in listing.files if u in previous)
    samples = {s for u, s in listing.files if u in carried}
    listing.files = [(u, s) for u, s in listing.files if u not in carried]
    read = {s for _u, s in listing.files}
    return carried, frozenset(samples - read)


def gpus_per_actor(num_gpus: float | str, cluster_gpus: float) -> float:
    """GPUs per model actor: ``inference.num_gpus``, with ``auto`` = 1 on a cluster that has GPUs, else 0 (CPU)."""
    if num_gpus == "auto":
        return 1.0 if cluster_gpus >= 1 else 0.0
    return float(num_gpus)


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
    num_gpus = gpus_per_actor(cfg.num_gpus, resources.get("GPU", 0))
    if num_gpus > 0:
        if resources.get("GPU", 0) < num_gpus:
            # Otherwise the actors would wait for a GPU forever.
            raise ClusterResourcesError(
                f"inference.num_gpus: {num_gpus:g} GPU(s) per actor, but the Ray cluster has "
                f"{resources.get('GPU', 0):g}; set inference.num_gpus=auto (GPUs when there are, else CPU) or 0, "
                "or inference.concurrency to wait for autoscaled GPU nodes")
        return ray.data.ActorPoolStrategy(size=max(1, int(resources.get("GPU", 0) // num_gpus)))
    slots = cluster_cpu_slots(cfg.decode_cpus)
    if fused:
        return ray.data.ActorPoolStrategy(size=max(1, min(slots, work_blocks or slots)))
    return ray.data.ActorPoolStrategy(min_size=1, max_size=max(1, slots - 1))
