"""How data-parallel ranks exchange gradients, beyond DDP's own ring all-reduce per bucket
(``parallel.allreduce``):

    flat           one all-reduce of all gradients after backward (``flat``)
    hierarchical   per DDP bucket: reduce-scatter in the node, all-reduce across nodes,
                   all-gather in the node (``hierarchical``); [compression] compresses the
                   cross-node step only

and decentralized training (``parallel.decentralized``, ``decentral``): gossip averaging
with neighbours (D-PSGD) and local SGD / DiLoCo's periodic averaging.

``model`` holds the communication model: bytes per rank and sequential latency terms of
each strategy, for planning clusters larger than the one at hand (``tools/bench_comm.py``).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from trainer.comm.decentral import Decentralized, Gossip, LocalSGD
from trainer.comm.flat import FlatAllReduce
from trainer.comm.hierarchical import HierarchicalAllReduce, pieces

if TYPE_CHECKING:
    import torch
    from torch import nn

    from trainer.config import ParallelConfig
    from trainer.parallel.mesh import Layout

__all__ = [
    "Decentralized",
    "FlatAllReduce",
    "Gossip",
    "HierarchicalAllReduce",
    "LocalSGD",
    "build_decentralized",
    "node_grid",
    "pieces",
]


def build_decentralized(
    config: ParallelConfig, parts: list[nn.Module], optimizers: list[torch.optim.Optimizer],
    layout: Layout,
) -> Decentralized | None:  # fmt: skip
    """The configured gossip or local-SGD mixer over the data-parallel ranks, or None."""
    if config.decentralized == "none" or layout.world_size == 1:
        return None
    group = layout.group("dp_replicate")
    if config.decentralized == "gossip":
        return Gossip(parts, optimizers, group, config.gossip_graph)
    return LocalSGD(parts, optimizers, group, local_steps=config.local_steps,
                    outer_lr=config.outer_lr, outer_momentum=config.outer_momentum)  # fmt: skip


def node_grid(device_type: str, node_size: int) -> tuple[dist.ProcessGroup, dist.ProcessGroup]:
    """(this rank's node group, the group of ranks with its local index) over the world,
    nodes holding consecutive ranks as torchrun places them. ``node_size`` 0: torchrun's
    LOCAL_WORLD_SIZE. Every rank must call this."""
    world = dist.get_world_size()
    local = node_size or int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if local < 1 or world % local:
        raise ValueError(
            f"parallel.node_size = {local} does not divide the {world} data-parallel ranks into "
            "nodes; set it to the ranks per node"
        )
    mesh = init_device_mesh(device_type, (world // local, local), mesh_dim_names=("node", "local"))
    return mesh["local"].get_group(), mesh["node"].get_group()
