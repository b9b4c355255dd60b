"""Spool files for remote writes: a local file the object is written into, then uploaded.

A spool file is deleted when its block ends, however it ends. A process killed outright
(kill -9, the OOM killer) runs no cleanup, so each spool file is named after its owner's pid
(``shardflow-<pid>-<random>.part``) and the next writer with the same spool directory
deletes those whose owner is gone: a rerun finishes the cleanup of the run that was killed.
The sweep costs one directory listing per remote write (a shard: megabytes of upload).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import tempfile
from collections.abc import Iterator
from typing import IO

from dataflow import processes

log = logging.getLogger(__name__)

# shardflow-<owner pid>-<random>.part: the pid says whose it is, to a person and to the sweep.
_SPOOL_NAME = re.compile(r"shardflow-(\d+)-[^/]*\.part")


@contextlib.contextmanager
def spool_file(spool_dir: str | None) -> Iterator[IO[bytes]]:
    """A spool file that is deleted when the block ends, however it ends, and — should the
    process be killed (kill -9 runs no cleanup) — by the next writer with this spool dir.

    The owner holds a ``flock`` on it for its whole life. A file is stale when its pid is
    not alive here *and* its lock is free: the pid alone could belong to a process in
    another pid namespace sharing the directory, and the lock alone is not yet taken in the
    moment between the file's creation and its ``flock``.
    """
    directory = spool_dir or tempfile.gettempdir()
    discard_dead_spools(directory)
    with tempfile.NamedTemporaryFile(
        dir=directory, prefix=f"shardflow-{os.getpid()}-", suffix=".part"
    ) as spool:
        fcntl.flock(spool.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        yield spool


def discard_dead_spools(directory: str) -> int:
    """Delete the spool files that killed writers left in ``directory``; returns the count.

    Every remote ``open_write`` calls it first, so a rerun finishes the cleanup of the run
    that was killed.
    """
    removed = 0
    try:
        names = [name for name in os.listdir(directory) if _SPOOL_NAME.fullmatch(name)]
    except FileNotFoundError:
        return 0
    for name in names:
        match = _SPOOL_NAME.fullmatch(name)
        if match is None or processes.running(int(match.group(1))):
            continue
        path = os.path.join(directory, name)
        try:
            descriptor = os.open(path, os.O_RDONLY)
        except OSError:
            continue  # gone already, or another user's
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.remove(path)
            removed += 1
        except OSError:
            continue  # locked: its owner lives in another pid namespace
        finally:
            os.close(descriptor)
    if removed:
        log.info("removed %d spool file(s) of killed writers from %s", removed, directory)
    return removed
