"""The batch buffer pool: memory is reused only once no array or tensor refers to it."""

from __future__ import annotations

import gc

import numpy as np
import torch

from dataflow.pipeline.buffers import BufferPool


def test_a_buffer_is_reused_only_after_every_user_let_go() -> None:
    pool = BufferPool()
    first = pool.array((4, 8, 8, 3))
    first[...] = 7
    tensor = torch.from_numpy(first)
    view = tensor[1:3]  # a view keeps the storage, and so the array, alive
    del first, tensor
    gc.collect()
    second = pool.array((4, 8, 8, 3))
    assert len(pool) == 2, "memory still viewed by a tensor must not be handed out again"
    second[...] = 1
    assert int(view.sum()) == 7 * view.numel()
    del view
    gc.collect()
    third = pool.array((2, 8, 8, 3))  # smaller requests fit in a freed buffer
    assert len(pool) == 2
    assert third.shape == (2, 8, 8, 3) and third.dtype == np.uint8
    del second, third
    gc.collect()
    pool.array((4, 8, 8, 3))
    pool.array((4, 8, 8, 3))
    assert len(pool) == 2


def test_loader_batches_never_share_memory_while_held(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from dataflow.convert.config import ConvertConfig
    from dataflow.convert.job import convert
    from dataflow.datasets import photo_jpegs
    from dataflow.pipeline import DataConfig, Loader

    source = tmp_path / "photos"
    for number, (label, data) in enumerate(photo_jpegs(40, seed=7)):
        (source / f"c{label}").mkdir(parents=True, exist_ok=True)
        (source / f"c{label}" / f"p{number}.jpg").write_bytes(data)
    convert(ConvertConfig(input=str(source), output=str(tmp_path / "ds"), workers=1),
            progress=False)  # fmt: skip
    config = DataConfig(url=str(tmp_path / "ds"), global_batch=8, image_size=16,
                        prefetch_batches=1)  # fmt: skip
    held = [batch["image"] for batch in Loader(config, rank=0, world_size=1)]
    copies = [batch["image"].clone() for batch in Loader(config, rank=0, world_size=1)]
    assert len(held) == 5
    for kept, fresh in zip(held, copies, strict=True):
        assert torch.equal(kept, fresh), "a held batch was overwritten by a later one"


def test_shard_memory_is_reused_across_epochs(photos: str) -> None:
    """Local shards are read into pooled buffers; once an epoch's views are gone the next
    epoch reads into the same memory, and the batches are what fresh memory would give."""
    from dataflow import storage
    from dataflow.pipeline import DataConfig, Loader
    from dataflow.pipeline import shards as shard_module

    config = DataConfig(url=photos, global_batch=4, image_size=16, shuffle_window=2,
                        readahead_shards=1, fetch_workers=1, prefetch_batches=1)  # fmt: skip
    loader = Loader(config, rank=0, world_size=1)
    pooled = []
    for epoch in range(3):
        loader.set_epoch(epoch)
        pooled.append([batch["image"].clone() for batch in loader])
    buffers = len(loader._fetcher._buffers)
    loader.close()
    assert 0 < buffers <= 2 + 1 + 1 + 1, buffers  # window + read-ahead + fetch in flight + 1
    assert buffers < 9  # the dataset has 9 shards: memory was reused within the epoch too

    def read_fresh(self: object, url: str, size: int, *, use_cache: bool) -> bytes:
        return storage.read_range(url, 0, size)

    original = shard_module.ShardFetcher._read
    shard_module.ShardFetcher._read = read_fresh  # type: ignore[method-assign,assignment]
    try:
        fresh = Loader(config, rank=0, world_size=1)
        for epoch in range(3):
            fresh.set_epoch(epoch)
            batches = [batch["image"] for batch in fresh]
            assert all(torch.equal(a, b) for a, b in zip(pooled[epoch], batches, strict=True))
        fresh.close()
    finally:
        shard_module.ShardFetcher._read = original  # type: ignore[method-assign]
