"""A node-local shard cache on disk: size cap, LRU eviction, shared by processes.

Every process on a node (one per GPU) may point at the same directory. A shard is fetched
once: the first process takes a per-shard ``flock`` and downloads; the others wait on the
lock and then read the file. Files appear only complete — written as hidden temporaries
and renamed. Eviction and publishing happen together under one directory-wide lock, so the
bytes of published shards never exceed the cap, even with several processes filling at
once (temporaries being written are not counted; each is at most one shard). LRU order is
the files' mtime, touched on every hit. A shard larger than the whole cap is served
without being cached.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import random
from collections.abc import Callable, Iterator

import xxhash

_LOCKS = ".locks"


@contextlib.contextmanager
def _flock(path: str) -> Iterator[None]:
    handle = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(handle, fcntl.LOCK_UN)
        os.close(handle)


class ShardCache:
    def __init__(self, directory: str, capacity_bytes: int) -> None:
        if capacity_bytes < 1:
            raise ValueError(f"cache capacity must be >= 1 byte, got {capacity_bytes}")
        self.directory = os.path.abspath(directory)
        self.capacity = capacity_bytes
        os.makedirs(os.path.join(self.directory, _LOCKS), exist_ok=True)
        self.hits = 0
        self.misses = 0

    def _name(self, key: str) -> str:
        readable = key.rsplit("/", 1)[-1][-60:]
        return f"{xxhash.xxh64(key.encode()).hexdigest()}-{readable}"

    def path(self, key: str) -> str:
        return os.path.join(self.directory, self._name(key))

    def used_bytes(self) -> int:
        return sum(size for _, size, _ in self._entries())

    def _entries(self) -> list[tuple[str, int, float]]:
        entries = []
        with os.scandir(self.directory) as scan:
            for entry in scan:
                if entry.name.startswith(".") or not entry.is_file():
                    continue
                try:
                    info = entry.stat()
                except FileNotFoundError:
                    continue
                entries.append((entry.path, info.st_size, info.st_mtime))
        return entries

    def _read(self, path: str) -> bytes | None:
        try:
            with open(path, "rb") as handle:
                data = handle.read()
            os.utime(path)
            return data
        except FileNotFoundError:
            return None

    def get(self, key: str, fetch: Callable[[], bytes]) -> bytes:
        """The cached bytes of ``key``, fetched (once per node) on a miss."""
        path = self.path(key)
        data = self._read(path)
        if data is not None:
            self.hits += 1
            return data
        with _flock(os.path.join(self.directory, _LOCKS, self._name(key) + ".lock")):
            data = self._read(path)  # another process may have fetched it meanwhile
            if data is not None:
                self.hits += 1
                return data
            self.misses += 1
            data = fetch()
            if len(data) <= self.capacity:
                self._publish(path, data)
            return data

    def _publish(self, path: str, data: bytes) -> None:
        suffix = f"tmp-{os.getpid()}-{random.getrandbits(32):x}"
        temporary = os.path.join(self.directory, f".{os.path.basename(path)}.{suffix}")
        try:
            with open(temporary, "wb") as handle:
                handle.write(data)
            with _flock(os.path.join(self.directory, _LOCKS, "evict.lock")):
                entries = sorted(self._entries(), key=lambda e: e[2])
                used = sum(size for _, size, _ in entries)
                while entries and used + len(data) > self.capacity:
                    victim, size, _ = entries.pop(0)
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(victim)  # readers holding it open keep their copy
                    used -= size
                os.replace(temporary, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.remove(temporary)
