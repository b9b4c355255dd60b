"""Train your own model with your own loss: under DDP and FSDP2 on 2 ranks, checkpointed,
then resumed on 1 rank.

    python examples/your_own_model.py WORK_DIR

The model is a plain ``nn.Module`` (no trainer base class) with BatchNorm and a custom
``nn.Parameter``; the task maps a batch to (images, labels) and scores them with a
label-smoothed cross-entropy. The script writes a small image dataset, then launches itself
under torchrun for each stage (``--stage``), which runs ``Trainer(...).fit()``:

    ddp     2 ranks, data parallel: 8 steps, checkpoints at steps 4 and 8
    fsdp    2 ranks, parameters sharded by FSDP2: 4 steps, checkpoint at step 4
    resume  1 rank: the FSDP2 checkpoint (sharded over 2) continues to step 8

README.md ("Your own model") shows this file; tests/training/test_user_model.py runs it.
"""

from __future__ import annotations

import argparse
import io
import os
import subprocess
import sys

import numpy as np
import torch
from PIL import Image
from torch import nn

from dataflow import ShardWriter
from trainer import Task, Trainer
from trainer.config import load
from trainer.metrics import read_metrics


class SmallNet(nn.Module):
    """Any module: here convolutions with BatchNorm, and a learned per-class logit offset."""

    def __init__(self, classes: int = 4) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.AdaptiveAvgPool2d(4), nn.Flatten(),
        )  # fmt: skip
        self.classify = nn.Linear(8 * 16, classes)
        self.offset = nn.Parameter(torch.zeros(classes))  # a custom parameter

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # The loader delivers uint8 N×H×W×3; the model scales and transposes.
        x = images.permute(0, 3, 1, 2).float().div(255.0)
        return self.classify(self.features(x)) + self.offset


def smoothed_cross_entropy() -> Task:
    def split(batch: dict, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        return batch["image"].to(device), batch["label"].to(device)

    def loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(logits.float(), labels, label_smoothing=0.1)

    def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"accuracy": (logits.argmax(-1) == labels).sum()}  # a sum: the trainer averages

    return Task(split=split, loss=loss, metrics=accuracy, train_metrics=True)


def write_dataset(root: str, count: int = 512) -> None:
    """Four classes of 16×16 PNGs: a bright quadrant (the class) on noise."""
    rng = np.random.default_rng(0)
    with ShardWriter(root, format="tar", max_shard_samples=128) as writer:
        for number in range(count):
            label = number % 4
            pixels = rng.integers(0, 96, (16, 16, 3), dtype=np.uint8)
            row, column = divmod(label, 2)
            pixels[row * 8 : row * 8 + 8, column * 8 : column * 8 + 8] += 128
            png = io.BytesIO()
            Image.fromarray(pixels).save(png, format="PNG")
            writer.write({"__key__": f"img{number:05d}", "png": png.getvalue(), "cls": label})


def train(work: str, stage: str) -> None:
    out_dir = os.path.join(work, "fsdp" if stage == "resume" else stage)
    steps = 4 if stage == "fsdp" else 8
    config = load(None, [
        f"data.url='{work}/shards'", "data.global_batch=32", "data.image_size=16",
        "data.crop_scale=[0.8, 1.0]", "data.flip=false", f"train.out_dir='{out_dir}'",
        f"train.max_steps={steps}", "train.progress=false", "optim.lr=0.01",
        "checkpoint.interval=4",
        *(["parallel.dp_shard=2"] if stage == "fsdp" else []),
    ])  # fmt: skip
    # A function, not a module: the trainer builds it under train.seed on every rank.
    summary = Trainer(config, model=SmallNet, task=smoothed_cross_entropy()).fit()
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"{stage}: {summary['steps']} steps, loss {summary['loss']:.4f}")


def main() -> None:
    arguments = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    arguments.add_argument("work", nargs="?", default="your-own-model")
    arguments.add_argument("--stage", choices=["ddp", "fsdp", "resume"])
    args = arguments.parse_args()
    if args.stage:
        train(args.work, args.stage)
        return
    write_dataset(os.path.join(args.work, "shards"))
    for stage, ranks in (("ddp", 2), ("fsdp", 2), ("resume", 1)):
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc-per-node={ranks}", __file__, args.work,
                   f"--stage={stage}"]  # fmt: skip
        subprocess.run(command, check=True)
    records = read_metrics(os.path.join(args.work, "fsdp", "metrics.jsonl"))
    starts = [r for r in records if r["event"] == "start"]
    print(f"the resume started at step {starts[-1]['step']} on {starts[-1]['world_size']} rank "
          f"from {starts[-1]['resumed_from']}")  # fmt: skip


if __name__ == "__main__":
    main()
