#!/usr/bin/env python3
"""Create the nightly classification RayJob for one archive date.

Run by the CronJob in ``cronjob-nightly.yaml`` (both files arrive through the
``bloodray-nightly`` ConfigMap): renders ``rayjob-classify.yaml`` for
yesterday's date in the schedule's time zone and creates it through the
Kubernetes API with the pod's service-account token -- ``get`` and ``create``
on ``rayjobs`` are all it needs (``rbac.yaml``).

    submit_nightly.py                        # yesterday in $SCHEDULE_TIMEZONE (default UTC)
    submit_nightly.py --date 2024-05-01      # a given date (backfill)
    submit_nightly.py --date 2024-05-01 --name-suffix rerun1
    submit_nightly.py --date 2024-05-01 --dry-run | kubectl create -f -

One RayJob per date: if ``bloodray-classify-<date>`` already exists it is
reported and left alone (exit 0), so a retried or duplicated CronJob run never
starts a second classification. Exit codes: 0 created or already there,
1 Kubernetes API error, 2 bad arguments or template.

Only the standard library and PyYAML (a bloodray dependency, so present in the
bloodray image) are used.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import ssl
import string
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml

DEFAULT_TEMPLATE = Path(__file__).with_name("rayjob-classify.yaml")
SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
RAYJOB_API = "/apis/ray.io/v1/namespaces/{namespace}/rayjobs"
#: KubeRay derives cluster, service and Job names from the RayJob name; keep it short.
MAX_NAME_LENGTH = 47
_DATE_RE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_NAME_RE = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


class SubmitError(Exception):
    """A problem with the arguments or the template (exit code 2)."""


def yesterday(timezone: str, now: dt.datetime | None = None) -> str:
    """The calendar date before ``now`` (default: the current time) in ``timezone``, as YYYY-MM-DD."""
    try:
        tz = ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise SubmitError(f"unknown time zone {timezone!r} (is tzdata installed?)") from exc
    now = now or dt.datetime.now(dt.timezone.utc)
    if now.tzinfo is None:
        raise SubmitError("now must be timezone-aware")
    return (now.astimezone(tz).date() - dt.timedelta(days=1)).isoformat()


def check_date(value: str) -> str:
    """Return ``value`` if it is a real YYYY-MM-DD date."""
    try:
        if not _DATE_RE.match(value):
            raise ValueError
        dt.date.fromisoformat(value)
    except ValueError:
        raise SubmitError(f"expected a date YYYY-MM-DD, got {value!r}") from None
    return value


def render(template_text: str, run_date: str, name_suffix: str = "") -> dict[str, Any]:
    """The RayJob object for ``run_date``: ``${RUN_DATE}`` substituted, name checked."""
    check_date(run_date)
    try:
        text = string.Template(template_text).substitute(RUN_DATE=run_date)
    except (KeyError, ValueError) as exc:
        raise SubmitError(f"template: only ${{RUN_DATE}} may be substituted (write $$ for a literal $): {exc}") from None
    docs = [doc for doc in yaml.safe_load_all(text) if doc is not None]
    if len(docs) != 1 or not isinstance(docs[0], dict) or docs[0].get("kind") != "RayJob":
        raise SubmitError("template: expected exactly one RayJob document")
    job = docs[0]
    metadata = job.setdefault("metadata", {})
    name = str(metadata.get("name", ""))
    if name_suffix:
        name = f"{name}-{name_suffix}"
    if len(name) > MAX_NAME_LENGTH or not _NAME_RE.match(name):
        raise SubmitError(f"RayJob name {name!r}: use lowercase letters, digits and '-', "
                          f"at most {MAX_NAME_LENGTH} characters")
    metadata["name"] = name
    try:
        json.dumps(job)
    except TypeError as exc:  # e.g. an unquoted date, which YAML reads as a timestamp
        raise SubmitError(f"template: a value is not plain JSON (quote it): {exc}") from None
    return job


class KubeAPI:
    """The in-cluster Kubernetes API, authenticated with the pod's service-account token."""

    def __init__(self, sa_dir: Path = SERVICE_ACCOUNT_DIR) -> None:
        host = os.environ.get("KUBERNETES_SERVICE_HOST")
        port = os.environ.get("KUBERNETES_SERVICE_PORT", "443")
        if not host:
            raise SubmitError("not running in a Kubernetes pod (KUBERNETES_SERVICE_HOST unset); use --dry-run")
        if ":" in host:  # IPv6
            host = f"[{host}]"
        self.base = f"https://{host}:{port}"
        self.sa_dir = sa_dir
        context = ssl.create_default_context(cafile=str(sa_dir / "ca.crt"))
        # Talk to the API server directly, never through an HTTP(S)_PROXY from the environment.
        self.opener = urllib.request.build_opener(urllib.request.ProxyHandler({}),
                                                  urllib.request.HTTPSHandler(context=context))

    def namespace(self) -> str:
        return (self.sa_dir / "namespace").read_text().strip()

    def request(self, method: str, path: str, body: dict[str, Any] | None = None) -> tuple[int, dict[str, Any]]:
        # Read the token on every call: projected tokens are rotated by the kubelet.
        token = (self.sa_dir / "token").read_text().strip()
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.base + path, data=data, method=method, headers={
            "Authorization": f"Bearer {token}", "Accept": "application/json",
            **({"Content-Type": "application/json"} if data is not None else {})})
        try:
            with self.opener.open(req, timeout=30) as resp:
                return resp.status, json.loads(resp.read() or b"{}")
        except urllib.error.HTTPError as exc:
            try:
                payload = json.loads(exc.read() or b"{}")
            except ValueError:
                payload = {}
            return exc.code, payload


def submit(api: KubeAPI, job: dict[str, Any]) -> int:
    """Create ``job`` unless a RayJob of that name exists; returns the exit code."""
    namespace = job["metadata"].get("namespace") or api.namespace()
    job["metadata"]["namespace"] = namespace
    name = job["metadata"]["name"]
    collection = RAYJOB_API.format(namespace=namespace)
    status, existing = api.request("GET", f"{collection}/{name}")
    if status == 200:
        state = existing.get("status", {})
        print(f"rayjob {namespace}/{name} already exists (deployment status "
              f"{state.get('jobDeploymentStatus') or 'unknown'}, job status {state.get('jobStatus') or 'unknown'}); "
              "not creating it again. To re-run the date, delete it or pass --name-suffix.")
        return 0
    if status != 404:
        print(f"error: GET rayjob {namespace}/{name}: HTTP {status}: {existing.get('message', '')}", file=sys.stderr)
        return 1
    status, created = api.request("POST", collection, job)
    if status == 409:  # created meanwhile by a concurrent run
        print(f"rayjob {namespace}/{name} already exists; not creating it again.")
        return 0
    if status not in (200, 201):
        print(f"error: create rayjob {namespace}/{name}: HTTP {status}: {created.get('message', '')}", file=sys.stderr)
        return 1
    print(f"created rayjob {namespace}/{name}: {job['spec'].get('entrypoint', '')}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--date", help="archive date YYYY-MM-DD (default: yesterday in --timezone)")
    parser.add_argument("--timezone", default=os.environ.get("SCHEDULE_TIMEZONE", "UTC"),
                        help="time zone that decides 'yesterday' (default: $SCHEDULE_TIMEZONE or UTC)")
    parser.add_argument("--template", type=Path, default=DEFAULT_TEMPLATE, help="RayJob template with ${RUN_DATE}")
    parser.add_argument("--name-suffix", default="", help="appended to the RayJob name, to re-run a date")
    parser.add_argument("--dry-run", action="store_true", help="print the rendered RayJob as YAML; create nothing")
    args = parser.parse_args(argv)
    try:
        run_date = check_date(args.date) if args.date else yesterday(args.timezone)
        job = render(args.template.read_text(), run_date, args.name_suffix)
        if args.dry_run:
            sys.stdout.write(yaml.safe_dump(job, sort_keys=False))
            return 0
        return submit(KubeAPI(), job)
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, FileNotFoundError) else 1
    except SubmitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
