"""Typed job configuration: YAML defaults, ``--set dotted.key=value`` overrides.

Each job has one dataclass tree (see :mod:`bloodray.train.ray_trainer` and
:mod:`bloodray.nightly.pipeline`). :func:`load_config` reads a YAML file, applies
overrides, checks every key and type, and runs each section's ``validate()``.
Errors are :class:`ConfigError` and always name the dotted key at fault.

Two guards run before anything else: YAML anchors and aliases are refused (in
files and in ``--set`` values), so a few hundred bytes cannot expand into
gigabytes ("billion laughs"); and credentials are refused in every key at any
depth (secret-named keys such as ``storage.options.client_kwargs.aws_secret_access_key``
or ``s3_additional_kwargs.SSECustomerKey``, and URLs with a password). What is
saved (:func:`dump_yaml`, :func:`save_config`) is redacted as well.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import types
import typing
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence, TypeVar, get_args, get_origin, get_type_hints

import yaml

from bloodray import storage
from bloodray.bounded_read import read_file

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration value is missing, unknown, of the wrong type or out of range."""


CREDENTIALS_HINT = ("credentials must not be put in configs; use the AWS credential chain "
                    "(environment, ~/.aws profile, instance role, IRSA)")


def check_no_credentials(data: Any, prefix: str = "") -> None:
    """Refuse a config tree holding credentials, naming every dotted key at fault (never the values)."""
    found = storage.find_secrets(data, prefix)
    if found:
        raise ConfigError(f"{', '.join(found)}: {CREDENTIALS_HINT}")


class YAMLAliasError(yaml.YAMLError):
    """A YAML document uses an anchor (``&name``) or alias (``*name``); bloodray configs may not."""

    def __init__(self, what: str, mark: Any) -> None:
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        super().__init__(f"YAML {what} are not allowed in bloodray configs{where}; write the values out")


class _NoAliasLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that stops at the first anchor or alias, before any node is built or expanded."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            raise YAMLAliasError("aliases (*name)", event.start_mark)
        if getattr(event, "anchor", None) is not None:
            raise YAMLAliasError("anchors (&name)", event.start_mark)
        return super().compose_node(parent, index)


def _no_alias_dumper() -> type:
    class Dumper(yaml.SafeDumper):
        def ignore_aliases(self, data: Any) -> bool:  # shared objects are written out, never as &id001/*id001
            return True
    return Dumper


_Dumper = _no_alias_dumper()


def load_yaml_text(text: str) -> Any:
    """``yaml.safe_load`` without anchors/aliases (raises :class:`YAMLAliasError`, a ``yaml.YAMLError``)."""
    return yaml.load(text, Loader=_NoAliasLoader)  # noqa: S506 - a SafeLoader subclass


@dataclasses.dataclass
class StorageConfig:
    """Options for object storage shared by every URI of a job.

    Credentials are never configured here: they come from the standard AWS
    chain (environment, ``~/.aws``, instance profile, IRSA web identity), which
    refreshes them during long runs.
    """

    #: S3-compatible endpoint (MinIO, Ceph, ...); null = AWS S3.
    endpoint_url: str | None = None
    #: AWS region of the buckets; null = the AWS chain's.
    region: str | None = None
    #: anonymous access (public buckets), no credentials at all.
    anon: bool = False
    #: seconds to open a connection to object storage, per attempt.
    connect_timeout_s: float = storage.DEFAULT_CONNECT_TIMEOUT_S
    #: seconds to wait for an answer from object storage, per attempt (7 attempts with backoff).
    read_timeout_s: float = storage.DEFAULT_READ_TIMEOUT_S
    #: further s3fs/botocore options, e.g. ``config_kwargs.retries`` or ``config_kwargs.read_timeout``
    #: (never credentials: they are refused).
    options: dict[str, Any] = dataclasses.field(default_factory=dict)

    def storage_options(self) -> dict[str, Any]:
        """fsspec storage options for S3 URIs (refuses credentials, also when built without :func:`load_config`)."""
        self.validate("storage")
        opts: dict[str, Any] = dict(self.options)
        if self.endpoint_url:
            opts["endpoint_url"] = self.endpoint_url
        if self.region:
            opts.setdefault("client_kwargs", {})["region_name"] = self.region
        if self.anon:
            opts["anon"] = True
        config_kwargs = dict(opts.get("config_kwargs") or {})
        config_kwargs.setdefault("connect_timeout", self.connect_timeout_s)
        config_kwargs.setdefault("read_timeout", self.read_timeout_s)
        opts["config_kwargs"] = config_kwargs
        return opts

    def validate(self, prefix: str) -> None:
        # Any depth: options.key, options.client_kwargs.aws_secret_access_key, options.s3_additional_kwargs.SSECustomerKey,
        # and URLs with a password (endpoint_url: https://user:pass@host).
        check_no_credentials(dataclasses.asdict(self), prefix)
        for name in ("connect_timeout_s", "read_timeout_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 3600:
                raise ConfigError(f"{prefix}.{name}: expected seconds in (0, 3600], got {value!r}")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against annotation ``tp``; return it, converted where lossless."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{key}: must be one of {', '.join(map(repr, allowed))}; got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping of settings, got {value!r}")
        return from_dict(tp, value, prefix=key)
    if origin in (list, tuple, Sequence):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item_tp, *_rest) = get_args(tp) or (Any,)
        items = [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            # YAML reads dates and numbers eagerly; a string field takes them as written.
            return str(value)
        if hasattr(value, "isoformat"):
            return value.isoformat()
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported type {_type_name(tp)}")


def _apply_renamed_keys(cls: type, data: Mapping[str, Any], prefix: str) -> Mapping[str, Any]:
    """Translate keys a section renamed (its ``RENAMED_KEYS``: old name -> (new name, value map)).

    Users' YAML files and checkpoints sealed before the rename keep loading; a warning names the new key.
    """
    renamed = getattr(cls, "RENAMED_KEYS", None)
    if not renamed or not any(k in renamed for k in data):
        return data
    out = dict(data)
    for old, (new, values) in renamed.items():
        if old not in out:
            continue
        value = out.pop(old)
        dotted_old = f"{prefix}.{old}" if prefix else old
        dotted_new = f"{prefix}.{new}" if prefix else new
        if new in out:
            raise ConfigError(f"{dotted_old}: renamed to {dotted_new}; give only {dotted_new}")
        if value not in values:
            raise ConfigError(f"{dotted_old}: (renamed to {dotted_new}) expected one of "
                              f"{', '.join(map(repr, values))}, got {value!r}")
        out[new] = values[value]
        logging.getLogger(__name__).warning("%s is deprecated: read as %s: %s", dotted_old, dotted_new,
                                            values[value])
    return out


def from_dict(cls: type[T], data: Mapping[str, Any], prefix: str = "") -> T:
    """Build dataclass ``cls`` from ``data``, naming the dotted key of any error."""
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    data = _apply_renamed_keys(cls, data, prefix)
    for key, value in data.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f" (did you mean '{prefix + '.' if prefix else ''}{close[0]}'?)" if close else ""
            raise ConfigError(f"{dotted}: unknown key{hint}; known keys: {', '.join(sorted(fields))}")
        kwargs[key] = _coerce(value, hints[key], dotted)
    missing = [n for n, f in fields.items()
               if n not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(", ".join(f"{prefix + '.' if prefix else ''}{m}" for m in missing) + ": required")
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain-dict view of a config (for YAML, JSON and Ray)."""
    return dataclasses.asdict(cfg)


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse ``dotted.key=value``; the value is read as YAML (``3``, ``true``, ``[a, b]``)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected dotted.key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {text!r}: empty key")
    try:
        value = load_yaml_text(raw) if raw.strip() else ""
    except YAMLAliasError as exc:
        raise ConfigError(f"--set {key}: {exc}") from exc
    except (yaml.YAMLError, ValueError):
        # e.g. "2024-13-01" looks like a date to YAML but is not one: keep the text and let the field check it.
        value = raw
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Return a copy of ``data`` with each ``dotted.key=value`` applied."""
    result = yaml.safe_load(yaml.safe_dump(data)) or {}
    for text in overrides:
        path, value = parse_override(text)
        node = result
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"{'.'.join(path)}: '{part}' is a value, not a section")
            node = child
        node[path[-1]] = value
    return result


def validate_tree(cfg: Any, prefix: str = "") -> None:
    """Call ``validate(prefix)`` on every dataclass section that defines it (at the root: refuse credentials first)."""
    if not prefix:
        check_no_credentials(to_dict(cfg))
    for field in dataclasses.fields(cfg):
        value = getattr(cfg, field.name)
        if dataclasses.is_dataclass(value):
            validate_tree(value, f"{prefix}.{field.name}" if prefix else field.name)
    if hasattr(cfg, "validate"):
        cfg.validate(prefix)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping; errors name the file."""
    try:
        text = read_file(str(path), what="config file").decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: config file is not UTF-8 text ({exc})") from exc
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file ({exc.strerror or exc})") from exc
    try:
        data = load_yaml_text(text) or {}
    except YAMLAliasError as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data


def load_config(cls: type[T], path: str | Path | None = None, overrides: Sequence[str] = (),
                base: Mapping[str, Any] | None = None) -> T:
    """Load ``cls`` from ``base`` defaults, then the YAML at ``path``, then overrides."""
    data = dict(base or {})
    if path is not None:
        data = _deep_merge(data, read_yaml(path))
    data = apply_overrides(data, overrides)
    # Before any type check, so no error message ever echoes a secret value.
    check_no_credentials(data)
    cfg = from_dict(cls, data)
    validate_tree(cfg)
    return cfg


def _deep_merge(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for key, value in b.items():
        out[key] = _deep_merge(out[key], value) if isinstance(value, Mapping) and isinstance(out.get(key), Mapping) else value
    return out


def dump_yaml(cfg: Any) -> str:
    """YAML text of a config with secrets redacted."""
    return yaml.dump(storage.redact(to_dict(cfg)), Dumper=_Dumper, sort_keys=False)


def save_config(cfg: Any, uri: str, storage_options: Mapping[str, Any] | None = None) -> None:
    """Write the final (redacted) config as YAML to ``uri``."""
    storage.write_bytes(uri, dump_yaml(cfg).encode(), storage_options)
