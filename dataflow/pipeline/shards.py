"""Fetching one shard for the loader: read (through the cache), verify, re-fetch, index.

A shard is read whole — one object split into ``range_size`` GETs over ``connections`` on
S3, ``block_size`` reads on POSIX — and checked against its xxh64 from the index. On a
mismatch it is read again, bypassing the cache (a flipped bit in transit or in a cached
file heals here). If it still differs, each sample's span is checked against its own digest;
a bad sample is re-fetched by byte range, and only samples still bad after that are marked
bad, with the reason — the rest of the shard stays usable. What is read and allocated is
never more than storage holds (a stat per local shard; a HEAD when the index claims more than
the sample table lists), so a forged size in index.json costs nothing. A shard or table that
fails its checks first has index.json read again: when the dataset was replaced under the
running job, that is the error (``DatasetChangedError``), not a skip per sample.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Final

import pyarrow as pa
import pyarrow.parquet as pq

from dataflow import storage
from dataflow.errors import BadShardError, DatasetChangedError, DatasetIndexError
from dataflow.index import (
    INDEX_FILE,
    DatasetIndex,
    SampleTable,
    ShardEntry,
    checksum,
    load_table,
    sample_digest,
)
from dataflow.metrics import StageMetrics
from dataflow.pipeline.buffers import BufferPool
from dataflow.storage import StorageConfig
from dataflow.storage.cache import ShardCache

log = logging.getLogger(__name__)

UNLISTED_BYTES: Final = 16 << 20
"""What a shard may hold beyond the spans its sample table lists (a tar's end-of-archive
blocks, a Parquet footer) before its size in the index is checked with storage first."""


def _table_end(table: SampleTable) -> int:
    """Where the last sample (tar) or row group (Parquet) that the table lists ends."""
    ends = [0]
    if len(table.offsets):
        ends.append(int((table.offsets + table.sizes).max()))
    if len(table.row_groups):
        ends.append(int((table.row_groups[:, 2] + table.row_groups[:, 3]).max()))
    return max(ends)


@dataclass
class ShardView:
    """One fetched shard: its bytes, its sample table, and the samples found bad."""

    number: int
    entry: ShardEntry
    data: bytes | bytearray | memoryview
    """The shard's bytes; local shards come in pooled memory (``ShardFetcher``)."""
    table: SampleTable
    bad: dict[int, str] = field(default_factory=dict)
    """Row → reason, for samples that failed their checks (or all rows of a lost shard)."""
    _rows: list[dict[str, object]] | None = None
    _rows_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def member(self, row: int, column: int) -> memoryview | None:
        """The bytes of one field of one sample (tar), or None if the sample lacks it."""
        span = self.table.field_span(row, column)
        if span is None:
            return None
        return memoryview(self.data)[span[0] : span[0] + span[1]]

    def parquet_row(self, row: int) -> dict[str, object]:
        """One row of a Parquet shard (the table is decoded once, on first use)."""
        with self._rows_lock:  # decode threads share a view: decode the table once, not per thread
            if self._rows is None:
                self._rows = pq.read_table(pa.BufferReader(bytes(self.data))).to_pylist()
        return self._rows[row]


class ShardFetcher:
    def __init__(
        self,
        root: str,
        index: DatasetIndex,
        config: StorageConfig,
        *,
        cache: ShardCache | None,
        metrics: StageMetrics,
        skip_bad: bool,
    ) -> None:
        self.root = root
        self.index = index
        self.config = config
        self.cache = cache
        self.metrics = metrics
        self.skip_bad = skip_bad
        self._tables: dict[int, SampleTable] = {}
        self.refetched = 0
        # Local shards are read into reused memory: a fresh ~9 MB block per shard cost a page
        # fault and a zeroed page every 4 KB, 5 % of the loader's CPU. A buffer is free again
        # once nothing (no ShardView, no sample memoryview) refers to it.
        self._buffers = BufferPool()
        self._reserve = self._largest_shard_bytes()

    def _largest_shard_bytes(self) -> int:
        """The pool's buffer size: the largest local shard, as the file system reports it
        (one stat). index.json alone is not trusted with memory: a forged ``bytes = 1e12``
        reserved 1 TB for every shard. When the two disagree, buffers fit each shard."""
        if not self.index.shards or not storage.is_local(self.root):
            return 0
        largest = max(self.index.shards, key=lambda shard: shard.bytes)
        try:
            actual = storage.size(storage.join_url(self.root, largest.path), config=self.config)
        except storage.StorageError:
            return 0
        return largest.bytes if actual == largest.bytes else 0

    def table(self, number: int) -> SampleTable:
        table = self._tables.get(number)
        if table is None:
            try:
                table = load_table(
                    self.root, self.index, self.index.shards[number], config=self.config
                )
            except DatasetIndexError:
                self.check_index_unchanged()  # a replaced dataset says so, not "corrupt"
                raise
            self._tables[number] = table
        return table

    def check_index_unchanged(self) -> None:
        """Raise DatasetChangedError if index.json now differs from the one this loader
        started with (one read of it). Shards that fail their checks, or a new epoch, ask:
        skipping a replaced dataset's samples one by one would train on nothing."""
        url = storage.join_url(self.root, INDEX_FILE)
        try:
            current: DatasetIndex | None = DatasetIndex.load(self.root, config=self.config)
        except DatasetIndexError:
            current = None  # gone, or half-written: a conversion is replacing it
        except storage.StorageError as error:
            log.warning("could not re-read %s to see whether it changed: %s",
                        storage.redact(url), error)  # fmt: skip
            return
        if current != self.index:
            state = "is gone or unreadable" if current is None else "changed"
            raise DatasetChangedError(
                f"{storage.redact(url)} {state} while this job was reading the dataset "
                "(replaced with --overwrite?)",
                hint="restart the job once the dataset is complete; its order and resume "
                "state belong to the dataset it started with",
            )

    def _size_to_read(self, url: str, entry: ShardEntry, table: SampleTable) -> int:
        """The shard's size in the index, unless storage holds less. index.json alone is not
        trusted with memory or requests: a forged ``bytes = 1e12`` was a MemoryError for a
        local shard and ~119,000 ranged GETs answered 416 on S3. Local files are sized by a
        stat; objects by a HEAD only when the index claims more than the table accounts for."""
        if storage.is_local(url) or entry.bytes > _table_end(table) + UNLISTED_BYTES:
            return min(entry.bytes, storage.size(url, config=self.config))
        return entry.bytes

    def _read(self, url: str, size: int, *, use_cache: bool) -> bytes | memoryview:
        def fetch() -> bytes:
            return storage.read_range(url, 0, size, config=self.config)

        if storage.is_local(url):
            data = self._buffers.array((size,), reserve=self._reserve)
            storage.read_into(url, 0, data, config=self.config)
            return data.data  # a memoryview that keeps the pooled array in use
        if self.cache is not None and use_cache:
            return self.cache.get(url, fetch)
        return fetch()

    def fetch(self, number: int) -> ShardView:
        entry = self.index.shards[number]
        url = storage.join_url(self.root, entry.path)
        with self.metrics.busy(items=1, nbytes=entry.bytes):
            table = self.table(number)
            try:
                # A shard of another size than the index's fails its checksum below and takes
                # the damaged-shard path.
                size = self._size_to_read(url, entry, table)
                data: bytes | memoryview = self._read(url, size, use_cache=True)
            except storage.StorageError as error:
                self.check_index_unchanged()
                return self._lost(number, entry, table, f"unreadable: {error}")
            if len(data) == entry.bytes and checksum(data) == entry.checksum:
                return ShardView(number, entry, data, table)
            self.check_index_unchanged()
            log.warning("shard %s does not match its checksum; reading it again", entry.path)
            self.refetched += 1
            if self.cache is not None:
                storage.remove(self.cache.path(url))
            try:
                data = self._read(url, size, use_cache=False)
            except storage.StorageError as error:
                return self._lost(number, entry, table, f"unreadable: {error}")
            if len(data) == entry.bytes and checksum(data) == entry.checksum:
                return ShardView(number, entry, data, table)
            return self._check_samples(number, entry, url, bytearray(data), table)

    def _lost(self, number: int, entry: ShardEntry, table: SampleTable, reason: str) -> ShardView:
        if not self.skip_bad:
            raise BadShardError(reason, shard=entry.path, hint="or set data.on_bad_sample = 'skip'")
        log.error("shard %s lost (%s); its %d samples are skipped", entry.path, reason,
                  entry.samples)  # fmt: skip
        return ShardView(number, entry, b"", table, bad={row: reason for row in range(len(table))})

    def _check_samples(
        self, number: int, entry: ShardEntry, url: str, data: bytearray, table: SampleTable
    ) -> ShardView:
        """Find the samples of a damaged shard that are still good; re-fetch the others."""
        if self.index.format != "tar":
            return self._lost(number, entry, table, "checksum mismatch (Parquet: whole shard)")
        bad: dict[int, str] = {}
        for row in range(len(table)):
            start, size = int(table.offsets[row]), int(table.sizes[row])
            if start + size > len(data):
                # Past the end of what storage holds (a truncated file, or a forged table or
                # index): nothing to re-read, and nothing allocated by the table's numbers.
                bad[row] = f"the shard ends at byte {len(data)}, before this sample's end"
                continue
            span = memoryview(data)[start : start + size]
            if sample_digest(span) == int(table.digests[row]):
                continue
            self.refetched += 1
            try:
                fresh = storage.read_range(url, start, start + size, config=self.config)
            except storage.StorageError as error:
                bad[row] = f"unreadable sample: {error}"
                continue
            if sample_digest(fresh) == int(table.digests[row]):
                data[start : start + size] = fresh
            else:
                bad[row] = f"sample bytes differ from the index at byte {start}"
        return ShardView(number, entry, data, table, bad=bad)
