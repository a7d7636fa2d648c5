"""BloodNet: the small from-scratch CNN of Asghar et al. (2023) for PBC images.

The paper's network takes 100x100 RGB cells through seven blocks of
``Conv2d 3x3 'same' -> ReLU -> MaxPool 2x2 -> Dropout(0.25)`` with
(32, 64, 64, 64, 128, 256, 256) filters, then ``Flatten -> Dense(128) -> ReLU
-> Dense(num_classes)``.

Two registered variants differ only in the pooling stride:

``bloodnet`` (default)
    stride-2 pooling with ``ceil_mode=True``, so the seven poolings take
    100 px down to 1 px (100, 50, 25, 13, 7, 4, 2, 1) and the network has
    about 1.1 M parameters. This is the usual reading of a 2x2 max-pool and the
    one worth training.
``bloodnet_paper``
    the paper's text taken literally: 2x2 max-pool with stride 1. Each pooling
    then only trims one pixel (100 -> 93), leaving a 93x93x256 feature map and
    about 283 M parameters in the first dense layer alone. Kept for
    reproducing the paper, not recommended.

The paper rescales pixels to [0, 1]; here inputs are centred with mean and std
0.5 so the preprocessing preset works like the torchvision models'.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Mapping, Sequence

from torch import Tensor, nn

from bloodray.classes import NUM_CLASSES
from bloodray.models.registry import PretrainedWeightsError, build_from_weights, load_state_dict_file, register_model

PAPER_FILTERS: tuple[int, ...] = (32, 64, 64, 64, 128, 256, 256)
#: Normalisation layers BloodNet can put after each convolution (``norm=``).
NORMS = ("batch", "group", "none")
#: Index of the last Linear in ``BloodNet.classifier`` (Flatten, Linear, ReLU, Linear).
HEAD = "classifier.3"


def pooled_size(size: int, stride: int, kernel: int = 2) -> int:
    """Output side of ``MaxPool2d(kernel, stride, ceil_mode=True)`` on a ``size`` px input.

    Same rule as PyTorch's pooling, so the flatten size is known without running
    a tensor through the network (and models can be built on the meta device).
    """
    out = math.ceil((size - kernel) / stride) + 1
    # PyTorch drops a last window that would start beyond the input.
    if (out - 1) * stride >= size:
        out -= 1
    return out


class BloodNet(nn.Module):
    """Plain VGG-style CNN of Asghar et al. (2023); see the module docstring.

    Args:
        num_classes: size of the output layer.
        input_size: side in px of the square input; sets the flatten size.
        pool_stride: stride of the 2x2 max-pools (2 = ``bloodnet``,
            1 = the paper's literal text, ``bloodnet_paper``).
        dropout: dropout after every block (0.25 in the paper).
        batch_norm: add BatchNorm after each convolution (not in the paper); the
            same as ``norm="batch"``.
        norm: normalisation after each convolution: ``"batch"``, ``"group"``
            (GroupNorm, statistics per image, so they do not depend on the
            batch or on the lab the training batches came from) or ``"none"``.
            ``None`` follows ``batch_norm``.
        groups: GroupNorm's number of groups (capped by the channel count).
        filters: output channels of the seven conv blocks.
        hidden: width of the dense layer before the output.
    """

    def __init__(
        self,
        num_classes: int = NUM_CLASSES,
        *,
        input_size: int = 100,
        pool_stride: int = 2,
        dropout: float = 0.25,
        batch_norm: bool = False,
        filters: Sequence[int] = PAPER_FILTERS,
        hidden: int = 128,
        norm: str | None = None,
        groups: int = 8,
    ):
        super().__init__()
        if norm is None:
            norm = "batch" if batch_norm else "none"
        elif batch_norm and norm != "batch":
            raise ValueError(f"batch_norm=True contradicts norm={norm!r}")
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {', '.join(NORMS)}, got {norm!r}")
        layers: list[nn.Module] = []
        channels, side = 3, input_size
        for width in filters:
            # The conv bias is redundant in front of a norm layer's own shift.
            layers.append(nn.Conv2d(channels, width, kernel_size=3, padding="same", bias=norm == "none"))
            if norm == "batch":
                layers.append(nn.BatchNorm2d(width))
            elif norm == "group":
                layers.append(nn.GroupNorm(math.gcd(groups, width), width))
            layers += [
                nn.ReLU(inplace=True),
                nn.MaxPool2d(kernel_size=2, stride=pool_stride, ceil_mode=True),
                nn.Dropout(dropout),
            ]
            channels, side = width, pooled_size(side, pool_stride)
            if side < 1:
                raise ValueError(f"input_size={input_size} is too small for {len(filters)} poolings")
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(channels * side * side, hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


def build_bloodnet(
    num_classes: int,
    *,
    pretrained: bool = False,
    weights_uri: str | None = None,
    storage_options: Mapping[str, Any] | None = None,
    **kw: Any,
) -> BloodNet:
    """Build a :class:`BloodNet`; ``kw`` goes to its constructor.

    There are no ImageNet weights for BloodNet: ``pretrained=True`` needs
    ``weights_uri``, a BloodNet state_dict saved with the same ``kw``. Its
    head may have a different number of classes; it is then replaced.
    """

    def construct(n: int) -> BloodNet:
        return BloodNet(n, **kw)

    if not pretrained:
        return construct(num_classes)
    if not weights_uri:
        raise PretrainedWeightsError(
            "BloodNet has no ImageNet weights: train it from scratch (pretrained=false) "
            "or set model.weights_uri to a BloodNet state_dict file"
        )
    state = load_state_dict_file(weights_uri, storage_options)
    return build_from_weights(construct, num_classes, HEAD, state, source=weights_uri)


_BLOODNET_SETTINGS: dict[str, Any] = dict(input_size=100, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), head=HEAD)

register_model(
    "bloodnet",
    description="Asghar et al. 2023 CNN, 7 conv blocks, 100 px, stride-2 pooling",
    **_BLOODNET_SETTINGS,
)(build_bloodnet)
register_model(
    "bloodnet_paper",
    description="Asghar et al. 2023 CNN as printed: stride-1 pooling, ~283 M params",
    **_BLOODNET_SETTINGS,
)(functools.partial(build_bloodnet, pool_stride=1))
