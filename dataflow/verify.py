"""Check every shard of a dataset against its index; name each bad shard and sample.

Per shard: the file exists and has the indexed size and xxh64; the sample table matches its
own size and checksum; the shard's structure agrees with the table (tar: every member
header re-parsed, keys, data offsets and sizes compared; Parquet: footer, row count, keys
and row-group byte ranges); each sample's span (tar) or row group (Parquet) matches its
digest — so a changed byte is pinned to the sample that holds it. With ``decode`` every
field of every sample is decoded (images fully). Shards are checked by a few threads: the
work is mostly reading and hashing, which release the GIL.
"""

from __future__ import annotations

import concurrent.futures
import io
from collections.abc import Iterator
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from dataflow import storage
from dataflow.errors import DataError
from dataflow.formats import codec
from dataflow.formats.parquet import decode_column_value, read_keys, row_group_ranges
from dataflow.formats.tar import iter_members, iter_samples
from dataflow.index import DatasetIndex, SampleTable, ShardEntry, checksum, load_table
from dataflow.index import sample_digest as digest_of
from dataflow.storage import StorageConfig


@dataclass(frozen=True)
class Problem:
    shard: str
    message: str
    key: str | None = None
    offset: int | None = None

    def __str__(self) -> str:
        where = self.shard
        if self.key is not None:
            where += f" sample {self.key!r}"
        if self.offset is not None:
            where += f" at byte {self.offset}"
        return f"{where}: {self.message}"


@dataclass
class VerifyReport:
    shards: int = 0
    samples: int = 0
    bytes: int = 0
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_dataset(
    root: str,
    storage_config: StorageConfig | None = None,
    *,
    decode: bool = False,
    threads: int = 4,
    progress: bool = True,
    allow_pickle: bool = False,
) -> VerifyReport:
    storage_config = storage_config or StorageConfig()
    root = storage.normalize_url(root)
    index = DatasetIndex.load(root, config=storage_config)
    report = VerifyReport()
    with (
        concurrent.futures.ThreadPoolExecutor(threads) as pool,
        tqdm(
            total=index.total_bytes, unit="B", unit_scale=True, desc="verify", disable=not progress
        ) as bar,
    ):
        futures = [
            pool.submit(
                lambda s: list(_check_shard(root, index, s, storage_config, decode, allow_pickle)),
                shard,
            )
            for shard in index.shards
        ]
        for shard, future in zip(index.shards, futures, strict=True):
            report.problems.extend(future.result())
            report.shards += 1
            report.samples += shard.samples
            report.bytes += shard.bytes
            bar.update(shard.bytes)
    return report


def _check_shard(
    root: str,
    index: DatasetIndex,
    shard: ShardEntry,
    config: StorageConfig,
    decode: bool,
    allow_pickle: bool,
) -> Iterator[Problem]:
    url = storage.join_url(root, shard.path)
    try:
        data = storage.read_bytes(url, config=config)
    except storage.StorageError as error:
        yield Problem(shard.path, f"cannot be read: {error}")
        return
    intact = len(data) == shard.bytes and checksum(data) == shard.checksum
    if len(data) != shard.bytes:
        yield Problem(shard.path, f"has {len(data)} bytes, the index says {shard.bytes}")
    elif not intact:
        yield Problem(shard.path, "checksum differs from the index")
    try:
        table = load_table(root, index, shard, config=config)
    except (DataError, storage.StorageError) as error:
        yield Problem(shard.table, str(error))
        return
    if index.format == "tar":
        yield from _check_tar(shard, table, data, index, decode, allow_pickle)
    else:
        yield from _check_parquet(shard, table, data, index, decode and intact, intact)


def _check_tar(
    shard: ShardEntry,
    table: SampleTable,
    data: bytes,
    index: DatasetIndex,
    decode: bool,
    allow_pickle: bool,
) -> Iterator[Problem]:
    view = memoryview(data)
    for row, key in enumerate(table.keys):
        start, size = int(table.offsets[row]), int(table.sizes[row])
        if start + size > len(data):
            yield Problem(shard.path, "sample runs past the end of the shard", key, start)
            continue
        if table.digests[row] and digest_of(view[start : start + size]) != int(table.digests[row]):
            yield Problem(shard.path, "sample bytes differ from the index", key, start)
    try:
        scanned = list(
            iter_samples(
                iter_members(io.BytesIO(data), shard=shard.path, total_size=len(data)),
                shard=shard.path,
            )
        )
    except DataError as error:
        yield Problem(shard.path, error.reason, error.key, error.offset)
        return
    if len(scanned) != len(table):
        yield Problem(shard.path, f"holds {len(scanned)} samples, the index says {len(table)}")
    names = [f.name for f in index.fields]
    for row, sample in enumerate(scanned[: len(table)]):
        if sample.key != table.keys[row]:
            yield Problem(
                shard.path, f"key differs from the index ({table.keys[row]!r})", sample.key,
                sample.start,
            )  # fmt: skip
            continue
        for member in sample.members:
            extension = member.name[len(sample.key) + 1 :]
            column = names.index(extension) if extension in names else -1
            if column < 0 or table.field_span(row, column) != (member.data_offset, member.size):
                yield Problem(
                    shard.path, f"member {member.name!r} does not match the index", sample.key,
                    member.header_offset,
                )  # fmt: skip
    if decode:
        for row, key in enumerate(table.keys):
            for column, field_spec in enumerate(index.fields):
                span = table.field_span(row, column)
                if span is None:
                    continue
                payload = view[span[0] : span[0] + span[1]]
                try:
                    if field_spec.kind == "image":
                        codec.decode_image(payload)
                    else:
                        codec.decode(field_spec.kind, payload, allow_pickle=allow_pickle)
                except (ValueError, UnicodeDecodeError) as error:
                    yield Problem(shard.path, f"field {field_spec.name!r}: {error}", key, span[0])


def _check_parquet(
    shard: ShardEntry, table: SampleTable, data: bytes, index: DatasetIndex, decode: bool,
    intact: bool,
) -> Iterator[Problem]:  # fmt: skip
    view = memoryview(data)
    for group, (first, rows, offset, size) in enumerate(table.row_groups.tolist()):
        if offset + size > len(data):
            yield Problem(shard.path, f"row group {group} runs past the end", offset=offset)
        elif digest_of(view[offset : offset + size]) != int(table.row_group_digests[group]):
            yield Problem(
                shard.path, f"row group {group} (rows {first}-{first + rows - 1}) differs",
                table.keys[first] if first < len(table) else None, offset,
            )  # fmt: skip
    if not intact:
        # Its row groups are checked above from their digests. Its footer is not parsed:
        # pyarrow 26 aborts the process (std::terminate) on some damaged column metadata,
        # e.g. "Definition level histogram size mismatch" (found by tools/fuzz_shards.py).
        return
    try:
        parquet = pq.ParquetFile(pa.BufferReader(data))
        keys = read_keys(parquet, shard=shard.path)
    except (pa.ArrowException, OSError, DataError) as error:
        yield Problem(shard.path, f"unreadable Parquet: {error}")
        return
    if keys != table.keys:
        yield Problem(shard.path, f"keys differ from the index ({len(keys)} vs {len(table)})")
    if row_group_ranges(parquet.metadata).tolist() != table.row_groups.tolist():
        yield Problem(shard.path, "row groups differ from the index")
    if decode:
        for group in range(parquet.metadata.num_row_groups):
            try:
                rows = parquet.read_row_group(group).to_pylist()
            except (pa.ArrowException, OSError) as error:
                yield Problem(shard.path, f"row group {group} cannot be decoded: {error}")
                continue
            for row in rows:
                for field_spec in index.fields:
                    try:
                        value = decode_column_value(field_spec.kind, row[field_spec.name])
                        if field_spec.kind == "image" and value is not None:
                            codec.decode_image(value)
                    except (ValueError, KeyError) as error:
                        yield Problem(shard.path, f"field {field_spec.name!r}: {error}",
                                      row.get("__key__"))  # fmt: skip
