"""The comparison job's configuration (``configs/compare/*.yaml`` + ``--set``) and each model's training config."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, fields
from typing import Literal, Mapping

from bloodray import storage
from bloodray.config import ConfigError, StorageConfig, apply_overrides, from_dict, load_config, to_dict, validate_tree
from bloodray.models import get_model_info
from bloodray.train.config import (CheckpointPolicy, DataSection, ModelSection, OptimSection, ScalingSection,
                                   TrainConfig)

#: Sections a model entry's ``overrides`` may change; data, run and storage are shared by construction.
OVERRIDABLE = ("model", "train", "scaling")


@dataclass
class ModelEntry(ModelSection):
    """One model of the comparison: the training job's ``model`` keys (:class:`ModelSection`; ``name`` required),
    a label, and a few recipe keys that, when set, replace the shared ``train`` section's for this model."""

    #: any name from ``bloodray models`` (required in each entry).
    name: str = ""
    #: row name in the tables and run directory name (default: ``name``); must be unique.
    label: str | None = None
    #: this model's ``train.epochs`` (null: the shared value).
    epochs: int | None = None
    #: this model's ``train.batch_size`` (null: the shared value).
    batch_size: int | None = None
    #: this model's ``train.lr`` (null: the shared value).
    lr: float | None = None
    #: further ``dotted.key=value`` settings of this model's training config (model.*, train.*, scaling.*).
    overrides: list[str] = field(default_factory=list)

    @property
    def run_name(self) -> str:
        return self.label or self.name

    def validate(self, prefix: str) -> None:
        if not self.name:
            raise ConfigError(f"{prefix}.name: required (any name from `bloodray models`)")
        ModelSection.validate(self, prefix)
        info = get_model_info(self.name)
        if self.label is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._+-]*", self.label):
            raise ConfigError(f"{prefix}.label: {self.label!r} must be a name of letters, digits, '.', '_', '+', '-'")
        if self.pretrained and not self.weights_uri and not info.imagenet_weights:
            raise ConfigError(f"{prefix}.pretrained: {self.name} has no ImageNet weights; "
                              f"set {prefix}.weights_uri or pretrained=false")
        if self.freeze_backbone and not self.pretrained:
            raise ConfigError(f"{prefix}.freeze_backbone: needs {prefix}.pretrained=true "
                              "(a frozen random backbone learns nothing)")
        if self.epochs is not None and self.epochs < 1:
            raise ConfigError(f"{prefix}.epochs: must be >= 1")
        if self.batch_size is not None and self.batch_size < 1:
            raise ConfigError(f"{prefix}.batch_size: must be >= 1")
        if self.lr is not None and not self.lr > 0:
            raise ConfigError(f"{prefix}.lr: must be > 0")
        for text in self.overrides:
            section = text.split("=", 1)[0].strip().split(".", 1)[0]
            if section not in OVERRIDABLE:
                raise ConfigError(f"{prefix}.overrides: {text!r} may not change '{section}'; every model shares "
                                  f"data, run and storage (allowed: {', '.join(s + '.*' for s in OVERRIDABLE)})")


@dataclass
class OutputSection(CheckpointPolicy):
    """Where the comparison writes, and each model run's :class:`CheckpointPolicy`."""

    #: local folder or s3:// prefix; runs live in <path>/runs/<label>, the tables at <path>/.
    path: str = "compare"
    #: a model whose pretrained weights cannot be loaded: ``fail`` its entry (reason in the table)
    #: or train it from ``scratch`` (labelled so in the table).
    on_pretrained_error: Literal["fail", "scratch"] = "fail"

    def validate(self, prefix: str) -> None:
        if not self.path:
            raise ConfigError(f"{prefix}.path: required (a local folder or s3:// prefix)")
        CheckpointPolicy.validate(self, prefix)


@dataclass
class CompareConfig:
    """The comparison job's configuration (``configs/compare/*.yaml`` + ``--set``).

    ``data``, ``train``, ``scaling`` and ``storage`` are the training job's
    sections, shared by every model; each entry of ``models`` may change its
    architecture, initialisation, input size and a few recipe settings.
    """

    data: DataSection
    models: list[ModelEntry]
    train: OptimSection = field(default_factory=OptimSection)
    scaling: ScalingSection = field(default_factory=ScalingSection)
    output: OutputSection = field(default_factory=OutputSection)
    storage: StorageConfig = field(default_factory=StorageConfig)

    def validate(self, prefix: str = "") -> None:
        if not self.models:
            raise ConfigError("models: list at least one model")
        seen: dict[str, int] = {}
        for i, entry in enumerate(self.models):
            where = f"models[{i}]"
            entry.validate(where)
            if entry.run_name in seen:
                raise ConfigError(f"{where}.label: {entry.run_name!r} is already used by models[{seen[entry.run_name]}]; "
                                  f"give each entry its own label")
            seen[entry.run_name] = i
            try:
                train_config_for(self, entry)
            except ConfigError as exc:
                raise ConfigError(f"{where} ({entry.run_name}): {exc}") from None

    @property
    def runs_uri(self) -> str:
        return storage.join(self.output.path, "runs")


def load_compare_config(path: str | None, overrides: list[str] | tuple[str, ...] = ()) -> CompareConfig:
    """Load and validate a comparison config from YAML plus ``dotted.key=value`` overrides.

    A ``--set`` can reach into one model entry by index or label:
    ``models.1.epochs=2``, ``models.resnet50.weights_uri=s3://bucket/resnet50.pth``.
    """
    return load_config(CompareConfig, path, _entry_overrides(path, overrides))


def _entry_overrides(path: str | None, overrides) -> list[str]:
    """Turn ``models.<index or label>.key=value`` into one override of the whole list (which
    :func:`~bloodray.config.apply_overrides` can apply: it walks mappings only)."""
    from bloodray.config import parse_override, read_yaml

    plain, targeted = [], []
    for text in overrides:
        keys, value = parse_override(text)
        (targeted if keys[0] == "models" and len(keys) > 2 else plain).append((text, keys, value))
    if not targeted:
        return [text for text, _, _ in plain]
    models = apply_overrides(read_yaml(path) if path else {}, [text for text, _, _ in plain]).get("models")
    if not isinstance(models, list) or not all(isinstance(m, Mapping) for m in models):
        raise ConfigError("models: expected a list of model entries to set keys of")
    models = [dict(m) for m in models]
    labels = [str(m.get("label") or m.get("name")) for m in models]
    for text, keys, value in targeted:
        which = keys[1]
        if which.isdigit():
            if int(which) >= len(models):
                raise ConfigError(f"models.{which}: no such entry (the config lists {len(models)} models)")
            index = int(which)
        elif labels.count(which) == 1:
            index = labels.index(which)
        else:
            raise ConfigError(f"models.{which}: no entry labelled {which!r}" if which not in labels else
                              f"models.{which}: several entries are labelled {which!r}; use the index")
        node = models[index]
        for key in keys[2:-1]:
            node[key] = dict(node.get(key) or {})
            node = node[key]
        node[keys[-1]] = value
    return [text for text, _, _ in plain] + [f"models={json.dumps(models)}"]


def train_config_for(cfg: CompareConfig, entry: ModelEntry, *, scratch: bool = False) -> TrainConfig:
    """The training config of one entry: the shared sections plus the entry's own settings.

    ``scratch`` drops the pretrained weights (and the frozen backbone) for the
    fallback when they cannot be loaded.
    """
    train = to_dict(cfg.train) | {"evaluate_test": False}  # the comparison evaluates (and times) it itself
    for key in ("epochs", "batch_size", "lr"):
        if getattr(entry, key) is not None:
            train[key] = getattr(entry, key)
    data = {
        "data": to_dict(cfg.data),
        "model": {f.name: getattr(entry, f.name) for f in fields(ModelSection)}
                 | ({"pretrained": False, "weights_uri": None, "freeze_backbone": False} if scratch else {}),
        "train": train,
        "scaling": to_dict(cfg.scaling),
        "run": {"name": entry.run_name, "storage_path": cfg.runs_uri,
                "keep_checkpoints": cfg.output.keep_checkpoints, "max_failures": cfg.output.max_failures},
        "storage": to_dict(cfg.storage),
    }
    tc = from_dict(TrainConfig, apply_overrides(data, entry.overrides))
    validate_tree(tc)
    return tc
