"""Configuration of the nightly classification job: :class:`ClassifyConfig` and its sections.

Each section validates its own keys and names the dotted key in its error
(:func:`bloodray.config.load_config` calls ``validate(prefix)``).
``configs/classify/nightly.yaml`` documents every key.
"""

from __future__ import annotations

import datetime as dt
import math
import re
from dataclasses import dataclass, field
from typing import Literal

from bloodray.classes import DEFAULT_IG_FLAG_PERCENT, DEFAULT_MIN_WBC_FOR_DIFFERENTIAL
from bloodray.config import ConfigError, StorageConfig
from bloodray.data.decode import (DEFAULT_DECODE_TIMEOUT_S, DEFAULT_MAX_ASPECT_RATIO, DEFAULT_MAX_DECODE_WORK,
                                  DEFAULT_MAX_SIDE_PX, DEFAULT_MIN_CONTRAST, DEFAULT_MIN_SIDE_PX, CellImageLimits,
                                  DecodeBudget, PixelLimit)
from bloodray.data.stages import DEFAULT_MAX_FILE_BYTES, DEFAULT_READ_TIMEOUT_S, ReadLimits

#: Review threshold used when neither the config nor the checkpoint sets one.
DEFAULT_REVIEW_THRESHOLD = 0.7
_DATE_RE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
# No "=" (a hive reader would take "a=b" for a partition), no leading "_" or
# "." (pyarrow would skip the directory), nothing that needs quoting in a URI.
_RUN_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_DEVICE_RE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


class ClassifyError(RuntimeError):
    """The run cannot proceed (no inputs, run id already committed...); the message says why."""


class NothingToClassify(ClassifyError):
    """The date's folder is missing or holds no image: there is nothing to do (exit status 3)."""


class ShiftAlarmError(ClassifyError):
    """The domain-shift alarm went off and ``shift.on_alarm`` is ``fail``: nothing was published (exit status 6)."""


class ClusterResourcesError(ClassifyError):
    """The Ray cluster lacks what the config asks for, e.g. GPUs (exit status 5, infrastructure)."""


@dataclass
class InputConfig:
    """The slide archive to classify."""

    #: archive root, local path or ``s3://`` URI (with ``run.date``: the parent of the date folders).
    uri: str
    #: ``auto``: image files and ``*.tar`` shards; ``folders``: ``<sample_id>/**/<image>``; ``tar``: ``**/*.tar``
    #: shards of ``<sample_id>/<image>`` members.
    layout: Literal["auto", "folders", "tar"] = "auto"
    #: ``parent``: the image's parent folder; ``root``: first path component under the archive root.
    sample_id_from: Literal["parent", "root"] = "parent"

    def validate(self, prefix: str) -> None:
        if not self.uri.strip():
            raise ConfigError(f"{prefix}.uri: must not be empty")


@dataclass
class OutputConfig:
    """Where results go (see :mod:`bloodray.nightly.contract` for the layout)."""

    #: output root, local path or ``s3://`` URI: the Delta tables live under it.
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
    #: refuse a checkpoint that ``bloodray calibrate`` did not seal with val metrics meeting the quality gate's
    #: minimums (:mod:`bloodray.quality_gate`); false classifies with it anyway, with a warning (experiments only).
    quality_gate: bool = True

    def validate(self, prefix: str) -> None:
        if not _DEVICE_RE.match(self.device):
            raise ConfigError(f"{prefix}.device: expected auto, cpu, cuda, cuda:<n> or mps; got {self.device!r}")


@dataclass
class RunConfig:
    """Which date a run is for, and how it relates to earlier runs."""

    #: ``YYYY-MM-DD``: read ``<input.uri>/<date>/`` and write under ``run_date=<date>``;
    #: null: read ``input.uri`` as given and partition under today's UTC date.
    date: str | None = None
    #: carry over the predictions of images already classified in the visible run of the date (same
    #: checkpoint) and still listed; read every other listed image (new, or an error last time).
    incremental: bool = False
    #: pick up the per-image results a killed run of the same date and settings had staged, instead of reading
    #: those images again (:mod:`bloodray.nightly.resume`); false reads everything.
    resume: bool = True
    #: override the generated run id (``<UTC start>-<random>``).
    run_id: str | None = None
    #: seconds the run's lease on (output, date) lasts without renewal; renewed every fifth of it.
    lease_seconds: float = 300.0

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
        if not (isinstance(self.lease_seconds, (int, float)) and 5 <= self.lease_seconds <= 86_400):
            raise ConfigError(f"{prefix}.lease_seconds: expected seconds between 5 and 86400, "
                              f"got {self.lease_seconds!r}")


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
    #: erythroblasts per 100 white cells above which (whole interval above) a sample is flagged.
    erythroblast_per_100_wbc: float = 1.0
    #: confidence level of the intervals a flag must clear (Wilson score interval with continuity correction; with
    #: the model's sealed confusion, the score interval of the misclassification-corrected rate: docs/guides/analyst.md).
    confidence: float = 0.95
    #: optional table (CSV or Parquet, local or S3) of ``sample_id, wbc_count_10e9_per_l``; samples it lists
    #: are flagged on absolute reference ranges (10^9/L).
    sample_metadata: str | None = None

    def validate(self, prefix: str) -> None:
        if not 0.0 <= self.ig_percent <= 100.0:
            raise ConfigError(f"{prefix}.ig_percent: must be a percentage in [0, 100], got {self.ig_percent}")
        if self.min_wbc < 0:
            raise ConfigError(f"{prefix}.min_wbc: must be >= 0, got {self.min_wbc}")
        if not 0.0 <= self.erythroblast_per_100_wbc <= 100.0:
            raise ConfigError(f"{prefix}.erythroblast_per_100_wbc: must be in [0, 100], got "
                              f"{self.erythroblast_per_100_wbc}")
        if not 0.5 <= self.confidence < 1.0:
            raise ConfigError(f"{prefix}.confidence: must be in [0.5, 1), got {self.confidence}")


@dataclass
class InferenceConfig:
    """Ray Data resources of the read/decode tasks and the model actors."""

    #: images per model batch (and per read/decode task for image files).
    batch_size: int = 64
    #: model actors; null = one per GPU (num_gpus > 0), or one per ``decode_cpus`` CPUs of the cluster on CPU.
    concurrency: int | None = None
    #: GPUs per model actor (0 = CPU inference); ``auto`` = 1 when the Ray cluster has GPUs at the start of the
    #: run, else 0 (:func:`bloodray.nightly.plan.gpus_per_actor`).
    num_gpus: float | Literal["auto"] = "auto"
    #: CPUs reserved by each read/decode task.
    decode_cpus: float = 1.0
    #: arithmetic of the model actors: ``auto`` (fastest that passes the checkpoint's self-check), ``fp32``,
    #: ``bf16`` or ``int8`` (:mod:`bloodray.inference_precision`); a failed self-check falls back towards fp32.
    precision: Literal["auto", "fp32", "bf16", "int8"] = "auto"
    #: the CPU model actors' runtime: ``torch``, or ``openvino`` (measured faster on the forward pass in
    #: BENCHMARKS.md; the same precision self-check; torch runs where it cannot or nothing passes; GPUs run torch).
    runtime: Literal["torch", "openvino"] = "torch"

    def validate(self, prefix: str) -> None:
        for name in ("num_gpus", "decode_cpus") if self.num_gpus != "auto" else ("decode_cpus",):
            _require_finite(prefix, name, getattr(self, name))
        if self.batch_size < 1:
            raise ConfigError(f"{prefix}.batch_size: must be >= 1, got {self.batch_size}")
        if self.concurrency is not None and self.concurrency < 1:
            raise ConfigError(f"{prefix}.concurrency: must be >= 1 or null, got {self.concurrency}")
        if self.num_gpus != "auto" and self.num_gpus < 0:
            raise ConfigError(f"{prefix}.num_gpus: must be >= 0, got {self.num_gpus}")
        if self.decode_cpus <= 0:
            raise ConfigError(f"{prefix}.decode_cpus: must be > 0, got {self.decode_cpus}")


def _require_finite(prefix: str, name: str, value: float) -> None:
    # YAML reads ".inf" and ".nan" as floats; every comparison with NaN is False, so check first.
    if not math.isfinite(value):
        raise ConfigError(f"{prefix}.{name}: must be a finite number, got {value}")


@dataclass
class LimitsConfig(PixelLimit):
    """Input safety limits (docs/reliability.md, "Input rules"); ``max_pixels`` is :class:`PixelLimit`'s."""

    #: files (and tar members) larger than this many bytes are not read (errors, ``file_too_large``).
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES
    #: a local file read taking longer than this is abandoned (errors, ``read_timeout``).
    read_timeout_s: float = DEFAULT_READ_TIMEOUT_S
    #: images whose shorter side is below this are not cell crops (errors, ``not_a_cell_image``).
    min_side_px: int = DEFAULT_MIN_SIDE_PX
    #: images whose longer side is above this are not cell crops (errors, ``not_a_cell_image``).
    max_side_px: int = DEFAULT_MAX_SIDE_PX
    #: longer side / shorter side above this is not a cell crop (errors, ``not_a_cell_image``).
    max_aspect_ratio: float = DEFAULT_MAX_ASPECT_RATIO
    #: grey-level standard deviation (0-255) below which an image is blank (errors, ``not_a_cell_image``); 0 = off.
    min_contrast: float = DEFAULT_MIN_CONTRAST
    #: width x height x JPEG scans above which an image is not decoded (errors, ``decode_budget``).
    max_decode_work: int = DEFAULT_MAX_DECODE_WORK
    #: seconds one image's decoding may take (errors, ``decode_budget``).
    decode_timeout_s: float = DEFAULT_DECODE_TIMEOUT_S

    def validate(self, prefix: str) -> None:
        for name in ("read_timeout_s", "max_aspect_ratio", "min_contrast", "decode_timeout_s"):
            _require_finite(prefix, name, getattr(self, name))
        PixelLimit.validate(self, prefix)
        for name in ("max_file_bytes", "min_side_px", "max_side_px", "max_decode_work"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{prefix}.{name}: must be >= 1, got {getattr(self, name)}")
        for name in ("read_timeout_s", "decode_timeout_s"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{prefix}.{name}: must be > 0, got {getattr(self, name)}")
        if self.max_side_px < self.min_side_px:
            raise ConfigError(f"{prefix}.max_side_px: must be >= limits.min_side_px ({self.min_side_px}), "
                              f"got {self.max_side_px}")
        if self.max_aspect_ratio < 1:
            raise ConfigError(f"{prefix}.max_aspect_ratio: must be >= 1, got {self.max_aspect_ratio}")
        if self.min_contrast < 0:
            raise ConfigError(f"{prefix}.min_contrast: must be >= 0, got {self.min_contrast}")

    def read_limits(self) -> ReadLimits:
        """The read and cell-image bounds of the read+decode stage."""
        cell = CellImageLimits(self.min_side_px, self.max_side_px, self.max_aspect_ratio, self.min_contrast)
        return ReadLimits(max_file_bytes=self.max_file_bytes, read_timeout_s=self.read_timeout_s, cell=cell,
                          decode=DecodeBudget(self.max_decode_work, self.decode_timeout_s))


@dataclass
class ShiftConfig:
    """The domain-shift alarm (:mod:`bloodray.nightly.shift`); needs a checkpoint with an OOD reference."""

    #: ``commit``: a run under the alarm still commits, with the alarm in its tables; ``fail``: it fails
    #: (exit status 6) and publishes nothing.
    on_alarm: Literal["commit", "fail"] = "commit"
    #: significance level of the binomial and KS tests.
    alpha: float = 0.0001
    #: smallest effect that can raise the alarm: excess unidentified share, or KS distance.
    min_effect: float = 0.25

    def validate(self, prefix: str) -> None:
        if not 0.0 < self.alpha < 0.5:
            raise ConfigError(f"{prefix}.alpha: must be in (0, 0.5), got {self.alpha}")
        if not 0.0 < self.min_effect <= 1.0:
            raise ConfigError(f"{prefix}.min_effect: must be in (0, 1], got {self.min_effect}")


@dataclass
class ReportConfig:
    """The date's HTML report, written by the run once it is committed."""

    #: write ``<output.uri>/reports/run_date=<date>/report.html`` at the end of the run; a report that fails is
    #: logged and named in the summary, and never fails the committed run.
    enabled: bool = True


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
    shift: ShiftConfig = field(default_factory=ShiftConfig)
    report: ReportConfig = field(default_factory=ReportConfig)


def effective_threshold(cfg: ClassifyConfig, checkpoint_threshold: float | None) -> float:
    """The review threshold a run uses: the config's, else the checkpoint's, else the default."""
    if cfg.review.threshold is not None:
        return cfg.review.threshold
    if checkpoint_threshold is not None:
        return float(checkpoint_threshold)
    return DEFAULT_REVIEW_THRESHOLD
