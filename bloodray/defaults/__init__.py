"""The packaged default configs, so every ``bloodray`` command works from any directory.

``bloodray/defaults/`` holds the same files as the repository's ``configs/``
folder (``classify/nightly.yaml``, ``train/*.yaml``, ``compare/*.yaml``,
``demo.yaml``, ``reference_ranges.yaml``). ``configs/`` is the copy users read,
edit and pass with ``--config``; this one is what a command uses when no
``--config`` is given, wherever it runs. ``tests/test_cli.py`` fails when the
two differ, so edit both (``cp configs/... bloodray/defaults/...``).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def packaged_config(name: str) -> Path:
    """Filesystem path of a packaged config, e.g. ``packaged_config("classify/nightly.yaml")``.

    Raises:
        FileNotFoundError: no such packaged file (the message lists what there is).
    """
    # bloodray is installed as plain files (torch and Ray cannot run from a
    # zip), so the resource is a real path that read_yaml can open.
    path = Path(str(resources.files(__name__).joinpath(name)))
    if not path.is_file():
        raise FileNotFoundError(f"no packaged config {name!r}; packaged: {', '.join(packaged_configs())}")
    return path


def packaged_configs() -> list[str]:
    """Relative names of every packaged YAML file."""
    root = Path(str(resources.files(__name__)))
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*.yaml"))


def default_config_path(name: str | None) -> str | None:
    """Path of a packaged default config given its name under ``configs/`` (``"train/bloodnet.yaml"``).

    Accepts the historical ``configs/...`` spelling. A name that is not
    packaged is returned as it is (a path relative to the working directory).
    """
    if name is None:
        return None
    rel = name[len("configs/"):] if name.startswith("configs/") else name
    try:
        return str(packaged_config(rel))
    except FileNotFoundError:
        return name


def describe_default_config(name: str | None) -> str:
    """How ``--help`` names a packaged default config."""
    if name is None:
        return "none"
    rel = name[len("configs/"):] if name.startswith("configs/") else name
    return f"the packaged {rel}, identical to configs/{rel} in the repository"
