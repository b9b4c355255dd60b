"""shardflow's training library; it builds on ``dataflow`` and owns the root config.

``Trainer(config, model=..., task=..., loader=...).fit()`` trains as ``python -m
trainer.train`` does; ``ModelSpec`` and ``Task`` describe your own model and task.
They are imported on first use (``import trainer.config`` stays light).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from trainer.models.spec import ModelSpec
    from trainer.tasks import Task
    from trainer.trainer import Trainer

__all__ = ["ModelSpec", "Task", "Trainer"]

_HOMES = {"ModelSpec": "trainer.models.spec", "Task": "trainer.tasks", "Trainer": "trainer.trainer"}


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        return getattr(importlib.import_module(_HOMES[name]), name)
    raise AttributeError(f"module 'trainer' has no attribute {name!r}")
