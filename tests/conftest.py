"""Shared fixtures: a real S3-compatible server on loopback and a real local Ray cluster.

The S3 server is moto in server mode, run as a separate process (as s3fs's own
tests run it; :mod:`helpers_s3`), reached through s3fs over HTTP; nothing in Ray
or S3 is mocked. Not in this process: deltalake blocks in Rust without releasing
the GIL, and a server thread here could not answer it.
"""

from __future__ import annotations

import os
import uuid

import pytest

# Fake, recognisable credentials for the loopback server only. Set before Ray
# starts so every Ray worker inherits them through the standard AWS chain.
os.environ.setdefault("AWS_ACCESS_KEY_ID", "AKIABLOODRAYTESTKEY1")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bloodray-test-secret-do-not-log")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
os.environ.pop("AWS_PROFILE", None)
# Keep Ray quiet and light on a 2-core machine.
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "1")
# Ray Train gives a worker group 60 s to start; on a loaded shared machine importing torch in two workers can take
# longer, and the run then fails with "placement group was removed" instead of training.
os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "600")


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """Start moto's S3 server on 127.0.0.1 in a process of its own; yields its endpoint URL.

    Its output (one line per request) goes to ``moto.log`` in the session's temporary directory.
    """
    from helpers_s3 import moto_server

    with moto_server(log=tmp_path_factory.mktemp("moto") / "moto.log") as endpoint:
        yield endpoint


@pytest.fixture()
def s3_bucket(s3_server):
    """A fresh, empty bucket; yields ``(bucket_uri, storage_options)``."""
    import s3fs

    name = f"bloodray-{uuid.uuid4().hex[:10]}"
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server}, skip_instance_cache=True)
    fs.mkdir(name)
    fs.invalidate_cache()
    yield f"s3://{name}", {"endpoint_url": s3_server}


@pytest.fixture(scope="session")
def ray_cluster():
    """A real local Ray cluster with 2 CPUs, shared by the tests of a session."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=True,
                 configure_logging=False, ignore_reinit_error=True)
    yield ray
    ray.shutdown()
