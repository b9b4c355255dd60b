"""Tasks: what a batch means to the model — (inputs, targets) on the device, the loss, and
the metrics evaluation (and, for classification, training) reports.

    classify   the loader's uint8 images (N×H×W×3, normalised inside the model) and labels;
               cross-entropy; accuracy, logged at every training step too
    lm         each sample holds a row of tokens in ``train.lm.token_field`` (for the
               built-in GPT ``model.gpt.seq_len + 1`` of them, ids below its vocab_size):
               inputs are all but the last, targets all but the first (next-token
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
    field = config.train.lm.token_field
    # The built-in GPT's sizes are checked here, where an error can name them.
    gpt = config.model.gpt if config.model.name == "gpt" else None

    def split(batch: Batch, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if field not in batch:
            raise ValueError(
                f"train.lm.token_field {field!r} is not in the batch; it has {sorted(batch)}"
            )
        rows = batch[field]
        # A token field may arrive as an int32 tensor; the loss wants int64 ids.
        tokens = (
            rows.long()
            if torch.is_tensor(rows)
            else torch.from_numpy(np.stack(rows).astype(np.int64))
        )
        if tokens.ndim != 2 or tokens.shape[1] < 2:
            raise ValueError(
                f"train.lm.token_field {field!r} holds rows of shape {tuple(tokens.shape[1:])}; "
                "the lm task needs one row of at least 2 tokens per sample"
            )
        if int(tokens.min()) < 0:
            raise ValueError(f"token ids go down to {int(tokens.min())}; they must be >= 0")
        if gpt is not None and tokens.shape[1] != gpt.seq_len + 1:
            raise ValueError(
                f"samples hold {tokens.shape[1]} tokens; model.gpt.seq_len = {gpt.seq_len} "
                f"needs {gpt.seq_len + 1} (inputs plus the next token)"
            )
        if gpt is not None and int(tokens.max()) >= gpt.vocab_size:
            raise ValueError(
                f"token ids span [{int(tokens.min())}, {int(tokens.max())}] but "
                f"model.gpt.vocab_size is {gpt.vocab_size}"
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
