"""The parallel layout: how WORLD_SIZE ranks split into pp × dp_replicate × dp_shard × tp.

One ``DeviceMesh`` with those four named dimensions, outermost first (torchtitan's order:
pipeline stages talk least and so span the widest distance, tensor parallel talks most and
stays innermost — on one node when there are several). The data-parallel rank and world
(``dp_rank``, ``dp_world``) are what the loader partitions by: tensor- and pipeline-parallel
peers read the same batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from trainer.config import ParallelConfig

DIMENSIONS = ("pp", "dp_replicate", "dp_shard", "tp")


@dataclass(frozen=True, kw_only=True)
class Layout:
    rank: int
    world_size: int
    pp: int
    dp_replicate: int
    dp_shard: int
    tp: int
    mesh: DeviceMesh | None = None

    @property
    def coordinates(self) -> dict[str, int]:
        """This rank's index along each dimension (row-major over DIMENSIONS)."""
        sizes = {"pp": self.pp, "dp_replicate": self.dp_replicate, "dp_shard": self.dp_shard,
                 "tp": self.tp}  # fmt: skip
        result, rest = {}, self.rank
        for name in reversed(DIMENSIONS):
            result[name], rest = rest % sizes[name], rest // sizes[name]
        return result

    @property
    def dp_world(self) -> int:
        return self.dp_replicate * self.dp_shard

    @property
    def dp_rank(self) -> int:
        where = self.coordinates
        return where["dp_replicate"] * self.dp_shard + where["dp_shard"]

    @property
    def pp_rank(self) -> int:
        return self.coordinates["pp"]

    @property
    def tp_rank(self) -> int:
        return self.coordinates["tp"]

    def submesh(self, *names: str) -> DeviceMesh:
        assert self.mesh is not None, "a one-process layout has no mesh"
        return self.mesh[names] if len(names) > 1 else self.mesh[names[0]]

    def group(self, name: str) -> dist.ProcessGroup:
        return self.submesh(name).get_group()

    def describe(self) -> str:
        parts = [f"{name}={getattr(self, name)}" for name in DIMENSIONS if getattr(self, name) > 1]
        return " × ".join(parts) or "single process"


def resolve(config: ParallelConfig, world_size: int) -> tuple[int, int, int, int]:
    """(pp, dp_replicate, dp_shard, tp) for ``world_size`` ranks, or a ValueError saying why not."""
    fixed = config.pp * config.dp_shard * config.tp
    replicate = config.dp_replicate
    if replicate == -1:
        if world_size % fixed:
            raise ValueError(
                f"WORLD_SIZE {world_size} is not divisible by parallel.pp × dp_shard × tp = "
                f"{config.pp} × {config.dp_shard} × {config.tp} = {fixed}; change the degrees "
                "or the number of processes"
            )
        replicate = world_size // fixed
    if replicate * fixed != world_size:
        raise ValueError(
            f"parallel.pp × dp_replicate × dp_shard × tp = {config.pp} × {replicate} × "
            f"{config.dp_shard} × {config.tp} = {replicate * fixed}, but WORLD_SIZE is "
            f"{world_size}; set dp_replicate = -1 to use the ranks that are left"
        )
    return config.pp, replicate, config.dp_shard, config.tp


def build_layout(config: ParallelConfig, *, rank: int, world_size: int, device_type: str) -> Layout:
    pp, replicate, shard, tp = resolve(config, world_size)
    mesh = None
    if world_size > 1:
        mesh = init_device_mesh(device_type, (pp, replicate, shard, tp), mesh_dim_names=DIMENSIONS)
    return Layout(rank=rank, world_size=world_size, pp=pp, dp_replicate=replicate,
                  dp_shard=shard, tp=tp, mesh=mesh)  # fmt: skip
