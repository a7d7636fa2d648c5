"""torchvision ImageNet architectures, registered from one table.

Each row of :data:`TORCHVISION_MODELS` becomes a registry entry whose builder
constructs the torchvision model, optionally loads ImageNet weights (from
torchvision's download, or from ``weights_uri``), and swaps the classification
head for a ``num_classes``-way one. Adding an architecture is adding a row.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from torch import nn

from bloodray.models.registry import (
    Builder,
    PretrainedWeightsError,
    build_from_weights,
    load_state_dict_file,
    register_model,
)


@dataclass(frozen=True)
class TorchvisionModel:
    """One torchvision architecture as the registry sees it.

    ``name`` is both the registry name and the name
    ``torchvision.models.get_model`` knows; ``kwargs`` are fixed constructor
    arguments.
    """

    name: str
    input_size: int
    head: tuple[str, ...]
    weights: str
    description: str
    kwargs: Mapping[str, Any] = field(default_factory=dict)


TORCHVISION_MODELS: tuple[TorchvisionModel, ...] = (
    TorchvisionModel("vgg16", 224, ("classifier.6",), "VGG16_Weights.IMAGENET1K_V1",
                     "VGG-16 (Simonyan & Zisserman 2014)"),
    TorchvisionModel("vgg19", 224, ("classifier.6",), "VGG19_Weights.IMAGENET1K_V1",
                     "VGG-19 (Simonyan & Zisserman 2014)"),
    TorchvisionModel("resnet50", 224, ("fc",), "ResNet50_Weights.IMAGENET1K_V2",
                     "ResNet-50 (He et al. 2016)"),
    TorchvisionModel("resnet101", 224, ("fc",), "ResNet101_Weights.IMAGENET1K_V2",
                     "ResNet-101 (He et al. 2016)"),
    TorchvisionModel("resnet152", 224, ("fc",), "ResNet152_Weights.IMAGENET1K_V2",
                     "ResNet-152 (He et al. 2016)"),
    # The auxiliary classifier stays on so training can add its loss; in eval
    # mode the model returns plain logits. transform_input is fixed to what the
    # ImageNet weights use, so a model trained from them behaves the same when
    # it is rebuilt with pretrained=False to load a checkpoint for inference.
    # init_weights is explicit because torchvision warns when it is left unset.
    TorchvisionModel("inception_v3", 299, ("fc", "AuxLogits.fc"), "Inception_V3_Weights.IMAGENET1K_V1",
                     "Inception v3 with auxiliary head (Szegedy et al. 2016)",
                     {"aux_logits": True, "transform_input": True, "init_weights": True}),
    TorchvisionModel("mobilenet_v2", 224, ("classifier.1",), "MobileNet_V2_Weights.IMAGENET1K_V2",
                     "MobileNetV2 (Sandler et al. 2018)"),
    TorchvisionModel("densenet201", 224, ("classifier",), "DenseNet201_Weights.IMAGENET1K_V1",
                     "DenseNet-201 (Huang et al. 2017)"),
)


def _imagenet_state_dict(spec: TorchvisionModel) -> Mapping[str, Any]:
    import torchvision

    weights = torchvision.models.get_weight(spec.weights)
    try:
        return weights.get_state_dict(progress=False, check_hash=True)
    # URLError/HTTPError/socket errors are OSErrors; a truncated or tampered
    # download surfaces as RuntimeError from the hash check or the unzip.
    except (OSError, RuntimeError) as exc:
        raise PretrainedWeightsError(
            f"the ImageNet weights for {spec.name} ({spec.weights}) could not be downloaded "
            f"from {weights.url}: {exc}. Set model.weights_uri to a local path or s3:// URI of "
            f"a torchvision {spec.name} state_dict file (.pth or .safetensors) to load them from there instead."
        ) from exc


def _torchvision_builder(spec: TorchvisionModel) -> Builder:
    def build(
        num_classes: int,
        *,
        pretrained: bool = False,
        weights_uri: str | None = None,
        storage_options: Mapping[str, Any] | None = None,
        **kw: Any,
    ) -> nn.Module:
        # Imported here so that importing bloodray.models (CLI, config checks)
        # does not pay for torchvision.
        import torchvision

        def construct(n: int) -> nn.Module:
            return torchvision.models.get_model(spec.name, weights=None, num_classes=n, **{**spec.kwargs, **kw})

        if not pretrained:
            return construct(num_classes)
        state = load_state_dict_file(weights_uri, storage_options) if weights_uri else _imagenet_state_dict(spec)
        return build_from_weights(construct, num_classes, spec.head, state, source=weights_uri or spec.weights)

    build.__name__ = build.__qualname__ = spec.name
    build.__doc__ = (
        f"{spec.description} from torchvision with a ``num_classes``-way head at {', '.join(spec.head)}. "
        f"``pretrained`` loads {spec.weights} (or ``weights_uri``); ``kw`` goes to torchvision."
    )
    return build


for _spec in TORCHVISION_MODELS:
    register_model(
        _spec.name,
        input_size=_spec.input_size,
        head=_spec.head,
        imagenet_weights=_spec.weights,
        description=_spec.description,
    )(_torchvision_builder(_spec))
del _spec
