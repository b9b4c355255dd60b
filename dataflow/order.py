"""The global sample order of an epoch, and each rank's slice of it — pure functions.

Algorithm (MosaicML Streaming's py1e trade-off, in block form):
    1. Shards are permuted by a generator seeded with (seed, epoch).
    2. The permuted shards are cut into blocks of ``window`` consecutive shards; the samples
       of each block are permuted by a generator seeded with (seed, epoch, block).
    3. Global batch ``i`` is positions ``[i·G, (i+1)·G)`` of that order (G = global batch);
       rank ``r`` of ``W`` takes the ``r``-th of its ``W`` equal slices.

``window`` is the quality/locality knob: a sample can land anywhere inside its block, so
samples from ``window`` shards are mixed, while a reader needs only those ``window`` shards
at a time. ``window = 1`` shuffles within shards; ``window ≥ shards`` is a full shuffle.
``shuffle_quality`` measures it (see tools/bench_peers.py for the figure).

Nothing is materialised per epoch: a block's order is computed when a position in it is
asked for (O(window · shard size) memory, a few ms per block), so the order of a
billion-sample epoch costs what a single block costs. Because batches are defined on the
global order, a resume at another world size (same global batch) continues the same
sequence: every sample of the epoch is still delivered exactly once.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

_SALT_SHARDS = 0x5EED_0001
_SALT_BLOCK = 0x5EED_0002


@dataclass(frozen=True)
class BatchPlan:
    """What one rank reads for one global batch."""

    step: int
    """Index of the global batch within the epoch."""
    samples: np.ndarray
    """Global sample ids (int64) of this rank's slice, in order."""
    valid: np.ndarray
    """bool per sample: False for padding (repeats that complete the last batch)."""


class EpochOrder:
    """Position → global sample id for one epoch (see the module docstring)."""

    def __init__(
        self,
        shard_sizes: Sequence[int],
        *,
        seed: int,
        epoch: int,
        window: int,
        shuffle: bool = True,
    ) -> None:
        if window < 1:
            raise ValueError(f"shuffle window must be >= 1 shard, got {window}")
        self.sizes = np.asarray(shard_sizes, dtype=np.int64)
        self.shard_starts = np.concatenate([[0], np.cumsum(self.sizes)]).astype(np.int64)
        self.total = int(self.shard_starts[-1])
        self.seed, self.epoch, self.window, self.shuffle = seed, epoch, window, shuffle
        if shuffle:
            rng = np.random.default_rng([seed, epoch, _SALT_SHARDS])
            self.shard_order = rng.permutation(len(self.sizes)).astype(np.int64)
        else:
            self.shard_order = np.arange(len(self.sizes), dtype=np.int64)
            self.window = max(1, len(self.sizes))
        blocks = [
            self.shard_order[i : i + self.window] for i in range(0, len(self.sizes), self.window)
        ]
        self.blocks = blocks
        block_sizes = np.asarray([int(self.sizes[b].sum()) for b in blocks], dtype=np.int64)
        self.block_starts = np.concatenate([[0], np.cumsum(block_sizes)]).astype(np.int64)
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        # What read-ahead needs (the ``SampleOrder`` protocol): shards in the order they are
        # first needed, and the last position that reads each shard.
        self.need_order = self.shard_order
        self.last_position = np.empty(len(self.sizes), dtype=np.int64)
        for number, block in enumerate(blocks):
            self.last_position[block] = self.block_starts[number + 1] - 1

    def __len__(self) -> int:
        return self.total

    def block(self, number: int) -> np.ndarray:
        """The global ids of block ``number``, in epoch order."""
        cached = self._cache.get(number)
        if cached is not None:
            self._cache.move_to_end(number)
            return cached
        ids = np.concatenate(
            [
                np.arange(self.shard_starts[s], self.shard_starts[s + 1], dtype=np.int64)
                for s in self.blocks[number]
            ]
        )
        if self.shuffle:
            np.random.default_rng([self.seed, self.epoch, _SALT_BLOCK, number]).shuffle(ids)
        self._cache[number] = ids
        if len(self._cache) > 2:
            self._cache.popitem(last=False)
        return ids

    def take(self, start: int, stop: int) -> np.ndarray:
        """Global ids at positions ``[start, stop)`` (positions past the end wrap around)."""
        positions = np.arange(start, stop, dtype=np.int64) % max(1, self.total)
        out = np.empty(len(positions), dtype=np.int64)
        blocks = np.searchsorted(self.block_starts, positions, side="right") - 1
        for number in np.unique(blocks):
            mask = blocks == number
            out[mask] = self.block(int(number))[positions[mask] - self.block_starts[number]]
        return out

    def shard_of(self, sample_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(shard index, index within shard) of global sample ids."""
        shards = np.searchsorted(self.shard_starts, sample_ids, side="right") - 1
        return shards, sample_ids - self.shard_starts[shards]

    def needed_count(self, last_position: int) -> int:
        """How many shards of ``need_order`` positions ``[0, last_position]`` read: all the
        shards of every block up to the one holding ``last_position``."""
        block = int(np.searchsorted(self.block_starts, last_position, "right") - 1)
        return min(len(self.need_order), (block + 1) * self.window)


class SampleOrder(Protocol):
    """What the loader needs of an epoch's order (``EpochOrder``; a mix of datasets too)."""

    total: int
    """Positions in the epoch."""
    need_order: np.ndarray
    """Every shard once, in the order the epoch first reads it (read-ahead follows it)."""
    last_position: np.ndarray
    """Per shard, the last position that reads it (after that, read-ahead drops it)."""

    def take(self, start: int, stop: int) -> np.ndarray:
        """Sample ids at positions ``[start, stop)``; positions past the end wrap around."""
        ...

    def shard_of(self, sample_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(shard, row within shard) of sample ids."""
        ...

    def needed_count(self, last_position: int) -> int:
        """How many leading shards of ``need_order`` positions up to ``last_position`` read."""
        ...


def num_batches(total: int, global_batch: int, drop_last: bool) -> int:
    """Global batches in an epoch; every rank gets exactly this many."""
    return total // global_batch if drop_last else -(-total // global_batch)


def samples_due(total: int, global_batch: int, steps: int, *, rank: int, world_size: int) -> int:
    """Samples rank ``rank`` is due in an epoch of ``steps`` batches: its slice of each, less
    the padding past the end (positions ``[0, total)`` are real)."""
    per_rank = global_batch // world_size
    full = min(steps, total // global_batch)
    partial = sum(
        min(per_rank, max(0, total - (step * global_batch + rank * per_rank)))
        for step in range(full, steps)
    )
    return full * per_rank + partial


def rank_batch(
    order: SampleOrder, step: int, *, global_batch: int, rank: int, world_size: int
) -> BatchPlan:
    """Rank ``rank``'s slice of global batch ``step``; positions past the end are padding."""
    if global_batch % world_size:
        raise ValueError(
            f"global batch {global_batch} does not split over {world_size} ranks; "
            "choose a multiple of the world size"
        )
    per_rank = global_batch // world_size
    start = step * global_batch + rank * per_rank
    positions = np.arange(start, start + per_rank, dtype=np.int64)
    return BatchPlan(
        step=step, samples=order.take(start, start + per_rank), valid=positions < order.total
    )


def shuffle_quality(order: EpochOrder) -> dict[str, float]:
    """How well an epoch order mixes data, on two scales (1.0 = a uniform random shuffle).

    ``shards_per_batch``: distinct shards among 256 consecutive positions, relative to what
    a full shuffle gives — low values mean batches drawn from few shards (correlated).
    ``displacement``: mean |position − original position| / (N/3), the expected value for a
    uniform permutation — how far samples travel from where the data put them.
    """
    ids = order.take(0, order.total)
    shards, _ = order.shard_of(ids)
    window = min(256, order.total)
    distinct = [len(np.unique(shards[i : i + window])) for i in range(0, order.total, window)]
    sizes = order.sizes.tolist()
    full = EpochOrder(sizes, seed=order.seed, epoch=order.epoch, window=len(sizes))
    full_shards, _ = full.shard_of(full.take(0, full.total))
    full_distinct = [
        len(np.unique(full_shards[i : i + window])) for i in range(0, full.total, window)
    ]
    displacement = float(np.abs(ids - np.arange(order.total)).mean()) / max(1.0, order.total / 3)
    return {
        "shards_per_batch": float(np.mean(distinct)) / max(1e-9, float(np.mean(full_distinct))),
        "displacement": float(displacement),
    }
