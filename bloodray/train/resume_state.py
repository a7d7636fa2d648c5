"""What a training run needs to continue from a checkpoint it wrote itself (weights, history, optimizer state)."""

from __future__ import annotations

import io
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors

from bloodray.config import ConfigError
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


def save_pack_run(output: str | Path, key: str, state: Any, generator: torch.Generator, robust_rng: Any,
                  progress: dict[str, Any], best_state: dict[str, torch.Tensor] | None, model_name: str,
                  model_kwargs: dict[str, Any], preset: Any) -> None:
    """Save everything the pack trainer's next epoch depends on: raw weights, optimizer, schedule and average
    (``state``), the data-order and augmentation generators, torch's global generators (dropout), the loop's
    counters and history (``progress``) and the best weights so far; ``key`` names the run (pack, model...)."""
    from bloodray.classes import CLASS_NAMES

    metadata = CheckpointMetadata(model_name, list(CLASS_NAMES), preset.input_size, list(preset.mean),
                                  list(preset.std), model_kwargs, progress["epoch"],
                                  stain_norm=preset.stain.to_metadata() if preset.stain else {})
    on_gpu = generator.device.type == "cuda"
    save_pack_state(output, state.model, metadata, {
        **state.state_dict(), "key": key, "generator": generator.get_state(),
        "robust_rng": json.dumps(robust_rng.bit_generator.state), "best_state": best_state,
        "torch_rng": torch.get_rng_state(), "cuda_rng": torch.cuda.get_rng_state(generator.device) if on_gpu else None,
        "progress": json.dumps(progress, default=float)})


def restore_pack_run(output: str | Path, key: str, state: Any, generator: torch.Generator, robust_rng: Any,
                     planned_epochs: int) -> tuple[dict[str, Any], dict[str, torch.Tensor] | None]:
    """Load what :func:`save_pack_run` saved in ``output`` into ``state`` and the generators.

    Returns the loop's ``progress`` (epoch 0 and empty history for a fresh run) and the best weights so far.
    Refuses another run's state. A schedule a time budget shortened stays shortened unless the epochs changed.
    """
    resumed = load_pack_state(output)
    if resumed is None:
        return {"epoch": 0, "history": [], "best": {"macro_f1": -1.0}, "trained_images": 0, "steady_time": 0.0,
                "train_time": 0.0, "stopped_early": False}, None
    saved = resumed.train_state
    if saved.get("key") != key:
        raise ConfigError(f"output: {output} holds the resume state of another run (other pack, model, batch size "
                          f"or seed); choose another output folder, or delete {Path(output) / PACK_RESUME_DIR} to "
                          "start over")
    state.model.load_state_dict(resumed.weights)
    state.load_state_dict(saved)
    generator.set_state(saved["generator"])
    robust_rng.bit_generator.state = json.loads(saved["robust_rng"])
    torch.set_rng_state(saved["torch_rng"])
    if generator.device.type == "cuda" and saved.get("cuda_rng") is not None:
        torch.cuda.set_rng_state(saved["cuda_rng"], generator.device)
    progress = json.loads(saved["progress"])
    if progress.pop("planned_epochs") == planned_epochs:
        state.schedule.epochs = progress["schedule_epochs"]
    progress.pop("schedule_epochs")
    return progress, saved.get("best_state")
