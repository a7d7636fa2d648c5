"""Each config key is declared once.

A setting that two config classes declare (the augmentation's ``min_scale`` in the Ray trainer's section and in the
pack trainer's, the recipe's ``lr`` in three places...) drifts: a new key is added to one and forgotten in the other,
and nothing fails. So every job config (train, classify, compare, train-packed, demo) composes sections, and a
section that two jobs share is one dataclass they both use or inherit; a job's own defaults live in its YAML.

This test walks every class reachable from the job configs and fails when a key (a field that is not itself a
section) is declared by two classes, unless the name is listed below with the reason the two keys are different
settings that happen to share a word.
"""

from __future__ import annotations

import dataclasses
import typing
from collections import defaultdict

import pytest

from bloodray.demo import DemoConfig
from bloodray.nightly.config import ClassifyConfig
from bloodray.train.compare_config import CompareConfig
from bloodray.train.config import TrainConfig
from bloodray.train.pack import PackedTrainConfig

JOBS = {"train": TrainConfig, "classify": ClassifyConfig, "compare": CompareConfig,
        "train-packed": PackedTrainConfig, "demo": DemoConfig}

#: Names that mean different things in different sections. Adding to this list needs a reason a reader accepts.
DIFFERENT_SETTINGS = {
    "name": "ModelSection.name is the model, RunSection.name the run directory; ModelEntry.name is the model again, "
            "redeclared only because each comparison entry must name one (no default)",
    "uri": "InputConfig.uri is the archive read, OutputConfig.uri the output root written",
    "root": "DataSection.root is the training images, MixOriginalSection.root the original lab's images mixed in, "
            "DemoData.root the demo's optional real images",
    "seed": "SplitSection.seed decides the split, Recipe.seed the initialisation and data order; the demo's data and "
            "archive seeds decide its synthetic images",
    "batch_size": "Recipe.batch_size is images per optimizer step, InferenceConfig.batch_size per model call; "
                  "ModelEntry.batch_size is one comparison entry's override of train.batch_size (null: shared)",
    "epochs": "ModelEntry.epochs is one comparison entry's override of train.epochs (null: the shared value)",
    "lr": "ModelEntry.lr is one comparison entry's override of train.lr (null: the shared value)",
    "model": "PackedTrainConfig.model and DemoTrain.model are flat shortcuts for the model name of jobs without a "
             "model section",
    "input_size": "DemoTrain.input_size is the demo's flat shortcut for model.input_size",
    "num_workers": "DemoTrain.num_workers is the demo's flat shortcut for scaling.num_workers",
    "device": "ModelConfig.device places the nightly job's model actors, PackedTrainConfig.device the pack trainer",
    "date": "RunConfig.date is the nightly run's date, DemoConfig.date the demo's archive date",
    "layout": "InputConfig.layout is how the nightly job reads an archive, DemoArchive.layout how the demo writes one",
    "read_timeout_s": "LimitsConfig.read_timeout_s bounds the whole read of one input file (then a read_timeout error "
                      "row); StorageConfig.read_timeout_s is how long each object-storage call waits for an answer "
                      "per attempt (botocore's read_timeout), for every URI of the job",
    "enabled": "AugmentSection.enabled switches training augmentation, ReportConfig.enabled the nightly run's report",
    "precision": "Recipe.precision is the training autocast (auto|fp32|bf16), InferenceConfig.precision the nightly "
                 "model's path, checked against the checkpoint's sealed self-check batch (auto|fp32|bf16|int8)",
}


def _sections(tp: typing.Any) -> list[type]:
    """Dataclasses a field type holds (``Section``, ``Section | None``, ``list[Section]``)."""
    if dataclasses.is_dataclass(tp):
        return [tp]
    return [s for arg in typing.get_args(tp) for s in _sections(arg)]


def config_classes() -> set[type]:
    """Every dataclass reachable from the job configs, with the dataclasses they inherit from."""
    seen: set[type] = set()
    todo = list(JOBS.values())
    while todo:
        cls = todo.pop()
        if cls in seen:
            continue
        seen.add(cls)
        todo += [base for base in cls.__mro__[1:] if dataclasses.is_dataclass(base)]
        hints = typing.get_type_hints(cls)
        todo += [s for f in dataclasses.fields(cls) for s in _sections(hints[f.name])]
    return seen


def declarations() -> dict[str, list[str]]:
    """key name -> the classes that declare it themselves (inherited fields are not declarations)."""
    found: dict[str, list[str]] = defaultdict(list)
    for cls in config_classes():
        hints = typing.get_type_hints(cls)
        for name in cls.__dict__.get("__annotations__", {}):
            if name in hints and not _sections(hints[name]) and not name.startswith("_"):
                found[name].append(f"{cls.__module__}.{cls.__qualname__}")
    return found


def test_walk_finds_the_shared_sections():
    names = {c.__name__ for c in config_classes()}
    assert {"Recipe", "AugmentConfig", "JitterConfig", "RobustConfig", "WarpAugmentConfig", "PixelLimit",
            "CheckpointPolicy", "StorageConfig", "ModelEntry", "LimitsConfig"} <= names


def test_no_config_key_is_declared_twice():
    twice = {name: sorted(where) for name, where in declarations().items()
             if len(where) > 1 and name not in DIFFERENT_SETTINGS}
    assert not twice, (
        "config keys declared by more than one class (declare each once, in one section dataclass that the jobs "
        "compose or inherit, and set job defaults in the job's YAML):\n"
        + "\n".join(f"  {name}: {', '.join(where)}" for name, where in sorted(twice.items())))


@pytest.mark.parametrize("name", sorted(DIFFERENT_SETTINGS))
def test_every_exception_is_still_needed(name):
    assert len(declarations().get(name, [])) > 1, f"{name} is declared once now: remove it from DIFFERENT_SETTINGS"


def test_recipe_and_augmentation_keys_are_the_same_in_every_trainer():
    from bloodray.data.augment import AugmentConfig, RobustConfig, WarpAugmentConfig
    from bloodray.train.config import OptimSection
    from bloodray.train.recipe import Recipe

    recipe = {f.name for f in dataclasses.fields(Recipe)}
    for cls in (OptimSection, PackedTrainConfig, typing.get_type_hints(DemoConfig)["train"]):
        assert recipe <= {f.name for f in dataclasses.fields(cls)}, cls
    robust = {f.name for f in dataclasses.fields(RobustConfig)}
    assert robust <= {f.name for f in dataclasses.fields(AugmentConfig)}
    assert {f.name for f in dataclasses.fields(WarpAugmentConfig)} <= {f.name for f in dataclasses.fields(PackedTrainConfig)}
