"""The settings of a CelebA study by protocol name, and the network each protocol trains.

``study`` is this example's own protocol (an ImageNet ResNet18 on 8 attributes, judged
by accuracy against equal weights). ``famo40`` is the literature protocol of FAMO (Liu et
al., NeurIPS 2023, Table 3), as its code (github.com/Cranial-XIX/FAMO,
``experiments/celeba``) runs it: all 40 attributes, a 9-layer CNN trained from scratch on
64x64 images, Adam 3e-4, batch 256, 15 epochs, per-attribute F1 at threshold 0.5 and
Δm% against single-task models, so that a run compares with the published table.

Torch is imported only by :func:`build_model`, so the command line can list and check
protocol names before it imports torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from arguments import DEFAULT_METHODS
from celeba_files import ATTRIBUTE_NAMES, DEFAULT_ATTRIBUTES, CelebAError

if TYPE_CHECKING:
    from dstmtl import MultiHeadNet

__all__ = ["FAMO_CNN_FEATURES", "PROTOCOLS", "Protocol", "build_model", "protocol"]

Model = Literal["resnet18", "famo_cnn"]
Metric = Literal["accuracy", "f1"]

FAMO_CNN_FEATURES = 512
"""The width of the FAMO CNN's shared feature, which every attribute's linear head reads."""

# Output channels of the FAMO CNN's 3x3 convolutions, one stage per tuple; a 2x2 max pool
# ends every stage but the last, which global average pooling ends instead.
_FAMO_CNN_STAGES: tuple[tuple[int, ...], ...] = ((64,), (128, 128), (256, 256), (512, 512))
# Bias-free fully connected layers after the pooling, each with batch norm and ReLU.
_FAMO_CNN_DENSE_LAYERS = 2


@dataclass(frozen=True)
class Protocol:
    """The settings that differ between the CelebA protocols.

    Attributes:
        name: The protocol's name, its key in :data:`PROTOCOLS`.
        description: One line: what the protocol is and where it comes from.
        attributes: The attributes trained, one binary task each, in task order.
        model: The network: ``"resnet18"`` (torchvision's, with a linear head per
            attribute) or ``"famo_cnn"`` (FAMO's 9-layer CNN, from scratch).
        weights: The default torchvision weights of the model, or ``None`` for random
            initialisation.
        image_size: The square side, in pixels, the images are resized to.
        crop: The side of the centre square cut out before resizing; ``None`` resizes the
            whole 178x218 image to the square, squeezing its height.
        normalise: Whether the input is standardised with ImageNet's channel mean and
            standard deviation (else it is the pixel value over 255, in [0, 1]).
        flip: Whether training images are mirrored left-right with probability 1/2.
        batch_size: Training batch size.
        epochs: Training epochs per run.
        learning_rate: Adam's learning rate.
        metric: The per-attribute metric that selects the epoch and the Δm% compares.
        methods: The methods run by default.
        reference: The method Δm% and the paired tests compare with: ``"equal"`` weights,
            or ``"stl"``, one single-task model per attribute.
    """

    name: str
    description: str
    attributes: tuple[str, ...]
    model: Model
    weights: str | None
    image_size: int
    crop: int | None
    normalise: bool
    flip: bool
    batch_size: int
    epochs: int
    learning_rate: float
    metric: Metric
    methods: tuple[str, ...]
    reference: str


PROTOCOLS: dict[str, Protocol] = {
    "study": Protocol(
        name="study",
        description=(
            "this example's study: ImageNet ResNet18 on 8 attributes, 128 px from a 178 px "
            "centre crop, accuracy against equal weights"
        ),
        attributes=DEFAULT_ATTRIBUTES,
        model="resnet18",
        weights="DEFAULT",
        image_size=128,
        crop=178,
        normalise=True,
        flip=True,
        batch_size=256,
        epochs=5,
        learning_rate=1e-3,
        metric="accuracy",
        methods=DEFAULT_METHODS,
        reference="equal",
    ),
    "famo40": Protocol(
        name="famo40",
        description=(
            "FAMO's CelebA protocol (Liu et al., NeurIPS 2023, Table 3; github.com/"
            "Cranial-XIX/FAMO experiments/celeba): 40 attributes, 9-layer CNN from scratch, "
            "64x64, Adam 3e-4, batch 256, 15 epochs, F1 against single-task models"
        ),
        attributes=ATTRIBUTE_NAMES,
        model="famo_cnn",
        weights=None,
        image_size=64,
        crop=None,
        normalise=False,
        flip=False,
        batch_size=256,
        epochs=15,
        learning_rate=3e-4,
        metric="f1",
        # The methods of FAMO's Table 3 that dstmtl has (LS is "equal"; IMTL-G is missing),
        # DST, and the single-task reference.
        methods=("stl", "equal", "uw", "dwa", "pcgrad", "rlw", "famo", "dst"),
        reference="stl",
    ),
}
"""The protocols by name."""


def protocol(name: str) -> Protocol:
    """The protocol called ``name``; :class:`CelebAError` naming the valid ones otherwise."""
    try:
        return PROTOCOLS[name]
    except KeyError:
        raise CelebAError(f"unknown protocol {name!r}; use one of {', '.join(PROTOCOLS)}") from None


def build_model(protocol: Protocol, attributes: Sequence[str], weights: str | None) -> MultiHeadNet:
    """The protocol's network, with one single-logit head per attribute.

    ``weights`` are torchvision weights of the ResNet18 (a name such as ``"DEFAULT"``) or
    ``None`` for random initialisation; the FAMO CNN is always trained from scratch.

    Raises:
        CelebAError: The weights cannot be loaded (unknown name, or no file and no
            network), or weights are given for the FAMO CNN; the fix is ``--weights none``.
    """
    from dstmtl import MultiHeadNet

    if protocol.model == "resnet18":
        try:
            return MultiHeadNet.from_torchvision("resnet18", attributes, weights=weights)
        except (RuntimeError, ValueError) as error:
            raise CelebAError(f"{error}. Pass --weights none to train from scratch.") from error
    if weights is not None:
        raise CelebAError(
            f"the {protocol.name} protocol's CNN has no pretrained weights, got weights "
            f"{weights!r}. Pass --weights none to train from scratch."
        )
    return _famo_cnn(attributes, protocol.image_size)


def _famo_cnn(attributes: Sequence[str], image_size: int) -> MultiHeadNet:
    import torch
    from torch import nn

    from dstmtl import FusedLinearHeads, MultiHeadNet

    layers: list[nn.Module] = []
    channels = 3
    for stage, widths in enumerate(_FAMO_CNN_STAGES):
        if stage:
            layers.append(nn.MaxPool2d(2))
        for width in widths:
            # No bias: the batch norm that follows has its own shift.
            conv = nn.Conv2d(channels, width, 3, padding=1, bias=False)
            layers += [conv, nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
            channels = width
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    for _ in range(_FAMO_CNN_DENSE_LAYERS):
        dense = nn.Linear(channels, FAMO_CNN_FEATURES, bias=False)
        layers += [dense, nn.BatchNorm1d(FAMO_CNN_FEATURES), nn.ReLU(inplace=True)]
        channels = FAMO_CNN_FEATURES
    # FAMO's heads are one nn.Linear(512, 1) each on the same feature: one fused matrix is
    # the same function with the same initialisation, in one matmul.
    heads = FusedLinearHeads(FAMO_CNN_FEATURES, dict.fromkeys(attributes, 1))
    return MultiHeadNet(
        nn.Sequential(*layers),
        heads.heads(),
        example_input=torch.zeros(1, 3, image_size, image_size),
    )
