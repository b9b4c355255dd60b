"""Whether a process named in a lease or a file name still runs, on this host.

Leases (a conversion's ``_convert/lease-node-N.json``, the trainer's ``train.lease``) and the
S3 spool files of ``open_write`` name their owner's pid, so that the next run can take over or
clean up after an owner that was killed. A pid alone can be reused by an unrelated process;
recording its start time (``start_time``) next to it tells the two apart where ``/proc`` is.
"""

from __future__ import annotations

import os


def start_time(pid: int) -> str:
    """The process's start time in clock ticks since boot ('' where /proc cannot tell)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as handle:
            # The command name (field 2) may hold spaces: count fields after its ')'.
            return handle.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def running(pid: int, started: str = "") -> bool:
    """Whether ``pid`` runs on this host, and, given ``started``, is the process that started
    then (not a later one that reused the pid)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        pass
    return not started or start_time(pid) in ("", started)
