"""The loader reading a whole epoch from S3 while the connection misbehaves.

The photo dataset (60 JPEGs, 8 shards) is converted into a fresh bucket of the local S3
server; the loader then reads it through ``support.faultproxy.FaultProxy``, which breaks
bodies mid-stream, answers 503 SlowDown or stalls past the read timeout. Shards are read in
64 KiB ranged GETs over 4 connections, so one epoch makes ~50 GETs and a fault schedule
hits index, sample tables and shard pieces alike.

Transient faults must cost nothing but time: the epoch holds every key exactly once and
the same pixels as a fault-free read. A permanent fault (a shard object gone) must stop the
epoch with an error naming the shard, or — with ``on_bad_sample = "skip"`` — lose exactly
that shard's samples and count them.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
from support.faultproxy import FaultProxy, FaultSchedule

from dataflow import storage
from dataflow.convert.config import ConvertConfig
from dataflow.convert.job import convert
from dataflow.errors import BadShardError
from dataflow.index import DatasetIndex, load_table
from dataflow.pipeline import DataConfig, Loader
from dataflow.storage import StorageConfig

if TYPE_CHECKING:
    from conftest import S3Bucket

KiB = 1024


@dataclass
class Photos:
    url: str
    index: DatasetIndex
    keys: dict[str, list[str]]
    """Shard path → its sample keys."""

    def all_keys(self) -> list[str]:
        return [key for keys in self.keys.values() for key in keys]


@dataclass
class Epoch:
    keys: list[list[str]]
    """Valid keys of each batch, in delivery order."""
    images: list[np.ndarray]
    """The valid images of each batch."""

    def key_counts(self) -> Counter[str]:
        return Counter(key for batch in self.keys for key in batch)


@pytest.fixture
def photos(photo_folder: Path, s3: S3Bucket) -> Photos:
    url = f"{s3.url}/photos"
    config = ConvertConfig(input=str(photo_folder), output=url, max_shard_samples=8, workers=1)
    convert(config, s3.config, progress=False)
    index = DatasetIndex.load(url, config=s3.config)
    keys = {s.path: load_table(url, index, s, config=s3.config).keys for s in index.shards}
    assert len(index.shards) == 8 and index.num_samples == 60
    return Photos(url=url, index=index, keys=keys)


@pytest.fixture
def proxy(s3: S3Bucket) -> Iterator[FaultProxy]:
    """A fault proxy in front of the test's S3 server; no faults until a test sets some."""
    with FaultProxy(s3.server.endpoint_url) as running:
        yield running


def through(proxy: FaultProxy) -> StorageConfig:
    """Quick retries, a short read timeout, and shards split into several ranged GETs."""
    return StorageConfig(
        endpoint_url=proxy.url, backoff_initial_s=0.01, backoff_max_s=0.05, read_timeout_s=2,
        range_size=64 * KiB, connections=4,
    )  # fmt: skip


def photo_loader(url: str, storage_config: StorageConfig, **changes: object) -> Loader:
    config = DataConfig(
        url=url, global_batch=12, image_size=32, seed=5, shuffle_window=2, drop_last=False,
        fetch_workers=4, decode_workers=2, **changes,  # type: ignore[arg-type]
    )  # fmt: skip
    return Loader(config, storage_config, rank=0, world_size=1)


def read_epoch(loader: Loader) -> Epoch:
    epoch = Epoch(keys=[], images=[])
    for batch in loader:
        valid = batch["__valid__"].numpy()
        epoch.keys.append([k for k, v in zip(batch["__key__"], valid, strict=True) if v])
        epoch.images.append(batch["image"].numpy()[valid])
    return epoch


def assert_same_epoch(epoch: Epoch, reference: Epoch) -> None:
    assert epoch.keys == reference.keys
    for got, expected in zip(epoch.images, reference.images, strict=True):
        assert np.array_equal(got, expected)


@pytest.mark.timeout(120)
def test_random_resets_and_slowdowns_lose_and_repeat_nothing(
    photos: Photos, proxy: FaultProxy
) -> None:
    config = through(proxy)
    reference = read_epoch(photo_loader(photos.url, config))
    assert reference.key_counts() == Counter(photos.all_keys())
    assert sum(proxy.stats["faults"].values()) == 0

    proxy.set_schedule(FaultSchedule(seed=3, reset_mid_body=0.3, slowdown_503=0.2))
    # A new loader: the index and sample tables come through the faults too.
    loader = photo_loader(photos.url, config)
    epoch = read_epoch(loader)

    assert epoch.key_counts() == Counter(photos.all_keys())
    assert_same_epoch(epoch, reference)
    assert loader.metrics()["skipped"] == 0
    faults = proxy.stats["faults"]
    assert faults["reset_mid_body"] > 0, proxy.stats
    assert faults["slowdown_503"] > 0, proxy.stats


@pytest.mark.timeout(120)
def test_stall_past_the_read_timeout_is_retried(photos: Photos, proxy: FaultProxy) -> None:
    config = through(proxy)
    reference = read_epoch(photo_loader(photos.url, config))
    loader = photo_loader(photos.url, config)
    # Installed after the loader read the index: the stall hits the epoch's first GET.
    stall_seconds = 30
    proxy.set_schedule(FaultSchedule(script=("stall",), stall_seconds=stall_seconds))

    began = time.monotonic()
    epoch = read_epoch(loader)
    elapsed = time.monotonic() - began

    assert_same_epoch(epoch, reference)
    assert proxy.stats["faults"]["stall"] == 1
    stalled = [e for e in proxy.events if e.fault == "stall"]
    assert len(stalled) == 1 and stalled[0].method == "GET" and stalled[0].status is None
    # The read timeout (2 s) gave up on the silent server; the proxy never closed on us.
    assert elapsed < stall_seconds / 2, elapsed


def delete_shard(photos: Photos, s3: S3Bucket, number: int) -> str:
    path = photos.index.shards[number].path
    storage.remove(storage.join_url(photos.url, path), config=s3.config, missing_ok=False)
    return path


@pytest.mark.timeout(60)
def test_missing_shard_raises_naming_it(photos: Photos, s3: S3Bucket) -> None:
    path = delete_shard(photos, s3, 3)
    loader = photo_loader(photos.url, s3.config)
    with pytest.raises(BadShardError) as caught:
        read_epoch(loader)
    assert caught.value.shard == path
    assert path in str(caught.value)
    assert "not found" in str(caught.value)
    assert "on_bad_sample" in str(caught.value)  # says what to do next


@pytest.mark.timeout(120)
def test_missing_shard_is_skipped_and_counted(photos: Photos, s3: S3Bucket) -> None:
    path = delete_shard(photos, s3, 3)
    # A lost shard is 8 of 60 samples: past the default skip budget (1 %), so this run
    # allows it (test_loader_bad_input checks the budget itself).
    loader = photo_loader(photos.url, s3.config, on_bad_sample="skip", max_skip_fraction=0.2)
    epoch = read_epoch(loader)

    lost = photos.keys[path]
    assert len(lost) == photos.index.shards[3].samples > 0
    expected = Counter(photos.all_keys())
    expected.subtract(lost)
    assert epoch.key_counts() == +expected
    assert loader.metrics()["skipped"] == len(lost)
    assert sorted(key for _, key, _ in loader.skipped) == sorted(lost)
    assert len(loader.state_dict()["skipped"]) == len(lost)
