"""What a training run needs to continue from a checkpoint it wrote itself (weights, history, optimizer state)."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors

from bloodray.checkpoint import (METADATA_FILE, TRAIN_STATE_FILE, WEIGHTS_FILE, CheckpointError, CheckpointMetadata,
                                 check_weights)


@dataclass
class ResumeState:
    """What a training worker needs to continue from a checkpoint it wrote itself."""

    weights: dict[str, torch.Tensor]
    history: list[dict[str, Any]]
    train_state: dict[str, Any] | None


def load_resume_state(directory: str | Path) -> ResumeState:
    """Weights, metric history and optimizer state of a local checkpoint directory (a Ray Train checkpoint).

    The metadata's seal and the weights hash are checked as for loading; a format-1 checkpoint of the same run
    (written before the upgrade) is accepted when its weights hash matches, and the next checkpoint is sealed.
    """
    directory = Path(directory)
    where = str(directory)
    try:
        text = (directory / METADATA_FILE).read_text()
        blob = (directory / WEIGHTS_FILE).read_bytes()
    except OSError as exc:
        raise CheckpointError(f"{where}: cannot read checkpoint ({exc.strerror or exc})") from exc
    meta = CheckpointMetadata.from_json(text, where, legacy=True)
    check_weights(blob, meta, where)
    try:
        weights = load_safetensors(blob)
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(f"{where}: {WEIGHTS_FILE} is not a valid safetensors file ({exc})") from exc
    return ResumeState(weights=weights, history=list(meta.history), train_state=load_train_state(directory))


def load_train_state(directory: str | Path) -> dict[str, Any] | None:
    """Optimizer/scheduler/epoch state of a local training checkpoint, if any."""
    path = Path(directory) / TRAIN_STATE_FILE
    if not path.exists():
        return None
    with path.open("rb") as fh:
        return torch.load(io.BytesIO(fh.read()), map_location="cpu", weights_only=True)
