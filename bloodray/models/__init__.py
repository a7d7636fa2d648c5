"""CNN architectures for PBC classification behind one registry.

Example::

    from bloodray.models import create_model, get_model_info

    model = create_model("resnet50", pretrained=True, weights_uri="s3://bucket/resnet50.pth")
    size = get_model_info("resnet50").input_size  # 224

Importing the package registers the torchvision models (:mod:`.zoo`) and the
paper's BloodNet (:mod:`.bloodnet`); no model is built until asked for.
"""

from bloodray.models.registry import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ModelInfo,
    PretrainedWeightsError,
    UnknownModelError,
    build_from_weights,
    count_parameters,
    create_model,
    get_model_info,
    list_models,
    load_state_dict_file,
    model_table,
    register_model,
    replace_head,
    set_backbone_trainable,
)

# Imported for their side effect: registering their models.
from bloodray.models import bloodnet, zoo  # noqa: E402,F401  isort: skip
from bloodray.models.bloodnet import BloodNet  # noqa: E402

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "BloodNet",
    "ModelInfo",
    "PretrainedWeightsError",
    "UnknownModelError",
    "build_from_weights",
    "count_parameters",
    "create_model",
    "get_model_info",
    "list_models",
    "load_state_dict_file",
    "model_table",
    "register_model",
    "replace_head",
    "set_backbone_trainable",
]
