"""The node-local shard cache (``dataflow/storage/cache.py``): fetch once, size cap, LRU
eviction, oversize items, no temporaries left, and two processes filling one directory while
a monitor checks the cap from outside."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from dataflow.storage.cache import ShardCache

# Linux file times may be as coarse as a scheduler tick (~4 ms) on older kernels; LRU order is
# mtime order, so operations whose order matters are spaced by more than that.
TICK_S = 0.015


def payload(key: str, size: int) -> bytes:
    """Deterministic, key-specific bytes: a wrong file served for a key shows up."""
    seed = key.encode() * (size // max(1, len(key)) + 1)
    return seed[:size]


class CountingFetch:
    """``fetch`` callables for ShardCache.get that count calls per key."""

    def __init__(self, size: int = 100) -> None:
        self.size = size
        self.calls: Counter[str] = Counter()

    def __call__(self, key: str) -> Callable[[], bytes]:
        def fetch() -> bytes:
            self.calls[key] += 1
            return payload(key, self.size)

        return fetch


def published_bytes(directory: Path) -> int:
    """What the cap applies to: complete (non-hidden) files in the directory."""
    total = 0
    with os.scandir(directory) as scan:
        for entry in scan:
            if entry.name.startswith(".") or not entry.is_file():
                continue
            try:
                total += entry.stat().st_size
            except FileNotFoundError:
                continue  # evicted between listing and stat
    return total


def leftovers(directory: Path) -> list[str]:
    """Hidden names other than the lock folder: temporaries that should not remain."""
    return sorted(n for n in os.listdir(directory) if n.startswith(".") and n != ".locks")


def test_get_fetches_once_then_hits(tmp_path: Path) -> None:
    cache = ShardCache(str(tmp_path), 10_000)
    fetch = CountingFetch()
    for _ in range(3):
        for key in ("s3://bucket/a/shard-0.tar", "s3://bucket/a/shard-1.tar"):
            assert cache.get(key, fetch(key)) == payload(key, 100)
    assert fetch.calls == {"s3://bucket/a/shard-0.tar": 1, "s3://bucket/a/shard-1.tar": 1}
    assert (cache.misses, cache.hits) == (2, 4)
    assert cache.used_bytes() == 200
    # A second ShardCache on the same directory (another process, or a restart) hits too.
    again = ShardCache(str(tmp_path), 10_000)
    assert again.get("s3://bucket/a/shard-0.tar", fetch("s3://bucket/a/shard-0.tar")) == payload(
        "s3://bucket/a/shard-0.tar", 100
    )
    assert fetch.calls["s3://bucket/a/shard-0.tar"] == 1 and again.hits == 1


def test_keys_with_the_same_file_name_do_not_collide(tmp_path: Path) -> None:
    cache = ShardCache(str(tmp_path), 10_000)
    fetch = CountingFetch()
    first, second = "s3://one/data/shard-000000.tar", "s3://two/data/shard-000000.tar"
    assert cache.get(first, fetch(first)) == payload(first, 100)
    assert cache.get(second, fetch(second)) == payload(second, 100)
    assert cache.path(first) != cache.path(second)
    assert cache.path(first).endswith("shard-000000.tar")  # readable in `ls`
    assert fetch.calls == {first: 1, second: 1}


def test_the_cap_holds_after_every_insert(tmp_path: Path) -> None:
    capacity = 1_000
    cache = ShardCache(str(tmp_path), capacity)
    fetch = CountingFetch(size=150)  # 6 items fit; 20 are inserted
    for number in range(20):
        key = f"s3://bucket/shard-{number}.tar"
        assert cache.get(key, fetch(key)) == payload(key, 150)
        assert published_bytes(tmp_path) <= capacity
        assert cache.used_bytes() == published_bytes(tmp_path)
        assert cache.used_bytes() == min(number + 1, capacity // 150) * 150  # evicts only as needed
    assert leftovers(tmp_path) == []


def test_the_least_recently_used_item_is_evicted(tmp_path: Path) -> None:
    cache = ShardCache(str(tmp_path), 300)  # room for three 100-byte items
    fetch = CountingFetch()

    def get(key: str) -> None:
        assert cache.get(key, fetch(key)) == payload(key, 100)
        time.sleep(TICK_S)

    for key in ("a", "b", "c"):
        get(key)
    get("a")  # a hit: a is now the most recently used, b the least
    assert fetch.calls == {"a": 1, "b": 1, "c": 1}
    get("d")  # evicts b, not a (which was inserted first)
    assert os.path.exists(cache.path("a")) and not os.path.exists(cache.path("b"))
    get("e")  # evicts c
    assert not os.path.exists(cache.path("c"))
    for key in ("a", "d", "e"):  # hits, in this order: a is now the least recently used
        get(key)
    assert fetch.calls == {"a": 1, "b": 1, "c": 1, "d": 1, "e": 1}
    get("b")  # a miss: evicts a
    assert fetch.calls["b"] == 2
    assert [os.path.exists(cache.path(k)) for k in "abde"] == [False, True, True, True]


def test_an_item_larger_than_the_cap_is_served_but_not_stored(tmp_path: Path) -> None:
    cache = ShardCache(str(tmp_path), 250)
    fetch = CountingFetch(size=100)
    cache.get("small", fetch("small"))
    big = CountingFetch(size=251)
    for _ in range(2):
        assert cache.get("big", big("big")) == payload("big", 251)
    assert big.calls["big"] == 2  # fetched each time: never cached
    assert not os.path.exists(cache.path("big"))
    assert os.path.exists(cache.path("small"))  # and nothing was evicted to make room
    assert leftovers(tmp_path) == []
    exact = CountingFetch(size=250)  # exactly the cap: cached, after evicting the rest
    cache.get("exact", exact("exact"))
    cache.get("exact", exact("exact"))
    assert exact.calls["exact"] == 1 and cache.used_bytes() == 250


def test_a_failed_fetch_caches_nothing(tmp_path: Path) -> None:
    cache = ShardCache(str(tmp_path), 1_000)

    def broken() -> bytes:
        raise OSError("connection reset")

    with pytest.raises(OSError, match="connection reset"):
        cache.get("key", broken)
    assert published_bytes(tmp_path) == 0 and leftovers(tmp_path) == []
    fetch = CountingFetch()
    assert cache.get("key", fetch("key")) == payload("key", 100)
    assert fetch.calls["key"] == 1


def test_a_capacity_below_one_byte_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="got 0"):
        ShardCache(str(tmp_path), 0)


# ---------------------------------------------------------------------------------------------
# Two processes, one directory

WORKER = textwrap.dedent(
    """
    import json, os, sys, time
    from dataflow.storage.cache import ShardCache

    directory, capacity, go_file, keys = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4:]

    def expected(key):
        import random
        return random.Random(key).randbytes(100_000)

    fetches = {}
    def fetcher(key):
        def fetch():
            fetches[key] = fetches.get(key, 0) + 1
            return expected(key)
        return fetch

    cache = ShardCache(directory, capacity)
    while not os.path.exists(go_file):
        time.sleep(0.001)
    wrong = []
    for key in keys + keys[::-1]:  # forward, then back: recent keys hit, old ones were evicted
        if cache.get(key, fetcher(key)) != expected(key):
            wrong.append(key)
    print(json.dumps({"fetches": fetches, "wrong": wrong, "hits": cache.hits}))
    """
)


@pytest.mark.timeout(60)
def test_two_processes_share_the_cache_within_the_cap(tmp_path: Path) -> None:
    capacity = 1_000_000  # ten 100 KB items
    directory = tmp_path / "cache"
    go_file = tmp_path / "go"
    shared = [f"s3://bucket/shared-{n:02d}.tar" for n in range(15)]
    only_first = [f"s3://bucket/first-{n:02d}.tar" for n in range(15)]
    only_second = [f"s3://bucket/second-{n:02d}.tar" for n in range(15)]
    # Both start on the shared keys at the same moment and in the same order, so they race for
    # the same key; the second interleaves them with its own keys.
    keys = {
        "first": shared + only_first,
        "second": [k for pair in zip(shared, only_second, strict=True) for k in pair],
    }
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    workers = {
        name: subprocess.Popen(
            [sys.executable, "-c", WORKER, str(directory), str(capacity), str(go_file), *names],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=environment,
        )
        for name, names in keys.items()
    }
    while not directory.exists():  # both import and create the directory, then wait
        time.sleep(0.005)
    time.sleep(0.3)
    go_file.touch()
    samples, largest = 0, 0
    while any(worker.poll() is None for worker in workers.values()):
        used = published_bytes(directory)
        assert used <= capacity, f"cache holds {used} bytes, over the {capacity} cap"
        samples, largest = samples + 1, max(largest, used)
        time.sleep(0.002)
    results = {}
    for name, worker in workers.items():
        out, err = worker.communicate()
        assert worker.returncode == 0, err.decode()
        results[name] = json.loads(out)
    assert samples >= 5 and largest > 0  # the monitor really watched the filling
    for name, result in results.items():
        assert result["wrong"] == [], f"{name} got wrong bytes for {result['wrong']}"
        assert result["hits"] > 0, name
    fetched = Counter[str]()
    for result in results.values():
        fetched.update(result["fetches"])
    assert set(fetched) == set(shared + only_first + only_second)  # each fetched by someone
    assert published_bytes(directory) <= capacity
    assert leftovers(directory) == []
