"""Self-describing, weights-only checkpoints.

A bloodray checkpoint is a directory (local or object storage) holding:

* ``model.safetensors`` -- the weights; loading never unpickles code;
* ``bloodray.json`` -- :class:`CheckpointMetadata`: model name and kwargs,
  class list in index order, input size, normalization, calibration
  temperature, review threshold, metrics, training history, the final
  (redacted) config and the package version;
* ``train_state.pt`` (training checkpoints only) -- optimizer/scheduler state,
  read with ``torch.load(weights_only=True)`` when a run resumes.

A Ray Train run directory holds several such checkpoints; :func:`resolve_checkpoint`
picks the best one by validation macro-F1.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import posixpath
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from bloodray import __version__, rundir, storage
from bloodray.classes import CLASS_NAMES
from bloodray.models import create_model, get_model_info
from bloodray.data.preset import EvalPreset

FORMAT = "bloodray-checkpoint/1"
WEIGHTS_FILE = "model.safetensors"
METADATA_FILE = "bloodray.json"
TRAIN_STATE_FILE = "train_state.pt"
#: Where the packaged default model lives inside the installed package.
PACKAGED_CHECKPOINT = Path(__file__).parent / "assets" / "default_checkpoint"


class CheckpointError(ValueError):
    """A checkpoint is missing, foreign, tampered with, or does not fit the model."""


@dataclass
class CheckpointMetadata:
    """Everything needed to rebuild, preprocess for, and describe a model."""

    model_name: str
    classes: list[str]
    input_size: int
    mean: list[float]
    std: list[float]
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    epoch: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    #: softmax temperature fitted on the validation split (1.0 = uncalibrated).
    temperature: float = 1.0
    #: confidence below which a prediction goes to human review (None = use the job's setting).
    review_threshold: float | None = None
    calibration: dict[str, Any] = field(default_factory=dict)
    package_version: str = __version__
    weights_sha256: str = ""
    format: str = FORMAT

    @property
    def checkpoint_id(self) -> str:
        """Short, content-derived id of the weights (stable across copies)."""
        return f"{self.model_name}-{self.weights_sha256[:12]}"

    def preset(self) -> EvalPreset:
        """The evaluation preset these weights were trained for."""
        return EvalPreset(self.input_size, tuple(self.mean), tuple(self.std))

    @classmethod
    def from_json(cls, text: str, where: str) -> "CheckpointMetadata":
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{where}: {METADATA_FILE} is not valid JSON ({exc})") from exc
        if not isinstance(raw, dict) or raw.get("format") != FORMAT:
            raise CheckpointError(f"{where}: not a bloodray checkpoint (format {raw.get('format') if isinstance(raw, dict) else None!r}, expected {FORMAT!r})")
        known = {f.name for f in dataclasses.fields(cls)}
        try:
            return cls(**{k: v for k, v in raw.items() if k in known})
        except TypeError as exc:
            raise CheckpointError(f"{where}: incomplete checkpoint metadata ({exc})") from exc


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under DDP/compile wrappers, whose state_dict keys are portable."""
    while hasattr(model, "module") and isinstance(getattr(model, "module"), nn.Module):
        model = model.module
    return getattr(model, "_orig_mod", model)


def write_checkpoint(directory: str | Path, model: nn.Module, metadata: CheckpointMetadata,
                     train_state: Mapping[str, Any] | None = None) -> CheckpointMetadata:
    """Write a checkpoint into local ``directory``; returns the metadata with the weights hash."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in unwrap(model).state_dict().items()}
    blob = save_safetensors(state, metadata={"format": FORMAT, "model_name": metadata.model_name})
    (directory / WEIGHTS_FILE).write_bytes(blob)
    metadata = dataclasses.replace(metadata, weights_sha256=hashlib.sha256(blob).hexdigest())
    (directory / METADATA_FILE).write_text(json.dumps(dataclasses.asdict(metadata), indent=2, default=str))
    if train_state is not None:
        torch.save(dict(train_state), directory / TRAIN_STATE_FILE)
    return metadata


def _read(fs, path: str, uri: str) -> bytes:
    try:
        return fs.cat_file(path)
    except FileNotFoundError as exc:
        raise CheckpointError(f"{uri}: checkpoint file not found") from exc
    except Exception as exc:  # noqa: BLE001 - storage errors become one readable line
        raise storage.describe_storage_error(uri, exc) from exc


def read_metadata(uri: str, storage_options: Mapping[str, Any] | None = None) -> CheckpointMetadata:
    """Read only the metadata of the checkpoint directory ``uri``."""
    fs, path = storage.filesystem(uri, storage_options)
    text = _read(fs, posixpath.join(path, METADATA_FILE), storage.join(uri, METADATA_FILE)).decode()
    return CheckpointMetadata.from_json(text, uri)


def resolve_checkpoint(uri: str | None, storage_options: Mapping[str, Any] | None = None) -> str:
    """Turn a checkpoint dir, a training run dir, or ``None`` (packaged default) into a checkpoint dir.

    In a run directory, its calibrated checkpoint wins if ``bloodray calibrate``
    made one; otherwise the checkpoint with the highest ``val_macro_f1``
    (ties: the later epoch).
    """
    if uri is None or uri in ("", "default"):
        if (PACKAGED_CHECKPOINT / METADATA_FILE).exists():
            return str(PACKAGED_CHECKPOINT)
        raise CheckpointError("no checkpoint given (model.checkpoint) and this installation has no packaged default model")
    fs, path = storage.filesystem(uri, storage_options)
    try:
        if fs.exists(posixpath.join(path, METADATA_FILE)):
            return uri
        # `bloodray calibrate` leaves the best checkpoint with its calibration here.
        if fs.exists(posixpath.join(path, rundir.CALIBRATED_DIR, METADATA_FILE)):
            return rundir.calibrated_dir(uri)
        candidates = run_checkpoints(uri, storage_options)
    except CheckpointError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise storage.describe_storage_error(uri, exc) from exc
    if not candidates:
        raise CheckpointError(f"{uri}: no bloodray checkpoint here (no {METADATA_FILE}, no {rundir.CHECKPOINT_GLOB}/ directories)")
    best, best_key = None, None
    for ckpt_uri in candidates:
        meta = read_metadata(ckpt_uri, storage_options)
        key = (meta.metrics.get("val_macro_f1", float("-inf")), meta.epoch)
        if best_key is None or key > best_key:
            best, best_key = ckpt_uri, key
    return best


def run_checkpoints(run_uri: str, storage_options: Mapping[str, Any] | None = None) -> list[str]:
    """URIs of the checkpoints a training run wrote (its ``checkpoint_*`` folders that hold metadata), by name."""
    fs, path = storage.filesystem(run_uri, storage_options)
    found = sorted(fs.glob(posixpath.join(path, rundir.CHECKPOINT_GLOB, METADATA_FILE)))
    return [storage.full_uri(fs, posixpath.dirname(p)) for p in found]


@dataclass
class LoadedCheckpoint:
    """A model in eval mode together with its metadata."""

    model: nn.Module
    metadata: CheckpointMetadata
    uri: str


def load_checkpoint(uri: str | None, storage_options: Mapping[str, Any] | None = None,
                    device: str | torch.device = "cpu") -> LoadedCheckpoint:
    """Load a checkpoint (dir, run dir, or ``None`` for the packaged default).

    Refuses, with a message naming the URI, checkpoints that are not bloodray's,
    whose class list differs from this version's, or whose weights do not match
    the recorded hash or the architecture.
    """
    uri = resolve_checkpoint(uri, storage_options)
    meta = read_metadata(uri, storage_options)
    if list(meta.classes) != list(CLASS_NAMES):
        raise CheckpointError(f"{uri}: checkpoint classes {meta.classes} differ from this version's {list(CLASS_NAMES)}")
    fs, path = storage.filesystem(uri, storage_options)
    blob = _read(fs, posixpath.join(path, WEIGHTS_FILE), storage.join(uri, WEIGHTS_FILE))
    if meta.weights_sha256 and hashlib.sha256(blob).hexdigest() != meta.weights_sha256:
        raise CheckpointError(f"{uri}: weights do not match the hash recorded in {METADATA_FILE} (tampered or corrupted)")
    try:
        state = load_safetensors(blob)
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(f"{uri}: {WEIGHTS_FILE} is not a valid safetensors file ({exc})") from exc
    try:
        get_model_info(meta.model_name)
    except KeyError as exc:
        raise CheckpointError(f"{uri}: {exc}") from exc
    model = create_model(meta.model_name, len(meta.classes), pretrained=False, **meta.model_kwargs)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{uri}: weights do not fit model {meta.model_name!r}: {str(exc).splitlines()[0]}") from exc
    model.to(device).eval()
    return LoadedCheckpoint(model=model, metadata=meta, uri=uri)


@dataclass
class ResumeState:
    """What a training worker needs to continue from a checkpoint it wrote itself."""

    weights: dict[str, torch.Tensor]
    history: list[dict[str, Any]]
    train_state: dict[str, Any] | None


def load_resume_state(directory: str | Path) -> ResumeState:
    """Weights, metric history and optimizer state of a local checkpoint directory (a Ray Train checkpoint)."""
    from safetensors.torch import load_file

    directory = Path(directory)
    weights = load_file(str(directory / WEIGHTS_FILE))
    history = json.loads((directory / METADATA_FILE).read_text()).get("history", [])
    return ResumeState(weights=weights, history=history, train_state=load_train_state(directory))


def load_train_state(directory: str | Path) -> dict[str, Any] | None:
    """Optimizer/scheduler/epoch state of a local training checkpoint, if any."""
    path = Path(directory) / TRAIN_STATE_FILE
    if not path.exists():
        return None
    with path.open("rb") as fh:
        return torch.load(io.BytesIO(fh.read()), map_location="cpu", weights_only=True)


def export_checkpoint(source: str, dest: str, storage_options: Mapping[str, Any] | None = None,
                      **metadata_updates: Any) -> str:
    """Copy a checkpoint's weights and metadata (no optimizer state) to ``dest``, updating metadata fields.

    Used to ship a model and to store calibration next to unchanged weights.
    """
    source = resolve_checkpoint(source, storage_options)
    meta = read_metadata(source, storage_options)
    src_fs, src_path = storage.filesystem(source, storage_options)
    blob = _read(src_fs, posixpath.join(src_path, WEIGHTS_FILE), storage.join(source, WEIGHTS_FILE))
    meta = dataclasses.replace(meta, **metadata_updates)
    storage.write_bytes(storage.join(dest, WEIGHTS_FILE), blob, storage_options)
    storage.write_bytes(storage.join(dest, METADATA_FILE),
                        json.dumps(dataclasses.asdict(meta), indent=2, default=str).encode(), storage_options)
    return dest
