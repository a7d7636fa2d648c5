"""Batch inference with a trained checkpoint: the Ray Data predictor class.

:class:`CellPredictor` loads the model once per actor (``from_checkpoint``
semantics: in ``__init__``) and then maps ``dict[str, np.ndarray]`` batches of
preprocessed uint8 images to raw logits and calibrated class probabilities.
Evaluation, calibration and the nightly classification job all use it, so they
cannot disagree.

On CPU it runs the model the way a CPU runs it fastest: BatchNorm folded into
the convolutions, one intra-op thread per CPU Ray assigned to the actor (so
actors never oversubscribe the node), and the Ray Data batch cut into small
model batches whose activations stay in cache (``bench/inference.py`` measures
the effect).

The arithmetic (``precision``: fp32, bf16...) is chosen per machine and kept
only after it passes the checkpoint's self-check (:mod:`bloodray.inference_precision`);
the micro-batch is sized for the chosen precision's activations. ``runtime="openvino"``
runs the CPU forward pass in OpenVINO instead of torch (:mod:`bloodray.openvino_runtime`),
under the same self-check; if OpenVINO cannot run or no precision passes, torch runs.

When the checkpoint carries an OOD reference (:mod:`bloodray.ood`),
forward hooks collect the head's input and an early activation in the same
forward pass, and each cell gets an ``ood_score``; no extra pass is run.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import sys
from typing import Any, Mapping

import numpy as np
import torch

from bloodray.checkpoint import LoadedCheckpoint, load_checkpoint
from bloodray.ood import REFIT_COMMAND, FeatureTap, early_layer
from bloodray.models import get_model_info
from bloodray.inference_precision import PROB_TOLERANCE, candidates, compare, load_selfcheck
from bloodray.openvino_runtime import RUNTIMES

log = logging.getLogger(__name__)

#: Bytes of the largest activation of a CPU model batch: keeps a layer's input
#: and output in the CPU caches (L2 + a share of L3).
CPU_ACTIVATION_BUDGET = 12 * 2**20
#: Most images per CPU model batch (larger batches only cost cache misses).
MAX_CPU_MICRO_BATCH = 64
#: Images per OpenVINO call (the batch ``bench/runtimes.py`` measured it with).
OPENVINO_MICRO_BATCH = 32


def ray_assigned_cpus() -> float | None:
    """CPUs Ray assigned to the current task or actor; None outside a Ray worker."""
    ray = sys.modules.get("ray")  # never import Ray just to find out we are not in it
    if ray is None or not ray.is_initialized():
        return None
    try:
        ctx = ray.get_runtime_context()
        if ctx.worker.mode != ray._private.worker.WORKER_MODE:
            return None
        return ctx.get_assigned_resources().get("CPU")
    except Exception:  # noqa: BLE001 - private API moved: keep torch's default
        return None


def fold_batchnorm(model: torch.nn.Module) -> torch.nn.Module:
    """Inference copy of ``model`` with each BatchNorm folded into the convolution before it.

    Same outputs up to float rounding (~1e-6), fewer passes over the
    activations. Models that torch.fx cannot trace are returned unchanged.
    """
    if not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return model
    try:
        from torch.fx.experimental.optimization import fuse

        return fuse(copy.deepcopy(model).eval())
    except Exception as exc:  # noqa: BLE001 - any tracing problem: run the model as it is
        log.debug("BatchNorm folding skipped (%s); running the model unchanged", exc)
        return model


def cpu_micro_batch(model: torch.nn.Module, input_size: int, budget: int = CPU_ACTIVATION_BUDGET,
                    autocast: Any = None, channels_last: bool = False) -> int:
    """Images per CPU forward pass: as many as keep the largest activation within ``budget`` bytes.

    Measured with a forward pass of one (blank) image under ``autocast`` (bf16 activations take half the
    bytes of fp32 ones, so bf16 gets twice the images), which also warms up the model.
    """
    largest = 0

    def hook(_module, _inputs, output):
        nonlocal largest
        if isinstance(output, torch.Tensor):
            largest = max(largest, output.numel() * output.element_size())

    leaves = [m for m in model.modules() if not list(m.children())]
    handles = [m.register_forward_hook(hook) for m in leaves]
    try:
        x = torch.zeros(1, 3, input_size, input_size)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), (autocast or contextlib.nullcontext()):
            model(x)
    finally:
        for handle in handles:
            handle.remove()
    if largest <= 0:
        return MAX_CPU_MICRO_BATCH
    return max(1, min(MAX_CPU_MICRO_BATCH, budget // largest))


def pick_device(device: str = "auto") -> torch.device:
    """``auto`` -> the GPU Ray assigned to this process if any, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def tta_views(batch: torch.Tensor) -> list[torch.Tensor]:
    """The 8 dihedral views (4 rotations x optional flip): cell orientation carries no meaning."""
    views = []
    for flip in (False, True):
        base = torch.flip(batch, dims=[3]) if flip else batch
        for k in range(4):
            views.append(torch.rot90(base, k, dims=[2, 3]))
    return views


class CellPredictor:
    """Ray Data callable class: uint8 NHWC ``image`` batches in, logits and probabilities out.

    Output columns (added to the input columns, ``image`` removed):
    ``logits`` (N x classes, float32, raw model output averaged over the TTA
    views, before any temperature), ``probs`` (N x classes, float32,
    ``softmax(logits / temperature)``), ``predicted_label`` (int16),
    ``predicted_class`` (str) and ``confidence`` (max probability),
    ``ood_score`` (float32, NaN when the checkpoint has no OOD reference) and
    ``unidentified`` (``ood_score`` above the reference's threshold).
    Rows whose ``error`` column is non-empty are passed through with NaN
    logits and probabilities, so callers can route them to the errors table.
    ``return_features=True`` adds the raw OOD features ``ood_pen`` and
    ``ood_early`` (what :func:`bloodray.ood.fit_ood` fits on).
    The OOD reference in use is the checkpoint's for the chosen arithmetic
    (:meth:`bloodray.ood.OodReference.for_precision`).
    ``unchecked_precision=True`` runs an explicitly asked ``precision``
    without the self-check (fitting references per arithmetic before the
    checkpoint is sealed; never for classifying).
    """

    def __init__(self, checkpoint: str | None = None, storage_options: Mapping[str, Any] | None = None,
                 device: str = "auto", tta: bool = False, loaded: LoadedCheckpoint | None = None,
                 micro_batch: int | None = None, return_features: bool = False, precision: str = "auto",
                 self_check_tolerance: float = PROB_TOLERANCE, runtime: str = "torch",
                 unchecked_precision: bool = False):
        if runtime not in RUNTIMES:
            raise ValueError(f"runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
        self.device = pick_device(device)
        self.loaded = loaded or load_checkpoint(checkpoint, storage_options, device=self.device)
        self.model = self.loaded.model.to(self.device).eval()
        self.meta = self.loaded.metadata
        self.preset = self.meta.preset()
        self.classes = np.array(self.meta.classes, dtype=object)
        self.tta = tta
        self.unchecked_precision = unchecked_precision
        self.channels_last = False
        self.autocast: Any = contextlib.nullcontext()
        #: the module that runs batches (on CPU: BatchNorm folded into the convolutions).
        self.forward_model = self.model
        #: images per forward pass (None: the whole batch at once); None here: sized for each precision.
        self.micro_batch = micro_batch
        self._fixed_micro_batch = micro_batch
        if self.device.type == "cpu":
            cpus = ray_assigned_cpus()
            if cpus:
                # One intra-op thread per CPU of this actor: more only oversubscribe the node.
                torch.set_num_threads(max(1, math.floor(cpus)))
            self.forward_model = fold_batchnorm(self.model)
        #: the precision in use (``fp32``, ``bf16``) and why faster ones were refused (path -> reason).
        self.precision = "fp32"
        self.refused: dict[str, str] = {}
        #: the runtime of the forward pass (``torch``, or ``openvino`` where asked for and it passed).
        self.runtime = "torch"
        self._openvino: Any = None
        #: the OOD reference (None: no ood_score unless features are asked for).
        self.ood = self.loaded.ood
        self.return_features = return_features
        self._features = None
        self.tap: FeatureTap | None = None
        if self.ood is not None or return_features:
            early = ((self.ood.early_layer, self.ood.early_call) if self.ood is not None
                     else early_layer(self.model, self.preset.input_size))
            self._features = (get_model_info(self.meta.model_name).head_paths[0], *early)
        if runtime == "openvino" and self.device.type == "cpu":
            self._choose_precision(precision, self_check_tolerance, storage_options, runtime="openvino")
        elif runtime == "openvino":
            log.info("runtime openvino is for CPUs; %s runs torch", self.device)
        if self.runtime == "torch":
            self._choose_precision(precision, self_check_tolerance, storage_options)
        if self.ood is not None:
            # The reference of the arithmetic chosen above: bf16 rounding raises the score of every cell
            # (bloodray.ood), so an fp32 reference would put bf16 cells of the training lab above it. Load time
            # only: the per-image score is the same function.
            self.ood = self.ood.for_precision(self.precision)
            if self.ood.precision != self.precision and not self.unchecked_precision:
                log.warning("checkpoint %s: its OOD reference was fitted in %s, this predictor runs %s; the "
                            "unidentified threshold and the domain-shift reference may not match its scores "
                            "(refit: %s)", self.loaded.uri or "(in memory)", self.ood.precision, self.precision,
                            REFIT_COMMAND.format(checkpoint=self.loaded.uri or "<checkpoint>"))
        if self._features is not None:
            # On OpenVINO the hooks never fire: the features come out of its model into the same tap.
            self.tap = FeatureTap(self.forward_model, *self._features)

    def _use_openvino(self, precision: str) -> None:
        """Set the forward path up for ``precision`` in OpenVINO (ValueError/ImportError etc. when it cannot)."""
        from bloodray.openvino_runtime import OpenVinoForward

        self._openvino = None  # a failed conversion must not leave the previous precision's model in use
        features = self._features or (get_model_info(self.meta.model_name).head_paths[0],
                                      *early_layer(self.model, self.preset.input_size))
        self._openvino = OpenVinoForward(self.model, self.preset.input_size, precision, torch.get_num_threads(),
                                         features)
        self.channels_last, self.autocast = False, contextlib.nullcontext()
        if self._fixed_micro_batch is None:
            self.micro_batch = OPENVINO_MICRO_BATCH
        self.precision = precision

    def _use(self, precision: str) -> None:
        """Set the forward path up for ``precision`` (autocast, memory format, micro-batch)."""
        bf16 = precision == "bf16"
        on_gpu = self.device.type == "cuda"
        # channels_last is what oneDNN's bf16 kernels and cuDNN want; fp32 on CPU is faster without it.
        self.channels_last = bf16 or on_gpu
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        self.forward_model = self.forward_model.to(memory_format=fmt)
        self.autocast = (torch.autocast(self.device.type, dtype=torch.bfloat16) if bf16
                         else contextlib.nullcontext())
        if self.device.type == "cpu" and self._fixed_micro_batch is None:
            self.micro_batch = cpu_micro_batch(self.forward_model, self.preset.input_size,
                                               autocast=self.autocast, channels_last=self.channels_last)
        self.precision = precision

    def _choose_precision(self, requested: str, tolerance: float, storage_options: Mapping[str, Any] | None,
                          runtime: str = "torch") -> None:
        """The fastest of ``requested``'s paths that passes the checkpoint's self-check (module docstring).
        ``runtime="openvino"``: its fp32 and bf16 only; when none passes (or it cannot run), ``self.runtime`` stays
        ``torch`` and the caller tries torch's paths."""
        paths = candidates(requested, self.device)
        if self.unchecked_precision and requested != "auto":
            # Fitting an OOD reference per arithmetic on a checkpoint not yet sealed (calibrate): the features of
            # the asked path are what is measured, whether or not a self-check could vouch for its class calls.
            self._use(paths[0])
            return
        check = load_selfcheck(self.loaded.uri, self.meta, storage_options) if self.loaded.uri else None
        if check is None:
            if paths != ["fp32"]:
                log.info("precision %s: checkpoint %s has no self-check batch, so only fp32 is trusted",
                         requested, self.loaded.uri or "(in memory)")
            paths = ["fp32"]
        if runtime == "openvino":
            self._choose_openvino(paths, check, tolerance)
            return
        for i, path in enumerate(paths):
            self._use(path)
            if check is None:
                return
            reason = self._self_check(check, tolerance)
            if reason is None:
                log.info("precision %s on %s: self-check passed (%d reference cells)", path, self.device,
                         len(check.images))
                return
            self.refused[path] = reason
            if i + 1 < len(paths):
                log.warning("precision %s on %s failed the self-check (%s); falling back to %s", path, self.device,
                            reason, paths[i + 1])
        # Even fp32 disagrees with the sealed logits: another library build or a damaged model. fp32 stays the
        # reference arithmetic, so it is used, loudly.
        log.error("precision fp32 on %s failed the checkpoint's self-check (%s); running fp32 anyway",
                  self.device, self.refused.get("fp32"))

    def _self_check(self, check, tolerance: float) -> str | None:
        """Why the current forward path fails the sealed self-check batch (None: it passes); TTA off for it."""
        tta, self.tta = self.tta, False
        try:
            return compare(self.logits(check.images).cpu().numpy(), check.logits, self.temperature, tolerance)
        finally:
            self.tta = tta

    def _choose_openvino(self, paths: list[str], check, tolerance: float) -> None:
        for path in paths:
            try:
                self._use_openvino(path)
            except Exception as exc:  # noqa: BLE001 - not installed, or a model it cannot convert: torch runs
                log.warning("runtime openvino: cannot run the model in %s (%s: %s); using torch", path,
                            type(exc).__name__, exc)
                return
            reason = None if check is None else self._self_check(check, tolerance)
            if reason is None:
                log.info("runtime openvino, precision %s: self-check %s", path,
                         "passed" if check is not None else "absent (fp32 only)")
                self.runtime = "openvino"
                return
            self.refused[f"openvino {path}"] = reason
            log.warning("runtime openvino, precision %s failed the self-check (%s)", path, reason)
        self._openvino = None
        log.warning("runtime openvino: no precision passed the self-check; using torch")

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        step = self.micro_batch or len(x)
        if self._openvino is not None:
            return torch.cat([self._openvino(x[i:i + step], self.tap) for i in range(0, len(x), step)])
        if len(x) <= step:
            return self.forward_model(x).float()
        return torch.cat([self.forward_model(x[i:i + step]).float() for i in range(0, len(x), step)])

    @torch.inference_mode()
    def logits(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Raw (uncalibrated) logits for a uint8 NHWC batch (numpy, or a tensor on any device); TTA averages views."""
        x = self.preset.normalize(images, device=self.device, channels_last=self.channels_last)
        with self.autocast:
            if self.tta:
                out = torch.stack([self._forward(v) for v in tta_views(x)]).mean(0)
            else:
                out = self._forward(x)
        return out

    @property
    def temperature(self) -> float:
        """The checkpoint's calibrated temperature (1.0 when it was never calibrated)."""
        return float(self.meta.temperature or 1.0)

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        """Temperature-calibrated softmax probabilities (float32, N x classes)."""
        return self._calibrated(self.logits(images))

    def _calibrated(self, logits: torch.Tensor) -> np.ndarray:
        return torch.softmax(logits / self.temperature, dim=1).cpu().numpy().astype(np.float32)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images = batch["image"]
        n = len(images)
        ok = np.ones(n, dtype=bool)
        if "error" in batch:
            # Truth value of each entry ("" and None: no error), without a Python loop.
            ok = ~np.asarray(batch["error"], dtype=object).astype(bool)
        logits = np.full((n, len(self.classes)), np.nan, dtype=np.float32)
        probs = np.full((n, len(self.classes)), np.nan, dtype=np.float32)
        ood_score = np.full(n, np.nan, dtype=np.float32)
        features = None
        if ok.any():
            if isinstance(images, torch.Tensor):  # decoded on the device (bloodray.data.device_decode)
                raw = self.logits(images[torch.from_numpy(ok).to(images.device)])
            else:
                raw = self.logits(np.ascontiguousarray(images[ok]))
            logits[ok] = raw.cpu().numpy().astype(np.float32)
            probs[ok] = self._calibrated(raw)
            if self.tap is not None:
                features = self.tap.take(views=8 if self.tta else 1)
                if self.ood is not None:
                    ood_score[ok] = self.ood.score(*features)
        labels = np.where(ok, np.nan_to_num(probs, nan=-1.0).argmax(axis=1), -1).astype(np.int16)
        out = {k: v for k, v in batch.items() if k != "image"}
        out["logits"] = logits
        out["probs"] = probs
        out["predicted_label"] = labels
        out["predicted_class"] = np.where(ok, self.classes[np.clip(labels, 0, None)], "").astype(object)
        out["confidence"] = np.where(ok, np.nan_to_num(probs, nan=0.0).max(axis=1), np.nan).astype(np.float32)
        out["ood_score"] = ood_score
        out["unidentified"] = (ood_score > self.ood.threshold) if self.ood is not None else np.zeros(n, dtype=bool)
        if self.return_features:
            for name, j in (("ood_pen", 0), ("ood_early", 1)):
                width = features[j].shape[1] if features is not None else 0
                column = np.full((n, width), np.nan, dtype=np.float32)
                if features is not None:
                    column[ok] = features[j]
                out[name] = column
        return out
