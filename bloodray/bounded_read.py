"""Bounded reads: the one place that reads a file bloodray did not write itself.

Image files and tar shards of an archive (:mod:`bloodray.data.stages`) and every
file named in a config or on the command line (the config YAML itself,
``flags.reference_ranges``, ``flags.sample_metadata``, checkpoint files,
``model.weights_uri``) are read through here, with the same three guards:

- only regular files are opened (after links): a FIFO, a device such as
  ``/dev/zero``, a socket or a directory is refused at once, never read or
  waited on (``not_regular_file``);
- at most ``max_bytes`` are read (``file_too_large``), whatever the file claims
  its size is, so a growing or endless file cannot exhaust memory;
- a read that has not finished after ``timeout_s`` seconds is abandoned
  (``read_timeout``); the stuck read stays in a daemon thread, which holds up
  neither the caller nor the process's exit.

Object storage is read with one ranged GET of at most ``max_bytes + 1`` bytes,
under the same timeout (and botocore's connect and read timeouts,
:mod:`bloodray.storage`).
"""

from __future__ import annotations

import os
import stat
import threading
from typing import Any, Callable, Mapping

from bloodray import storage

#: Largest image file read (bytes): a CellaVision crop is ~30 kB, a 25 MP uncompressed TIFF ~75 MB.
DEFAULT_MAX_FILE_BYTES = 128 * 2**20
#: Seconds a file read may take before it is abandoned (``read_timeout``).
DEFAULT_READ_TIMEOUT_S = 60.0
#: Largest config-named text or table file (config YAML, reference ranges, sample metadata): a million-sample
#: metadata CSV is ~20 MB; anything larger is a wrong path (``/dev/zero``, an archive).
MAX_CONFIG_FILE_BYTES = 64 * 2**20
#: Largest weights file (checkpoint ``model.safetensors``, ``model.weights_uri``): the zoo's largest model is
#: well under 1 GiB.
MAX_WEIGHTS_BYTES = 4 * 2**30


class InputReadError(OSError):
    """A file refused by the read guards; ``kind`` is ``not_regular_file``, ``file_too_large`` or ``read_timeout``.

    The message is one line naming the file.
    """

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind

    def __str__(self) -> str:
        return self.args[0]


def call_with_timeout(fn: Callable[[], Any], timeout: float, what: str,
                      key: str = "limits.read_timeout_s") -> Any:
    """``fn()``, or :class:`InputReadError` ``read_timeout`` when it has not returned after ``timeout`` seconds.

    The read runs in a daemon thread: a read stuck in the kernel (a hung network mount) cannot be
    interrupted, but it no longer holds up the caller, nor the process's exit. ``key`` names the setting in
    the message.
    """
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            box["error"] = exc

    thread = threading.Thread(target=target, name="bloodray-read", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise InputReadError("read_timeout", f"{what}: no data within {timeout:g} s ({key})")
    if "error" in box:
        raise box["error"]
    return box["value"]


def _kind_of(mode: int) -> str:
    return ("FIFO" if stat.S_ISFIFO(mode) else "character device" if stat.S_ISCHR(mode) else
            "block device" if stat.S_ISBLK(mode) else "socket" if stat.S_ISSOCK(mode) else
            "directory" if stat.S_ISDIR(mode) else "special file")


def open_regular_local(path: str):
    """Open a local path for reading only if it is a regular file (after links): never blocks on a FIFO or device."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise InputReadError("not_regular_file", f"{path}: not a regular file ({_kind_of(mode)}); refused")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_local(path: str, max_bytes: int, key: str = "limits.max_file_bytes") -> bytes:
    """The bytes of a regular local file of at most ``max_bytes`` (:class:`InputReadError` otherwise)."""
    with open_regular_local(path) as fh:
        size = os.fstat(fh.fileno()).st_size
        if size > max_bytes:
            raise InputReadError("file_too_large", f"{path}: {size} bytes exceeds {key} ({max_bytes})")
        data = fh.read(max_bytes + 1)  # the file may have grown since fstat
    if len(data) > max_bytes:
        raise InputReadError("file_too_large", f"{path}: more than {key} ({max_bytes}) bytes")
    return data


def read_file(uri: str, storage_options: Mapping[str, Any] | None = None, *,
              max_bytes: int = MAX_CONFIG_FILE_BYTES, timeout_s: float = DEFAULT_READ_TIMEOUT_S,
              what: str = "file") -> bytes:
    """Read a whole file named by a user (local path or object-storage URI) under the three guards.

    ``what`` names the file's role in messages (``flags.reference_ranges``...).

    Raises:
        FileNotFoundError: there is no such file.
        InputReadError: not a regular file, over ``max_bytes``, or slower than ``timeout_s``; one line naming
            ``what`` and ``uri``.
        storage.StorageError: any other storage failure, one line naming ``uri``.
    """
    fs, path = storage.filesystem(uri, storage_options)
    return read_path(fs, path, f"{what} {uri}" if what else uri, max_bytes=max_bytes, timeout_s=timeout_s)


def read_path(fs: Any, path: str, label: str, *, max_bytes: int = MAX_CONFIG_FILE_BYTES,
              timeout_s: float = DEFAULT_READ_TIMEOUT_S) -> bytes:
    """:func:`read_file` on an already-resolved fsspec filesystem; ``label`` names the file in messages."""
    local = storage.is_local(fs)

    def read() -> bytes:
        if local:
            return read_local(path, max_bytes, key="the size limit")
        return fs.cat_file(path, start=0, end=max_bytes + 1)

    try:
        data = call_with_timeout(read, timeout_s, label, key="read timeout")
    except InputReadError as exc:
        text = str(exc)
        if text.startswith(label):
            raise
        reason = text[len(path) + 2:] if text.startswith(f"{path}: ") else text
        raise InputReadError(exc.kind, f"{label}: {reason}") from None
    except (FileNotFoundError, IsADirectoryError):
        raise
    except Exception as exc:  # noqa: BLE001 - one readable line naming the URI
        raise storage.describe_storage_error(label, exc) from exc
    if len(data) > max_bytes:
        raise InputReadError("file_too_large", f"{label}: more than the size limit ({max_bytes} bytes)")
    return data
