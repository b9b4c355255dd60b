"""The knobs the tuner may turn, the stage each one feeds, and what a setting costs in memory.

Each knob names a config field (``section.key``) and its candidate values, smallest first.
The stage is the loader stage whose capacity the knob raises (``dataflow.metrics``: fetch,
decode, batch): the tuner turns the bottleneck stage's knobs first.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

MiB = 1 << 20


@dataclass(frozen=True)
class Knob:
    path: str
    """``section.key`` of the config field."""
    values: tuple[Any, ...]
    """Candidates, in increasing order of capacity (and of cost)."""
    stage: str
    """The loader stage it feeds: fetch, decode or batch."""

    @property
    def section(self) -> str:
        return self.path.split(".", 1)[0]

    @property
    def key(self) -> str:
        return self.path.split(".", 1)[1]


def storage_knobs(remote: bool) -> list[Knob]:
    """Read knobs: connections and range size for object stores; block size for POSIX."""
    shared = [
        Knob("data.readahead_shards", (0, 1, 2, 4, 8, 16), "fetch"),
        Knob("data.fetch_workers", (1, 2, 4, 8, 16), "fetch"),
    ]
    if remote:
        return [
            Knob("storage.connections", (1, 2, 4, 8, 16, 32, 64), "fetch"),
            *shared,
            Knob(
                "storage.range_size",
                (1 * MiB, 2 * MiB, 4 * MiB, 8 * MiB, 16 * MiB, 32 * MiB),
                "fetch",
            ),
        ]
    return [*shared, Knob("storage.block_size", (MiB, 4 * MiB, 16 * MiB, 64 * MiB), "fetch")]


def decode_knobs(cores: int, dali: bool, gpu: bool) -> list[Knob]:
    workers = tuple(sorted({1, 2, 3, 4, cores, cores + 1, 2 * cores}))
    knobs = [Knob("data.decode_workers", workers, "decode")]
    if dali:
        knobs.append(Knob("data.decode_backend", ("cpu", "dali"), "decode"))
    if gpu:
        knobs.append(Knob("data.hw_decoder_load", (0.0, 0.3, 0.5, 0.65, 0.8, 1.0), "decode"))
        knobs.append(Knob("data.dali_pipelines", (1, 2, 3, 4), "decode"))
    return knobs


def batch_knobs() -> list[Knob]:
    return [Knob("data.prefetch_batches", (1, 2, 4, 8), "batch")]


@dataclass(frozen=True)
class Workload:
    """What one setting's memory depends on, from the dataset's index."""

    shard_bytes: float
    """Mean shard size."""
    batch_bytes: float
    """One decoded batch (per rank): batch × height × width × 3 for images."""


def memory_estimate(values: dict[str, Any], workload: Workload) -> float:
    """Bytes the loader may hold with these values, beyond the process's base.

    Shards in flight and read ahead are held whole (``readahead_shards`` + ``fetch_workers``
    of them), each connection buffers one range, each decode worker fills one batch, and
    ``prefetch_batches`` wait in the queue; a cache directory holds shards on disk, not here.
    """
    shards = values.get("data.readahead_shards", 4) + values.get("data.fetch_workers", 4)
    ranges = values.get("storage.connections", 0) * values.get("storage.range_size", 0)
    batches = values.get("data.decode_workers", 2) + values.get("data.prefetch_batches", 4)
    return shards * workload.shard_bytes + ranges + batches * workload.batch_bytes
