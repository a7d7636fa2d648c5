"""On a real cluster: several nodes, killed workers and actors, S3 outages, no secrets in outputs.

Everything here is real: Ray nodes are separate raylets (``ray.cluster_utils.Cluster``),
processes are killed with SIGKILL, and the S3 outage stops a real moto server.
Kept tiny (48 px cells, a few dozen images, a few epochs) for a 2-core machine.

The multi-node test stops the session's Ray (``ray_cluster``) and starts it
again afterwards, so it is the last test of this module.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from bloodray import outputs, storage, synth
from bloodray.checkpoint import read_metadata
from bloodray.classify import ClassifyConfig, run_classification
from bloodray.config import load_config
from bloodray.train import load_train_config, run_training

pytestmark = pytest.mark.slow

SIZE = 48
DATE = "2024-05-01"
FAKE_KEY_ID = "AKIABLOODRAYTESTKEY1"
FAKE_SECRET = "bloodray-test-secret-do-not-log"


# ----------------------------------------------------------------------------- helpers


def _train_config(data_root: str, storage_path: str, name: str, endpoint: str | None = None, **extra):
    values = {
        "data.root": data_root,
        "model.name": "bloodnet",
        "model.input_size": SIZE,
        "model.kwargs.batch_norm": "true",
        "train.epochs": 2,
        "train.batch_size": 8,
        "train.lr": 0.002,
        "train.evaluate_test": "false",
        "scaling.num_workers": 2,
        "run.name": name,
        "run.storage_path": storage_path,
        "run.keep_checkpoints": 10,
    } | extra
    if endpoint:
        values["storage.endpoint_url"] = endpoint
    return load_train_config("configs/train/bloodnet.yaml", [f"{k}={v}" for k, v in values.items()])


def _classify_config(archive: str, out: str, checkpoint: str, endpoint: str | None = None, *extra: str):
    overrides = [f"input.uri={archive}", f"output.uri={out}", f"model.checkpoint={checkpoint}",
                 "inference.batch_size=8", f"run.date={DATE}"]
    if endpoint:
        overrides.append(f"storage.endpoint_url={endpoint}")
    return load_config(ClassifyConfig, None, overrides + list(extra))


def _alive_actors(name_part: str) -> list[dict]:
    """Alive actors whose class name contains ``name_part``, straight from the GCS actor table."""
    import ray

    return [a for a in ray._private.state.actors().values()
            if name_part in a["ActorClassName"] and a["State"] == "ALIVE"]


def _all_actors(name_part: str) -> list[dict]:
    import ray

    return [a for a in ray._private.state.actors().values() if name_part in a["ActorClassName"]]


class Killer(threading.Thread):
    """Background thread: once ``ready()`` is true, SIGKILL one alive actor of a class (once)."""

    def __init__(self, name_part: str, ready, timeout: float = 300.0):
        super().__init__(daemon=True)
        self.name_part, self.ready, self.timeout = name_part, ready, timeout
        self.killed: dict | None = None
        self.error: BaseException | None = None
        self._stop_event = threading.Event()

    def run(self) -> None:
        deadline = time.monotonic() + self.timeout
        try:
            while not self._stop_event.is_set() and time.monotonic() < deadline:
                if self.ready():
                    actors = _alive_actors(self.name_part)
                    if actors:
                        victim = actors[0]
                        os.kill(victim["Pid"], signal.SIGKILL)
                        self.killed = victim
                        return
                time.sleep(0.1)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc

    def stop(self) -> None:
        self._stop_event.set()
        self.join(10)


def _seen(out: str, so: dict | None = None) -> Counter:
    preds = outputs.read_table(out, "predictions", so)
    errors = outputs.read_table(out, "errors", so)
    return Counter(preds.column("image_uri").to_pylist() + errors.column("image_uri").to_pylist())


def _predicted(out: str, so: dict | None = None) -> dict[str, str]:
    preds = outputs.read_table(out, "predictions", so)
    return dict(zip(preds.column("image_uri").to_pylist(), preds.column("predicted_class").to_pylist()))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def cells(tmp_path_factory):
    """A few dozen labelled 48 px cells (6 per class), local."""
    root = tmp_path_factory.mktemp("cells") / "cells"
    synth.write_labelled_dataset(str(root), 6, size=SIZE, seed=11)
    return str(root)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A quickly trained (in-process, no Ray) checkpoint at 48 px for the classification tests."""
    from helpers_model import train_quick_checkpoint

    return train_quick_checkpoint(tmp_path_factory.mktemp("model") / "checkpoint", per_class=12, size=SIZE,
                                  epochs=4)


# ----------------------------------------------------------------------------- 2. training worker killed


def test_training_survives_a_killed_worker(tmp_path, cells, ray_cluster):
    cfg = _train_config(cells, str(tmp_path / "runs"), "killed", **{"train.epochs": 4, "run.max_failures": 2})
    run_dir = tmp_path / "runs" / "killed"
    first_epoch: dict = {}

    def epoch_one_done() -> bool:
        meta = run_dir / "checkpoint_epoch0001" / "bloodray.json"
        if not meta.exists():
            return False
        try:
            first_epoch.update(json.loads(meta.read_text())["history"][0])
        except (ValueError, KeyError, IndexError):
            return False  # still being written
        time.sleep(0.5)  # let Ray register the reported checkpoint
        return not (run_dir / "checkpoint_epoch0003").exists()

    killer = Killer("RayTrainWorker", epoch_one_done)
    killer.start()
    try:
        result = run_training(cfg)
    finally:
        killer.stop()
    assert killer.error is None, killer.error
    assert killer.killed is not None, "no training worker was killed"
    # The kill happened mid-run: the run went on to its last epoch.
    latest = read_metadata(str(run_dir / "checkpoint_epoch0004"))
    assert [h["epoch"] for h in latest.history] == [1, 2, 3, 4]
    # Epoch 1 was not trained again after the restart: its record is the original one.
    assert latest.history[0] == first_epoch
    assert result.best_checkpoint.startswith(str(run_dir / "checkpoint_epoch"))
    # A new worker group was started after the failure.
    workers = _all_actors("RayTrainWorker")
    assert killer.killed["Pid"] not in {a["Pid"] for a in workers if a["State"] == "ALIVE"}


# ----------------------------------------------------------------------------- 3. inference actor killed


def test_classification_survives_a_killed_inference_actor(tmp_path, checkpoint, ray_cluster):
    day = tmp_path / "archive" / DATE
    images = synth.write_archive(str(day), synth.default_samples(4, 30, seed=21), size=SIZE, seed=21)
    out = str(tmp_path / "out")
    staged = tmp_path / "out" / "_staging"

    # Killed as soon as it is alive: before it could have handled every batch of the run.
    killer = Killer("CellPredictor", lambda: not any(staged.glob("*/predictions/*.parquet")))
    killer.start()
    try:
        result = run_classification(_classify_config(str(tmp_path / "archive"), out, checkpoint))
    finally:
        killer.stop()
    assert killer.error is None, killer.error
    seen = _seen(out)
    assert max(seen.values()) == 1
    assert set(seen) == {r["uri"] for r in images}
    assert (result.n_predictions, result.n_errors, result.n_samples) == (len(images), 0, 4)
    assert outputs.visible_runs(out).column("run_id").to_pylist() == [result.run_id]
    assert killer.killed is not None, "no inference actor was killed"
