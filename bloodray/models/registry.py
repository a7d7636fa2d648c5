"""One registry of named CNN builders for the PBC classifier.

Modelled on torchvision's ``models/_api.py`` and timm's ``_registry.py``: every
architecture registers a builder with the one signature::

    builder(num_classes, *, pretrained=False, weights_uri=None, storage_options=None, **kw) -> nn.Module

together with the facts the rest of bloodray needs about it (input size,
normalization, where the classification head lives, which ImageNet weights
exist). Preprocessing, training and the CLI read those facts from
:class:`ModelInfo` instead of special-casing model names.

The helpers below the registry (:func:`load_state_dict_file`,
:func:`build_from_weights`, :func:`replace_head`,
:func:`set_backbone_trainable`) are what builders share, so that loading
weights and swapping heads is written once for every architecture.
"""

from __future__ import annotations

import io
import pickle
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from bloodray.bounded_read import MAX_WEIGHTS_BYTES, InputReadError, read_file
from bloodray.classes import NUM_CLASSES
from bloodray.storage import describe_storage_error, filesystem

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

Builder = Callable[..., nn.Module]
HeadSpec = str | Sequence[str]


class UnknownModelError(KeyError):
    """Raised for a model name that is not registered; the message lists the names that are."""

    def __init__(self, name: str, available: Sequence[str]):
        super().__init__(name)
        self.name = name
        self.available = tuple(available)

    def __str__(self) -> str:
        # KeyError.__str__ would repr() the message and wrap it in quotes.
        return f"unknown model {self.name!r}; available: {', '.join(self.available)}"


class PretrainedWeightsError(RuntimeError):
    """Pretrained weights cannot be obtained, are unsafe to load, or do not fit the model."""


@dataclass(frozen=True)
class ModelInfo:
    """What bloodray knows about a registered model.

    Attributes:
        name: registry name, as used in configs and on the command line.
        builder: callable with the registry's one builder signature.
        input_size: side in px of the square images the model is trained and
            evaluated at.
        mean: per-channel normalization mean the preprocessing preset applies.
        std: per-channel normalization std the preprocessing preset applies.
        head: dotted attribute path of the classification head (an
            ``nn.Linear``), or several comma-separated paths when the model has
            more than one head (Inception's auxiliary classifier). Everything
            outside these modules is the backbone.
        imagenet_weights: torchvision weights enum spec such as
            ``"ResNet50_Weights.IMAGENET1K_V2"``; ``None`` when no ImageNet
            weights exist.
        description: one line for ``bloodray models``.
    """

    name: str
    builder: Builder
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    head: str
    imagenet_weights: str | None
    description: str

    @property
    def head_paths(self) -> tuple[str, ...]:
        """The head paths as a tuple (``head`` split on commas)."""
        return _head_paths(self.head)


_REGISTRY: dict[str, ModelInfo] = {}


def _head_paths(head: HeadSpec) -> tuple[str, ...]:
    parts = head.split(",") if isinstance(head, str) else head
    paths = tuple(p.strip() for p in parts if p.strip())
    if not paths:
        raise ValueError(f"a model head needs at least one attribute path, got {head!r}")
    return paths


def _triple(name: str, value: Sequence[float]) -> tuple[float, float, float]:
    values = tuple(float(v) for v in value)
    if len(values) != 3:
        raise ValueError(f"{name} must have one value per RGB channel, got {value!r}")
    return values  # type: ignore[return-value]


def register_model(
    name: str | None = None,
    *,
    input_size: int,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    head: HeadSpec,
    imagenet_weights: str | None = None,
    description: str = "",
) -> Callable[[Builder], Builder]:
    """Decorator that registers a model builder under ``name`` (default: the function's name).

    ``head`` is a dotted path such as ``"fc"`` or ``"classifier.6"``, or several
    paths as a tuple or comma-separated string. The builder is returned
    unchanged, so it can still be called directly.
    """

    def decorate(builder: Builder) -> Builder:
        key = name or getattr(builder, "__name__", None)
        if not key:
            raise ValueError("register_model needs a name for builders without __name__ (e.g. functools.partial)")
        if key in _REGISTRY:
            raise ValueError(f"model {key!r} is already registered")
        if input_size <= 0:
            raise ValueError(f"input_size of {key!r} must be positive, got {input_size}")
        _REGISTRY[key] = ModelInfo(
            name=key,
            builder=builder,
            input_size=int(input_size),
            mean=_triple("mean", mean),
            std=_triple("std", std),
            head=",".join(_head_paths(head)),
            imagenet_weights=imagenet_weights,
            description=description,
        )
        return builder

    return decorate


def list_models() -> list[str]:
    """Names of all registered models, sorted."""
    return sorted(_REGISTRY)


def get_model_info(name: str) -> ModelInfo:
    """Return the :class:`ModelInfo` registered as ``name``.

    Raises:
        UnknownModelError: ``name`` is not registered.
    """
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownModelError(name, list_models()) from None


def create_model(
    name: str,
    num_classes: int = NUM_CLASSES,
    *,
    pretrained: bool = False,
    weights_uri: str | None = None,
    freeze_backbone: bool = False,
    storage_options: Mapping[str, Any] | None = None,
    **kw: Any,
) -> nn.Module:
    """Build the registered model ``name`` with a ``num_classes``-way head.

    Args:
        name: registry name (see :func:`list_models`).
        num_classes: size of the classification head.
        pretrained: start from pretrained weights: the torchvision ImageNet
            weights (downloaded into the torch hub cache), or ``weights_uri``
            when given. The head is always freshly initialised for
            ``num_classes`` unless the weights already have that many classes.
        weights_uri: local path or ``s3://`` URI of a state_dict file
            (``torch.save(model.state_dict())`` or ``.safetensors``) to use
            instead of downloading; for torchvision models this is the
            1000-class ImageNet state_dict. Only plain tensors are loaded,
            never arbitrary pickled objects. Requires ``pretrained=True``.
        freeze_backbone: set ``requires_grad=False`` on every parameter
            outside :attr:`ModelInfo.head`. This does not stop BatchNorm
            running statistics from updating in train mode.
        storage_options: fsspec options (e.g. ``endpoint_url``) for ``weights_uri``.
        **kw: passed to the builder (e.g. ``dropout`` or ``batch_norm`` for
            bloodnet, ``dropout`` for torchvision VGG/MobileNet).

    Raises:
        UnknownModelError: ``name`` is not registered.
        PretrainedWeightsError: pretrained weights cannot be downloaded,
            are unsafe, or do not fit the model.
        bloodray.storage.StorageError: ``weights_uri`` cannot be read.
    """
    info = get_model_info(name)
    if num_classes < 1:
        raise ValueError(f"num_classes must be positive, got {num_classes}")
    if weights_uri and not pretrained:
        # Silently ignoring the file, or silently loading it, would both surprise
        # someone: make the config say what it means.
        raise ValueError(f"weights_uri={weights_uri!r} is only used with pretrained=True (model {name!r})")
    model = info.builder(
        num_classes, pretrained=pretrained, weights_uri=weights_uri, storage_options=storage_options, **kw
    )
    if freeze_backbone:
        set_backbone_trainable(model, info.head, trainable=False)
    return model


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters in ``model`` (shared parameters counted once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def model_table() -> list[dict[str, Any]]:
    """One row per registered model for ``bloodray models``.

    Keys: ``name``, ``input_size``, ``params`` (with a :data:`NUM_CLASSES`-way
    head), ``imagenet_weights`` (``None`` when there are none) and
    ``description``. Models are built on the ``meta`` device, so no memory is
    allocated and no weights are initialised or downloaded.
    """
    rows = []
    for name in list_models():
        info = _REGISTRY[name]
        with torch.device("meta"):
            model = info.builder(NUM_CLASSES)
        rows.append(
            {
                "name": name,
                "input_size": info.input_size,
                "params": count_parameters(model),
                "imagenet_weights": info.imagenet_weights,
                "description": info.description,
            }
        )
    return rows


# --------------------------------------------------------------------------
# Helpers shared by builders.


def load_state_dict_file(uri: str, storage_options: Mapping[str, Any] | None = None) -> dict[str, torch.Tensor]:
    """Read a state_dict from a local path or ``s3://`` URI.

    ``.safetensors`` files are read with safetensors; anything else with
    ``torch.load(..., weights_only=True)``, which refuses pickled objects other
    than tensors and plain containers. A checkpoint dict that nests the
    weights under ``"state_dict"`` or ``"model"`` is unwrapped, and a
    ``"module."`` prefix left by DistributedDataParallel is stripped.
    """
    path = filesystem(uri, storage_options)[1]
    try:
        data = read_file(uri, storage_options, max_bytes=MAX_WEIGHTS_BYTES, what="model.weights_uri")
    except InputReadError:
        raise
    except OSError as exc:
        raise describe_storage_error(uri, exc) from exc

    if path.endswith(".safetensors"):
        from safetensors.torch import load as load_safetensors

        try:
            state: Any = load_safetensors(data)
        except Exception as exc:  # safetensors raises its own SafetensorError
            raise PretrainedWeightsError(f"{uri}: not a readable safetensors file ({exc})") from exc
    else:
        try:
            state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            raise PretrainedWeightsError(
                f"refusing to load {uri}: it holds pickled objects other than tensors. "
                "Save weights with torch.save(model.state_dict(), path) or as .safetensors."
            ) from exc
        except (RuntimeError, EOFError) as exc:
            raise PretrainedWeightsError(f"{uri}: not a readable torch state_dict file ({exc})") from exc

    if isinstance(state, Mapping):
        for key in ("state_dict", "model"):
            if isinstance(state.get(key), Mapping):
                state = state[key]
                break
    if not isinstance(state, Mapping) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise PretrainedWeightsError(f"{uri}: expected a state_dict (a mapping of names to tensors)")
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return dict(state)


def replace_head(model: nn.Module, head: HeadSpec, num_classes: int) -> nn.Module:
    """Replace each ``nn.Linear`` at the paths in ``head`` by a fresh ``num_classes``-way one."""
    for path in _head_paths(head):
        old = model.get_submodule(path)
        if not isinstance(old, nn.Linear):
            raise TypeError(f"head {path!r} of {type(model).__name__} is {type(old).__name__}, not nn.Linear")
        new = nn.Linear(
            old.in_features, num_classes, bias=old.bias is not None, device=old.weight.device, dtype=old.weight.dtype
        )
        parent_path, _, attr = path.rpartition(".")
        setattr(model.get_submodule(parent_path) if parent_path else model, attr, new)
    return model


def build_from_weights(
    construct: Callable[[int], nn.Module],
    num_classes: int,
    head: HeadSpec,
    state_dict: Mapping[str, torch.Tensor],
    source: str,
) -> nn.Module:
    """Build a model from pretrained weights and give it a ``num_classes``-way head.

    ``construct(n)`` must build the architecture with an ``n``-way head. The
    architecture is built with as many classes as the weights have (read from
    the first head's weight), loaded strictly -- so a file for another
    architecture fails loudly instead of half-loading -- and then re-headed.
    ``source`` names the weights in error messages.
    """
    paths = _head_paths(head)
    key = f"{paths[0]}.weight"
    if key not in state_dict:
        raise PretrainedWeightsError(f"{source}: does not fit this model (no {key!r} in the state_dict)")
    source_classes = int(state_dict[key].shape[0])
    model = construct(source_classes)
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as exc:
        raise PretrainedWeightsError(f"{source}: does not fit {type(model).__name__}: {exc}") from exc
    if source_classes != num_classes:
        replace_head(model, paths, num_classes)
    return model


def set_backbone_trainable(model: nn.Module, head: HeadSpec, trainable: bool) -> nn.Module:
    """Set ``requires_grad`` to ``trainable`` on every parameter outside ``head``.

    Head parameters are always left trainable. Call with ``trainable=True`` to
    unfreeze the backbone again for a fine-tuning stage.
    """
    paths = _head_paths(head)
    for path in paths:
        model.get_submodule(path)  # fail on a wrong path instead of freezing everything
    prefixes = tuple(f"{p}." for p in paths)
    for name, param in model.named_parameters():
        param.requires_grad_(trainable or name.startswith(prefixes))
    return model
