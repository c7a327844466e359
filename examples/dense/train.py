"""Dense multi-task prediction with DST: segmentation, depth and surface normals.

A NYUv2-style setting on generated scenes: a shared torchvision encoder, one decoder per
task, per-pixel missing labels, and a callable loss for the surface normals. See
docs/dense.md for a walk through it.

    python examples/dense/train.py                    # about a minute on a laptop CPU
    python examples/dense/train.py --epochs 6 --images 96 --size 48   # under a minute
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn

from dstmtl import MaskedMultiTaskLoss, MultiHeadNet, Task, TaskDropScheduler
from dstmtl.loss import TaskSpec
from dstmtl.metrics import Constant, TaskIncompleteness

CLASSES = 4  # background and three kinds of box
_STRIDE = 8  # the encoder's output is 1/8 of the input
_MISSING_FRACTION = 0.2  # of the pixels, per dense target


def make_scenes(count: int, size: int, generator: torch.Generator) -> dict[str, Tensor]:
    """Images of boxes on a tilted floor, with their per-pixel labels.

    Each box's class sets its colour and height; depth is the floor's slope minus the
    box heights, and the normals follow from the depth's gradient. A fifth of each
    target's pixels are marked missing, as real depth sensors and annotators leave holes:
    -1 for a class, NaN for a depth, the zero vector for a normal (which ``normal_loss``
    skips; a NaN there would make ``MaskedMultiTaskLoss`` skip the whole image, since it
    counts a callable's target as one label per sample).
    """
    rows = torch.linspace(0, 1, size).view(size, 1).expand(size, size)
    segmentation = torch.zeros(count, size, size, dtype=torch.long)
    depth = (2.0 + rows).expand(count, size, size).clone()
    for scene in range(count):
        for _ in range(3):
            cls = int(torch.randint(1, CLASSES, (), generator=generator))
            top, left = torch.randint(0, size - size // 4, (2,), generator=generator).tolist()
            side = int(torch.randint(size // 8, size // 3, (), generator=generator))
            segmentation[scene, top : top + side, left : left + side] = cls
            depth[scene, top : top + side, left : left + side] = 2.0 + rows[top, 0] - 0.3 * cls
    colours = torch.tensor([[0.5, 0.5, 0.5], [0.9, 0.2, 0.2], [0.2, 0.8, 0.3], [0.2, 0.3, 0.9]])
    shading = 1.5 / depth.unsqueeze(1)
    noise = 0.05 * torch.randn(count, 3, size, size, generator=generator)
    images = colours[segmentation].permute(0, 3, 1, 2) * shading + noise
    normals = _normals(depth)

    missing = torch.rand(3, count, size, size, generator=generator) < _MISSING_FRACTION
    segmentation[missing[0]] = -1
    depth = depth.masked_fill(missing[1], float("nan"))
    normals = normals.masked_fill(missing[2].unsqueeze(1), 0.0)
    return {
        "images": images,
        "segmentation": segmentation,
        "depth": depth.unsqueeze(1),
        "normals": normals,
    }


def _normals(depth: Tensor) -> Tensor:
    """Unit normals ``[B, 3, H, W]`` of the surface ``z = depth(x, y)``."""
    dz_dy, dz_dx = torch.gradient(depth, dim=(1, 2))
    normals: Tensor = F.normalize(
        torch.stack([-dz_dx, -dz_dy, torch.ones_like(depth)], dim=1), dim=1
    )
    return normals


def normal_loss(output: Tensor, target: Tensor) -> Tensor:
    """``1 - cos`` between predicted and true normals, averaged over each image's labelled
    pixels: one value per sample, as ``MaskedMultiTaskLoss`` asks of a callable.

    A missing normal is the zero vector, which no true normal is.
    """
    labelled = target.norm(dim=1) > 0
    cosine = F.cosine_similarity(output, target, dim=1)
    pixels = labelled.sum(dim=(1, 2)).clamp(min=1)
    losses: Tensor = ((1 - cosine) * labelled).sum(dim=(1, 2)) / pixels
    return losses


def build_model() -> MultiHeadNet:
    """ResNet18's stem and first two stages as the shared encoder, a decoder per task."""
    resnet = torchvision.models.resnet18(weights=None)
    encoder = nn.Sequential(*list(resnet.children())[:6])  # to layer2: 128 channels, 1/8

    def decoder(channels: int) -> nn.Module:
        return nn.Sequential(
            nn.Conv2d(128, 64, 3, padding=1),
            nn.ReLU(),
            nn.Upsample(scale_factor=_STRIDE, mode="bilinear", align_corners=False),
            nn.Conv2d(64, channels, 3, padding=1),
        )

    heads = {"segmentation": decoder(CLASSES), "depth": decoder(1), "normals": decoder(3)}
    return MultiHeadNet(encoder, heads)


def evaluate(model: MultiHeadNet, scenes: dict[str, Tensor]) -> dict[str, float]:
    """Mean IoU and pixel accuracy, mean absolute depth error, mean angle error in degrees."""
    with torch.no_grad():
        outputs = model.eval()(scenes["images"])
    model.train()
    predicted, truth = outputs["segmentation"].argmax(dim=1), scenes["segmentation"]
    labelled = truth >= 0
    ious = []
    for cls in range(CLASSES):
        union = ((predicted == cls) | (truth == cls)) & labelled
        if union.any():
            ious.append((((predicted == cls) & (truth == cls)).sum() / union.sum()).item())
    depth_known = ~scenes["depth"].isnan()
    normals_known = scenes["normals"].norm(dim=1) > 0
    cosine = F.cosine_similarity(outputs["normals"], scenes["normals"], dim=1)
    angles = torch.rad2deg(torch.acos(cosine.clamp(-1, 1)))
    return {
        "mean IoU": sum(ious) / len(ious),
        "pixel accuracy": (predicted == truth)[labelled].float().mean().item(),
        "depth abs error": (outputs["depth"] - scenes["depth"]).abs()[depth_known].mean().item(),
        "normal angle error": angles[normals_known].mean().item(),
    }


def main(argv: Sequence[str] | None = None) -> dict[str, dict[str, float]]:
    """Train with DST and return the test scores before and after training."""
    args = _parser().parse_args(argv)
    torch.manual_seed(args.seed)
    data = torch.Generator().manual_seed(args.seed)
    train = make_scenes(args.images, args.size, data)
    test = make_scenes(max(8, args.images // 4), args.size, data)

    model = build_model()
    tasks: dict[str, TaskSpec] = {
        "segmentation": Task("multiclass", outputs=CLASSES),
        "depth": Task("regression"),
        "normals": normal_loss,
    }
    loss_fn = MaskedMultiTaskLoss(tasks)
    scheduler = TaskDropScheduler(tasks, [TaskIncompleteness(), Constant()], generator=args.seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    scores = {"untrained": evaluate(model, test)}
    for epoch in range(args.epochs):
        order = torch.randperm(args.images, generator=data)
        for batch in order.split(args.batch_size):
            targets = {task: train[task][batch] for task in tasks}
            losses = loss_fn(model(train["images"][batch]), targets)
            optimizer.zero_grad()
            scheduler(losses, loss_fn.label_counts).backward()
            optimizer.step()
        scheduler.step()
        kept = ", ".join(scheduler.active_tasks)
        print(f"epoch {epoch}: losses {_rounded(scheduler.epoch_losses)}; next epoch: {kept}")
    scores["trained"] = evaluate(model, test)
    for name, values in scores.items():
        print(f"{name}: {_rounded(values)}")
    return scores


def _rounded(values: dict[str, float]) -> dict[str, float]:
    return {name: round(value, 4) for name, value in values.items()}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=256, help="training scenes [256]")
    parser.add_argument("--size", type=int, default=64, help="pixels per side [64]")
    parser.add_argument("--epochs", type=int, default=8, help="[8]")
    parser.add_argument("--batch-size", type=int, default=16, help="[16]")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam's learning rate [1e-3]")
    parser.add_argument("--seed", type=int, default=0, help="[0]")
    return parser


if __name__ == "__main__":
    main()
