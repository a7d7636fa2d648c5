"""Self-describing, weights-only checkpoints.

A bloodray checkpoint is a directory (local or object storage) holding:

* ``model.safetensors`` -- the weights; loading never unpickles code;
* ``bloodray.json`` -- :class:`CheckpointMetadata`: model name and kwargs,
  class list in index order, input size, normalization, calibration
  temperature, review threshold, metrics, training history, the final
  (redacted) config and the package version, the SHA-256 of the weights
  (``weights_sha256``) and the seal (``seal_sha256``);
* ``ood.safetensors`` (optional, written by ``bloodray calibrate``) -- the
  out-of-distribution reference (:mod:`bloodray.ood`); its SHA-256
  and scalars are the metadata's ``ood`` entry, so the seal covers it. A
  checkpoint without it gives no ``ood_score`` (null) and no unidentified cells;
* ``selfcheck.safetensors`` (optional, written by ``bloodray calibrate``) -- a fixed batch of cell images and
  their fp32 logits, hashed in the metadata's ``selfcheck``: the precision self-check (:mod:`bloodray.inference_precision`);
* ``train_state.pt`` (training checkpoints only) -- optimizer/scheduler state,
  read with ``torch.load(weights_only=True)`` when a run resumes (:mod:`bloodray.train.resume_state`).

A Ray Train run directory holds several such checkpoints; :func:`resolve_checkpoint`
picks the best one by validation macro-F1.

Integrity (format ``bloodray-checkpoint/2``): the seal is the SHA-256 of the
canonical JSON of every metadata field except the seal itself -- so it covers
the weights through ``weights_sha256`` and every value that changes what the
model outputs (temperature, normalization, review threshold, classes...).
``checkpoint_id`` is ``<model>-<first 12 hex of the seal>``: editing any field
gives another id. Loading refuses a missing or blank hash, a broken seal,
weights that do not match, and out-of-range values. The seal is a checksum,
not a signature: it catches corruption and hand edits, not someone who
recomputes it (protect the storage for that). Only :func:`write_checkpoint`
and :func:`export_checkpoint` write checkpoints; both seal.

Format 1 (weights hash only) is no longer loaded; ``bloodray export --checkpoint
OLD --to NEW`` re-seals one after checking its weights hash and values.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import posixpath
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from bloodray import __version__, packaged, rundir, storage
from bloodray.bounded_read import MAX_WEIGHTS_BYTES, InputReadError, read_path
from bloodray.classes import CLASS_NAMES
from bloodray.models import create_model, get_model_info
from bloodray.data.preset import EvalPreset
from bloodray.data.stain import StainReference, StainReferenceError

FORMAT = "bloodray-checkpoint/2"
#: Formats that are only read to re-seal them (``bloodray export``), never loaded.
LEGACY_FORMATS = ("bloodray-checkpoint/1",)
WEIGHTS_FILE = "model.safetensors"
METADATA_FILE = "bloodray.json"
TRAIN_STATE_FILE = "train_state.pt"
#: The OOD reference's tensors (means, precisions); its hash and scalars are in the metadata's ``ood``.
OOD_FILE = "ood.safetensors"
#: The precision self-check batch (images and their fp32 logits); its hash is in the metadata's ``selfcheck``.
SELFCHECK_FILE = "selfcheck.safetensors"
#: Where the packaged default model lives inside the installed package (the others: :mod:`bloodray.packaged`).
PACKAGED_CHECKPOINT = packaged.DEFAULT_FOLDER
#: Input sizes a checkpoint may declare (pixels per side).
INPUT_SIZE_RANGE = (8, 4096)
#: Fields that only the writer sets.
SEALED_FIELDS = ("weights_sha256", "seal_sha256", "format")
_SHA256 = re.compile(r"[0-9a-f]{64}")


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
    #: OOD reference (:meth:`bloodray.ood.OodReference.metadata`, with ``file_sha256`` of
    #: :data:`OOD_FILE`); empty = none. Left out of ``bloodray.json`` when empty, so checkpoints sealed
    #: before it existed keep their seal and id.
    ood: dict[str, Any] = field(default_factory=dict)
    #: Stain normalisation the weights were trained with (:meth:`bloodray.data.stain.StainReference.to_metadata`);
    #: empty = none. Left out of ``bloodray.json`` when empty, like ``ood``.
    stain_norm: dict[str, Any] = field(default_factory=dict)
    #: ``file_sha256`` of :data:`SELFCHECK_FILE` and ``images``; empty = none (left out of the JSON, like ``ood``).
    selfcheck: dict[str, Any] = field(default_factory=dict)
    weights_sha256: str = ""
    format: str = FORMAT
    #: SHA-256 of the canonical JSON of all the other fields (see :meth:`compute_seal`).
    seal_sha256: str = ""

    @property
    def checkpoint_id(self) -> str:
        """Short id derived from the whole checkpoint (metadata and, through its hash, the weights); stable across copies."""
        return f"{self.model_name}-{self.compute_seal()[:12]}"

    def to_json_dict(self) -> dict[str, Any]:
        """The metadata as written to ``bloodray.json`` (JSON values only: numpy scalars as numbers, others as text)."""
        data = json.loads(json.dumps(dataclasses.asdict(self), default=_json_default))
        for optional in ("ood", "stain_norm", "selfcheck"):
            if not data.get(optional):
                data.pop(optional, None)
        return data

    def normalized(self) -> "CheckpointMetadata":
        """This metadata as it will read back from ``bloodray.json`` (what is validated and sealed)."""
        return CheckpointMetadata(**self.to_json_dict())

    def compute_seal(self) -> str:
        """SHA-256 of the canonical JSON (sorted keys, no spaces) of every field except ``seal_sha256``."""
        return seal_of(self.to_json_dict())

    def sealed(self, weights_sha256: str) -> "CheckpointMetadata":
        """A copy for weights with hash ``weights_sha256``, in this format, with its seal."""
        # Sealed metadata carries no local machine paths (data roots, output folders, init checkpoints...).
        portable = CheckpointMetadata(**without_local_paths(self.to_json_dict()))
        meta = dataclasses.replace(portable, weights_sha256=weights_sha256, format=FORMAT, seal_sha256="")
        return dataclasses.replace(meta, seal_sha256=meta.compute_seal())

    def validate(self, where: str) -> None:
        """Refuse values that would make the model silently wrong; the message names ``where`` and the field."""
        def bad(field_name: str, why: str) -> CheckpointError:
            return CheckpointError(f"{where}: {METADATA_FILE}: {field_name} {why} (got {getattr(self, field_name)!r})")

        def number(x: Any) -> bool:
            return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

        if not isinstance(self.model_name, str) or not self.model_name:
            raise bad("model_name", "must be a model name")
        if not isinstance(self.classes, list) or not self.classes or not all(isinstance(c, str) for c in self.classes):
            raise bad("classes", "must be a list of class names")
        lo, hi = INPUT_SIZE_RANGE
        if not (isinstance(self.input_size, int) and not isinstance(self.input_size, bool) and lo <= self.input_size <= hi):
            raise bad("input_size", f"must be an integer from {lo} to {hi}")
        if not (isinstance(self.mean, list) and len(self.mean) == 3 and all(number(m) and 0.0 <= m <= 1.0 for m in self.mean)):
            raise bad("mean", "must be 3 finite numbers in [0, 1]")
        if not (isinstance(self.std, list) and len(self.std) == 3 and all(number(x) and 0.0 < x <= 1.0 for x in self.std)):
            raise bad("std", "must be 3 finite numbers in (0, 1]")
        if not (number(self.temperature) and self.temperature > 0):
            raise bad("temperature", "must be a finite number > 0")
        if self.review_threshold is not None and not (number(self.review_threshold) and 0.0 <= self.review_threshold <= 1.0):
            raise bad("review_threshold", "must be null or a number in [0, 1]")
        if not (isinstance(self.epoch, int) and not isinstance(self.epoch, bool) and self.epoch >= 0):
            raise bad("epoch", "must be an integer >= 0")
        for name in ("model_kwargs", "metrics", "config", "calibration", "ood", "stain_norm", "selfcheck"):
            if not isinstance(getattr(self, name), dict):
                raise bad(name, "must be a mapping")
        if not isinstance(self.history, list):
            raise bad("history", "must be a list")
        if self.ood and not (isinstance(self.ood.get("file_sha256"), str) and _SHA256.fullmatch(self.ood["file_sha256"])
                             and number(self.ood.get("threshold"))):
            raise bad("ood", f"must be empty or hold the {OOD_FILE} hash (file_sha256) and a finite threshold")
        if self.selfcheck and not (isinstance(self.selfcheck.get("file_sha256"), str)
                                   and _SHA256.fullmatch(self.selfcheck["file_sha256"])):
            raise bad("selfcheck", f"must be empty or hold the {SELFCHECK_FILE} hash (file_sha256)")
        try:
            StainReference.from_metadata(self.stain_norm, f"{where}: {METADATA_FILE}")
        except StainReferenceError as exc:
            raise CheckpointError(str(exc)) from exc

    def val_confusion(self, confident: bool = False) -> np.ndarray | None:
        """The val confusion counts ``bloodray calibrate`` sealed (rows true, columns predicted, in
        :data:`~bloodray.classes.CLASS_NAMES` order), of all val cells or, ``confident``, of those not sent to
        review; None for a checkpoint calibrated before they were recorded, or never."""
        rows = self.calibration.get("val_confusion_confident" if confident else "val_confusion")
        return np.asarray(rows, dtype=np.int64) if rows else None

    def flag_confusion(self) -> np.ndarray | None:
        """The confusion counts the flags correct with: val's, plus the training cells' when ``bloodray calibrate``
        (or the OOD refit) sealed them as joined (:func:`bloodray.evaluation.calibration.training_confusion`: the
        model does no better on them than on val); None without a val confusion."""
        val, train = self.val_confusion(), self.calibration.get("train_confusion") or {}
        return val if val is None or not train.get("joined") else val + np.asarray(train["confusion"], dtype=np.int64)

    def preset(self) -> EvalPreset:
        """The evaluation preset these weights were trained for (stain normalisation included)."""
        return EvalPreset(self.input_size, tuple(self.mean), tuple(self.std),
                          stain=StainReference.from_metadata(self.stain_norm, METADATA_FILE))

    @classmethod
    def from_json(cls, text: str, where: str, *, legacy: bool = False) -> "CheckpointMetadata":
        """Parse, check the seal and validate ``bloodray.json`` text; errors name ``where``.

        ``legacy=True`` also reads format-1 metadata (no seal) so that it can be re-sealed; never for loading.
        """
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{where}: {METADATA_FILE} is not valid JSON ({exc})") from exc
        fmt = raw.get("format") if isinstance(raw, dict) else None
        if fmt in LEGACY_FORMATS and not legacy:
            raise CheckpointError(
                f"{where}: checkpoint format {fmt!r} does not protect its metadata and is no longer loaded; "
                f"re-seal it with `bloodray export --checkpoint {where} --to NEW_DIR` (checks its weights hash and "
                f"values) and use NEW_DIR")
        if fmt != FORMAT and fmt not in LEGACY_FORMATS:
            raise CheckpointError(f"{where}: not a bloodray checkpoint (format {fmt!r}, expected {FORMAT!r})")
        known = {f.name for f in dataclasses.fields(cls)}
        try:
            meta = cls(**{k: v for k, v in raw.items() if k in known})
        except TypeError as exc:
            raise CheckpointError(f"{where}: incomplete checkpoint metadata ({exc})") from exc
        if not isinstance(meta.weights_sha256, str) or not _SHA256.fullmatch(meta.weights_sha256):
            raise CheckpointError(f"{where}: {METADATA_FILE} has no valid weights_sha256 (missing, blank or malformed); "
                                  "the weights cannot be checked, so the checkpoint is refused")
        if fmt == FORMAT:
            if not isinstance(meta.seal_sha256, str) or not _SHA256.fullmatch(meta.seal_sha256):
                raise CheckpointError(f"{where}: {METADATA_FILE} has no valid seal_sha256 (missing, blank or malformed); "
                                      "the metadata cannot be checked, so the checkpoint is refused")
            if meta.compute_seal() != meta.seal_sha256:
                raise CheckpointError(f"{where}: {METADATA_FILE} does not match its seal (metadata tampered or corrupted)")
        meta.validate(where)
        return meta


_LOCAL_PATH = re.compile(r"^(file://|~/|/(?=[^/\s])|[A-Za-z]:[\\/])")


def without_local_paths(value: Any) -> Any:
    """``value`` (JSON data) with every local absolute path (``/data/pbc``, ``file://...``, ``~/x``, ``C:\\x``)
    reduced to ``<local>/`` and its last component: object-store URIs and relative paths stay."""
    if isinstance(value, dict):
        return {k: without_local_paths(v) for k, v in value.items()}
    if isinstance(value, list):
        return [without_local_paths(v) for v in value]
    if isinstance(value, str) and _LOCAL_PATH.match(value):
        return "<local>/" + re.split(r"[\\/]", value.rstrip("/\\"))[-1]
    return value


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    return str(value)


def seal_of(metadata: Mapping[str, Any]) -> str:
    """SHA-256 of the canonical JSON of a metadata mapping without its ``seal_sha256``."""
    payload = {k: v for k, v in metadata.items() if k != "seal_sha256"}
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=_json_default)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _metadata_bytes(meta: CheckpointMetadata) -> bytes:
    return json.dumps(meta.to_json_dict(), indent=2).encode()


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under DDP/compile wrappers, whose state_dict keys are portable."""
    while hasattr(model, "module") and isinstance(getattr(model, "module"), nn.Module):
        model = model.module
    return getattr(model, "_orig_mod", model)


def write_checkpoint(directory: str | Path, model: nn.Module, metadata: CheckpointMetadata,
                     train_state: Mapping[str, Any] | None = None) -> CheckpointMetadata:
    """Write a sealed checkpoint into local ``directory``; returns the metadata with the weights hash and seal.

    Refuses (:class:`CheckpointError`) metadata that would not load (see :meth:`CheckpointMetadata.validate`).
    """
    directory = Path(directory)
    metadata = metadata.normalized()
    metadata.validate(str(directory))
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in unwrap(model).state_dict().items()}
    blob = save_safetensors(state, metadata={"format": FORMAT, "model_name": metadata.model_name})
    (directory / WEIGHTS_FILE).write_bytes(blob)
    metadata = metadata.sealed(hashlib.sha256(blob).hexdigest())
    (directory / METADATA_FILE).write_bytes(_metadata_bytes(metadata))
    if train_state is not None:
        torch.save(dict(train_state), directory / TRAIN_STATE_FILE)
    return metadata


def _read(fs, path: str, uri: str) -> bytes:
    try:
        return read_path(fs, path, uri, max_bytes=MAX_WEIGHTS_BYTES)
    except FileNotFoundError as exc:
        raise CheckpointError(f"{uri}: checkpoint file not found") from exc
    except (InputReadError, storage.StorageError) as exc:
        raise CheckpointError(str(exc)) from exc
    except Exception as exc:  # noqa: BLE001 - storage errors become one readable line
        raise storage.describe_storage_error(uri, exc) from exc


def read_metadata(uri: str, storage_options: Mapping[str, Any] | None = None) -> CheckpointMetadata:
    """Read only the metadata of the checkpoint directory ``uri`` (seal checked, values validated)."""
    return _read_metadata(uri, storage_options)


def _read_metadata(uri: str, storage_options: Mapping[str, Any] | None, legacy: bool = False) -> CheckpointMetadata:
    fs, path = storage.filesystem(uri, storage_options)
    text = _read(fs, posixpath.join(path, METADATA_FILE), storage.join(uri, METADATA_FILE))
    try:
        decoded = text.decode()
    except UnicodeDecodeError as exc:
        raise CheckpointError(f"{uri}: {METADATA_FILE} is not UTF-8 text") from exc
    return CheckpointMetadata.from_json(decoded, uri, legacy=legacy)


def check_weights(blob: bytes, meta: CheckpointMetadata, uri: str) -> None:
    """Refuse weights whose SHA-256 is not the one the (sealed) metadata records."""
    if hashlib.sha256(blob).hexdigest() != meta.weights_sha256:
        raise CheckpointError(f"{uri}: weights do not match the hash recorded in {METADATA_FILE} (tampered or corrupted)")


def resolve_checkpoint(uri: str | None, storage_options: Mapping[str, Any] | None = None) -> str:
    """Turn a checkpoint dir, a training run dir, ``packaged:<name>`` or ``None`` / ``default`` (the packaged
    default, :mod:`bloodray.packaged`) into a checkpoint dir.

    In a run directory, its calibrated checkpoint wins if ``bloodray calibrate``
    made one; otherwise :func:`best_run_checkpoint`.
    """
    if uri is None or uri in ("", "default") or uri.startswith(packaged.SCHEME):
        try:
            return str(packaged.folder(uri))
        except packaged.PackagedModelError as exc:
            raise CheckpointError(str(exc)) from exc
    fs, path = storage.filesystem(uri, storage_options)
    try:
        if fs.exists(posixpath.join(path, METADATA_FILE)):
            return uri
        # `bloodray calibrate` leaves the best checkpoint with its calibration here.
        if fs.exists(posixpath.join(path, rundir.CALIBRATED_DIR, METADATA_FILE)):
            return rundir.calibrated_dir(uri)
    except Exception as exc:  # noqa: BLE001
        raise storage.describe_storage_error(uri, exc) from exc
    return best_run_checkpoint(uri, storage_options)


def best_run_checkpoint(uri: str, storage_options: Mapping[str, Any] | None = None) -> str:
    """The checkpoint of training run ``uri`` with the highest ``val_macro_f1`` (ties: the later epoch)."""
    try:
        candidates = run_checkpoints(uri, storage_options)
    except Exception as exc:  # noqa: BLE001
        raise storage.describe_storage_error(uri, exc) from exc
    if not candidates:
        raise CheckpointError(f"{uri}: no bloodray checkpoint here (no {METADATA_FILE}, no {rundir.CHECKPOINT_GLOB}/ directories)")
    best, best_key = None, None
    for ckpt_uri in candidates:
        # Legacy checkpoints take part in the choice, so that `bloodray export` can re-seal a format-1 run's best one;
        # loading it is refused with that advice.
        meta = _read_metadata(ckpt_uri, storage_options, legacy=True)
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
    #: the OOD reference (:class:`bloodray.ood.OodReference`), None when the checkpoint has none.
    ood: Any = None


def load_checkpoint(uri: str | None, storage_options: Mapping[str, Any] | None = None,
                    device: str | torch.device = "cpu") -> LoadedCheckpoint:
    """Load a checkpoint (dir, run dir, or ``None`` for the packaged default).

    Refuses, with a message naming the URI, checkpoints that are not bloodray's,
    of an old format, whose metadata does not match its seal or holds
    out-of-range values, whose class list differs from this version's, or whose
    weights do not match the recorded hash or the architecture.
    """
    uri = resolve_checkpoint(uri, storage_options)
    meta = read_metadata(uri, storage_options)
    if list(meta.classes) != list(CLASS_NAMES):
        raise CheckpointError(f"{uri}: checkpoint classes {meta.classes} differ from this version's {list(CLASS_NAMES)}")
    fs, path = storage.filesystem(uri, storage_options)
    blob = _read(fs, posixpath.join(path, WEIGHTS_FILE), storage.join(uri, WEIGHTS_FILE))
    check_weights(blob, meta, uri)
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
    return LoadedCheckpoint(model=model, metadata=meta, uri=uri, ood=load_ood(uri, meta, storage_options))


def load_ood(uri: str, meta: CheckpointMetadata, storage_options: Mapping[str, Any] | None = None):
    """The checkpoint's OOD reference, checked against the hash its sealed metadata records; None without one."""
    if not meta.ood:
        return None
    from bloodray.ood import OodError, OodReference

    fs, path = storage.filesystem(uri, storage_options)
    blob = _read(fs, posixpath.join(path, OOD_FILE), storage.join(uri, OOD_FILE))
    try:
        return OodReference.from_parts(meta.ood, blob, storage.join(uri, OOD_FILE))
    except OodError as exc:
        raise CheckpointError(str(exc)) from exc
    except Exception as exc:  # noqa: BLE001 - a malformed file is a bad checkpoint, said in one line
        raise CheckpointError(f"{storage.join(uri, OOD_FILE)}: not a valid OOD reference ({exc})") from exc


def export_checkpoint(source: str, dest: str, storage_options: Mapping[str, Any] | None = None,
                      *, ood_file: bytes | None = None, selfcheck_file: bytes | None = None,
                      **metadata_updates: Any) -> str:
    """Copy a checkpoint's weights and metadata (no optimizer state) to ``dest``, updating metadata fields, and seal it.

    Used to ship a model, to store calibration next to unchanged weights, and to re-seal a format-1 checkpoint.
    The source's weights hash is checked first (and its seal, unless it is format 1); the updated metadata is
    validated. ``weights_sha256``, ``seal_sha256`` and ``format`` cannot be updated.
    An ``ood`` update comes with its tensor file (``ood_file``, whose hash it
    must record); without one, the source's OOD file (if any) is copied after
    checking its hash. The same goes for a ``selfcheck`` update and its ``selfcheck_file``.
    """
    reserved = sorted(set(metadata_updates) & set(SEALED_FIELDS))
    if reserved:
        raise CheckpointError(f"{dest}: {', '.join(reserved)} are set by the writer, not by an update")
    unknown = sorted(set(metadata_updates) - {f.name for f in dataclasses.fields(CheckpointMetadata)})
    if unknown:
        raise CheckpointError(f"{dest}: unknown checkpoint metadata field(s) {', '.join(unknown)}")
    source = resolve_checkpoint(source, storage_options)
    meta = _read_metadata(source, storage_options, legacy=True)
    src_fs, src_path = storage.filesystem(source, storage_options)
    blob = _read(src_fs, posixpath.join(src_path, WEIGHTS_FILE), storage.join(source, WEIGHTS_FILE))
    check_weights(blob, meta, source)
    ood_file = _optional_file(src_fs, src_path, source, dest, meta, metadata_updates, ood_file, "ood", OOD_FILE)
    selfcheck_file = _optional_file(src_fs, src_path, source, dest, meta, metadata_updates, selfcheck_file,
                                    "selfcheck", SELFCHECK_FILE)
    meta = dataclasses.replace(meta, **metadata_updates).normalized()
    meta.validate(dest)
    meta = meta.sealed(meta.weights_sha256)
    storage.write_bytes(storage.join(dest, WEIGHTS_FILE), blob, storage_options)
    if meta.ood:
        storage.write_bytes(storage.join(dest, OOD_FILE), ood_file, storage_options)
    if meta.selfcheck:
        storage.write_bytes(storage.join(dest, SELFCHECK_FILE), selfcheck_file, storage_options)
    storage.write_bytes(storage.join(dest, METADATA_FILE), _metadata_bytes(meta), storage_options)
    return dest


def _optional_file(fs, path: str, source: str, dest: str, meta: CheckpointMetadata, updates: Mapping[str, Any],
                   data: bytes | None, key: str, name: str) -> bytes | None:
    """The bytes of the optional hashed file of metadata field ``key`` an export writes: the update's, or the source's."""
    if key in updates:
        if updates[key] and (data is None or hashlib.sha256(data).hexdigest() != updates[key].get("file_sha256")):
            raise CheckpointError(f"{dest}: an {key} update needs its {name} bytes, with the hash it records")
        return data
    if data is not None:
        raise CheckpointError(f"{dest}: {name} bytes given without the {key} metadata that records their hash")
    current = getattr(meta, key)
    if not current:
        return None
    data = _read(fs, posixpath.join(path, name), storage.join(source, name))
    if hashlib.sha256(data).hexdigest() != current.get("file_sha256"):
        raise CheckpointError(f"{source}: {name} does not match the hash in {METADATA_FILE} (tampered or corrupted)")
    return data
