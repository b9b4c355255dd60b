"""Whether a process named in a lease or a file name still runs, on this host.

Leases (a conversion's ``_convert/lease-node-N.json``, the trainer's ``train.lease``) and the
S3 spool files of ``open_write`` name their owner's pid, so that the next run can take over or
clean up after an owner that was killed. A pid alone can be reused by an unrelated process;
recording its start time (``start_time``) next to it tells the two apart where ``/proc`` is.

Worker processes (conversion pools, the transform pool) exit with the process that started
them, kill -9 included: ``die_with_parent``.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import select
import signal
import sys
import threading
import time

_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


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


def die_with_parent(main_pid: int) -> None:
    """Make this worker process exit when the process ``main_pid`` that started it dies
    (kill -9 too); call it first thing in the worker.

    A pool worker blocks reading its task queue, and its siblings hold that pipe's write end
    open too, so a killed main process would leave every worker waiting forever, with all it
    holds (177 MB each in the case reported for conversion workers). A forked worker is the
    main process's child: Linux sends it SIGKILL when its parent dies (PR_SET_PDEATHSIG; the
    "parent" is the thread that forked it, so fork from a thread that lives as long as the
    pool). A forkserver's worker is the server's child, and the server waits for its workers
    to exit (they hold its "alive" pipe), so the workers must watch the main process
    themselves: a thread waits on a pidfd of it (immune to pid reuse), or polls its pid
    every second where pidfds are missing.
    """
    if sys.platform.startswith("linux") and os.getppid() == main_pid:
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    try:
        watched: int | None = os.pidfd_open(main_pid)
    except ProcessLookupError:
        os._exit(1)  # died before we could watch it
    except (AttributeError, OSError):
        watched = None

    def watch() -> None:
        if watched is not None:
            select.select([watched], [], [])  # readable once the process has exited
        else:
            with contextlib.suppress(PermissionError):
                while True:
                    os.kill(main_pid, 0)
                    time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="main-process-watchdog", daemon=True).start()
