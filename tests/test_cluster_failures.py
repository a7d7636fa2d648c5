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
import uuid
from collections import Counter

import numpy as np
import pytest

from bloodray import outputs, storage, synth
from bloodray.checkpoint import read_metadata
from bloodray.classes import CLASS_NAMES
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


def test_training_survives_a_killed_worker(tmp_path, cells, ray_cluster, capfd):
    epochs = 10
    cfg = _train_config(cells, str(tmp_path / "runs"), "killed", **{"train.epochs": epochs, "run.max_failures": 2})
    run_dir = tmp_path / "runs" / "killed"
    last = f"checkpoint_epoch{epochs:04d}"
    first_epoch: dict = {}

    def mid_run() -> bool:
        # A reported checkpoint counts once Ray Train's controller has registered it (it then rewrites
        # its snapshot); a worker killed before that restarts from the previous one. Kill once epoch 1's
        # checkpoint is registered, while later epochs are still to come.
        snapshot = run_dir / "checkpoint_manager_snapshot.json"
        try:
            registered = snapshot.read_text()
            first_epoch.update(json.loads((run_dir / "checkpoint_epoch0001" / "bloodray.json").read_text())["history"][0])
        except (ValueError, KeyError, IndexError, OSError):
            return False  # not there yet, or still being written
        return "checkpoint_epoch0001" in registered and not (run_dir / last).exists()

    killer = Killer("RayTrainWorker", mid_run)
    killer.start()
    try:
        result = run_training(cfg)
    finally:
        killer.stop()
    assert killer.error is None, killer.error
    assert killer.killed is not None, "no training worker was killed"
    lines = [line for line in capfd.readouterr().out.splitlines() if "[bloodray]" in line]
    assert any("resuming killed from the checkpoint of epoch" in line for line in lines), lines
    # The kill happened mid-run: the run went on to its last epoch.
    latest = read_metadata(str(run_dir / last))
    assert [h["epoch"] for h in latest.history] == list(range(1, epochs + 1))
    # Epoch 1 was not trained again after the restart: its record is the original one.
    assert latest.history[0] == first_epoch
    assert result.best_checkpoint.startswith(str(run_dir / "checkpoint_epoch"))


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


# ----------------------------------------------------------------------------- 4. S3 outage


class _OutageServer:
    """A moto S3 server of this test's own that can go away and come back on the same port."""

    def __init__(self):
        from moto.server import ThreadedMotoServer

        self.port = _free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self._server.start()
        self.up = True

    def stop(self) -> None:
        if self.up:
            self._server.stop()
            self._server._server.server_close()  # free the port: connections are refused, not left hanging
            self.up = False

    def start(self) -> None:
        if not self.up:
            self._server.start()  # moto's state lives in this process: buckets and objects survive
            self.up = True


@pytest.fixture()
def outage_s3():
    import s3fs

    server = _OutageServer()
    bucket = f"outage-{uuid.uuid4().hex[:8]}"  # moto's state is per process, shared with the session server
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": server.endpoint}, skip_instance_cache=True)
    fs.mkdir(bucket)
    so = {"endpoint_url": server.endpoint}
    images = synth.write_archive(f"s3://{bucket}/archive/{DATE}", synth.default_samples(2, 16, seed=31), size=SIZE,
                                 seed=31, storage_options=so)
    try:
        yield server, f"s3://{bucket}", so, images, fs
    finally:
        server.stop()


def test_classification_rides_out_a_short_s3_outage(outage_s3, checkpoint, ray_cluster):
    server, bucket, so, images, fs = outage_s3
    out = f"{bucket}/out"
    cfg = _classify_config(f"{bucket}/archive", out, checkpoint, server.endpoint)
    outage = {}

    def flap():
        # Wait for the read phase (the model actors read and decode), then drop S3 for ~3 s.
        deadline = time.monotonic() + 300
        while not _alive_actors("CellPredictor") and time.monotonic() < deadline:
            time.sleep(0.05)
        server.stop()
        outage["stopped"] = time.monotonic()
        time.sleep(3)
        server.start()
        outage["restarted"] = time.monotonic()

    flapper = threading.Thread(target=flap, daemon=True)
    flapper.start()
    try:
        result = run_classification(cfg)
        finished = time.monotonic()
    finally:
        flapper.join(60)
        server.start()
    assert outage.get("restarted"), outage
    assert outage["stopped"] < finished, "the outage came after the run"
    seen = _seen(out, so)
    assert max(seen.values()) == 1 and set(seen) == {r["uri"] for r in images}
    # Retried, not given up: every image was read and classified.
    assert (result.n_predictions, result.n_errors) == (len(images), 0)


def test_long_s3_outage_fails_clearly_and_a_rerun_completes(outage_s3, checkpoint, ray_cluster):
    from bloodray.storage import StorageError

    server, bucket, so, images, fs = outage_s3
    out = f"{bucket}/out"
    cfg = _classify_config(f"{bucket}/archive", out, checkpoint, server.endpoint)
    server.stop()
    started = time.monotonic()
    with pytest.raises(StorageError) as info:
        run_classification(cfg)
    message = str(info.value)
    assert out in message and len(message.splitlines()) == 1, message
    assert FAKE_SECRET not in message
    assert time.monotonic() - started < 240
    server.start()
    fs.invalidate_cache()
    assert not fs.exists(f"{bucket[5:]}/out/runs")  # nothing visible
    assert outputs.visible_runs(out, so).num_rows == 0
    result = run_classification(cfg)
    seen = _seen(out, so)
    assert max(seen.values()) == 1 and set(seen) == {r["uri"] for r in images}
    assert result.n_predictions == len(images)


# ----------------------------------------------------------------------------- 5. no credentials in outputs


def test_no_credential_in_any_output(tmp_path, cells, s3_bucket, ray_cluster):
    assert os.environ["AWS_ACCESS_KEY_ID"] == FAKE_KEY_ID and os.environ["AWS_SECRET_ACCESS_KEY"] == FAKE_SECRET
    bucket, so = s3_bucket
    endpoint = so["endpoint_url"]
    synth.write_labelled_dataset(f"{bucket}/cells", 6, size=SIZE, seed=41, storage_options=so)
    cfg = _train_config(f"{bucket}/cells", f"{bucket}/runs", "secrets", endpoint, **{"train.epochs": 1})
    trained = run_training(cfg)
    day = f"{bucket}/archive/{DATE}"
    synth.write_archive(day, synth.default_samples(1, 10, seed=42), size=SIZE, seed=42, storage_options=so)
    local_out = tmp_path / "local-out"
    run_classification(_classify_config(f"{bucket}/archive", f"{bucket}/out", trained.best_checkpoint, endpoint))
    run_classification(_classify_config(f"{bucket}/archive", str(local_out), trained.best_checkpoint, endpoint))

    fs, path = storage.filesystem(bucket, so)
    fs.invalidate_cache()
    scanned = []
    for key in fs.find(path):
        if key.startswith(f"{path}/cells/") or key.startswith(f"{path}/archive/"):
            continue  # the inputs
        data = fs.cat_file(key)
        scanned.append(key)
        for secret in (FAKE_KEY_ID, FAKE_SECRET):
            assert secret.encode() not in data, (key, secret)
    for file in local_out.rglob("*"):
        if file.is_file():
            scanned.append(str(file))
            for secret in (FAKE_KEY_ID, FAKE_SECRET):
                assert secret.encode() not in file.read_bytes(), (file, secret)
    # Among them the files that carry configs: the run's config, checkpoint metadata, run manifests and configs.
    for part in ("runs/secrets/config.yaml", "runs/secrets/summary.json", "runs/secrets/checkpoint_epoch0001/bloodray.json",
                 "out/runs/run_date=", "out/run_configs/run_date=", "out/predictions/run_date=",
                 "local-out/runs/run_date=", "local-out/run_configs/run_date="):
        assert any(part in name for name in scanned), part


# ----------------------------------------------------------------------------- 1. several nodes (runs last)


@contextlib.contextmanager
def _without_session_ray():
    """Stop the session's Ray for the duration; start it again (as conftest does) afterwards."""
    import ray

    was_initialized = ray.is_initialized()
    if was_initialized:
        ray.shutdown()
    try:
        yield
    finally:
        if ray.is_initialized():
            ray.shutdown()
        if was_initialized:
            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=True, configure_logging=False,
                     ignore_reinit_error=True)


def test_multi_node_training_and_classification(tmp_path, cells, checkpoint):
    """Training workers and model actors spread over separate raylets give the results of one node."""
    import ray
    from ray.cluster_utils import Cluster

    day = tmp_path / "archive" / DATE
    images = synth.write_archive(str(day), synth.default_samples(2, 12, seed=51), size=SIZE, seed=51)
    with _without_session_ray():
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
        try:
            cluster.add_node(num_cpus=1, resources={"node_a": 1})
            cluster.add_node(num_cpus=1, resources={"node_b": 1})
            ray.init(address=cluster.address, log_to_driver=True, configure_logging=False)
            cluster.wait_for_nodes()
            assert len([n for n in ray.nodes() if n["Alive"]]) == 3

            # One 1-CPU training worker per 1-CPU worker node: they cannot share a node.
            cfg = _train_config(cells, str(tmp_path / "runs"), "multinode", **{"scaling.cpus_per_worker": 1})
            trained = run_training(cfg)
            workers = _all_actors("RayTrainWorker")
            assert len(workers) == 2, workers
            assert len({w["Address"]["NodeID"] for w in workers}) == 2
            meta = read_metadata(str(tmp_path / "runs" / "multinode" / "checkpoint_epoch0002"))
            assert [h["epoch"] for h in meta.history] == [1, 2]

            assert trained.best_checkpoint.startswith(str(tmp_path / "runs" / "multinode" / "checkpoint_epoch"))

            # Classification with two model actors, one per node (the better-trained module checkpoint,
            # so that the comparison below covers several classes).
            multi_out = str(tmp_path / "out-multi")
            multi = run_classification(_classify_config(str(tmp_path / "archive"), multi_out, checkpoint, None,
                                                        "inference.concurrency=2"))
            predictors = _all_actors("CellPredictor")
            assert len({a["Address"]["NodeID"] for a in predictors}) >= 2, predictors
            assert len([n for n in ray.nodes() if n["Alive"]]) == 3
        finally:
            ray.shutdown()
            cluster.shutdown()

        # The same checkpoint and archive on a single node give the same results.
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=True, configure_logging=False)
        single_out = str(tmp_path / "out-single")
        single = run_classification(_classify_config(str(tmp_path / "archive"), single_out, checkpoint, None,
                                                     "inference.concurrency=1"))
    for res in (multi, single):
        assert (res.n_inputs, res.n_predictions, res.n_errors, res.n_samples) == (len(images), len(images), 0, 2)
    assert _predicted(multi_out) == _predicted(single_out)
    confidence = {}
    for name, out in (("multi", multi_out), ("single", single_out)):
        preds = outputs.read_table(out, "predictions").sort_by("image_uri")
        confidence[name] = preds.column("confidence").to_numpy()
    assert np.allclose(confidence["multi"], confidence["single"], atol=1e-5)
    cols = ["sample_id", "n_images", "n_classified"] + [f"count_{c}" for c in CLASS_NAMES]
    diffs_multi = outputs.read_table(multi_out, "differentials").sort_by("sample_id")
    diffs_single = outputs.read_table(single_out, "differentials").sort_by("sample_id")
    assert diffs_multi.select(cols).equals(diffs_single.select(cols))
