"""Static checks of the deployment files under ``cluster/`` (see cluster/README.md).

Pure parsing -- no Docker, Kubernetes or Ray cluster: every YAML/JSON file
parses; the Kubernetes objects are well-formed and live in one namespace; the
RayJob entrypoints name scripts, configs and ``--set`` keys that really exist in
bloodray (validated with bloodray's own config loaders); the RayJobs clean up
after themselves and resume; the GPU worker groups request GPUs; one image name
is used everywhere; the Dockerfile installs the pinned torch; the IAM policy
covers every S3 URI the jobs use; the nightly submitter renders and submits the
right RayJob; and no AWS key material appears anywhere under ``cluster/``.
"""

from __future__ import annotations

import datetime as dt
import fnmatch
import http.server
import importlib.util
import json
import re
import shlex
import subprocess
import sys
import threading
import urllib.request
import zoneinfo
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
KUBERAY = CLUSTER / "kuberay"
AWS_LAUNCHER = CLUSTER / "aws" / "cluster.yaml"
IAM_POLICY = CLUSTER / "aws" / "iam-policy-s3.json"
DOCKERFILE = CLUSTER / "Dockerfile"
DOCKERIGNORE = CLUSTER / "Dockerfile.dockerignore"
README = CLUSTER / "README.md"
#: Where the Dockerfile puts the repository (its WORKDIR).
APP_DIR = "/app"
NAMESPACE = "bloodray"
#: Used for shell variables and ${RUN_DATE} in entrypoints.
FIXED_DATE = "2024-05-01"
NAMESPACED_KINDS = {"ServiceAccount", "Role", "RoleBinding", "CronJob", "RayCluster", "RayJob", "ConfigMap"}


# ----------------------------------------------------------------------------- helpers


def _yaml_files() -> list[Path]:
    return sorted([*CLUSTER.rglob("*.yaml"), *CLUSTER.rglob("*.yml")])


@lru_cache(maxsize=None)
def _docs(path: Path) -> tuple[Any, ...]:
    return tuple(doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None)


def _one(path: Path, kind: str | None = None) -> dict[str, Any]:
    docs = [d for d in _docs(path) if kind is None or d.get("kind") == kind]
    assert len(docs) == 1, f"{path.name}: expected one {kind or 'document'}, found {len(docs)}"
    return docs[0]


def _k8s_docs() -> list[tuple[Path, dict[str, Any]]]:
    """Every Kubernetes document under cluster/kuberay; the RayJob template rendered for FIXED_DATE."""
    docs = []
    for path in _yaml_files():
        if KUBERAY in path.parents:
            rendered = path.name == "rayjob-classify.yaml"
            docs += [(path, _rendered_classify())] if rendered else [(path, d) for d in _docs(path)]
    return docs


def _of_kind(kind: str) -> list[dict[str, Any]]:
    return [d for _p, d in _k8s_docs() if d.get("kind") == kind]


@lru_cache(maxsize=None)
def _image() -> str:
    return (CLUSTER / "IMAGE").read_text().strip()


@lru_cache(maxsize=None)
def _pyproject() -> str:
    return (ROOT / "pyproject.toml").read_text()


def _pin(package: str) -> str:
    match = re.search(rf'"{re.escape(package)}(?:\[[^\]]*\])?==([^"]+)"', _pyproject())
    assert match, f"pyproject.toml does not pin {package}"
    return match.group(1)


def _project_version() -> str:
    match = re.search(r'^version\s*=\s*"([^"]+)"', _pyproject(), re.M)
    assert match
    return match.group(1)


@lru_cache(maxsize=None)
def _submitter():
    spec = importlib.util.spec_from_file_location("bloodray_submit_nightly", KUBERAY / "submit_nightly.py")
    module = importlib.util.module_from_spec(spec)
    saved, sys.dont_write_bytecode = sys.dont_write_bytecode, True  # no __pycache__ inside cluster/
    try:
        spec.loader.exec_module(module)
    finally:
        sys.dont_write_bytecode = saved
    return module


def _rendered_classify(run_date: str = FIXED_DATE) -> dict[str, Any]:
    return _submitter().render((KUBERAY / "rayjob-classify.yaml").read_text(), run_date)


def _rayjobs() -> dict[str, dict[str, Any]]:
    return {"train": _one(KUBERAY / "rayjob-train.yaml", "RayJob"), "classify": _rendered_classify()}


def _ray_cluster_specs() -> dict[str, dict[str, Any]]:
    specs = {"raycluster.yaml": _one(KUBERAY / "raycluster.yaml", "RayCluster")["spec"]}
    specs.update({f"rayjob-{name}": job["spec"]["rayClusterSpec"] for name, job in _rayjobs().items()})
    return specs


def _substitute_shell(text: str) -> str:
    """Fixed values for the shell variables a scheduler would fill in."""
    return re.sub(r"\$\{?RUN_DATE\}?|\$\([^)]*\)", FIXED_DATE, text)


def _repo_path(path: str) -> Path:
    if path.startswith(APP_DIR + "/"):
        return ROOT / path[len(APP_DIR) + 1:]
    assert not path.startswith("/"), f"{path}: absolute paths must point into {APP_DIR} (the image's repository)"
    return ROOT / path


#: The only shell an entrypoint may hold after the command: a status that counts as success (``|| [ $? -eq N ]``).
_SUCCESS_TAIL = re.compile(r"\s*\|\|\s*\[\s*\$\?\s+-eq\s+(\d+)\s*\]\s*$")


def _accepted_status(entrypoint: str) -> int | None:
    """The exit status besides 0 that the entrypoint turns into success, if any."""
    match = _SUCCESS_TAIL.search(entrypoint)
    return int(match.group(1)) if match else None


def _parse_entrypoint(entrypoint: str) -> tuple[str, str, list[str]]:
    """``python <script> --config <yaml> [--set k=v | --date D | --incremental | --json | -q]... [|| [ $? -eq N ]]``
    -> (script, config, overrides)."""
    argv = shlex.split(_substitute_shell(_SUCCESS_TAIL.sub("", entrypoint)))
    assert argv[0] in ("python", "python3"), entrypoint
    script, rest = argv[1], argv[2:]
    config, overrides = None, []
    i = 0
    while i < len(rest):
        arg = rest[i]
        if arg == "--config":
            config = rest[i + 1]
            i += 2
        elif arg == "--set":
            overrides.append(rest[i + 1])
            i += 2
        elif arg == "--date":
            overrides.append(f"run.date={rest[i + 1]}")
            i += 2
        elif arg == "--incremental":
            overrides.append("run.incremental=true")
            i += 1
        elif arg in ("--json", "-q", "--quiet"):
            i += 1
        else:
            pytest.fail(f"unexpected entrypoint argument {arg!r} in {entrypoint!r}")
    assert config, f"no --config in {entrypoint!r}"
    return script, config, overrides


def _job_config(entrypoint: str):
    """The validated bloodray config the entrypoint would run with (ConfigError on unknown keys)."""
    script, config, overrides = _parse_entrypoint(entrypoint)
    if Path(script).name == "train.py":
        from bloodray.train.ray_trainer import load_train_config

        return load_train_config(str(_repo_path(config)), overrides)
    if Path(script).name == "classify.py":
        from bloodray.nightly.pipeline import ClassifyConfig
        from bloodray.config import load_config

        return load_config(ClassifyConfig, _repo_path(config), overrides)
    pytest.fail(f"{script}: not a bloodray job")


def _overrides(entrypoint: str) -> dict[str, str]:
    return dict(o.split("=", 1) for o in _parse_entrypoint(entrypoint)[2])


def _pod_templates(cluster_spec: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    yield "head", cluster_spec["headGroupSpec"]["template"]["spec"]
    for group in cluster_spec["workerGroupSpecs"]:
        yield group["groupName"], group["template"]["spec"]


def _gpus(pod: dict[str, Any]) -> int:
    return sum(int(c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0)) for c in pod["containers"])


def _cpu_limit(pod: dict[str, Any]) -> float:
    value = str(pod["containers"][0]["resources"]["limits"]["cpu"])
    return float(value[:-1]) / 1000 if value.endswith("m") else float(value)


def _images_in(obj: Any) -> Iterator[str]:
    if isinstance(obj, dict):
        for key, value in obj.items():
            if key in ("image", "head_image", "worker_image") and isinstance(value, str):
                yield value
            else:
                yield from _images_in(value)
    elif isinstance(obj, list):
        for item in obj:
            yield from _images_in(item)


# ----------------------------------------------------------------------------- every file parses


@pytest.mark.parametrize("path", _yaml_files(), ids=lambda p: str(p.relative_to(CLUSTER)))
def test_yaml_parses(path):
    assert _docs(path), f"{path}: no YAML documents"


@pytest.mark.parametrize("path", sorted(CLUSTER.rglob("*.json")), ids=lambda p: str(p.relative_to(CLUSTER)))
def test_json_parses(path):
    assert json.loads(path.read_text())


def test_expected_files_exist():
    for name in ["IMAGE", "README.md", "Dockerfile", "Dockerfile.dockerignore", "aws/cluster.yaml",
                 "aws/iam-policy-s3.json", "kuberay/raycluster.yaml", "kuberay/rayjob-train.yaml",
                 "kuberay/rayjob-classify.yaml", "kuberay/cronjob-nightly.yaml", "kuberay/rbac.yaml",
                 "kuberay/submit_nightly.py", "kuberay/kustomization.yaml"]:
        assert (CLUSTER / name).is_file(), name


def test_kubernetes_objects_are_identified_and_namespaced():
    docs = _k8s_docs()
    assert len(docs) >= 8
    for path, doc in docs:
        where = f"{path}: {doc.get('kind')}"
        assert isinstance(doc.get("apiVersion"), str) and doc["apiVersion"], where
        assert isinstance(doc.get("kind"), str) and doc["kind"], where
        name = doc.get("metadata", {}).get("name")
        assert isinstance(name, str) and re.fullmatch(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?", name), f"{where}: name {name!r}"
        if doc["kind"] in NAMESPACED_KINDS:
            assert doc["metadata"].get("namespace") == NAMESPACE, f"{where}: namespace"
    assert {d["kind"] for _p, d in docs} >= {"Namespace", "ServiceAccount", "Role", "RoleBinding", "CronJob",
                                             "RayCluster", "RayJob", "Kustomization"}
    assert _one(KUBERAY / "namespace.yaml", "Namespace")["metadata"]["name"] == NAMESPACE


# ----------------------------------------------------------------------------- RayJobs


@pytest.mark.parametrize("name", ["train", "classify"])
def test_rayjob_entrypoint_names_real_files_and_config_keys(name):
    job = _rayjobs()[name]
    entrypoint = job["spec"]["entrypoint"]
    script, config, overrides = _parse_entrypoint(entrypoint)
    assert _repo_path(script) == ROOT / "jobs" / f"{name}.py" and _repo_path(script).is_file()
    expected_config = {"train": "configs/train/resnet50.yaml", "classify": "configs/classify/nightly.yaml"}[name]
    assert _repo_path(config) == ROOT / expected_config and _repo_path(config).is_file()
    assert overrides, "the entrypoint should say where data and outputs are"
    for override in overrides:
        key, value = override.split("=", 1)
        assert "$" not in value, f"{override}: unsubstituted shell variable"
        if value.startswith(APP_DIR + "/"):
            assert _repo_path(value).exists(), f"{override}: no such file in the repository"
    cfg = _job_config(entrypoint)  # raises ConfigError naming any unknown key or bad value
    assert not cfg.storage.options, "storage options would travel to every worker; keep them empty"


@pytest.mark.parametrize("name", ["train", "classify"])
def test_rayjob_cleans_up_and_retries(name):
    spec = _rayjobs()[name]["spec"]
    assert spec["submissionMode"] == "K8sJobMode"
    assert spec["shutdownAfterJobFinishes"] is True
    for field in ("ttlSecondsAfterFinished", "activeDeadlineSeconds", "backoffLimit"):
        assert isinstance(spec.get(field), int) and spec[field] > 0, field
    assert spec["ttlSecondsAfterFinished"] <= 3600
    assert "rayClusterSpec" in spec and "clusterSelector" not in spec, "the job brings its own cluster"
    # The image holds the repository: no working_dir upload.
    assert "working_dir" not in spec.get("runtimeEnvYAML", "")


def test_training_rayjob_resumes_the_same_run():
    job = _rayjobs()["train"]
    entrypoint = job["spec"]["entrypoint"]
    overrides = _overrides(entrypoint)
    # A fixed run.name is what makes a retry or resubmission resume instead of restart.
    assert re.fullmatch(r"[A-Za-z0-9._-]+", overrides.get("run.name", "")), "run.name must be set explicitly"
    cfg = _job_config(entrypoint)
    assert cfg.data.root.startswith("s3://") and cfg.run.storage_path.startswith("s3://")
    assert cfg.model.name == "resnet50"
    assert cfg.scaling.use_gpu is True and cfg.scaling.num_workers == 4
    gpu = next(g for g in job["spec"]["rayClusterSpec"]["workerGroupSpecs"] if _gpus(g["template"]["spec"]))
    assert gpu["maxReplicas"] * _gpus(gpu["template"]["spec"]) >= cfg.scaling.num_workers * cfg.scaling.gpus_per_worker
    if cfg.scaling.cpus_per_worker is not None:
        assert _cpu_limit(gpu["template"]["spec"]) >= cfg.scaling.cpus_per_worker


def test_nightly_rayjob_for_a_fixed_date():
    job = _rendered_classify()
    assert job["metadata"]["name"] == f"bloodray-classify-{FIXED_DATE}"
    assert job["metadata"]["labels"]["bloodray.example.org/run-date"] == FIXED_DATE
    spec = job["spec"]
    cfg = _job_config(spec["entrypoint"])
    assert cfg.run.date == FIXED_DATE
    assert cfg.input.uri.startswith("s3://") and cfg.output.uri.startswith("s3://")
    # Shorter than the schedule's period: one night's run can never overlap the next.
    assert spec["activeDeadlineSeconds"] < 24 * 3600
    # With GPU actors on an autoscaling cluster that starts without GPUs, bloodray
    # needs a fixed actor pool (inference.concurrency) -- and the group must fit it.
    assert cfg.inference.num_gpus > 0 and cfg.inference.concurrency
    gpu = next(g for g in spec["rayClusterSpec"]["workerGroupSpecs"] if _gpus(g["template"]["spec"]))
    assert gpu["maxReplicas"] * _gpus(gpu["template"]["spec"]) >= cfg.inference.concurrency * cfg.inference.num_gpus
    # The model is the training RayJob's run.
    train = _job_config(_rayjobs()["train"]["spec"]["entrypoint"])
    assert cfg.model.checkpoint.rstrip("/") == f"{train.run.storage_path.rstrip('/')}/{train.run.name}"
    # The night writes its report and ends its log with the JSON run summary (cluster/README.md promises both).
    assert cfg.report.enabled is True
    assert "--json" in shlex.split(_SUCCESS_TAIL.sub("", spec["entrypoint"]))
    # KubeRay retries any failure on a new cluster: a run committed under the domain-shift alarm counts as
    # success, so it is not classified again; every other non-zero status still fails the RayJob.
    from bloodray import exit_codes

    assert _accepted_status(spec["entrypoint"]) == exit_codes.COMMITTED_WITH_ALARM
    assert _accepted_status(_rayjobs()["train"]["spec"]["entrypoint"]) is None
    tail = _SUCCESS_TAIL.search(spec["entrypoint"]).group(0)  # as rendered: the shell Ray Jobs runs it with
    for code, _status in exit_codes.table():
        shell = subprocess.run(["sh", "-c", f"(exit {code}){tail}"], capture_output=True, timeout=30)
        assert (shell.returncode == 0) == (code in (exit_codes.COMMITTED, exit_codes.COMMITTED_WITH_ALARM)), code


# ----------------------------------------------------------------------------- Ray cluster shape


@pytest.mark.parametrize("which", ["raycluster.yaml", "rayjob-train", "rayjob-classify"])
def test_ray_cluster_spec(which):
    spec = _ray_cluster_specs()[which]
    assert spec["rayVersion"] == _pin("ray")
    assert spec["enableInTreeAutoscaling"] is True
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0", "no Ray tasks/actors on the head"
    assert head.get("serviceType", "ClusterIP") == "ClusterIP", "never expose the dashboard publicly"
    groups = [head, *spec["workerGroupSpecs"]]
    for group in groups:
        for key, value in group.get("rayStartParams", {}).items():
            assert isinstance(value, str), f"rayStartParams.{key} must be a string (KubeRay's CRD)"
    for group in spec["workerGroupSpecs"]:
        assert group["minReplicas"] == 0 and group["maxReplicas"] >= 1, group["groupName"]
        assert group["minReplicas"] <= group.get("replicas", 0) <= group["maxReplicas"], group["groupName"]
    for name, pod in _pod_templates(spec):
        assert pod["serviceAccountName"] == "bloodray", f"{name}: S3 access comes from the IRSA ServiceAccount"
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        for container in pod["containers"]:
            limits = container["resources"]["limits"]
            assert limits.get("memory") and limits.get("cpu"), f"{name}: Ray sizes itself from the limits"
            assert not any(e["name"].startswith("AWS_") for e in container.get("env", [])), name
    assert _gpus(head["template"]["spec"]) == 0, "CPU head"
    gpu_groups = [g for g in spec["workerGroupSpecs"] if _gpus(g["template"]["spec"]) >= 1]
    cpu_groups = [g for g in spec["workerGroupSpecs"] if _gpus(g["template"]["spec"]) == 0]
    assert gpu_groups and cpu_groups, "a GPU worker group and a CPU worker group for the data stages"
    for group in gpu_groups:
        pod = group["template"]["spec"]
        for container in pod["containers"]:
            resources = container["resources"]
            assert int(resources["limits"]["nvidia.com/gpu"]) == int(resources["requests"]["nvidia.com/gpu"]) == 1
        assert any(t.get("key") == "nvidia.com/gpu" for t in pod.get("tolerations", [])), "GPU taint toleration"


def test_raycluster_gpu_group_autoscales_to_eight():
    spec = _ray_cluster_specs()["raycluster.yaml"]
    gpu = next(g for g in spec["workerGroupSpecs"] if _gpus(g["template"]["spec"]))
    assert (gpu["minReplicas"], gpu["maxReplicas"]) == (0, 8)


def test_service_account_carries_the_irsa_role():
    accounts = {d["metadata"]["name"]: d for d in _of_kind("ServiceAccount")}
    role_arn = accounts["bloodray"]["metadata"]["annotations"]["eks.amazonaws.com/role-arn"]
    assert re.fullmatch(r"arn:aws:iam::\d{12}:role/[\w+=,.@-]+", role_arn)


# ----------------------------------------------------------------------------- one image


def test_one_image_everywhere():
    image = _image()
    repo, _, tag = image.rpartition(":")
    assert repo and "/" in repo and tag == _project_version(), "tag the image with the package version"
    found: dict[str, set[str]] = {}
    for path, doc in _k8s_docs():
        found.setdefault(path.name, set()).update(_images_in(doc))
    found["aws/cluster.yaml"] = set(_images_in(_one(AWS_LAUNCHER)))
    for name in ("raycluster.yaml", "rayjob-train.yaml", "rayjob-classify.yaml", "cronjob-nightly.yaml",
                 "aws/cluster.yaml"):
        assert found.get(name), f"{name}: no image found"
    for name, images in found.items():
        assert images <= {image}, f"{name}: {sorted(images - {image})} differ from cluster/IMAGE ({image})"
    readme = README.read_text()
    assert image in readme and "docker build -f cluster/Dockerfile" in readme
    label = re.search(r'org\.opencontainers\.image\.version="([^"]+)"', DOCKERFILE.read_text())
    assert label and label.group(1) == tag


# ----------------------------------------------------------------------------- Dockerfile


def test_dockerfile_installs_pinned_torch_and_copies_the_repo():
    text = DOCKERFILE.read_text()
    instructions = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    assert any(line.startswith("FROM ") for line in instructions)
    assert f"torch=={_pin('torch')}" in text and _pin("torch") == "2.14.1"
    assert f"torchvision=={_pin('torchvision')}" in text
    assert re.search(r"^COPY\b.*\s\.\s+/app/?\s*$", text, re.M), "copies the repository to /app"
    assert re.search(r"pip install\b.*\s/app\b", text), "installs bloodray from /app"
    assert re.search(r"^WORKDIR\s+/app\s*$", text, re.M)
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert users and users[-1].split(":")[0] not in ("root", "0"), "runs as a non-root user"
    assert not re.search(r"^(ENV|ARG)\s+.*AWS_", text, re.M | re.I), "no AWS settings baked in"
    ignored = {line.strip().strip("/") for line in DOCKERIGNORE.read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert {".venv", "runs", "demo-output", "data"} <= ignored


# ----------------------------------------------------------------------------- credentials

_KEY_PATTERNS = [
    re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"),
    re.compile(r"(?i)\baws_secret_access_key\b[\"']?\s*[:=]\s*[\"']?[A-Za-z0-9/+]"),
    re.compile(r"(?i)\baws_session_token\b[\"']?\s*[:=]\s*[\"']?[A-Za-z0-9/+]"),
    re.compile(r"(?i)name:\s*[\"']?AWS_(?:ACCESS_KEY_ID|SECRET_ACCESS_KEY|SESSION_TOKEN)\b"),
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
]


@pytest.mark.parametrize("sample", [
    "key: AKIAABCDEFGHIJKLMNOP",
    "AWS_SECRET_ACCESS_KEY=abcd/efgh+ijkl",
    "aws_secret_access_key: wJalrXUtnFEMI",
    "- name: AWS_ACCESS_KEY_ID\n  value: x",
    '"aws_session_token": "FwoGZXIvYXdzE"',
])
def test_key_patterns_catch_key_material(sample):
    assert any(p.search(sample) for p in _KEY_PATTERNS)


def test_no_aws_key_material_under_cluster():
    files = [p for p in CLUSTER.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    assert len(files) >= 10
    for path in files:
        text = path.read_text(errors="replace")
        for pattern in _KEY_PATTERNS:
            match = pattern.search(text)
            assert not match, f"{path.relative_to(ROOT)}: looks like AWS key material: {match.group(0)!r}"
    assert not _of_kind("Secret"), "AWS access goes through IRSA, not Secrets"


# ----------------------------------------------------------------------------- nightly CronJob + RBAC


def test_cronjob_creates_the_nightly_rayjob():
    cron = _one(KUBERAY / "cronjob-nightly.yaml", "CronJob")
    assert cron["apiVersion"] == "batch/v1"
    spec = cron["spec"]
    assert len(spec["schedule"].split()) == 5
    zoneinfo.ZoneInfo(spec["timeZone"])
    assert spec["concurrencyPolicy"] == "Forbid"
    assert isinstance(spec["startingDeadlineSeconds"], int) and 0 < spec["startingDeadlineSeconds"] < 24 * 3600
    assert isinstance(spec["successfulJobsHistoryLimit"], int) and isinstance(spec["failedJobsHistoryLimit"], int)
    pod = spec["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["restartPolicy"] in ("Never", "OnFailure")
    (container,) = pod["containers"]
    env = {e["name"]: e.get("value") for e in container.get("env", [])}
    assert env.get("SCHEDULE_TIMEZONE") == spec["timeZone"], "'yesterday' must be computed in the schedule's zone"
    # The command runs the script and template from the ConfigMap built by kustomization.yaml.
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    config_maps = {name: volumes[name]["configMap"]["name"] for name in mounts if "configMap" in volumes[name]}
    (volume, config_map), = config_maps.items()
    command = " ".join(container["command"] + container.get("args", []))
    assert f"{mounts[volume]}/submit_nightly.py" in command and f"{mounts[volume]}/rayjob-classify.yaml" in command
    kustomization = _one(KUBERAY / "kustomization.yaml", "Kustomization")
    generated = {g["name"]: g["files"] for g in kustomization["configMapGenerator"]}
    assert set(generated[config_map]) >= {"submit_nightly.py", "rayjob-classify.yaml"}
    assert kustomization.get("generatorOptions", {}).get("disableNameSuffixHash") is True
    # The submitter's identity is the RBAC one.
    binding = _one(KUBERAY / "rbac.yaml", "RoleBinding")
    assert pod["serviceAccountName"] in {s["name"] for s in binding["subjects"]}


def test_rbac_allows_only_get_and_create_rayjobs():
    role = _one(KUBERAY / "rbac.yaml", "Role")
    (rule,) = role["rules"]
    assert rule["apiGroups"] == ["ray.io"] and rule["resources"] == ["rayjobs"]
    assert sorted(rule["verbs"]) == ["create", "get"]
    binding = _one(KUBERAY / "rbac.yaml", "RoleBinding")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                  "name": role["metadata"]["name"]}
    (subject,) = binding["subjects"]
    assert subject["kind"] == "ServiceAccount" and subject["namespace"] == NAMESPACE
    account = _one(KUBERAY / "rbac.yaml", "ServiceAccount")
    assert account["metadata"]["name"] == subject["name"] != "bloodray"
    assert "eks.amazonaws.com/role-arn" not in account["metadata"].get("annotations", {}), "the submitter needs no S3"


def test_kustomization_resources_exist_and_exclude_the_template():
    kustomization = _one(KUBERAY / "kustomization.yaml", "Kustomization")
    assert kustomization["namespace"] == NAMESPACE
    for name in kustomization["resources"] + [f for g in kustomization["configMapGenerator"] for f in g["files"]]:
        assert (KUBERAY / name).is_file(), name
    assert "rayjob-classify.yaml" not in kustomization["resources"], "a template, not a resource"


# ----------------------------------------------------------------------------- submit_nightly.py


def test_submitter_dates():
    sub = _submitter()
    late_evening_utc = dt.datetime(2024, 5, 1, 23, 30, tzinfo=dt.timezone.utc)
    assert sub.yesterday("Etc/UTC", late_evening_utc) == "2024-04-30"
    assert sub.yesterday("Europe/Madrid", late_evening_utc) == "2024-05-01"  # already May 2nd in Madrid
    assert sub.yesterday("Etc/UTC", dt.datetime(2024, 3, 1, 1, 30, tzinfo=dt.timezone.utc)) == "2024-02-29"
    for bad in ("2024-02-30", "20240501", "2024-5-1", "yesterday"):
        with pytest.raises(sub.SubmitError):
            sub.check_date(bad)
    with pytest.raises(sub.SubmitError):
        sub.yesterday("Mars/Olympus_Mons")


def test_submitter_render_and_dry_run(capsys):
    sub = _submitter()
    template = (KUBERAY / "rayjob-classify.yaml").read_text()
    assert sub.render(template, "2024-05-01", "rerun1")["metadata"]["name"] == "bloodray-classify-2024-05-01-rerun1"
    with pytest.raises(sub.SubmitError):
        sub.render(template.replace("${RUN_DATE}", "$HOME", 1), "2024-05-01")
    with pytest.raises(sub.SubmitError):
        sub.render(template, "2024-05-01", "Not_A_Valid_Suffix")
    assert sub.main(["--date", FIXED_DATE, "--dry-run"]) == 0
    (job,) = [d for d in yaml.safe_load_all(capsys.readouterr().out) if d]
    assert job == _rendered_classify()
    assert f"run.date={FIXED_DATE}" in job["spec"]["entrypoint"]
    json.dumps(job)  # what goes to the API server is plain JSON


class _FakeAPIServer(http.server.BaseHTTPRequestHandler):
    """Answers GET with ``existing`` (404 when None) and POST with 201; records requests."""

    existing: dict[str, Any] | None = None
    requests: list[tuple[str, str, str, Any]] = []

    def _reply(self, code: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):  # noqa: N802
        self.requests.append(("GET", self.path, self.headers.get("Authorization"), None))
        if self.existing is None:
            self._reply(404, {"kind": "Status", "reason": "NotFound"})
        else:
            self._reply(200, self.existing)

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.requests.append(("POST", self.path, self.headers.get("Authorization"), body))
        self._reply(201, body)

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("exists", [False, True])
def test_submitter_creates_the_rayjob_once(tmp_path, exists, capsys):
    sub = _submitter()
    (tmp_path / "token").write_text("test-token\n")
    (tmp_path / "namespace").write_text(NAMESPACE)
    handler = type("Handler", (_FakeAPIServer,), {"requests": [], "existing": {"status": {}} if exists else None})
    server = http.server.HTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        api = sub.KubeAPI.__new__(sub.KubeAPI)  # in-cluster TLS set-up skipped: plain HTTP on loopback
        api.base, api.sa_dir = f"http://127.0.0.1:{server.server_address[1]}", tmp_path
        api.opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        assert sub.submit(api, _rendered_classify()) == 0
    finally:
        server.shutdown()
        server.server_close()
    path = f"/apis/ray.io/v1/namespaces/{NAMESPACE}/rayjobs"
    name = f"bloodray-classify-{FIXED_DATE}"
    assert handler.requests[0][:3] == ("GET", f"{path}/{name}", "Bearer test-token")
    if exists:
        assert len(handler.requests) == 1 and "already exists" in capsys.readouterr().out
    else:
        method, post_path, auth, body = handler.requests[1]
        assert (method, post_path, auth) == ("POST", path, "Bearer test-token")
        assert body["kind"] == "RayJob" and body["metadata"]["name"] == name


# ----------------------------------------------------------------------------- IAM


def _grants(policy: dict[str, Any], action: str, arn: str) -> bool:
    for statement in policy["Statement"]:
        actions = statement["Action"] if isinstance(statement["Action"], list) else [statement["Action"]]
        resources = statement["Resource"] if isinstance(statement["Resource"], list) else [statement["Resource"]]
        if statement["Effect"] == "Allow" and action in actions and any(fnmatch.fnmatchcase(arn, r) for r in resources):
            return True
    return False


def test_iam_policy_covers_every_s3_uri_the_jobs_use():
    policy = json.loads(IAM_POLICY.read_text())
    train = _job_config(_rayjobs()["train"]["spec"]["entrypoint"])
    nightly = _job_config(_rayjobs()["classify"]["spec"]["entrypoint"])
    # ro: read, and must not be writable (source data); r: read; rw: read, write and delete.
    uses = [(train.data.root, "ro"), (train.run.storage_path, "rw"),
            (nightly.input.uri, "ro"), (nightly.model.checkpoint, "r"), (nightly.output.uri, "rw")]
    for uri, mode in uses:
        assert uri.startswith("s3://"), uri
        bucket, _, prefix = uri[len("s3://"):].partition("/")
        obj = f"arn:aws:s3:::{bucket}/{prefix.rstrip('/')}/some/object"
        assert _grants(policy, "s3:ListBucket", f"arn:aws:s3:::{bucket}"), uri
        assert _grants(policy, "s3:GetObject", obj), uri
        if "w" in mode:
            assert _grants(policy, "s3:PutObject", obj) and _grants(policy, "s3:DeleteObject", obj), uri
        elif mode == "ro":
            assert not _grants(policy, "s3:PutObject", obj), f"{uri}: source data stays read-only"


# ----------------------------------------------------------------------------- AWS cluster launcher


def test_aws_launcher_config():
    cfg = _one(AWS_LAUNCHER)
    assert cfg["cluster_name"] and cfg["provider"]["type"] == "aws" and cfg["provider"]["region"]
    assert isinstance(cfg["provider"]["cache_stopped_nodes"], bool)
    assert cfg["auth"]["ssh_user"]
    assert isinstance(cfg["idle_timeout_minutes"], int) and cfg["idle_timeout_minutes"] > 0
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["resources"].get("CPU") == 0 and not head["resources"].get("GPU")
    assert head["node_config"]["InstanceType"].startswith("m6i.")
    for name, node_type in types.items():
        arn = node_type["node_config"].get("IamInstanceProfile", {}).get("Arn", "")
        assert re.fullmatch(r"arn:aws:iam::\d{12}:instance-profile/[\w+=,.@-]+", arn), f"{name}: IamInstanceProfile"
    workers = {n: t for n, t in types.items() if n != cfg["head_node_type"]}
    gpu = [t for t in workers.values() if t["node_config"]["InstanceType"].startswith("g5.")]
    assert len(gpu) == 1 and (gpu[0]["min_workers"], gpu[0]["max_workers"]) == (0, 8)
    assert cfg["max_workers"] >= sum(t["max_workers"] for t in workers.values())
    docker = cfg["docker"]
    assert docker["image"] == _image() and docker["container_name"]
    assert "--gpus all" in docker["worker_run_options"] and "--gpus all" not in docker.get("run_options", [])
    for name, node_type in workers.items():
        if node_type not in gpu:  # no GPUs on the host: docker run --gpus would fail
            assert "--gpus all" not in node_type.get("docker", {}).get("worker_run_options", ["--gpus all"]), name
    # Everything is in the image: nothing to copy or install.
    assert not cfg.get("file_mounts") and not any("pip install" in c for c in cfg.get("setup_commands", []))
    head_start = " ".join(cfg["head_start_ray_commands"])
    assert "ray start --head" in head_start and "--autoscaling-config=~/ray_bootstrap_config.yaml" in head_start
    assert "--num-cpus=0" in head_start
    assert "ray start --address=$RAY_HEAD_IP:6379" in " ".join(cfg["worker_start_ray_commands"])


# ----------------------------------------------------------------------------- README


def test_readme_covers_the_way_from_nothing_to_a_nightly_run():
    text = README.read_text()
    for needle in ["docker push", "helm install kuberay-operator", "kubectl apply -f cluster/kuberay/raycluster.yaml",
                   "kubectl create -f cluster/kuberay/rayjob-train.yaml", "port-forward", "ray job submit",
                   "--working-dir .", "kubectl apply -k cluster/kuberay", "ray up cluster/aws/cluster.yaml",
                   "eks.amazonaws.com/role-arn", "iam-policy-s3.json", "run.name", "schedule"]:
        assert needle in text, needle
