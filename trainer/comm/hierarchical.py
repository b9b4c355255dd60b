"""Two-level all-reduce of DDP buckets over a (node, local) grid of ranks.

For each bucket of n gradient entries, on a grid of N nodes × L ranks per node:

1. reduce-scatter inside the node: local rank j ends with the node's sum of chunk j
   (⌈n/L⌉ entries; the last chunk is padded with zeros, which are never sent across);
2. all-reduce of chunk j across the nodes, among the N ranks with local index j — the only
   step that crosses nodes, with 1/L of the bytes; with ``[compression]`` the compressor
   averages here, on the chunk's pieces of parameters (``pieces``);
3. all-gather inside the node: every rank has the whole averaged bucket again.

The three run back to back on the hook's thread: a bucket's collectives never interleave
with the next bucket's, on every rank in the same order.
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.distributed as dist

from trainer.compression.base import Compressor, Segment, done_future


def pieces(segments: tuple[Segment, ...], start: int, end: int) -> tuple[Segment, ...]:
    """The parts of ``segments`` inside flat entries [start, end), as segments of the slice.

    A parameter cut by the slice keeps its whole rows as a matrix (PowerSGD still compresses
    it); part-rows at either edge become vectors. A part is named ``name@first_entry``, the
    same on every step the bucket layout holds, so error-feedback state stays with it.
    """
    result = []
    for segment in segments:
        first, last = max(segment.offset, start), min(segment.end, end)
        if first >= last:
            continue
        a, b = first - segment.offset, last - segment.offset  # entries within the parameter
        if (a, b) == (0, segment.numel):
            result.append(Segment(segment.name, first - start, segment.shape))
            continue
        row = segment.numel // segment.shape[0] if len(segment.shape) >= 2 else 0
        cuts = [a, b]
        if row:
            whole_from, whole_to = -(-a // row) * row, b // row * row
            if whole_from < whole_to:
                cuts = [a, whole_from, whole_to, b]
        for low, high in itertools.pairwise(cuts):
            if high <= low:
                continue
            whole_rows = row and low % row == 0 and high % row == 0 and high - low >= row
            shape = ((high - low) // row, row) if whole_rows else (high - low,)
            result.append(Segment(f"{segment.name}@{low}", segment.offset + low - start, shape))
    return tuple(result)


class HierarchicalAllReduce:
    """A DDP comm hook: ``intra`` is this rank's node group (L ranks), ``cross`` the group of
    the N ranks that share its local index. Averages over all N·L ranks."""

    def __init__(
        self, intra: dist.ProcessGroup, cross: dist.ProcessGroup,
        compressor: Compressor | None = None,
    ) -> None:  # fmt: skip
        self.intra, self.cross, self.compressor = intra, cross, compressor
        self.local_size, self.nodes = intra.size(), cross.size()
        self.local_rank = dist.get_group_rank(intra, dist.get_rank())
        # This rank's pieces of each bucket layout (the compressor keeps one segments tuple
        # per layout), worked out once, not every step.
        self._pieces: dict[tuple[int, int, int], tuple[Segment, ...]] = {}

    def hook(
        self, group: dist.ProcessGroup, bucket: dist.GradBucket
    ) -> torch.futures.Future[torch.Tensor]:
        segments = self.compressor.bucket_segments(bucket) if self.compressor else ()
        return done_future(self.average(bucket.buffer(), segments))

    def average(self, flat: torch.Tensor, segments: tuple[Segment, ...] = ()) -> torch.Tensor:
        """Average ``flat`` over all ranks in place (``segments`` name its parameters, for
        the compressor); returns it."""
        n, local = flat.numel(), self.local_size
        chunk = math.ceil(n / local)
        padding = chunk * local - n
        padded = torch.cat([flat, flat.new_zeros(padding)]) if padding else flat
        shard = flat.new_empty(chunk)
        dist.reduce_scatter_tensor(shard, padded, group=self.intra)
        start = self.local_rank * chunk
        real = max(0, min(n, start + chunk) - start)  # entries of the shard that are not padding
        mine = shard[:real]  # the same length on all ranks of ``cross``
        if self.compressor is None:
            dist.all_reduce(mine, group=self.cross)
            mine.div_(local * self.nodes)
        elif real:
            mine.div_(local)
            cached = (id(segments), start, real)
            parts = self._pieces.get(cached)
            if parts is None:
                parts = self._pieces[cached] = pieces(segments, start, start + real)
            mine.copy_(self.compressor.average(self.cross, mine, parts).wait())
        dist.all_gather_into_tensor(padded, shard, group=self.intra)
        if padded is not flat:
            flat.copy_(padded[:n])
        return flat


# DDP checks a hook's annotations itself; under `from __future__ import annotations` they
# would be strings, and it would refuse the hook.
HierarchicalAllReduce.hook.__annotations__["bucket"] = dist.GradBucket
HierarchicalAllReduce.hook.__annotations__["return"] = torch.futures.Future[torch.Tensor]
