"""Batch inference with a trained checkpoint: the Ray Data predictor class.

:class:`CellPredictor` loads the model once per actor (``from_checkpoint``
semantics: in ``__init__``) and then maps ``dict[str, np.ndarray]`` batches of
preprocessed uint8 images to calibrated class probabilities. Evaluation and the
nightly classification job both use it, so they cannot disagree.
"""

from __future__ import annotations

import contextlib
from typing import Any, Mapping

import numpy as np
import torch

from .checkpoint import LoadedCheckpoint, load_checkpoint


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
    """Ray Data callable class: uint8 NHWC ``image`` batches in, probabilities out.

    Output columns (added to the input columns, ``image`` removed):
    ``probs`` (N x classes, float32, temperature-calibrated), ``predicted_label``
    (int16), ``predicted_class`` (str) and ``confidence`` (max probability).
    Rows whose ``error`` column is non-empty are passed through with NaN
    probabilities, so callers can route them to the errors table.
    """

    def __init__(self, checkpoint: str | None = None, storage_options: Mapping[str, Any] | None = None,
                 device: str = "auto", tta: bool = False, loaded: LoadedCheckpoint | None = None):
        self.device = pick_device(device)
        self.loaded = loaded or load_checkpoint(checkpoint, storage_options, device=self.device)
        self.model = self.loaded.model.to(self.device).eval()
        self.meta = self.loaded.metadata
        self.preset = self.meta.preset()
        self.classes = np.array(self.meta.classes, dtype=object)
        self.tta = tta
        on_gpu = self.device.type == "cuda"
        self.channels_last = on_gpu
        if on_gpu:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if on_gpu else contextlib.nullcontext())

    @torch.inference_mode()
    def logits(self, images: np.ndarray) -> torch.Tensor:
        """Raw (uncalibrated) logits for a uint8 NHWC batch; averaged over views with TTA."""
        x = self.preset.normalize(images, device=self.device, channels_last=self.channels_last)
        with self.autocast:
            if self.tta:
                out = torch.stack([self.model(v).float() for v in tta_views(x)]).mean(0)
            else:
                out = self.model(x).float()
        return out

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        """Temperature-calibrated softmax probabilities (float32, N x classes)."""
        logits = self.logits(images) / float(self.meta.temperature or 1.0)
        return torch.softmax(logits, dim=1).cpu().numpy().astype(np.float32)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images = batch["image"]
        n = len(images)
        ok = np.ones(n, dtype=bool)
        if "error" in batch:
            ok = np.array([not e for e in batch["error"]], dtype=bool)
        probs = np.full((n, len(self.classes)), np.nan, dtype=np.float32)
        if ok.any():
            probs[ok] = self.probabilities(np.ascontiguousarray(images[ok]))
        labels = np.where(ok, np.nan_to_num(probs, nan=-1.0).argmax(axis=1), -1).astype(np.int16)
        out = {k: v for k, v in batch.items() if k != "image"}
        out["probs"] = probs
        out["predicted_label"] = labels
        out["predicted_class"] = np.where(ok, self.classes[np.clip(labels, 0, None)], "").astype(object)
        out["confidence"] = np.where(ok, np.nan_to_num(probs, nan=0.0).max(axis=1), np.nan).astype(np.float32)
        return out
