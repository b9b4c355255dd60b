"""Fault-injecting HTTP/1.1 reverse proxy for S3 tests and benchmarks.

What it does
    :class:`FaultProxy` listens on ``127.0.0.1`` (never any other interface) and relays
    HTTP/1.1 requests from an S3 client (boto3/urllib3, s3fs/aiobotocore/aiohttp, raw
    ``http.client``) to an upstream S3 endpoint, normally a local
    ``moto.server.ThreadedMotoServer``. On the way it can inject the failures real object
    stores produce, chosen per request by a :class:`FaultSchedule`:

    * ``reset_mid_body``: relay the status line, the headers and about half of the body,
      then abort the TCP connection with an RST (``SO_LINGER`` 1/0). A response without a
      body is aborted before anything is sent.
    * ``slowdown_503`` / ``error_500`` / ``denied_403``: answer ``503 SlowDown`` / ``500
      InternalError`` / ``403 AccessDenied`` with an S3 XML error body without contacting
      upstream; the connection stays usable.
    * ``stall``: read the request, send nothing for ``stall_seconds`` (so the client's read
      timeout fires), then close the connection.

    Independently of faults it can add a fixed latency before each response's first byte
    and cap the bandwidth at which response bodies are streamed back, per connection.

How
    A ``socketserver.ThreadingTCPServer`` with daemon threads: one thread per client
    connection, each with its own persistent ``http.client.HTTPConnection`` to upstream
    (reopened when upstream closes it). Requests are parsed by hand so that the method,
    the request target and the headers (``Host`` included; moto does not check signatures)
    are forwarded unchanged; only the hop-by-hop ``Connection``/``Keep-Alive`` headers and
    ``Expect`` are dropped, the proxy answering ``100-continue`` itself. Request bodies are
    forwarded as raw bytes, so ``Content-Length``, ``Transfer-Encoding: chunked`` and
    ``aws-chunked`` uploads reach upstream byte for byte. Response bodies are streamed
    back in 64 KiB pieces, keeping the upstream ``Content-Length``, or re-chunked when
    upstream used chunked encoding or close-delimited bodies. Keep-alive is supported on
    both sides.

    Fault decisions: a request is *eligible* when its method is in
    ``FaultSchedule.methods``. The n-th eligible request takes ``script[n]`` while the
    script lasts; after that one ``random.Random(seed).random()`` draw per eligible request
    picks the fault by cumulative probability. Draws happen in arrival order, so with
    concurrent clients the *sequence* of faults is reproducible for a given seed but which
    request gets which fault is not.

Cost
    One OS thread per open client connection and one upstream socket each; every byte is
    copied twice in user space (about 1 GB/s on loopback, far below what moto serves, so
    the proxy is not the bottleneck of a moto-backed test). Request bodies up to
    ``_RETRY_BUFFER_LIMIT`` (8 MiB) are buffered so the request can be replayed once when a
    reused upstream connection turns out to be stale; larger or chunked bodies are
    streamed. Response bodies are never buffered, except for a ``reset_mid_body`` fault on
    a response without ``Content-Length``. ``stop()`` closes every socket and returns in
    well under a second.
"""

from __future__ import annotations

import collections
import contextlib
import http.client
import random
import select
import socket
import socketserver
import struct
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import Any, TypedDict
from urllib.parse import urlsplit
from xml.sax.saxutils import escape

__all__ = [
    "FAULT_KINDS",
    "FaultProxy",
    "FaultSchedule",
    "ProxyStats",
    "RequestRecord",
    "s3_error_body",
]

FAULT_KINDS: tuple[str, ...] = (
    "reset_mid_body", "slowdown_503", "error_500", "denied_403", "stall",
)  # fmt: skip
"""Fault names, in the order their probabilities are stacked for the random draw."""

_SCRIPT_NAMES = frozenset((*FAULT_KINDS, "none"))
_CHUNK = 64 * 1024
_MAX_LINE = 64 * 1024
_MAX_HEADERS = 256
_RETRY_BUFFER_LIMIT = 8 * 1024 * 1024
_UPSTREAM_TIMEOUT_S = 120.0
_DRAIN_TIMEOUT_S = 1.0
_EVENT_LOG_LEN = 10_000

# Dropped when forwarding a request upstream (Expect is answered by the proxy itself).
_REQUEST_DROP = frozenset({"connection", "keep-alive", "proxy-connection", "expect"})
# Dropped from upstream responses; the proxy frames the body to the client itself.
_RESPONSE_DROP = frozenset(
    {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade"}
)

_ERRORS: dict[str, tuple[int, str, str, str]] = {
    "slowdown_503": (503, "Slow Down", "SlowDown", "Please reduce your request rate."),
    "error_500": (
        500,
        "Internal Server Error",
        "InternalError",
        "We encountered an internal error. Please try again.",
    ),
    "denied_403": (403, "Forbidden", "AccessDenied", "Access Denied"),
}


def s3_error_body(code: str, message: str) -> bytes:
    """Return an S3-style XML error document, e.g. for ``SlowDown`` or ``InternalError``."""
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{escape(code)}</Code><Message>{escape(message)}</Message></Error>"
    ).encode()


@dataclass(frozen=True, kw_only=True)
class FaultSchedule:
    """Which requests get which fault.

    Probabilities are per eligible request and must sum to at most 1; ``script`` names the
    faults (or ``"none"``) of the first ``len(script)`` eligible requests, which consume no
    random draw. Only requests whose method is in ``methods`` are eligible.
    """

    seed: int = 0
    reset_mid_body: float = 0.0
    slowdown_503: float = 0.0
    error_500: float = 0.0
    denied_403: float = 0.0
    stall: float = 0.0
    stall_seconds: float = 5.0
    methods: frozenset[str] = frozenset({"GET"})
    script: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        probs = [getattr(self, kind) for kind in FAULT_KINDS]
        if any(not 0.0 <= p <= 1.0 for p in probs) or sum(probs) > 1.0 + 1e-9:
            raise ValueError(f"fault probabilities must be in [0, 1] and sum to <= 1: {probs}")
        if self.stall_seconds < 0:
            raise ValueError("stall_seconds must be >= 0")
        script = tuple(self.script)
        unknown = [name for name in script if name not in _SCRIPT_NAMES]
        if unknown:
            raise ValueError(f"unknown fault names in script: {unknown}")
        object.__setattr__(self, "script", script)
        object.__setattr__(self, "methods", frozenset(m.upper() for m in self.methods))


class ProxyStats(TypedDict):
    """Counter snapshot returned by :attr:`FaultProxy.stats`."""

    requests: int
    """Requests read from clients (all methods, faulted or not)."""
    connections: int
    """Client connections accepted."""
    faults: dict[str, int]
    """Injected faults by kind (every kind in :data:`FAULT_KINDS` is present)."""
    bytes_forwarded: int
    """Response body bytes relayed from upstream to clients (partial bodies included)."""
    bytes_uploaded: int
    """Request body bytes relayed from clients to upstream (raw, framing included)."""
    upstream_errors: int
    """Requests answered ``502`` or aborted because upstream failed."""


@dataclass(frozen=True)
class RequestRecord:
    """One handled request, as kept in :attr:`FaultProxy.events`."""

    method: str
    target: str
    fault: str
    status: int | None
    """Status sent to the client; ``None`` when the connection was reset or stalled."""


class _BadRequest(Exception):
    pass


class _Stopping(Exception):
    pass


class _UpstreamFailed(Exception):
    pass


@dataclass
class _Request:
    method: str
    target: str
    version: str
    headers: list[tuple[str, str]]
    chunked: bool
    length: int
    expect_continue: bool
    client_close: bool


class _Pacer:
    """Sleeps so that bytes accounted through it never exceed ``rate`` bytes/s."""

    def __init__(self, rate: float | None, stopping: threading.Event) -> None:
        self._rate = rate
        self._stopping = stopping
        self._start = time.monotonic()
        self._sent = 0

    @property
    def chunk_size(self) -> int:
        if self._rate is None:
            return _CHUNK
        return max(1024, min(_CHUNK, int(self._rate / 20)))

    def account(self, nbytes: int) -> None:
        if self._rate is None:
            return
        self._sent += nbytes
        delay = self._start + self._sent / self._rate - time.monotonic()
        if delay > 0 and self._stopping.wait(delay):
            raise _Stopping


class _ClientConnection:
    """Serves every request of one client connection, in the handler's thread."""

    def __init__(self, proxy: FaultProxy, sock: socket.socket) -> None:
        self._proxy = proxy
        self._sock = sock
        self._rfile = sock.makefile("rb", buffering=_CHUNK)
        self._upstream: http.client.HTTPConnection | None = None
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    # -- lifecycle -------------------------------------------------------------------

    def run(self) -> None:
        try:
            while not self._proxy._stopping.is_set():
                try:
                    request = self._read_request()
                except _BadRequest as exc:
                    self._send_simple(400, "Bad Request", "BadRequest", str(exc), close=True)
                    return
                if request is None or not self._serve(request):
                    return
        except (OSError, http.client.HTTPException, _Stopping, _UpstreamFailed, _BadRequest):
            return  # the connection is finished either way; _abort() already ran if needed
        finally:
            self._close_upstream()
            with contextlib.suppress(OSError):
                self._rfile.close()

    def interrupt(self) -> None:
        """Wake the handler thread from any blocking socket call (called by ``stop``)."""
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        upstream = self._upstream
        upstream_sock = getattr(upstream, "sock", None)
        if isinstance(upstream_sock, socket.socket):
            with contextlib.suppress(OSError):
                upstream_sock.shutdown(socket.SHUT_RDWR)

    def _close_upstream(self) -> None:
        if self._upstream is not None:
            self._upstream.close()

    def _abort(self) -> None:
        """Let queued bytes reach the client, then close with an RST."""
        self._drain_send_queue()
        with contextlib.suppress(OSError):
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        with contextlib.suppress(OSError):
            self._rfile.close()
        with contextlib.suppress(OSError):
            self._sock.close()

    def _drain_send_queue(self) -> None:
        if not sys.platform.startswith("linux"):
            self._proxy._stopping.wait(0.05)
            return
        import fcntl
        import termios

        deadline = time.monotonic() + _DRAIN_TIMEOUT_S
        while time.monotonic() < deadline:
            try:
                raw = fcntl.ioctl(self._sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
            except OSError:
                return
            if struct.unpack("i", raw)[0] == 0 or self._proxy._stopping.wait(0.005):
                return

    # -- request side ------------------------------------------------------------------

    def _readline(self) -> bytes:
        line = self._rfile.readline(_MAX_LINE + 1)
        if len(line) > _MAX_LINE:
            raise _BadRequest("line too long")
        return line

    def _read_request(self) -> _Request | None:
        line = self._readline()
        while line in (b"\r\n", b"\n"):  # tolerate stray CRLF between requests
            line = self._readline()
        if not line:
            return None
        parts = line.decode("latin-1").rstrip("\r\n").split()
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            raise _BadRequest(f"malformed request line {line[:100]!r}")
        method, target, version = parts
        if target.startswith(("http://", "https://")):  # absolute-form: keep path+query
            split = urlsplit(target)
            target = (split.path or "/") + (f"?{split.query}" if split.query else "")
        headers: list[tuple[str, str]] = []
        while True:
            raw = self._readline()
            if not raw:
                raise ConnectionError("client closed inside request headers")
            if raw in (b"\r\n", b"\n"):
                break
            if len(headers) >= _MAX_HEADERS:
                raise _BadRequest("too many headers")
            name, sep, value = raw.decode("latin-1").partition(":")
            if not sep:
                raise _BadRequest(f"malformed header {raw[:100]!r}")
            headers.append((name.strip(), value.strip()))
        lower = {name.lower(): value for name, value in headers}
        codings = [c.strip().lower() for c in lower.get("transfer-encoding", "").split(",")]
        chunked = codings[-1] == "chunked"
        length = 0
        if not chunked and "content-length" in lower:
            try:
                length = int(lower["content-length"])
            except ValueError as exc:
                raise _BadRequest("bad Content-Length") from exc
            if length < 0:
                raise _BadRequest("bad Content-Length")
        connection = {t.strip().lower() for t in lower.get("connection", "").split(",")}
        client_close = "close" in connection or (
            version != "HTTP/1.1" and "keep-alive" not in connection
        )
        with self._proxy._lock:
            self._proxy._counters["requests"] += 1
        return _Request(
            method=method.upper(),
            target=target,
            version=version,
            headers=headers,
            chunked=chunked,
            length=length,
            expect_continue=lower.get("expect", "").lower() == "100-continue",
            client_close=client_close,
        )

    def _iter_body(self, request: _Request) -> Iterator[bytes]:
        """Yield the request body as raw bytes (chunk framing kept for chunked bodies)."""
        if not request.chunked and request.length == 0:
            return
        if request.expect_continue:
            self._sock.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
        if not request.chunked:
            remaining = request.length
            while remaining:
                data = self._rfile.read(min(_CHUNK, remaining))
                if not data:
                    raise ConnectionError("client closed inside request body")
                remaining -= len(data)
                yield data
            return
        while True:
            size_line = self._readline()
            if not size_line:
                raise ConnectionError("client closed inside chunked body")
            try:
                size = int(size_line.split(b";", 1)[0].strip(), 16)
            except ValueError as exc:
                raise _BadRequest("bad chunk size") from exc
            yield size_line
            if size == 0:
                while True:  # trailers, up to and including the empty line
                    trailer = self._readline()
                    if not trailer:
                        raise ConnectionError("client closed inside chunked trailers")
                    yield trailer
                    if trailer in (b"\r\n", b"\n"):
                        return
            remaining = size + 2  # chunk data and its CRLF
            while remaining:
                data = self._rfile.read(min(_CHUNK, remaining))
                if not data:
                    raise ConnectionError("client closed inside chunk")
                remaining -= len(data)
                yield data

    # -- dispatch ----------------------------------------------------------------------

    def _serve(self, request: _Request) -> bool:
        """Handle one request; return whether the client connection stays open."""
        fault = self._proxy._decide(request.method)
        if fault != "none":
            with self._proxy._lock:
                self._proxy._faults[fault] += 1
        if fault in _ERRORS:
            for _ in self._iter_body(request):
                pass
            status, reason, code, message = _ERRORS[fault]
            self._wait_latency()
            self._proxy._record(request, fault, status)
            self._send_simple(
                status, reason, code, message, close=request.client_close, request=request
            )
            return not request.client_close
        if fault == "stall":
            for _ in self._iter_body(request):
                pass
            self._proxy._record(request, fault, None)
            if self._proxy._stopping.wait(self._proxy._schedule.stall_seconds):
                raise _Stopping
            return False
        return self._forward(request, reset=fault == "reset_mid_body")

    def _wait_latency(self) -> None:
        latency = self._proxy._first_byte_latency_s
        if latency > 0 and self._proxy._stopping.wait(latency):
            raise _Stopping

    def _send_simple(
        self,
        status: int,
        reason: str,
        code: str,
        message: str,
        *,
        close: bool,
        request: _Request | None = None,
    ) -> None:
        body = s3_error_body(code, message)
        with self._proxy._lock:
            self._proxy._request_ids += 1
            request_id = f"FAULTPROXY{self._proxy._request_ids:08d}"
        lines = [
            f"HTTP/1.1 {status} {reason}",
            "Content-Type: application/xml",
            f"Content-Length: {len(body)}",
            f"x-amz-request-id: {request_id}",
            "Server: faultproxy",
        ]
        if close:
            lines.append("Connection: close")
        payload = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        if request is None or request.method != "HEAD":
            payload += body
        self._sock.sendall(payload)

    # -- forwarding --------------------------------------------------------------------

    def _upstream_connection(self) -> http.client.HTTPConnection:
        conn = self._upstream
        if conn is None:
            host, port = self._proxy._upstream_addr
            conn = http.client.HTTPConnection(host, port, timeout=_UPSTREAM_TIMEOUT_S)
            self._upstream = conn
        sock = conn.sock
        if sock is not None:
            # A readable idle keep-alive socket means upstream closed it (or sent junk).
            with contextlib.suppress(OSError, ValueError):
                if select.select([sock], [], [], 0)[0]:
                    conn.close()
        return conn

    def _send_upstream(self, request: _Request) -> http.client.HTTPResponse | None:
        buffered: bytes | None = None
        if not request.chunked and request.length <= _RETRY_BUFFER_LIMIT:
            buffered = b"".join(self._iter_body(request))
        for attempt in range(2):
            conn = self._upstream_connection()
            reused = conn.sock is not None
            try:
                conn.putrequest(
                    request.method, request.target, skip_host=True, skip_accept_encoding=True
                )
                for name, value in request.headers:
                    if name.lower() not in _REQUEST_DROP:
                        conn.putheader(name, value)
                conn.endheaders()
                if buffered is not None:
                    if buffered:
                        conn.send(buffered)
                    self._proxy._add("bytes_uploaded", len(buffered))
                else:
                    for piece in self._iter_body(request):
                        conn.send(piece)
                        self._proxy._add("bytes_uploaded", len(piece))
                return conn.getresponse()
            except (OSError, http.client.HTTPException):
                conn.close()
                if self._proxy._stopping.is_set():
                    raise _Stopping from None
                if attempt == 0 and reused and buffered is not None:
                    continue  # stale keep-alive connection: replay once on a fresh one
                return None
        return None

    def _forward(self, request: _Request, *, reset: bool) -> bool:
        response = self._send_upstream(request)
        if response is None:
            self._proxy._add("upstream_errors", 1)
            self._wait_latency()
            self._proxy._record(request, "none", 502)
            self._send_simple(
                502, "Bad Gateway", "BadGateway", "upstream failed", close=True, request=request
            )
            return False

        status = response.status
        no_body = request.method == "HEAD" or status in (204, 304) or 100 <= status < 200
        known_length = response.length if not response.chunked else None
        close = request.client_close
        chunked_out = False
        if not no_body and known_length is None:
            if request.version == "HTTP/1.1":
                chunked_out = True
            else:
                close = True  # close-delimited body for HTTP/1.0 clients

        headers = [(k, v) for k, v in response.getheaders() if k.lower() not in _RESPONSE_DROP]
        if chunked_out:
            headers.append(("Transfer-Encoding", "chunked"))
        if close:
            headers.append(("Connection", "close"))
        head = f"HTTP/1.1 {status} {response.reason}\r\n" + "".join(
            f"{k}: {v}\r\n" for k, v in headers
        )
        head_bytes = (head + "\r\n").encode("latin-1")

        if reset:
            self._reset_mid_body(request, response, head_bytes, known_length, chunked_out)
            return False

        self._wait_latency()
        self._proxy._record(request, "none", status)
        self._sock.sendall(head_bytes)
        if not no_body:
            try:
                self._stream(response, known_length, chunked_out)
            except _UpstreamFailed:
                # Headers are out: the only honest signal left is to cut the connection.
                self._close_upstream()
                self._proxy._add("upstream_errors", 1)
                self._abort()
                return False
        else:
            response.close()
        return not close

    def _stream(
        self, response: http.client.HTTPResponse, nbytes: int | None, chunked_out: bool
    ) -> None:
        """Relay ``nbytes`` (``None``: all) body bytes from ``response`` to the client."""
        pacer = _Pacer(self._proxy._bandwidth, self._proxy._stopping)
        remaining = nbytes
        while remaining is None or remaining > 0:
            want = pacer.chunk_size if remaining is None else min(pacer.chunk_size, remaining)
            try:
                data = response.read(want)
            except (OSError, http.client.HTTPException) as exc:
                raise _UpstreamFailed(str(exc)) from exc
            if not data:
                if remaining:
                    raise _UpstreamFailed(f"upstream body ended {remaining} bytes early")
                break
            self._proxy._add("bytes_forwarded", len(data))  # before sending: no stats race
            if chunked_out:
                self._sock.sendall(b"%x\r\n%b\r\n" % (len(data), data))
            else:
                self._sock.sendall(data)
            if remaining is not None:
                remaining -= len(data)
            pacer.account(len(data))
        if chunked_out:
            self._sock.sendall(b"0\r\n\r\n")

    def _reset_mid_body(
        self,
        request: _Request,
        response: http.client.HTTPResponse,
        head_bytes: bytes,
        known_length: int | None,
        chunked_out: bool,
    ) -> None:
        self._proxy._record(request, "reset_mid_body", None)
        try:
            if known_length == 0:
                return  # no body to cut in half (HEAD, 204, empty): reset before the status
            if known_length is not None:
                self._wait_latency()
                self._sock.sendall(head_bytes)
                self._stream(response, known_length // 2, chunked_out=False)
                return
            data = response.read()  # unknown length: buffer it to know what "half" is
            if len(data) < 2:
                return
            half = data[: len(data) // 2]
            self._wait_latency()
            self._proxy._add("bytes_forwarded", len(half))
            self._sock.sendall(head_bytes)
            if chunked_out:
                self._sock.sendall(b"%x\r\n%b\r\n" % (len(half), half))
            else:
                self._sock.sendall(half)
        finally:
            self._close_upstream()  # the rest of the upstream body was not read
            self._abort()


class _Handler(socketserver.BaseRequestHandler):
    server: _Server

    def handle(self) -> None:
        proxy = self.server.proxy
        conn = _ClientConnection(proxy, self.request)
        if not proxy._register(conn):
            conn.interrupt()
            return
        try:
            conn.run()
        finally:
            proxy._unregister(conn)


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True
    request_queue_size = 256

    def __init__(self, address: tuple[str, int], proxy: FaultProxy) -> None:
        self.proxy = proxy
        super().__init__(address, _Handler)

    def process_request(
        self, request: socket.socket | tuple[bytes, socket.socket], client_address: Any
    ) -> None:
        # Same as ThreadingMixIn.process_request, but with recognisable thread names.
        thread = threading.Thread(
            target=self.process_request_thread,
            args=(request, client_address),
            name=f"faultproxy-conn-{client_address[1]}",
            daemon=True,
        )
        thread.start()

    def handle_error(
        self, request: socket.socket | tuple[bytes, socket.socket], client_address: Any
    ) -> None:
        # Unexpected handler exceptions: keep the traceback (debugging aid) unless stopping.
        if not self.proxy._stopping.is_set():
            super().handle_error(request, client_address)


class FaultProxy:
    """Threaded fault-injecting HTTP/1.1 reverse proxy bound to ``127.0.0.1``.

    Use as a context manager (``with FaultProxy(url, schedule) as proxy: ... proxy.url``) or
    with :meth:`start` / :meth:`stop`. ``first_byte_latency_s`` is slept before the first
    byte of every response (fault responses included); ``bandwidth_bytes_per_s`` caps the
    rate at which each connection streams response bodies. ``port`` 0 picks a free port.
    """

    def __init__(
        self,
        upstream_url: str,
        schedule: FaultSchedule | None = None,
        *,
        first_byte_latency_s: float = 0.0,
        bandwidth_bytes_per_s: float | None = None,
        port: int = 0,
    ) -> None:
        split = urlsplit(upstream_url)
        if split.scheme != "http" or not split.hostname:
            raise ValueError(f"upstream_url must be http://host[:port], got {upstream_url!r}")
        if first_byte_latency_s < 0:
            raise ValueError("first_byte_latency_s must be >= 0")
        if bandwidth_bytes_per_s is not None and bandwidth_bytes_per_s <= 0:
            raise ValueError("bandwidth_bytes_per_s must be > 0 or None")
        self._upstream_addr = (split.hostname, split.port or 80)
        self._first_byte_latency_s = first_byte_latency_s
        self._bandwidth = bandwidth_bytes_per_s
        self._port = port
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._server: _Server | None = None
        self._accept_thread: threading.Thread | None = None
        self._conns: dict[_ClientConnection, threading.Thread] = {}
        self._counters: dict[str, int] = dict.fromkeys(
            ("requests", "connections", "bytes_forwarded", "bytes_uploaded", "upstream_errors"),
            0,
        )
        self._faults: dict[str, int] = dict.fromkeys(FAULT_KINDS, 0)
        self._events: collections.deque[RequestRecord] = collections.deque(maxlen=_EVENT_LOG_LEN)
        self._request_ids = 0
        self._schedule = FaultSchedule()
        self._rng = random.Random(0)
        self._eligible = 0
        self.set_schedule(schedule or FaultSchedule())

    # -- public API --------------------------------------------------------------------

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT`` of the running proxy."""
        if self._server is None:
            raise RuntimeError("FaultProxy is not running; call start() first")
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    @property
    def schedule(self) -> FaultSchedule:
        return self._schedule

    def set_schedule(self, schedule: FaultSchedule) -> None:
        """Install ``schedule``, restarting its script and its random sequence."""
        with self._lock:
            self._schedule = schedule
            self._rng = random.Random(schedule.seed)
            self._eligible = 0

    @property
    def stats(self) -> ProxyStats:
        """Thread-safe snapshot of the counters."""
        with self._lock:
            c = self._counters
            return ProxyStats(
                requests=c["requests"],
                connections=c["connections"],
                faults=dict(self._faults),
                bytes_forwarded=c["bytes_forwarded"],
                bytes_uploaded=c["bytes_uploaded"],
                upstream_errors=c["upstream_errors"],
            )

    @property
    def events(self) -> list[RequestRecord]:
        """The most recent handled requests (up to 10 000), oldest first."""
        with self._lock:
            return list(self._events)

    def start(self) -> FaultProxy:
        """Bind ``127.0.0.1`` and start serving in background threads."""
        if self._server is not None:
            raise RuntimeError("FaultProxy is already running")
        self._stopping.clear()
        server = _Server(("127.0.0.1", self._port), self)
        self._server = server
        self._accept_thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"faultproxy-accept-{server.server_address[1]}",
            daemon=True,
        )
        self._accept_thread.start()
        return self

    def stop(self) -> None:
        """Stop accepting, close every client and upstream socket, join the threads."""
        server = self._server
        if server is None:
            return
        self._stopping.set()
        server.shutdown()
        server.server_close()
        if self._accept_thread is not None:
            self._accept_thread.join(timeout=2.0)
        with self._lock:
            conns = dict(self._conns)
        for conn in conns:
            conn.interrupt()
        deadline = time.monotonic() + 2.0
        for thread in conns.values():
            thread.join(timeout=max(0.0, deadline - time.monotonic()))
        self._server = None
        self._accept_thread = None

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        where = self.url if self._server is not None else "stopped"
        host, port = self._upstream_addr
        return f"<FaultProxy {where} -> http://{host}:{port} {self._schedule!r}>"

    # -- internals used by the connection threads ---------------------------------------

    def _register(self, conn: _ClientConnection) -> bool:
        with self._lock:
            if self._stopping.is_set():
                return False
            self._conns[conn] = threading.current_thread()
            self._counters["connections"] += 1
            return True

    def _unregister(self, conn: _ClientConnection) -> None:
        with self._lock:
            self._conns.pop(conn, None)

    def _add(self, counter: str, amount: int) -> None:
        with self._lock:
            self._counters[counter] += amount

    def _record(self, request: _Request, fault: str, status: int | None) -> None:
        with self._lock:
            self._events.append(RequestRecord(request.method, request.target, fault, status))

    def _decide(self, method: str) -> str:
        with self._lock:
            schedule = self._schedule
            if method not in schedule.methods:
                return "none"
            index = self._eligible
            self._eligible += 1
            if index < len(schedule.script):
                return schedule.script[index]
            draw = self._rng.random()
        cumulative = 0.0
        for kind in FAULT_KINDS:
            cumulative += getattr(schedule, kind)
            if draw < cumulative:
                return kind
        return "none"
