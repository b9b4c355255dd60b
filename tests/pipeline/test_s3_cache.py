"""The loader reading from S3 through the node-local shard cache: the second epoch (and a
second process on the node) reads shards from disk, not from the object store."""

from __future__ import annotations

import multiprocessing
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch
from support.faultproxy import FaultProxy

from dataflow.convert.config import ConvertConfig
from dataflow.convert.job import convert
from dataflow.index import DatasetIndex
from dataflow.pipeline import DataConfig, Loader
from dataflow.storage import StorageConfig

if TYPE_CHECKING:
    from conftest import S3Bucket


def shard_gets(proxy: FaultProxy) -> int:
    return sum(
        1
        for event in proxy.events
        if event.method == "GET" and event.target.split("?")[0].endswith(".tar")
    )


def epoch(url: str, storage_config: StorageConfig, cache_dir: Path, epoch_number: int) -> list:  # type: ignore[type-arg]
    config = DataConfig(url=url, global_batch=10, image_size=24, cache_dir=str(cache_dir),
                        cache_bytes=50_000_000, drop_last=False)  # fmt: skip
    loader = Loader(config, storage_config, rank=0, world_size=1)
    loader.set_epoch(epoch_number)
    return [(batch["__key__"], batch["image"].clone()) for batch in loader]


def _other_process(url: str, endpoint: str, cache_dir: str, queue: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    batches = epoch(url, StorageConfig(endpoint_url=endpoint), Path(cache_dir), 0)
    queue.put([keys for keys, _ in batches])


@pytest.mark.timeout(120)
def test_shards_come_from_the_cache_after_the_first_read(
    photo_folder: Path, s3: S3Bucket, tmp_path: Path
) -> None:
    url = f"{s3.url}/photos"
    convert(ConvertConfig(input=str(photo_folder), output=url, max_shard_samples=15, workers=1),
            s3.config, progress=False)  # fmt: skip
    shards = len(DatasetIndex.load(url, config=s3.config).shards)
    cache = tmp_path / "cache"
    with FaultProxy(s3.server.endpoint_url) as proxy:
        through = StorageConfig(endpoint_url=proxy.url, backoff_initial_s=0.01)
        first = epoch(url, through, cache, 0)
        assert shard_gets(proxy) == shards  # each shard fetched once
        again = epoch(url, through, cache, 0)
        assert shard_gets(proxy) == shards  # and never again: the cache served it
        # A second process on the node (another rank) shares the cache.
        context = multiprocessing.get_context("spawn")
        queue = context.Queue()
        process = context.Process(target=_other_process, args=(url, proxy.url, str(cache), queue))
        process.start()
        other = queue.get(timeout=90)
        process.join(timeout=30)
        assert shard_gets(proxy) == shards
    assert [keys for keys, _ in first] == [keys for keys, _ in again] == other
    for (_, image_a), (_, image_b) in zip(first, again, strict=True):
        assert torch.equal(image_a, image_b)
    assert sum(len(keys) for keys, _ in first) == 60
    assert len([p for p in cache.iterdir() if not p.name.startswith(".")]) == shards
