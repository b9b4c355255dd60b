"""The fetch stage of one pass: which shards to have in flight for a step, and when to drop.

Shards are needed in ``order.need_order``, block by block. For global batch ``s`` the stage
keeps in flight every shard the positions up to the end of ``s`` read plus ``readahead``
more, submitted to a fetch pool, and drops a shard once the global position has passed the
last position that reads it (``order.last_position``). Memory is therefore bounded by
(shuffle window + read-ahead) shards whatever the dataset size; the cost per step is one
``needed_count`` (a binary search) and a scan of the shards in flight.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable

from dataflow.order import SampleOrder
from dataflow.pipeline.shards import ShardView


class ReadAhead:
    """Shard futures for the steps of one pass over one ``SampleOrder``."""

    def __init__(
        self,
        order: SampleOrder,
        *,
        global_batch: int,
        readahead: Callable[[], int],
        fetch: Callable[[int], ShardView],
        pool: concurrent.futures.Executor,
    ) -> None:
        self.order = order
        self.global_batch = global_batch
        self.readahead = readahead
        """Shards beyond the current batch's (read at each step: autotune raises it)."""
        self.fetch = fetch
        self.pool = pool
        self.views: dict[int, concurrent.futures.Future[ShardView]] = {}
        self.scheduled_until = 0
        """Index into order.need_order of the next shard to submit."""

    def view(self, shard: int) -> concurrent.futures.Future[ShardView]:
        """The (possibly still running) fetch of ``shard``, submitted if not yet."""
        future = self.views.get(shard)
        if future is None:
            future = self.pool.submit(self.fetch, shard)
            self.views[shard] = future
        return future

    def schedule(self, step: int) -> None:
        """Fetch the shards this global batch touches plus ``readahead()`` beyond them, and
        drop the shards no position from this step on reads."""
        order = self.order
        last_position = min(order.total - 1, (step + 1) * self.global_batch - 1)
        target = min(len(order.need_order), order.needed_count(last_position) + self.readahead())
        while self.scheduled_until < target:
            self.view(int(order.need_order[self.scheduled_until]))
            self.scheduled_until += 1
        first_position = min(order.total - 1, step * self.global_batch)
        for shard in [s for s in self.views if order.last_position[s] < first_position]:
            del self.views[shard]

    def clear(self) -> None:
        self.views.clear()
