"""Parquet shards (pyarrow): a ``__key__`` column plus one column per field; row groups are
the read unit.

Field kinds map to Arrow types: int → int64, float → float64, str and json → string (JSON
text for json), tokens → list<int32>, image/bytes/npy → binary (npy as ``.npy`` bytes).
Pickle is never written to Parquet. Row groups hold ``row_group_rows`` rows (default 1024):
small enough that one ranged read fetches a few MB, large enough that Zstandard compresses
token sequences well. After writing, the byte range of every row group is read back from
the footer and hashed, so the sample table can drive ranged reads and per-group checks.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Sequence
from typing import IO, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import xxhash

from dataflow.errors import BadShardError
from dataflow.formats import codec
from dataflow.index import Field, SampleTable, sample_digest

KEY_COLUMN = "__key__"


def arrow_type(kind: str) -> pa.DataType:
    types = {
        "int": pa.int64(),
        "float": pa.float64(),
        "str": pa.string(),
        "json": pa.string(),
        "tokens": pa.list_(pa.int32()),
        "image": pa.binary(),
        "bytes": pa.binary(),
        "npy": pa.binary(),
    }
    if kind not in types:
        raise ValueError(f"field kind {kind!r} cannot be stored in Parquet")
    return types[kind]


def kind_for_arrow(data_type: pa.DataType) -> str:
    """The field kind for an Arrow column type met in a source table."""
    if pa.types.is_integer(data_type) or pa.types.is_boolean(data_type):
        return "int"
    if pa.types.is_floating(data_type):
        return "float"
    if pa.types.is_string(data_type) or pa.types.is_large_string(data_type):
        return "str"
    if pa.types.is_binary(data_type) or pa.types.is_large_binary(data_type):
        return "bytes"
    if (pa.types.is_list(data_type) or pa.types.is_large_list(data_type)) and pa.types.is_integer(
        data_type.value_type
    ):
        return "tokens"
    return "json"


def _column_value(kind: str, value: Any) -> Any:
    if value is None:
        return None
    if isinstance(value, codec.Encoded):
        value = codec.decode(kind, value)
    if kind == "json":
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    if kind == "npy":
        return codec.encode("npy", value)
    if kind == "tokens":
        array = np.asarray(value)
        if array.ndim != 1 or array.dtype.kind not in "iu":
            raise TypeError(f"a tokens field needs a 1-D integer array, got {array.dtype}")
        if array.size and (array.min() < -(2**31) or array.max() >= 2**31):
            raise ValueError("token ids must fit in int32 for Parquet shards")
        return array.astype(np.int32)
    if kind in ("image", "bytes"):
        return bytes(value)
    if kind == "int":
        return int(value)
    if kind == "float":
        return float(value)
    return str(value)


class ParquetShardWriter:
    """Write samples to one Parquet file; ``close()`` returns its sample table.

    ``path`` must be a local file path (the spool or temporary file behind ``open_write``):
    the row-group digests are computed by reading the finished file back.
    """

    def __init__(
        self, handle: IO[bytes], path: str, fields: Sequence[Field], *, row_group_rows: int = 1024
    ) -> None:
        if row_group_rows < 1:
            raise ValueError(f"row_group_rows must be >= 1, got {row_group_rows}")
        self._path = path
        self._handle = handle
        self._fields = list(fields)
        self._schema = pa.schema(
            [(KEY_COLUMN, pa.string())] + [(f.name, arrow_type(f.kind)) for f in self._fields]
        )
        self._writer = pq.ParquetWriter(handle, self._schema, compression="zstd")
        self._rows_per_group = row_group_rows
        self._buffer: dict[str, list[Any]] = {name: [] for name in self._schema.names}
        self._keys: list[str] = []
        self._checksum = ""

    def __len__(self) -> int:
        return len(self._keys)

    def write_sample(self, key: str, values: dict[str, Any]) -> None:
        unknown = set(values) - {f.name for f in self._fields}
        if unknown:
            raise ValueError(f"sample {key!r}: fields {sorted(unknown)} are not in the schema")
        # Convert every column first: a refused value must leave the buffers in step.
        row = [_column_value(field.kind, values.get(field.name)) for field in self._fields]
        self._keys.append(key)
        self._buffer[KEY_COLUMN].append(key)
        for field, value in zip(self._fields, row, strict=True):
            self._buffer[field.name].append(value)
        if len(self._buffer[KEY_COLUMN]) >= self._rows_per_group:
            self._flush()

    def _flush(self) -> None:
        if not self._buffer[KEY_COLUMN]:
            return
        table = pa.table(self._buffer, schema=self._schema)
        self._writer.write_table(table, row_group_size=self._rows_per_group)
        self._buffer = {name: [] for name in self._schema.names}

    def close(self) -> SampleTable:
        self._flush()
        self._writer.close()
        self._handle.flush()
        with open(self._path, "rb") as handle:
            data = handle.read()
        self._checksum = "xxh64:" + xxhash.xxh64(data).hexdigest()
        metadata = pq.ParquetFile(pa.BufferReader(data)).metadata
        groups = row_group_ranges(metadata)
        n = len(self._keys)
        table = SampleTable.empty(len(self._fields))
        table.keys = list(self._keys)
        table.offsets = np.zeros(n, np.int64)
        table.sizes = np.zeros(n, np.int64)
        table.digests = np.zeros(n, np.uint64)
        table.field_offsets = np.full((n, len(self._fields)), -1, np.int64)
        table.field_sizes = np.full((n, len(self._fields)), -1, np.int64)
        table.row_groups = groups
        table.row_group_digests = np.asarray(
            [sample_digest(memoryview(data)[g[2] : g[2] + g[3]]) for g in groups], np.uint64
        )
        return table

    def abort(self) -> None:
        """Give up on this shard (its file is about to be deleted). Closing the Parquet writer
        now, while the file is still open, spares pyarrow's finalizer a write to a closed
        file later, which would print a traceback after the error that stopped the shard."""
        with contextlib.suppress(Exception):
            self._writer.close()

    @property
    def checksum(self) -> str:
        return self._checksum


def row_group_ranges(metadata: pq.FileMetaData) -> np.ndarray:
    """(first row, rows, byte offset, byte size) per row group, from a Parquet footer."""
    rows = []
    first_row = 0
    for group_index in range(metadata.num_row_groups):
        group = metadata.row_group(group_index)
        starts, ends = [], []
        for column_index in range(group.num_columns):
            column = group.column(column_index)
            start = column.data_page_offset
            if column.has_dictionary_page and column.dictionary_page_offset:
                start = min(start, column.dictionary_page_offset)
            starts.append(start)
            ends.append(start + column.total_compressed_size)
        rows.append((first_row, group.num_rows, min(starts), max(ends) - min(starts)))
        first_row += group.num_rows
    return np.asarray(rows, dtype=np.int64).reshape(-1, 4)


def read_keys(parquet: pq.ParquetFile, *, shard: str) -> list[str]:
    if KEY_COLUMN not in parquet.schema_arrow.names:
        raise BadShardError(f"no {KEY_COLUMN} column", shard=shard)
    return [str(k) for k in parquet.read(columns=[KEY_COLUMN]).column(0).to_pylist()]


def decode_column_value(kind: str, value: Any) -> Any:
    """The Python value of a Parquet cell of ``kind`` (inverse of the writer's mapping)."""
    if value is None:
        return None
    if kind == "json":
        return json.loads(value)
    if kind == "npy":
        return codec.decode("npy", value)
    if kind == "tokens":
        return np.asarray(value, dtype=np.int32)
    return value
