"""S3 storage against a real local S3 server over HTTP, through the fsspec/s3fs path users
take; faults are injected at the HTTP level by ``support.faultproxy.FaultProxy`` standing
between the client and the server.

Request-level faults (503 SlowDown, 500, stalls before the status line) are retried inside
botocore; a body that breaks mid-stream is resumed by ``read_range``, which asks only for
the missing tail, pinned to the first response's ETag.
"""

from __future__ import annotations

import dataclasses
import random
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import boto3
import pytest
from support.faultproxy import FaultProxy, FaultSchedule

from dataflow.errors import DatasetIndexError
from dataflow.index import DatasetIndex
from dataflow.storage import (
    StorageConfig,
    StorageError,
    exists,
    list_files,
    list_objects,
    make_bucket,
    may_create_bucket,
    open_read,
    open_write,
    read_bytes,
    read_into,
    read_range,
    read_ranges,
    remove,
    remove_tree,
    size,
    write_bytes,
)
from dataflow.storage import io as storage_io
from dataflow.storage.local_s3 import free_port

if TYPE_CHECKING:
    from conftest import S3Bucket

pytestmark = pytest.mark.timeout(60)

KiB = 1024
MiB = 1024 * KiB


def random_bytes(length: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(length)


@pytest.fixture
def proxy(s3: S3Bucket) -> Iterator[FaultProxy]:
    """A fault proxy in front of the test's S3 server; no faults until a test sets some."""
    with FaultProxy(s3.server.endpoint_url) as running:
        yield running


def through(proxy: FaultProxy, config: StorageConfig, **changes: object) -> StorageConfig:
    """``config`` pointed at the proxy instead of the server."""
    return dataclasses.replace(config, endpoint_url=proxy.url, **changes)  # type: ignore[arg-type]


def get_events(proxy: FaultProxy) -> list[tuple[str, int | None]]:
    return [(event.fault, event.status) for event in proxy.events if event.method == "GET"]


# ---------------------------------------------------------------------------------------------
# Round trips


def test_write_read_list_remove(s3: S3Bucket) -> None:
    config = s3.config
    data = random_bytes(100_000)
    url = f"{s3.url}/dir/data.bin"
    write_bytes(url, data, config=config)

    assert exists(url, config=config)
    assert size(url, config=config) == len(data)
    assert read_bytes(url, config=config) == data
    assert read_range(url, 12_345, 67_890, config=config) == data[12_345:67_890]
    assert read_range(url, 99_990, None, config=config) == data[99_990:]
    assert read_range(url, 500, 500, config=config) == b""
    buffer = bytearray(1000)
    read_into(url, 40_000, buffer, config=config)
    assert buffer == data[40_000:41_000]
    with pytest.raises(StorageError, match="has only 100000 bytes"):
        read_into(url, 99_500, buffer, config=config)
    with open_read(url, config=config) as handle:
        handle.seek(50_000)
        assert handle.read(10) == data[50_000:50_010]

    write_bytes(f"{s3.url}/dir/sub/b.bin", b"bb", config=config)
    write_bytes(f"{s3.url}/dir/a.bin", b"", config=config)
    write_bytes(f"{s3.url}/other.bin", b"o", config=config)
    assert list_objects(f"{s3.url}/dir/", config=config) == [
        (f"{s3.url}/dir/a.bin", 0),
        (url, len(data)),
        (f"{s3.url}/dir/sub/b.bin", 2),
    ]
    assert read_bytes(f"{s3.url}/dir/a.bin", config=config) == b""

    remove(url, config=config)
    assert not exists(url, config=config)
    remove(url, config=config)  # missing_ok by default
    remove_tree(f"{s3.url}/dir", config=config)
    assert list_files(s3.url, config=config) == [f"{s3.url}/other.bin"]


def test_large_range_is_split_into_concurrent_pieces(s3: S3Bucket, proxy: FaultProxy) -> None:
    data = random_bytes(1_000_000, seed=1)
    url = f"{s3.url}/one-megabyte.bin"
    write_bytes(url, data, config=s3.config)
    config = through(proxy, s3.config, range_size=64 * KiB, connections=4)

    assert read_range(url, 1000, 900_000, config=config) == data[1000:900_000]
    # 899,000 bytes in 64 KiB pieces: 14 ranged GETs.
    assert get_events(proxy) == [("none", 206)] * 14

    rng = random.Random(2)
    ranges = []
    for _ in range(20):
        start = rng.randrange(0, len(data))
        ranges.append((start, rng.randrange(start, len(data) + 1)))
    assert read_ranges(url, ranges, config=config) == [data[s:e] for s, e in ranges]


def test_open_write_publishes_only_on_success(s3: S3Bucket, tmp_path: Path) -> None:
    url = f"{s3.url}/written.bin"
    spool = str(tmp_path)
    with (
        pytest.raises(RuntimeError, match="boom"),
        open_write(url, config=s3.config, spool_dir=spool) as handle,
    ):
        handle.write(b"half an object")
        raise RuntimeError("boom")
    assert not exists(url, config=s3.config)
    assert list(tmp_path.iterdir()) == []  # the spool file is gone too

    with open_write(url, config=s3.config, spool_dir=str(tmp_path)) as handle:
        handle.write(b"a whole ")
        handle.write(b"object")
    assert read_bytes(url, config=s3.config) == b"a whole object"
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# Faults injected at the HTTP level


def test_reset_mid_body_resumes_at_the_right_offset(s3: S3Bucket, proxy: FaultProxy) -> None:
    data = random_bytes(4 * MiB, seed=3)
    url = f"{s3.url}/four-megabytes.bin"
    write_bytes(url, data, config=s3.config)
    proxy.set_schedule(FaultSchedule(script=("reset_mid_body",)))

    assert read_bytes(url, config=through(proxy, s3.config)) == data

    stats = proxy.stats
    assert stats["faults"]["reset_mid_body"] == 1
    # The resumed GET is a range request for the tail only. Re-fetching the whole object
    # would forward half of it (before the reset) plus all of it: 1.5 x its size.
    assert get_events(proxy) == [("reset_mid_body", None), ("none", 206)]
    assert stats["bytes_forwarded"] < 1.5 * len(data)


def test_slowdown_and_server_errors_are_retried(s3: S3Bucket, proxy: FaultProxy) -> None:
    data = random_bytes(300_000, seed=4)
    url = f"{s3.url}/object.bin"
    write_bytes(url, data, config=s3.config)
    proxy.set_schedule(FaultSchedule(script=("slowdown_503", "error_500")))

    assert read_bytes(url, config=through(proxy, s3.config)) == data

    assert proxy.stats["faults"] == {
        "reset_mid_body": 0,
        "slowdown_503": 1,
        "error_500": 1,
        "denied_403": 0,
        "stall": 0,
    }
    assert get_events(proxy) == [("slowdown_503", 503), ("error_500", 500), ("none", 200)]


def test_stall_longer_than_read_timeout_is_retried(s3: S3Bucket, proxy: FaultProxy) -> None:
    data = random_bytes(200_000, seed=5)
    url = f"{s3.url}/object.bin"
    write_bytes(url, data, config=s3.config)
    # The proxy stays silent for 10 s, then closes: only a working read timeout (1 s) lets
    # the retry start well before that.
    proxy.set_schedule(FaultSchedule(script=("stall",), stall_seconds=10))
    config = through(proxy, s3.config, read_timeout_s=1)

    began = time.monotonic()
    assert read_bytes(url, config=config) == data
    elapsed = time.monotonic() - began

    assert get_events(proxy) == [("stall", None), ("none", 200)]
    assert elapsed < 8, elapsed


def test_random_faults_over_many_reads_are_all_exact(s3: S3Bucket, proxy: FaultProxy) -> None:
    objects = {f"{s3.url}/many/{n:02d}.bin": random_bytes(256 * KiB, seed=n) for n in range(30)}
    for url, data in objects.items():
        write_bytes(url, data, config=s3.config)
    proxy.set_schedule(FaultSchedule(seed=6, reset_mid_body=0.2, slowdown_503=0.1))
    config = through(proxy, s3.config, range_size=64 * KiB, connections=4)

    def read(number: int, url: str) -> bytes:
        if number % 2:
            # A bounded range larger than range_size: four concurrent 64 KiB GETs.
            return read_range(url, 0, 256 * KiB, config=config)
        return read_bytes(url, config=config)

    # Several reader threads at once, as data-loading workers do; it also overlaps
    # botocore's SlowDown backoffs (up to 1 s each) so the test stays short.
    with ThreadPoolExecutor(max_workers=6) as pool:
        results = list(pool.map(read, range(len(objects)), objects))
    for url, result in zip(objects, results, strict=True):
        assert result == objects[url], url

    faults = proxy.stats["faults"]
    assert faults["reset_mid_body"] > 0
    assert faults["slowdown_503"] > 0


def test_missing_key_is_a_quick_not_found_error(s3: S3Bucket, proxy: FaultProxy) -> None:
    url = f"{s3.url}/no/such/key.bin"
    began = time.monotonic()
    with pytest.raises(StorageError) as caught:
        read_bytes(url, config=through(proxy, s3.config))
    assert time.monotonic() - began < 5
    message = str(caught.value)
    assert "not found" in message
    assert url in message
    # Permanent: asked once, not retried.
    assert get_events(proxy) == [("none", 404)]

    with pytest.raises(StorageError, match="not found"):
        size(url, config=s3.config)


def test_a_reset_inside_an_error_response_is_retried(s3: S3Bucket, proxy: FaultProxy) -> None:
    """botocore does not retry a reset while it reads an error body (aiohttp's payload error):
    found when a deleted shard's 404 met a reset and the read gave up "on transient faults
    after 1 attempt". It is retried now, and the answer is the 404's."""
    url = f"{s3.url}/gone.bin"
    proxy.set_schedule(FaultSchedule(script=("reset_mid_body", "reset_mid_body")))
    with pytest.raises(StorageError) as caught:
        read_bytes(url, config=through(proxy, s3.config))
    message = str(caught.value)
    assert "not found (NoSuchKey)" in message and "after 3 attempts" in message, message
    assert get_events(proxy) == [("reset_mid_body", None), ("reset_mid_body", None),
                                 ("none", 404)]  # fmt: skip


def test_persistent_body_resets_give_up_after_max_attempts(s3: S3Bucket, proxy: FaultProxy) -> None:
    data = random_bytes(1 * MiB, seed=7)
    url = f"{s3.url}/object.bin"
    write_bytes(url, data, config=s3.config)
    proxy.set_schedule(FaultSchedule(reset_mid_body=1.0))
    config = through(proxy, s3.config, max_attempts=2)

    began = time.monotonic()
    with pytest.raises(StorageError) as caught:
        read_bytes(url, config=config)
    assert time.monotonic() - began < 15

    message = str(caught.value)
    assert url in message
    assert "after 2 attempts" in message
    assert "transient" in message
    assert caught.value.attempts == 2
    assert proxy.stats["faults"]["reset_mid_body"] == 2


@pytest.mark.parametrize(
    "schedule",
    [
        FaultSchedule(slowdown_503=1.0),
        FaultSchedule(error_500=1.0),
        FaultSchedule(stall=1.0, stall_seconds=30),
    ],
    ids=["slowdown_503", "error_500", "stall"],
)
def test_persistent_request_faults_give_up_after_max_attempts(
    s3: S3Bucket, proxy: FaultProxy, schedule: FaultSchedule
) -> None:
    url = f"{s3.url}/object.bin"
    write_bytes(url, b"x" * 100_000, config=s3.config)
    proxy.set_schedule(schedule)
    config = through(proxy, s3.config, max_attempts=2, read_timeout_s=1)

    began = time.monotonic()
    with pytest.raises(StorageError) as caught:
        read_bytes(url, config=config)
    assert time.monotonic() - began < 15

    message = str(caught.value)
    assert url in message
    assert "gave up on transient faults" in message
    # A timeout carries no response to read botocore's retry count from: every request is
    # counted as it is sent instead.
    assert "after 2 attempts in " in message, message
    assert caught.value.attempts == 2
    # botocore's total_max_attempts counts the first try: two GETs in all, not three.
    assert proxy.stats["requests"] == 2
    assert sum(proxy.stats["faults"].values()) == 2


def test_object_replaced_between_attempts_is_never_stitched(
    s3: S3Bucket, proxy: FaultProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    old = random_bytes(2 * MiB, seed=8)
    new = random_bytes(2 * MiB, seed=9)
    url = f"{s3.url}/replaced.bin"
    write_bytes(url, old, config=s3.config)
    proxy.set_schedule(FaultSchedule(script=("reset_mid_body",)))

    # Replace the object while the reader backs off before resuming. This runs on the event
    # loop of the read, so it uses a plain (blocking) boto3 client, not the storage API.
    client = boto3.client("s3", endpoint_url=s3.server.endpoint_url, region_name="us-east-1")
    bucket, key = url.removeprefix("s3://").split("/", 1)
    real_backoff = storage_io.backoff_delay

    def replace_then_back_off(attempt: int, config: StorageConfig) -> float:
        client.put_object(Bucket=bucket, Key=key, Body=new)
        return real_backoff(attempt, config)

    monkeypatch.setattr(storage_io, "backoff_delay", replace_then_back_off)
    with pytest.raises(StorageError) as caught:
        read_bytes(url, config=through(proxy, s3.config))
    assert "PreconditionFailed" in str(caught.value)
    assert url in str(caught.value)

    monkeypatch.setattr(storage_io, "backoff_delay", real_backoff)
    assert read_bytes(url, config=s3.config) == new


@pytest.mark.parametrize("start", [10, 11, 1000])
def test_read_to_the_end_from_at_or_past_the_end_is_empty_like_a_file(
    s3: S3Bucket, tmp_path: Path, start: int
) -> None:
    data = b"0123456789"
    local = str(tmp_path / "ten.bin")
    write_bytes(local, data)
    url = f"{s3.url}/ten.bin"
    write_bytes(url, data, config=s3.config)
    # S3 answers 416 to "bytes=<start>-" here; local files read nothing.
    assert read_range(local, start, None) == b""
    assert read_range(url, start, None, config=s3.config) == b""


def test_bounded_read_past_the_end_is_an_error(s3: S3Bucket, tmp_path: Path) -> None:
    url = f"{s3.url}/ten.bin"
    write_bytes(url, b"0123456789", config=s3.config)
    for start, end in [(5, 15), (10, 11), (20, 30)]:
        with pytest.raises(StorageError) as caught:
            read_range(url, start, end, config=s3.config)
        assert url in str(caught.value)
        assert f"bytes [{start}, {end})" in str(caught.value)
    with pytest.raises(StorageError, match="the object has only 10 bytes"):
        read_range(url, 5, 15, config=s3.config)


# ---------------------------------------------------------------------------------------------
# Spool files of remote writes

# A writer that dies (SIGKILL) while its object is half spooled, or (argument "hold") that
# keeps writing until the test lets it go.
_SPOOLING_WRITER = """
import os, signal, sys
from dataflow.storage import StorageConfig, open_write
endpoint, url, spool, mode = sys.argv[1:]
with open_write(url, config=StorageConfig(endpoint_url=endpoint), spool_dir=spool) as handle:
    handle.write(b"half an object")
    handle.flush()
    if mode == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    print("spooling", flush=True)
    sys.stdin.readline()
"""


def _writer(s3: S3Bucket, url: str, spool: Path, mode: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-c", _SPOOLING_WRITER, s3.config.endpoint_url, url, str(spool), mode],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE,
    )  # fmt: skip


def test_a_killed_writers_spool_file_is_removed_by_the_next_writer(
    s3: S3Bucket, tmp_path: Path
) -> None:
    spool = tmp_path / "spool"
    spool.mkdir()
    url = f"{s3.url}/object.bin"
    killed = _writer(s3, url, spool, "kill")
    assert killed.wait(timeout=60) == -signal.SIGKILL
    # kill -9 runs no cleanup: the half-spooled file stays, named after its dead owner.
    (left,) = spool.iterdir()
    assert f"-{killed.pid}-" in left.name, left.name
    # A live writer's spool file is in use: the sweep must leave it alone.
    live = _writer(s3, f"{s3.url}/live.bin", spool, "hold")
    try:
        assert live.stdout is not None and live.stdout.readline() == b"spooling\n"
        (live_spool,) = (path for path in spool.iterdir() if f"-{live.pid}-" in path.name)

        with open_write(url, config=s3.config, spool_dir=str(spool)) as handle:
            handle.write(b"a whole object")

        assert read_bytes(url, config=s3.config) == b"a whole object"
        assert list(spool.iterdir()) == [live_spool]
    finally:
        assert live.stdin is not None
        live.stdin.write(b"done\n")
        live.stdin.close()
        assert live.wait(timeout=60) == 0
    assert read_bytes(f"{s3.url}/live.bin", config=s3.config) == b"half an object"
    assert list(spool.iterdir()) == []


def test_a_failed_upload_leaves_no_spool_file(s3: S3Bucket, tmp_path: Path) -> None:
    # The bucket does not exist: the upload itself fails after the block ran cleanly.
    url = f"s3://no-such-bucket-{s3.url[-12:]}/object.bin"
    with (
        pytest.raises(StorageError),
        open_write(url, config=s3.config, spool_dir=str(tmp_path)) as handle,
    ):
        handle.write(b"an object with nowhere to go")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# Messages that say what happened


def _seconds_in(message: str) -> float:
    match = re.search(r"after \d+ attempts in (\d+\.\d) s", message)
    assert match, message
    return float(match.group(1))


def test_an_unreachable_endpoint_reports_every_attempt_and_the_time(tmp_path: Path) -> None:
    """Found as "after 1 attempt" printed after 43 s: botocore retries a refused connection
    itself, and an error without a response cannot tell how often it tried."""
    config = StorageConfig(endpoint_url=f"http://127.0.0.1:{free_port()}", max_attempts=3)
    url = "s3://bucket/object.bin"
    for operation in (
        lambda: read_bytes(url, config=config),
        lambda: size(url, config=config),
        lambda: write_bytes(url, b"x", config=config),
    ):
        began = time.monotonic()
        with pytest.raises(StorageError) as caught:
            operation()
        elapsed = time.monotonic() - began
        message = str(caught.value)
        assert "gave up on transient faults" in message and url in message, message
        assert "after 3 attempts in " in message, message
        assert caught.value.attempts == 3
        assert 0 < _seconds_in(message) <= elapsed + 0.05, (message, elapsed)


def test_a_missing_bucket_is_named_and_not_read_as_a_missing_dataset(s3: S3Bucket) -> None:
    bucket = f"no-such-bucket-{s3.url[-12:]}"
    with pytest.raises(StorageError) as caught:
        DatasetIndex.load(f"s3://{bucket}/photos", config=s3.config)
    message = str(caught.value)
    assert f"bucket '{bucket}' does not exist (NoSuchBucket)" in message, message
    assert "convert" not in message  # not "index.json does not exist: convert the dataset"
    for operation in (read_bytes, size, list_objects):
        with pytest.raises(StorageError, match=f"bucket '{bucket}' does not exist"):
            operation(f"s3://{bucket}/photos/index.json", config=s3.config)
    # A missing key in a bucket that exists is still a missing dataset.
    with pytest.raises(DatasetIndexError, match=r"index\.json does not exist"):
        DatasetIndex.load(f"{s3.url}/photos", config=s3.config)


def test_a_write_creates_a_missing_bucket_only_when_allowed(s3: S3Bucket) -> None:
    bucket = f"new-bucket-{s3.url[-12:]}"
    refused = dataclasses.replace(s3.config, create_bucket=False)
    with pytest.raises(StorageError) as caught:
        make_bucket(f"s3://{bucket}/photos", config=refused)
    message = str(caught.value)
    assert f"bucket '{bucket}' does not exist" in message, message
    assert "storage.create_bucket = true" in message, message
    assert not exists(f"s3://{bucket}", config=s3.config)
    # The embedded server is on loopback: there, unset means allowed.
    make_bucket(f"s3://{bucket}/photos", config=s3.config)
    write_bytes(f"s3://{bucket}/photos/a.bin", b"a", config=refused)
    assert read_bytes(f"s3://{bucket}/photos/a.bin", config=refused) == b"a"


@pytest.mark.parametrize(
    ("endpoint", "loopback"),
    [
        ("http://127.0.0.1:9000", True),
        ("http://127.0.0.53", True),
        ("http://localhost:9000", True),
        ("http://[::1]:9000", True),
        ("https://s3.us-east-1.amazonaws.com", False),
        ("http://192.0.2.7:9000", False),
        ("http://minio.invalid:9000", False),
        ("", False),  # AWS itself
    ],
)
def test_only_a_loopback_endpoint_may_create_buckets_by_default(
    endpoint: str, loopback: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    config = StorageConfig(endpoint_url=endpoint)
    assert may_create_bucket(config) is loopback
    assert may_create_bucket(dataclasses.replace(config, create_bucket=True))
    assert not may_create_bucket(dataclasses.replace(config, create_bucket=False))


def test_convert_to_a_missing_bucket_says_which_setting_to_flip(
    s3: S3Bucket, photo_folder: Path, tmp_path: Path
) -> None:
    bucket = f"missing-{s3.url[-12:]}"
    done = subprocess.run(
        [sys.executable, str(Path(__file__).parents[2] / "tools" / "convert.py"),
         "--input", str(photo_folder), "--output", f"s3://{bucket}/photos", "--quiet",
         f"--storage.endpoint_url={s3.config.endpoint_url}", "--storage.create_bucket=false"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert f"bucket '{bucket}' does not exist" in lines[0]
    assert "storage.create_bucket = true" in lines[0]
