"""The CelebA study in one file, to copy: ResNet18, 8 attributes, DST, test accuracy.

    python examples/celeba/minimal.py --root /data/celeba

``--root`` holds CelebA's ``img_align_celeba/``, ``list_attr_celeba.txt`` and
``list_eval_partition.txt``. run.py in this folder is the full study (baselines, model
selection, resume, reports); this file keeps only what DST needs.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from dstmtl import MaskedMultiTaskLoss, MultiHeadNet, TaskDropScheduler
from dstmtl.metrics import Constant, TaskIncompleteness

ATTRIBUTES = [
    "Male",
    "Smiling",
    "Young",
    "Eyeglasses",
    "Wearing_Hat",
    "Wearing_Necklace",
    "Wearing_Earrings",
    "Wearing_Lipstick",
]
_SPLITS = {"train": "0", "valid": "1", "test": "2"}


class CelebA(Dataset[tuple[Tensor, Tensor]]):
    """One split of CelebA's aligned images with the chosen attributes as 0/1 floats."""

    def __init__(self, root: Path, split: str, attributes: Sequence[str], size: int) -> None:
        partition = dict(line.split() for line in _lines(root / "list_eval_partition.txt"))
        _, header, *rows = _lines(root / "list_attr_celeba.txt")
        columns = [header.split().index(name) + 1 for name in attributes]
        table = [row.split() for row in rows if partition[row.split()[0]] == _SPLITS[split]]
        self.files = [root / "img_align_celeba" / row[0] for row in table]
        # The files say -1 for "no" and 1 for "yes"; binary targets are 0 and 1.
        signed = torch.tensor([[float(row[c]) for c in columns] for row in table])
        self.labels = (signed + 1) / 2
        self.transform = v2.Compose(
            [
                v2.ToImage(),
                v2.CenterCrop(178),
                v2.Resize(size, antialias=True),
                v2.ToDtype(torch.float32, scale=True),
                v2.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),  # ImageNet's
            ]
        )

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        with Image.open(self.files[index]) as image:
            return self.transform(image.convert("RGB")), self.labels[index]


def _lines(path: Path) -> list[str]:
    if not path.is_file():
        raise SystemExit(f"error: {path} is missing; --root must hold CelebA's files")
    return path.read_text().splitlines()


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    """Train, then return the test accuracy per attribute."""
    args = _parser().parse_args(argv)
    torch.manual_seed(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    root = Path(args.root)
    train, test = (CelebA(root, split, ATTRIBUTES, args.image_size) for split in ("train", "test"))
    loader = DataLoader(train, args.batch_size, shuffle=True, num_workers=args.workers)

    weights = None if args.weights == "none" else args.weights
    model = MultiHeadNet.from_torchvision("resnet18", ATTRIBUTES, weights=weights).to(device)
    loss_fn = MaskedMultiTaskLoss(dict.fromkeys(ATTRIBUTES, "binary"))
    # The report's DST run: task incompleteness; Constant keeps a floor probability.
    scheduler = TaskDropScheduler(ATTRIBUTES, [TaskIncompleteness(), Constant()], generator=0)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)

    for epoch in range(args.epochs):
        for images, labels in loader:
            losses = loss_fn(model(images.to(device)), labels.to(device))
            optimizer.zero_grad()
            scheduler(losses, loss_fn.label_counts).backward()
            optimizer.step()
        scheduler.step()
        print(f"epoch {epoch}: mean losses {scheduler.epoch_losses}")
        print(f"  keep probabilities {scheduler.keep_probabilities}")

    model.eval()
    correct = torch.zeros(len(ATTRIBUTES), device=device)
    with torch.no_grad():
        for images, labels in DataLoader(test, args.batch_size, num_workers=args.workers):
            outputs = model(images.to(device))
            logits = torch.stack([outputs[name].squeeze(1) for name in ATTRIBUTES], dim=1)
            correct += ((logits > 0).float() == labels.to(device)).sum(dim=0)
    accuracy = dict(zip(ATTRIBUTES, (correct / len(test)).tolist(), strict=True))
    for name, value in accuracy.items():
        print(f"test accuracy {name}: {value:.4f}")
    return accuracy


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", required=True, help="the CelebA folder")
    parser.add_argument("--epochs", type=int, default=10, help="[10]")
    parser.add_argument("--batch-size", type=int, default=256, help="[256]")
    parser.add_argument("--image-size", type=int, default=128, help="pixels per side [128]")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam's learning rate [1e-3]")
    parser.add_argument(
        "--weights",
        default="IMAGENET1K_V1",
        help="torchvision's ResNet18 weights, or 'none' for random initialisation [IMAGENET1K_V1]",
    )
    parser.add_argument("--workers", type=int, default=4, help="data loader processes [4]")
    parser.add_argument("--seed", type=int, default=0, help="[0]")
    return parser


if __name__ == "__main__":
    main()
