"""Build the configured model and apply parallelism, in this order (torchtitan's):

1. build the whole model on the meta device (no memory, whatever its size);
2. pipeline: keep this rank's stages (``pipeline.split_model``);
3. tensor parallel: DTensor column/row plans on the tp mesh (``tensor``);
4. activation checkpointing around each block (``data``);
5. FSDP2 ``fully_shard`` per block, then the root, on the 2-D (dp_replicate, dp_shard)
   mesh: FSDP, HSDP (with ``[compression]``: on the dp_shard mesh, and a compressing hook
   averages over dp_replicate — ``trainer.compression``), or — when dp_shard is 1 but TP
   or PP is on — pure replication through FSDP2 (DDP's reducer cannot follow a pipeline's
   microbatches: its bucket rebuild sees each parameter once per microbatch and fails an
   internal assert in torch 2.13);
6. materialise (``to_empty``) and initialise each parameter from (seed, name) — the same
   weights in every layout (``trainer.models.init``);
7. DDP around the model, when data parallelism is pure replication alone (``data``);
8. the pipeline schedule over the stages (``pipeline``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import nn

from trainer.comm import FlatAllReduce, HierarchicalAllReduce, node_grid
from trainer.compression import Compressor, build_compressor
from trainer.config import CompressionConfig, ModelConfig, ParallelConfig
from trainer.models import StagedModel, build_model, init_weights
from trainer.parallel.data import (
    CommTimer,
    apply_activation_checkpointing,
    apply_ddp,
    apply_fsdp,
)
from trainer.parallel.mesh import Layout, build_layout, resolve
from trainer.parallel.pipeline import Schedule, build_schedule, split_model, stage_indices
from trainer.parallel.tensor import apply_tensor_parallel

__all__ = ["Layout", "ParallelModel", "build_layout", "parallelize", "resolve"]


@dataclass(kw_only=True)
class ParallelModel:
    parts: list[nn.Module]
    """This rank's model parts as wrapped (one, or one per pipeline stage it holds)."""
    loss_fn: object
    """(output, target) → mean loss."""
    schedule: Schedule | None
    """The pipeline schedule, when pp > 1."""
    first_stage: bool
    """Whether this rank feeds inputs (holds stage 0)."""
    last_stage: bool
    """Whether this rank computes the loss (holds the last stage)."""
    strategy: str
    """How data parallelism is done: 'ddp', 'flat' (one all-reduce after backward), 'gossip'
    or 'local_sgd' (parameters mixed after the step, ``trainer.comm.decentral``), 'fsdp',
    'hsdp', 'replicate' (FSDP2) or 'none'."""
    comm_timer: CommTimer | None = None
    """With DDP: the time gradient all-reduces were in flight."""
    compressor: Compressor | None = None
    """With [compression] under DDP or HSDP: the compressor, its byte counts, and under HSDP
    the seconds its hooks spent averaging."""
    gradient_sync: FlatAllReduce | None = None
    """With parallel.allreduce = "flat": averages all gradients after backward."""


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
) -> ParallelModel:
    with torch.device("meta"):
        whole = build_model(model_config, num_classes=num_classes)
    loss_fn = whole.loss
    parts: list[StagedModel] = [whole]
    stage_ids, stages = [0], 1
    if layout.pp > 1:
        assert layout.mesh is not None
        stage_ids, stages = stage_indices(config, layout.pp_rank)
        parts = [split_model(whole, index, stages) for index in stage_ids]
    if layout.tp > 1:
        for part in parts:
            apply_tensor_parallel(part, mesh=layout.submesh("tp"), heads=model_config.heads)
    if activation_checkpointing:
        for part in parts:
            apply_activation_checkpointing(part)
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
            apply_fsdp(part, mesh=mesh, bf16=bf16, all_reduce_hook=hook,
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
        init_weights(part, seed)
        if compressor is not None:
            compressor.name_parameters(part)
        if strategy == "ddp":
            mesh = layout.submesh("dp_replicate")
            wrapped.append(apply_ddp(part, mesh=mesh, bucket_mb=config.ddp_bucket_mb, timer=timer))
        else:
            wrapped.append(part)
    flat = None
    if strategy == "flat":
        flat = FlatAllReduce(wrapped, layout.group("dp_replicate"), compressor)
    schedule = None
    if layout.pp > 1:
        schedule = build_schedule(config, wrapped, stage_ids, stages, device=device,
                                  group=layout.group("pp"), loss_fn=loss_fn)  # fmt: skip
    return ParallelModel(
        parts=wrapped, loss_fn=loss_fn, schedule=schedule, first_stage=0 in stage_ids,
        last_stage=stages - 1 in stage_ids, strategy=strategy, comm_timer=timer,
        compressor=compressor, gradient_sync=flat,
    )  # fmt: skip
