"""The dataset index: index.json round trips and refusals, and sample tables (npz, loaded
without pickle) that reject every inconsistency with a DatasetIndexError."""

from __future__ import annotations

import io
import json
import tracemalloc
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from dataflow.errors import DatasetIndexError
from dataflow.index import (
    FORMAT_VERSION,
    DatasetIndex,
    Field,
    SampleTable,
    ShardEntry,
    checksum,
    load_table,
    table_path,
)

FIELDS = [Field(name="jpg", kind="image"), Field(name="cls", kind="int")]


def shard_entry(number: int, samples: int = 10, path: str | None = None) -> ShardEntry:
    path = path or f"shards/shard-{number:06d}.tar"
    return ShardEntry(
        path=path,
        bytes=1000 * (number + 1),
        samples=samples,
        checksum=f"xxh64:{number:016x}",
        table=table_path(path),
        table_bytes=100,
        table_checksum="xxh64:0000000000000000",
    )


def make_index() -> DatasetIndex:
    return DatasetIndex(
        format="tar",
        fields=list(FIELDS),
        shards=[shard_entry(0, 10), shard_entry(1, 7)],
        metadata={"classes": ["chat", "chien", "écureuil"], "counts": [5, 6, 6]},
        skipped=[{"source": "in/bad.jpg", "reason": "undecodable JPEG"}],
    )


def document(index: DatasetIndex) -> dict[str, Any]:
    return json.loads(index.to_json())


def make_table(keys: list[str], num_fields: int = 2) -> SampleTable:
    n = len(keys)
    offsets = np.arange(n, dtype=np.int64) * 2048
    field_offsets = np.stack([offsets + 512 + 1024 * f for f in range(num_fields)], axis=1)
    field_offsets[n // 2, -1] = -1  # one sample lacks its last field
    field_sizes = np.where(field_offsets >= 0, 100, -1).astype(np.int64)
    return SampleTable(
        keys=keys,
        offsets=offsets,
        sizes=np.full(n, 2048, np.int64),
        digests=np.arange(n, dtype=np.uint64) * np.uint64(2**61),
        field_offsets=field_offsets,
        field_sizes=field_sizes,
    )


def npz(**arrays: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)  # type: ignore[arg-type]
    return buffer.getvalue()


def table_arrays(table: SampleTable) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(table.to_bytes()), allow_pickle=False) as arrays:
        return {name: arrays[name] for name in arrays.files}


# ---------------------------------------------------------------------------------------------
# index.json


def test_index_json_round_trip() -> None:
    index = make_index()
    text = index.to_json()
    assert "écureuil" in text  # human-readable, not \\u-escaped
    loaded = DatasetIndex.from_json(text)
    assert loaded == index
    assert DatasetIndex.from_json(text.encode()) == index
    fields = document(index)
    assert fields["version"] == FORMAT_VERSION
    assert (fields["num_samples"], fields["num_shards"], fields["total_bytes"]) == (17, 2, 3000)
    assert loaded.field("cls") == FIELDS[1]
    with pytest.raises(KeyError, match="jpg"):
        loaded.field("png")


def test_index_save_and_load(tmp_path: Path) -> None:
    index = make_index()
    index.save(str(tmp_path))
    assert DatasetIndex.load(str(tmp_path)) == index
    with pytest.raises(DatasetIndexError, match="does not exist"):
        DatasetIndex.load(str(tmp_path / "elsewhere"))


@pytest.mark.parametrize("version", [FORMAT_VERSION + 1, 0, "1", None])
def test_index_version_refused(version: Any) -> None:
    changed = document(make_index())
    changed["version"] = version
    with pytest.raises(DatasetIndexError, match="version") as caught:
        DatasetIndex.from_json(json.dumps(changed), "data/index.json")
    assert "upgrade" in str(caught.value) and "data/index.json" in str(caught.value)


@pytest.mark.parametrize(
    "path",
    [
        "../outside.tar",
        "shards/../../outside.tar",
        "/etc/shard.tar",
        "s3://other-bucket/shard.tar",
    ],
)
@pytest.mark.parametrize("which", ["path", "table"])
def test_index_shard_path_leaving_dataset_refused(path: str, which: str) -> None:
    changed = document(make_index())
    changed["shards"][1][which] = path
    with pytest.raises(DatasetIndexError, match="leaves the dataset"):
        DatasetIndex.from_json(json.dumps(changed))


def test_index_refusals() -> None:
    def refused(change: Any, match: str) -> None:
        changed = document(make_index())
        change(changed)
        with pytest.raises(DatasetIndexError, match=match):
            DatasetIndex.from_json(json.dumps(changed))

    refused(lambda d: d.update(num_samples=18), "declares 18 samples but its shards hold 17")
    refused(lambda d: d.update(format="zip"), "unknown shard format")
    refused(lambda d: d["shards"][0].update(bytes=-1), "negative size")

    def negative_samples(changed: dict[str, Any]) -> None:
        changed["shards"][0]["samples"] = -3
        changed["num_samples"] = 4

    refused(negative_samples, "negative size")
    refused(lambda d: d["shards"][0].pop("checksum"), "malformed")
    refused(lambda d: d["shards"][0].update(colour="red"), "malformed")
    refused(lambda d: d.pop("fields"), "malformed")
    refused(lambda d: d["fields"][0].update(kind="movie"), "malformed")
    refused(lambda d: d["fields"][0].update(name="__key__"), "malformed")
    for text in ("{not json", "[1, 2]", b"\xff\xfe"):
        with pytest.raises(DatasetIndexError):
            DatasetIndex.from_json(text)


def test_index_without_declared_count_is_accepted() -> None:
    changed = document(make_index())
    del changed["num_samples"]
    assert DatasetIndex.from_json(json.dumps(changed)).num_samples == 17


def test_index_nested_a_million_deep_is_one_clear_error() -> None:
    """json.loads recurses per level: such a file raised RecursionError, not a typed error."""
    text = '{"version": 1, "metadata": {"x": ' + "[" * 10**6 + "]" * 10**6 + "}}"
    with pytest.raises(DatasetIndexError, match="nests deeper than") as caught:
        DatasetIndex.from_json(text, "data/index.json")
    assert "data/index.json" in str(caught.value)


@pytest.mark.parametrize(
    ("where", "value", "match"),
    [
        (("shards", 1, "bytes"), "7000", r"shards\[1\]\.bytes must be an integer, got '7000'"),
        (("shards", 0, "samples"), 10.0, r"shards\[0\]\.samples must be an integer, got 10\.0"),
        (("shards", 0, "samples"), True, r"shards\[0\]\.samples must be an integer, got True"),
        (("shards", 1, "path"), 5, r"shards\[1\]\.path must be a string, got 5"),
        (("shards", 0, "table"), None, r"shards\[0\]\.table must be a string, got None"),
        (("shards", 0), "shard-0.tar", r"shards\[0\] must be an object, got 'shard-0\.tar'"),
        (("shards",), {"a": 1}, r"shards must be a list, got \{'a': 1\}"),
        (("fields", 1, "name"), ["cls"], r"fields\[1\]\.name must be a string, got \['cls'\]"),
        (("format",), 7, r"format must be a string, got 7"),
        (("metadata",), [1, 2], r"metadata must be an object, got \[1, 2\]"),
        (("skipped",), "x", r"skipped must be a list, got 'x'"),
        (("skipped", 0), 3, r"skipped\[0\] must be an object, got 3"),
        (("num_samples",), "17", r"num_samples must be an integer, got '17'"),
    ],
)
def test_index_field_of_the_wrong_type_is_named(where: tuple[Any, ...], value: Any,
                                               match: str) -> None:  # fmt: skip
    changed = document(make_index())
    node = changed
    for step in where[:-1]:
        node = node[step]
    node[where[-1]] = value
    with pytest.raises(DatasetIndexError, match=match) as caught:
        DatasetIndex.from_json(json.dumps(changed), "data/index.json")
    assert str(caught.value).startswith("data/index.json is malformed: ")


# ---------------------------------------------------------------------------------------------
# Sample tables


def test_sample_table_round_trip_with_unicode_keys() -> None:
    keys = ["a", "ünïcødé/ключ", "键/𝔘𝔫𝔦", "", "emoji 🎉", "x" * 300]
    table = make_table(keys)
    loaded = SampleTable.from_bytes(table.to_bytes(), "t.samples.npz", num_fields=2)
    assert loaded.keys == keys
    for name in ("offsets", "sizes", "digests", "field_offsets", "field_sizes"):
        np.testing.assert_array_equal(getattr(loaded, name), getattr(table, name), err_msg=name)
    assert loaded.digests.dtype == np.uint64 and loaded.digests[-1] == np.uint64(5 * 2**61)
    assert loaded.field_span(len(keys) // 2, 1) is None
    assert loaded.field_span(0, 1) == (512 + 1024, 100)


def test_sample_table_round_trip_empty_and_row_groups() -> None:
    empty = SampleTable.from_bytes(SampleTable.empty(3).to_bytes(), "e", num_fields=3)
    assert len(empty) == 0 and empty.field_offsets.shape == (0, 3)
    table = SampleTable.empty(2)
    table.row_groups = np.array([[0, 7, 4, 100], [7, 3, 104, 50]], np.int64)
    table.row_group_digests = np.array([1, 2**64 - 1], np.uint64)
    loaded = SampleTable.from_bytes(table.to_bytes(), "p", num_fields=2)
    np.testing.assert_array_equal(loaded.row_groups, table.row_groups)
    np.testing.assert_array_equal(loaded.row_group_digests, table.row_group_digests)


@pytest.mark.parametrize(
    "data",
    [b"", b"garbage bytes, not a zip", b"PK\x03\x04" + b"\0" * 100, npz(other=np.zeros(3))],
    ids=["empty", "garbage", "broken-zip", "wrong-arrays"],
)
def test_sample_table_unreadable(data: bytes) -> None:
    with pytest.raises(DatasetIndexError, match=r"t\.samples\.npz"):
        SampleTable.from_bytes(data, "t.samples.npz", num_fields=2)


def test_sample_table_truncated() -> None:
    data = make_table(["a", "b", "c"]).to_bytes()
    for cut in (len(data) // 3, len(data) - 10):
        with pytest.raises(DatasetIndexError):
            SampleTable.from_bytes(data[:cut], "t", num_fields=2)


@pytest.mark.parametrize(
    ("name", "value", "match"),
    [
        ("field_offsets", np.zeros((3, 3), np.int64), "field_offsets has shape"),
        ("field_sizes", np.zeros((3,), np.int64), "field_sizes has shape"),
        ("offsets", np.zeros(2, np.int64), "offsets has shape"),
        ("digests", np.zeros((3, 1), np.uint64), "digests has shape"),
        ("row_groups", np.zeros((2, 3), np.int64), "row_groups has shape"),
        ("row_groups", np.zeros(4, np.int64), "row_groups has shape"),
        ("offsets", np.array([0, -2048, 4096], np.int64), "negative"),
        ("sizes", np.array([1, 1, -1], np.int64), "negative"),
        ("key_ends", np.array([1, 2, 9], np.int64), "key"),
        ("key_ends", np.array([2, 1, 3], np.int64), "key"),
        ("key_blob", np.frombuffer(b"a\xffc", np.uint8), "malformed"),
    ],
)
def test_sample_table_inconsistent(name: str, value: np.ndarray, match: str) -> None:
    arrays = table_arrays(make_table(["a", "b", "c"]))
    arrays[name] = value
    with pytest.raises(DatasetIndexError, match=match):
        SampleTable.from_bytes(npz(**arrays), "t", num_fields=2)


def test_sample_table_built_with_wrong_shapes() -> None:
    table = make_table(["a", "b"], num_fields=3)
    with pytest.raises(DatasetIndexError, match=r"expected \(2, 2\)"):
        SampleTable.from_bytes(table.to_bytes(), "t", num_fields=2)


def test_sample_table_key_ends_of_wrong_dtype() -> None:
    arrays = table_arrays(make_table(["a", "b", "c"]))
    arrays["key_ends"] = arrays["key_ends"].astype(np.float64)
    with pytest.raises(DatasetIndexError):
        SampleTable.from_bytes(npz(**arrays), "t", num_fields=2)


@pytest.mark.parametrize("name", ["key_blob", "offsets", "digests"])
def test_sample_table_object_arrays_never_unpickled(name: str) -> None:
    arrays: dict[str, np.ndarray] = table_arrays(make_table(["a", "b", "c"]))
    arrays[name] = np.array([{"a": 1}, None, "x"], dtype=object)
    data = npz(**arrays)  # np.savez pickles object arrays
    with pytest.raises(DatasetIndexError, match="allow_pickle"):
        SampleTable.from_bytes(data, "t", num_fields=2)


def test_load_table_checks_index_entry(tmp_path: Path) -> None:
    table = make_table(["a", "b", "c"])
    data = table.to_bytes()
    entry = shard_entry(0, samples=3)
    entry.table_bytes, entry.table_checksum = len(data), checksum(data)
    (tmp_path / entry.table).parent.mkdir(parents=True)
    (tmp_path / entry.table).write_bytes(data)
    index = DatasetIndex(format="tar", fields=list(FIELDS), shards=[entry])
    assert load_table(str(tmp_path), index, entry).keys == ["a", "b", "c"]

    entry.samples = 4
    with pytest.raises(DatasetIndexError, match="lists 3 samples"):
        load_table(str(tmp_path), index, entry)
    entry.samples = 3
    (tmp_path / entry.table).write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(DatasetIndexError, match=r"does not match index\.json"):
        load_table(str(tmp_path), index, entry)


def test_sample_tables_load_from_many_threads_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """The loader's fetch threads load tables in parallel, and every .npy header they parse
    goes through ast.literal_eval, whose AST constructor in CPython 3.11 is not thread-safe
    ("SystemError: AST constructor recursion depth mismatch", python/cpython#106905; a full
    test run hit it once in the table checks). The race is rare, so the test widens it:
    literal_eval sleeps inside, and no two threads may be in it at once."""
    import ast
    import concurrent.futures
    import threading
    import time

    inside, most, guard = 0, 0, threading.Lock()
    literal_eval = ast.literal_eval

    def watched(source: Any) -> Any:
        nonlocal inside, most
        with guard:
            inside += 1
            most = max(most, inside)
        time.sleep(0.0005)
        try:
            return literal_eval(source)
        finally:
            with guard:
                inside -= 1

    monkeypatch.setattr(ast, "literal_eval", watched)
    table = SampleTable.empty(2)
    table.keys = [f"k{i}" for i in range(50)]
    for name in ("offsets", "sizes"):
        setattr(table, name, np.arange(50, dtype=np.int64))
    table.digests = np.arange(50, dtype=np.uint64)
    table.field_offsets = np.zeros((50, 2), np.int64)
    table.field_sizes = np.zeros((50, 2), np.int64)
    data = table.to_bytes()

    def load(_: int) -> list[str]:
        return SampleTable.from_bytes(data, "t", num_fields=2).keys

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        assert all(keys == table.keys for keys in pool.map(load, range(200)))
    assert most == 1, f"{most} threads parsed .npy headers at once"


def npz_with_member(arrays: dict[str, np.ndarray], name: str, header: dict[str, Any],
                    payload: Iterator[bytes], *, deflate: bool) -> bytes:  # fmt: skip
    """``arrays`` as np.savez writes them, plus member ``name`` written by hand: an npy
    ``header`` and the ``payload`` chunks, deflated or stored."""
    buffer = io.BytesIO(npz(**{k: v for k, v in arrays.items() if k != name}))
    method = zipfile.ZIP_DEFLATED if deflate else zipfile.ZIP_STORED
    with (
        zipfile.ZipFile(buffer, "a", compression=method, compresslevel=9) as archive,
        archive.open(f"{name}.npy", "w", force_zip64=True) as member,
    ):
        np.lib.format.write_array_header_1_0(member, header)
        for chunk in payload:
            member.write(chunk)
    return buffer.getvalue()


def test_sample_table_that_would_inflate_is_refused_before_it_does() -> None:
    """A 400 KB table whose deflated member inflates to 400 MiB of offsets (the ratio of the
    3 MB table that inflated to 3.4 GB): refused from its zip header, allocating nothing."""
    rows = 50 << 20
    zeros = bytes(1 << 20)
    data = npz_with_member(
        table_arrays(make_table(["a", "b", "c"])), "offsets",
        {"descr": "<i8", "fortran_order": False, "shape": (rows,)},
        (zeros for _ in range(rows * 8 // len(zeros))), deflate=True,
    )  # fmt: skip
    assert len(data) < 1 << 20
    tracemalloc.start()
    try:
        inflating = "offsets would inflate to 419430528 bytes"
        with pytest.raises(DatasetIndexError, match=inflating) as caught:
            SampleTable.from_bytes(data, "t.samples.npz", num_fields=2)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20, peak
    assert "t.samples.npz" in str(caught.value) and caught.value.offset is not None


def test_sample_table_header_declaring_more_than_it_holds_is_refused() -> None:
    """np.load allocates by the header's shape before it reads: 2**40 rows was a
    MemoryError out of a 1 KB file."""
    arrays = table_arrays(make_table(["a", "b", "c"]))
    data = npz_with_member(
        arrays, "sizes", {"descr": "<i8", "fortran_order": False, "shape": (2**40,)},
        iter([arrays["sizes"].tobytes()]), deflate=False,
    )  # fmt: skip
    with pytest.raises(DatasetIndexError, match=r"sizes declares shape \(1099511627776,\)"):
        SampleTable.from_bytes(data, "t.samples.npz", num_fields=2)


def test_sample_table_rows_are_checked_against_the_index_before_loading() -> None:
    data = make_table(["a", "b", "c"]).to_bytes()
    with pytest.raises(DatasetIndexError, match=r"lists 3 samples, index\.json 2000000000"):
        SampleTable.from_bytes(data, "t", num_fields=2, num_samples=2_000_000_000)
    assert len(SampleTable.from_bytes(data, "t", num_fields=2, num_samples=3)) == 3


def test_index_counts_are_checked_before_a_reader_allocates_by_them() -> None:
    index = make_index()
    index.shards[0].bytes, index.shards[1].bytes = 10 * 1024, 7 * 512  # 10 and 7 samples
    index.check_counts()
    forged = DatasetIndex.from_json(index.to_json())
    forged.shards[1].samples, forged.shards[1].bytes = 2_000_000_000, 10**12
    with pytest.raises(DatasetIndexError, match=r"shards\[1\]\.samples = 2000000000 is more"):
        forged.check_counts("data/index.json")
    forged.shards[1].samples = 10**6
    forged.shards[1].bytes = 10**6 * 512 - 1
    with pytest.raises(DatasetIndexError, match=r"shards\[1\] cannot hold 1000000 samples in"):
        forged.check_counts("data/index.json")
