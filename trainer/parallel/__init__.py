"""Build the configured model and apply parallelism, in this order (torchtitan's):

1. build the model (``trainer.models.ModelSpec``): the reference models on the meta device
   (no memory, whatever their size), a user's model as its function builds it;
2. pipeline: keep this rank's stages (``pipeline.split_stage``: the spec's cut points, or
   a StagedModel's blocks);
3. tensor parallel: DTensor column/row plans on the tp mesh (``tensor``; the spec's plan);
4. activation checkpointing around each unit — the blocks, the spec's wrap classes, or the
   module's children (``data``);
5. FSDP2 ``fully_shard`` per unit, then the root, on the 2-D (dp_replicate, dp_shard)
   mesh: FSDP, HSDP (with ``[compression]``: on the dp_shard mesh, and a compressing hook
   averages over dp_replicate — ``trainer.compression``), or — when dp_shard is 1 but TP
   or PP is on — pure replication through FSDP2 (DDP's reducer cannot follow a pipeline's
   microbatches: its bucket rebuild sees each parameter once per microbatch and fails an
   internal assert in torch 2.13);
6. materialise (``to_empty``) and initialise each parameter — from (seed, name) for the
   reference models, from the user model's own values otherwise: the same weights in every
   layout (``trainer.models.init``);
7. DDP around the model, when data parallelism is pure replication alone (``data``);
8. the pipeline schedule over the stages (``pipeline``);
9. the ``GradientSync`` the loop calls (``sync``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from trainer.comm import FlatAllReduce, HierarchicalAllReduce, node_grid
from trainer.compression import build_compressor
from trainer.config import CompressionConfig, ModelConfig, ParallelConfig
from trainer.models import ModelSpec, build_spec, copy_values, own_values
from trainer.parallel.data import (
    CommTimer,
    apply_activation_checkpointing,
    apply_ddp,
    apply_fsdp,
)
from trainer.parallel.mesh import Layout, build_layout, resolve
from trainer.parallel.pipeline import (
    ObservedLoss,
    Schedule,
    build_schedule,
    split_stage,
    stage_indices,
)
from trainer.parallel.sync import (
    DDPSync,
    DecentralizedSync,
    FlatSync,
    GradientSync,
    ShardedSync,
)
from trainer.parallel.tensor import apply_tensor_parallel
from trainer.tasks import cross_entropy

__all__ = ["GradientSync", "Layout", "ParallelModel", "build_layout", "parallelize", "resolve"]


@dataclass(kw_only=True)
class ParallelModel:
    parts: list[nn.Module]
    """This rank's model parts as wrapped (one, or one per pipeline stage it holds)."""
    loss_fn: object
    """(output, target) → mean loss (the task's)."""
    schedule: Schedule | None
    """The pipeline schedule, when pp > 1."""
    observed: ObservedLoss | None
    """The loss the schedule calls per microbatch (pp > 1), to watch its outputs through."""
    first_stage: bool
    """Whether this rank feeds inputs (holds stage 0)."""
    last_stage: bool
    """Whether this rank computes the loss (holds the last stage)."""
    strategy: str
    """How data parallelism is done: 'ddp', 'flat' (one all-reduce after backward), 'gossip'
    or 'local_sgd' (parameters mixed after the step, ``trainer.comm.decentral``), 'fsdp',
    'hsdp', 'replicate' (FSDP2) or 'none'."""
    sync: GradientSync
    """What the loop calls after backward and after the step (``sync``)."""


def parallelize(
    model_config: ModelConfig,
    config: ParallelConfig,
    *,
    layout: Layout,
    device: torch.device,
    num_classes: int,
    seed: int,
    activation_checkpointing: bool = False,
    bf16: bool = False,
    compression: CompressionConfig | None = None,
    spec: ModelSpec | None = None,
    loss_fn: Callable[[Any, torch.Tensor], torch.Tensor] = cross_entropy,
    origin: str = "",
) -> ParallelModel:
    """``spec``: the model to parallelize (default: the one ``model_config`` names);
    ``loss_fn``: the task's loss, which the pipeline schedule computes on the last stage;
    ``origin``: where the model came from, for errors (default: ``model.name = …``)."""
    if spec is None:
        spec = build_spec(model_config, num_classes=num_classes, seed=seed)
    whole = spec.module
    # A user model's own initial values, taken before anything wraps or shards it.
    values = own_values(whole, seed) if spec.init is None else None
    described = origin or f"model.name = {model_config.name!r}"
    parts: list[nn.Module] = [whole]
    stage_ids, stages = [0], 1
    if layout.pp > 1:
        assert layout.mesh is not None
        stage_ids, stages = stage_indices(config, layout.pp_rank)
        parts = [split_stage(whole, spec.pp_cut_points, index, stages, described=described)
                 for index in stage_ids]  # fmt: skip
    if layout.tp > 1:
        plan = spec.plan
        if plan is None:
            raise ValueError(
                f"parallel.tp = {layout.tp} needs a tensor-parallel plan; {described} built a "
                f"{type(whole).__name__} with none: give ModelSpec.tp_plan (submodule → "
                "'colwise' | 'rowwise'), or set parallel.tp = 1"
            )
        for part in parts:
            apply_tensor_parallel(part, mesh=layout.submesh("tp"), plan=plan, heads=spec.heads)
    if activation_checkpointing:
        for part in parts:
            apply_activation_checkpointing(part, spec.units(part))
    strategy = "none"
    if layout.dp_world > 1:
        if layout.dp_shard > 1 or layout.tp > 1 or layout.pp > 1:
            if layout.dp_shard == 1:
                strategy = "replicate"
            else:
                strategy = "hsdp" if layout.dp_replicate > 1 else "fsdp"
        else:
            strategy = "ddp"
    for knob, value in (("allreduce", config.allreduce), ("decentralized", config.decentralized)):
        if value in ("ring", "none"):
            continue
        if strategy != "ddp":
            raise ValueError(
                f"parallel.{knob} = {value!r} replaces DDP's all-reduce: it needs pure data "
                f"parallelism (dp_replicate > 1 alone); this layout runs {strategy!r}"
            )
        if value in ("flat", "gossip", "local_sgd"):
            strategy = value
    grid = None
    if strategy == "ddp" and config.allreduce == "hierarchical":
        grid = node_grid(device.type, config.node_size)
    compressor = None
    # One process sends nothing: the same config then simply runs uncompressed.
    if compression is not None and compression.method != "none" and layout.world_size > 1:
        if strategy not in ("ddp", "flat", "hsdp") or layout.pp > 1:
            if strategy in ("gossip", "local_sgd"):
                raise ValueError(f"compression.method = {compression.method!r} compresses "
                                 f"gradients, which {strategy} does not send")  # fmt: skip
            raise ValueError(
                f"compression.method = {compression.method!r} compresses the all-reduce across "
                f"data-parallel replicas: it needs DDP (dp_replicate > 1 alone) or HSDP "
                f"(dp_replicate > 1 and dp_shard > 1, without pipeline stages); this layout "
                f"runs {strategy!r} with pp = {layout.pp}"
            )
        where = layout.coordinates
        place = (where["dp_shard"], layout.dp_shard, where["tp"], layout.tp)
        if grid is not None:  # ranks of one local index compress the same pieces
            place = (grid[0].rank(), grid[0].size(), 0, 1)
        compressor = build_compressor(compression, place=place)
    if strategy in ("replicate", "fsdp", "hsdp"):
        hook = None
        if compressor is None:
            mesh = layout.submesh("dp_replicate", "dp_shard")
        else:
            # FSDP2 shards inside the shard group only (exact reduce-scatter); the hook then
            # averages each shard over the replicate group, compressed.
            mesh = layout.submesh("dp_shard")
            replicas = layout.submesh("dp_replicate").get_group()
            hook = functools.partial(compressor.fsdp_hook, replicas)
        for part in parts:
            apply_fsdp(part, spec.units(part), mesh=mesh, bf16=bf16, all_reduce_hook=hook,
                       reshard_after_forward=config.fsdp_reshard_after_forward)  # fmt: skip
    wrapped: list[nn.Module] = []
    timer = None
    if strategy == "ddp":
        inner = compressor.hook if compressor else None
        if grid is not None:
            inner = HierarchicalAllReduce(*grid, compressor=compressor).hook
        timer = CommTimer(inner)
    for part in parts:
        part.to_empty(device=device)
        if spec.init is not None:
            spec.init(part, seed)
        else:
            assert values is not None
            copy_values(part, values)
        if compressor is not None:
            compressor.name_parameters(part)
        if strategy == "ddp":
            mesh = layout.submesh("dp_replicate")
            wrapped.append(apply_ddp(part, mesh=mesh, bucket_mb=config.ddp_bucket_mb, timer=timer))
        else:
            wrapped.append(part)
    sync: GradientSync = ShardedSync(compressor)
    if strategy == "ddp":
        assert timer is not None
        sync = DDPSync(timer, compressor)
    elif strategy == "flat":
        sync = FlatSync(FlatAllReduce(wrapped, layout.group("dp_replicate"), compressor),
                        compressor)  # fmt: skip
    elif strategy in ("gossip", "local_sgd"):
        sync = DecentralizedSync(config, wrapped, layout)
    elif strategy == "none":
        sync = GradientSync()
    schedule, observed = None, None
    if layout.pp > 1:
        observed = ObservedLoss(loss_fn)
        schedule = build_schedule(config, wrapped, stage_ids, stages, device=device,
                                  group=layout.group("pp"), loss_fn=observed)  # fmt: skip
    return ParallelModel(
        parts=wrapped, loss_fn=loss_fn, schedule=schedule, observed=observed,
        first_stage=0 in stage_ids,
        last_stage=stages - 1 in stage_ids, strategy=strategy, sync=sync,
    )  # fmt: skip
