"""Nightly classification of slide archives with Ray Data.

One run classifies every cell image of an archive and writes per-image
predictions, per-image errors and per-sample differentials as Parquet (layout:
:mod:`bloodray.nightly.contract`). The pipeline::

    list (driver: fsspec ``find``; on object storage one listing per sample prefix, in parallel)
      -> ray.data.from_items(work items: image URIs, or one item per tar shard)
      -> map_batches(read bytes + SHA-256 + decode + resize)      CPU tasks (*)
      -> map_batches(CellPredictorResults: model + result rows)   actor pool (GPU or CPU)
      -> driver streams the rows into Parquet (output.rows_per_file) _staging/<run_id>/results/
    then, on the driver, DuckDB over the staged results:
      -> predictions / errors / differentials                     _staging/<run_id>/<table>/
    commit:
      -> copy staged files into <table>/run_date=<D>/<run_id>/
      -> write run_configs/run_date=<D>/<run_id>.yaml
      -> write runs/run_date=<D>/<run_id>.parquet                 LAST: marks the run committed
      -> delete superseded runs of that date and stale staging (best effort)

(*) With GPU actors the decode tasks run apart from the model actors. On a
CPU-only cluster both request one CPU, so Ray's optimizer fuses them (decode
runs inside the actors: same work, no copy through the object store), and
there is one actor per CPU of the cluster (``inference.decode_cpus`` CPUs
each): every core reads, decodes and runs the model (one torch thread per
actor CPU, see :mod:`bloodray.predict`). The result rows (a few hundred
bytes per image) are written by the driver as they arrive: no write task
waits for a core the actors hold, and no extra worker process pays Ray Data's
and pyarrow's imports.

A bad input never fails the run: unreadable files, undecodable images and
unsafe tar members become rows of the errors table, so every input image
appears exactly once, in predictions or in errors.

Archive layouts (``input.layout``):

* ``folders``: ``<archive>/<sample_id>/**/<image>.{jpg,jpeg,png,bmp,tif,tiff}``;
* ``tar``: ``<archive>/**/*.tar`` with members ``<sample_id>/<image>``, read
  as streams (never extracted to disk); absolute or ``..`` member paths,
  links and device members are refused (errors, ``unsafe_member``);
* ``auto``: both: image files are taken as images, ``*.tar`` as shards.

The sample id is the image's parent folder (``sample_id_from: parent``) or the
first path component under the archive root (``root``); inside a tar the
member path plays the role of the path under the root.

Reruns and crashes: every run has its own ``run_id``; the visible run of a
date is the committed manifest with the latest ``committed_at``, so a rerun
replaces the date's results and the files of older runs are deleted after it
commits. A run that dies before its manifest is written leaves nothing
visible to readers going through the manifest (:mod:`bloodray.nightly.contract`); its
leftovers are deleted by the next committed run of that date.
``run.incremental`` skips samples already in the visible run of the date
(classified with the same checkpoint) and copies their rows into the new run,
so each run is complete on its own.

Entry points: :func:`run_classification` (library), :func:`main` (argv list),
and :func:`add_arguments` / :func:`config_from_args` for other CLIs.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import hashlib
import json
import logging
import math
import posixpath
import re
import tarfile
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Iterator, Literal, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from bloodray import storage

from bloodray.nightly import contract as outputs
from bloodray.checkpoint import CheckpointError, read_metadata, resolve_checkpoint
from bloodray.classes import CLASS_NAMES, DEFAULT_IG_FLAG_PERCENT, DEFAULT_MIN_WBC_FOR_DIFFERENTIAL, is_image_path
from bloodray.config import ConfigError, StorageConfig, dump_yaml, load_config, save_config
from bloodray.nightly.differential import FlagRules, ReferenceRangeError, compute_differentials, load_reference_ranges
from bloodray.predict import CellPredictor
from bloodray.data.decode import DEFAULT_MAX_PIXELS, ImageDecodeError
from bloodray.data.preset import EvalPreset

log = logging.getLogger(__name__)

#: Review threshold used when neither the config nor the checkpoint sets one.
DEFAULT_REVIEW_THRESHOLD = 0.7
TAR_SUFFIX = ".tar"
_DATE_RE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
# No "=" (a hive reader would take "a=b" for a partition), no leading "_" or
# "." (pyarrow would skip the directory), nothing that needs quoting in a URI.
_RUN_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_DEVICE_RE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


class ClassifyError(RuntimeError):
    """The run cannot proceed (no inputs, run id already committed...); the message says why."""


# ---------------------------------------------------------------------------
# Configuration.
# ---------------------------------------------------------------------------


@dataclass
class InputConfig:
    """The slide archive to classify."""

    #: archive root, local path or ``s3://`` URI (with ``run.date``: the parent of the date folders).
    uri: str
    layout: Literal["auto", "folders", "tar"] = "auto"
    #: ``parent``: the image's parent folder; ``root``: first path component under the archive root.
    sample_id_from: Literal["parent", "root"] = "parent"

    def validate(self, prefix: str) -> None:
        if not self.uri.strip():
            raise ConfigError(f"{prefix}.uri: must not be empty")


@dataclass
class OutputConfig:
    """Where results go (see :mod:`bloodray.nightly.contract` for the layout)."""

    uri: str
    #: upper bound of rows per Parquet file of the output tables.
    rows_per_file: int = 100_000

    def validate(self, prefix: str) -> None:
        if not self.uri.strip():
            raise ConfigError(f"{prefix}.uri: must not be empty")
        if self.rows_per_file < 1:
            raise ConfigError(f"{prefix}.rows_per_file: must be >= 1, got {self.rows_per_file}")


@dataclass
class ModelConfig:
    """Which model classifies the cells."""

    #: checkpoint dir or training run dir (best checkpoint); null = the packaged default model.
    checkpoint: str | None = None
    #: ``auto`` = the GPU Ray assigns to the actor if any, else CPU.
    device: str = "auto"
    #: average over the 8 dihedral views (8x the compute).
    tta: bool = False

    def validate(self, prefix: str) -> None:
        if not _DEVICE_RE.match(self.device):
            raise ConfigError(f"{prefix}.device: expected auto, cpu, cuda, cuda:<n> or mps; got {self.device!r}")


@dataclass
class RunConfig:
    """Which date a run is for, and how it relates to earlier runs."""

    #: ``YYYY-MM-DD``: read ``<input.uri>/<date>/`` and write under ``run_date=<date>``;
    #: null: read ``input.uri`` as given and partition under today's UTC date.
    date: str | None = None
    #: skip samples already in the visible run of the date (same checkpoint) and carry their rows over.
    incremental: bool = False
    #: override the generated run id (``<UTC start>-<random>``).
    run_id: str | None = None

    def validate(self, prefix: str) -> None:
        if self.date is not None:
            try:
                if not _DATE_RE.match(self.date):
                    raise ValueError
                dt.date.fromisoformat(self.date)
            except ValueError:
                raise ConfigError(f"{prefix}.date: expected YYYY-MM-DD, got {self.date!r}") from None
        if self.run_id is not None and not _RUN_ID_RE.match(self.run_id):
            raise ConfigError(f"{prefix}.run_id: use letters, digits, '.', '_' and '-' (not first), "
                              f"at most 128 characters; got {self.run_id!r}")


@dataclass
class ReviewConfig:
    """When a prediction goes to human review."""

    #: confidence below this needs review. null = the checkpoint's ``review_threshold``
    #: when it has one, else 0.7 (:data:`DEFAULT_REVIEW_THRESHOLD`).
    threshold: float | None = None

    def validate(self, prefix: str) -> None:
        if self.threshold is not None and not 0.0 < self.threshold < 1.0:
            raise ConfigError(f"{prefix}.threshold: must be in (0, 1), got {self.threshold}")


@dataclass
class FlagsConfig:
    """Clinical flags of the differential."""

    #: YAML of reference ranges (see configs/reference_ranges.yaml); null = packaged defaults.
    reference_ranges: str | None = None
    #: immature granulocytes above this % of white cells are flagged.
    ig_percent: float = DEFAULT_IG_FLAG_PERCENT
    #: fewer classified white cells than this flags the differential as unreliable.
    min_wbc: int = DEFAULT_MIN_WBC_FOR_DIFFERENTIAL

    def validate(self, prefix: str) -> None:
        if not 0.0 <= self.ig_percent <= 100.0:
            raise ConfigError(f"{prefix}.ig_percent: must be a percentage in [0, 100], got {self.ig_percent}")
        if self.min_wbc < 0:
            raise ConfigError(f"{prefix}.min_wbc: must be >= 0, got {self.min_wbc}")


@dataclass
class InferenceConfig:
    """Ray Data resources of the read/decode tasks and the model actors."""

    #: images per model batch (and per read/decode task for image files).
    batch_size: int = 64
    #: model actors; null = one per GPU (num_gpus > 0), or one per ``decode_cpus`` CPUs of the cluster on CPU.
    concurrency: int | None = None
    #: GPUs per model actor (0 = CPU inference).
    num_gpus: float = 0.0
    #: CPUs reserved by each read/decode task.
    decode_cpus: float = 1.0

    def validate(self, prefix: str) -> None:
        if self.batch_size < 1:
            raise ConfigError(f"{prefix}.batch_size: must be >= 1, got {self.batch_size}")
        if self.concurrency is not None and self.concurrency < 1:
            raise ConfigError(f"{prefix}.concurrency: must be >= 1 or null, got {self.concurrency}")
        if self.num_gpus < 0:
            raise ConfigError(f"{prefix}.num_gpus: must be >= 0, got {self.num_gpus}")
        if self.decode_cpus <= 0:
            raise ConfigError(f"{prefix}.decode_cpus: must be > 0, got {self.decode_cpus}")


@dataclass
class LimitsConfig:
    """Input safety limits."""

    #: images with more pixels (width x height) are refused before decoding (errors, ``too_large``).
    max_pixels: int = DEFAULT_MAX_PIXELS

    def validate(self, prefix: str) -> None:
        if self.max_pixels < 1:
            raise ConfigError(f"{prefix}.max_pixels: must be >= 1, got {self.max_pixels}")


@dataclass
class ClassifyConfig:
    """Configuration of a classification run (``configs/classify/nightly.yaml``)."""

    input: InputConfig
    output: OutputConfig
    model: ModelConfig = field(default_factory=ModelConfig)
    run: RunConfig = field(default_factory=RunConfig)
    review: ReviewConfig = field(default_factory=ReviewConfig)
    flags: FlagsConfig = field(default_factory=FlagsConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)


# ---------------------------------------------------------------------------
# Listing.
# ---------------------------------------------------------------------------


@dataclass
class InputListing:
    """What the driver found under the archive root."""

    #: (image URI, sample id) of each image file.
    files: list[tuple[str, str]] = field(default_factory=list)
    #: URIs of tar shards.
    shards: list[str] = field(default_factory=list)
    #: error rows (stage ``list``) for images that cannot be assigned to a sample.
    errors: list[dict[str, Any]] = field(default_factory=list)
    #: files ignored because of their type (not an image, not a shard for the layout).
    ignored: int = 0


def sample_id_of(relpath: str, rule: str) -> str | None:
    """Sample id of an image from its path relative to the archive root (or inside a tar).

    ``parent``: the name of the folder holding the image; ``root``: the first
    path component. ``None`` for an image directly at the root.
    """
    parts = [p for p in relpath.split("/") if p not in ("", ".")]
    if len(parts) < 2:
        return None
    return parts[-2] if rule == "parent" else parts[0]


#: Sample prefixes listed at once on object storage.
LIST_THREADS = 16


def _find_files(fs, base: str) -> list[str]:
    """Every file under ``base``, without per-file ``info`` calls.

    Local: one ``find``. Object storage: one delimiter listing of the first
    level, then one paginated listing per sample prefix, :data:`LIST_THREADS`
    at a time -- a single flat listing of a large prefix is a long chain of
    sequential 1,000-key pages.
    """
    if _is_local(fs):
        return fs.find(base)
    try:
        top = fs.ls(base, detail=True)
    except FileNotFoundError:
        return fs.find(base)  # not a prefix: the caller tells a missing archive from an empty one
    files = [e["name"] for e in top if e.get("type") != "directory"]
    prefixes = [e["name"] for e in top if e.get("type") == "directory"]
    with ThreadPoolExecutor(max_workers=max(1, min(LIST_THREADS, len(prefixes)))) as pool:
        for found in pool.map(fs.find, prefixes):
            files.extend(found)
    return files


def list_inputs(input_uri: str, layout: str = "auto", sample_id_from: str = "parent",
                storage_options: Mapping[str, Any] | None = None) -> InputListing:
    """List the images and tar shards of an archive (see :func:`_find_files`).

    No per-file ``info`` calls: on object storage this is one paginated
    listing per sample prefix, several at a time, however many files there are.
    """
    fs, base = storage.filesystem(input_uri, storage_options)
    base = base.rstrip("/")
    try:
        fs.invalidate_cache()
        paths = _find_files(fs, base)
        if not paths and not fs.exists(base):
            raise ClassifyError(f"{input_uri}: input archive not found")
    except ClassifyError:
        raise
    except Exception as exc:  # noqa: BLE001 - missing bucket, credentials...
        raise storage.describe_storage_error(input_uri, exc) from exc
    finally:
        fs.invalidate_cache()  # the listing cache would hold an entry per file for the whole run
    listing = InputListing()
    want_images = layout in ("auto", "folders")
    want_tars = layout in ("auto", "tar")
    for path in sorted(paths):
        rel = path[len(base):].lstrip("/") if path.startswith(base) else posixpath.basename(path)
        uri = storage.full_uri(fs, path)
        if want_tars and path.lower().endswith(TAR_SUFFIX):
            listing.shards.append(uri)
        elif want_images and is_image_path(path):
            sample_id = sample_id_of(rel, sample_id_from)
            if sample_id is None:
                listing.errors.append(_error_row(None, uri, "list", "no_sample_id",
                                                 "image is directly under the archive root, not in a sample folder"))
            else:
                listing.files.append((uri, sample_id))
        else:
            listing.ignored += 1
    return listing


def _error_row(sample_id: str | None, uri: str, stage: str, error_type: str, message: str) -> dict[str, Any]:
    return {"sample_id": sample_id, "image_uri": uri, "stage": stage, "error_type": error_type, "message": message}


# ---------------------------------------------------------------------------
# Ray Data stages: read + decode (tasks), to result rows (tasks).
# ---------------------------------------------------------------------------


class _Rows:
    """Accumulates decoded images and error rows into one Ray Data batch."""

    def __init__(self, size: int):
        self.size = size
        names = ("sample_id", "image_uri", "image_sha256", "error", "error_stage", "error_message")
        self.cols: dict[str, list] = {k: [] for k in names}
        self.images: list[np.ndarray | None] = []

    def __len__(self) -> int:
        return len(self.images)

    def ok(self, sample_id: str, uri: str, sha: str, image: np.ndarray) -> None:
        self._add(sample_id, uri, sha, "", "", "", image)

    def fail(self, sample_id: str | None, uri: str, stage: str, error_type: str, message: str,
             sha: str | None = None) -> None:
        self._add(sample_id, uri, sha, error_type, stage, message, None)

    def _add(self, sample_id, uri, sha, error, stage, message, image) -> None:
        for key, value in zip(self.cols, (sample_id, uri, sha, error, stage, message)):
            self.cols[key].append(value)
        self.images.append(image)

    def emit(self) -> dict[str, np.ndarray]:
        images = np.zeros((len(self.images), self.size, self.size, 3), dtype=np.uint8)
        for i, image in enumerate(self.images):
            if image is not None:
                images[i] = image
        out = {k: np.array(v, dtype=object) for k, v in self.cols.items()}
        out["image"] = images
        return out


def _decode_into(rows: _Rows, sample_id: str, uri: str, data: bytes, preset: EvalPreset) -> None:
    sha = hashlib.sha256(data).hexdigest()
    try:
        image = preset.load(data)
    except ImageDecodeError as exc:
        rows.fail(sample_id, uri, "decode", exc.kind, str(exc), sha)
    except Exception as exc:  # noqa: BLE001 - a bad file is an error row, never a failed task
        rows.fail(sample_id, uri, "decode", "corrupt", f"{type(exc).__name__}: {exc}", sha)
    else:
        rows.ok(sample_id, uri, sha, image)


def read_files(uris: Sequence[str], storage_options: Mapping[str, Any] | None = None) -> list[bytes | BaseException]:
    """Fetch the files of one batch; each result is the bytes or the exception for that file.

    The URIs come from one listing, so the filesystem is resolved once per
    batch (resolving an S3 URI costs about as much as decoding the image);
    object storage fetches them concurrently.
    """
    if not uris:
        return []
    fs, _ = storage.filesystem(uris[0], storage_options)
    paths = [fs._strip_protocol(u) for u in uris]
    try:
        fetched = fs.cat(paths, on_error="return")
    except Exception as exc:  # noqa: BLE001 - a whole-batch failure marks each file
        return [exc] * len(paths)
    if not isinstance(fetched, dict):  # a single path returns its bytes
        fetched = {paths[0]: fetched}
    if len(fetched) != len(set(paths)) or not all(p in fetched for p in paths):
        # fsspec may normalise keys (protocol, trailing slash); look each up tolerant of that.
        fetched = {k.split("://", 1)[-1]: v for k, v in fetched.items()}
        paths = [p.split("://", 1)[-1] for p in paths]
    return [fetched.get(p, FileNotFoundError(p)) for p in paths]


def _read_decode_files(batch: dict[str, np.ndarray], *, preset: EvalPreset,
                       storage_options: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Ray Data task: image files -> decoded, resized uint8 images (or error rows)."""
    uris = [str(u) for u in batch["uri"]]
    rows = _Rows(preset.input_size)
    for uri, sample_id, data in zip(uris, batch["sample_id"], read_files(uris, storage_options)):
        if isinstance(data, BaseException):
            rows.fail(sample_id, uri, "read", "unreadable", f"{type(data).__name__}: {data}")
        else:
            _decode_into(rows, sample_id, uri, data, preset)
    return rows.emit()


def _escapes(name: str) -> bool:
    """True for a member path that is absolute or climbs out of the archive with ``..``."""
    return name.startswith("/") or ".." in name.split("/")


def _member_problem(member: tarfile.TarInfo) -> str | None:
    """Why a tar member must not be read, or None when it is a plain file with a safe path."""
    name = member.name
    if _escapes(name):
        return f"member path {name!r} is absolute or leaves the archive"
    if member.issym() or member.islnk():
        kind = "symbolic" if member.issym() else "hard"
        return f"{kind} link member ({name!r} -> {member.linkname!r}) refused"
    if member.ischr() or member.isblk() or member.isfifo():
        return f"device or FIFO member {name!r} refused"
    return None


def _shard_rows(shard_uri: str, preset: EvalPreset, storage_options: Mapping[str, Any], sample_id_from: str,
                skip_samples: frozenset[str], chunk_rows: int) -> Iterator[dict[str, np.ndarray]]:
    """Stream one tar shard member by member (never extracted to disk) into row batches."""
    rows = _Rows(preset.input_size)
    try:
        fs, path = storage.filesystem(shard_uri, storage_options)
        with fs.open(path, "rb") as fh, tarfile.open(fileobj=fh, mode="r|") as tar:
            for member in tar:
                uri = f"{shard_uri}#{member.name}"
                problem = _member_problem(member)
                # A path that leaves the archive names no trustworthy sample.
                sample_id = None if _escapes(member.name) else sample_id_of(member.name, sample_id_from)
                if sample_id is not None and sample_id in skip_samples:
                    continue
                if problem:
                    rows.fail(sample_id, uri, "read", "unsafe_member", problem)
                elif not member.isfile() or not is_image_path(member.name):
                    continue  # directories and non-image files, as in the folder layout
                elif sample_id is None:
                    rows.fail(None, uri, "read", "no_sample_id",
                              "member is at the top of the tar, not in a sample folder")
                else:
                    try:
                        data = tar.extractfile(member).read()
                    except Exception as exc:  # noqa: BLE001 - a cut-off shard ends with this member
                        rows.fail(sample_id, uri, "read", "truncated", f"cannot read member: {exc}")
                        break
                    _decode_into(rows, sample_id, uri, data, preset)
                if len(rows) >= chunk_rows:
                    yield rows.emit()
                    rows = _Rows(preset.input_size)
            else:
                # tarfile ends iteration silently at a cut or damaged header; only
                # the end-of-archive block (zeros) tells a complete shard apart.
                block = fs.cat_file(path, start=tar.offset, end=tar.offset + 512)
                if len(block) < 512 or block.strip(b"\0"):
                    rows.fail(None, shard_uri, "read", "corrupt_archive",
                              f"tar shard ends without an end-of-archive block at byte {tar.offset} "
                              "(truncated or damaged header); any members after it are missing")
    except Exception as exc:  # noqa: BLE001 - the shard itself is the bad input
        text = str(exc) or type(exc).__name__
        if isinstance(exc, tarfile.TarError):
            kind = "empty" if "empty file" in text else "corrupt_archive"
        else:
            kind = "unreadable"
        rows.fail(None, shard_uri, "read", kind, f"tar shard: {type(exc).__name__}: {text}")
    if len(rows):
        yield rows.emit()


def _read_decode_shards(batch: dict[str, np.ndarray], *, preset: EvalPreset, storage_options: Mapping[str, Any],
                        sample_id_from: str, skip_samples: frozenset[str],
                        chunk_rows: int) -> Iterator[dict[str, np.ndarray]]:
    """Ray Data task: tar shards -> one row per image member (flat-map, yields batches)."""
    for shard_uri in batch["uri"]:
        yield from _shard_rows(str(shard_uri), preset, storage_options, sample_id_from, skip_samples, chunk_rows)


def results_schema() -> pa.Schema:
    """Schema of the staged per-image results (predictions and errors in one table)."""
    return pa.schema(
        [("sample_id", pa.string()), ("image_uri", pa.string()), ("image_sha256", pa.string()),
         ("stage", pa.string()), ("error_type", pa.string()), ("message", pa.string()),
         ("predicted_class", pa.string()), ("confidence", pa.float32())]
        + [(c, pa.float32()) for c in outputs.prob_columns()])


def _opt(values) -> list[str | None]:
    return [None if v is None or v == "" else str(v) for v in values]


def _to_results(batch: dict[str, np.ndarray]) -> pa.Table:
    """Ray Data task: predictor output -> typed result rows (explicit schema, no tensors)."""
    n = len(batch["image_uri"])
    error = np.array(["" if e is None else str(e) for e in batch["error"]], dtype=object)
    stage = np.array(["" if s is None else str(s) for s in batch["error_stage"]], dtype=object)
    message = np.array(["" if m is None else str(m) for m in batch["error_message"]], dtype=object)
    probs = np.asarray(batch["probs"], dtype=np.float32).reshape(n, len(CLASS_NAMES))
    ok = error == ""
    bad = ok & ~np.isfinite(probs).all(axis=1)
    if bad.any():
        error[bad], stage[bad] = "non_finite_output", "infer"
        message[bad] = "the model returned NaN or infinite probabilities"
        ok &= ~bad
    columns = {
        "sample_id": pa.array(_opt(batch["sample_id"]), pa.string()),
        "image_uri": pa.array([str(u) for u in batch["image_uri"]], pa.string()),
        "image_sha256": pa.array(_opt(batch["image_sha256"]), pa.string()),
        "stage": pa.array(_opt(stage), pa.string()),
        "error_type": pa.array(_opt(error), pa.string()),
        "message": pa.array(_opt(message), pa.string()),
        "predicted_class": pa.array([str(c) if k else None for c, k in zip(batch["predicted_class"], ok)], pa.string()),
        "confidence": pa.array(np.asarray(batch["confidence"], dtype=np.float32), pa.float32(), mask=~ok),
    }
    for j, col in enumerate(outputs.prob_columns()):
        columns[col] = pa.array(probs[:, j], pa.float32(), mask=~ok)
    return pa.table(columns, schema=results_schema())


class CellPredictorResults(CellPredictor):
    """The job's model actor: :class:`CellPredictor`, then the typed result rows in the same call.

    Converting in the actor saves a task per batch and a copy of the
    probabilities through the object store.
    """

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        return _to_results(super().__call__(batch))


# ---------------------------------------------------------------------------
# The run.
# ---------------------------------------------------------------------------


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
    timings: dict[str, float] = field(default_factory=dict)
    stats: dict[str, int] = field(default_factory=dict)

    @property
    def staging(self) -> str:
        """fsspec path of this run's staging directory."""
        return outputs.staging_dir(outputs.output_root(self.output_uri, self.storage_options)[1], self.run_id)


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


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _effective_threshold(cfg: ClassifyConfig, checkpoint_threshold: float | None) -> float:
    if cfg.review.threshold is not None:
        return cfg.review.threshold
    if checkpoint_threshold is not None:
        return float(checkpoint_threshold)
    return DEFAULT_REVIEW_THRESHOLD


def plan_run(cfg: ClassifyConfig) -> RunPlan:
    """Resolve dates, run id, checkpoint and flag rules; list the inputs; pick samples to skip.

    Writes only ``_staging/<run_id>/run.json`` (so cleanups of other runs can
    tell this run is in flight).
    """
    started = _now()
    timer = time.monotonic()
    so = cfg.storage.storage_options()
    run_date = cfg.run.date or started.date().isoformat()
    input_uri = storage.join(cfg.input.uri.rstrip("/"), cfg.run.date) if cfg.run.date else cfg.input.uri
    output_uri = cfg.output.uri.rstrip("/")
    run_id = cfg.run.run_id or f"{started:%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:8]}"
    fs, root = outputs.output_root(output_uri, so)

    try:
        fs.invalidate_cache()
        already = fs.exists(outputs.manifest_path(root, run_date, run_id))
    except Exception as exc:  # noqa: BLE001
        raise storage.describe_storage_error(output_uri, exc) from exc
    if already:
        raise ClassifyError(f"run.run_id: run {run_id!r} is already committed for {run_date} under {output_uri}; "
                            "choose a new run id (or leave it unset)")

    # Checkpoint problems surface here, before Ray starts any actor.
    checkpoint_uri = resolve_checkpoint(cfg.model.checkpoint, so)
    meta = read_metadata(checkpoint_uri, so)
    if list(meta.classes) != list(CLASS_NAMES):
        raise CheckpointError(f"{checkpoint_uri}: checkpoint classes {meta.classes} differ from {list(CLASS_NAMES)}")
    try:
        ranges = load_reference_ranges(cfg.flags.reference_ranges, so)
    except ReferenceRangeError as exc:
        raise ConfigError(f"flags.reference_ranges: {exc}") from exc
    rules = FlagRules(ranges=ranges, ig_percent=cfg.flags.ig_percent, min_wbc=cfg.flags.min_wbc)
    base = meta.preset()
    preset = EvalPreset(base.input_size, base.mean, base.std, cfg.limits.max_pixels)

    skip: frozenset[str] = frozenset()
    carried_from = None
    if cfg.run.incremental:
        visible = outputs.visible_runs(output_uri, so, run_date)
        if visible.num_rows and visible.column("checkpoint_id")[0].as_py() == meta.checkpoint_id:
            carried_from = visible.column("run_id")[0].as_py()
            done = outputs.table_dataset(output_uri, "differentials", visible, so).to_table(columns=["sample_id"])
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
    log.info("found %d image file(s) (%d skipped as already classified), %d tar shard(s), %d unassignable, "
             "%d other file(s) ignored", n_listed, n_listed - len(listing.files), len(listing.shards),
             len(listing.errors), listing.ignored)

    plan = RunPlan(cfg=cfg, run_id=run_id, run_date=run_date, input_uri=input_uri, output_uri=output_uri,
                   storage_options=so, checkpoint_uri=checkpoint_uri, checkpoint_id=meta.checkpoint_id,
                   model_name=meta.model_name, preset=preset,
                   review_threshold=_effective_threshold(cfg, meta.review_threshold), rules=rules,
                   started_at=started, listing=listing, skip_samples=skip, carried_from=carried_from)
    _write_bytes(fs, posixpath.join(plan.staging, "run.json"),
                 json.dumps({"run_id": run_id, "run_date": run_date, "started_at": started.isoformat()}).encode())
    plan.timings["list"] = time.monotonic() - timer
    return plan


def _cpu_slots(cfg: InferenceConfig) -> int:
    """Read/decode tasks (or fused CPU actors) the cluster runs at once."""
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", 1) // cfg.decode_cpus))


def _actor_pool(cfg: InferenceConfig, fused: bool = True, work_blocks: int | None = None):
    """Model actor pool: as configured, else one actor per GPU share, else one per ``decode_cpus`` CPUs.

    On a CPU-only cluster the actors ask for the CPUs of a read/decode task,
    so Ray fuses the two (``fused``): each actor does all the work of its
    batches and the actors take every CPU (the driver writes the results).
    When decode tasks run apart (image files and tar shards in one run: a
    union, which Ray does not fuse across) the pool autoscales up to one
    decode task's CPUs short of the cluster, so decoding always has a core. Never more fused actors than ``work_blocks`` (input
    blocks): an actor without a block would only load the model.
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
    slots = _cpu_slots(cfg)
    if fused:
        return ray.data.ActorPoolStrategy(size=max(1, min(slots, work_blocks or slots)))
    return ray.data.ActorPoolStrategy(min_size=1, max_size=max(1, slots - 1))


def _build_dataset(plan: RunPlan):
    """The lazy Ray Data pipeline from work items to typed result rows."""
    import ray

    cfg = plan.cfg
    bs = cfg.inference.batch_size
    read_args = {"num_cpus": cfg.inference.decode_cpus}
    parts = []
    work_blocks = len(plan.listing.shards)
    if plan.listing.files:
        items = [{"uri": u, "sample_id": s} for u, s in plan.listing.files]
        # A small archive is cut into one read batch per CPU slot rather than a few full batches.
        read_bs = min(bs, max(1, math.ceil(len(items) / _cpu_slots(cfg.inference))))
        blocks = max(1, min(math.ceil(len(items) / read_bs), 100_000))
        work_blocks += blocks
        parts.append(ray.data.from_items(items, override_num_blocks=blocks).map_batches(
            _read_decode_files, batch_size=read_bs,
            fn_kwargs={"preset": plan.preset, "storage_options": plan.storage_options},
            **read_args))
    if plan.listing.shards:
        shards = [{"uri": u} for u in plan.listing.shards]
        parts.append(ray.data.from_items(shards, override_num_blocks=len(shards)).map_batches(
            _read_decode_shards, batch_size=1,
            fn_kwargs={"preset": plan.preset, "storage_options": plan.storage_options,
                       "sample_id_from": cfg.input.sample_id_from, "skip_samples": plan.skip_samples,
                       "chunk_rows": bs},
            **read_args))
    data = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
    # CPU inference: the actors ask for what the decode tasks ask for, so Ray fuses the two.
    gpu_args = {"num_gpus": cfg.inference.num_gpus} if cfg.inference.num_gpus > 0 else read_args
    return data.map_batches(
        CellPredictorResults, batch_size=bs,
        compute=_actor_pool(cfg.inference, fused=len(parts) == 1, work_blocks=work_blocks),
        fn_constructor_kwargs={"checkpoint": plan.checkpoint_uri, "storage_options": plan.storage_options,
                               "device": cfg.model.device, "tta": cfg.model.tta},
        **gpu_args)


def stage_run(plan: RunPlan) -> None:
    """Classify everything and write the run's tables into its staging directory.

    After this, ``_staging/<run_id>/{predictions,errors,differentials}/`` hold
    the complete tables of the run, but nothing is visible to readers.
    """
    _classify_to_staging(plan)
    con = _staging_connection(plan)
    _write_image_tables(plan, con)
    _write_differentials(plan, con)


def _classify_to_staging(plan: RunPlan) -> None:
    """The streaming part: Ray Data from work items to ``_staging/<run_id>/results/``."""
    if not (plan.listing.files or plan.listing.shards):
        plan.timings["read_decode_infer"] = 0.0
        return
    import ray

    if not ray.is_initialized():
        ray.init()  # a local cluster, or the one RAY_ADDRESS names (Ray Jobs set it)
    fs, _root = outputs.output_root(plan.output_uri, plan.storage_options)
    timer = time.monotonic()
    log.info("run %s: classifying %d image file(s) and %d tar shard(s)", plan.run_id,
             len(plan.listing.files), len(plan.listing.shards))
    schema = results_schema()

    def batches() -> Iterator[pa.RecordBatch]:
        # Output blocks as the actors finish them; Ray Data retries lost work, so each arrives once.
        for block in _build_dataset(plan).iter_batches(batch_size=None, batch_format="pyarrow"):
            yield from block.cast(schema).to_batches()

    # Files of output.rows_per_file rows, not one tiny file per batch: the staged
    # results are a few hundred bytes per image, so the driver keeps up with any pool.
    _write_table(pa.RecordBatchReader.from_batches(schema, batches()), schema, fs,
                 posixpath.join(plan.staging, "results"), plan.cfg.output.rows_per_file)
    plan.timings["read_decode_infer"] = time.monotonic() - timer


def _staging_connection(plan: RunPlan):
    """DuckDB over the staged results, the listing errors and the rows an incremental run carries over."""
    import duckdb

    fs, _root = outputs.output_root(plan.output_uri, plan.storage_options)
    con = duckdb.connect()
    # Large runs sort and aggregate out of core; keep DuckDB's spill files out of the CWD.
    spill = posixpath.join(tempfile.gettempdir(), "bloodray-duckdb").replace("'", "''")
    con.execute(f"SET temp_directory = '{spill}'")
    con.register("results", _staged_dataset(fs, posixpath.join(plan.staging, "results"), results_schema()))
    con.register("list_errors", pa.Table.from_pylist(plan.listing.errors, schema=outputs.errors_schema().remove(0)))
    carried = _carried_runs(plan)
    for table in ("predictions", "errors"):
        con.register(f"old_{table}", outputs.table_dataset(plan.output_uri, table, carried, plan.storage_options))
    con.register("skip", pa.table({"sample_id": pa.array(sorted(plan.skip_samples), pa.string())}))
    return con


def _write_image_tables(plan: RunPlan, con) -> None:
    """Split the per-image results into the staged predictions and errors tables."""
    fs, _root = outputs.output_root(plan.output_uri, plan.storage_options)
    timer = time.monotonic()
    probs = ", ".join(outputs.prob_columns())
    # Carried rows get the new run id and are re-judged against this run's threshold.
    predictions_sql = f"""
        SELECT $run_id AS run_id, sample_id, image_uri, image_sha256, predicted_class, confidence, {probs},
               confidence < $threshold AS needs_review, $model_name AS model_name, $checkpoint_id AS checkpoint_id
        FROM results WHERE error_type IS NULL
        UNION ALL
        SELECT $run_id, sample_id, image_uri, image_sha256, predicted_class, confidence, {probs},
               confidence < $threshold, model_name, checkpoint_id
        FROM old_predictions WHERE sample_id IN (SELECT sample_id FROM skip)
        ORDER BY sample_id, image_uri"""
    errors_sql = """
        SELECT $run_id AS run_id, sample_id, image_uri, stage, error_type, message
        FROM results WHERE error_type IS NOT NULL
        UNION ALL SELECT $run_id, sample_id, image_uri, stage, error_type, message FROM list_errors
        UNION ALL SELECT $run_id, sample_id, image_uri, stage, error_type, message
        FROM old_errors WHERE sample_id IN (SELECT sample_id FROM skip)
        ORDER BY sample_id NULLS FIRST, image_uri"""
    params = {"run_id": plan.run_id, "threshold": plan.review_threshold, "model_name": plan.model_name,
              "checkpoint_id": plan.checkpoint_id}
    for table, sql in (("predictions", predictions_sql), ("errors", errors_sql)):
        used = {k: v for k, v in params.items() if f"${k}" in sql}
        _write_table(con.sql(sql, params=used).to_arrow_reader(65_536), outputs.SCHEMAS[table](), fs,
                     posixpath.join(plan.staging, table), plan.cfg.output.rows_per_file)
    plan.stats["n_inputs"] = con.sql("SELECT count(*) FROM results").fetchall()[0][0] + len(plan.listing.errors)
    plan.timings["write"] = time.monotonic() - timer


def _write_differentials(plan: RunPlan, con) -> None:
    """Count classes per sample over the staged tables (DuckDB), add percentages and flags."""
    fs, _root = outputs.output_root(plan.output_uri, plan.storage_options)
    timer = time.monotonic()
    con.register("p", _staged_dataset(fs, posixpath.join(plan.staging, "predictions"), outputs.predictions_schema()))
    con.register("e", _staged_dataset(fs, posixpath.join(plan.staging, "errors"), outputs.errors_schema()))
    per_class = ", ".join(f"count(*) FILTER (WHERE predicted_class = '{c}') AS count_{c}" for c in CLASS_NAMES)
    # Errors without a sample (paths that name none) have no differential to count toward.
    counts = con.sql(f"""
        WITH rows AS (
            SELECT sample_id, predicted_class, needs_review, FALSE AS is_error FROM p
            UNION ALL SELECT sample_id, NULL, FALSE, TRUE FROM e WHERE sample_id IS NOT NULL)
        SELECT sample_id, count(*) AS n_images, count(*) FILTER (WHERE NOT is_error) AS n_classified,
               count(*) FILTER (WHERE is_error) AS n_errors, count(*) FILTER (WHERE needs_review) AS n_review,
               {per_class}
        FROM rows GROUP BY sample_id ORDER BY sample_id""").to_arrow_table()
    diffs = compute_differentials(counts, plan.rules)
    diffs = diffs.add_column(0, "run_id", pa.array([plan.run_id] * diffs.num_rows, pa.string()))
    schema = outputs.differentials_schema()
    diffs = diffs.select(schema.names).cast(schema)
    _write_table(pa.RecordBatchReader.from_batches(schema, diffs.to_batches()), schema, fs,
                 posixpath.join(plan.staging, "differentials"), plan.cfg.output.rows_per_file)
    (n_pred, n_review), = con.sql("SELECT count(*), count(*) FILTER (WHERE needs_review) FROM p").fetchall()
    (n_errors,), = con.sql("SELECT count(*) FROM e").fetchall()
    plan.stats.update(n_predictions=n_pred, n_review=n_review, n_errors=n_errors, n_samples=diffs.num_rows)
    plan.timings["aggregate"] = time.monotonic() - timer


def _carried_runs(plan: RunPlan) -> pa.Table:
    """Manifest row of the run whose rows are carried over (empty when none)."""
    runs = outputs.with_run_date(outputs.runs_schema()).empty_table()
    if plan.carried_from is None:
        return runs
    visible = outputs.visible_runs(plan.output_uri, plan.storage_options, plan.run_date)
    return visible.filter(pc.equal(visible.column("run_id"), plan.carried_from))


def _staged_dataset(fs, directory: str, schema: pa.Schema) -> ds.Dataset:
    """The Parquet files under a staging directory with an explicit schema (empty when there are none)."""
    files = outputs.parquet_files(fs, directory)
    if not files:
        return ds.dataset(schema.empty_table())
    return ds.dataset(files, schema=schema, format="parquet", filesystem=outputs.arrow_filesystem(fs))


def _write_table(reader: pa.RecordBatchReader, schema: pa.Schema, fs, directory: str, rows_per_file: int) -> int:
    """Stream ``reader`` into Parquet files of at most ``rows_per_file`` rows; returns the row count.

    Always writes at least one file, so every run has a (possibly empty) file
    per table and readers always find the schema.
    """
    count = 0

    def batches():
        nonlocal count
        for batch in reader:
            count += batch.num_rows
            yield batch.cast(schema)

    pfs = outputs.arrow_filesystem(fs)
    ds.write_dataset(pa.RecordBatchReader.from_batches(schema, batches()), directory, filesystem=pfs,
                     format="parquet", basename_template="part-{i}.parquet", max_rows_per_file=rows_per_file,
                     min_rows_per_group=min(rows_per_file, 65_536), max_rows_per_group=min(rows_per_file, 65_536),
                     existing_data_behavior="delete_matching")
    if count == 0:
        _write_bytes(fs, posixpath.join(directory, "part-0.parquet"), _parquet_bytes(schema.empty_table()))
    return count


def _parquet_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


def _is_local(fs) -> bool:
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
    return any(p in ("file", "local") for p in protocols)


def _write_bytes(fs, path: str, data: bytes, atomic: bool = False) -> None:
    if _is_local(fs):
        fs.makedirs(posixpath.dirname(path), exist_ok=True)
        if atomic:
            # A rename is atomic on a local filesystem; a reader never sees half a file.
            tmp = posixpath.join(posixpath.dirname(path), f".{posixpath.basename(path)}.{uuid.uuid4().hex[:8]}.tmp")
            with fs.open(tmp, "wb") as fh:
                fh.write(data)
            fs.mv(tmp, path)
            return
    # One PUT: an object appears whole or not at all.
    with fs.open(path, "wb") as fh:
        fh.write(data)


def publish_files(plan: RunPlan) -> None:
    """Commit step 1: copy the staged tables into their partitions and save the config.

    Nothing becomes visible: readers only read runs that have a manifest.
    """
    fs, root = outputs.output_root(plan.output_uri, plan.storage_options)
    for table in outputs.TABLES:
        staged = outputs.parquet_files(fs, posixpath.join(plan.staging, table))
        if not staged:
            raise ClassifyError(f"{storage.full_uri(fs, plan.staging)}: staged {table} are missing; "
                                "was this run's staging deleted by another run?")
        target = outputs.partition_dir(root, table, plan.run_date, plan.run_id)
        if fs.exists(target):  # leftovers of an interrupted commit of this same run id
            fs.rm(target, recursive=True)
        if _is_local(fs):
            fs.makedirs(target, exist_ok=True)
        # Server-side copies on object storage: no bytes pass through the driver.
        fs.copy(staged, [posixpath.join(target, posixpath.basename(p)) for p in staged])
    save_config(plan.cfg, storage.full_uri(fs, outputs.config_path(root, plan.run_date, plan.run_id)),
                plan.storage_options)


def commit_run(plan: RunPlan) -> RunResult:
    """Publish a staged run: copy its files into the partitions, then write the manifest LAST.

    Until the manifest exists the run is invisible to :func:`bloodray.nightly.contract.read_table`;
    a crash anywhere before that leaves the previously visible run untouched.
    Afterwards, superseded runs of the date and stale staging are deleted
    (best effort, see :func:`cleanup_runs`).
    """
    timer = time.monotonic()
    fs, root = outputs.output_root(plan.output_uri, plan.storage_options)
    publish_files(plan)
    committed_at = _now()
    plan.timings["commit"] = time.monotonic() - timer
    timings = {k: round(v, 3) for k, v in plan.timings.items()}
    manifest = {
        "run_id": plan.run_id, "status": outputs.COMMITTED, "started_at": plan.started_at,
        "committed_at": committed_at, "checkpoint": plan.checkpoint_uri, "checkpoint_id": plan.checkpoint_id,
        "model_name": plan.model_name, "review_threshold": plan.review_threshold, "input_uri": plan.input_uri,
        "output_uri": plan.output_uri, "config_yaml": dump_yaml(plan.cfg), "n_inputs": plan.stats["n_inputs"],
        "n_predictions": plan.stats["n_predictions"], "n_errors": plan.stats["n_errors"],
        "n_samples": plan.stats["n_samples"], "n_review": plan.stats["n_review"],
        "timings_json": json.dumps(timings), "incremental_skipped_samples": len(plan.skip_samples),
        "carried_from_run_id": plan.carried_from,
    }
    manifest_path = outputs.manifest_path(root, plan.run_date, plan.run_id)
    _write_bytes(fs, manifest_path, _parquet_bytes(pa.Table.from_pylist([manifest], schema=outputs.runs_schema())),
                 atomic=True)
    log.info("run %s committed: %d predictions, %d errors, %d samples (%d need review)", plan.run_id,
             plan.stats["n_predictions"], plan.stats["n_errors"], plan.stats["n_samples"], plan.stats["n_review"])
    cleanup_runs(plan.output_uri, plan.run_date, plan.run_id, plan.storage_options)
    return RunResult(run_id=plan.run_id, run_date=plan.run_date, output_uri=plan.output_uri,
                     manifest_uri=storage.full_uri(fs, manifest_path), checkpoint_id=plan.checkpoint_id,
                     n_inputs=plan.stats["n_inputs"], n_predictions=plan.stats["n_predictions"],
                     n_errors=plan.stats["n_errors"], n_samples=plan.stats["n_samples"],
                     n_review=plan.stats["n_review"], incremental_skipped_samples=len(plan.skip_samples),
                     timings=timings)


def _marker(fs, root: str, run_id: str) -> dict[str, Any] | None:
    """The ``run.json`` a run writes first into its staging dir; None when absent (run finished or junk)."""
    try:
        info = json.loads(fs.cat_file(posixpath.join(outputs.staging_dir(root, run_id), "run.json")))
        return {"run_date": str(info["run_date"]), "started_at": dt.datetime.fromisoformat(info["started_at"])}
    except Exception:  # noqa: BLE001
        return None


def _subdirs(fs, path: str) -> list[str]:
    try:
        entries = fs.ls(path, detail=True)
    except FileNotFoundError:
        return []
    return [posixpath.basename(e["name"].rstrip("/")) for e in entries if e.get("type") == "directory"]


#: Staging of a run for *another* date is only removed once this old: backfills
#: of several dates may legitimately run side by side into one output.
STALE_STAGING_AGE = dt.timedelta(days=2)


def cleanup_runs(output_uri: str, run_date: str, run_id: str,
                 storage_options: Mapping[str, Any] | None = None) -> list[str]:
    """Delete what the committed run ``run_id`` supersedes; returns the deleted paths.

    For ``run_date``: data directories of runs committed before it, and data
    directories and configs of uncommitted runs that started before it
    (crashed runs). Staging: its own, that of committed runs, of runs of the
    same date that started before it, and of any run older than
    :data:`STALE_STAGING_AGE`. A run still in flight (started later, or of
    another date) is left alone. Manifests of superseded runs stay, as the
    history of what ran. Best effort: failures are logged, never raised.

    Concurrent runs of the *same date* into one output are not supported (no
    lock): the one that commits last wins and removes the other's files.
    """
    fs, root = outputs.output_root(output_uri, storage_options)
    deleted: list[str] = []
    try:
        runs = outputs.committed_runs(output_uri, storage_options, run_date)
        committed = dict(zip(runs.column("run_id").to_pylist(), runs.column("committed_at").to_pylist()))
        if run_id not in committed:
            raise ClassifyError(f"run {run_id} is not committed; nothing is cleaned up")
        ours = _marker(fs, root, run_id)
        ours_started = ours["started_at"] if ours else committed[run_id]

        def superseded(other: str) -> bool:
            """Same-date run whose files may go."""
            if other == run_id:
                return False
            if other in committed:
                return committed[other] < committed[run_id]
            marker = _marker(fs, root, other)
            return marker is None or marker["started_at"] < ours_started

        for table in outputs.TABLES:
            date_dir = posixpath.join(root, table, f"run_date={run_date}")
            deleted += [posixpath.join(date_dir, other) for other in _subdirs(fs, date_dir) if superseded(other)]
        config_dir = posixpath.join(root, outputs.RUN_CONFIGS, f"run_date={run_date}")
        try:
            config_files = fs.ls(config_dir, detail=False)
        except FileNotFoundError:
            config_files = []
        for path in config_files:
            other = posixpath.basename(path).removesuffix(".yaml")
            if other not in committed and superseded(other):
                deleted.append(path)
        staging_root = posixpath.join(root, outputs.STAGING)
        for other in _subdirs(fs, staging_root):
            marker = _marker(fs, root, other)
            if (other == run_id or other in committed or marker is None
                    or (marker["run_date"] == run_date and marker["started_at"] < ours_started)
                    or marker["started_at"] < ours_started - STALE_STAGING_AGE):
                deleted.append(posixpath.join(staging_root, other))
        for path in deleted:
            fs.rm(path, recursive=True)
        if deleted:
            log.info("cleanup after run %s: removed %d superseded or stale path(s)", run_id, len(deleted))
    except Exception as exc:  # noqa: BLE001 - cleanup never fails a committed run
        log.warning("cleanup after run %s incomplete (%s); leftovers are invisible to readers and are "
                    "removed by a later run", run_id, exc)
    return deleted


def run_classification(cfg: ClassifyConfig) -> RunResult:
    """Classify an archive and commit the results; the one entry point of the nightly job.

    Re-running a date replaces that date's visible results; with
    ``run.incremental`` only new samples are classified and the rest carried
    over. Raises :class:`~bloodray.config.ConfigError`,
    :class:`~bloodray.storage.StorageError`,
    :class:`~bloodray.checkpoint.CheckpointError` or :class:`ClassifyError`
    for problems with the run as a whole; bad images never raise.
    """
    plan = plan_run(cfg)
    stage_run(plan)
    return commit_run(plan)


# ---------------------------------------------------------------------------
# Command line.
# ---------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser, default_config: str | None = None) -> argparse.ArgumentParser:
    """Add the classification job's options to ``parser`` (reused by ``bloodray classify``)."""
    parser.add_argument("--config", "-c", metavar="YAML", default=default_config,
                        help=f"config file, e.g. configs/classify/nightly.yaml (default: {default_config})")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set run.date=2024-05-01 (repeatable)")
    parser.add_argument("--date", metavar="YYYY-MM-DD", help="shortcut for --set run.date=YYYY-MM-DD")
    parser.add_argument("--incremental", action="store_true", help="shortcut for --set run.incremental=true")
    return parser


def config_from_args(args: argparse.Namespace) -> ClassifyConfig:
    """Build the validated :class:`ClassifyConfig` from parsed arguments."""
    overrides = list(getattr(args, "overrides", None) or [])
    if getattr(args, "date", None):
        overrides.append(f"run.date={args.date}")
    if getattr(args, "incremental", False):
        overrides.append("run.incremental=true")
    return load_config(ClassifyConfig, getattr(args, "config", None), overrides)
