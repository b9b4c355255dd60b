"""A deterministic model of the loader's throughput, for testing the search (and for seeing
what a knob should do before measuring it).

    fetch   requests in flight = min(connections, shards in flight × ranges per shard), each
            taking first-byte latency + range / per-connection bandwidth; shards in flight =
            min(fetch_workers, readahead_shards + 1)
    decode  decode workers on the cores the fetch path leaves free (parsing and checksums
            cost CPU per MB delivered), losing a little per worker beyond the cores; DALI
            decodes a little faster per core
    batch   fewer prefetched batches expose more of the stages' jitter

The throughput is the slower of fetch and decode — or, without read-ahead, the two one after
the other (a shard is fetched only when decoding needs it) — times the batch factor; the
bottleneck is the slower stage. Memory is ``space.memory_estimate``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from dataflow.tuning.search import Measurement
from dataflow.tuning.space import Workload, memory_estimate


@dataclass(frozen=True)
class SimulatedPipeline:
    cores: int = 2
    latency_s: float = 0.03
    connection_bps: float = 90e6
    sample_bytes: float = 33e3
    shard_bytes: float = 64e6
    batch_bytes: float = 64 * 224 * 224 * 3
    decode_per_core: float = 600.0
    dali_speedup: float = 1.2
    fetch_core_s_per_mb: float = 0.002
    oversubscription_loss: float = 0.04
    jitter: float = 0.15
    seconds_per_trial: float = 5.0

    def rates(self, values: dict[str, Any]) -> dict[str, float]:
        """Samples/s each stage could sustain."""
        range_size = values.get("storage.range_size", 8 << 20)
        connections = values.get("storage.connections", 8)
        shards = min(values["data.fetch_workers"], values["data.readahead_shards"] + 1)
        in_flight = min(connections, shards * math.ceil(self.shard_bytes / range_size))
        fetch_bps = in_flight * range_size / (self.latency_s + range_size / self.connection_bps)
        fetch = fetch_bps / self.sample_bytes
        workers = values["data.decode_workers"]
        loss = self.oversubscription_loss * max(0, workers - self.cores)
        speed = self.dali_speedup if values.get("data.decode_backend") == "dali" else 1.0
        per_core = self.decode_per_core * speed * max(0.1, 1 - loss)
        # Fetching costs CPU for what is delivered (the queues are bounded): at rate r the
        # fetch path takes r·k cores, so decoding on what is left sustains c·d / (1 + k·d).
        k = self.sample_bytes / 1e6 * self.fetch_core_s_per_mb
        decode = min(workers, self.cores) * per_core / (1 + k * per_core)
        return {"fetch": fetch, "decode": decode}

    def measure(self, values: dict[str, Any]) -> Measurement:
        rates = self.rates(values)
        bottleneck = min(rates, key=lambda name: rates[name])
        rate = rates[bottleneck]
        if values["data.readahead_shards"] == 0:
            rate = 1 / (1 / rates["fetch"] + 1 / rates["decode"])
        smoothing = 1 - self.jitter / values.get("data.prefetch_batches", 4)
        workload = Workload(shard_bytes=self.shard_bytes, batch_bytes=self.batch_bytes)
        return Measurement(rate=rate * smoothing, bottleneck=bottleneck,
                           memory=memory_estimate(values, workload),
                           seconds=self.seconds_per_trial)  # fmt: skip
