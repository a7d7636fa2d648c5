"""The training job's configuration: ``configs/train/*.yaml`` plus ``--set dotted.key=value`` overrides."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from bloodray import storage
from bloodray.config import ConfigError, StorageConfig, load_config
from bloodray.data.augment import AugmentConfig
from bloodray.data.decode import PixelLimit
from bloodray.data.stain import METHODS as STAIN_METHODS
from bloodray.models import UnknownModelError, get_model_info
from bloodray.train.recipe import Recipe, builder_kwargs


@dataclass
class SplitSection:
    """Fractions and seed of the stratified, content-addressed train/val/test split."""

    #: share of each class's images in the training split.
    train: float = 0.7
    #: share in the validation split (picks the best epoch, calibration).
    val: float = 0.1
    #: share in the held-out test split.
    test: float = 0.2
    #: seed of the content-addressed order within each class (same seed and files = same split anywhere).
    seed: int = 0

    def validate(self, prefix: str) -> None:
        for name in ("train", "val", "test"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"{prefix}.{name}: must be between 0 and 1")
        if abs(self.train + self.val + self.test - 1.0) > 1e-6:
            raise ConfigError(f"{prefix}: train + val + test must sum to 1 (got {self.train + self.val + self.test:g})")
        if self.train <= 0 or self.val <= 0:
            raise ConfigError(f"{prefix}: train and val fractions must be > 0")


@dataclass
class MixOriginalSection:
    """A share of the original model's training images mixed into a fine-tune's training split (against forgetting)."""

    #: the original training folder (e.g. the PBC root the starting model was trained on); unset = off.
    root: str | None = None
    #: share of its training split (per class) added to the run's training split.
    share: float = 0.0
    #: how the original root was split when the starting model was trained (its val/test images stay out).
    split: SplitSection = field(default_factory=SplitSection)

    def validate(self, prefix: str) -> None:
        if not 0.0 <= self.share <= 1.0:
            raise ConfigError(f"{prefix}.share: must be in [0, 1]")
        if self.share > 0 and not self.root:
            raise ConfigError(f"{prefix}.root: required when {prefix}.share > 0")


@dataclass
class DataSection(PixelLimit):
    """Where the labelled images are and how they are split and fed (``max_pixels``: :class:`PixelLimit`'s)."""

    #: ImageFolder root, local or ``s3://``: ``<root>/<class>/**/*.{jpg,jpeg,png,bmp,tif}``; PBC folder names and
    #: file prefixes map to the 8 classes. Required.
    root: str = ""
    split: SplitSection = field(default_factory=SplitSection)
    #: keep at most this many images per class (deterministic by content); for quick runs.
    max_per_class: int | None = None
    #: CPUs each decode/augment task asks Ray for; fractional so stages fit beside the workers.
    cpus_per_task: float = 0.5
    #: images per Ray Data decode task.
    decode_batch_size: int = 64
    mix_original: MixOriginalSection = field(default_factory=MixOriginalSection)

    def validate(self, prefix: str) -> None:
        PixelLimit.validate(self, prefix)
        if not self.root:
            raise ConfigError(f"{prefix}.root: required (a local folder or s3:// prefix of <class>/ folders)")
        if self.max_per_class is not None and self.max_per_class < 1:
            raise ConfigError(f"{prefix}.max_per_class: must be >= 1")
        if self.cpus_per_task <= 0:
            raise ConfigError(f"{prefix}.cpus_per_task: must be > 0")


@dataclass
class ModelInit:
    """Where a model's weights start and the colour space it is trained in (``model.*`` of ``bloodray train``, the
    pack trainer's top-level keys)."""

    #: start from these weights: a checkpoint or run dir (local or s3://) or ``default`` (the packaged model).
    #: The architecture (kwargs, input size) comes from the checkpoint; its seal and weights hash are checked.
    init_checkpoint: str | None = None
    #: stain normalisation in the preset (:mod:`bloodray.data.stain`): ``reinhard`` or ``none``; unset = as
    #: ``init_checkpoint`` was trained, else none. Its reference comes from the starting checkpoint when that has
    #: one, else it is fitted on 400 training images, and it travels in every checkpoint of the run.
    stain_norm: str | None = None

    def validate(self, prefix: str) -> None:
        if self.stain_norm is not None and self.stain_norm not in STAIN_METHODS:
            where = f"{prefix}.stain_norm" if prefix else "stain_norm"
            raise ConfigError(f"{where}: must be one of {', '.join(STAIN_METHODS)} (got {self.stain_norm!r})")


@dataclass
class ModelSection(ModelInit):
    """The architecture and its initialisation (``init_checkpoint``, ``stain_norm``: :class:`ModelInit`'s)."""

    #: any name from ``bloodray models``.
    name: str = "bloodnet"
    #: start from ImageNet weights (torchvision's weights API, or ``weights_uri``).
    pretrained: bool = False
    #: local path or s3:// URI of ImageNet weights (a torchvision state_dict) to use instead of downloading.
    weights_uri: str | None = None
    #: train only the new head (the paper's transfer learning).
    freeze_backbone: bool = False
    #: override the registry's input size (px); None = the model's own.
    input_size: int | None = None
    #: builder options, e.g. ``batch_norm: true``, ``dropout`` or ``norm: group`` for bloodnet.
    kwargs: dict[str, Any] = field(default_factory=dict)

    def validate(self, prefix: str) -> None:
        try:
            get_model_info(self.name)
        except UnknownModelError as exc:
            raise ConfigError(f"{prefix}.name: {exc}") from None
        ModelInit.validate(self, prefix)
        if self.weights_uri and not self.pretrained:
            raise ConfigError(f"{prefix}.weights_uri: set {prefix}.pretrained=true to load it")
        if self.input_size is not None and self.input_size < 16:
            raise ConfigError(f"{prefix}.input_size: must be >= 16")


@dataclass
class AugmentSection(AugmentConfig):
    """Training augmentation of the Ray Train workers (``train.augment``; every key but ``enabled`` is declared by
    :class:`bloodray.data.augment.AugmentConfig`, see :func:`bloodray.data.augment.augment_batch`)."""

    #: augment the training batches at all (false: every image as the evaluation preset gives it).
    enabled: bool = True

    def to_augment(self) -> AugmentConfig:
        """The augmentation these settings describe."""
        return AugmentConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(AugmentConfig)})


@dataclass
class OptimSection(Recipe):
    """The ``train`` section: the training recipe (every key of :class:`bloodray.train.recipe.Recipe`, the paper's
    Adam, lr 1e-3, cross-entropy by default) plus what only the Ray Train loop has."""

    #: channels_last memory format for the model and its batches (faster on GPUs and on CPUs with oneDNN).
    channels_last: bool = True
    #: rows of Ray Data's local shuffle buffer per worker (the order of training images within an epoch).
    shuffle_buffer: int = 512
    augment: AugmentSection = field(default_factory=AugmentSection)
    #: evaluate the best checkpoint on the test split when training ends.
    evaluate_test: bool = True
    #: train the head only for the first N epochs (the backbone's weights and BatchNorm statistics stay as loaded).
    freeze_backbone_epochs: int = 0

    def validate(self, prefix: str) -> None:
        Recipe.validate(self, prefix)
        if not 0 <= self.freeze_backbone_epochs <= self.epochs:
            raise ConfigError(f"{prefix}.freeze_backbone_epochs: must be in [0, epochs]")

    def recipe(self) -> Recipe:
        """The training recipe these settings describe (shared with the pack trainer and the benchmark)."""
        return Recipe(**{f.name: getattr(self, f.name) for f in dataclasses.fields(Recipe)})


@dataclass
class ScalingSection:
    """How many Ray Train workers, and what each one holds."""

    #: Ray Train workers (data-parallel replicas).
    num_workers: int = 2
    #: train on GPUs (one or ``gpus_per_worker`` per worker).
    use_gpu: bool = False
    #: CPUs per training worker; None = fit the cluster, leaving room for the data stages.
    cpus_per_worker: float | None = None
    #: GPUs per worker when ``use_gpu``.
    gpus_per_worker: float = 1.0

    def validate(self, prefix: str) -> None:
        if self.num_workers < 1:
            raise ConfigError(f"{prefix}.num_workers: must be >= 1")
        if self.cpus_per_worker is not None and self.cpus_per_worker <= 0:
            raise ConfigError(f"{prefix}.cpus_per_worker: must be > 0")


@dataclass
class CheckpointPolicy:
    """How many checkpoints a training run keeps and how many worker failures it survives (``run.*`` of a
    training run, ``output.*`` of a comparison)."""

    #: best K checkpoints by val macro-F1 are kept.
    keep_checkpoints: int = 2
    #: worker failures survived by restarting from the latest checkpoint.
    max_failures: int = 3

    def validate(self, prefix: str) -> None:
        if self.keep_checkpoints < 1:
            raise ConfigError(f"{prefix}.keep_checkpoints: must be >= 1")
        if self.max_failures < 0:
            raise ConfigError(f"{prefix}.max_failures: must be >= 0")


@dataclass
class RunSection(CheckpointPolicy):
    """Where the run lives, and its :class:`CheckpointPolicy`."""

    #: run directory name; the same name resumes the run.
    name: str = "bloodnet"
    #: local folder or s3:// prefix; the run lives in <storage_path>/<name>.
    storage_path: str = "runs"

    def validate(self, prefix: str) -> None:
        CheckpointPolicy.validate(self, prefix)
        if not self.name or "/" in self.name:
            raise ConfigError(f"{prefix}.name: must be a non-empty name without '/'")


@dataclass
class TrainConfig:
    """The training job's configuration (``configs/train/*.yaml`` + ``--set``)."""

    data: DataSection
    model: ModelSection = field(default_factory=ModelSection)
    train: OptimSection = field(default_factory=OptimSection)
    scaling: ScalingSection = field(default_factory=ScalingSection)
    run: RunSection = field(default_factory=RunSection)
    storage: StorageConfig = field(default_factory=StorageConfig)

    @property
    def run_uri(self) -> str:
        return storage.join(self.run.storage_path, self.run.name)

    @property
    def input_size(self) -> int:
        return self.model.input_size or get_model_info(self.model.name).input_size

    def builder_kwargs(self) -> dict[str, Any]:
        """Builder kwargs of the model, recorded in its checkpoints."""
        return builder_kwargs(self.model.name, self.model.kwargs, self.model.input_size)


def load_train_config(path: str | None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Load and validate a training config from YAML plus ``dotted.key=value`` overrides."""
    return load_config(TrainConfig, path, overrides)
