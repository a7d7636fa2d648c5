"""The layout of a training run directory: the one module that knows its file and folder names.

A run directory (local or S3) holds::

    config.yaml            the final training config (saved before any work)
    data_report.json       what the listing kept, dropped as duplicates, and could not read
    split.parquet          the split manifest: uri, label, sha256, split (the run's identity)
    summary.json           the outcome, written last
    checkpoint_epochNNNN/  Ray Train checkpoints (the files inside belong to :mod:`bloodray.checkpoint`)
    calibrated/            the best checkpoint with its calibration, written by ``bloodray calibrate``
    eval/<split>/          evaluation outputs

Trainers, evaluation, calibration and comparison find these through the functions here, never by literal name.
"""

from __future__ import annotations

from bloodray import storage

SPLIT_MANIFEST = "split.parquet"
DATA_REPORT = "data_report.json"
RUN_CONFIG = "config.yaml"
SUMMARY = "summary.json"
CALIBRATED_DIR = "calibrated"
EVAL_DIR = "eval"
CHECKPOINT_PREFIX = "checkpoint_"
#: fnmatch pattern of the checkpoint folders of a run (relative to the run directory).
CHECKPOINT_GLOB = CHECKPOINT_PREFIX + "*"


def checkpoint_dir_name(epoch: int) -> str:
    """Folder name of the checkpoint reported after ``epoch`` epochs (1-based), sortable by name."""
    return f"{CHECKPOINT_PREFIX}epoch{epoch:04d}"


def split_manifest(run_uri: str) -> str:
    return storage.join(run_uri, SPLIT_MANIFEST)


def data_report(run_uri: str) -> str:
    return storage.join(run_uri, DATA_REPORT)


def run_config(run_uri: str) -> str:
    return storage.join(run_uri, RUN_CONFIG)


def summary(run_uri: str) -> str:
    return storage.join(run_uri, SUMMARY)


def calibrated_dir(run_uri: str) -> str:
    return storage.join(run_uri, CALIBRATED_DIR)


def eval_dir(run_uri: str, split: str) -> str:
    return storage.join(run_uri, EVAL_DIR, split)


def checkpoint_dir(run_uri: str, epoch: int) -> str:
    return storage.join(run_uri, checkpoint_dir_name(epoch))
