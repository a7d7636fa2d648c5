"""On a real cluster: several nodes, killed workers, actors and drivers, S3 outages, no secrets in outputs,
S3 credentials refreshed.

Everything here is real: Ray nodes are separate raylets (``ray.cluster_utils.Cluster``),
processes are killed with SIGKILL, and the S3 outage takes a real moto server (its own process) off the network.
Kept tiny (48 px cells, a few dozen images, a few epochs) for a 2-core machine.

The multi-node test stops the session's Ray (``ray_cluster``) and starts it
again afterwards, so it is the last test of this module.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from bloodray import storage

from bloodray.analysis import query
from bloodray.nightly import tables

from bloodray.data import synth as synth
from bloodray.checkpoint import read_metadata
from bloodray.classes import CLASS_NAMES
from bloodray.nightly.pipeline import ClassifyConfig, run_classification
from bloodray.config import load_config
from bloodray.train.ray_trainer import load_train_config, run_training

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
    # The 4-epoch model on 12 cells per class stands in for any model here; its quality is not what these
    # tests are about, so they opt out of the quality gate explicitly.
    overrides = [f"input.uri={archive}", f"output.uri={out}", f"model.checkpoint={checkpoint}",
                 "model.quality_gate=false", "inference.batch_size=8", f"run.date={DATE}"]
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
    preds = query.read_table(out, "predictions", so)
    errors = query.read_table(out, "errors", so)
    return Counter(preds.column("image_uri").to_pylist() + errors.column("image_uri").to_pylist())


def _predicted(out: str, so: dict | None = None) -> dict[str, str]:
    preds = query.read_table(out, "predictions", so)
    return dict(zip(preds.column("image_uri").to_pylist(), preds.column("predicted_class").to_pylist()))


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


# ----------------------------------------------------------------------------- 2b. training driver killed, resubmitted


REPO = Path(__file__).resolve().parent.parent


def _session_pids(sid: int) -> list[int]:
    """Live processes of session ``sid``: the driver started with its own session, its local Ray (GCS, raylet,
    dashboard) and the Ray workers, which the raylet puts in process groups of their own but the same session."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()  # state ppid pgrp session ...
        except OSError:
            continue
        if int(fields[3]) == sid and fields[0] not in ("Z", "X"):
            pids.append(int(entry))
    return pids


def _working(sid: int) -> list[str]:
    """Command lines of the processes of session ``sid`` other than Ray worker processes still starting up."""
    found = []
    for pid in _session_pids(sid):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                cmdline = fh.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        if cmdline and not any(name in cmdline for name in ("workers/default_worker.py", "workers/setup_worker.py")):
            found.append(f"{pid}: {cmdline[:100]}")
    return found


def _kill_session(proc: subprocess.Popen) -> None:
    """SIGKILL a driver started with ``start_new_session`` and whatever of its session still runs."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
    for pid in _session_pids(proc.pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while _session_pids(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.1)


def _registered_epochs(run_dir: Path) -> list[int] | None:
    """Epochs whose checkpoints Ray Train's controller registered (its snapshot); None while there is none."""
    try:
        snapshot = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
    except (OSError, ValueError):
        return None
    return sorted(int(r["checkpoint_dir_name"].removeprefix("checkpoint_epoch"))
                  for r in snapshot["checkpoint_results"])


def _printed_epochs(log: str, epochs: int) -> list[int]:
    return [int(m) for m in re.findall(rf"\[bloodray\] epoch (\d+)/{epochs}\b", log)]


def test_killed_driver_and_resubmitted_run_resumes(tmp_path, cells):
    """``python jobs/train.py`` SIGKILLed with its whole local Ray mid-run; the same command again resumes."""
    epochs, name = 5, "driver"
    storage_path = tmp_path / "runs"
    run_dir = storage_path / name
    values = {"data.root": cells, "model.name": "bloodnet", "model.input_size": SIZE, "model.kwargs.batch_norm": "true",
              "train.epochs": epochs, "train.batch_size": 8, "train.lr": 0.002, "train.evaluate_test": "false",
              "scaling.num_workers": 1, "run.name": name, "run.storage_path": storage_path, "run.keep_checkpoints": 10}
    command = [sys.executable, "jobs/train.py", "--config", "configs/train/bloodnet.yaml"]
    for key, value in values.items():
        command += ["--set", f"{key}={value}"]
    # The driver starts a local Ray of its own (no RAY_ADDRESS), kept apart from the test session's Ray and from any
    # other Ray on the machine by its own temp dir (short: Ray's socket paths must fit in 107 characters).
    ray_tmp = tempfile.mkdtemp(prefix="brdrv", dir="/tmp")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAY_TMPDIR": ray_tmp}
    logs = [tmp_path / "first.log", tmp_path / "second.log"]

    drivers: list[subprocess.Popen] = []
    try:
        with open(logs[0], "wb") as out:
            driver = subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                      start_new_session=True)
        drivers.append(driver)
        deadline = time.monotonic() + 420  # generous: a shared 2-core machine can be slow
        registered = None
        while time.monotonic() < deadline:
            assert driver.poll() is None, f"the driver ended (rc {driver.returncode}) before it could be killed:\n" \
                                          + logs[0].read_text()[-3000:]
            registered = _registered_epochs(run_dir)
            if registered and registered[-1] < epochs:
                break
            time.sleep(0.05)
        else:
            pytest.fail("no epoch checkpoint was registered in time:\n" + logs[0].read_text()[-3000:])
        os.killpg(driver.pid, signal.SIGKILL)  # the driver, GCS, raylet and dashboard: one process group
        killed_at = time.monotonic()
        driver.wait(30)
        # The Ray workers and actors (own process groups) exit on their own once their raylet is gone. A worker
        # process still starting up (not yet a worker) only gives up when its connection attempts time out: ended here.
        while _working(driver.pid) and time.monotonic() - killed_at < 30:
            time.sleep(0.2)
        assert not _working(driver.pid), f"the killed driver's Ray workers still run: {_working(driver.pid)}"
        _kill_session(driver)
        assert not _session_pids(driver.pid)
        first_log = logs[0].read_text()
        assert "best checkpoint:" not in first_log

        # What the killed run left: the registered checkpoints (the snapshot as last written) and the run's files.
        kept = _registered_epochs(run_dir)
        assert kept and kept[-1] >= registered[-1], (kept, registered)
        resumed = kept[-1]
        written = [e for e in range(1, epochs + 1) if (run_dir / f"checkpoint_epoch{e:04d}" / "bloodray.json").exists()]
        before = {f: (run_dir / f).read_bytes() for f in ("split.parquet", "data_report.json")}
        history_before = read_metadata(str(run_dir / f"checkpoint_epoch{resumed:04d}")).history
        assert [h["epoch"] for h in history_before] == list(range(1, resumed + 1))

        # The same command again.
        with open(logs[1], "wb") as out:
            rerun = subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        drivers.append(rerun)
        rerun.wait(420)
        second_log = logs[1].read_text()
        assert rerun.returncode == 0, second_log[-3000:]
    finally:
        for proc in drivers:
            _kill_session(proc)
        shutil.rmtree(ray_tmp, ignore_errors=True)

    # It resumed from the latest registered checkpoint, and lost at most the epoch in progress.
    assert f"[bloodray] resuming {name} from the checkpoint of epoch {resumed}" in second_log, second_log[-3000:]
    assert resumed >= max(written) - 1, (resumed, written)
    assert resumed >= max(_printed_epochs(first_log, epochs)) - 1
    # The epochs already checkpointed were not trained again; the rest were, once each.
    assert _printed_epochs(second_log, epochs) == list(range(resumed + 1, epochs + 1)), second_log[-3000:]
    final = read_metadata(str(run_dir / f"checkpoint_epoch{epochs:04d}"))
    assert [h["epoch"] for h in final.history] == list(range(1, epochs + 1))
    assert final.history[:resumed] == history_before
    # The final outputs are valid, the split is the one the run started with.
    assert {f: (run_dir / f).read_bytes() for f in before} == before
    summary = json.loads((run_dir / "summary.json").read_text())
    best = summary["best_checkpoint"]
    assert best.startswith(str(run_dir / "checkpoint_epoch")) and f"best checkpoint: {best}" in second_log
    assert read_metadata(best).history[-1]["epoch"] == int(best[-4:])
    assert summary["metrics"]["epoch"] == epochs


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
    assert tables.visible_runs(out).column("run_id").to_pylist() == [result.run_id]
    assert killer.killed is not None, "no inference actor was killed"


# ----------------------------------------------------------------------------- 4. S3 outage


@pytest.fixture()
def outage_s3():
    """An S3 endpoint of this test's own that can go away and come back on the same port (:class:`helpers_s3.OutageS3`):
    moto in a process of its own behind a forwarder process that ``stop()`` kills and ``start()`` starts again."""
    import s3fs
    from helpers_s3 import OutageS3

    server = OutageS3()
    try:
        bucket = f"outage-{uuid.uuid4().hex[:8]}"  # this server's moto holds only this test's bucket
        fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": server.endpoint}, skip_instance_cache=True)
        fs.mkdir(bucket)
        so = {"endpoint_url": server.endpoint}
        images = synth.write_archive(f"s3://{bucket}/archive/{DATE}", synth.default_samples(2, 16, seed=31), size=SIZE,
                                     seed=31, storage_options=so)
        yield server, f"s3://{bucket}", so, images, fs
    finally:
        server.close()


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
    assert tables.visible_runs(out, so).num_rows == 0
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


# ----------------------------------------------------------------------------- 6. S3 credentials refreshed

#: seconds a handed-out credential stays usable before botocore's advisory refresh (15 min before expiry) starts.
CREDENTIAL_LIFETIME = 6

CREDENTIAL_PROCESS = '''
import datetime, json, pathlib, sys

state = pathlib.Path(sys.argv[1])
key = json.loads((state / "current.json").read_text())
with open(state / "calls.log", "a") as fh:
    fh.write(key["AccessKeyId"] + "\\n")
expires = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=15 * 60 + float(sys.argv[2]))
print(json.dumps({"Version": 1, "AccessKeyId": key["AccessKeyId"], "SecretAccessKey": key["SecretAccessKey"],
                  "Expiration": expires.strftime("%Y-%m-%dT%H:%M:%SZ")}))
'''


@pytest.fixture()
def iam_s3_server():
    """A moto server of this test's own that checks every request's signature against its IAM access keys.

    Yields ``(endpoint, bucket, iam, keys)``: a user allowed everything, with two access keys.
    """
    import boto3
    import requests

    from helpers_s3 import moto_server

    with moto_server() as endpoint:  # INITIAL_NO_AUTH_ACTION_COUNT not inherited: no checks while setting up
        setup = {"endpoint_url": endpoint, "region_name": "us-east-1", "aws_access_key_id": FAKE_KEY_ID,
                 "aws_secret_access_key": FAKE_SECRET}
        iam = boto3.client("iam", **setup)
        iam.create_user(UserName="nightly")
        iam.put_user_policy(UserName="nightly", PolicyName="all", PolicyDocument=json.dumps(
            {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
        keys = [iam.create_access_key(UserName="nightly")["AccessKey"] for _ in range(2)]
        bucket = f"creds-{uuid.uuid4().hex[:8]}"
        boto3.client("s3", **setup).create_bucket(Bucket=bucket)
        # From now on every request must be signed with one of the user's keys.
        requests.post(f"{endpoint}/moto-api/reset-auth", data=b"0", timeout=10).raise_for_status()
        signed = setup | {"aws_access_key_id": keys[1]["AccessKeyId"], "aws_secret_access_key": keys[1]["SecretAccessKey"]}
        yield endpoint, bucket, boto3.client("iam", **signed), keys


def test_s3_credentials_are_refreshed_not_frozen(iam_s3_server, tmp_path, monkeypatch):
    """A long-lived filesystem from ``storage.filesystem`` outlives its first credentials: the key it started with is
    rotated out (deleted on the server) and it goes on working with the one the AWS chain hands out next."""
    import s3fs

    endpoint, bucket, iam, (old, new) = iam_s3_server
    so = {"endpoint_url": endpoint}
    state = tmp_path / "credentials"
    state.mkdir()
    (state / "process.py").write_text(CREDENTIAL_PROCESS)
    (state / "config").write_text(f"[default]\ncredential_process = {sys.executable} {state / 'process.py'} {state} "
                                  f"{CREDENTIAL_LIFETIME}\n")

    def hand_out(key: dict) -> None:
        (state / "current.json").write_text(json.dumps({k: key[k] for k in ("AccessKeyId", "SecretAccessKey")}))

    def calls() -> list[str]:
        return (state / "calls.log").read_text().split() if (state / "calls.log").exists() else []

    # Credentials only through the standard chain: the shared config's credential_process.
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(state / "config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(state / "no-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    hand_out(old)
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        fs, path = storage.filesystem(f"s3://{bucket}/long-run", so)
        fs.pipe_file(f"{path}/0", b"0")
        fetched = time.monotonic()
        for i in range(1, 4):
            fs.pipe_file(f"{path}/{i}", str(i).encode())
        assert fs.cat_file(f"{path}/3") == b"3"
        assert calls() == [old["AccessKeyId"]]  # fetched once, not on every request

        # Rotation: the chain now hands out the new key and the old one is deleted on the server.
        hand_out(new)
        iam.delete_access_key(UserName="nightly", AccessKeyId=old["AccessKeyId"])
        frozen = s3fs.S3FileSystem(key=old["AccessKeyId"], secret=old["SecretAccessKey"], skip_instance_cache=True,
                                   client_kwargs={"endpoint_url": endpoint})
        with pytest.raises(PermissionError):  # what a filesystem holding the first key would get from now on
            frozen.pipe_file(f"{path}/frozen", b"x")

        time.sleep(max(0.0, fetched + CREDENTIAL_LIFETIME + 1 - time.monotonic()))
        # The same filesystem object refreshed its credentials and goes on working ...
        for i in range(4, 8):
            fs.pipe_file(f"{path}/{i}", str(i).encode())
        assert [fs.cat_file(f"{path}/{i}") for i in range(8)] == [str(i).encode() for i in range(8)]
        assert calls()[0] == old["AccessKeyId"] and set(calls()[1:]) == {new["AccessKeyId"]}, calls()
        # ... and it is the one every later storage.filesystem call of the process gets (fsspec's instance cache).
        assert storage.filesystem(f"s3://{bucket}/long-run", so)[0] is fs
    finally:
        s3fs.S3FileSystem.clear_instance_cache()


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
        preds = query.read_table(out, "predictions").sort_by("image_uri")
        confidence[name] = preds.column("confidence").to_numpy()
    assert np.allclose(confidence["multi"], confidence["single"], atol=1e-5)
    cols = ["sample_id", "n_images", "n_classified"] + [f"count_{c}" for c in CLASS_NAMES]
    diffs_multi = query.read_table(multi_out, "differentials").sort_by("sample_id")
    diffs_single = query.read_table(single_out, "differentials").sort_by("sample_id")
    assert diffs_multi.select(cols).equals(diffs_single.select(cols))
