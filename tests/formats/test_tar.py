"""Tar shards: the writer's byte layout and sample table, interop with ``tar``, the
``webdataset`` library and DALI index files, and the strict parser against hostile tars."""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import subprocess
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import webdataset

from dataflow.convert.existing import index_existing_tars
from dataflow.datasets import photo_jpegs
from dataflow.errors import BadShardError, UnsafeMemberError
from dataflow.formats import codec
from dataflow.formats.tar import (
    BLOCK,
    RECORD,
    Member,
    TarShardWriter,
    check_key,
    dali_index_text,
    iter_members,
    iter_samples,
    split_member_name,
    table_from_scan,
)
from dataflow.index import Field, SampleTable, checksum, load_table, sample_digest

FIELDS = [
    Field(name="jpg", kind="image"),
    Field(name="cls", kind="int"),
    Field(name="json", kind="json"),
]


@pytest.fixture(scope="module")
def photos() -> list[tuple[int, bytes]]:
    return photo_jpegs(20, seed=3, long_side=64)


def encoded_samples(photos: list[tuple[int, bytes]]) -> list[tuple[str, dict[str, bytes]]]:
    samples = []
    for number, (label, jpeg) in enumerate(photos):
        values = {"jpg": jpeg, "cls": label, "json": {"number": number, "caption": "café ☕"}}
        members = {f.name: codec.encode(f.kind, values[f.name]) for f in FIELDS}
        samples.append((f"shard-0/sample-{number:06d}", members))
    return samples


def write_shard(
    path: Path, samples: list[tuple[str, dict[str, bytes]]], fields: list[Field] = FIELDS
) -> tuple[SampleTable, str]:
    with open(path, "wb") as handle:
        writer = TarShardWriter(handle, fields)
        for key, members in samples:
            writer.write_sample(key, members)
        table = writer.close()
        assert len(writer) == len(samples)
        return table, writer.checksum


def scan(data: bytes, *, size_known: bool = True) -> list[Member]:
    """Parse ``data`` from a seekable buffer, telling the parser its size or not."""
    total_size = len(data) if size_known else None
    return list(iter_members(io.BytesIO(data), shard="hostile.tar", total_size=total_size))


def build_tar(
    members: list[tuple[tarfile.TarInfo, bytes | None]], *, format: int = tarfile.USTAR_FORMAT
) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=format) as archive:
        for info, data in members:
            archive.addfile(info, io.BytesIO(data) if data is not None else None)
    return buffer.getvalue()


def member(
    name: str, data: bytes = b"", *, type: bytes = tarfile.REGTYPE, linkname: str = ""
) -> tuple[tarfile.TarInfo, bytes | None]:
    info = tarfile.TarInfo(name)
    info.type = type
    info.linkname = linkname
    info.size = len(data) if type == tarfile.REGTYPE else 0
    return info, (data if type == tarfile.REGTYPE else None)


def header_offsets(data: bytes) -> list[int]:
    """Header offsets as Python's tarfile sees them (an independent reader)."""
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as archive:
        return [info.offset for info in archive.getmembers()]


def patch_header(data: bytes, offset: int, start: int, value: bytes) -> bytes:
    """Overwrite header bytes [start, start+len(value)) and recompute a valid checksum."""
    block = bytearray(data[offset : offset + BLOCK])
    block[start : start + len(value)] = value
    block[148:156] = b" " * 8
    block[148:155] = b"%06o\0" % sum(block)
    return data[:offset] + bytes(block) + data[offset + BLOCK :]


# ---------------------------------------------------------------------------------------------
# Writer


def test_writer_round_trip_layout(tmp_path: Path, photos: list[tuple[int, bytes]]) -> None:
    samples = encoded_samples(photos)
    path = tmp_path / "shard.tar"
    table, written_checksum = write_shard(path, samples)
    data = path.read_bytes()

    with tarfile.open(path) as archive:
        infos = archive.getmembers()
        assert [i.name for i in infos] == [f"{key}.{f.name}" for key, _ in samples for f in FIELDS]
        for info in infos:
            assert (info.mtime, info.uid, info.gid, info.mode) == (0, 0, 0, 0o644)
            assert info.isreg()

    assert table.keys == [key for key, _ in samples]
    assert table.field_offsets.shape == table.field_sizes.shape == (len(samples), len(FIELDS))
    for row, (_, members) in enumerate(samples):
        for column, field in enumerate(FIELDS):
            offset, size = table.field_span(row, column)  # type: ignore[misc]
            assert data[offset : offset + size] == members[field.name]
        start, size = int(table.offsets[row]), int(table.sizes[row])
        assert int(table.digests[row]) == sample_digest(data[start : start + size])
    # Sample spans tile the archive up to its end-of-archive blocks.
    assert table.offsets[0] == 0
    np.testing.assert_array_equal(table.offsets[1:], (table.offsets + table.sizes)[:-1])

    assert written_checksum == checksum(data)
    assert len(data) % RECORD == 0
    end = int(table.offsets[-1] + table.sizes[-1])
    assert len(data) - end >= 2 * BLOCK and data[end:] == b"\0" * (len(data) - end)


def test_writer_output_is_deterministic(tmp_path: Path, photos: list[tuple[int, bytes]]) -> None:
    samples = encoded_samples(photos)
    first, first_checksum = write_shard(tmp_path / "a.tar", samples)
    second, second_checksum = write_shard(tmp_path / "b.tar", samples)
    assert (tmp_path / "a.tar").read_bytes() == (tmp_path / "b.tar").read_bytes()
    assert first_checksum == second_checksum
    np.testing.assert_array_equal(first.digests, second.digests)


def test_parser_agrees_with_writer_table(tmp_path: Path, photos: list[tuple[int, bytes]]) -> None:
    path = tmp_path / "shard.tar"
    written, _ = write_shard(path, encoded_samples(photos))
    data = path.read_bytes()
    scanned = list(iter_samples(iter(scan(data)), shard="shard.tar"))
    parsed = table_from_scan(scanned, FIELDS, data)
    assert parsed.keys == written.keys
    for name in ("offsets", "sizes", "digests", "field_offsets", "field_sizes"):
        np.testing.assert_array_equal(getattr(parsed, name), getattr(written, name), err_msg=name)


@pytest.mark.skipif(shutil.which("tar") is None, reason="no tar executable")
def test_tar_command_lists_members(tmp_path: Path, photos: list[tuple[int, bytes]]) -> None:
    samples = encoded_samples(photos)
    path = tmp_path / "shard.tar"
    write_shard(path, samples)
    listing = subprocess.run(
        ["tar", "-tf", str(path)], check=True, capture_output=True, text=True, timeout=30
    ).stdout.splitlines()
    assert listing == [f"{key}.{f.name}" for key, _ in samples for f in FIELDS]


def test_sample_missing_a_field(tmp_path: Path, photos: list[tuple[int, bytes]]) -> None:
    samples = encoded_samples(photos[:3])
    del samples[1][1]["cls"]
    path = tmp_path / "shard.tar"
    table, _ = write_shard(path, samples)
    data = path.read_bytes()
    cls = [f.name for f in FIELDS].index("cls")
    assert table.field_offsets[1, cls] == -1 and table.field_sizes[1, cls] == -1
    assert table.field_span(1, cls) is None
    assert (table.field_offsets[[0, 2], :] >= 0).all()
    with tarfile.open(path) as archive:
        assert f"{samples[1][0]}.cls" not in archive.getnames()
    jpg_offset, jpg_size = table.field_span(1, 0)  # type: ignore[misc]
    assert data[jpg_offset : jpg_offset + jpg_size] == samples[1][1]["jpg"]


def test_long_and_unicode_keys_round_trip(tmp_path: Path) -> None:
    fields = [Field(name="txt", kind="str")]
    keys = ["d" * 40 + "/" + "k" * 120, "ünïcødé/键", "plain"]
    samples = [(key, {"txt": codec.encode("str", key)}) for key in keys]
    path = tmp_path / "shard.tar"
    table, _ = write_shard(path, samples, fields)
    data = path.read_bytes()
    with tarfile.open(path, encoding="utf-8") as archive:
        assert archive.getnames() == [f"{key}.txt" for key in keys]
    members = scan(data)
    assert [m.name for m in members] == [f"{key}.txt" for key in keys]
    for row, found in enumerate(members):
        assert found.data_offset == table.field_offsets[row, 0]
        assert found.header_offset == table.offsets[row]
        assert data[found.data_offset : found.data_offset + found.size] == keys[row].encode()


def test_check_key_and_writer_refusals(tmp_path: Path) -> None:
    check_key("plain")
    check_key("dir.v1/key")  # a dot in the directory part is fine
    assert split_member_name("dir.v1/key.seg.jpg") == ("dir.v1/key", "seg.jpg")
    with pytest.raises(ValueError, match="basename"):
        check_key("a.b")
    with pytest.raises(ValueError, match="basename"):
        check_key("dir/a.b")
    for unsafe in ("../x", "a/../../x", "/abs", ""):
        with pytest.raises(UnsafeMemberError):
            check_key(unsafe)

    with open(tmp_path / "shard.tar", "wb") as handle:
        writer = TarShardWriter(handle, FIELDS)
        with pytest.raises(ValueError, match="png"):
            writer.write_sample("k", {"png": b"x"})
        with pytest.raises(ValueError):
            writer.write_sample("k.v2", {"cls": b"1"})
        assert writer.bytes_written == 0 and len(writer) == 0
        writer.close()
        with pytest.raises(RuntimeError, match="after close"):
            writer.write_sample("k", {"cls": b"1"})


# ---------------------------------------------------------------------------------------------
# Interop


def test_webdataset_reads_our_shard(tmp_path: Path, photos: list[tuple[int, bytes]]) -> None:
    samples = encoded_samples(photos)
    path = tmp_path / "shard.tar"
    write_shard(path, samples)
    dataset = webdataset.WebDataset(str(path), shardshuffle=False)
    read = [
        (sample["__key__"], {k: v for k, v in sample.items() if not k.startswith("__")})
        for sample in dataset
    ]
    assert read == samples


def test_index_webdataset_tarwriter_output(tmp_path: Path, photos: list[tuple[int, bytes]]) -> None:
    root = tmp_path / "wds"
    root.mkdir()
    expected: dict[str, dict[str, bytes]] = {}
    for part in range(2):
        with webdataset.TarWriter(str(root / f"part-{part:04d}.tar")) as sink:
            for number in range(part * 15, part * 15 + 15):
                label, jpeg = photos[number % len(photos)]
                key = f"sample{number:06d}"
                caption = f"photo {number} of class {label} — ok"
                sink.write({"__key__": key, "jpg": jpeg, "cls": label, "txt": caption})
                expected[key] = {"jpg": jpeg, "cls": str(label).encode(), "txt": caption.encode()}

    index = index_existing_tars(str(root), progress=False)

    assert index.format == "tar"
    assert {f.name: f.kind for f in index.fields} == {"jpg": "image", "cls": "int", "txt": "str"}
    assert index.num_samples == 30
    assert [s.path for s in index.shards] == ["part-0000.tar", "part-0001.tar"]
    seen = []
    for shard in index.shards:
        data = (root / shard.path).read_bytes()
        assert shard.bytes == len(data) and shard.checksum == checksum(data)
        table = load_table(str(root), index, shard)
        seen += table.keys
        for row, key in enumerate(table.keys):
            for column, field in enumerate(index.fields):
                offset, size = table.field_span(row, column)  # type: ignore[misc]
                assert data[offset : offset + size] == expected[key][field.name], (key, field)
            start, size = int(table.offsets[row]), int(table.sizes[row])
            assert int(table.digests[row]) == sample_digest(data[start : start + size])
    assert seen == sorted(expected)


def test_dali_index_text(tmp_path: Path, photos: list[tuple[int, bytes]]) -> None:
    samples = encoded_samples(photos[:4])
    del samples[2][1]["json"]
    path = tmp_path / "shard.tar"
    table, _ = write_shard(path, samples)
    data = path.read_bytes()
    lines = dali_index_text(table, FIELDS).splitlines()
    assert lines[0] == "v1.2 4"
    assert len(lines) == 5
    for (key, members), line in zip(samples, lines[1:], strict=True):
        words = line.split(" ")
        assert len(words) == 4 * len(members)
        for at in range(0, len(words), 4):
            extension, offset, size, name = words[at : at + 4]
            assert name == f"{key}.{extension}"
            assert data[int(offset) : int(offset) + int(size)] == members[extension]
        assert [words[at] for at in range(0, len(words), 4)] == list(members)


# ---------------------------------------------------------------------------------------------
# Strict parsing of hostile and damaged tars


@pytest.mark.parametrize("name", ["../evil.txt", "a/../../evil.txt", "/etc/x", "C:/x.txt"])
def test_unsafe_names_refused(name: str) -> None:
    data = build_tar([member("ok.txt", b"fine"), member(name, b"evil")])
    with pytest.raises(UnsafeMemberError, match="unsafe member name") as caught:
        scan(data)
    assert caught.value.offset == header_offsets(data)[1]
    assert caught.value.shard == "hostile.tar"


def test_a_name_that_is_not_utf8_is_refused() -> None:
    """Found by the shard fuzzer: such a name became a key that could not be written into
    the sample table (UnicodeEncodeError) when the tar was indexed in place."""
    data = bytearray(build_tar([member("ok.txt", b"fine"), member("bad.txt", b"evil")]))
    at = header_offsets(bytes(data))[1]
    data[at : at + 3] = b"b\xd3d"
    data[at + 148 : at + 156] = b" " * 8
    data[at + 148 : at + 156] = b"%06o\0 " % sum(data[at : at + 512])
    with pytest.raises(BadShardError, match="not UTF-8") as caught:
        scan(bytes(data))
    assert caught.value.offset == at


@pytest.mark.parametrize(
    ("type", "what"),
    [
        (tarfile.SYMTYPE, "symbolic link"),
        (tarfile.LNKTYPE, "hard link"),
        (tarfile.FIFOTYPE, "FIFO"),
        (tarfile.CHRTYPE, "character device"),
        (tarfile.BLKTYPE, "block device"),
    ],
    ids=["symlink", "hardlink", "fifo", "chardev", "blockdev"],
)
def test_links_and_devices_refused(type: bytes, what: str) -> None:
    data = build_tar(
        [member("ok.txt", b"fine"), member("link.txt", type=type, linkname="/etc/passwd")]
    )
    with pytest.raises(UnsafeMemberError, match=what) as caught:
        scan(data)
    assert caught.value.offset == header_offsets(data)[1]


def test_directories_skipped() -> None:
    data = build_tar(
        [member("dir", type=tarfile.DIRTYPE), member("dir/a.txt", b"a"), member("b.txt", b"bb")]
    )
    assert [(m.name, m.size) for m in scan(data)] == [("dir/a.txt", 1), ("b.txt", 2)]


@pytest.mark.parametrize("format", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT], ids=["pax", "gnu"])
def test_long_names_parsed(format: int) -> None:
    long_name = "deep/" * 30 + "n" * 80 + ".txt"
    payload = b"long-named payload"
    data = build_tar([member("first.txt", b"1"), member(long_name, payload)], format=format)
    first, second = scan(data)
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as archive:
        reference = archive.getmembers()[1]
    assert second.name == long_name == reference.name
    assert second.header_offset == reference.offset == first.end
    assert second.data_offset == reference.offset_data
    assert data[second.data_offset : second.data_offset + second.size] == payload


def test_truncated_member_data() -> None:
    data = build_tar([member("a.txt", b"a" * 100), member("b.txt", b"b" * 3000)])
    cut = data[: header_offsets(data)[1] + BLOCK + 1000]
    with pytest.raises(BadShardError, match="past the end") as caught:
        scan(cut)
    assert caught.value.offset == header_offsets(data)[1]
    # Without a known size the parser still ends in an error at the end of the bytes.
    with pytest.raises(BadShardError):
        scan(cut, size_known=False)


def test_truncated_header() -> None:
    data = build_tar([member("a.txt", b"a" * 100), member("b.txt", b"b")])
    cut = data[: header_offsets(data)[1] + 100]
    with pytest.raises(BadShardError, match="truncated tar header") as caught:
        scan(cut)
    assert caught.value.offset == header_offsets(data)[1]


def test_corrupt_header_checksum() -> None:
    data = build_tar([member("a.txt", b"a" * 700), member("b.txt", b"b")])
    second = header_offsets(data)[1]
    damaged = bytearray(data)
    damaged[second + 2] ^= 0x20  # a byte of the name, checksum left as it was
    with pytest.raises(BadShardError, match="corrupt tar header") as caught:
        scan(bytes(damaged))
    assert caught.value.offset == second
    assert f"byte {second}" in str(caught.value)


def test_missing_end_of_archive(tmp_path: Path, photos: list[tuple[int, bytes]]) -> None:
    path = tmp_path / "shard.tar"
    table, _ = write_shard(path, encoded_samples(photos[:3]))
    data = path.read_bytes()
    end = int(table.offsets[-1] + table.sizes[-1])
    with pytest.raises(BadShardError, match="end-of-archive") as caught:
        scan(data[:end])
    assert caught.value.offset == end


@contextlib.contextmanager
def read_end_of_pipe(data: bytes) -> Iterator[io.BufferedReader]:
    """A real non-seekable stream: the read end of an OS pipe fed by a thread."""
    read_fd, write_fd = os.pipe()

    def feed() -> None:
        with open(write_fd, "wb") as sink:
            sink.write(data)

    feeder = threading.Thread(target=feed, daemon=True)
    feeder.start()
    with open(read_fd, "rb") as source:
        assert not source.seekable()
        yield source
    feeder.join(timeout=10)


@pytest.mark.timeout(20)
@pytest.mark.parametrize(
    "size_field",
    [
        b"77777777777\0",  # 8 GiB - 1 in octal, the ustar maximum
        b"\x80" + (1 << 62).to_bytes(11, "big"),  # GNU base-256: 4 EiB
    ],
    ids=["octal-8GiB", "base256-4EiB"],
)
def test_declared_size_past_end_of_file(size_field: bytes) -> None:
    data = build_tar([member("a.txt", b"a" * 10), member("b.txt", b"b" * 10)])
    second = header_offsets(data)[1]
    hostile = patch_header(data, second, 124, size_field)
    with pytest.raises(BadShardError, match="past the end") as caught:
        scan(hostile)
    assert caught.value.offset == second
    with pytest.raises(BadShardError):
        scan(hostile, size_known=False)
    # Not seekable, size unknown: data is skipped by reading, which ends at the end of the pipe.
    with read_end_of_pipe(hostile) as stream, pytest.raises(BadShardError):
        list(iter_members(stream, shard="hostile.tar"))


def test_negative_declared_size() -> None:
    data = build_tar([member("a.txt", b"a" * 10)])
    hostile = patch_header(data, 0, 124, b"\xff" * 12)  # base-256 -1
    with pytest.raises(BadShardError):
        scan(hostile)


def test_oversized_pax_header_refused() -> None:
    data = build_tar([member("x" * 200 + ".txt", b"x")], format=tarfile.PAX_FORMAT)
    hostile = patch_header(data, 0, 124, b"%011o\0" % (2 << 20)) + b"\0" * (2 << 20)
    with pytest.raises(BadShardError, match="metadata header"):
        scan(hostile)


def test_pax_name_with_dot_dot_refused() -> None:
    data = build_tar([member("../" * 40 + "evil.txt", b"x")], format=tarfile.PAX_FORMAT)
    with pytest.raises(UnsafeMemberError) as caught:
        scan(data)
    assert caught.value.offset == 0  # the PAX header, where the member begins


def pax_header(records: dict[str, str]) -> bytes:
    body = b""
    for key, value in records.items():
        record = f" {key}={value}\n".encode()
        length = len(record) + len(str(len(record)))
        length = len(record) + len(str(length))
        body += str(length).encode() + record
    info = tarfile.TarInfo("././@PaxHeader")
    info.type = tarfile.XHDTYPE
    info.size = len(body)
    return info.tobuf(tarfile.USTAR_FORMAT) + body + b"\0" * (-len(body) % BLOCK)


def test_pax_size_then_gnu_long_name() -> None:
    name = "n" * 150 + "/file.txt"
    payload = b"P" * 700
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    data = (
        pax_header({"size": str(len(payload))})
        + info.tobuf(tarfile.GNU_FORMAT)  # a GNU long-name header, then the file's header
        + payload
        + b"\0" * (-len(payload) % BLOCK + 2 * BLOCK)
    )
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as archive:
        (reference,) = archive.getmembers()
    (found,) = scan(data)
    assert (found.name, found.data_offset, found.size) == (
        reference.name,
        reference.offset_data,
        reference.size,
    )


# ---------------------------------------------------------------------------------------------
# Grouping members into samples


def members_named(*names: str) -> Iterator[Member]:
    offset = 0
    for name in names:
        yield Member(name=name, header_offset=offset, data_offset=offset + BLOCK, size=1)
        offset += 2 * BLOCK


def test_iter_samples_groups_consecutive_members() -> None:
    samples = list(
        iter_samples(
            members_named("a.jpg", "a.cls", "b.jpg", "README", "c/.hidden.txt", "c/d.x.y"),
            shard="s.tar",
        )
    )
    assert [(s.key, [m.name for m in s.members]) for s in samples] == [
        ("a", ["a.jpg", "a.cls"]),
        ("b", ["b.jpg"]),
        ("c/d", ["c/d.x.y"]),
    ]
    assert samples[0].start == 0 and samples[0].end == 4 * BLOCK


def test_iter_samples_duplicate_extension() -> None:
    with pytest.raises(BadShardError, match="appears twice") as caught:
        list(iter_samples(members_named("a.jpg", "a.cls", "a.jpg"), shard="s.tar"))
    assert caught.value.key == "a" and caught.value.offset == 4 * BLOCK


def test_iter_samples_key_reappears_apart() -> None:
    with pytest.raises(BadShardError, match="apart") as caught:
        list(iter_samples(members_named("a.jpg", "b.jpg", "a.cls"), shard="s.tar"))
    assert caught.value.key == "a" and caught.value.offset == 4 * BLOCK


def test_iter_samples_skips_hidden_files_like_macos_appledouble() -> None:
    # bsdtar on macOS writes "._NAME" resource-fork members right before NAME.
    names = ("._a.jpg", "a.jpg", "a.cls", "._b.jpg", "b.jpg", "d/._c.jpg", "d/c.jpg", ".hidden")
    samples = list(iter_samples(members_named(*names), shard="s.tar"))
    assert [(s.key, [m.name for m in s.members]) for s in samples] == [
        ("a", ["a.jpg", "a.cls"]),
        ("b", ["b.jpg"]),
        ("d/c", ["d/c.jpg"]),
    ]


def test_dali_index_refuses_keys_with_whitespace() -> None:
    fields = [Field(name="txt", kind="str")]
    table = table_from_scan([], fields, None)
    table.keys = ["a b"]
    table.field_offsets = np.zeros((1, 1), np.int64)
    table.field_sizes = np.zeros((1, 1), np.int64)
    with pytest.raises(ValueError, match="whitespace"):
        dali_index_text(table, fields)


@pytest.mark.parametrize(
    "name", ["a.jpg", "class-00/photo-000001.jpg", "x" * 99, "ünï.txt", "z" * 150]
)
@pytest.mark.parametrize("size", [0, 1, 511, 512, 33_000, 8**11 - 1, 10**12])
def test_fast_header_is_byte_identical_to_tarfile(name: str, size: int) -> None:
    from dataflow.formats.tar import _tarfile_header, member_header

    assert member_header(name, size) == _tarfile_header(name, size)
