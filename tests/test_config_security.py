"""Configs refuse credentials (any key, any depth, URLs with passwords) and YAML anchors/aliases; saved configs are
redacted."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from bloodray import storage
from bloodray.config import (ConfigError, StorageConfig, dump_yaml, from_dict, load_config, parse_override,
                             read_yaml, save_config)


@dataclasses.dataclass
class InputSection:
    uri: str
    files: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class Job:
    """A small job config tree with the real :class:`StorageConfig`."""

    input: InputSection
    storage: StorageConfig = dataclasses.field(default_factory=StorageConfig)


BASE = {"input": {"uri": "s3://archive/day"}}
SECRET = "wJalrXUtnFEMI-K7MDENG-bPxRfiCYEXAMPLEKEY"

# The 8-level "billion laughs": 9**8 = 43 million strings when expanded (the case, under storage.options).
ALIAS_BOMB = """storage:
  options:
    a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]
    b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
    c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
    d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
    e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
    f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
    g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]
    h: &h [*g,*g,*g,*g,*g,*g,*g,*g,*g]
    i: &i [*h,*h,*h,*h,*h,*h,*h,*h,*h]
"""


def load(overrides=(), path=None):
    return load_config(Job, path, overrides, base=BASE)


@pytest.mark.parametrize("override, key", [
    (f"storage.options.key={SECRET}", "storage.options.key"),
    (f"storage.options.secret={SECRET}", "storage.options.secret"),
    (f"storage.options.token={SECRET}", "storage.options.token"),
    (f"storage.options.client_kwargs={{aws_secret_access_key: {SECRET}}}",
     "storage.options.client_kwargs.aws_secret_access_key"),
    (f"storage.options.client_kwargs.aws_access_key_id={SECRET}", "storage.options.client_kwargs.aws_access_key_id"),
    (f"storage.options.client_kwargs.aws_session_token={SECRET}", "storage.options.client_kwargs.aws_session_token"),
    (f"storage.options.s3_additional_kwargs.SSECustomerKey={SECRET}",
     "storage.options.s3_additional_kwargs.SSECustomerKey"),
    (f"storage.options.config_kwargs.proxies.deep.password={SECRET}",
     "storage.options.config_kwargs.proxies.deep.password"),
    (f"storage.endpoint_url=https://minio:{SECRET}@minio.lab:9000", "storage.endpoint_url"),
    (f"storage.options.client_kwargs.endpoint_url=http://u:{SECRET}@h", "storage.options.client_kwargs.endpoint_url"),
    (f"input.uri=https://reader:{SECRET}@archive.lab/day", "input.uri"),
    (f"input.files=[a.tar, 'ftp://u:{SECRET}@host/b.tar']", "input.files[1]"),
])
def test_credentials_are_refused_naming_the_dotted_key(override, key):
    with pytest.raises(ConfigError) as info:
        load([override])
    message = str(info.value)
    assert message.startswith(f"{key}: credentials must not be put in configs")
    assert "AWS credential chain" in message and SECRET not in message


def test_credentials_in_a_file_are_refused_and_all_keys_named(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump({"storage": {"options": {
        "key": "AKIAEXAMPLE", "client_kwargs": {"aws_secret_access_key": SECRET, "region_name": "eu-west-1"}}}}))
    with pytest.raises(ConfigError) as info:
        load(path=path)
    keys, _, rest = str(info.value).partition(": ")
    assert set(keys.split(", ")) == {"storage.options.key", "storage.options.client_kwargs.aws_secret_access_key"}
    assert rest.startswith("credentials must not be put in configs") and SECRET not in rest


def test_storage_config_built_in_code_refuses_credentials():
    """``storage_options()`` is the one way options reach s3fs; configs built without load_config are checked too."""
    with pytest.raises(ConfigError, match="storage.options.client_kwargs.aws_secret_access_key: credentials"):
        StorageConfig(options={"client_kwargs": {"aws_secret_access_key": SECRET}}).storage_options()
    with pytest.raises(ConfigError, match="storage.endpoint_url: credentials"):
        StorageConfig(endpoint_url=f"https://u:{SECRET}@h").storage_options()


def test_non_secret_options_still_work():
    cfg = load(["storage.endpoint_url=http://127.0.0.1:9000", "storage.region=eu-west-1",
                "storage.options.s3_additional_kwargs={ServerSideEncryption: 'aws:kms', SSEKMSKeyId: 'arn:aws:kms:k'}",
                "storage.options.config_kwargs.signature_version=s3v4",
                "storage.options.client_kwargs.verify=false", "storage.options.key=",
                "input.uri=https://reader@archive.lab/day"])
    opts = cfg.storage.storage_options()
    assert opts["endpoint_url"] == "http://127.0.0.1:9000"
    fs, path = storage.filesystem("s3://bucket/prefix", opts)
    assert path == "bucket/prefix" and fs.client_kwargs["endpoint_url"] == "http://127.0.0.1:9000"
    assert fs.client_kwargs["region_name"] == "eu-west-1"


def test_saved_config_is_redacted(tmp_path):
    # from_dict does no checks: what if something secret-like still reaches a saved config?
    cfg = from_dict(Job, {"input": {"uri": f"https://reader:{SECRET}@archive.lab/day"}, "storage": {
        "endpoint_url": f"https://minio:{SECRET}@minio.lab:9000",
        "options": {"key": "AKIAEXAMPLE", "client_kwargs": {"aws_secret_access_key": SECRET},
                    "s3_additional_kwargs": {"SSECustomerAlgorithm": "AES256", "SSECustomerKey": SECRET},
                    "config_kwargs": {"signature_version": "s3v4"}}}})
    save_config(cfg, str(tmp_path / "run" / "config.yaml"))
    text = (tmp_path / "run" / "config.yaml").read_text()
    assert text == dump_yaml(cfg)  # the manifest's config_yaml is the same text
    assert SECRET not in text and "AKIAEXAMPLE" not in text
    saved = yaml.safe_load(text)
    assert saved["input"]["uri"] == "https://reader:***@archive.lab/day"
    assert saved["storage"]["endpoint_url"] == "https://minio:***@minio.lab:9000"
    options = saved["storage"]["options"]
    assert options["key"] == options["client_kwargs"]["aws_secret_access_key"] == "***"
    assert options["s3_additional_kwargs"] == {"SSECustomerAlgorithm": "AES256", "SSECustomerKey": "***"}
    assert options["config_kwargs"] == {"signature_version": "s3v4"}


def test_redact_keeps_non_secrets():
    value = {"a": [{"token": "t"}, "s3://bucket/a:b@c", "https://user@host"], "kwargs": {"key_size": None}}
    assert storage.redact(value) == {"a": [{"token": "***"}, "s3://bucket/a:b@c", "https://user@host"],
                                     "kwargs": {"key_size": None}}


def test_yaml_alias_bomb_in_a_file_is_refused(tmp_path):
    path = tmp_path / "bomb.yaml"
    path.write_text(ALIAS_BOMB)
    with pytest.raises(ConfigError, match=rf"^{path}: YAML anchors \(&name\) are not allowed .*line 3"):
        load(path=path)
    with pytest.raises(ConfigError, match=str(path)):
        read_yaml(path)


@pytest.mark.parametrize("text", [
    "a: &x 1\nb: 2\n",                         # an anchor alone
    "base: {a: 1}\nb: *x\n",                   # an alias (of an undefined anchor: refused before the lookup)
])
def test_anchors_and_aliases_are_refused(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=rf"^{path}: YAML (anchors|aliases)"):
        read_yaml(path)


def test_yaml_alias_bomb_in_set_is_refused():
    bomb = "storage.options={a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol], " + ", ".join(
        f"{k}: &{k} [{', '.join([f'*{p}'] * 9)}]" for p, k in zip("abcdefgh", "bcdefghi")) + "}"
    with pytest.raises(ConfigError, match=r"^--set storage\.options: YAML anchors"):
        parse_override(bomb)
    with pytest.raises(ConfigError, match=r"^--set storage\.options: YAML anchors"):
        load([bomb])


def test_plain_set_values_still_parse():
    assert parse_override("a.b=[1, 2]") == (["a", "b"], [1, 2])
    assert parse_override("a=2024-13-01") == (["a"], "2024-13-01")
    assert parse_override("a=x*y&z") == (["a"], "x*y&z")
