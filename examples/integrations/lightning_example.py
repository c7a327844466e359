"""DST under PyTorch Lightning: a three-task net trained on generated data in seconds.

    pip install 'dstmtl[lightning]'
    python examples/integrations/lightning_example.py --output runs/lightning --epochs 4
    python examples/integrations/lightning_example.py --output runs/lightning --epochs 6 --resume

The scheduler's read-out (keep probabilities, gates, terms, ...) goes to a CSV log in
``<output>/logs``; a checkpoint is saved after each epoch in ``<output>/checkpoints``, and
``--resume`` continues from the last one, the scheduler's state included.
"""

from __future__ import annotations

import argparse
import warnings
from collections.abc import Sequence
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset
from toy_tasks import make_data, make_loss, make_net, make_scheduler

from dstmtl import TaskDropScheduler
from dstmtl.integrations.lightning import TaskDropCallback


class MultiTaskModule(pl.LightningModule):
    """A multi-head net whose training loss goes through the scheduler."""

    def __init__(self, scheduler: TaskDropScheduler, lr: float = 1e-2) -> None:
        super().__init__()
        self.net = make_net()
        self.loss_fn = make_loss()
        self.scheduler = scheduler
        self.lr = lr

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, labels = batch
        losses = self.loss_fn(self.net(x), labels)  # [3], one mean loss per task
        # No per-step logging, which would read the losses back from the device at every
        # step: the callback logs each task's epoch mean (epoch_loss/<task>) instead.
        return self.scheduler(losses, self.loss_fn.label_counts)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def train(
    output: Path,
    epochs: int,
    *,
    ckpt_path: str | Path | None = None,
    shuffle: bool = True,
    seed: int = 0,
) -> tuple[MultiTaskModule, pl.Trainer]:
    """Fit for ``epochs`` epochs in all; with ``ckpt_path``, resume from that checkpoint."""
    torch.manual_seed(seed)
    scheduler = make_scheduler(seed)
    module = MultiTaskModule(scheduler)
    x, labels = make_data(256, seed)
    loader = DataLoader(TensorDataset(x, labels), batch_size=32, shuffle=shuffle)
    trainer = pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        callbacks=[
            TaskDropCallback(scheduler),
            ModelCheckpoint(dirpath=output / "checkpoints", save_top_k=-1, save_last=True),
        ],
        logger=CSVLogger(output, name="logs"),
        log_every_n_steps=1,  # 8 steps per epoch: below the default, Lightning warns
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, loader, ckpt_path=ckpt_path)
    return module, trainer


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=Path("runs/lightning"))
    parser.add_argument("--epochs", type=int, default=4, help="epochs in all (default 4)")
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    args = parser.parse_args(argv)
    # A toy dataset in memory needs no loader workers.
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    # "last": Lightning resumes from <output>/checkpoints/last.ckpt.
    module, trainer = train(args.output, args.epochs, ckpt_path="last" if args.resume else None)
    scheduler = module.scheduler
    print(f"after epoch {scheduler.epoch}: keep probabilities {scheduler.keep_probabilities}")
    print(f"gates {scheduler.gates}; CSV log in {trainer.log_dir}")


if __name__ == "__main__":
    main()
