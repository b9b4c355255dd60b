"""Per-stage pipeline metrics: throughput, busy time, blocked time, queue depth, stall.

Each stage counts items and bytes it produced, the seconds its workers spent working
(``busy``), waiting for input (``wait_in``) and waiting for room downstream (``wait_out``).
The consumer's wait for the next batch is the trainer-facing ``stall``. The bottleneck is
the stage whose workers are busiest (busy seconds ÷ (elapsed × workers)); when the stall is
small, the consumer itself (the training step) is the bottleneck and the data path keeps up.
Counters are plain floats guarded by one lock per stage: ~1 µs per update, called per batch
or per shard, never per byte.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any


class StageMetrics:
    def __init__(self, name: str, workers: int, queue_depth: Callable[[], int] | None = None):
        self.name = name
        self.workers = workers
        self._queue_depth = queue_depth
        self._lock = threading.Lock()
        self.items = 0
        self.bytes = 0
        self.busy_s = 0.0
        self.wait_in_s = 0.0
        self.wait_out_s = 0.0

    def add(self, *, items: int = 0, nbytes: int = 0, busy_s: float = 0.0) -> None:
        with self._lock:
            self.items += items
            self.bytes += nbytes
            self.busy_s += busy_s

    def add_wait(self, *, wait_in_s: float = 0.0, wait_out_s: float = 0.0) -> None:
        with self._lock:
            self.wait_in_s += wait_in_s
            self.wait_out_s += wait_out_s

    @contextmanager
    def busy(self, *, items: int = 0, nbytes: int = 0) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.add(items=items, nbytes=nbytes, busy_s=time.perf_counter() - started)

    def snapshot(self, elapsed: float) -> dict[str, Any]:
        with self._lock:
            utilisation = self.busy_s / max(1e-9, elapsed * self.workers)
            return {
                "items": self.items,
                "bytes": self.bytes,
                "items_per_s": self.items / max(1e-9, elapsed),
                "mb_per_s": self.bytes / 1e6 / max(1e-9, elapsed),
                "busy_s": round(self.busy_s, 4),
                "wait_in_s": round(self.wait_in_s, 4),
                "wait_out_s": round(self.wait_out_s, 4),
                "workers": self.workers,
                "utilisation": round(min(1.0, utilisation), 4),
                "queue_depth": self._queue_depth() if self._queue_depth else None,
            }


class PipelineMetrics:
    """The stages of one loader plus the consumer's stall."""

    def __init__(self) -> None:
        self.stages: dict[str, StageMetrics] = {}
        self.started = time.perf_counter()
        self._lock = threading.Lock()
        self.stall_s = 0.0
        self.batches = 0
        self.samples = 0
        self.skipped = 0
        self.refetched = 0
        self.hooks: list[Callable[[dict[str, Any]], None]] = []
        """Called with each snapshot (e.g. a TensorBoard or Prometheus exporter)."""

    def stage(
        self, name: str, workers: int, queue_depth: Callable[[], int] | None = None
    ) -> StageMetrics:
        stage = StageMetrics(name, workers, queue_depth)
        self.stages[name] = stage
        return stage

    def consumed(self, *, samples: int, stall_s: float) -> None:
        with self._lock:
            self.batches += 1
            self.samples += samples
            self.stall_s += stall_s

    def count(self, *, skipped: int = 0, refetched: int = 0) -> None:
        with self._lock:
            self.skipped += skipped
            self.refetched += refetched

    def reset(self) -> None:
        for stage in self.stages.values():
            with stage._lock:
                stage.items = stage.bytes = 0
                stage.busy_s = stage.wait_in_s = stage.wait_out_s = 0.0
        with self._lock:
            self.stall_s, self.batches, self.samples = 0.0, 0, 0
        self.started = time.perf_counter()

    def snapshot(self) -> dict[str, Any]:
        elapsed = time.perf_counter() - self.started
        stages = {name: stage.snapshot(elapsed) for name, stage in self.stages.items()}
        with self._lock:
            stall_fraction = self.stall_s / max(1e-9, elapsed)
            result: dict[str, Any] = {
                "elapsed_s": round(elapsed, 4),
                "batches": self.batches,
                "samples": self.samples,
                "samples_per_s": self.samples / max(1e-9, elapsed),
                "stall_s": round(self.stall_s, 4),
                "stall_fraction": round(stall_fraction, 4),
                "skipped": self.skipped,
                "refetched": self.refetched,
                "stages": stages,
            }
        busiest = max(stages, key=lambda n: stages[n]["utilisation"], default=None)
        if stall_fraction < 0.05 or busiest is None:
            result["bottleneck"] = "consumer (the data path keeps up)"
        else:
            result["bottleneck"] = busiest
        for hook in self.hooks:
            hook(result)
        return result

    @staticmethod
    def summary(snapshot: dict[str, Any]) -> str:
        lines = [
            f"{'stage':<10}{'items/s':>10}{'MB/s':>9}{'busy':>8}{'wait in':>9}"
            f"{'wait out':>10}{'queue':>7}"
        ]
        for name, stage in snapshot["stages"].items():
            depth = "" if stage["queue_depth"] is None else str(stage["queue_depth"])
            lines.append(
                f"{name:<10}{stage['items_per_s']:>10.1f}{stage['mb_per_s']:>9.1f}"
                f"{stage['utilisation']:>8.0%}{stage['wait_in_s']:>8.2f}s"
                f"{stage['wait_out_s']:>9.2f}s{depth:>7}"
            )
        lines.append(
            f"consumer: {snapshot['samples_per_s']:.1f} samples/s, stall "
            f"{snapshot['stall_s']:.2f} s ({snapshot['stall_fraction']:.0%}); "
            f"bottleneck: {snapshot['bottleneck']}"
        )
        return "\n".join(lines)
