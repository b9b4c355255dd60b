"""The loader's life cycle: config errors, breaking out and closing, the next epoch started
ahead, and the priority of its threads."""

from __future__ import annotations

import re
import threading
from pathlib import Path

import pytest

from dataflow.errors import DataError
from dataflow.pipeline import DataConfig, Loader

from .loader_support import (
    CorruptDataset,
    assert_same_batches,
    make,
    one_epoch,
    shardflow_threads,
    take,
)


def test_a_global_batch_that_does_not_split_is_refused(digits: str) -> None:
    with pytest.raises(ValueError, match=r"global_batch 10 .* 3 ranks"):
        make(digits, global_batch=10, world_size=3)


def test_an_empty_url_is_a_data_error() -> None:
    with pytest.raises(DataError, match="url"):
        Loader(DataConfig(url=""), rank=0, world_size=1)


def test_an_unknown_image_field_is_a_data_error(digits: str) -> None:
    with pytest.raises(DataError, match=r"'jpg'.*png"):
        make(digits, image_field="jpg")


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("global_batch", 0, "global_batch must be >= 1, got 0"),
        ("image_size", -1, "image_size must be >= 1, got -1"),
        ("readahead_shards", -2, "readahead_shards must be >= 0, got -2"),
        ("crop_scale", [0.5, 0.2], "crop_scale"),
        ("dali_pipelines", -1, "dali_pipelines must be >= 0 (0: auto), got -1"),
    ],
)
def test_config_values_are_checked(option: str, value: object, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        DataConfig(url="x", **{option: value})  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# Closing


def test_breaking_out_and_iterating_again_continues(digits: str) -> None:
    reference = take(make(digits), 10)
    loader = make(digits)
    first = take(loader, 3)  # breaks out of the iteration after 3 batches
    assert loader.step == 3
    second = take(loader, 7)
    assert_same_batches(first + second, reference, "break, then iterate again")
    loader.close()
    assert shardflow_threads() == []


def test_close_stops_every_thread(digits: str) -> None:
    loader = make(digits, prefetch_batches=2)
    iterator = iter(loader)
    next(iterator)
    assert shardflow_threads() != []  # producer, fetch and decode pools are running
    loader.close()
    assert shardflow_threads() == []
    assert loader.step == 1
    # The abandoned iterator ends: no stale, half-decoded batch, and the position stays put.
    with pytest.raises(StopIteration):
        next(iterator)
    assert loader.step == 1
    assert_same_batches(take(loader, 2), take(make(digits), 3)[1:], "after close")
    loader.close()
    assert shardflow_threads() == []


@pytest.mark.timeout(30)
def test_an_iterator_closed_after_the_producer_finished_ends(photos: str) -> None:
    """All 5 batches are queued before close(): the old iterator must end, not wait forever
    on a queue that close() emptied."""
    loader = make(photos, global_batch=12, prefetch_batches=8)
    iterator = iter(loader)
    next(iterator)
    active = loader._active
    assert active is not None
    active.producer.join(timeout=10)  # everything, end marker included, is queued
    loader.close()
    with pytest.raises(StopIteration):
        next(iterator)
    assert loader.step == 1 and shardflow_threads() == []


def test_load_state_dict_during_an_iteration_restarts_from_the_state(digits: str) -> None:
    reference = take(make(digits), 6)
    loader = make(digits)
    take(loader, 2)
    state = loader.state_dict()
    iterator = iter(loader)
    for _ in range(3):
        next(iterator)
    loader.load_state_dict(state)  # closes the running pass
    with pytest.raises(StopIteration):
        next(iterator)
    assert_same_batches(take(loader, 4), reference[2:], "after load_state_dict")
    loader.close()


def test_len_counts_global_batches(digits: str) -> None:
    assert len(make(digits, global_batch=64)) == 28
    assert len(make(digits, global_batch=64, drop_last=False)) == 29
    assert make(digits, global_batch=64, world_size=4, rank=2).per_rank_batch == 16


# ---------------------------------------------------------------------------------------------
# The next epoch started ahead


def test_the_next_epoch_started_ahead_gives_the_same_batches(digits: str) -> None:
    steps = len(make(digits))
    reference = take(make(digits), 2 * steps + 3)
    loader = make(digits, prefetch_next_epoch=True)
    first_epoch = one_epoch(loader)
    ahead = loader._next
    assert ahead is not None and (ahead.epoch, ahead.start_step) == (1, 0)
    rest = take(loader, steps + 3)
    assert_same_batches(first_epoch + rest, reference, "next epoch started ahead")
    loader.close()
    assert shardflow_threads() == []


def test_a_pass_started_ahead_is_dropped_when_another_position_is_asked(digits: str) -> None:
    loader = make(digits, prefetch_next_epoch=True)
    one_epoch(loader)
    assert loader._next is not None
    loader.set_epoch(3)  # not the epoch that was started ahead
    reference_loader = make(digits)
    reference_loader.set_epoch(3)
    reference = take(reference_loader, 2)
    reference_loader.close()
    assert_same_batches(take(loader, 2), reference, "epoch 3 after epoch 1 was started ahead")
    loader.close()
    assert shardflow_threads() == []


def test_skips_of_a_pass_started_ahead_enter_the_state_when_delivered(
    corrupt_photos: CorruptDataset,
) -> None:
    loader = make(corrupt_photos.url, global_batch=12, on_bad_sample="skip", prefetch_batches=8,
                  prefetch_next_epoch=True)  # fmt: skip
    one_epoch(loader)
    ahead = loader._next
    assert ahead is not None
    ahead.producer.join(timeout=30)  # all 5 batches of epoch 1 fit in the queue
    for job in list(ahead.queue.queue):  # decoded ahead, the bad sample included
        for chunk in getattr(job, "chunks", []):
            chunk.result()
    assert sum(len(getattr(job, "skips", [])) for job in ahead.queue.queue) == 1
    assert [tuple(s[:2]) for s in loader.state_dict()["skipped"]] == [(0, corrupt_photos.victim)]
    one_epoch(loader)
    skipped = [tuple(s[:2]) for s in loader.state_dict()["skipped"]]
    assert skipped == [(0, corrupt_photos.victim), (1, corrupt_photos.victim)]
    loader.close()


def thread_nice(native_id: int) -> int:
    with open(f"/proc/self/task/{native_id}/stat") as handle:
        # Field 19 is the niceness; the command name (field 2) may hold spaces: skip past ')'.
        return int(handle.read().rsplit(")", 1)[1].split()[16])


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc")
@pytest.mark.parametrize("nice", [0, 7])
def test_loader_threads_run_at_a_lower_priority(digits: str, nice: int) -> None:
    """Fetch, decode and producer threads yield the CPU to the training loop; the caller's
    own thread keeps its priority."""
    loader = make(digits, thread_nice=nice, prefetch_next_epoch=True)
    mine = thread_nice(threading.get_native_id())
    try:
        batches = iter(loader)
        next(batches)
        ours = [t for t in threading.enumerate() if t.name.startswith("shardflow-")]
        assert {t.name.split("-")[1].split("_")[0] for t in ours} >= {"fetch", "decode",
                                                                       "producer"}  # fmt: skip
        assert {thread_nice(t.native_id) for t in ours if t.native_id} == {mine + nice}
        assert thread_nice(threading.get_native_id()) == mine
    finally:
        loader.close()
