"""Tensor parallelism: each block's projections split by columns or rows over the tp mesh.

The plan comes from the model spec (``ModelSpec.tp_plan``, else the module's ``TP_PLAN``;
the GPT's is ``GPT.TP_PLAN``), applied to each block of a StagedModel, else to the module
as a whole. The GPT's plan:: q/k/v and the MLP's first layer are
column-parallel (each rank computes its share of heads / hidden units from the replicated
input), the attention and MLP output projections row-parallel (partial sums all-reduced).
One all-reduce per attention and per MLP in forward, and one each in backward. Embeddings,
norms and the output head stay replicated: their gradients are equal on every tp rank
because the blocks' outputs and input gradients are all-reduced.
"""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    RowwiseParallel,
    parallelize_module,
)

from trainer.models.base import StagedModel


def apply_tensor_parallel(
    model: nn.Module, *, mesh: DeviceMesh, plan: dict[str, str] | None = None, heads: int = 0
) -> None:
    """``plan``: submodule → 'colwise' | 'rowwise' (default: the model's TP_PLAN); ``heads``:
    attention heads the tp degree must divide (0: none to check)."""
    plan = plan if plan is not None else getattr(model, "TP_PLAN", None)
    if plan is None:
        raise ValueError(
            f"{type(model).__name__} has no tensor-parallel plan; use parallel.tp = 1 "
            "(TP plans exist for the GPT)"
        )
    if heads and heads % mesh.size():
        raise ValueError(
            f"the model's {heads} attention heads are not divisible by parallel.tp {mesh.size()}"
        )
    styles: dict[str, ParallelStyle] = {}
    for name, kind in plan.items():
        styles[name] = ColwiseParallel() if kind == "colwise" else RowwiseParallel()
    targets = list(model.blocks.values()) if isinstance(model, StagedModel) else [model]
    for target in targets:
        parallelize_module(target, mesh, styles)
