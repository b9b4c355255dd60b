"""Optimizers and the learning-rate schedule.

The schedule is a pure function of the step (linear warm-up, then constant or cosine decay
to ``min_lr_ratio × lr``), so a resumed run needs only the step to continue it exactly —
there is no scheduler state to save.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from trainer.config import OptimConfig


def build_optimizer(
    config: OptimConfig, params: Iterable[torch.nn.Parameter]
) -> torch.optim.Optimizer:
    trainable = [p for p in params if p.requires_grad]
    if config.name == "sgd":
        return torch.optim.SGD(trainable, lr=config.lr, momentum=config.momentum,
                               weight_decay=config.weight_decay)  # fmt: skip
    # foreach=False: the per-parameter loop is deterministic and handles any mix of plain
    # and DTensor parameters; at these model sizes it costs nothing measurable.
    return torch.optim.AdamW(trainable, lr=config.lr, betas=(config.betas[0], config.betas[1]),
                             weight_decay=config.weight_decay, foreach=False)  # fmt: skip


def learning_rate(config: OptimConfig, step: int, total_steps: int) -> float:
    """The learning rate for optimizer step ``step`` (0-based) of ``total_steps``."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    if config.schedule == "constant":
        return config.lr
    # The last step is total_steps - 1: it gets the floor, as OptimConfig.schedule promises.
    decay_steps = max(1, total_steps - config.warmup_steps - 1)
    progress = min(1.0, (step - config.warmup_steps) / decay_steps)
    floor = config.min_lr_ratio
    return config.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def set_learning_rate(optimizers: list[torch.optim.Optimizer], lr: float) -> None:
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            group["lr"] = lr
