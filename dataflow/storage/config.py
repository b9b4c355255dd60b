"""Storage knobs: S3 endpoint and timeouts, retry budget, read sizes, connections."""

from __future__ import annotations

from dataclasses import dataclass

from dataflow.config import ByteSize, ConfigError, parse_bytes


@dataclass(kw_only=True)
class StorageConfig:
    endpoint_url: str = ""
    """S3-compatible endpoint, e.g. http://127.0.0.1:9000; empty: $AWS_ENDPOINT_URL or AWS."""
    region: str = ""
    """S3 region; empty: $AWS_REGION / $AWS_DEFAULT_REGION, else us-east-1."""
    anonymous: bool = False
    """Unsigned requests (public buckets); otherwise the standard AWS credential chain."""
    connect_timeout_s: float = 10.0
    """Seconds to establish a connection before it counts as a transient fault."""
    read_timeout_s: float = 60.0
    """Seconds without a byte from the server before a read counts as a transient fault."""
    max_attempts: int = 8
    """Attempts per read or write (the first included) before a transient fault is fatal."""
    backoff_initial_s: float = 0.1
    """First retry delay; doubles per attempt, with full jitter."""
    backoff_max_s: float = 10.0
    """Cap on one retry delay."""
    read_chunk_size: ByteSize = 1 << 20
    """Bytes per read from an HTTP body; a broken body resumes after the last chunk received."""
    block_size: ByteSize = 4 << 20
    """POSIX read size; large aligned reads suit Lustre/GPFS stripes."""
    range_size: ByteSize = 8 << 20
    """Bytes per ranged GET when one object is read over several connections."""
    connections: int = 8
    """Concurrent requests to the object store per process."""
    create_bucket: bool | None = None
    """Let a write create a missing bucket. Unset: only on a loopback endpoint (the embedded
    server); elsewhere a missing bucket is an error naming it."""

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {self.max_attempts}")
        if self.connections < 1:
            raise ValueError(f"connections must be >= 1, got {self.connections}")
        for name in ("read_chunk_size", "block_size", "range_size"):
            # Built in code, a size may still be "16MiB": the same parser as the TOML loader.
            try:
                value = parse_bytes(getattr(self, name))
            except ConfigError as error:
                raise ConfigError(f"{name}: {error}") from None
            setattr(self, name, value)
            if value < 4096:
                raise ValueError(f"{name} must be at least 4096 bytes, got {value}")
        for name in ("connect_timeout_s", "read_timeout_s", "backoff_initial_s", "backoff_max_s"):
            value = getattr(self, name)
            if value <= 0:
                raise ValueError(f"{name} must be > 0, got {value}")
