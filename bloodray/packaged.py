"""The models shipped inside the package, by short name: the one place their facts are kept.

``bloodray/assets/models.json`` lists each packaged model: its short name, its folder under
``bloodray/assets/``, its checkpoint id and its model-card figures (each with where it was measured).
One of them is the default; its folder is always ``default_checkpoint``, so that ``model.checkpoint: null``,
``default`` and ``packaged:default`` all mean it. ``model.checkpoint=packaged:<name>`` selects another, in
every command that takes a checkpoint; ``bloodray models`` lists them. Tests check the manifest against the
checkpoints (ids, the val figures their calibration sealed) and the wheel's size.

To ship a new default: move the current ``default_checkpoint`` folder to ``packaged/<its name>``, set its
``folder`` and ``default: false``, put the new checkpoint in ``default_checkpoint`` and add its entry with
``default: true``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: ``model.checkpoint`` prefix that names a packaged model.
SCHEME = "packaged:"
ASSETS = Path(__file__).parent / "assets"
#: The default model's folder (fixed, so that no manifest is read to find it).
DEFAULT_FOLDER = ASSETS / "default_checkpoint"
MANIFEST = ASSETS / "models.json"
MANIFEST_FORMAT = "bloodray-packaged-models/1"


class PackagedModelError(ValueError):
    """An unknown packaged model name, or a broken manifest."""


@dataclass(frozen=True)
class PackagedModel:
    """One packaged model, as the manifest describes it."""

    name: str
    #: folder under ``bloodray/assets/``.
    folder: str
    checkpoint_id: str
    default: bool = False
    summary: str = ""
    #: model-card figures (PBC val/test accuracy, chula zero-shot, chula k = 20 adaptation...); None = not measured.
    figures: dict[str, float | None] = field(default_factory=dict)
    #: where the figures come from (the section of docs/RESULTS.md that gives their commands).
    figures_source: str = ""

    @property
    def path(self) -> Path:
        """The checkpoint folder inside the installed package."""
        return ASSETS / self.folder


def models() -> list[PackagedModel]:
    """Every packaged model, the default first."""
    where = f"{MANIFEST.name} (package data)"
    try:
        raw = json.loads(MANIFEST.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise PackagedModelError(f"{where}: cannot read the packaged models' manifest ({exc})") from exc
    if raw.get("format") != MANIFEST_FORMAT:
        raise PackagedModelError(f"{where}: format {raw.get('format')!r}, expected {MANIFEST_FORMAT!r}")
    try:
        found = [PackagedModel(**entry) for entry in raw["models"]]
    except (KeyError, TypeError) as exc:
        raise PackagedModelError(f"{where}: malformed model entry ({exc})") from exc
    defaults = [m for m in found if m.default]
    if len(defaults) != 1 or defaults[0].path != DEFAULT_FOLDER:
        raise PackagedModelError(f"{where}: exactly one model must be the default, in {DEFAULT_FOLDER.name}/")
    return sorted(found, key=lambda m: not m.default)


def folder(uri: str | None) -> Path:
    """The checkpoint folder of ``None``, ``""``, ``default`` or ``packaged:<name>`` (``packaged:default`` too)."""
    name = (uri or "default").removeprefix(SCHEME)
    if name == "default":
        if not DEFAULT_FOLDER.is_dir():
            raise PackagedModelError("no checkpoint given (model.checkpoint) and this installation has no "
                                     "packaged default model")
        return DEFAULT_FOLDER
    known = models()
    for model in known:
        if model.name == name:
            return model.path
    names = ", ".join(f"{SCHEME}{m.name}" for m in known)
    raise PackagedModelError(f"model.checkpoint {uri!r}: no packaged model of that name (packaged models: "
                             f"{SCHEME}default, {names}; see `bloodray models`)")


def describe() -> list[dict[str, Any]]:
    """The packaged models as rows for ``bloodray models`` (name, id, default, figures, summary)."""
    return [{"name": m.name, "selector": f"{SCHEME}{m.name}", "checkpoint_id": m.checkpoint_id,
             "default": m.default, "figures": dict(m.figures), "summary": m.summary,
             "figures_source": m.figures_source} for m in models()]
