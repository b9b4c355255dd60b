"""Optimizers and the learning-rate schedule.

The schedule is a pure function of the step (linear warm-up, then constant, cosine or
polynomial decay to ``min_lr_ratio × lr``, the peak scaled by the large-batch rule), so a
resumed run needs only the step to continue it exactly — there is no scheduler state to save.
LAMB and LARS live in ``trust.py``: their trust ratios use full-tensor norms under FSDP2 and
tensor parallelism. Optimizers are registered by name (``OPTIMIZERS``), each built-in one
with its settings in its sub-section (``[optim.lars]``); ``optim.name`` may also be
``"package.module:function"``, called with (this section, the trainable parameters), which
reads its own settings from ``optim.options``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch.distributed.tensor import DTensor

from trainer.config import OptimConfig
from trainer.optim.frozen import FrozenVarianceAdamW
from trainer.optim.trust import Lamb, Lars
from trainer.registry import Registry

OptimizerFactory = Callable[[OptimConfig, list[torch.nn.Parameter]], torch.optim.Optimizer]
OPTIMIZERS: Registry[OptimizerFactory] = Registry("optimizer", "optim.name")
"""name → factory(config, trainable parameters) → optimizer."""


def build_optimizer(
    config: OptimConfig, params: Iterable[torch.nn.Parameter]
) -> torch.optim.Optimizer:
    trainable = [p for p in params if p.requires_grad]
    return OPTIMIZERS.get(config.name)(config, trainable)


@OPTIMIZERS.register("sgd")
def _sgd(config: OptimConfig, trainable: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.SGD(trainable, lr=config.lr, momentum=config.sgd.momentum,
                           weight_decay=config.weight_decay)  # fmt: skip


@OPTIMIZERS.register("lamb")
def _lamb(config: OptimConfig, trainable: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    lamb = config.lamb
    return Lamb(trainable, lr=config.lr, betas=(lamb.betas[0], lamb.betas[1]), eps=lamb.eps,
                weight_decay=config.weight_decay,
                exclude_bias_and_norm=lamb.exclude_bias_and_norm)  # fmt: skip


@OPTIMIZERS.register("lars")
def _lars(config: OptimConfig, trainable: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    lars = config.lars
    return Lars(trainable, lr=config.lr, momentum=lars.momentum,
                weight_decay=config.weight_decay, trust_coefficient=lars.trust_coefficient,
                eps=lars.eps, clip=lars.larc_clip,
                exclude_bias_and_norm=lars.exclude_bias_and_norm)  # fmt: skip


@OPTIMIZERS.register("adafactor")
def _adafactor(config: OptimConfig, trainable: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    if any(isinstance(p, DTensor) for p in trainable):
        raise ValueError(
            "optim.name = 'adafactor' (torch.optim.Adafactor) cannot step sharded "
            "parameters: its factored moments fail on FSDP2/TP DTensors in torch 2.13. "
            "Use it with DDP or one process, or choose adamw / lamb / lars"
        )
    return torch.optim.Adafactor(trainable, lr=config.lr, weight_decay=config.weight_decay,
                                 foreach=False)  # fmt: skip


@OPTIMIZERS.register("adamw")
def _adamw(config: OptimConfig, trainable: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    # foreach=False: the per-parameter loop is deterministic and handles any mix of plain
    # and DTensor parameters; at these model sizes it costs nothing measurable.
    adamw = config.adamw
    if adamw.freeze_variance_step > 0:  # -1 outside a Config (which resolves it): never
        return FrozenVarianceAdamW(trainable, lr=config.lr, betas=(adamw.betas[0], adamw.betas[1]),
                                   eps=adamw.eps, weight_decay=config.weight_decay,
                                   freeze_step=adamw.freeze_variance_step)  # fmt: skip
    return torch.optim.AdamW(trainable, lr=config.lr, betas=(adamw.betas[0], adamw.betas[1]),
                             eps=adamw.eps, weight_decay=config.weight_decay,
                             foreach=False)  # fmt: skip


def peak_learning_rate(config: OptimConfig, global_batch: int | None) -> float:
    """optim.lr scaled from base_batch to global_batch by optim.scale_rule."""
    if config.scale_rule == "none":
        return config.lr
    if global_batch is None:
        raise ValueError(f"optim.scale_rule = {config.scale_rule!r} needs the global batch")
    ratio = global_batch / config.base_batch
    return config.lr * (ratio if config.scale_rule == "linear" else math.sqrt(ratio))


def learning_rate(
    config: OptimConfig, step: int, total_steps: int, *, global_batch: int | None = None
) -> float:
    """The learning rate for optimizer step ``step`` (0-based) of ``total_steps``."""
    peak = peak_learning_rate(config, global_batch)
    if step < config.warmup_steps:
        return peak * (step + 1) / config.warmup_steps
    if config.schedule == "constant":
        return peak
    # The last step is total_steps - 1: it gets the floor, as OptimConfig.schedule promises.
    decay_steps = max(1, total_steps - config.warmup_steps - 1)
    progress = min(1.0, (step - config.warmup_steps) / decay_steps)
    floor = config.min_lr_ratio
    if config.schedule == "poly":
        return peak * (floor + (1 - floor) * (1 - progress) ** config.poly_power)
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def set_learning_rate(optimizers: list[torch.optim.Optimizer], lr: float) -> None:
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            group["lr"] = lr
