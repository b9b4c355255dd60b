"""Which storage faults are transient, how long to wait before the next attempt, and the error
users see when a fault is permanent or the attempts run out.

Backoff is exponential with full jitter (``uniform(0, min(cap, base * 2**attempt))``), the
scheme AWS recommends for many clients hitting one prefix: it spreads retries so that a
``503 SlowDown`` wave does not come back in lock-step. The requests behind an operation are
counted through botocore's ``needs-retry`` event (one attribute update per request), since
an error raised without a response cannot say how often botocore tried.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import errno
import random
import re
import socket
import time
from collections.abc import Iterator
from typing import Any

from dataflow.storage.config import StorageConfig

_SIGNED_QUERY = re.compile(
    r"([?&](?:x-amz-[a-z-]+|x-goog-[a-z-]+|signature|awsaccesskeyid|sig|se|st|sv|sp|sr|token"
    r"|access_token|expires)=)[^&\s]*",
    re.IGNORECASE,
)
_USERINFO = re.compile(r"(?<=://)[^/@\s]+@")

# Error codes an object store answers for overload or a passing server fault.
TRANSIENT_CODES = frozenset(
    {
        "SlowDown",
        "InternalError",
        "ServiceUnavailable",
        "RequestTimeout",
        "RequestTimeTooSkewed",
        "Throttling",
        "ThrottlingException",
        "500",
        "502",
        "503",
        "504",
    }
)
# Exception class names (from aiohttp, botocore, urllib3) that mean the connection or the
# body broke: the next attempt may well succeed.
_TRANSIENT_CLASS_NAMES = frozenset(
    {
        "ClientPayloadError",
        "ServerDisconnectedError",
        "ClientConnectionError",
        "ClientConnectorError",
        "ClientOSError",
        "ServerTimeoutError",
        "SocketTimeoutError",
        "ConnectionTimeoutError",
        "ResponseStreamingError",
        "IncompleteReadError",
        "ReadTimeoutError",
        "ConnectTimeoutError",
        "ConnectionClosedError",
        "EndpointConnectionError",
        "ProtocolError",
        "IncompleteRead",
        "FSTimeoutError",
        "ContentLengthError",
        "TransferEncodingError",
    }
)


def redact(text: str) -> str:
    """Remove signatures, keys and user:password parts from URLs inside ``text``."""
    return _USERINFO.sub("***@", _SIGNED_QUERY.sub(r"\1***", text))


class StorageError(OSError):
    """A read or write that failed for good: permanent fault or attempts exhausted.

    The message names the URL (credentials and signatures removed), the byte range, how many
    attempts were made over how many seconds, and the last error, so a user can tell a typo
    from an outage.
    """

    def __init__(
        self,
        url: str,
        message: str,
        *,
        attempts: int = 0,
        last_error: BaseException | None = None,
        byte_range: tuple[int, int | None] | None = None,
        seconds: float | None = None,
    ) -> None:
        self.url = redact(url)
        self.attempts = attempts
        self.seconds = seconds
        self.last_error = last_error
        self.byte_range = byte_range
        parts = [f"{self.url}: {message}"]
        if byte_range is not None:
            end = "end" if byte_range[1] is None else byte_range[1]
            parts.append(f"bytes [{byte_range[0]}, {end})")
        if attempts:
            took = "" if seconds is None else f" in {seconds:.1f} s"
            parts.append(f"after {attempts} attempt{'s' if attempts != 1 else ''}{took}")
        if last_error is not None:
            parts.append(f"last error: {type(last_error).__name__}: {redact(str(last_error))}")
        super().__init__(errno.EIO, "; ".join(parts))

    def __str__(self) -> str:
        return str(self.args[1])

    def __reduce__(self) -> tuple[object, ...]:
        # Crosses process boundaries (conversion workers) with its message and fields.
        return (_rebuild_storage_error, (str(self), dict(self.__dict__)))


def _rebuild_storage_error(text: str, state: dict[str, object]) -> StorageError:
    error = StorageError.__new__(StorageError)
    OSError.__init__(error, errno.EIO, text)
    error.__dict__.update(state)
    return error


def error_code(error: BaseException) -> str | None:
    """The S3 error code or HTTP status behind an exception, where there is one."""
    response = getattr(error, "response", None)
    if isinstance(response, dict):
        code = response.get("Error", {}).get("Code")
        if code:
            return str(code)
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if status:
            return str(status)
    cause = error.__cause__ or error.__context__
    if cause is not None and cause is not error:
        return error_code(cause)
    return None


@dataclasses.dataclass
class RequestCount:
    """HTTP requests sent for the calls made inside one ``counting_requests()`` block."""

    sent: int = 0
    """All requests, every retry included."""
    last_attempts: int = 0
    """How many times the latest request was tried (one operation may send several
    different requests: a HEAD, then a LIST)."""
    started: float = dataclasses.field(default_factory=time.monotonic)

    @property
    def seconds(self) -> float:
        return time.monotonic() - self.started


_REQUESTS: contextvars.ContextVar[RequestCount | None] = contextvars.ContextVar(
    "shardflow_requests", default=None
)


@contextlib.contextmanager
def counting_requests() -> Iterator[RequestCount]:
    """Count the requests botocore sends (its own retries included) for the calls made in the
    block, in this thread or task and in the event-loop tasks it starts.

    Why count rather than read the error: botocore retries a refused connection or a read
    timeout itself, and the error it finally raises carries no response, so no retry count;
    such a read used to give up "after 1 attempt" after eight attempts and 43 s of backoff.
    """
    count = RequestCount()
    token = _REQUESTS.set(count)
    try:
        yield count
    finally:
        _REQUESTS.reset(token)


def count_request(attempts: int = 1, **_: Any) -> None:
    """botocore's ``needs-retry`` event, which follows every request sent, answered or not;
    registered on each S3 session (``io._s3_filesystem``). Returns None: it decides nothing."""
    count = _REQUESTS.get()
    if count is not None:
        count.sent += 1
        count.last_attempts = attempts


def store_answer(error: BaseException) -> BaseException:
    """The object store's own error behind ``error`` (botocore's ClientError, which s3fs
    translates into FileNotFoundError, PermissionError …), else ``error`` itself."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(getattr(seen, "response", None), dict):
            return seen
        seen = seen.__cause__ or seen.__context__
    return error


# A body that broke off while botocore read it (an error response's XML): botocore's retry
# handler does not cover these aiohttp errors, so the caller must.
_BODY_CLASS_NAMES = frozenset({"ClientPayloadError", "ContentLengthError", "TransferEncodingError"})


def is_broken_body(error: BaseException) -> bool:
    """True when ``error`` (or its cause) is a response body that broke off."""
    seen: BaseException | None = error
    while seen is not None:
        if any(klass.__name__ in _BODY_CLASS_NAMES for klass in type(seen).__mro__):
            return True
        seen = seen.__cause__ if seen.__cause__ is not seen else None
    return False


def is_transient(error: BaseException) -> bool:
    """True for faults worth another attempt: resets, timeouts, 5xx, SlowDown."""
    if isinstance(error, FileNotFoundError | PermissionError | IsADirectoryError):
        return False
    code = error_code(error)
    if code is not None:
        return code in TRANSIENT_CODES
    if isinstance(error, asyncio.TimeoutError | socket.timeout | TimeoutError | ConnectionError):
        return True
    for klass in type(error).__mro__:
        if klass.__name__ in _TRANSIENT_CLASS_NAMES:
            return True
    transient_errnos = (errno.ECONNRESET, errno.ECONNABORTED, errno.EPIPE, errno.ETIMEDOUT)
    return isinstance(error, OSError) and error.errno in transient_errnos


def permanent_reason(error: BaseException) -> str:
    """A short human reason for a non-transient error."""
    code = error_code(error)
    status = f" ({code})" if code else ""
    if isinstance(error, FileNotFoundError):
        return f"not found{status}"
    if isinstance(error, PermissionError):
        return f"access denied{status}"
    return f"failed{status}"


def backoff_delay(attempt: int, config: StorageConfig, rng: random.Random | None = None) -> float:
    """Full-jitter delay before attempt ``attempt + 1`` (attempt counts from 1)."""
    ceiling = min(config.backoff_max_s, config.backoff_initial_s * 2 ** (attempt - 1))
    return (rng or random).uniform(0.0, ceiling)
