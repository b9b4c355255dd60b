"""One job per ``train.out_dir``: rank 0 holds a lease file, ``{out_dir}/train.lease``.

Two jobs writing one out_dir interleave their checkpoints and audit logs, and the second
deletes the first's ``.partial`` saves: a torchrun agent SIGKILLed alone leaves its workers
training, and a relaunch beside them delivered 100 samples twice. So a job first creates
the lease (host, pid, the pid's start time, run id) — atomically, by hard-linking a
finished temporary file to the name, which fails if the name exists — and removes it when
it ends. A lease that is there already is

- refused while its holder lives: ``OutDirBusyError`` names the host, pid and file;
- taken over when its holder is gone: on this host, when the pid is no longer running (or
  now belongs to another process: the start time differs), as after a kill -9 or a torchrun
  restart; on another host, when its heartbeat stopped: the holder touches the file every
  ``HEARTBEAT_S`` seconds, and a taker watches it for ``stale_after_s`` (no clocks compared).

The check-and-take-over runs under ``flock`` on the out_dir itself, where the file system
has it, so two relaunches racing for a dead holder's lease cannot both win. Cost: one small file
write at start, a ``utime`` every ``HEARTBEAT_S``; a takeover from another host waits
``stale_after_s``.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import threading
import time
from typing import Any

from dataflow import processes

LEASE = "train.lease"
HEARTBEAT_S = 5.0
STALE_AFTER_S = 30.0


class OutDirBusyError(Exception):
    """Another live job holds the lease on this ``train.out_dir``."""


class Lease:
    """The lease on ``out_dir``, taken by ``acquire`` and given up by ``release``."""

    def __init__(self, out_dir: str, run_id: str, *, stale_after_s: float = STALE_AFTER_S) -> None:
        self.path = os.path.join(out_dir, LEASE)
        self.run_id = run_id
        self.stale_after_s = stale_after_s
        self.host = socket.gethostname()
        self.took_over: dict[str, Any] | None = None
        """The dead holder's record, when this lease replaced one."""
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None

    def acquire(self) -> None:
        """Take the lease or raise ``OutDirBusyError``; starts the heartbeat."""
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        pid = os.getpid()
        mine = {"host": self.host, "pid": pid, "pid_start": processes.start_time(pid),
                "run": self.run_id, "since": round(time.time(), 3)}  # fmt: skip
        temporary = f"{self.path}.{self.host}.{os.getpid()}.tmp"
        with open(temporary, "w", encoding="utf-8") as handle:
            json.dump(mine, handle)
            handle.flush()
            os.fsync(handle.fileno())
        try:
            with self._exclusive():
                while not self._link(temporary):
                    holder = self._holder()
                    if holder is not None and self._alive(holder):
                        raise OutDirBusyError(
                            f"{os.path.dirname(self.path)} is in use by another training job: "
                            f"pid {holder.get('pid')} on host {holder.get('host')} holds "
                            f"{self.path} (since {time.ctime(holder.get('since', 0))}); stop "
                            f"that job or use another --train.out_dir (delete the file only "
                            f"if that process is gone)"
                        )
                    self.took_over = holder
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(self.path)
        finally:
            os.unlink(temporary)
        self._heartbeat = threading.Thread(target=self._beat, name="lease-heartbeat", daemon=True)
        self._heartbeat.start()

    def release(self) -> None:
        """Stop the heartbeat and remove the lease if it is still this job's."""
        self._stop.set()
        if self._heartbeat is not None:
            self._heartbeat.join()
            self._heartbeat = None
            holder = self._holder()
            if holder is not None and holder.get("run") == self.run_id:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.path)

    def _link(self, temporary: str) -> bool:
        try:
            os.link(temporary, self.path)
        except FileExistsError:
            return False
        return True

    def _holder(self) -> dict[str, Any] | None:
        """The lease's record; None if it vanished or cannot be read (a broken lease file,
        which no holder writes: ``acquire`` links only finished files)."""
        try:
            with open(self.path, encoding="utf-8") as handle:
                holder = json.load(handle)
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}
        return holder if isinstance(holder, dict) else {}

    def _alive(self, holder: dict[str, Any]) -> bool:
        if holder.get("host") == self.host and isinstance(holder.get("pid"), int):
            return processes.running(holder["pid"], str(holder.get("pid_start", "")))
        # On another host (or unreadable): alive while its heartbeat moves the mtime.
        try:
            seen = os.stat(self.path).st_mtime_ns
        except FileNotFoundError:
            return False
        deadline = time.monotonic() + self.stale_after_s
        while time.monotonic() < deadline:
            time.sleep(min(1.0, self.stale_after_s / 10))
            try:
                if os.stat(self.path).st_mtime_ns != seen:
                    return True
            except FileNotFoundError:
                return False
        return False

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            with contextlib.suppress(OSError):
                os.utime(self.path)

    @contextlib.contextmanager
    def _exclusive(self) -> Any:
        """flock on the directory for the check-and-take-over (no file left behind); skipped
        where the file system cannot lock (NFS wants a writable descriptor, say)."""
        descriptor = os.open(os.path.dirname(self.path) or ".", os.O_RDONLY)
        try:
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX)
            except OSError as error:
                if error.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL, errno.EBADF):
                    raise
            yield
        finally:
            os.close(descriptor)
