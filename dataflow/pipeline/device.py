"""Copy batches to the GPU on a side CUDA stream, one batch ahead of the consumer.

While the trainer computes on batch k, batch k+1's host→device copy runs on its own stream
from pinned memory (the loader allocates batch arrays pinned when a CUDA device is set),
so the copy overlaps compute. The consumer's stream waits on the copy stream before it
touches a batch, and each tensor is marked as used by the consumer's stream so the caching
allocator never reuses its memory too early. On a CPU-only machine nothing wraps the loader.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

Batch = dict[str, Any]


def prefetch_to_device(batches: Iterator[Batch], device: torch.device) -> Iterator[Batch]:
    stream = torch.cuda.Stream(device=device)

    def copy(batch: Batch) -> Batch:
        with torch.cuda.stream(stream):
            return {
                name: value.to(device, non_blocking=True) if torch.is_tensor(value) else value
                for name, value in batch.items()
            }

    pending: Batch | None = None
    for batch in batches:
        ready, pending = pending, copy(batch)
        if ready is not None:
            yield _hand_over(ready, stream)
    if pending is not None:
        yield _hand_over(pending, stream)


def _hand_over(batch: Batch, stream: torch.cuda.Stream) -> Batch:
    current = torch.cuda.current_stream(stream.device)
    current.wait_stream(stream)
    for value in batch.values():
        if torch.is_tensor(value) and value.is_cuda:
            value.record_stream(current)
    return batch
