"""The root of the config tree: one section per component, as written in ``configs/*.toml``.

Every tool loads its file through ``load`` here, so any file in ``configs/`` works with any
tool, and an unknown section or key is an error naming the closest valid one.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from dataflow.config import load_config
from dataflow.convert.config import ConvertConfig
from dataflow.pipeline.config import DataConfig
from dataflow.storage.config import StorageConfig


@dataclass(kw_only=True)
class Config:
    storage: StorageConfig = field(default_factory=StorageConfig)
    """How URLs are read and written: S3 endpoint, timeouts, retries, read sizes."""
    convert: ConvertConfig = field(default_factory=ConvertConfig)
    """tools/convert.py: input, output, shard format and limits, workers, bad-input policy."""
    data: DataConfig = field(default_factory=DataConfig)
    """The loader: dataset, global batch, order, read-ahead, cache, decode, queues, policy."""


def load(path: str | Path | None = None, overrides: Iterable[str] = ()) -> Config:
    """Load a config file (or the defaults) plus ``section.key=value`` overrides."""
    return load_config(Config, path, overrides)
