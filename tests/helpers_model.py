"""Test fixture helper: a quickly trained BloodNet checkpoint for synthetic cells.

This is *not* a product training path -- it stands in for
``bloodray.train.ray_trainer.run_training`` in tests that need a model which really
separates synthetic cells (e.g. "predicted differentials match the known
counts"). It trains in-process with a plain torch loop on a small
:func:`bloodray.data.synth.write_labelled_dataset` folder and writes the result with
:func:`bloodray.checkpoint.write_checkpoint`, so the checkpoint is exactly what
the real trainer would produce as far as inference is concerned. Swap the body
for a call to the real trainer once it exists.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from bloodray import quality_gate
from bloodray.data import synth as synth
from bloodray.evaluation.calibration import calibrate
from bloodray.checkpoint import CheckpointMetadata, write_checkpoint
from bloodray.classes import CLASS_NAMES, CLASS_TO_INDEX
from bloodray.data.labelled import list_labelled_images
from bloodray.models import create_model
from bloodray.data.preset import EvalPreset

MEAN = [0.5, 0.5, 0.5]
#: A narrower BloodNet than the paper's (32..256 filters): trains in seconds on 2 CPU cores.
SMALL_FILTERS = (16, 24, 32, 32, 48, 64, 64)
STD = [0.5, 0.5, 0.5]


def _load_images(root: Path, preset: EvalPreset) -> tuple[np.ndarray, np.ndarray]:
    rows = list_labelled_images(str(root))
    images = np.stack([preset.load(Path(uri).read_bytes()) for uri, _ in rows])
    labels = np.array([CLASS_TO_INDEX[name] for _, name in rows], dtype=np.int64)
    return images, labels


@torch.no_grad()
def _recalibrate_batch_norm(model: nn.Module, images: np.ndarray, preset: EvalPreset) -> None:
    """Recompute BatchNorm statistics with the final weights, then switch to eval mode.

    After a few epochs the running averages still lag behind the weights, so
    eval-mode accuracy can be far below training accuracy; exact averages over
    the (un-augmented) training images close that gap.
    """
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None  # cumulative average over all batches below
    model.train()
    for start in range(0, len(images), 64):
        model(preset.normalize(images[start:start + 64]))
    model.eval()


def _val_calibration(model: nn.Module, directory: Path, preset: EvalPreset, size: int, seed: int) -> dict:
    """What ``bloodray calibrate`` measures on val, on held-out synthetic cells: the val metrics and the quality
    gate's record (forced when the model misses it, so a test that needs a weak model must opt out of the gate).

    The checkpoint keeps temperature 1 and no review threshold of its own, as before the gate existed, so the
    tests' expectations on confidences and review counts do not move.
    """
    val_dir = directory.parent / f"{directory.name}-val-images"
    synth.write_labelled_dataset(str(val_dir), 10, size=size, seed=seed + 1000)
    images, labels = _load_images(val_dir, preset)
    model.eval()
    with torch.no_grad():
        logits = model(preset.normalize(images)).numpy()
    report = calibrate(logits, labels).to_dict()
    return report | {"gate": quality_gate.record(report, forced=True)}


def train_quick_checkpoint(directory: str | Path, *, per_class: int = 60, size: int = 64,
                           epochs: int = 20, seed: int = 0, time_budget_s: float | None = None) -> str:
    """Train BloodNet on synthetic cells for a few epochs; returns the checkpoint dir.

    Training images use ``synth``'s labelled-dataset stream, so they differ from
    the images :func:`bloodray.data.synth.write_archive` renders for the same seed.
    Stops early once training accuracy is ~perfect (or ``time_budget_s`` is
    spent, when given: that makes the result depend on machine load). Seals the val metrics of a
    calibration on held-out synthetic cells (:func:`_val_calibration`), so a well-trained one passes
    ``classify``'s quality gate as a calibrated checkpoint would.
    """
    directory = Path(directory)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    threads = torch.get_num_threads()
    # One thread: on a shared 2-core machine more threads thrash (measured 10x slower).
    torch.set_num_threads(1)
    try:
        data_dir = directory.parent / f"{directory.name}-train-images"
        synth.write_labelled_dataset(str(data_dir), per_class, size=size, seed=seed)
        preset = EvalPreset(size, tuple(MEAN), tuple(STD))
        images, labels = _load_images(data_dir, preset)
        # BatchNorm makes this tiny from-scratch run converge in seconds.
        kwargs = {"input_size": size, "batch_norm": True, "dropout": 0.1,
                  "filters": list(SMALL_FILTERS), "hidden": 64}
        model = create_model("bloodnet", len(CLASS_NAMES), **kwargs)
        opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
        loss_fn = nn.CrossEntropyLoss()
        started = time.monotonic()
        acc = 0.0
        for _epoch in range(epochs):
            model.train()
            order = rng.permutation(len(labels))
            correct = 0
            for start in range(0, len(order), 32):
                idx = order[start:start + 32]
                batch = images[idx]
                # Orientation carries no meaning for a cell: random 90-degree turns.
                batch = np.rot90(batch, int(rng.integers(0, 4)), axes=(1, 2))
                x = preset.normalize(np.ascontiguousarray(batch))
                y = torch.as_tensor(labels[idx])
                opt.zero_grad()
                out = model(x)
                loss = loss_fn(out, y)
                loss.backward()
                opt.step()
                correct += int((out.argmax(1) == y).sum())
            acc = correct / len(labels)
            if acc > 0.99 or (time_budget_s is not None and time.monotonic() - started > time_budget_s):
                break
        _recalibrate_batch_norm(model, images, preset)
        meta = CheckpointMetadata(model_name="bloodnet", classes=list(CLASS_NAMES), input_size=size,
                                  mean=MEAN, std=STD, model_kwargs=kwargs, epoch=_epoch + 1,
                                  metrics={"train_accuracy": acc},
                                  calibration=_val_calibration(model, directory, preset, size, seed))
        write_checkpoint(directory, model, meta)
        return str(directory)
    finally:
        torch.set_num_threads(threads)
