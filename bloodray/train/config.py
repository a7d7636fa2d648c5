"""The training job's configuration: ``configs/train/*.yaml`` plus ``--set dotted.key=value`` overrides."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from bloodray import storage
from bloodray.config import ConfigError, StorageConfig, load_config
from bloodray.data.augment import AugmentConfig
from bloodray.data.decode import DEFAULT_MAX_PIXELS
from bloodray.data.stain import METHODS as STAIN_METHODS
from bloodray.models import UnknownModelError, get_model_info
from bloodray.train.recipe import Recipe, builder_kwargs


@dataclass
class SplitSection:
    """Fractions and seed of the stratified, content-addressed train/val/test split."""

    train: float = 0.7
    val: float = 0.1
    test: float = 0.2
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
class DataSection:
    """Where the labelled images are and how they are split and fed."""

    root: str
    split: SplitSection = field(default_factory=SplitSection)
    #: keep at most this many images per class (deterministic by content); for quick runs.
    max_per_class: int | None = None
    #: CPUs each decode/augment task asks Ray for; fractional so stages fit beside the workers.
    cpus_per_task: float = 0.5
    max_pixels: int = DEFAULT_MAX_PIXELS
    decode_batch_size: int = 64
    mix_original: MixOriginalSection = field(default_factory=MixOriginalSection)

    def validate(self, prefix: str) -> None:
        if not self.root:
            raise ConfigError(f"{prefix}.root: required (a local folder or s3:// prefix of <class>/ folders)")
        if self.max_per_class is not None and self.max_per_class < 1:
            raise ConfigError(f"{prefix}.max_per_class: must be >= 1")
        if self.cpus_per_task <= 0:
            raise ConfigError(f"{prefix}.cpus_per_task: must be > 0")


@dataclass
class ModelSection:
    """The architecture and its initialisation."""

    name: str = "bloodnet"
    pretrained: bool = False
    #: local path or s3:// URI of ImageNet weights (a torchvision state_dict) to use instead of downloading.
    weights_uri: str | None = None
    freeze_backbone: bool = False
    #: override the registry's input size (px); None = the model's own.
    input_size: int | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)
    #: start from these weights: a checkpoint or run dir (local or s3://) or ``default`` (the packaged model).
    #: The architecture (kwargs, input size) comes from the checkpoint.
    init_checkpoint: str | None = None
    #: stain normalisation in the preset (:mod:`bloodray.data.stain`): ``reinhard`` or ``none``; unset = as
    #: ``init_checkpoint`` was trained, else none. Its reference comes from the starting checkpoint when that has
    #: one, else it is fitted on the training split, and it travels in every checkpoint of the run.
    stain_norm: str | None = None

    def validate(self, prefix: str) -> None:
        try:
            get_model_info(self.name)
        except UnknownModelError as exc:
            raise ConfigError(f"{prefix}.name: {exc}") from None
        if self.stain_norm is not None and self.stain_norm not in STAIN_METHODS:
            raise ConfigError(f"{prefix}.stain_norm: must be one of {', '.join(STAIN_METHODS)} (got {self.stain_norm!r})")
        if self.weights_uri and not self.pretrained:
            raise ConfigError(f"{prefix}.weights_uri: set {prefix}.pretrained=true to load it")
        if self.input_size is not None and self.input_size < 16:
            raise ConfigError(f"{prefix}.input_size: must be >= 16")


@dataclass
class AugmentSection:
    """Training augmentation of the Ray Train workers (see :func:`bloodray.data.augment.augment_batch`)."""

    enabled: bool = True
    flips: bool = True
    rotate90: bool = True
    color_jitter: float = 0.1
    hue_jitter: float = 0.02
    min_scale: float = 0.85
    # Robustness to other labs' slides (issue 12); all off by default so earlier runs stay reproducible.
    zoom_out: float = 1.0
    zoom_out_prob: float = 0.5
    stain_jitter: float = 0.0
    gamma: float = 0.0
    blur_prob: float = 0.0
    blur_sigma: float = 1.5
    noise_std: float = 0.0
    jpeg_prob: float = 0.0
    jpeg_quality_min: int = 30

    def validate(self, prefix: str) -> None:
        if not 0.0 < self.min_scale <= 1.0:
            raise ConfigError(f"{prefix}.min_scale: must be in (0, 1]")
        if not 0.0 <= self.color_jitter < 1.0:
            raise ConfigError(f"{prefix}.color_jitter: must be in [0, 1)")
        if not 1.0 <= self.zoom_out <= 4.0:
            raise ConfigError(f"{prefix}.zoom_out: must be in [1, 4] (1 = off)")
        for name in ("zoom_out_prob", "blur_prob", "jpeg_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"{prefix}.{name}: must be in [0, 1]")
        if not 0.0 <= self.stain_jitter < 1.0:
            raise ConfigError(f"{prefix}.stain_jitter: must be in [0, 1)")
        if not 0.0 <= self.gamma <= 1.0:
            raise ConfigError(f"{prefix}.gamma: must be in [0, 1]")
        if self.blur_sigma < 0.3:
            raise ConfigError(f"{prefix}.blur_sigma: must be >= 0.3")
        if not 0.0 <= self.noise_std <= 64.0:
            raise ConfigError(f"{prefix}.noise_std: must be in [0, 64] (0..255 scale)")
        if not 1 <= self.jpeg_quality_min <= 95:
            raise ConfigError(f"{prefix}.jpeg_quality_min: must be in [1, 95]")

    def to_augment(self) -> AugmentConfig:
        """The augmentation these settings describe."""
        import dataclasses

        return AugmentConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(AugmentConfig)})


@dataclass
class OptimSection:
    """The training recipe. Defaults are the paper's: Adam, lr 1e-3, cross-entropy."""

    epochs: int = 150
    #: images per worker per step.
    batch_size: int = 32
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.9
    schedule: Literal["constant", "cosine"] = "constant"
    warmup_epochs: int = 0
    label_smoothing: float = 0.0
    #: weight of Inception's auxiliary classifier loss.
    aux_loss_weight: float = 0.4
    #: ``auto``, ``fp32`` or ``bf16``: bf16 autocast where the CPU or GPU does bf16 natively and a self-check
    #: passes, else fp32 (:mod:`bloodray.precision`); the precision used is in every epoch's metrics.
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    #: channels_last memory format for the model and its batches (faster on GPUs and on CPUs with oneDNN).
    channels_last: bool = True
    shuffle_buffer: int = 512
    seed: int = 0
    augment: AugmentSection = field(default_factory=AugmentSection)
    #: decay per step of an exponential moving average of the weights (0 = off). The average is scored on val
    #: beside the raw weights each epoch and the better one is checkpointed (metric ``weights``: raw or ema).
    ema_decay: float = 0.0
    #: before each validation, re-estimate BatchNorm statistics from this many un-augmented training batches
    #: (0 = off).
    precise_bn_batches: int = 0
    #: evaluate the best checkpoint on the test split when training ends.
    evaluate_test: bool = True
    #: train the head only for the first N epochs (the backbone's weights and BatchNorm statistics stay as loaded).
    freeze_backbone_epochs: int = 0

    def validate(self, prefix: str) -> None:
        if self.epochs < 1:
            raise ConfigError(f"{prefix}.epochs: must be >= 1")
        if self.batch_size < 1:
            raise ConfigError(f"{prefix}.batch_size: must be >= 1")
        if not self.lr > 0:
            raise ConfigError(f"{prefix}.lr: must be > 0")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ConfigError(f"{prefix}.label_smoothing: must be in [0, 1)")
        if self.warmup_epochs < 0 or self.warmup_epochs >= self.epochs and self.warmup_epochs > 0:
            raise ConfigError(f"{prefix}.warmup_epochs: must be >= 0 and < epochs")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"{prefix}.ema_decay: must be in [0, 1) (got {self.ema_decay})")
        if self.precise_bn_batches < 0:
            raise ConfigError(f"{prefix}.precise_bn_batches: must be >= 0")
        if not 0 <= self.freeze_backbone_epochs <= self.epochs:
            raise ConfigError(f"{prefix}.freeze_backbone_epochs: must be in [0, epochs]")

    def recipe(self) -> Recipe:
        """The training recipe these settings describe (shared with the pack trainer and the benchmark)."""
        return Recipe(epochs=self.epochs, lr=self.lr, optimizer=self.optimizer, weight_decay=self.weight_decay,
                      momentum=self.momentum, schedule=self.schedule, warmup_epochs=self.warmup_epochs,
                      label_smoothing=self.label_smoothing, aux_loss_weight=self.aux_loss_weight,
                      ema_decay=self.ema_decay, precise_bn_batches=self.precise_bn_batches)


@dataclass
class ScalingSection:
    """How many Ray Train workers, and what each one holds."""

    num_workers: int = 2
    use_gpu: bool = False
    #: CPUs per training worker; None = fit the cluster, leaving room for the data stages.
    cpus_per_worker: float | None = None
    gpus_per_worker: float = 1.0

    def validate(self, prefix: str) -> None:
        if self.num_workers < 1:
            raise ConfigError(f"{prefix}.num_workers: must be >= 1")
        if self.cpus_per_worker is not None and self.cpus_per_worker <= 0:
            raise ConfigError(f"{prefix}.cpus_per_worker: must be > 0")


@dataclass
class RunSection:
    """Where the run lives and how many checkpoints and failures it keeps."""

    name: str = "bloodnet"
    #: local folder or s3:// prefix; the run lives in <storage_path>/<name>.
    storage_path: str = "runs"
    #: best K checkpoints by val macro-F1 are kept.
    keep_checkpoints: int = 2
    #: worker failures survived by restarting from the latest checkpoint.
    max_failures: int = 3

    def validate(self, prefix: str) -> None:
        if not self.name or "/" in self.name:
            raise ConfigError(f"{prefix}.name: must be a non-empty name without '/'")
        if self.keep_checkpoints < 1:
            raise ConfigError(f"{prefix}.keep_checkpoints: must be >= 1")


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
