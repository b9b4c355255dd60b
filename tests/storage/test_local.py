"""Local storage (plain paths and ``file://`` URLs), URL helpers, redaction and the
transient/permanent fault classification in ``dataflow/storage``."""

from __future__ import annotations

import errno
import os
import random
from pathlib import Path

import botocore.exceptions
import pytest

from dataflow.storage import (
    StorageConfig,
    StorageError,
    exists,
    is_local,
    is_transient,
    join_url,
    list_files,
    list_objects,
    local_path,
    normalize_url,
    open_read,
    open_write,
    protocol_of,
    read_bytes,
    read_into,
    read_range,
    read_ranges,
    redact,
    remove,
    remove_tree,
    size,
    upload_file,
    write_bytes,
)

BLOCK = 4096
FILE_SIZE = 50_000  # not a multiple of BLOCK: the last block is partial


@pytest.fixture
def data_file(tmp_path: Path) -> tuple[Path, bytes]:
    data = random.Random(7).randbytes(FILE_SIZE)
    path = tmp_path / "data.bin"
    path.write_bytes(data)
    return path, data


def as_file_url(path: Path) -> str:
    return f"file://{path}"


def hidden_temporaries(directory: Path) -> list[str]:
    return sorted(name for name in os.listdir(directory) if name.startswith("."))


# ---------------------------------------------------------------------------------------------
# Reads


@pytest.mark.parametrize("style", ["path", "file_url"])
def test_read_range_is_exact_across_block_boundaries(
    data_file: tuple[Path, bytes], style: str
) -> None:
    path, data = data_file
    url = str(path) if style == "path" else as_file_url(path)
    config = StorageConfig(block_size=BLOCK)
    rng = random.Random(11)
    ranges = [
        (0, 0),  # empty at the start
        (BLOCK, BLOCK),  # empty on a boundary
        (FILE_SIZE, FILE_SIZE),  # empty at the end
        (0, FILE_SIZE),
        (BLOCK - 1, BLOCK + 1),  # two bytes straddling a boundary
        (1, 3 * BLOCK - 1),  # unaligned both ends, several blocks
        (2 * BLOCK, 5 * BLOCK),  # aligned both ends
        (FILE_SIZE - 10, FILE_SIZE),  # the partial last block
    ]
    for _ in range(200):
        start = rng.randrange(0, FILE_SIZE + 1)
        ranges.append((start, rng.randrange(start, FILE_SIZE + 1)))
    for start, end in ranges:
        assert read_range(url, start, end, config=config) == data[start:end], (start, end)
    for start in (0, 1, BLOCK - 1, BLOCK, 3 * BLOCK + 17, FILE_SIZE - 1, FILE_SIZE):
        assert read_range(url, start, None, config=config) == data[start:], start
    assert read_bytes(url, config=config) == data
    assert read_ranges(url, ranges[:20], config=config) == [data[s:e] for s, e in ranges[:20]]


def test_read_into_fills_the_callers_buffer_exactly(data_file: tuple[Path, bytes]) -> None:
    import numpy as np

    path, data = data_file
    config = StorageConfig(block_size=BLOCK)
    rng = random.Random(12)
    buffer = np.full(FILE_SIZE + 8, 0xAB, np.uint8)  # reused, like the loader's pool
    for start, length in [(0, FILE_SIZE), (BLOCK - 1, 2), (7, 3 * BLOCK)] + [
        (s, rng.randrange(0, FILE_SIZE - s + 1)) for s in rng.sample(range(FILE_SIZE), 50)
    ]:
        read_into(str(path), start, buffer[:length], config=config)
        assert buffer[:length].tobytes() == data[start : start + length], (start, length)
    assert buffer[FILE_SIZE:].tolist() == [0xAB] * 8  # nothing written past the view
    with pytest.raises(StorageError, match="bytes \\[" + str(FILE_SIZE - 5)) as caught:
        read_into(str(path), FILE_SIZE - 5, buffer[:10], config=config)
    assert str(path) in str(caught.value)


def test_read_range_rejects_bad_ranges(data_file: tuple[Path, bytes]) -> None:
    path, _ = data_file
    with pytest.raises(ValueError, match=r"bad byte range \[10, 5\)"):
        read_range(str(path), 10, 5)
    with pytest.raises(ValueError, match="bad byte range"):
        read_range(str(path), -1, 5)


@pytest.mark.parametrize(("start", "end"), [(FILE_SIZE - 5, FILE_SIZE + 5), (60_000, 60_010)])
def test_read_past_end_of_file_raises_storage_error_naming_the_path(
    data_file: tuple[Path, bytes], start: int, end: int
) -> None:
    path, _ = data_file
    with pytest.raises(StorageError) as caught:
        read_range(str(path), start, end, config=StorageConfig(block_size=BLOCK))
    message = str(caught.value)
    assert str(path) in message
    assert f"bytes [{start}, {end})" in message
    assert isinstance(caught.value.__cause__, EOFError)
    assert caught.value.byte_range == (start, end)


@pytest.mark.parametrize("style", ["path", "file_url"])
def test_missing_file_is_not_found_error_naming_the_path(tmp_path: Path, style: str) -> None:
    path = tmp_path / "nope" / "missing.bin"
    url = str(path) if style == "path" else as_file_url(path)
    for call in (lambda: read_bytes(url), lambda: read_range(url, 0, 10), lambda: size(url)):
        with pytest.raises(StorageError) as caught:
            call()
        assert "not found" in str(caught.value)
        assert str(path) in str(caught.value)
        assert not is_transient(caught.value.__cause__)  # type: ignore[arg-type]


def test_open_read_seeks(data_file: tuple[Path, bytes]) -> None:
    path, data = data_file
    with open_read(as_file_url(path)) as handle:
        handle.seek(12_345)
        assert handle.read(100) == data[12_345:12_445]


# ---------------------------------------------------------------------------------------------
# Writes


@pytest.mark.parametrize("style", ["path", "file_url"])
def test_write_bytes_creates_parents_and_leaves_no_temporaries(tmp_path: Path, style: str) -> None:
    target = tmp_path / "a" / "b" / "c" / "out.bin"
    url = str(target) if style == "path" else as_file_url(target)
    write_bytes(url, b"first")
    assert target.read_bytes() == b"first"
    write_bytes(url, b"second, longer")  # replaces the old file whole
    assert target.read_bytes() == b"second, longer"
    assert os.listdir(target.parent) == ["out.bin"]


def test_write_bytes_failure_leaves_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with pytest.raises(TypeError):
        write_bytes(str(target), "not bytes")  # type: ignore[arg-type]
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["out.bin"]


def test_open_write_publishes_on_clean_exit(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "out.bin"
    with open_write(str(target)) as handle:
        handle.write(b"part one, ")
        # Nothing is visible at the final path until the block exits.
        assert not target.exists()
        handle.write(b"part two")
    assert target.read_bytes() == b"part one, part two"
    assert os.listdir(target.parent) == ["out.bin"]


def test_open_write_exception_publishes_nothing(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "out.bin"
    with pytest.raises(RuntimeError, match="boom"), open_write(str(target)) as handle:
        handle.write(b"half a file")
        raise RuntimeError("boom")
    assert not target.exists()
    assert os.listdir(target.parent) == []


def test_open_write_exception_keeps_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), open_write(as_file_url(target)) as handle:
        handle.write(b"new")
        raise RuntimeError("boom")
    assert target.read_bytes() == b"old"
    assert hidden_temporaries(tmp_path) == []


def test_upload_file_copies(tmp_path: Path, data_file: tuple[Path, bytes]) -> None:
    source, data = data_file
    target = tmp_path / "copies" / "deep" / "copy.bin"
    upload_file(str(source), as_file_url(target))
    assert target.read_bytes() == data
    assert source.read_bytes() == data
    assert hidden_temporaries(target.parent) == []


def test_upload_missing_source_leaves_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "out" / "copy.bin"
    with pytest.raises(FileNotFoundError):
        upload_file(str(tmp_path / "missing.bin"), str(target))
    assert os.listdir(target.parent) == []


# ---------------------------------------------------------------------------------------------
# Listing and metadata


def test_list_exists_size_remove(tmp_path: Path) -> None:
    root = tmp_path / "tree"
    files = {"b/2.bin": 20, "a/1.bin": 10, "a/z/3.bin": 3, "c.bin": 0, "a/0.bin": 7}
    for name, length in files.items():
        write_bytes(str(root / name), b"x" * length)
    expected = sorted((str(root / name), length) for name, length in files.items())
    assert list_objects(str(root)) == expected
    assert list_objects(as_file_url(root) + "/") == expected
    assert list_files(str(root)) == [name for name, _ in expected]
    # A URL naming one file lists that file.
    assert list_objects(str(root / "b/2.bin")) == [(str(root / "b/2.bin"), 20)]
    assert list_objects(str(tmp_path / "no-such-dir")) == []

    assert exists(str(root / "a/1.bin"))
    assert exists(as_file_url(root / "a/z/3.bin"))
    assert not exists(str(root / "a/missing.bin"))
    assert size(str(root / "b/2.bin")) == 20
    assert size(as_file_url(root / "c.bin")) == 0

    remove(str(root / "a/1.bin"))
    assert not exists(str(root / "a/1.bin"))
    remove(str(root / "a/1.bin"))  # missing_ok by default
    with pytest.raises(StorageError, match="not found"):
        remove(str(root / "a/1.bin"), missing_ok=False)

    remove_tree(as_file_url(root / "a"))
    assert not (root / "a").exists()
    assert list_files(str(root)) == [str(root / "b/2.bin"), str(root / "c.bin")]
    remove_tree(str(root / "a"))  # removing a missing tree is not an error


# ---------------------------------------------------------------------------------------------
# URL helpers


def test_protocol_of() -> None:
    assert protocol_of("s3://b/k/") == "s3"
    assert protocol_of("S3://b/k") == "s3"
    assert protocol_of("s3a://b/k") == "s3"
    assert protocol_of("file:///x") == "file"
    assert protocol_of("local:///x") == "file"
    assert protocol_of("rel/path") == "file"
    assert protocol_of("/abs/path") == "file"
    assert protocol_of("gs://b/k") == "gs"
    assert is_local("rel/path") and is_local("file:///x") and not is_local("s3://b/k")


def test_normalize_url() -> None:
    assert normalize_url("s3://b/k/") == "s3://b/k"
    assert normalize_url("s3://b/k") == "s3://b/k"
    assert normalize_url("file:///x") == "/x"
    assert normalize_url("file:///x/y/") == "/x/y"
    assert normalize_url("rel/path") == os.path.join(os.getcwd(), "rel", "path")
    assert local_path("file:///x/../y") == "/y"
    with pytest.raises(ValueError, match="s3://b/k is not a local path"):
        local_path("s3://b/k")


def test_join_url() -> None:
    assert join_url("s3://b/k/", "shard-0.tar") == "s3://b/k/shard-0.tar"
    assert join_url("s3://b/k", "a/", "/b") == "s3://b/k/a/b"
    assert join_url("s3://b", "", "k") == "s3://b/k"
    assert join_url("file:///x", "y", "z.bin") == "/x/y/z.bin"
    assert join_url("rel/path", "f") == os.path.join(os.getcwd(), "rel", "path", "f")


# ---------------------------------------------------------------------------------------------
# Redaction


SIGNATURE = "0123456789abcdef0123456789abcdef"
CREDENTIAL = "AKIAEXAMPLE%2F20240101%2Fus-east-1%2Fs3%2Faws4_request"
PRESIGNED = (
    "https://bucket.s3.amazonaws.com/key.tar?X-Amz-Algorithm=AWS4-HMAC-SHA256"
    f"&X-Amz-Credential={CREDENTIAL}&X-Amz-Date=20240101T000000Z"
    f"&X-Amz-Expires=3600&X-Amz-SignedHeaders=host&X-Amz-Signature={SIGNATURE}"
)


def test_redact_removes_signatures_and_credentials() -> None:
    redacted = redact(PRESIGNED)
    assert SIGNATURE not in redacted
    assert "AKIAEXAMPLE" not in redacted
    assert "X-Amz-Signature=***" in redacted
    assert "X-Amz-Credential=***" in redacted
    assert redacted.startswith("https://bucket.s3.amazonaws.com/key.tar?")

    assert redact("http://alice:hunter2@host:9000/b/k") == "http://***@host:9000/b/k"
    assert redact("see s3://bucket/a@b/key for details") == "see s3://bucket/a@b/key for details"
    assert redact("s3://bucket/plain/key") == "s3://bucket/plain/key"


def test_storage_error_message_never_contains_secrets() -> None:
    url = f"http://alice:hunter2@host:9000/b/k?X-Amz-Signature={SIGNATURE}"
    cause = ConnectionResetError(f"connection reset while fetching {url}")
    error = StorageError(url, "gave up", attempts=3, last_error=cause, byte_range=(0, 10))
    message = str(error)
    for secret in (SIGNATURE, "hunter2", "alice"):
        assert secret not in message
        assert secret not in error.url
    assert "http://***@host:9000/b/k" in message
    assert "after 3 attempts" in message
    assert "bytes [0, 10)" in message
    assert "ConnectionResetError" in message
    assert isinstance(error, OSError) and error.errno == errno.EIO


def test_read_error_message_redacts_the_url(tmp_path: Path) -> None:
    # A local path that happens to look like it carries a signed query.
    path = tmp_path / f"missing?X-Amz-Signature={SIGNATURE}"
    with pytest.raises(StorageError) as caught:
        read_bytes(str(path))
    assert SIGNATURE not in str(caught.value)
    assert "not found" in str(caught.value)


# ---------------------------------------------------------------------------------------------
# Transient or permanent


def client_error(code: str | None, status: int) -> botocore.exceptions.ClientError:
    response: dict = {"ResponseMetadata": {"HTTPStatusCode": status}}
    if code is not None:
        response["Error"] = {"Code": code, "Message": "test"}
    return botocore.exceptions.ClientError(response, "GetObject")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "error",
    [
        ConnectionResetError(errno.ECONNRESET, "reset"),
        TimeoutError("timed out"),
        BrokenPipeError(errno.EPIPE, "broken pipe"),
        OSError(errno.ECONNRESET, "reset by peer"),
        client_error("SlowDown", 503),
        client_error("InternalError", 500),
        client_error(None, 503),
        client_error("ServiceUnavailable", 503),
    ],
    ids=repr,
)
def test_transient_faults(error: BaseException) -> None:
    assert is_transient(error)


@pytest.mark.parametrize(
    "error",
    [
        FileNotFoundError(errno.ENOENT, "missing"),
        PermissionError(errno.EACCES, "denied"),
        IsADirectoryError(errno.EISDIR, "a directory"),
        client_error("AccessDenied", 403),
        client_error("NoSuchKey", 404),
        client_error(None, 404),
        ValueError("bad"),
        OSError(errno.EINVAL, "invalid"),
    ],
    ids=repr,
)
def test_permanent_faults(error: BaseException) -> None:
    assert not is_transient(error)


def test_translated_error_keeps_the_code_of_its_cause() -> None:
    # s3fs raises OSError(...) from the ClientError: the cause decides.
    try:
        try:
            raise client_error("SlowDown", 503)
        except botocore.exceptions.ClientError as cause:
            raise OSError(errno.EREMOTEIO, "remote I/O error") from cause
    except OSError as translated:
        assert is_transient(translated)
    try:
        try:
            raise client_error("AccessDenied", 403)
        except botocore.exceptions.ClientError as cause:
            raise OSError(errno.ECONNRESET, "looks transient but is not") from cause
    except OSError as translated:
        assert not is_transient(translated)
