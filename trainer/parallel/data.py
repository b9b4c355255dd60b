"""Data parallelism (DDP, FSDP2, HSDP) and activation checkpointing.

- DDP (``dp_replicate`` > 1, no sharding, no TP): gradients go into buckets of
  ``ddp_bucket_mb`` whose all-reduce starts as soon as the bucket is full, so communication
  overlaps the rest of backward.
- FSDP2 (``dp_shard`` > 1, or any data parallelism composed with TP): ``fully_shard`` on
  each block and then the root; parameters, gradients and optimizer state are sharded, the
  next block's all-gather is prefetched during compute. With ``dp_replicate`` > 1 too the
  mesh is 2-D: HSDP (shard within a group, all-reduce across groups).
- Activation checkpointing wraps each block (recompute in backward); applied before FSDP so
  FSDP shards the wrapped block.

"Block" is whatever ``ModelSpec.units`` names: a StagedModel's blocks, the submodules of the
spec's wrap classes, or else the module's children that hold parameters.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel

from trainer.models.base import StagedModel

Units = list[tuple[str, nn.Module]]


def _blocks(model: nn.Module) -> Units:
    assert isinstance(model, StagedModel), "give the units of a model that is no StagedModel"
    return [(f"blocks.{name}", block) for name, block in model.blocks.items()]


def apply_activation_checkpointing(model: nn.Module, units: Units | None = None) -> None:
    """Wrap each unit (name, module) of ``model`` in place (default: a StagedModel's blocks);
    a unit inside another is recomputed with it already."""
    wrapped: list[str] = []
    for name, unit in units if units is not None else _blocks(model):
        if any(name.startswith(f"{outer}.") for outer in wrapped):
            continue
        wrapped.append(name)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        parent.register_module(child, checkpoint_wrapper(unit, preserve_rng_state=False))


def apply_fsdp(
    model: nn.Module, units: Units | None = None, *, mesh: DeviceMesh, bf16: bool,
    reshard_after_forward: bool,
    all_reduce_hook: Callable[[nn.Module], Callable[[torch.Tensor], None]] | None = None,
) -> None:  # fmt: skip
    """``fully_shard`` each unit, then the root (units default: a StagedModel's blocks).
    ``all_reduce_hook(module)`` gives the hook FSDP2 runs on each sharded module's
    reduce-scattered gradients (``FSDPModule.set_all_reduce_hook``)."""
    policy = MixedPrecisionPolicy(
        param_dtype=torch.bfloat16 if bf16 else None, reduce_dtype=torch.float32
    )
    found = units if units is not None else _blocks(model)
    # BatchNorm keeps fp32 weights under bf16: its running statistics are fp32 buffers, and
    # the CPU kernel takes bf16 input with fp32 weights and statistics, not bf16 weights
    # with fp32 statistics ("expected scalar type BFloat16 but found Float"). Its own FSDP
    # group (innermost first) gives it its own policy; the reference models have none.
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    fp32 = MixedPrecisionPolicy(reduce_dtype=torch.float32, cast_forward_inputs=False)
    groups = [*((m, fp32) for m in (norms if bf16 else [])),
              *((unit, policy) for _, unit in found), (model, policy)]  # fmt: skip
    for module, module_policy in groups:
        sharded = fully_shard(module, mesh=mesh, mp_policy=module_policy,
                              reshard_after_forward=reshard_after_forward)  # fmt: skip
        if all_reduce_hook is not None:
            sharded.set_all_reduce_hook(all_reduce_hook(module))


class CommTimer:
    """Seconds DDP's gradient all-reduces were in flight (launch → done), summed per step.

    They run while backward goes on, so this is communication time, not time added to the
    step; comparing it with the step time shows how much there is to hide.
    """

    def __init__(
        self, inner: Callable[..., torch.futures.Future[torch.Tensor]] | None = None
    ) -> None:
        self._seconds = 0.0
        self._lock = threading.Lock()
        # The hook that communicates: a compressor's, or the plain all-reduce.
        self._inner = inner or default_hooks.allreduce_hook

    def hook(
        self, group: dist.ProcessGroup, bucket: dist.GradBucket
    ) -> torch.futures.Future[torch.Tensor]:
        started = time.perf_counter()
        future = self._inner(group, bucket)

        def done(finished: torch.futures.Future[torch.Tensor]) -> torch.Tensor:
            with self._lock:
                self._seconds += time.perf_counter() - started
            return finished.value()

        return future.then(done)

    def take(self) -> float:
        """Seconds since the last call."""
        with self._lock:
            seconds, self._seconds = self._seconds, 0.0
        return seconds


# DDP checks the hook's annotations against GradBucket and Future[Tensor] itself; under
# `from __future__ import annotations` it would see strings and refuse the hook.
CommTimer.hook.__annotations__["bucket"] = dist.GradBucket
CommTimer.hook.__annotations__["return"] = torch.futures.Future[torch.Tensor]


def apply_ddp(
    model: nn.Module, *, mesh: DeviceMesh, bucket_mb: float, timer: CommTimer | None = None
) -> nn.Module:
    device_ids = [torch.cuda.current_device()] if mesh.device_type == "cuda" else None
    # Gradients live in the buckets themselves: no copy into them, no second gradient copy.
    wrapped = DistributedDataParallel(
        model, process_group=mesh.get_group(), bucket_cap_mb=bucket_mb, device_ids=device_ids,
        gradient_as_bucket_view=True,
    )  # fmt: skip
    if timer is not None:
        wrapped.register_comm_hook(mesh.get_group(), timer.hook)
    return wrapped
