"""Runtime read-ahead tuning (``data.autotune``): more shards ahead, more fetches at once and
more connections while the consumer stalls on storage; never beyond a memory cap.

The loader reports, every batch, its running totals (``Totals``); every ``window_s`` seconds
(and at least ``window_batches`` batches) the tuner compares the window's deltas:

- the stall fraction: the consumer's wait for batches ÷ the window's time;
- whether storage is why: the share of the decode workers' time spent waiting for shards.

When the stall fraction is above ``stall_above`` and storage is why, it takes one step up:
read-ahead doubles (0 → 1 → 2 → 4 …), fetch workers follow read-ahead, connections double,
each within its ceiling, read-ahead also within ``memory_bytes`` of fetched shards
(``(shuffle_window + read-ahead) × the mean shard``, the loader's bound). It never steps down:
a stall that comes back after a burst would cost more than the memory kept. It changes how
much is fetched ahead, never what or in which order, so batches and resume stay exact.

Pure logic (no threads, no clock of its own): tests drive it with made-up windows.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Totals:
    """Running totals the loader reports (seconds since the loader's metrics started)."""

    elapsed_s: float
    batches: int
    stall_s: float
    decode_busy_s: float
    decode_wait_in_s: float


@dataclass(frozen=True)
class Setting:
    readahead_shards: int
    fetch_workers: int
    connections: int


@dataclass(frozen=True)
class Change:
    at_s: float
    stall_fraction: float
    storage_share: float
    before: Setting
    after: Setting


@dataclass
class ReadAheadTuner:
    setting: Setting
    shard_bytes: float
    """Mean bytes of one shard."""
    shuffle_window: int
    memory_bytes: float
    """Cap on fetched shards held: (shuffle_window + read-ahead) × shard_bytes."""
    max_fetch_workers: int = 16
    max_connections: int = 32
    stall_above: float = 0.05
    storage_share_above: float = 0.25
    window_s: float = 2.0
    window_batches: int = 4
    changes: list[Change] = field(default_factory=list)
    _last: Totals | None = None

    @property
    def max_readahead(self) -> int:
        return max(0, int(self.memory_bytes // max(1.0, self.shard_bytes)) - self.shuffle_window)

    def observe(self, totals: Totals) -> Change | None:
        """Take the loader's totals; return the change made, if this closed a window and
        called for one."""
        if self._last is None or totals.elapsed_s < self._last.elapsed_s:
            self._last = totals  # first call, or the metrics were reset
            return None
        last = self._last
        elapsed = totals.elapsed_s - last.elapsed_s
        if elapsed < self.window_s or totals.batches - last.batches < self.window_batches:
            return None
        self._last = totals
        stall_fraction = (totals.stall_s - last.stall_s) / elapsed
        waiting = totals.decode_wait_in_s - last.decode_wait_in_s
        working = totals.decode_busy_s - last.decode_busy_s
        storage_share = waiting / max(1e-9, waiting + working)
        if stall_fraction <= self.stall_above or storage_share <= self.storage_share_above:
            return None
        after = self.step_up(self.setting)
        if after == self.setting:
            return None
        change = Change(totals.elapsed_s, stall_fraction, storage_share, self.setting, after)
        self.setting = after
        self.changes.append(change)
        log.info(
            "autotune: stalled %.0f%% of %.1f s, decode waited on shards %.0f%% of its time: "
            "read-ahead %d → %d shards, fetch workers %d → %d, connections %d → %d",
            100 * stall_fraction, elapsed, 100 * storage_share,
            change.before.readahead_shards, after.readahead_shards,
            change.before.fetch_workers, after.fetch_workers,
            change.before.connections, after.connections,
        )  # fmt: skip
        return change

    def step_up(self, setting: Setting) -> Setting:
        readahead = min(self.max_readahead, max(1, 2 * setting.readahead_shards))
        readahead = max(readahead, setting.readahead_shards)
        fetch_workers = min(self.max_fetch_workers, max(setting.fetch_workers, readahead))
        connections = min(self.max_connections, 2 * setting.connections)
        connections = max(connections, setting.connections)
        return Setting(readahead, fetch_workers, connections)

    def report(self) -> dict[str, object]:
        return {
            **dataclasses.asdict(self.setting),
            "changes": [
                {
                    "at_s": round(c.at_s, 3),
                    "stall_fraction": round(c.stall_fraction, 4),
                    "storage_share": round(c.storage_share, 4),
                    "before": dataclasses.asdict(c.before),
                    "after": dataclasses.asdict(c.after),
                }
                for c in self.changes
            ],
        }


class Gate:
    """A semaphore whose size can change: at most ``limit`` holders at once."""

    def __init__(self, limit: int) -> None:
        import threading

        self._condition = threading.Condition()
        self._limit = limit
        self._held = 0

    def set_limit(self, limit: int) -> None:
        with self._condition:
            self._limit = limit
            self._condition.notify_all()

    def __enter__(self) -> None:
        with self._condition:
            self._condition.wait_for(lambda: self._held < self._limit)
            self._held += 1

    def __exit__(self, *_: object) -> None:
        with self._condition:
            self._held -= 1
            self._condition.notify()
