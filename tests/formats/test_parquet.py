"""Parquet shards: row-group byte ranges and digests in the sample table, values read back
by pyarrow equal to what was written, and refusals for values Parquet cannot hold."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dataflow.formats import codec
from dataflow.formats.parquet import (
    KEY_COLUMN,
    ParquetShardWriter,
    arrow_type,
    decode_column_value,
    kind_for_arrow,
    read_keys,
)
from dataflow.index import Field, SampleTable, checksum, sample_digest

FIELDS = [
    Field(name="label", kind="int"),
    Field(name="score", kind="float"),
    Field(name="caption", kind="str"),
    Field(name="meta", kind="json"),
    Field(name="tokens", kind="tokens"),
    Field(name="blob", kind="bytes"),
    Field(name="features", kind="npy"),
]


def sample_values(number: int) -> dict[str, Any]:
    rng = np.random.default_rng(number)
    return {
        "label": number % 10 - 3,
        "score": number / 7,
        "caption": f"sample {number}: naïve café ☕",
        "meta": {"number": number, "tags": ["a", "b"][: number % 3], "nested": {"x": None}},
        "tokens": rng.integers(-(2**31), 2**31, size=number % 5 + 1, dtype=np.int64),
        "blob": bytes(rng.integers(0, 256, size=number % 40, dtype=np.uint8)),
        "features": rng.standard_normal((2, 3)).astype(np.float32),
    }


def write_parquet(
    path: Path,
    samples: list[tuple[str, dict[str, Any]]],
    fields: list[Field] = FIELDS,
    *,
    row_group_rows: int = 7,
) -> tuple[SampleTable, str]:
    with open(path, "wb") as handle:
        writer = ParquetShardWriter(handle, str(path), fields, row_group_rows=row_group_rows)
        for key, values in samples:
            writer.write_sample(key, values)
        assert len(writer) == len(samples)
        table = writer.close()
    return table, writer.checksum


def assert_value_equal(kind: str, actual: Any, expected: Any) -> None:
    if kind in ("tokens", "npy"):
        expected = np.asarray(expected)
        assert actual.dtype == (np.int32 if kind == "tokens" else expected.dtype)
        np.testing.assert_array_equal(actual, expected)
    else:
        assert actual == expected and type(actual) is type(expected)


def test_row_groups_and_values_round_trip(tmp_path: Path) -> None:
    samples = [(f"key-{n:04d}/ü", sample_values(n)) for n in range(30)]
    path = tmp_path / "shard.parquet"
    table, written_checksum = write_parquet(path, samples)
    data = path.read_bytes()

    assert table.keys == [key for key, _ in samples]
    assert table.row_groups.shape == (5, 4)
    np.testing.assert_array_equal(table.row_groups[:, 0], [0, 7, 14, 21, 28])
    np.testing.assert_array_equal(table.row_groups[:, 1], [7, 7, 7, 7, 2])
    footer_length = int.from_bytes(data[-8:-4], "little")
    footer_start = len(data) - 8 - footer_length
    previous_end = 4  # after the leading "PAR1" magic
    for offset, size in table.row_groups[:, 2:]:
        assert previous_end <= offset and size > 0 and offset + size <= footer_start
        previous_end = offset + size
    digests = [sample_digest(data[o : o + s]) for o, s in table.row_groups[:, 2:]]
    np.testing.assert_array_equal(table.row_group_digests, np.asarray(digests, np.uint64))
    assert written_checksum == checksum(data)

    parquet = pq.ParquetFile(path)
    assert [parquet.metadata.row_group(i).num_rows for i in range(5)] == [7, 7, 7, 7, 2]
    assert parquet.schema_arrow.field("tokens").type == pa.list_(pa.int32())
    assert read_keys(parquet, shard="shard.parquet") == table.keys
    columns = parquet.read().to_pydict()
    assert columns[KEY_COLUMN] == table.keys
    for row, (_, values) in enumerate(samples):
        for field in FIELDS:
            actual = decode_column_value(field.kind, columns[field.name][row])
            assert_value_equal(field.kind, actual, values[field.name])


def test_each_row_group_is_readable_on_its_own(tmp_path: Path) -> None:
    samples = [(f"k{n}", sample_values(n)) for n in range(30)]
    path = tmp_path / "shard.parquet"
    table, _ = write_parquet(path, samples)
    parquet = pq.ParquetFile(path)
    for group, (first_row, rows, _, _) in enumerate(table.row_groups):
        keys = parquet.read_row_group(group, columns=[KEY_COLUMN]).column(0).to_pylist()
        assert keys == table.keys[first_row : first_row + rows]


def test_encoded_values_from_tars_and_missing_fields(tmp_path: Path) -> None:
    """Members copied from tar shards arrive as codec.Encoded and are decoded for Parquet."""
    values = sample_values(3)
    encoded = {f.name: codec.Encoded(codec.encode(f.kind, values[f.name])) for f in FIELDS}
    samples = [("plain", values), ("from-tar", encoded), ("sparse", {"label": 1})]
    path = tmp_path / "shard.parquet"
    write_parquet(path, samples)
    columns = pq.read_table(path).to_pydict()
    for field in FIELDS:
        plain = decode_column_value(field.kind, columns[field.name][0])
        copied = decode_column_value(field.kind, columns[field.name][1])
        assert_value_equal(
            field.kind, copied, plain if field.kind != "tokens" else values["tokens"]
        )
        if field.name != "label":
            assert columns[field.name][2] is None
            assert decode_column_value(field.kind, None) is None


def test_single_partial_row_group(tmp_path: Path) -> None:
    path = tmp_path / "shard.parquet"
    table, _ = write_parquet(path, [("only", sample_values(0))], row_group_rows=1024)
    np.testing.assert_array_equal(table.row_groups[:, :2], [[0, 1]])


@pytest.mark.parametrize(
    ("values", "error", "message"),
    [
        ({"tokens": np.array([1, 2**31])}, ValueError, "int32"),
        ({"tokens": [-(2**31) - 1]}, ValueError, "int32"),
        ({"tokens": np.array([1.5])}, TypeError, "1-D integer"),
        ({"tokens": np.zeros((2, 2), np.int32)}, TypeError, "1-D integer"),
        ({"extra": 1}, ValueError, "extra"),
    ],
    ids=["tokens-above-int32", "tokens-below-int32", "float-tokens", "2d-tokens", "unknown"],
)
def test_refused_values(values: dict[str, Any], error: type[Exception], message: str) -> None:
    # Refusals happen before any byte is written, so an in-memory sink is enough here.
    writer = ParquetShardWriter(io.BytesIO(), "unused.parquet", FIELDS)
    with pytest.raises(error, match=message):
        writer.write_sample("bad", values)


def test_refused_fields_and_settings(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="pickle"):
        ParquetShardWriter(io.BytesIO(), "unused", [Field(name="obj", kind="pickle")])
    with pytest.raises(ValueError, match="row_group_rows"):
        ParquetShardWriter(io.BytesIO(), "unused", FIELDS, row_group_rows=0)


def test_writer_usable_after_a_refused_sample(tmp_path: Path) -> None:
    path = tmp_path / "shard.parquet"
    with open(path, "wb") as handle:
        writer = ParquetShardWriter(handle, str(path), FIELDS)
        writer.write_sample("good-1", sample_values(1))
        bad = {**sample_values(2), "tokens": np.array([2**40])}
        with pytest.raises(ValueError, match="int32"):
            writer.write_sample("bad", bad)
        writer.write_sample("good-3", sample_values(3))
        try:
            keys = writer.close().keys
            failure = ""
        except pa.ArrowInvalid as error:
            keys, failure = [], str(error)
        del writer  # let pyarrow finish its footer while the file is still open
    assert not failure, f"close() failed after a refused sample: {failure}"
    assert keys == ["good-1", "good-3"]
    assert pq.read_table(path).column(KEY_COLUMN).to_pylist() == ["good-1", "good-3"]


@pytest.mark.parametrize(
    ("data_type", "kind"),
    [
        (pa.int8(), "int"),
        (pa.bool_(), "int"),
        (pa.float32(), "float"),
        (pa.large_string(), "str"),
        (pa.large_binary(), "bytes"),
        (pa.list_(pa.int64()), "tokens"),
        (pa.list_(pa.string()), "json"),
        (pa.struct([("a", pa.int32())]), "json"),
    ],
)
def test_kind_for_arrow(data_type: pa.DataType, kind: str) -> None:
    assert kind_for_arrow(data_type) == kind
    if kind != "json":
        # The writer's type for that kind maps back to the same kind.
        assert kind_for_arrow(arrow_type(kind)) == kind
