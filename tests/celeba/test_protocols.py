"""Tests for the CelebA protocols and the networks they build."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import NoReturn
from urllib.error import URLError

import protocols
import pytest
import torch
import torchvision
from arguments import DEFAULT_METHODS
from celeba_files import ATTRIBUTE_NAMES, DEFAULT_ATTRIBUTES, CelebAError
from protocols import PROTOCOLS, Protocol, build_model, protocol

from dstmtl import FusedLinearHeads, MaskedMultiTaskLoss, MultiHeadNet
from dstmtl.study import StudyConfig, StudyTask

FAMO40 = PROTOCOLS["famo40"]

# FAMO's CNN by hand (github.com/Cranial-XIX/FAMO, experiments/celeba/models.py): seven bias-free
# 3x3 convolutions 3->64->128->128->256->256->512->512, each followed by a batch norm (a scale
# and a shift per channel), two bias-free 512x512 linear layers with a batch norm each, and
# one 512->1 linear head with a bias per attribute.
_CONV_WEIGHTS = 9 * (3 * 64 + 64 * 128 + 128 * 128 + 128 * 256 + 256 * 256 + 256 * 512 + 512 * 512)
_CONV_NORMS = 2 * (64 + 128 + 128 + 256 + 256 + 512 + 512)
_DENSE = 2 * (512 * 512 + 2 * 512)
_HEADS = 40 * (512 + 1)
# 4,646,592 + 3,712 + 526,336 + 20,520
FAMO_CNN_PARAMETERS = _CONV_WEIGHTS + _CONV_NORMS + _DENSE + _HEADS
# The longest path from the image to a logit crosses 7 convolutions, 2 linear layers and the
# head: the "9-layer" CNN of the paper (7 + 2) plus the attribute's linear head.
FAMO_CNN_DEPTH = 7 + 2 + 1


@pytest.fixture(scope="module")
def famo_cnn() -> MultiHeadNet:
    torch.manual_seed(0)
    return build_model(FAMO40, FAMO40.attributes, None)


def test_famo_cnn_gives_one_logit_per_attribute_at_64_px(famo_cnn: MultiHeadNet) -> None:
    famo_cnn.eval()
    with torch.no_grad():
        outputs = famo_cnn(torch.randn(3, 3, 64, 64))
    assert list(outputs) == list(ATTRIBUTE_NAMES)
    assert {tuple(output.shape) for output in outputs.values()} == {(3, 1)}


def test_famo_cnn_depth_is_counted_from_its_architecture(famo_cnn: MultiHeadNet) -> None:
    assert famo_cnn.depths() == dict.fromkeys(ATTRIBUTE_NAMES, FAMO_CNN_DEPTH)


def test_famo_cnn_parameter_count_matches_the_hand_count(famo_cnn: MultiHeadNet) -> None:
    assert FAMO_CNN_PARAMETERS == 5_197_160
    assert sum(parameter.numel() for parameter in famo_cnn.parameters()) == FAMO_CNN_PARAMETERS


def test_famo_cnn_heads_are_one_linear_logit_per_attribute(famo_cnn: MultiHeadNet) -> None:
    (fused,) = famo_cnn.fused_heads
    assert isinstance(fused, FusedLinearHeads)
    assert fused.outputs == dict.fromkeys(ATTRIBUTE_NAMES, 1)
    assert tuple(fused.weight.shape) == (40, protocols.FAMO_CNN_FEATURES)
    assert tuple(fused.bias.shape) == (40,)


def test_famo_cnn_learns_a_fixed_batch() -> None:
    # 32 px instead of 64 to keep it cheap: global average pooling makes the CNN take any
    # size that survives its three 2x2 pools.
    small = dataclasses.replace(FAMO40, image_size=32)
    torch.manual_seed(0)
    model = build_model(small, small.attributes, None)
    images = torch.rand(8, 3, 32, 32)
    labels = (torch.rand(8, len(small.attributes)) < 0.5).float()
    loss_fn = MaskedMultiTaskLoss(dict.fromkeys(small.attributes, "binary"))
    optimizer = torch.optim.Adam(model.parameters(), lr=small.learning_rate)
    losses = []
    for _ in range(5):
        loss = loss_fn(model(images), labels).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses


def test_unknown_protocol_names_the_valid_ones() -> None:
    with pytest.raises(CelebAError, match=r"^unknown protocol 'famo'; use one of study, famo40$"):
        protocol("famo")


def test_protocol_returns_the_named_one() -> None:
    assert protocol("famo40") is FAMO40
    assert all(protocol(name).name == name for name in PROTOCOLS)


def test_study_protocol_keeps_the_defaults_of_run_py() -> None:
    # The values of run.py before the protocols: pipeline._FULL (5 epochs, batch 256, 128 px,
    # DEFAULT weights) and the command line's defaults (178 px crop, lr 1e-3, equal vs DST).
    assert PROTOCOLS["study"] == Protocol(
        name="study",
        description=PROTOCOLS["study"].description,
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
    )


def test_famo40_is_famos_setting() -> None:
    assert FAMO40.attributes == ATTRIBUTE_NAMES
    assert (FAMO40.image_size, FAMO40.crop, FAMO40.normalise, FAMO40.flip) == (
        64,
        None,
        False,
        False,
    )
    assert (FAMO40.batch_size, FAMO40.epochs, FAMO40.learning_rate) == (256, 15, 3e-4)
    assert (FAMO40.metric, FAMO40.reference, FAMO40.weights) == ("f1", "stl", None)


@pytest.mark.parametrize("name", list(PROTOCOLS))
def test_protocol_is_a_valid_study_config(name: str) -> None:
    chosen = PROTOCOLS[name]
    config = StudyConfig(
        tasks={
            attribute: StudyTask("binary", metric=chosen.metric) for attribute in chosen.attributes
        },
        methods=chosen.methods,
        epochs=chosen.epochs,
        batch_size=chosen.batch_size,
        learning_rate=chosen.learning_rate,
        reference=chosen.reference,
    )
    assert config.reference in config.methods


def test_study_protocol_builds_resnet18_with_a_head_per_attribute() -> None:
    model = build_model(PROTOCOLS["study"], DEFAULT_ATTRIBUTES, None)
    assert model.task_names == DEFAULT_ATTRIBUTES
    assert model.depths() == dict.fromkeys(DEFAULT_ATTRIBUTES, 18)


def test_unknown_resnet_weights_are_refused_with_the_fix() -> None:
    with pytest.raises(CelebAError, match=r"'NOPE'.*Pass --weights none to train from scratch\.$"):
        build_model(PROTOCOLS["study"], DEFAULT_ATTRIBUTES, "NOPE")


def test_resnet_weights_that_cannot_be_fetched_are_refused_with_the_fix(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def offline(*args: object, **kwargs: object) -> NoReturn:
        raise URLError("no network")

    monkeypatch.setattr(torchvision.models, "get_model", offline)
    with pytest.raises(CelebAError, match=r"no network.*Pass --weights none to train from scratch"):
        build_model(PROTOCOLS["study"], DEFAULT_ATTRIBUTES, "DEFAULT")


def test_famo_cnn_refuses_weights() -> None:
    message = (
        "the famo40 protocol's CNN has no pretrained weights, got weights 'DEFAULT'. "
        "Pass --weights none to train from scratch."
    )
    with pytest.raises(CelebAError, match=f"^{re.escape(message)}$"):
        build_model(FAMO40, FAMO40.attributes, "DEFAULT")


def test_protocols_import_without_torch() -> None:
    # run.py checks --protocol before it imports torch, so that --help and a bad name answer
    # at once.
    code = "import sys, protocols; sys.exit('torch' in sys.modules)"
    example_dir = Path(protocols.__file__).parent
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(example_dir), *sys.path])}
    subprocess.run([sys.executable, "-c", code], check=True, env=environment)
