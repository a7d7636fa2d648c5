"""What a training run needs to continue from a checkpoint it wrote itself (weights, history, optimizer state)."""

from __future__ import annotations

import io
import shutil
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


#: The folder, in a pack run's output, that holds its latest epoch's weights and training state.
PACK_RESUME_DIR = "last_epoch"


def save_pack_state(output: str | Path, model: torch.nn.Module, metadata: CheckpointMetadata,
                    train_state: dict[str, Any]) -> None:
    """Write the pack trainer's resume state into ``output`` (replacing the previous epoch's, never half-written).

    It is a sealed checkpoint of the raw weights with ``train_state``; a kill between the two renames leaves the
    new state complete in its temporary folder, which :func:`load_pack_state` reads then.
    """
    from bloodray.checkpoint import write_checkpoint

    out = Path(output)
    final, fresh = out / PACK_RESUME_DIR, out / f"{PACK_RESUME_DIR}.tmp"
    if fresh.exists():
        shutil.rmtree(fresh)
    write_checkpoint(fresh, model, metadata, train_state)
    if final.exists():
        shutil.rmtree(final)
    fresh.rename(final)


def load_pack_state(output: str | Path) -> ResumeState | None:
    """The resume state :func:`save_pack_state` left in ``output``, or None when there is none."""
    out = Path(output)
    for folder in (out / PACK_RESUME_DIR, out / f"{PACK_RESUME_DIR}.tmp"):
        if (folder / TRAIN_STATE_FILE).exists():
            try:
                state = load_resume_state(folder)
            except (CheckpointError, RuntimeError, EOFError):
                continue  # a state cut short by a kill: the other folder (or a fresh start) it is
            if state.train_state is not None:
                return state
    return None
