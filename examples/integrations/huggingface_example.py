"""DST under the Hugging Face Trainer: a three-task net trained on generated data in seconds.

    pip install 'dstmtl[huggingface]'
    python examples/integrations/huggingface_example.py --output runs/hf --epochs 4
    python examples/integrations/huggingface_example.py --output runs/hf --epochs 6 --resume

The model is a plain ``MultiHeadNet`` (any ``nn.Module`` whose forward returns one output per
task works, a ``PreTrainedModel`` included); nothing is downloaded. The scheduler's read-out
goes through ``Trainer.log`` into ``trainer_state.json`` of each checkpoint in ``<output>``,
and ``--resume`` continues from the last checkpoint, the scheduler's state included.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here needs the Hub; read at import

import torch
from torch import Tensor
from torch.utils.data import Dataset
from toy_tasks import make_data, make_loss, make_net, make_scheduler
from transformers import TrainingArguments

from dstmtl.integrations.huggingface import TaskDropTrainer


class ToyDataset(Dataset[dict[str, Tensor]]):
    """Samples as the Trainer wants them: the model's inputs by name, and ``labels``."""

    def __init__(self, samples: int, seed: int = 0) -> None:
        self.x, self.labels = make_data(samples, seed)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return {"x": self.x[index], "labels": self.labels[index]}


def make_trainer(output: Path, epochs: int, *, seed: int = 0) -> TaskDropTrainer:
    torch.manual_seed(seed)
    args = TrainingArguments(
        output_dir=str(output),
        num_train_epochs=epochs,
        per_device_train_batch_size=32,
        learning_rate=1e-2,
        save_strategy="epoch",
        logging_strategy="epoch",
        report_to="none",  # or "tensorboard", "wandb": they receive the read-out too
        use_cpu=True,
        disable_tqdm=True,
        seed=seed,
    )
    return TaskDropTrainer(
        model=make_net(),
        args=args,
        train_dataset=ToyDataset(256, seed),
        scheduler=make_scheduler(seed),
        loss_fn=make_loss(),
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=Path("runs/hf"))
    parser.add_argument("--epochs", type=int, default=4, help="epochs in all (default 4)")
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    args = parser.parse_args(argv)
    trainer = make_trainer(args.output, args.epochs)
    trainer.train(resume_from_checkpoint=args.resume or None)
    scheduler = trainer.task_drop_scheduler
    print(f"after epoch {scheduler.epoch}: keep probabilities {scheduler.keep_probabilities}")
    print(f"gates {scheduler.gates}; checkpoints in {args.output}")


if __name__ == "__main__":
    main()
