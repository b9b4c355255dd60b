"""StorageConfig built in code takes byte sizes the way a TOML file writes them."""

from __future__ import annotations

import pytest

from dataflow.config import ConfigError
from dataflow.storage import StorageConfig


def test_byte_sizes_accept_the_strings_a_config_file_takes() -> None:
    config = StorageConfig(range_size="16MiB", block_size="4MB", read_chunk_size=65536)  # type: ignore[arg-type]
    assert config.range_size == 16 << 20
    assert config.block_size == 4_000_000
    assert config.read_chunk_size == 65536


def test_a_byte_size_that_cannot_be_read_names_the_field() -> None:
    with pytest.raises(ConfigError, match=r"range_size: cannot read '16 furlongs' as a byte size"):
        StorageConfig(range_size="16 furlongs")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="range_size must be at least 4096 bytes, got 1000"):
        StorageConfig(range_size="1KB")  # type: ignore[arg-type]
