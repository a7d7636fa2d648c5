"""Inference precision: the fastest arithmetic the machine offers, used only after it passes a self-check.

(Training's precision is :mod:`bloodray.precision`; both use its detection of native bf16.)

``precision`` (:class:`bloodray.predict.CellPredictor`; the nightly job's ``inference.precision``) is one of
:data:`PRECISIONS`:

``fp32``  float32 everywhere (on CPU with BatchNorm folded): the reference.
``bf16``  bfloat16 matrix arithmetic (``torch.autocast``; on CPU with channels_last), where the CPU has native
          bf16 (``amx_bf16`` or ``avx512_bf16``) or the GPU supports it.
``int8``  accepted, but this version has no int8 path: it falls back to ``bf16`` and then ``fp32`` (logged).
          Measured and not kept (``bench/runtimes.py``, BENCHMARKS.md; AMD EPYC with ``avx512_vnni``, one
          thread, forward only): int8 by PT2E (torchao's x86 quantizer, compiled by inductor) ran at 2.0x torch
          bf16 and ONNX Runtime's static int8 at 1.9x, both passing the self-check, but they gave fp32's class
          on only 99.55 % and 99.75 % of the PBC test split (the bar: 99.9 %); they also need calibration cells
          that a checkpoint does not carry, and PT2E compiles for tens of seconds in every process.
``auto``  (default) the fastest path the device supports: ``bf16`` where supported, else ``fp32``.

Never trusted blindly: a checkpoint carries a self-check batch (:class:`SelfCheckBatch`, sealed with it by
``bloodray calibrate``): :data:`SELF_CHECK_IMAGES` fixed cell images and their fp32 logits, computed with the
unfolded model and the float stain transform. At load the predictor runs those images through the chosen path
(its whole preprocessing included) and keeps it only when every image gets the same class and no calibrated
class probability moves by more than :data:`PROB_TOLERANCE`; otherwise it logs why and tries the next safer path
(``int8`` -> ``bf16`` -> ``fp32``). A checkpoint without a self-check batch runs in ``fp32``. The same holds
for the OpenVINO runtime (``inference.runtime``, :mod:`bloodray.openvino_runtime`). Measured agreement
with fp32 on the PBC test split and chula: BENCHMARKS.md (``bench/precision.py``).
"""

from __future__ import annotations

import hashlib
import io
import logging
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

log = logging.getLogger(__name__)

#: Values of ``inference.precision``.
PRECISIONS = ("auto", "fp32", "bf16", "int8")
#: From the least to the most exact: a path that fails its self-check falls back to the next one.
FALLBACK_ORDER = ("int8", "bf16", "fp32")
#: Images in a checkpoint's self-check batch (4 per class with 8 classes).
SELF_CHECK_IMAGES = 32
#: Largest change of any calibrated class probability a path may make on the self-check batch, against the
#: sealed fp32 logits. The paths differ from the sealed reference in two honest ways: the fast stain
#: normalisation (fp32 with it: up to 0.012 on the packaged model's 32 PBC cells) and bf16 arithmetic (0.019
#: with both; AMD EPYC, avx512_bf16). Broken arithmetic changes classes or moves probabilities far more.
PROB_TOLERANCE = 0.1


@dataclass(frozen=True)
class SelfCheckBatch:
    """A fixed batch of cell images (uint8 NHWC, the model's input size) and their fp32 logits (N x classes)."""

    images: np.ndarray
    logits: np.ndarray

    def to_bytes(self) -> bytes:
        """The ``selfcheck.safetensors`` bytes."""
        import torch
        from safetensors.torch import save

        return save({"images": torch.from_numpy(np.ascontiguousarray(self.images, dtype=np.uint8)),
                     "logits": torch.from_numpy(np.ascontiguousarray(self.logits, dtype=np.float32))})

    def metadata(self) -> dict[str, Any]:
        """The checkpoint metadata's ``selfcheck`` entry for these bytes."""
        return {"file_sha256": hashlib.sha256(self.to_bytes()).hexdigest(), "images": int(len(self.images))}

    @classmethod
    def from_bytes(cls, blob: bytes, classes: int, input_size: int) -> "SelfCheckBatch":
        """Parse the file; ValueError when its shapes do not fit the model."""
        from safetensors.torch import load

        tensors = load(blob)
        images, logits = tensors["images"].numpy(), tensors["logits"].numpy()
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (input_size, input_size, 3):
            raise ValueError(f"images must be uint8 N x {input_size} x {input_size} x 3, got {images.shape}")
        if logits.shape != (len(images), classes) or not np.isfinite(logits).all():
            raise ValueError(f"logits must be {len(images)} x {classes} finite numbers, got {logits.shape}")
        return cls(images, logits.astype(np.float32))


def make_selfcheck(model, preset, images: np.ndarray) -> SelfCheckBatch:
    """The self-check batch of ``images``: their logits from ``model`` as written (no folding) in fp32 on CPU,
    preprocessed with the float stain transform, the reference every faster path is held to."""
    import torch

    model = model.to("cpu").eval()
    with torch.inference_mode():
        logits = model(preset.normalize(torch.as_tensor(np.ascontiguousarray(images, dtype=np.uint8)))).float()
    return SelfCheckBatch(np.ascontiguousarray(images, dtype=np.uint8), logits.numpy())


def selfcheck_sample(labels: np.ndarray, count: int = SELF_CHECK_IMAGES) -> list[int]:
    """Indices of ``count`` rows spread over the classes (round robin, first rows of each class first)."""
    by_class = [list(np.flatnonzero(labels == c)) for c in np.unique(labels)]
    picked: list[int] = []
    while len(picked) < count and any(by_class):
        for rows in by_class:
            if rows and len(picked) < count:
                picked.append(int(rows.pop(0)))
    return sorted(picked)


def load_selfcheck(uri: str, meta, storage_options: Mapping[str, Any] | None = None) -> SelfCheckBatch | None:
    """The self-check batch of checkpoint ``uri``, checked against the hash its sealed metadata records."""
    if not meta.selfcheck:
        return None
    from bloodray import storage
    from bloodray.checkpoint import SELFCHECK_FILE, CheckpointError

    where = storage.join(uri, SELFCHECK_FILE)
    try:
        fs, path = storage.filesystem(where, storage_options)
        blob = fs.cat_file(path)
    except Exception as exc:  # noqa: BLE001 - one readable line naming the file
        raise CheckpointError(f"{where}: cannot read the self-check batch ({exc})") from exc
    if hashlib.sha256(blob).hexdigest() != meta.selfcheck.get("file_sha256"):
        raise CheckpointError(f"{where}: does not match the hash in the checkpoint metadata (tampered or corrupted)")
    try:
        return SelfCheckBatch.from_bytes(blob, len(meta.classes), meta.input_size)
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(f"{where}: not a valid self-check batch ({exc})") from exc


def bf16_supported(device) -> bool:
    """Whether ``device`` does bf16 natively (the one detection, :func:`bloodray.precision.native_bf16`)."""
    from bloodray.precision import native_bf16

    return native_bf16(device.type)[0] if device.type in ("cpu", "cuda") else False


def candidates(requested: str, device) -> list[str]:
    """Paths to try, fastest first, ending with ``fp32``: what ``requested`` allows on ``device``."""
    if requested not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {requested!r}")
    start = FALLBACK_ORDER.index("bf16" if requested == "auto" else requested)
    order = list(FALLBACK_ORDER[start:])
    if "int8" in order:
        # Measured below the 99.9 % agreement bar (module docstring): not shipped.
        log.warning("precision int8: this version has no int8 path (measured and not kept: BENCHMARKS.md); "
                    "trying the next safer one")
        order.remove("int8")
    if "bf16" in order and not bf16_supported(device):
        if requested == "bf16":
            log.warning("precision bf16: %s has no fast bf16 arithmetic; using fp32", device)
        order.remove("bf16")
    return order


def compare(logits: np.ndarray, reference: np.ndarray, temperature: float,
            tolerance: float = PROB_TOLERANCE) -> str | None:
    """Why ``logits`` fail the self-check against the sealed ``reference``, or None when they pass."""
    if not np.isfinite(logits).all():
        return "non-finite logits"
    changed = int((logits.argmax(1) != reference.argmax(1)).sum())
    if changed:
        return f"{changed} of {len(reference)} reference cells change class"
    diff = float(np.abs(_softmax(logits / temperature) - _softmax(reference / temperature)).max())
    if diff > tolerance:
        return f"a class probability moves by {diff:.4f} > tolerance {tolerance}"
    return None


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def selfcheck_from_files(checkpoint: str, uris: list[str],
                         storage_options: Mapping[str, Any] | None = None) -> SelfCheckBatch:
    """The self-check batch of image files ``uris`` (decoded with the checkpoint's preset) for ``checkpoint``."""
    from bloodray import storage
    from bloodray.checkpoint import load_checkpoint

    loaded = load_checkpoint(checkpoint, storage_options)
    preset = loaded.metadata.preset()
    images = []
    for uri in uris:
        fs, path = storage.filesystem(uri, storage_options)
        images.append(preset.load(fs.cat_file(path)))
    return make_selfcheck(loaded.model, preset, np.stack(images))


def export_with_selfcheck(source: str, dest: str, images_dir: str,
                          storage_options: Mapping[str, Any] | None = None) -> str:
    """``bloodray export --selfcheck-images DIR``: copy ``source`` to ``dest`` with a self-check batch of
    :data:`SELF_CHECK_IMAGES` images of ``images_dir`` (all its image files, recursively, evenly spread by name)."""
    from bloodray import storage
    from bloodray.checkpoint import CheckpointError, export_checkpoint
    from bloodray.classes import is_image_path

    fs, root = storage.filesystem(images_dir, storage_options)
    files = sorted(p for p in fs.find(root) if is_image_path(p.lower()))
    if not files:
        raise CheckpointError(f"{images_dir}: no image files for the self-check batch")
    step = max(1, len(files) // SELF_CHECK_IMAGES)
    uris = [storage.full_uri(fs, p) for p in files[::step][:SELF_CHECK_IMAGES]]
    check = selfcheck_from_files(source, uris, storage_options)
    return export_checkpoint(source, dest, storage_options, selfcheck=check.metadata(), selfcheck_file=check.to_bytes())
