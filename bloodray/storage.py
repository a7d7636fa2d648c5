"""Local and object-storage access through fsspec.

Every URI in bloodray (data roots, archives, checkpoints, outputs) goes through
:func:`filesystem`, so ``/data/pbc``, ``file:///data/pbc`` and
``s3://bucket/pbc`` behave the same. S3 credentials come from the standard AWS
chain (environment, shared config, instance profile, web identity), which
botocore refreshes on its own; only non-secret options such as the endpoint URL
are passed in from configuration.

No key or secret is passed to s3fs (configs refuse them), so its client
holds botocore's refreshable credentials: a long-lived filesystem (fsspec
caches one instance per option set, and Ray Train keeps one for a whole run)
fetches new ones before the old ones expire instead of freezing those it
started with.
"""

from __future__ import annotations

import io
import json
import posixpath
import re
import uuid
from typing import Any, Mapping

import fsspec
from fsspec.core import url_to_fs

#: Substrings (of a key name lowercased with ``_``/``-`` removed) that mark a credential: ``aws_secret_access_key``,
#: ``aws_session_token``, ``SSECustomerKey``, ``api_key``, ``password``... Used to refuse credentials in configs and to
#: redact anything that still reaches a saved config.
#: Not secrets, and not matched: ``SSEKMSKeyId`` (a key's name), ``config_kwargs.signature_version``.
SECRET_KEY_HINTS = ("secret", "password", "passwd", "token", "credential", "accesskey", "session",
                    "customerkey", "apikey", "privatekey", "bearer", "authorization")
#: Whole key names that are credentials on their own (s3fs's ``key``/``secret``/``token``, ``pwd``...).
SECRET_KEY_NAMES = frozenset({"key", "secret", "token", "password", "passwd", "pwd", "auth", "credentials"})
REDACTED = "***"
#: ``scheme://user:password@host``: the password part of a URL's user info (group 2), up to the first ``@`` before
#: the path. A user name alone (``https://user@host``) is not a secret.
_URL_PASSWORD = re.compile(r"(?P<head>\b[a-zA-Z][a-zA-Z0-9+.\-]*://[^/\s:@?#]*:)(?P<password>[^/\s@?#]+)(?P<tail>@)")
#: botocore retries for S3: legacy mode (no client-wide retry quota to run dry when many parallel reads hit the
#: same blip) with 6 retries after the first attempt, exponential backoff with jitter (up to 1+2+4+8+16+32 s): a
#: storage blip of several seconds is ridden out, a real outage still fails within about a minute.
#: ``storage.options.config_kwargs.retries`` overrides it.
S3_RETRIES = {"mode": "legacy", "max_attempts": 6}
#: Seconds to open a connection to object storage, and to wait for any byte of an answer, per attempt
#: (``storage.connect_timeout_s`` / ``storage.read_timeout_s``). An endpoint that accepts connections and never
#: answers fails each attempt after the read timeout, so the whole call after the 7 attempts of
#: :data:`S3_RETRIES` (plus their backoff).
DEFAULT_CONNECT_TIMEOUT_S = 10.0
DEFAULT_READ_TIMEOUT_S = 60.0


class StorageError(RuntimeError):
    """A storage location cannot be reached or read; the message names the URI."""


def _s3_options(options: Mapping[str, Any]) -> dict[str, Any]:
    opts = dict(options)
    endpoint = opts.pop("endpoint_url", None)
    if endpoint:
        client_kwargs = dict(opts.pop("client_kwargs", {}) or {})
        client_kwargs.setdefault("endpoint_url", endpoint)
        opts["client_kwargs"] = client_kwargs
    config_kwargs = dict(opts.pop("config_kwargs", {}) or {})
    config_kwargs.setdefault("retries", dict(S3_RETRIES))
    config_kwargs.setdefault("connect_timeout", DEFAULT_CONNECT_TIMEOUT_S)
    config_kwargs.setdefault("read_timeout", DEFAULT_READ_TIMEOUT_S)
    opts["config_kwargs"] = config_kwargs
    return opts


def protocol_of(uri: str) -> str:
    """Return the fsspec protocol of ``uri`` (``file`` for plain paths)."""
    return uri.split("://", 1)[0] if "://" in uri else "file"


def filesystem(uri: str, storage_options: Mapping[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """Return ``(fs, path)`` for ``uri``; ``path`` has no protocol prefix."""
    options = dict(storage_options or {})
    protocol = protocol_of(uri)
    if protocol in ("s3", "s3a"):
        options = _s3_options(options)
    else:
        # Storage options are per-protocol; S3 settings must not leak into local access.
        options = {}
    fs, path = url_to_fs(uri, **options)
    if protocol in ("s3", "s3a"):
        # botocore already retries timeouts and connection errors (S3_RETRIES); s3fs's own 5 retries on top
        # multiplied them: an endpoint that never answered was reported after ~11 minutes.
        fs.retries = 1
    return fs, path


def full_uri(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """Turn an fsspec path back into a URI that names its protocol."""
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    if protocol in ("file", "local"):
        return path
    return f"{protocol}://{path}" if not path.startswith(f"{protocol}://") else path


def join(base: str, *parts: str) -> str:
    """Join URI or path segments with ``/`` while keeping the protocol."""
    if "://" in base:
        protocol, rest = base.split("://", 1)
        return f"{protocol}://" + posixpath.join(rest, *parts)
    return posixpath.join(base, *parts)


def write_bytes(uri: str, data: bytes, storage_options: Mapping[str, Any] | None = None) -> None:
    """Write ``data`` to a local path or object-storage URI, creating local parent folders."""
    fs, path = filesystem(uri, storage_options)
    parent = posixpath.dirname(path)
    if parent:
        fs.makedirs(parent, exist_ok=True)
    with fs.open(path, "wb") as fh:
        fh.write(data)


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    """True for a local-disk filesystem (where folders exist and a rename is atomic)."""
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
    return bool({"file", "local"} & set(protocols))


def put_bytes(fs: fsspec.AbstractFileSystem, path: str, data: bytes, atomic: bool = False) -> None:
    """Write ``data`` at ``path`` of an already-resolved filesystem.

    On local disk parent folders are created and ``atomic=True`` writes a hidden temporary file and renames it, so a
    reader never sees half a file. On an object store one PUT is already all-or-nothing, and no folder markers are
    made (creating "folders" there would at best write marker objects and at worst try to create a bucket).
    """
    if is_local(fs):
        fs.makedirs(posixpath.dirname(path), exist_ok=True)
        if atomic:
            tmp = posixpath.join(posixpath.dirname(path), f".{posixpath.basename(path)}.{uuid.uuid4().hex[:8]}.tmp")
            with fs.open(tmp, "wb") as fh:
                fh.write(data)
            fs.mv(tmp, path)
            return
    with fs.open(path, "wb") as fh:
        fh.write(data)


def write_json(uri: str, payload: Any, storage_options: Mapping[str, Any] | None = None) -> None:
    """Write ``payload`` as indented JSON (non-JSON values through ``str``)."""
    write_bytes(uri, json.dumps(payload, indent=2, default=str).encode(), storage_options)


def read_json(uri: str, storage_options: Mapping[str, Any] | None = None) -> Any:
    """Read a JSON document from a local path or object-storage URI."""
    fs, path = filesystem(uri, storage_options)
    with fs.open(path, "rb") as fh:
        return json.loads(fh.read())


def parquet_bytes(table: Any) -> bytes:
    """Serialise a pyarrow table to Parquet bytes (for one-PUT writes of small tables)."""
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def human_duration(seconds: float | None) -> str:
    """``3725`` -> ``1h02m``, ``75`` -> ``1m15s``, ``9`` -> ``9s``; ``None`` -> ``-``."""
    if seconds is None:
        return "-"
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def is_secret_key(name: Any) -> bool:
    """True when a mapping key names a credential (``key``, ``secret``, ``aws_secret_access_key``, ``SSECustomerKey``...)."""
    norm = re.sub(r"[^a-z0-9]", "", str(name).lower())
    return norm in SECRET_KEY_NAMES or any(h in norm for h in SECRET_KEY_HINTS)


def has_url_password(text: Any) -> bool:
    """True when ``text`` holds a URL with a password (``https://user:pass@host``)."""
    return isinstance(text, str) and _URL_PASSWORD.search(text) is not None


def redact_url(text: str) -> str:
    """``https://user:pass@host/x`` -> ``https://user:***@host/x``; other text unchanged."""
    return _URL_PASSWORD.sub(lambda m: f"{m['head']}{REDACTED}{m['tail']}", text)


def find_secrets(value: Any, prefix: str = "") -> list[str]:
    """Dotted keys under ``value`` that hold a credential: a secret-named key with a value, or a URL with a password.

    List items are named ``key[i]``. Empty values (``None``, ``""``, empty mappings/lists) are not secrets.
    """
    found: list[str] = []
    if isinstance(value, Mapping):
        for k, v in value.items():
            dotted = f"{prefix}.{k}" if prefix else str(k)
            if is_secret_key(k) and v not in (None, "") and not (isinstance(v, (Mapping, list, tuple)) and not v):
                found.append(dotted)
            else:
                found.extend(find_secrets(v, dotted))
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            found.extend(find_secrets(v, f"{prefix}[{i}]"))
    elif has_url_password(value):
        found.append(prefix or "<value>")
    return found


def redact(value: Any) -> Any:
    """Return a copy of ``value`` with anything that looks like a secret replaced.

    Values of secret-named keys (at any depth) become ``***``; passwords inside URLs (``https://user:pass@host``)
    become ``https://user:***@host``.
    """
    if isinstance(value, Mapping):
        return {k: (REDACTED if is_secret_key(k) and v not in (None, "") else redact(v)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact(v) for v in value)
    if isinstance(value, str):
        return redact_url(value)
    return value


def _is_timeout(exc: BaseException) -> bool:
    """True when ``exc`` or an exception it was raised from is a connect or read timeout."""
    seen = 0
    while exc is not None and seen < 8:
        name = type(exc).__name__
        if isinstance(exc, TimeoutError) or name in ("ReadTimeoutError", "ConnectTimeoutError", "FSTimeoutError",
                                                       "ServerTimeoutError"):
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


def describe_storage_error(uri: str, exc: BaseException) -> StorageError:
    """Wrap a low-level storage failure in one line a person can act on."""
    kind = type(exc).__name__
    text = str(exc).splitlines()[0] if str(exc) else kind
    if isinstance(exc, FileNotFoundError):
        return StorageError(f"{uri}: not found ({text})")
    if isinstance(exc, PermissionError):
        return StorageError(f"{uri}: access denied -- check the AWS credentials ({text})")
    if _is_timeout(exc):
        return StorageError(f"{uri}: object storage did not answer in time ({kind}: {text}); check the endpoint, "
                            "or raise storage.connect_timeout_s / storage.read_timeout_s")
    return StorageError(f"{uri}: {kind}: {text}")
