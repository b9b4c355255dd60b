"""``ModelSpec``: a model and what the parallel layouts need to know about it.

A model factory (``model.name``: a registered name, or ``"package.module:function"`` called
with ``model.options``) returns an ``nn.Module`` or a ``ModelSpec``. A bare module becomes a
spec with every default: FSDP2 and activation checkpointing wrap its children, no tensor
or pipeline parallelism (``tp_plan`` and ``pp_cut_points`` turn those on), and its own
initialisation.

Initialisation, one of two ways, both the same in every layout:

- ``init`` is None (user models): the module keeps the values its layers gave it when it
  was built (``reset_parameters`` at construction, custom ``nn.Parameter``s as created),
  under ``torch.manual_seed(train.seed)``. A module built on the meta device is first
  materialised on the CPU and each submodule's ``reset_parameters`` called. Those full
  values are copied into whatever the layout made of each parameter (a DDP replica, an FSDP
  shard). Cost: one full copy of the model in CPU memory while the trainer is built.
- ``init(part, seed)`` (the reference models: ``init_weights``): called on each part after
  it is sharded and materialised; it must give a parameter the same value whatever the
  layout (draw per parameter name, as ``init_weights`` does). The model is then built on
  the meta device: no memory for the full model, whatever its size.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from trainer.models.base import StagedModel

TP_STYLES = ("colwise", "rowwise")


@dataclass(kw_only=True)
class ModelSpec:
    module: nn.Module
    """The whole model."""
    wrap_classes: tuple[type[nn.Module], ...] = ()
    """FSDP2 units and activation-checkpointed units: every submodule of these classes.
    Empty: the blocks of a StagedModel, else the module's children that hold parameters."""
    tp_plan: dict[str, str] | None = None
    """Tensor parallelism: submodule name → 'colwise' | 'rowwise', relative to each block of
    a StagedModel, else to the module. None: the module's TP_PLAN attribute, if any."""
    pp_cut_points: tuple[str, ...] = ()
    """Pipeline parallelism: the units where each later stage begins, in forward order — a
    child's name, or a ModuleList/ModuleDict/Sequential child's item (``"layers.4"``); as
    many stages as parallel.pp × stages_per_rank. A stage keeps its units; the others are
    deleted from their container or set to None, so the forward must skip None children
    and iterate its containers (trainer.parallel.pipeline). Empty: a StagedModel is split
    evenly between its blocks; another module cannot be pipelined."""
    init: Callable[[nn.Module, int], None] | None = None
    """init(part, seed) after sharding (see the module note); None: the module's own values."""
    task: str = ""
    """The task it is trained for when train.task is empty ('classify', 'lm', …)."""
    heads: int = 0
    """Attention heads that tensor parallelism must divide (0: nothing to check)."""

    def __post_init__(self) -> None:
        if not isinstance(self.module, nn.Module):
            raise TypeError(f"ModelSpec.module must be an nn.Module, got {type(self.module)}")
        self.pp_cut_points = tuple(self.pp_cut_points)
        for name, style in (self.tp_plan or {}).items():
            if style not in TP_STYLES:
                raise ValueError(f"ModelSpec.tp_plan[{name!r}] = {style!r}: use one of {TP_STYLES}")

    @property
    def plan(self) -> dict[str, str] | None:
        """The tensor-parallel plan: the spec's, else the module's TP_PLAN."""
        found = self.tp_plan if self.tp_plan is not None else getattr(self.module, "TP_PLAN", None)
        return dict(found) if found is not None else None

    def units(self, part: nn.Module) -> list[tuple[str, nn.Module]]:
        """(name, submodule) of ``part`` that FSDP2 shards and checkpointing wraps one by one."""
        if self.wrap_classes:
            return [(name, module) for name, module in part.named_modules()
                    if name and isinstance(module, self.wrap_classes)]  # fmt: skip
        if isinstance(part, StagedModel):
            return [(f"blocks.{name}", block) for name, block in part.blocks.items()]
        return [(name, child) for name, child in part.named_children()
                if any(True for _ in child.parameters())]  # fmt: skip


def as_spec(built: object, *, setting: str) -> ModelSpec:
    """What a model factory returned, as a spec (a bare module gets every default)."""
    if isinstance(built, ModelSpec):
        return built
    if isinstance(built, nn.Module):
        return ModelSpec(module=built)
    raise TypeError(
        f"{setting} returned a {type(built).__name__}; return an nn.Module or a "
        "trainer.models.ModelSpec"
    )


def is_meta(module: nn.Module) -> bool:
    return any(t.is_meta for t in [*module.parameters(), *module.buffers()])


@torch.no_grad()
def own_values(module: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Full CPU values of every parameter and buffer, by name: those the module was built
    with, or — built on the meta device — those its submodules' ``reset_parameters`` give."""
    if is_meta(module):
        module.to_empty(device="cpu")
        torch.manual_seed(seed)
        reset: set[str] = set()
        for name, submodule in module.named_modules():
            if callable(getattr(submodule, "reset_parameters", None)):
                submodule.reset_parameters()
                reset.update(f"{name}.{n}" if name else n
                             for n, _ in submodule.named_parameters(recurse=False))  # fmt: skip
        left = [n for n, _ in module.named_parameters() if n not in reset]
        if left:
            raise ValueError(
                f"the model was built on the meta device and parameter {left[0]!r} belongs to "
                "a module without reset_parameters(); build it on the CPU, add "
                "reset_parameters(), or give ModelSpec.init"
            )
    values = {name: p.detach().to("cpu", copy=True) for name, p in module.named_parameters()}
    values.update({name: b.detach().to("cpu", copy=True) for name, b in module.named_buffers()})
    return values
