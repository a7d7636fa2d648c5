"""One writer per output and run date: a lease object in the output store.

A run of date ``D`` into an output holds ``<output>/_leases/run_date=<D>.json``
(:func:`bloodray.nightly.contract.lease_path`) from planning to the end of its
commit. The lease names its holder (run id, host, pid) and an expiry; the
holder renews it in a background thread, and the commit renews it once more
right before the manifest is written, so a run that has lost its lease never
publishes.

Every change of the lease object is a compare-and-swap, so of two runs that
race for it exactly one wins:

* local disk: the operations run under an exclusive ``fcntl.flock`` on
  ``_leases/.lock`` (atomic on one host, and on network filesystems whose
  ``flock`` is real);
* S3: conditional writes -- ``If-None-Match: *`` to create the lease,
  ``If-Match: <ETag>`` to take over, renew or release it. A store without
  conditional writes (some S3-compatible servers) rejects or ignores those
  headers; ignoring them would lose the guarantee (documented in the README).

A lease is free when it was released, when it has expired (clocks of the
machines must agree to well within ``run.lease_seconds``), or when its holder
ran on this host and that process is gone (a killed driver's rerun on the same
machine need not wait for the expiry). On S3 a released lease stays as a
record (``released: true``): there is no conditional delete to remove it safely.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import posixpath
import socket
import threading
import uuid
from typing import Any, Mapping

from fsspec.implementations.local import LocalFileSystem

from bloodray import storage
from bloodray.nightly import contract
from bloodray.nightly.config import ClassifyError

log = logging.getLogger(__name__)

#: Leases this process holds and renews (run ids): a lease of this pid that is not here was abandoned.
_ACTIVE: set[str] = set()
_ACTIVE_LOCK = threading.Lock()


class LeaseHeldError(ClassifyError):
    """Another run holds the lease of this output and date."""


class LeaseLostError(ClassifyError):
    """This run's lease was taken over (it expired) or removed; the run must not publish."""


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def holder_is_live(record: Mapping[str, Any], now: dt.datetime | None = None) -> bool:
    """Whether a lease record still excludes other runs (not released, not expired, holder not known dead)."""
    if record.get("released"):
        return False
    try:
        expires = dt.datetime.fromisoformat(str(record["expires_at"]))
    except (KeyError, ValueError):
        return False  # not a lease this code wrote: nobody can be renewing it
    if (now or _now()) >= expires:
        return False
    if record.get("host") == socket.gethostname():
        pid = int(record.get("pid", -1))
        if pid == os.getpid():
            with _ACTIVE_LOCK:
                return record.get("run_id") in _ACTIVE
        return _pid_alive(pid)
    return True


#: Fields every lease record this code writes has.
LEASE_FIELDS: tuple[str, ...] = ("run_id", "host", "pid", "expires_at", "nonce")


def lease_problem(record: Mapping[str, Any]) -> str | None:
    """Why a lease object is not one this code wrote (unreadable, fields missing), or None when it is."""
    if not record:
        return "unreadable or empty"
    missing = [f for f in LEASE_FIELDS if f not in record]
    if missing:
        return f"missing {', '.join(missing)}"
    try:
        dt.datetime.fromisoformat(str(record["expires_at"]))
    except ValueError:
        return f"expires_at {str(record['expires_at'])[:40]!r} is not a time"
    return None


def describe_holder(record: Mapping[str, Any]) -> str:
    """``run <id> (host <h>, pid <p>, since <t>, lease expires <t>)``."""
    return (f"run {record.get('run_id')} (host {record.get('host')}, pid {record.get('pid')}, "
            f"since {record.get('acquired_at')}, lease expires {record.get('expires_at')})")


class _LocalStore:
    """Compare-and-swap on a local file, under an exclusive flock of ``.lock`` next to it."""

    def __init__(self, fs, path: str):
        self.path = path
        self.lock_path = posixpath.join(posixpath.dirname(path), ".lock")

    @contextlib.contextmanager
    def _locked(self):
        import fcntl

        os.makedirs(posixpath.dirname(self.path), exist_ok=True)
        with open(self.lock_path, "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def _read(self) -> tuple[dict, str] | None:
        try:
            with open(self.path, "rb") as fh:
                record = json.loads(fh.read())
        except FileNotFoundError:
            return None
        except ValueError:
            return {}, ""
        return record, str(record.get("nonce", ""))

    def _write(self, record: dict) -> str:
        tmp = f"{self.path}.{uuid.uuid4().hex[:8]}.tmp"
        with open(tmp, "wb") as fh:
            fh.write(json.dumps(record).encode())
        os.replace(tmp, self.path)
        return record["nonce"]

    def read(self) -> tuple[dict, str] | None:
        with self._locked():
            return self._read()

    def create(self, record: dict) -> str | None:
        with self._locked():
            return None if os.path.exists(self.path) else self._write(record)

    def replace(self, record: dict, token: str) -> str | None:
        with self._locked():
            current = self._read()
            if current is None or current[1] != token:
                return None
            return self._write(record)

    def delete(self, token: str) -> bool:
        with self._locked():
            current = self._read()
            if current is None or current[1] != token:
                return False
            os.remove(self.path)
            return True


def _precondition_failed(exc: BaseException) -> bool:
    """Whether an s3fs error is a failed ``If-Match``/``If-None-Match`` (lost race), not any other refusal."""
    seen: BaseException | None = exc
    while seen is not None:
        response = getattr(seen, "response", None)
        if isinstance(response, Mapping):
            code = str(response.get("Error", {}).get("Code", ""))
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            return code in ("PreconditionFailed", "ConditionalRequestConflict", "412") or status == 412
        seen = seen.__cause__ or seen.__context__
    return False


class _S3Store:
    """Compare-and-swap on an S3 object with conditional PUTs; the token is the object's ETag."""

    def __init__(self, fs, path: str):
        self.fs, self.path = fs, path
        self.bucket, self.key, _ = fs.split_path(path)

    def read(self) -> tuple[dict, str] | None:
        for attempt in range(3):
            self.fs.invalidate_cache(self.path)
            try:
                # s3fs reads with If-Match on the ETag it opened with: body and token agree.
                with self.fs.open(self.path, "rb") as fh:
                    token = fh.details["ETag"]
                    body = fh.read()
                break
            except FileNotFoundError:
                return None
            except OSError as exc:  # changed between the HEAD and the GET: read again
                if attempt == 2 or not _precondition_failed(exc):
                    raise
        try:
            return json.loads(body), token
        except ValueError:
            return {}, token

    def _put(self, record: dict, **condition) -> str | None:
        try:
            out = self.fs.call_s3("put_object", Bucket=self.bucket, Key=self.key,
                                  Body=json.dumps(record).encode(), **condition)
        except FileExistsError:
            return None
        except FileNotFoundError as exc:
            if "IfNoneMatch" in condition:
                # Creating cannot race a deletion: the bucket itself is missing.
                raise storage.describe_storage_error(storage.full_uri(self.fs, self.path), exc) from exc
            return None  # the object we meant to replace was deleted: a lost race
        except OSError as exc:
            if _precondition_failed(exc):
                return None
            raise
        finally:
            self.fs.invalidate_cache(self.path)
        return out["ETag"]

    def create(self, record: dict) -> str | None:
        return self._put(record, IfNoneMatch="*")

    def replace(self, record: dict, token: str) -> str | None:
        return self._put(record, IfMatch=token)

    def delete(self, token: str) -> bool:
        return False  # no conditional delete: a released record stays (see the module docstring)


class Lease:
    """This run's hold on ``(output, run_date)``; see the module docstring."""

    def __init__(self, store, uri: str, output_uri: str, run_date: str, run_id: str, seconds: float):
        self.store, self.uri, self.output_uri = store, uri, output_uri
        self.run_date, self.run_id, self.seconds = run_date, run_id, seconds
        self.token: str | None = None
        self.record: dict[str, Any] = {}
        self.lost: str | None = None
        # The heartbeat and the commit both renew: two CAS with one token would fail one of them.
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _new_record(self) -> dict[str, Any]:
        now = _now()
        return {"run_id": self.run_id, "output_uri": self.output_uri, "run_date": self.run_date,
                "host": socket.gethostname(), "pid": os.getpid(),
                "acquired_at": self.record.get("acquired_at", now.isoformat()),
                "expires_at": (now + dt.timedelta(seconds=self.seconds)).isoformat(),
                "released": False, "nonce": uuid.uuid4().hex}

    def _acquire(self) -> None:
        for _attempt in range(5):
            record = self._new_record()
            token = self.store.create(record)
            if token is None:
                current = self.store.read()
                if current is None:
                    continue  # released and deleted in between: try again
                held, held_token = current
                if held.get("nonce") == record["nonce"]:  # our PUT landed, its response was lost and retried
                    token = held_token
                elif holder_is_live(held):
                    raise LeaseHeldError(
                        f"{self.output_uri}: run date {self.run_date} is being written by {describe_holder(held)}; "
                        f"one run per output and date at a time -- wait for it, or for its lease to expire "
                        f"({self.uri})")
                else:
                    token = self.store.replace(record, held_token)
                if token is None:
                    continue  # someone else took it over first: look again
                problem = lease_problem(held)
                if problem:
                    log.warning("%s: not a bloodray lease (%s); taken over by run %s", self.uri, problem, self.run_id)
                elif held.get("run_id") != self.run_id and not held.get("released"):
                    log.warning("took over the lease of %s: expired, or its process is gone", describe_holder(held))
            self.token, self.record = token, record
            with _ACTIVE_LOCK:
                _ACTIVE.add(self.run_id)
            return
        raise LeaseHeldError(f"{self.output_uri}: run date {self.run_date}: the lease {self.uri} keeps changing "
                             "hands; another run is starting for the same date")

    def renew(self) -> None:
        """Extend the lease by ``seconds``; raises :class:`LeaseLostError` when it is no longer ours."""
        with self._lock:
            self._renew()

    def _renew(self) -> None:
        if self.token is None and not self.lost:
            raise LeaseLostError(f"{self.output_uri}: run {self.run_id} has released its lease on {self.run_date}")
        if self.lost:
            raise LeaseLostError(self.lost)
        record = self._new_record()
        try:
            token = self.store.replace(record, self.token)
        except Exception as exc:  # noqa: BLE001
            raise storage.describe_storage_error(self.uri, exc) from exc
        current = self.store.read() if token is None else None
        if current is not None and current[0].get("nonce") == record["nonce"]:
            token = current[1]  # our PUT landed, its response was lost and the retry found it changed
        if token is None:
            holder = describe_holder(current[0]) if current else "nobody (the lease was removed)"
            self.lost = (f"{self.output_uri}: run {self.run_id} lost its lease on run date {self.run_date} "
                         f"(now held by {holder}); nothing of this run is published")
            raise LeaseLostError(self.lost)
        self.token, self.record = token, record

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.seconds / 5):
            try:
                self.renew()
            except LeaseLostError as exc:
                log.error("%s", exc)
                return
            except Exception as exc:  # noqa: BLE001 - a storage blip: the next beat tries again
                log.warning("lease renewal failed (%s); retrying", exc)

    def start_heartbeat(self) -> None:
        """Renew in a daemon thread every ``seconds / 5`` until :meth:`release`."""
        self._thread = threading.Thread(target=self._heartbeat, name=f"lease-{self.run_id}", daemon=True)
        self._thread.start()

    def release(self) -> None:
        """Give the lease up (idempotent, best effort: an unreleased lease frees itself when it expires)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=30)
        with _ACTIVE_LOCK:
            _ACTIVE.discard(self.run_id)
        with self._lock:
            if self.token is None or self.lost:
                return
            token, self.token = self.token, None
            try:
                if not self.store.delete(token):
                    self.store.replace(self._new_record() | {"released": True, "expires_at": _now().isoformat()},
                                       token)
            except Exception as exc:  # noqa: BLE001
                log.warning("could not release the lease %s (%s); it expires on its own", self.uri, exc)


def acquire_lease(output_uri: str, run_date: str, run_id: str, seconds: float,
                  storage_options: Mapping[str, Any] | None = None) -> Lease:
    """Take the lease of ``(output_uri, run_date)`` for ``run_id`` and start renewing it.

    Raises :class:`LeaseHeldError` (one line: output, date, holder) when a live
    run holds it; takes over a released, expired or dead holder's lease.
    """
    fs, root = contract.output_root(output_uri, storage_options)
    path = contract.lease_path(root, run_date)
    # Any filesystem over local paths (a LocalFileSystem subclass, too) locks with flock; object stores use CAS.
    store = _LocalStore(fs, path) if storage.is_local(fs) or isinstance(fs, LocalFileSystem) else _S3Store(fs, path)
    lease = Lease(store, storage.full_uri(fs, path), output_uri, run_date, run_id, seconds)
    try:
        lease._acquire()
    except ClassifyError:
        raise
    except Exception as exc:  # noqa: BLE001 - missing bucket, permissions, store without conditional writes
        raise storage.describe_storage_error(lease.uri, exc) from exc
    lease.start_heartbeat()
    return lease


def lease_records(output_uri: str, storage_options: Mapping[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """The lease record of every run date of the output that has one (``{run_date: record}``), unreadable ones left out."""
    fs, root = contract.output_root(output_uri, storage_options)
    base = posixpath.join(root, contract.LEASES)
    records: dict[str, dict[str, Any]] = {}
    try:
        fs.invalidate_cache()
        paths = [p for p in fs.find(base) if p.endswith(".json")]
    except FileNotFoundError:
        return records
    for path in paths:
        try:
            record = json.loads(fs.cat_file(path))
        except (FileNotFoundError, ValueError):
            continue
        if isinstance(record, dict):
            name = posixpath.basename(path).removesuffix(".json")
            records[name.removeprefix(contract.RUN_DATE_PREFIX)] = record
    return records


def live_holders(output_uri: str, storage_options: Mapping[str, Any] | None = None) -> set[str]:
    """Run ids holding a live lease on any date of the output (their staging must not be touched)."""
    return {str(r.get("run_id")) for r in lease_records(output_uri, storage_options).values() if holder_is_live(r)}
