"""One all-reduce of all gradients after backward (``parallel.allreduce = "flat"``).

The fewest latency terms a step can have — one collective, 2(p−1) ring steps — at the price
of overlap: nothing is sent until backward has finished. The model is not wrapped in DDP;
the trainer calls ``FlatAllReduce.sync`` between backward and the optimizer step. With
``[compression]`` the compressor averages the flat buffer instead.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist
from torch import nn

from trainer.compression.base import Compressor, Segment, tile


class FlatAllReduce:
    def __init__(
        self, parts: list[nn.Module], group: dist.ProcessGroup,
        compressor: Compressor | None = None,
    ) -> None:  # fmt: skip
        self.group, self.compressor = group, compressor
        self.params = [(name, p) for part in parts for name, p in part.named_parameters()
                       if p.requires_grad]  # fmt: skip
        self.segments: tuple[Segment, ...] = tile([(n, tuple(p.shape)) for n, p in self.params])
        self.seconds = 0.0
        """Seconds spent averaging since the trainer last took them."""

    def sync(self) -> None:
        """Average every gradient over the group (a missing gradient counts as zeros)."""
        started = time.perf_counter()
        flat = torch.cat([
            (p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
            for _, p in self.params
        ])  # fmt: skip
        if self.compressor is None:
            dist.all_reduce(flat, group=self.group)
            flat.div_(self.group.size())
        else:
            flat = self.compressor.average(self.group, flat, self.segments).wait()
        for segment, (_, param) in zip(self.segments, self.params, strict=True):
            gradient = flat[segment.offset : segment.end].view(param.shape)
            if param.grad is None:
                param.grad = gradient.clone()
            else:
                param.grad.copy_(gradient)
        self.seconds += time.perf_counter() - started

    def take_seconds(self) -> float:
        seconds, self.seconds = self.seconds, 0.0
        return seconds
