"""``data.autotune``: the read-ahead tuner's decisions on made-up windows, and a loader that
starts from a bad config behind a slow S3 and raises its read-ahead while it runs — within
its memory cap, delivering exactly the batches of an untuned run."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from support.faultproxy import FaultProxy

from dataflow import storage
from dataflow.index import DatasetIndex
from dataflow.pipeline import DataConfig, Loader
from dataflow.pipeline.autotune import Gate, ReadAheadTuner, Setting, Totals
from dataflow.storage import StorageConfig

from .loader_support import assert_same_batches, one_epoch

if TYPE_CHECKING:
    from conftest import S3Bucket

MB = 1e6


def tuner(**options: float) -> ReadAheadTuner:
    return ReadAheadTuner(Setting(0, 1, 1), shard_bytes=10 * MB, shuffle_window=4,
                          memory_bytes=options.pop("memory_bytes", 1e12), **options)  # type: ignore[arg-type]  # fmt: skip


class Windows:
    """Running totals, one window at a time: each ``next`` adds a 2 s window in which the
    consumer stalled ``stall`` of the time and decode waited on shards ``waiting`` of its
    own time."""

    def __init__(self) -> None:
        self.totals = Totals(0.0, 0, 0.0, 0.0, 0.0)

    def next(self, stall: float, waiting: float, seconds: float = 2.0, batches: int = 10) -> Totals:
        t = self.totals
        self.totals = Totals(t.elapsed_s + seconds, t.batches + batches,
                             t.stall_s + stall * seconds, t.decode_busy_s + (1 - waiting) * seconds,
                             t.decode_wait_in_s + waiting * seconds)  # fmt: skip
        return self.totals


def test_a_storage_stall_raises_read_ahead_fetches_and_connections_step_by_step() -> None:
    tune, windows = tuner(), Windows()
    assert tune.observe(windows.totals) is None  # the first report only starts a window
    settings = []
    for _ in range(7):
        change = tune.observe(windows.next(stall=0.5, waiting=0.8))
        assert change is not None and change.before != change.after
        assert change.stall_fraction == pytest.approx(0.5)
        assert change.storage_share == pytest.approx(0.8)
        settings.append(change.after)
    assert [s.readahead_shards for s in settings] == [1, 2, 4, 8, 16, 32, 64]
    assert [s.fetch_workers for s in settings] == [1, 2, 4, 8, 16, 16, 16]
    assert [s.connections for s in settings] == [2, 4, 8, 16, 32, 32, 32]
    assert tune.report()["readahead_shards"] == 64 and len(tune.changes) == 7


def test_no_change_without_a_storage_stall() -> None:
    tune, windows = tuner(), Windows()
    tune.observe(windows.totals)
    # The consumer keeps up; decode is the bottleneck; the window is too short.
    assert tune.observe(windows.next(stall=0.02, waiting=0.9)) is None
    assert tune.observe(windows.next(stall=0.6, waiting=0.1)) is None
    assert tune.observe(windows.next(stall=0.6, waiting=0.9, seconds=0.5)) is None
    assert tune.setting == Setting(0, 1, 1) and not tune.changes
    # That short window was carried into the next one, which now decides.
    assert tune.observe(windows.next(stall=0.6, waiting=0.9, seconds=1.5)) is not None


def test_read_ahead_stays_within_the_memory_cap() -> None:
    # (4 shuffle-window shards + read-ahead) × 10 MB ≤ 75 MB: at most 3 shards ahead.
    tune, windows = tuner(memory_bytes=75 * MB), Windows()
    tune.observe(windows.totals)
    for _ in range(6):
        tune.observe(windows.next(stall=0.5, waiting=0.8))
    assert tune.setting.readahead_shards == 3
    assert tune.setting.fetch_workers == 3
    assert tune.max_readahead == 3


def test_a_reset_of_the_metrics_starts_a_new_window() -> None:
    tune, windows = tuner(), Windows()
    tune.observe(windows.next(stall=0.5, waiting=0.8, seconds=10))
    assert tune.observe(Totals(1.0, 2, 0.5, 0.1, 0.4)) is None  # time went back: restart
    assert tune.observe(Totals(3.0, 12, 1.5, 0.3, 1.4)) is not None


def test_the_gate_admits_its_limit_and_more_once_raised() -> None:
    import threading

    gate, inside, most, lock = Gate(1), [0], [0], threading.Lock()
    release = threading.Event()

    def hold() -> None:
        with gate:
            with lock:
                inside[0] += 1
                most[0] = max(most[0], inside[0])
            release.wait(5)
            with lock:
                inside[0] -= 1

    threads = [threading.Thread(target=hold) for _ in range(3)]
    for thread in threads:
        thread.start()
    for _ in range(50):
        if inside[0] == 1:
            break
        threading.Event().wait(0.01)
    assert most[0] == 1
    gate.set_limit(3)
    for _ in range(200):
        if inside[0] == 3:
            break
        threading.Event().wait(0.01)
    assert inside[0] == 3
    release.set()
    for thread in threads:
        thread.join(5)


@pytest.mark.timeout(120)
def test_a_loader_behind_slow_storage_raises_its_read_ahead_and_delivers_the_same_batches(
    digits: str, s3: S3Bucket
) -> None:
    index = DatasetIndex.load(digits)
    url = f"{s3.url}/digits"
    for path in ("index.json", *(p for s in index.shards for p in (s.path, s.table))):
        storage.upload_file(str(Path(digits) / path), f"{url}/{path}", config=s3.config)
    shard_bytes = sum(s.bytes for s in index.shards) / len(index.shards)
    bad = {"global_batch": 64, "image_size": 16, "shuffle_window": 2, "readahead_shards": 0,
           "fetch_workers": 1}  # fmt: skip
    want = one_epoch(Loader(DataConfig(url=digits, **bad), rank=0, world_size=1))
    # Every request waits 80 ms for its first byte: one shard at a time, storage is the
    # bottleneck. The cap allows 3 shards ahead of the 2 being read.
    with FaultProxy(s3.server.endpoint_url, first_byte_latency_s=0.08) as proxy:
        through = StorageConfig(endpoint_url=proxy.url, connections=1)
        config = DataConfig(url=url, autotune=True, autotune_memory=int(5.5 * shard_bytes), **bad)
        loader = Loader(config, through, rank=0, world_size=1)
        assert loader.autotuner is not None
        loader.autotuner.window_s, loader.autotuner.window_batches = 0.3, 2
        got = one_epoch(loader)
    assert_same_batches(got, want, "autotuned from S3")
    report = loader.metrics()["autotune"]
    assert report["changes"], report
    assert 1 <= report["readahead_shards"] <= 3
    assert report["fetch_workers"] == report["readahead_shards"]
    assert report["connections"] > 1
    assert loader.readahead == report["readahead_shards"]
    assert loader._fetcher.config.connections == report["connections"]
