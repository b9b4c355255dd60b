"""Tests for the fault-injecting S3 proxy in ``tests/support/faultproxy.py``.

A module-scoped moto S3 server holds the objects; every test runs its own proxy in front
of it (or in front of a raw recording upstream, to check byte-exact forwarding).
"""

from __future__ import annotations

import contextlib
import http.client
import os
import socket
import socketserver
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import boto3
import botocore.config
import botocore.exceptions
import pytest
import s3fs
from moto.server import ThreadedMotoServer

from .faultproxy import FaultProxy, FaultSchedule, s3_error_body

BUCKET = "faultproxy-test"
BIG_KEY = "big.bin"  # 3 MB
TWO_MB_KEY = "two-mb.bin"
SMALL_KEY = "small.txt"
CREDS: dict[str, str] = {
    "region_name": "us-east-1",
    "aws_access_key_id": "testing",
    "aws_secret_access_key": "testing",
}
# botocore's ``max_attempts`` counts *retries* (max_attempts=1 means two attempts);
# ``total_max_attempts=1`` is what really disables retrying.
NO_RETRY: dict[str, Any] = {"total_max_attempts": 1, "mode": "standard"}
# Raw http.client requests need *some* Authorization header: moto treats requests without
# one as anonymous (403 on private objects); it does not verify signatures.
AUTH = {
    "Authorization": "AWS4-HMAC-SHA256 Credential=testing/20250101/us-east-1/s3/aws4_request, "
    "SignedHeaders=host, Signature=00"
}


@dataclass
class S3Env:
    url: str
    big: bytes
    two_mb: bytes
    small: bytes
    direct: Any = field(repr=False)  # boto3 client talking to moto without the proxy


@pytest.fixture(scope="module")
def s3env() -> Iterator[S3Env]:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    direct = boto3.client("s3", endpoint_url=url, **CREDS)
    direct.create_bucket(Bucket=BUCKET)
    env = S3Env(
        url=url,
        big=os.urandom(3_000_000),
        two_mb=os.urandom(2_000_000),
        small=b"hello faultproxy\n",
        direct=direct,
    )
    direct.put_object(Bucket=BUCKET, Key=BIG_KEY, Body=env.big)
    direct.put_object(Bucket=BUCKET, Key=TWO_MB_KEY, Body=env.two_mb)
    direct.put_object(Bucket=BUCKET, Key=SMALL_KEY, Body=env.small)
    try:
        yield env
    finally:
        server.stop()


def boto_client(url: str, **config: Any) -> Any:
    return boto3.client("s3", endpoint_url=url, config=botocore.config.Config(**config), **CREDS)


def s3fs_client(url: str, *, retries: int = 1, **config: Any) -> s3fs.S3FileSystem:
    fs = s3fs.S3FileSystem(
        key="testing",
        secret="testing",
        client_kwargs={"endpoint_url": url, "region_name": "us-east-1"},
        config_kwargs={"retries": {"total_max_attempts": retries}, **config},
        skip_instance_cache=True,
    )
    fs.retries = retries  # s3fs's own retry loop (_error_wrapper); not a constructor arg
    return fs


def raw_conn(url: str, timeout: float = 10.0) -> http.client.HTTPConnection:
    host, port = url.removeprefix("http://").split(":")
    return http.client.HTTPConnection(host, int(port), timeout=timeout)


def proxy_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("faultproxy")]


# -- pass-through ----------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_passthrough_boto3_and_s3fs(s3env: S3Env) -> None:
    with FaultProxy(s3env.url) as proxy:
        assert proxy.url.startswith("http://127.0.0.1:")
        client = boto_client(proxy.url, retries=NO_RETRY)
        assert client.get_object(Bucket=BUCKET, Key=BIG_KEY)["Body"].read() == s3env.big
        head = client.head_object(Bucket=BUCKET, Key=BIG_KEY)
        assert head["ContentLength"] == len(s3env.big)
        ranged = client.get_object(Bucket=BUCKET, Key=BIG_KEY, Range="bytes=10-19")
        assert ranged["Body"].read() == s3env.big[10:20]

        fs = s3fs_client(proxy.url)
        assert fs.cat_file(f"{BUCKET}/{BIG_KEY}") == s3env.big
        upload = os.urandom(6_000_000)
        fs.pipe_file(f"{BUCKET}/uploaded.bin", upload)
        assert fs.cat_file(f"{BUCKET}/uploaded.bin") == upload
        direct = s3env.direct.get_object(Bucket=BUCKET, Key="uploaded.bin")["Body"].read()
        assert direct == upload
        # Multipart through the proxy as well (s3fs writes 5 MiB parts here).
        with fs.open(f"{BUCKET}/multipart.bin", "wb", block_size=5 * 2**20) as f:
            f.write(upload * 2)
        assert fs.cat_file(f"{BUCKET}/multipart.bin") == upload * 2

        stats = proxy.stats
    assert stats["faults"] == dict.fromkeys(stats["faults"], 0)
    assert stats["requests"] >= 8
    assert stats["bytes_forwarded"] >= 3 * len(s3env.big)
    assert stats["bytes_uploaded"] >= 3 * len(upload)
    assert stats["upstream_errors"] == 0
    # boto3 and aiohttp both keep their connections alive through the proxy.
    assert stats["connections"] < stats["requests"]


@pytest.mark.timeout(60)
def test_keepalive_head_and_chunked_put_with_moto(s3env: S3Env) -> None:
    with FaultProxy(s3env.url) as proxy:
        conn = raw_conn(proxy.url)
        conn.request("HEAD", f"/{BUCKET}/{BIG_KEY}", headers=AUTH)
        resp = conn.getresponse()
        assert resp.status == 200
        assert resp.getheader("Content-Length") == str(len(s3env.big))
        assert resp.read() == b""
        payload = os.urandom(200_000)
        pieces = (payload[i : i + 30_000] for i in range(0, len(payload), 30_000))
        conn.request(
            "PUT", f"/{BUCKET}/chunked.bin", body=pieces, headers=AUTH, encode_chunked=True
        )
        resp = conn.getresponse()
        resp.read()
        assert resp.status == 200
        conn.request("GET", f"/{BUCKET}/{SMALL_KEY}", headers=AUTH)
        resp = conn.getresponse()
        assert (resp.status, resp.read()) == (200, s3env.small)
        conn.close()
        assert proxy.stats["connections"] == 1
        assert proxy.stats["requests"] == 3
    assert s3env.direct.get_object(Bucket=BUCKET, Key="chunked.bin")["Body"].read() == payload


# -- byte-exact forwarding against a raw upstream --------------------------------------

RAW_PAYLOAD = bytes(range(256)) * 1200  # 307200 bytes


class _RecordingHandler(socketserver.StreamRequestHandler):
    server: _RecordingServer

    def handle(self) -> None:
        self.server.connections += 1
        with contextlib.suppress(ConnectionError):
            self._serve()

    def _serve(self) -> None:
        while True:
            request_line = self.rfile.readline()
            if not request_line:
                return
            head = [request_line]
            while (line := self.rfile.readline()) not in (b"\r\n", b""):
                head.append(line)
            headers = {
                k.strip().lower(): v.strip()
                for k, _, v in (h.decode("latin-1").partition(":") for h in head[1:])
            }
            body = b""
            if headers.get("transfer-encoding", "").lower() == "chunked":
                while True:
                    size_line = self.rfile.readline()
                    body += size_line
                    size = int(size_line.split(b";")[0], 16)
                    if size == 0:
                        while (trailer := self.rfile.readline()) not in (b"\r\n", b""):
                            body += trailer
                        body += b"\r\n"
                        break
                    body += self.rfile.read(size + 2)
            elif "content-length" in headers:
                body = self.rfile.read(int(headers["content-length"]))
            self.server.requests.append((b"".join(head), body))
            path = request_line.split()[1]
            if path == b"/chunked":
                out = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                for i in range(0, len(RAW_PAYLOAD), 50_000):
                    piece = RAW_PAYLOAD[i : i + 50_000]
                    out += b"%x\r\n%b\r\n" % (len(piece), piece)
                self.wfile.write(out + b"0\r\n\r\n")
            elif path == b"/close-delimited":
                self.wfile.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + RAW_PAYLOAD)
                return
            else:
                self.wfile.write(b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok")


class _RecordingServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _RecordingHandler)
        self.requests: list[tuple[bytes, bytes]] = []
        self.connections = 0


@pytest.fixture
def recording_upstream() -> Iterator[_RecordingServer]:
    server = _RecordingServer()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.mark.timeout(60)
def test_request_bytes_and_headers_forwarded_unchanged(
    recording_upstream: _RecordingServer,
) -> None:
    upstream_url = f"http://127.0.0.1:{recording_upstream.server_address[1]}"
    # aws-chunked with signature extensions and a trailer, exactly as a signer would send.
    aws_chunked = (
        b"8;chunk-signature=0123abcd\r\nabcdefgh\r\n"
        b"3;chunk-signature=4567ef\r\nxyz\r\n"
        b"0;chunk-signature=89\r\nx-amz-checksum-crc32:AAAAAA==\r\n\r\n"
    )
    with FaultProxy(upstream_url) as proxy:
        conn = raw_conn(proxy.url)
        conn.putrequest("PUT", "/bucket/key?partNumber=1&uploadId=u", skip_host=True)
        for name, value in [
            ("Host", "virtual.example.test"),
            ("X-Amz-Content-SHA256", "STREAMING-AWS4-HMAC-SHA256-PAYLOAD-TRAILER"),
            ("Content-Encoding", "aws-chunked"),
            ("X-Amz-Decoded-Content-Length", "11"),
            ("X-Amz-Trailer", "x-amz-checksum-crc32"),
            ("Transfer-Encoding", "chunked"),
            ("Expect", "100-continue"),
        ]:
            conn.putheader(name, value)
        conn.endheaders()
        conn.send(aws_chunked)
        resp = conn.getresponse()
        assert (resp.status, resp.read()) == (201, b"ok")

        conn.request("POST", "/bucket/key?uploads", body=b"x" * 1000, headers={"X-Case": "KeEp"})
        assert conn.getresponse().read() == b"ok"

        # Chunked and close-delimited upstream responses are re-framed for the client,
        # whose connection stays open throughout.
        for path in ("/chunked", "/close-delimited", "/chunked"):
            conn.request("GET", path)
            resp = conn.getresponse()
            assert resp.status == 200
            assert resp.read() == RAW_PAYLOAD
        conn.request("HEAD", "/chunked")
        assert conn.getresponse().read() == b""
        conn.close()
        stats = proxy.stats

    (head1, body1), (head2, body2) = recording_upstream.requests[:2]
    assert body1 == aws_chunked
    assert head1.startswith(b"PUT /bucket/key?partNumber=1&uploadId=u HTTP/1.1\r\n")
    assert b"Host: virtual.example.test\r\n" in head1
    assert b"Content-Encoding: aws-chunked\r\n" in head1
    assert b"Transfer-Encoding: chunked\r\n" in head1
    assert b"Expect" not in head1  # answered by the proxy itself
    assert body2 == b"x" * 1000
    assert b"X-Case: KeEp\r\n" in head2
    assert b"Content-Length: 1000\r\n" in head2
    assert stats["connections"] == 1
    assert stats["requests"] == 6
    assert stats["bytes_uploaded"] == len(aws_chunked) + 1000
    assert stats["bytes_forwarded"] == 3 * len(RAW_PAYLOAD) + 2 * len(b"ok")
    assert recording_upstream.connections == 2  # reconnected after the close-delimited body


@pytest.mark.timeout(60)
def test_upstream_down_gives_502() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead_port = s.getsockname()[1]
    with FaultProxy(f"http://127.0.0.1:{dead_port}") as proxy:
        conn = raw_conn(proxy.url)
        conn.request("GET", "/x")
        resp = conn.getresponse()
        assert resp.status == 502
        assert b"<Code>BadGateway</Code>" in resp.read()
        assert proxy.stats["upstream_errors"] == 1


# -- faults --------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_reset_mid_body_raw_then_recovers(s3env: S3Env) -> None:
    with FaultProxy(s3env.url, FaultSchedule(script=("reset_mid_body",))) as proxy:
        conn = raw_conn(proxy.url)
        conn.request("GET", f"/{BUCKET}/{BIG_KEY}", headers=AUTH)
        resp = conn.getresponse()
        assert resp.status == 200  # status and headers arrive intact
        assert resp.getheader("Content-Length") == str(len(s3env.big))
        with pytest.raises((http.client.IncompleteRead, ConnectionError)):
            resp.read()
        conn.close()

        conn = raw_conn(proxy.url)
        conn.request("GET", f"/{BUCKET}/{BIG_KEY}", headers=AUTH)
        assert conn.getresponse().read() == s3env.big
        conn.close()

        stats = proxy.stats
        assert stats["faults"]["reset_mid_body"] == 1
        assert stats["requests"] == 2
        # About half of the first body, then all of the second.
        half = len(s3env.big) // 2
        assert stats["bytes_forwarded"] == half + len(s3env.big)
        assert [e.fault for e in proxy.events] == ["reset_mid_body", "none"]


@pytest.mark.timeout(60)
def test_reset_without_body_resets_before_status_line(s3env: S3Env) -> None:
    schedule = FaultSchedule(script=("reset_mid_body",), methods=frozenset({"HEAD"}))
    with FaultProxy(s3env.url, schedule) as proxy:
        conn = raw_conn(proxy.url)
        conn.request("HEAD", f"/{BUCKET}/{SMALL_KEY}", headers=AUTH)
        with pytest.raises((http.client.HTTPException, ConnectionError)):
            conn.getresponse()
        conn.close()
        assert [(e.method, e.fault, e.status) for e in proxy.events] == [
            ("HEAD", "reset_mid_body", None)
        ]


@pytest.mark.timeout(60)
def test_reset_mid_body_boto3_and_s3fs(s3env: S3Env) -> None:
    schedule = FaultSchedule(script=("reset_mid_body", "none", "reset_mid_body"))
    with FaultProxy(s3env.url, schedule) as proxy:
        client = boto_client(proxy.url, retries=NO_RETRY)
        body = client.get_object(Bucket=BUCKET, Key=BIG_KEY)["Body"]
        # botocore never retries errors raised while the caller reads the body.
        with pytest.raises(botocore.exceptions.ResponseStreamingError):
            body.read()
        assert client.get_object(Bucket=BUCKET, Key=BIG_KEY)["Body"].read() == s3env.big

        # s3fs/aiohttp: the truncated body surfaces as aiohttp.ClientPayloadError (a
        # ContentLengthError inside) when s3fs's own retry loop is limited to one try ...
        import aiohttp

        fs = s3fs_client(proxy.url, retries=1)
        with pytest.raises(aiohttp.ClientPayloadError):
            fs.cat_file(f"{BUCKET}/{BIG_KEY}")
        # ... and is retried transparently with the default s3fs retries.
        proxy.set_schedule(FaultSchedule(script=("reset_mid_body",)))
        fs_default = s3fs_client(proxy.url, retries=5)
        assert fs_default.cat_file(f"{BUCKET}/{BIG_KEY}") == s3env.big
        assert proxy.stats["faults"]["reset_mid_body"] == 3


@pytest.mark.timeout(60)
def test_slowdown_503_and_error_500(s3env: S3Env) -> None:
    schedule = FaultSchedule(script=("slowdown_503", "error_500"))
    with FaultProxy(s3env.url, schedule) as proxy:
        client = boto_client(proxy.url, retries=NO_RETRY)
        with pytest.raises(botocore.exceptions.ClientError) as info:
            client.get_object(Bucket=BUCKET, Key=SMALL_KEY)
        assert info.value.response["Error"]["Code"] == "SlowDown"
        assert info.value.response["ResponseMetadata"]["HTTPStatusCode"] == 503
        with pytest.raises(botocore.exceptions.ClientError) as info:
            client.get_object(Bucket=BUCKET, Key=SMALL_KEY)
        assert info.value.response["Error"]["Code"] == "InternalError"
        assert info.value.response["ResponseMetadata"]["HTTPStatusCode"] == 500
        assert client.get_object(Bucket=BUCKET, Key=SMALL_KEY)["Body"].read() == s3env.small
        # Same connection throughout: error responses leave it usable.
        assert proxy.stats["connections"] == 1

        # Raw view of the response, and keep-alive after it.
        proxy.set_schedule(FaultSchedule(script=("slowdown_503",)))
        conn = raw_conn(proxy.url)
        conn.request("GET", f"/{BUCKET}/{SMALL_KEY}", headers=AUTH)
        resp = conn.getresponse()
        body = resp.read()
        assert resp.status == 503
        assert resp.getheader("Content-Type") == "application/xml"
        assert int(resp.getheader("Content-Length", "-1")) == len(body)
        assert ET.fromstring(body).findtext("Code") == "SlowDown"
        conn.request("GET", f"/{BUCKET}/{SMALL_KEY}", headers=AUTH)
        resp = conn.getresponse()
        assert (resp.status, resp.read()) == (200, s3env.small)
        conn.close()

        # s3fs maps SlowDown to OSError(EBUSY) once its retries are exhausted.
        proxy.set_schedule(FaultSchedule(script=("slowdown_503",)))
        with pytest.raises(OSError, match="reduce your request rate"):
            s3fs_client(proxy.url, retries=1).cat_file(f"{BUCKET}/{SMALL_KEY}")

        faults = proxy.stats["faults"]
        assert (faults["slowdown_503"], faults["error_500"]) == (3, 1)


@pytest.mark.timeout(60)
def test_faults_only_for_selected_methods(s3env: S3Env) -> None:
    schedule = FaultSchedule(script=("error_500",), methods=frozenset({"put"}))
    with FaultProxy(s3env.url, schedule) as proxy:
        client = boto_client(proxy.url, retries=NO_RETRY)
        assert client.get_object(Bucket=BUCKET, Key=SMALL_KEY)["Body"].read() == s3env.small
        client.head_object(Bucket=BUCKET, Key=SMALL_KEY)
        with pytest.raises(botocore.exceptions.ClientError) as info:
            client.put_object(Bucket=BUCKET, Key="put.txt", Body=b"x" * 10_000)
        assert info.value.response["Error"]["Code"] == "InternalError"
        client.put_object(Bucket=BUCKET, Key="put.txt", Body=b"y" * 10_000)
        assert [(e.method, e.fault) for e in proxy.events] == [
            ("GET", "none"),
            ("HEAD", "none"),
            ("PUT", "error_500"),
            ("PUT", "none"),
        ]
        assert proxy.stats["connections"] == 1  # Expect: 100-continue + error kept it open
    assert s3env.direct.get_object(Bucket=BUCKET, Key="put.txt")["Body"].read() == b"y" * 10_000


@pytest.mark.timeout(60)
def test_stall_triggers_read_timeout(s3env: S3Env) -> None:
    schedule = FaultSchedule(script=("stall",), stall_seconds=3.0)
    with FaultProxy(s3env.url, schedule) as proxy:
        client = boto_client(proxy.url, retries=NO_RETRY, read_timeout=1, connect_timeout=5)
        start = time.monotonic()
        with pytest.raises(botocore.exceptions.ReadTimeoutError):
            client.get_object(Bucket=BUCKET, Key=SMALL_KEY)
        assert time.monotonic() - start >= 0.9
        assert client.get_object(Bucket=BUCKET, Key=SMALL_KEY)["Body"].read() == s3env.small
        assert proxy.stats["faults"]["stall"] == 1


@pytest.mark.timeout(60)
def test_random_schedule_is_seeded(s3env: S3Env) -> None:
    import random

    def statuses(seed: int) -> list[int]:
        schedule = FaultSchedule(seed=seed, error_500=0.3, slowdown_503=0.2)
        out = []
        with FaultProxy(s3env.url, schedule) as proxy:
            conn = raw_conn(proxy.url)
            for _ in range(30):
                # HEAD is not an eligible method: it consumes no random draw.
                conn.request("HEAD", f"/{BUCKET}/{SMALL_KEY}", headers=AUTH)
                conn.getresponse().read()
                conn.request("GET", f"/{BUCKET}/{SMALL_KEY}", headers=AUTH)
                resp = conn.getresponse()
                resp.read()
                out.append(resp.status)
            conn.close()
            faults = proxy.stats["faults"]
        assert faults["slowdown_503"] == out.count(503)
        assert faults["error_500"] == out.count(500)
        return out

    rng = random.Random(7)
    expected = []
    for _ in range(30):
        draw = rng.random()
        # Probabilities stack in FAULT_KINDS order: slowdown_503 before error_500.
        expected.append(503 if draw < 0.2 else 500 if draw < 0.5 else 200)
    assert statuses(7) == expected
    assert statuses(7) == expected
    assert 0 < expected.count(200) < 30


@pytest.mark.timeout(60)
def test_concurrent_s3fs_reads_survive_random_faults_with_retries(s3env: S3Env) -> None:
    keys = [f"many/{i:03d}.bin" for i in range(24)]
    blobs = {key: os.urandom(100_000 + 997 * i) for i, key in enumerate(keys)}
    for key, blob in blobs.items():
        s3env.direct.put_object(Bucket=BUCKET, Key=key, Body=blob)
    schedule = FaultSchedule(
        seed=3, reset_mid_body=0.1, slowdown_503=0.1, error_500=0.05, stall=0.02, stall_seconds=2
    )
    with FaultProxy(s3env.url, schedule) as proxy:
        fs = s3fs.S3FileSystem(
            key="testing",
            secret="testing",
            client_kwargs={"endpoint_url": proxy.url, "region_name": "us-east-1"},
            # botocore retries the 500s; s3fs's own loop retries resets, SlowDown, timeouts.
            config_kwargs={"read_timeout": 1, "retries": {"max_attempts": 5}},
            skip_instance_cache=True,
        )
        fs.retries = 10
        for _ in range(2):
            out = fs.cat([f"{BUCKET}/{key}" for key in keys])
            assert out == {f"{BUCKET}/{key}": blob for key, blob in blobs.items()}
        stats = proxy.stats
    assert sum(stats["faults"].values()) > 0
    assert stats["connections"] > 1


# -- shaping -------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_first_byte_latency(s3env: S3Env) -> None:
    with FaultProxy(s3env.url, first_byte_latency_s=0.1) as proxy:
        client = boto_client(proxy.url, retries=NO_RETRY)
        start = time.monotonic()
        for _ in range(5):
            assert client.get_object(Bucket=BUCKET, Key=SMALL_KEY)["Body"].read() == s3env.small
        assert time.monotonic() - start >= 0.5


@pytest.mark.timeout(60)
def test_bandwidth_cap(s3env: S3Env) -> None:
    with FaultProxy(s3env.url, bandwidth_bytes_per_s=2_000_000) as proxy:
        client = boto_client(proxy.url, retries=NO_RETRY)
        start = time.monotonic()
        assert client.get_object(Bucket=BUCKET, Key=TWO_MB_KEY)["Body"].read() == s3env.two_mb
        assert time.monotonic() - start >= 0.8
        assert proxy.stats["bytes_forwarded"] == len(s3env.two_mb)


# -- lifecycle -----------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_stop_is_prompt_with_idle_keepalive_and_stalled_connections(s3env: S3Env) -> None:
    proxy = FaultProxy(s3env.url, FaultSchedule(script=("none", "stall"), stall_seconds=30))
    proxy.start()
    idle = raw_conn(proxy.url)
    idle.request("GET", f"/{BUCKET}/{SMALL_KEY}", headers=AUTH)
    assert idle.getresponse().read() == s3env.small  # keep-alive connection, now idle
    stalled = raw_conn(proxy.url, timeout=30)
    stalled.request("GET", f"/{BUCKET}/{SMALL_KEY}", headers=AUTH)  # stalls for 30 s
    deadline = time.monotonic() + 5
    while proxy.stats["faults"]["stall"] == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(proxy_threads()) >= 1
    start = time.monotonic()
    proxy.stop()
    assert time.monotonic() - start < 5
    assert proxy_threads() == []
    with pytest.raises((http.client.HTTPException, ConnectionError)):
        stalled.getresponse()
    with pytest.raises((http.client.HTTPException, ConnectionError)):
        idle.request("GET", f"/{BUCKET}/{SMALL_KEY}", headers=AUTH)
        idle.getresponse()
    idle.close()
    stalled.close()
    proxy.stop()  # idempotent
    with pytest.raises(RuntimeError):
        _ = proxy.url


# -- pure helpers ----------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_s3_error_body_and_schedule_validation() -> None:
    root = ET.fromstring(s3_error_body("SlowDown", "a < b & c"))
    assert (root.tag, root.findtext("Code"), root.findtext("Message")) == (
        "Error",
        "SlowDown",
        "a < b & c",
    )
    with pytest.raises(ValueError):
        FaultSchedule(error_500=0.7, slowdown_503=0.7)
    with pytest.raises(ValueError):
        FaultSchedule(stall=-0.1)
    with pytest.raises(ValueError):
        FaultSchedule(script=("explode",))
    assert FaultSchedule(methods=frozenset({"get", "Put"})).methods == {"GET", "PUT"}
    with pytest.raises(ValueError):
        FaultProxy("https://example.com")
