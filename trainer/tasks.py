"""Tasks: what a batch means to the model — (inputs, targets) on the device, the loss, and
the metrics evaluation (and, for classification, training) reports.

    classify   the loader's uint8 images (N×H×W×3, normalised inside the model) and labels;
               cross-entropy; accuracy, logged at every training step too
    lm         each sample holds ``model.seq_len + 1`` tokens in ``model.token_field``:
               inputs are the first ``seq_len``, targets the last ``seq_len`` (next-token
               prediction); cross-entropy per token; per-token accuracy in evaluation

Your own: ``train.task = "package.module:function"``, called with ``train.task_options``,
returning a ``Task``. Metrics are sums over a batch (e.g. correct predictions), divided by
the number of targets over all ranks: the logged value is the global mean.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from trainer.config import Config
from trainer.registry import Registry, is_import_path

Batch = dict[str, Any]


def cross_entropy(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of logits ``output`` (…×classes) against ``target`` (…)."""
    return nn.functional.cross_entropy(output.flatten(0, -2).float(), target.flatten())


def correct(output: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
    """Top-1 hits of logits ``output`` (…×classes) against ``target`` (…), summed."""
    return {"accuracy": (output.argmax(-1) == target).sum()}


@dataclass(kw_only=True)
class Task:
    split: Callable[[Batch, torch.device], tuple[Any, torch.Tensor]]
    """(batch, device) → (inputs for the model, targets for the loss), on the device."""
    loss: Callable[[Any, torch.Tensor], torch.Tensor] = cross_entropy
    """(model output, targets) → the mean loss over the targets' entries."""
    metrics: Callable[[Any, torch.Tensor], dict[str, torch.Tensor]] | None = None
    """(output, targets) → {name: sum over the batch}; logged as the mean per target entry
    after each evaluation. None: the loss alone."""
    train_metrics: bool = False
    """Also log ``metrics`` at every logged training step (one more small all-reduce)."""


TaskFactory = Callable[..., Task]
TASKS: Registry[TaskFactory] = Registry("task", "train.task")
"""name → factory(config: Config) → Task."""


@TASKS.register("classify")
def classify(config: Config) -> Task:
    def split(batch: Batch, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if "image" not in batch or "label" not in batch:
            raise ValueError(
                f"train.task = 'classify' needs image and label fields; the batch has "
                f"{sorted(batch)}"
            )
        return batch["image"].to(device, non_blocking=True), batch["label"].to(device)

    return Task(split=split, metrics=correct, train_metrics=True)


@TASKS.register("lm")
def language_model(config: Config) -> Task:
    model = config.model

    def split(batch: Batch, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        field = model.token_field
        if field not in batch:
            raise ValueError(
                f"model.token_field {field!r} is not in the batch; it has {sorted(batch)}"
            )
        rows = batch[field]
        # A token field may arrive as an int32 tensor; the loss wants int64 ids.
        tokens = (
            rows.long()
            if torch.is_tensor(rows)
            else torch.from_numpy(np.stack(rows).astype(np.int64))
        )
        if tokens.shape[1] != model.seq_len + 1:
            raise ValueError(
                f"samples hold {tokens.shape[1]} tokens; model.seq_len = {model.seq_len} needs "
                f"{model.seq_len + 1} (inputs plus the next token)"
            )
        if int(tokens.max()) >= model.vocab_size or int(tokens.min()) < 0:
            raise ValueError(
                f"token ids span [{int(tokens.min())}, {int(tokens.max())}] but "
                f"model.vocab_size is {model.vocab_size}"
            )
        tokens = tokens.to(device, non_blocking=True)
        return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()

    return Task(split=split, metrics=correct)


def build_task(config: Config, default: str = "") -> Task:
    """The configured task; ``default`` (the model's own task) when train.task is empty."""
    name = config.train.task or default
    if not name:
        raise ValueError(
            f"train.task is empty and model.name = {config.model.name!r} names no task of its "
            "own; set train.task = 'classify', 'lm' or 'package.module:function'"
        )
    factory = TASKS.get(name)
    task = factory(**config.train.task_options) if is_import_path(name) else factory(config)
    if not isinstance(task, Task):
        raise ValueError(
            f"train.task = {name!r} returned a {type(task).__name__}, not a trainer.tasks.Task"
        )
    return task
