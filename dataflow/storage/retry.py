"""Which storage faults are transient, how long to wait before the next attempt, and the error
users see when a fault is permanent or the attempts run out.

Backoff is exponential with full jitter (``uniform(0, min(cap, base * 2**attempt))``), the
scheme AWS recommends for many clients hitting one prefix: it spreads retries so that a
``503 SlowDown`` wave does not come back in lock-step.
"""

from __future__ import annotations

import asyncio
import errno
import random
import re
import socket

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
    attempts were made, and the last error, so a user can tell a typo from an outage.
    """

    def __init__(
        self,
        url: str,
        message: str,
        *,
        attempts: int = 0,
        last_error: BaseException | None = None,
        byte_range: tuple[int, int | None] | None = None,
    ) -> None:
        self.url = redact(url)
        self.attempts = attempts
        self.last_error = last_error
        self.byte_range = byte_range
        parts = [f"{self.url}: {message}"]
        if byte_range is not None:
            end = "end" if byte_range[1] is None else byte_range[1]
            parts.append(f"bytes [{byte_range[0]}, {end})")
        if attempts:
            parts.append(f"after {attempts} attempt{'s' if attempts != 1 else ''}")
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


def request_attempts(error: BaseException) -> int:
    """How many requests botocore made before giving up with ``error`` (1 if unknown)."""
    response = getattr(error, "response", None)
    if isinstance(response, dict):
        retries = response.get("ResponseMetadata", {}).get("RetryAttempts")
        if isinstance(retries, int):
            return retries + 1
    cause = error.__cause__ or error.__context__
    if cause is not None and cause is not error:
        return request_attempts(cause)
    return 1


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
