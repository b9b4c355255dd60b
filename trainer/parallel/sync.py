"""``GradientSync``: how data-parallel ranks agree, as the training loop sees it — one object
whatever the strategy, called at two points of each step:

    forward, backward ─▶ after_backward() ─▶ clip, optimizer step ─▶ after_step(step)

    DDP (ring, hierarchical)  buckets all-reduced by hooks during backward; after_step
                              counts the compressor's step
    flat                      after_backward: one all-reduce of all gradients
    FSDP / HSDP / replicate   FSDP2's reduce-scatter during backward; under HSDP with
                              [compression] its all-reduce hook averages over replicas
    gossip, local SGD/DiLoCo  no gradient exchange; after_step mixes parameters

``state()`` names the objects whose state differs per rank (the checkpoint saves them per
rank: ``trainer.checkpoint.RankState``), ``stats()`` the communication figures since the
last call (seconds, bytes, compression ratio, consensus distance) for the metrics line.
Cost: a method call or two per step; the communication is the strategies' own.
"""

from __future__ import annotations

import torch
from torch import nn

from trainer.checkpoint import RankState
from trainer.comm import FlatAllReduce, build_decentralized
from trainer.comm.decentral import Decentralized
from trainer.compression import Compressor
from trainer.config import ParallelConfig
from trainer.parallel.data import CommTimer
from trainer.parallel.mesh import Layout

Stats = dict[str, float | int]


class GradientSync:
    """No data parallelism (one process, or tensor/pipeline parallelism alone): nothing to do.
    Subclasses with a compressor count its steps and report its bytes."""

    def __init__(self, compressor: Compressor | None = None) -> None:
        self.compressor = compressor

    def attach(self, optimizers: list[torch.optim.Optimizer]) -> None:
        """Called once the optimizers exist (decentralized training saves their state)."""

    def after_backward(self) -> None:
        """Gradients are complete on this rank; average them if the strategy waits for that."""

    def after_step(self, step: int) -> None:
        """The optimizer stepped; ``step`` optimizer steps are done."""
        if self.compressor is not None:
            self.compressor.step_done()

    def state(self) -> dict[str, RankState]:
        return {"compression": self.compressor} if self.compressor is not None else {}

    def seconds(self) -> float | None:
        """Communication seconds since the last call, where the strategy can measure them."""
        return None

    def stats(self) -> Stats:
        record: Stats = {}
        seconds = self.seconds()
        if seconds is not None:
            record["comm_s"] = round(seconds, 6)
        if self.compressor is not None:
            sent, dense = self.compressor.take_bytes()
            record["comm_bytes"], record["comm_bytes_dense"] = sent, dense
            record["compression_ratio"] = round(dense / max(sent, 1), 3)
        return record


class DDPSync(GradientSync):
    """DDP's bucket hooks (plain, compressed or hierarchical) run inside backward."""

    def __init__(self, timer: CommTimer, compressor: Compressor | None) -> None:
        super().__init__(compressor)
        self.timer = timer

    def seconds(self) -> float:
        return self.timer.take()


class FlatSync(GradientSync):
    def __init__(self, flat: FlatAllReduce, compressor: Compressor | None) -> None:
        super().__init__(compressor)
        self.flat = flat

    def after_backward(self) -> None:
        self.flat.sync()

    def seconds(self) -> float:
        return self.flat.take_seconds()


class ShardedSync(GradientSync):
    """FSDP2 (FSDP, HSDP, replicate) reduces inside backward; with a compressor, its
    all-reduce hook over the replicas is what is timed."""

    def seconds(self) -> float | None:
        return self.compressor.take_seconds() if self.compressor is not None else None


class DecentralizedSync(GradientSync):
    """Gossip or local SGD / DiLoCo: parameters mixed after the optimizer step."""

    def __init__(self, config: ParallelConfig, parts: list[nn.Module], layout: Layout) -> None:
        super().__init__()
        self.config, self.parts, self.layout = config, parts, layout
        self.mixer: Decentralized | None = None
        self.consensus: float | None = None

    def attach(self, optimizers: list[torch.optim.Optimizer]) -> None:
        self.mixer = build_decentralized(self.config, self.parts, optimizers, self.layout)

    def after_step(self, step: int) -> None:
        assert self.mixer is not None, "attach(optimizers) comes before the first step"
        self.mixer.after_step()
        every = self.config.consensus_every
        if every and step % every == 0:
            self.consensus = self.mixer.consensus_distance()

    def state(self) -> dict[str, RankState]:
        return {"decentral": self.mixer} if self.mixer is not None else {}

    def stats(self) -> Stats:
        assert self.mixer is not None
        record: Stats = {"comm_s": round(self.mixer.take_seconds(), 6),
                         "comm_bytes": self.mixer.take_bytes()}  # fmt: skip
        if self.consensus is not None:
            record["consensus"], self.consensus = self.consensus, None
        return record
