"""The dataset index: ``index.json`` at the dataset root plus one sample table per shard.

``index.json`` (versioned, human-readable, written last and atomically) lists the format, the
fields and their kinds, the total sample count, conversion skips, metadata (class names and
counts for image folders) and, per shard: relative path, byte size, sample count, xxh64
checksum and the sample table file with its own size and checksum.

A *sample table* (``<shard>.samples.npz``, NumPy arrays, loaded with ``allow_pickle=False``)
holds per sample: key, byte offset and size of the sample's span in the shard, an xxh64 of
that span, and per field the data offset and size of its tar member (-1 when absent). For
Parquet shards it holds the row groups instead (first row, rows, byte offset, byte size,
xxh64). So a sample can be fetched by one ranged read and checked on its own, and DALI's
``readers.webdataset`` index files derive from it without scanning a tar. Cost: ~40 bytes
per sample plus its key, about 0.1% of a shard of 33 KB JPEGs.

Neither file is trusted with memory: index.json's shape and types are checked before use,
its sample counts against the shard sizes (``check_counts``, before a reader allocates by
them), and a table's zip and array headers before ``np.load`` inflates or allocates anything.
"""

from __future__ import annotations

import functools
import io
import json
import math
import sys
import typing
import zipfile
from dataclasses import asdict, dataclass, field
from typing import Any, Final, TypeGuard

import numpy as np
import xxhash

from dataflow import storage
from dataflow.errors import DatasetIndexError
from dataflow.formats.codec import KINDS, NUMPY_LOAD_LOCK
from dataflow.storage import StorageConfig

INDEX_FILE: Final = "index.json"
FORMAT_VERSION: Final = 1
SHARD_FORMATS: Final = ("tar", "parquet")
TABLE_SUFFIX: Final = ".samples.npz"
TAR_HEADER_BYTES: Final = 512
"""Each tar sample has at least one member, and each member a header of this many bytes."""
MAX_SHARD_SAMPLES: Final = 1 << 24
"""The most samples a reader accepts in one shard. The epoch order holds 8 bytes per sample
of ``shuffle_window`` shards and the loader a shard's table (~40 bytes per sample), so a
forged ``samples = 2e9`` would cost 15 GiB before a byte of the shard was read; real shards
hold far fewer (256 MB of 16-byte rows is this many)."""


def checksum(data: bytes | bytearray | memoryview) -> str:
    """'xxh64:<hex>' of ``data`` (xxh64 runs at ~10 GB/s, far above any storage here)."""
    return "xxh64:" + xxhash.xxh64(data).hexdigest()


def sample_digest(data: bytes | bytearray | memoryview) -> int:
    return int(xxhash.xxh64_intdigest(data))


@dataclass(kw_only=True, frozen=True)
class Field:
    name: str
    """Member extension in tars (``jpg``, ``cls``) or column name in Parquet."""
    kind: str
    """How values are stored; one of dataflow.formats.codec.KINDS."""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"field {self.name!r}: unknown kind {self.kind!r}; known: {KINDS}")
        if not self.name or "/" in self.name or self.name.startswith("__"):
            raise ValueError(f"bad field name {self.name!r}: no '/', not empty, no '__' prefix")


@dataclass(kw_only=True)
class ShardEntry:
    path: str
    """Shard path relative to the dataset root."""
    bytes: int
    samples: int
    checksum: str
    table: str
    """Sample table path relative to the dataset root."""
    table_bytes: int
    table_checksum: str


@dataclass(kw_only=True)
class DatasetIndex:
    format: str
    fields: list[Field]
    shards: list[ShardEntry]
    metadata: dict[str, Any] = field(default_factory=dict)
    skipped: list[dict[str, str]] = field(default_factory=list)
    """Conversion inputs left out by the skip policy: {"source": ..., "reason": ...}."""
    version: int = FORMAT_VERSION

    @property
    def num_samples(self) -> int:
        return sum(shard.samples for shard in self.shards)

    @property
    def total_bytes(self) -> int:
        return sum(shard.bytes for shard in self.shards)

    def check_counts(self, where: str = INDEX_FILE) -> None:
        """Sample counts against the shard sizes and MAX_SHARD_SAMPLES, for a reader to call
        before it allocates by them: index.json alone cannot be trusted with memory."""
        for number, shard in enumerate(self.shards):
            if shard.samples > MAX_SHARD_SAMPLES:
                raise DatasetIndexError(
                    f"{where}: shards[{number}].samples = {shard.samples} is more than the "
                    f"{MAX_SHARD_SAMPLES} samples a shard may hold",
                    shard=shard.path,
                    hint="re-convert with a lower --max-shard-samples, or restore index.json",
                )
            if self.format == "tar" and shard.samples * TAR_HEADER_BYTES > shard.bytes:
                raise DatasetIndexError(
                    f"{where}: shards[{number}] cannot hold {shard.samples} samples in "
                    f"{shard.bytes} bytes (each needs a {TAR_HEADER_BYTES}-byte tar header)",
                    shard=shard.path,
                    hint="restore index.json, or index the tars again with tools/convert.py "
                    "--index-only",
                )

    def field(self, name: str) -> Field:
        for candidate in self.fields:
            if candidate.name == name:
                return candidate
        raise KeyError(f"no field {name!r}; fields: {[f.name for f in self.fields]}")

    def to_json(self) -> str:
        document = {
            "version": self.version,
            "format": self.format,
            "num_samples": self.num_samples,
            "num_shards": len(self.shards),
            "total_bytes": self.total_bytes,
            "fields": [asdict(f) for f in self.fields],
            "metadata": self.metadata,
            "skipped": self.skipped,
            "shards": [asdict(s) for s in self.shards],
        }
        return json.dumps(document, indent=1, ensure_ascii=False) + "\n"

    @classmethod
    def from_json(cls, text: str | bytes, where: str = INDEX_FILE) -> DatasetIndex:
        try:
            document = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise DatasetIndexError(f"{where} is not valid JSON: {error}") from None
        except RecursionError:  # json recurses per nesting level; no index nests deeply
            raise DatasetIndexError(
                f"{where} is not valid JSON for an index: it nests deeper than "
                f"{sys.getrecursionlimit()} levels"
            ) from None
        if not isinstance(document, dict):
            raise DatasetIndexError(f"{where} must hold a JSON object")
        version = document.get("version")
        if not _is_int(version) or version > FORMAT_VERSION or version < 1:
            raise DatasetIndexError(
                f"{where} has index version {version!r}; this shardflow reads up to "
                f"{FORMAT_VERSION}",
                hint="upgrade shardflow, or re-convert the dataset",
            )
        _check_document(document, where)
        try:
            index = cls(
                version=version,
                format=document["format"],
                fields=[Field(**f) for f in document["fields"]],
                shards=[ShardEntry(**s) for s in document["shards"]],
                metadata=dict(document.get("metadata", {})),
                skipped=list(document.get("skipped", [])),
            )
        except (KeyError, TypeError, ValueError) as error:
            raise DatasetIndexError(f"{where} is malformed: {error!r}") from None
        if index.format not in SHARD_FORMATS:
            raise DatasetIndexError(f"{where}: unknown shard format {index.format!r}")
        declared = document.get("num_samples")
        if declared is not None and declared != index.num_samples:
            raise DatasetIndexError(
                f"{where} declares {declared} samples but its shards hold {index.num_samples}"
            )
        for shard in index.shards:
            for path in (shard.path, shard.table):
                if path.startswith("/") or ".." in path.split("/") or "://" in path:
                    raise DatasetIndexError(f"{where}: shard path {path!r} leaves the dataset")
            if shard.bytes < 0 or shard.samples < 0 or shard.table_bytes < 0:
                raise DatasetIndexError(f"{where}: negative size in shard {shard.path}")
        return index

    def save(self, root: str, *, config: StorageConfig | None = None) -> None:
        """Write ``root/index.json`` atomically."""
        storage.write_bytes(
            storage.join_url(root, INDEX_FILE), self.to_json().encode(), config=config
        )

    @classmethod
    def load(cls, root: str, *, config: StorageConfig | None = None) -> DatasetIndex:
        url = storage.join_url(root, INDEX_FILE)
        try:
            text = storage.read_bytes(url, config=config)
        except storage.StorageError as error:
            if isinstance(error.last_error, FileNotFoundError):
                raise DatasetIndexError(
                    f"{storage.redact(url)} does not exist",
                    hint="convert the dataset with tools/convert.py, or index existing tars "
                    "with tools/convert.py --index-only",
                ) from None
            raise
        return cls.from_json(text, storage.redact(url))


# ---------------------------------------------------------------------------------------------
# The shape of index.json, checked before anything is built from it: a hand-edited or forged
# file gets one error naming the field (``shards[3].bytes must be an integer, got '7000'``),
# not a TypeError from whatever first compares the value.

_JSON_KINDS: Final = {str: "a string", int: "an integer", list: "a list", dict: "an object"}


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _expect(value: object, kind: type, name: str, where: str) -> None:
    if not (_is_int(value) if kind is int else isinstance(value, kind)):
        shown = repr(value)
        shown = shown if len(shown) <= 60 else shown[:57] + "..."
        raise DatasetIndexError(
            f"{where} is malformed: {name} must be {_JSON_KINDS[kind]}, got {shown}",
            hint="re-convert the dataset, or restore its index.json",
        )


@functools.cache
def _field_kinds(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _expect_entry(value: object, cls: type, name: str, where: str) -> None:
    """``value`` is a JSON object with exactly the fields of dataclass ``cls``, each of its type."""
    _expect(value, dict, name, where)
    assert isinstance(value, dict)
    kinds = _field_kinds(cls)
    for key in value:
        if key not in kinds:
            raise DatasetIndexError(f"{where} is malformed: {name} has an unknown key {key!r}")
    for key, kind in kinds.items():
        if key not in value:
            raise DatasetIndexError(f"{where} is malformed: {name} lacks {key!r}")
        _expect(value[key], kind, f"{name}.{key}", where)


def _check_document(document: dict[str, Any], where: str) -> None:
    for key in ("format", "fields", "shards"):
        if key not in document:
            raise DatasetIndexError(f"{where} is malformed: it lacks {key!r}")
    _expect(document["format"], str, "format", where)
    for name, kind in (("num_samples", int), ("metadata", dict), ("skipped", list)):
        if document.get(name) is not None:
            _expect(document[name], kind, name, where)
    for number, record in enumerate(document.get("skipped") or []):
        _expect(record, dict, f"skipped[{number}]", where)
    for name, cls in (("fields", Field), ("shards", ShardEntry)):
        _expect(document[name], list, name, where)
        for number, entry in enumerate(document[name]):
            _expect_entry(entry, cls, f"{name}[{number}]", where)


@dataclass(kw_only=True)
class SampleTable:
    """Per-sample (tar) or per-row-group (Parquet) byte layout of one shard."""

    keys: list[str]
    offsets: np.ndarray
    """int64 (n,): where each sample's span starts in the shard (tar: its first header)."""
    sizes: np.ndarray
    """int64 (n,): span length in bytes (headers, data and padding of all its members)."""
    digests: np.ndarray
    """uint64 (n,): xxh64 of each span."""
    field_offsets: np.ndarray
    """int64 (n, fields): data offset of each field's member, -1 if the sample lacks it."""
    field_sizes: np.ndarray
    """int64 (n, fields): data size of each field's member, -1 if absent."""
    row_groups: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.int64))
    """int64 (groups, 4), Parquet only: first row, rows, byte offset, byte size."""
    row_group_digests: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint64))

    def __len__(self) -> int:
        return len(self.keys)

    @classmethod
    def empty(cls, num_fields: int) -> SampleTable:
        return cls(
            keys=[],
            offsets=np.zeros(0, np.int64),
            sizes=np.zeros(0, np.int64),
            digests=np.zeros(0, np.uint64),
            field_offsets=np.zeros((0, num_fields), np.int64),
            field_sizes=np.zeros((0, num_fields), np.int64),
        )

    def to_bytes(self) -> bytes:
        encoded = [key.encode("utf-8") for key in self.keys]
        key_ends = np.cumsum([len(k) for k in encoded], dtype=np.int64)
        buffer = io.BytesIO()
        np.savez(
            buffer,
            key_blob=np.frombuffer(b"".join(encoded), dtype=np.uint8),
            key_ends=key_ends,
            offsets=self.offsets.astype(np.int64),
            sizes=self.sizes.astype(np.int64),
            digests=self.digests.astype(np.uint64),
            field_offsets=self.field_offsets.astype(np.int64),
            field_sizes=self.field_sizes.astype(np.int64),
            row_groups=self.row_groups.astype(np.int64),
            row_group_digests=self.row_group_digests.astype(np.uint64),
        )
        return buffer.getvalue()

    @classmethod
    def from_bytes(
        cls, data: bytes, where: str, *, num_fields: int, num_samples: int | None = None
    ) -> SampleTable:
        """Parse and validate a table; every inconsistency is a DatasetIndexError.

        ``num_samples`` (the index's count, when the table must list exactly that many) is
        checked from the arrays' headers, before anything is inflated.
        """
        _check_members(data, where, num_samples)
        try:
            with NUMPY_LOAD_LOCK, np.load(io.BytesIO(data), allow_pickle=False) as arrays:
                loaded = {name: arrays[name] for name in arrays.files}
        except (ValueError, OSError, zipfile.BadZipFile, EOFError, KeyError) as error:
            raise DatasetIndexError(f"sample table {where} is unreadable: {error}") from None
        try:
            blob = loaded["key_blob"].tobytes()
            ends = loaded["key_ends"]
            n = len(ends)
            starts = np.concatenate([[0], ends[:-1]]) if n else ends
            if n and (ends[-1] != len(blob) or np.any(ends < starts)):
                raise ValueError("key offsets do not cover the key blob")
            keys = [blob[s:e].decode("utf-8") for s, e in zip(starts, ends, strict=True)]
            table = cls(
                keys=keys,
                offsets=loaded["offsets"],
                sizes=loaded["sizes"],
                digests=loaded["digests"],
                field_offsets=loaded["field_offsets"],
                field_sizes=loaded["field_sizes"],
                row_groups=loaded["row_groups"],
                row_group_digests=loaded["row_group_digests"],
            )
        except (KeyError, ValueError, TypeError, UnicodeDecodeError) as error:
            raise DatasetIndexError(f"sample table {where} is malformed: {error}") from None
        expected = {
            "offsets": (n,),
            "sizes": (n,),
            "digests": (n,),
            "field_offsets": (n, num_fields),
            "field_sizes": (n, num_fields),
        }
        for name, shape in expected.items():
            actual = getattr(table, name).shape
            if actual != shape and not (n == 0 and getattr(table, name).size == 0):
                raise DatasetIndexError(
                    f"sample table {where}: {name} has shape {actual}, expected {shape}"
                )
        groups = table.row_groups
        if groups.ndim != 2 or (groups.size and groups.shape[1] != 4):
            raise DatasetIndexError(f"sample table {where}: row_groups has shape {groups.shape}")
        if np.any(table.offsets < 0) or np.any(table.sizes < 0):
            raise DatasetIndexError(f"sample table {where}: negative offsets or sizes")
        return table

    def field_span(self, sample: int, field_index: int) -> tuple[int, int] | None:
        """(data offset, size) of one field of one sample, or None if absent."""
        offset = int(self.field_offsets[sample, field_index])
        if offset < 0:
            return None
        return offset, int(self.field_sizes[sample, field_index])


_PER_SAMPLE_ARRAYS: Final = ("key_ends", "offsets", "sizes", "digests", "field_offsets",
                              "field_sizes")  # fmt: skip


def _check_members(data: bytes, where: str, num_samples: int | None) -> None:
    """Sizes and shapes that the table's members declare, checked before np.load acts on them.

    np.savez stores members uncompressed, so no member of a real table is larger than the
    file: a deflated one can inflate ~1000-fold (a 3 MB table to 3.4 GB). And np.load
    allocates an array by the shape in its header before it reads the data, so a header
    that declares more than its member holds is refused too (2**40 rows: a MemoryError).
    """
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as error:
        raise DatasetIndexError(f"sample table {where} is unreadable: {error}") from None
    with archive:
        for info in archive.infolist():
            name = info.filename.removesuffix(".npy")
            if info.file_size > len(data):
                raise DatasetIndexError(
                    f"sample table {where}: {name} would inflate to {info.file_size} bytes "
                    f"from a {len(data)}-byte file (tables are stored uncompressed)",
                    offset=info.header_offset,
                    hint="re-convert, or index the shards again with tools/convert.py",
                )
            try:
                with NUMPY_LOAD_LOCK, archive.open(info) as member:
                    version = np.lib.format.read_magic(member)
                    if version == (1, 0):
                        shape, _, dtype = np.lib.format.read_array_header_1_0(member)
                    elif version == (2, 0):
                        shape, _, dtype = np.lib.format.read_array_header_2_0(member)
                    else:
                        raise ValueError(f"npy format version {version} is not used here")
                    header_bytes = member.tell()
            except (ValueError, OSError, zipfile.BadZipFile, EOFError) as error:
                raise DatasetIndexError(
                    f"sample table {where}: {name} is unreadable: {error}",
                    offset=info.header_offset,
                ) from None
            declared = math.prod(shape) * dtype.itemsize
            if header_bytes + declared > info.file_size:
                raise DatasetIndexError(
                    f"sample table {where}: {name} declares shape {shape} ({declared} bytes) "
                    f"but holds {info.file_size - header_bytes} bytes",
                    offset=info.header_offset,
                    hint="re-convert, or index the shards again with tools/convert.py",
                )
            if num_samples is not None and name in _PER_SAMPLE_ARRAYS:
                rows = shape[0] if shape else -1
                if rows != num_samples:
                    raise DatasetIndexError(
                        f"sample table {where} lists {rows} samples, index.json {num_samples}",
                        offset=info.header_offset,
                    )


def table_path(shard_path: str) -> str:
    return shard_path + TABLE_SUFFIX


def load_table(
    root: str, index: DatasetIndex, shard: ShardEntry, *, config: StorageConfig | None = None
) -> SampleTable:
    """Read and check one shard's sample table against the index entry."""
    url = storage.join_url(root, shard.table)
    data = storage.read_bytes(url, config=config)
    if len(data) != shard.table_bytes or checksum(data) != shard.table_checksum:
        raise DatasetIndexError(
            f"sample table {shard.table} does not match index.json "
            f"(size {len(data)} vs {shard.table_bytes})",
            hint="re-run tools/convert.py, or tools/verify.py to see what else changed",
        )
    tar = index.format == "tar"
    table = SampleTable.from_bytes(
        data, shard.table, num_fields=len(index.fields), num_samples=shard.samples if tar else None
    )
    if tar and len(table) != shard.samples:
        raise DatasetIndexError(
            f"sample table {shard.table} lists {len(table)} samples, index.json {shard.samples}"
        )
    return table
