"""The one training recipe: what every trainer does with a model, a batch and its labels.

The Ray Train loop (:mod:`bloodray.train.ray_loop`), the single-process pack trainer (:mod:`bloodray.train.pack`)
and ``bench/train.py``'s plain loop all build their optimizer, learning-rate schedule, loss, weight average and
BatchNorm re-estimation here, from a :class:`Recipe` that their configs fill in under the same key names
(``lr``, ``weight_decay``, ``warmup_epochs``, ``schedule``, ``label_smoothing``, ``ema_decay``,
``precise_bn_batches``...). A setting therefore means the same thing in every trainer.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import math
from dataclasses import dataclass
from typing import Any, ClassVar, Iterable, Literal, Mapping

import torch
from torch import nn

from bloodray.config import ConfigError
from bloodray.precision import PRECISIONS


@dataclass
class Recipe:
    """The training recipe, declared once: ``train.*`` of ``bloodray train`` and ``bloodray compare`` and the top-level
    keys of the pack trainer (each job sets its own defaults in its YAML). Defaults are the paper's."""

    #: passes over the training split.
    epochs: int = 150
    #: images per optimizer step (per worker under Ray Train, so a step sees ``batch_size x num_workers``).
    batch_size: int = 32
    #: base learning rate (after the warm-up).
    lr: float = 1e-3
    #: ``adam``, ``adamw`` (decoupled weight decay) or ``sgd`` (Nesterov momentum).
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    #: decoupled for adamw, L2 for adam/sgd; never applied to norm scales and biases.
    weight_decay: float = 0.0
    #: SGD momentum (unused by adam/adamw).
    momentum: float = 0.9
    #: after the warm-up: ``constant`` or ``cosine`` decay to zero at the last step.
    schedule: Literal["constant", "cosine"] = "constant"
    #: linear warm-up of the learning rate over this many epochs, per optimizer step.
    warmup_epochs: int = 0
    #: cross-entropy label smoothing.
    label_smoothing: float = 0.0
    #: weight of Inception's auxiliary classifier loss.
    aux_loss_weight: float = 0.4
    #: decay per step of the weights' exponential moving average (0 = off); the raw and averaged weights are both
    #: scored on val each epoch and the better one is kept (metric ``weights``: raw or ema).
    ema_decay: float = 0.0
    #: un-augmented training batches that re-estimate BatchNorm statistics before each evaluation (0 = off).
    precise_bn_batches: int = 0
    #: ``auto``, ``fp32`` or ``bf16``: bf16 autocast where the CPU or GPU does bf16 natively and a self-check
    #: passes, else fp32 (:mod:`bloodray.precision`); the precision used is in every epoch's metrics.
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    #: seed of the weights' initialisation, the data order and the augmentation.
    seed: int = 0

    #: Keys this section renamed, still read from older YAML files and checkpoints (see ``config.from_dict``):
    #: ``mixed_precision`` (CUDA autocast on/off) became ``precision``.
    RENAMED_KEYS: ClassVar[dict[str, tuple[str, dict[Any, str]]]] = {
        "mixed_precision": ("precision", {True: "auto", False: "fp32"})}

    def validate(self, prefix: str = "") -> None:
        """Raise :class:`~bloodray.config.ConfigError` naming the first bad key (``prefix.key``)."""
        def at(name: str) -> str:
            return f"{prefix}.{name}" if prefix else name

        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{at(name)}: must be >= 1 (got {getattr(self, name)})")
        if not self.lr > 0:
            raise ConfigError(f"{at('lr')}: must be > 0 (got {self.lr})")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ConfigError(f"{at('label_smoothing')}: must be in [0, 1)")
        if self.warmup_epochs < 0 or self.warmup_epochs >= self.epochs and self.warmup_epochs > 0:
            raise ConfigError(f"{at('warmup_epochs')}: must be >= 0 and < epochs")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"{at('ema_decay')}: must be in [0, 1) (got {self.ema_decay})")
        if self.precise_bn_batches < 0:
            raise ConfigError(f"{at('precise_bn_batches')}: must be >= 0 (got {self.precise_bn_batches})")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"{at('precision')}: must be one of {', '.join(PRECISIONS)} (got {self.precision!r})")


def builder_kwargs(model_name: str, kwargs: Mapping[str, Any], input_size: int | None) -> dict[str, Any]:
    """Builder kwargs for ``create_model``, recorded in the checkpoint so the model can be rebuilt exactly.

    Only builders whose architecture depends on the input size take it (bloodnet's dense layer); ``None`` keeps the
    model's native size.
    """
    from bloodray.models import get_model_info

    out = dict(kwargs)
    if input_size and "input_size" in inspect.signature(get_model_info(model_name).builder).parameters:
        out["input_size"] = input_size
    return out


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Trainable parameters in two groups: weights decay, norm scales and biases (1-d tensors) do not."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:  # a frozen backbone is left out
            (no_decay if p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, recipe: Recipe) -> torch.optim.Optimizer:
    """The recipe's optimizer over :func:`param_groups`."""
    groups = param_groups(model, recipe.weight_decay)
    if recipe.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=recipe.lr, momentum=recipe.momentum, nesterov=True)
    if recipe.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=recipe.lr)
    return torch.optim.Adam(groups, lr=recipe.lr)


@dataclass
class LRSchedule:
    """Factor of the base learning rate at each optimizer step: linear warm-up, then constant or cosine.

    ``epochs`` may be lowered during a run (the pack trainer's time budget) so the cosine still ends at zero.
    """

    schedule: str
    warmup_epochs: int
    epochs: int
    steps_per_epoch: int

    def __call__(self, step: int) -> float:
        warmup = self.warmup_epochs * self.steps_per_epoch
        if step < warmup:
            return (step + 1) / warmup
        if self.schedule == "cosine":
            total = max(1, self.epochs * self.steps_per_epoch - warmup)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / total)))
        return 1.0


def classification_loss(outputs: Any, targets: torch.Tensor, recipe: Recipe) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy with the recipe's label smoothing; Inception's training output adds its auxiliary head's loss.

    Returns ``(loss, logits)``; the loss is computed in float32 whatever the autocast dtype.
    """
    aux = getattr(outputs, "aux_logits", None)
    logits = getattr(outputs, "logits", outputs)
    loss = nn.functional.cross_entropy(logits.float(), targets, label_smoothing=recipe.label_smoothing)
    if aux is not None:
        aux_loss = nn.functional.cross_entropy(aux.float(), targets, label_smoothing=recipe.label_smoothing)
        loss = loss + recipe.aux_loss_weight * aux_loss
    return loss, logits


class WeightEMA:
    """Exponential moving average of a model's weights, kept in a frozen copy (:attr:`module`).

    The decay warms up as ``min(decay, (1 + n) / (10 + n))`` after ``n`` updates (as in timm and TensorFlow), so
    early averages are not dominated by the random initialisation. Integer buffers (BatchNorm's batch counter)
    are copied.
    """

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.updates = 0
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self._pairs(model)

    def _pairs(self, model: nn.Module) -> None:
        pairs = list(zip(self.module.state_dict().values(), model.state_dict().values()))
        self._float = [(e, m) for e, m in pairs if e.is_floating_point()]
        self._other = [(e, m) for e, m in pairs if not e.is_floating_point()]

    def current_decay(self) -> float:
        """The decay the next update uses."""
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self) -> None:
        """Move the average one step towards the model's current weights."""
        weight = 1.0 - self.current_decay()
        torch._foreach_lerp_([e for e, _ in self._float], [m for _, m in self._float], weight)
        for e, m in self._other:
            e.copy_(m)
        self.updates += 1

    def state_dict(self) -> dict[str, Any]:
        """The average and its update count, for resuming."""
        return {"weights": self.module.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.module.load_state_dict(state["weights"])
        self.updates = int(state["updates"])


@dataclass
class TrainingState:
    """A model with its optimizer, per-step LR schedule and weight average: what a training step changes."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    schedule: LRSchedule
    scheduler: torch.optim.lr_scheduler.LambdaLR
    ema: WeightEMA | None
    step: int = 0

    def candidates(self) -> dict[str, nn.Module]:
        """The weights to score on validation: the raw ones and, with an average, ``ema``."""
        return {"raw": self.model, **({"ema": self.ema.module} if self.ema is not None else {})}

    def last_lr(self) -> float:
        """The learning rate of the most recent step (the first step's before any)."""
        return self.optimizer.param_groups[0]["initial_lr"] * self.schedule(max(0, self.step - 1))

    def state_dict(self) -> dict[str, Any]:
        """Optimizer, scheduler, step and average, for resuming."""
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(), "step": self.step,
                **({"ema": self.ema.state_dict()} if self.ema is not None else {})}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = int(state.get("step", self.scheduler.last_epoch))
        if self.ema is not None and "ema" in state:
            self.ema.load_state_dict(state["ema"])


def start_training(model: nn.Module, recipe: Recipe, steps_per_epoch: int) -> TrainingState:
    """Optimizer, schedule and (with ``ema_decay``) weight average for ``model``.

    ``model`` may be wrapped by DistributedDataParallel: the average follows the wrapped module.
    """
    optimizer = build_optimizer(model, recipe)
    schedule = LRSchedule(recipe.schedule, recipe.warmup_epochs, recipe.epochs, max(1, steps_per_epoch))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    ema = WeightEMA(getattr(model, "module", model), recipe.ema_decay) if recipe.ema_decay > 0 else None
    return TrainingState(model, optimizer, schedule, scheduler, ema)


def train_step(state: TrainingState, images: torch.Tensor, targets: torch.Tensor, recipe: Recipe,
               autocast: contextlib.AbstractContextManager | None = None,
               frozen: Iterable[nn.Parameter] = ()) -> torch.Tensor:
    """One optimizer step on a normalized batch; returns the (detached) loss.

    ``frozen`` parameters keep their values and optimizer state: their gradients are dropped before the step
    (the optimizers skip a parameter without a gradient). Dropping them, rather than switching ``requires_grad``
    off, leaves DistributedDataParallel's set of parameters the same in every epoch.
    """
    with autocast if autocast is not None else contextlib.nullcontext():
        loss, _ = classification_loss(state.model(images), targets, recipe)
    state.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    for p in frozen:
        p.grad = None
    state.optimizer.step()
    state.scheduler.step()
    if state.ema is not None:
        state.ema.update()
    state.step += 1
    return loss.detach()


@torch.no_grad()
def precise_bn(model: nn.Module, batches: Iterable[torch.Tensor],
               autocast: contextlib.AbstractContextManager | None = None) -> int:
    """Re-estimate BatchNorm running statistics of ``model`` from ``batches`` of normalized, un-augmented images.

    Running averages collected under heavy augmentation and a moving network can be far from what clean images
    produce, which hurts deep BN networks most ("precise BN"). The statistics become the plain average over the
    batches; under torch.distributed they are then averaged over the workers so every rank scores the same model.
    Returns the number of batches used (0 when the model has no BatchNorm: nothing to do).
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return 0
    was_training = model.training
    saved = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches below
    model.train()
    used = 0
    with autocast if autocast is not None else contextlib.nullcontext():
        for batch in batches:
            model(batch)
            used += 1
    for m, momentum in zip(norms, saved):
        m.momentum = momentum
    _average_over_workers(norms)
    model.train(was_training)
    return used


def _average_over_workers(norms: list[nn.Module]) -> None:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    world = dist.get_world_size()
    for m in norms:
        for stat in (m.running_mean, m.running_var):
            if stat is not None:
                dist.all_reduce(stat)  # SUM: gloo (CPU workers) has no AVG
                stat.div_(world)
