#!/usr/bin/env python
"""A bandwidth-limited cluster on one box: ranks in a network namespace with a shaped loopback.

    python tools/shaped_link.py --rate-mbit 100 [--latency-ms 50] -- COMMAND …
    python tools/shaped_link.py --rate-mbit 100 --measure [--megabytes 64]

``shaped_namespace`` creates a network namespace (``ip netns add``), brings its loopback up
and shapes it with a token bucket (``tc qdisc add dev lo root tbf rate R burst B latency L``);
every process started with ``ns.command(...)`` (``ip netns exec``) reaches the others on
127.0.0.1 only through that bucket, so gloo's all-reduce between ranks there runs at the set
rate — the situation gradient compression is for. ``tbf`` is what works on this kind of
host (``netem`` and ``fq`` do not load here). Loopback's MTU is 64 KiB and ``tbf`` drops
every packet larger than its burst, so the burst is at least 256 KiB (two full packets plus
headroom); it lets ≈ 2 ms of traffic through at line speed at 1 Gbit/s and ≈ 20 ms at
100 Mbit/s, invisible over a training step.

The namespace is removed on every path: on leaving the block (also on an exception or
SIGTERM/SIGINT, which are turned into exceptions here) and, for a run killed outright, by the
next run, which removes namespaces whose creating process no longer runs (their names carry
its pid and start time). Needs root (CAP_NET_ADMIN) and iproute2; ``unavailable()`` says why
not, and the tests that need it skip with that reason.

``--measure`` runs a 2-rank gloo all-reduce inside the namespace and compares the bytes that
crossed the loopback (its tx counter, so whatever algorithm gloo picks is counted exactly)
per second with the set rate. Measured here: 100 Mbit/s set → 100.7 Mbit/s of TCP payload
for one stream; the all-reduce figures are in ``tests/tools/test_shaped_link.py``'s output.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from dataflow.processes import running, start_time  # noqa: E402

PREFIX = "shardflow-"
MIN_BURST = 256 << 10


@dataclasses.dataclass(frozen=True)
class Namespace:
    """A shaped network namespace (see the module docstring)."""

    name: str
    rate_mbit: float

    def command(self, argv: Sequence[str]) -> list[str]:
        """``argv`` run inside the namespace."""
        return ["ip", "netns", "exec", self.name, *argv]

    def tx_bytes(self) -> int:
        """Bytes sent over the namespace's loopback so far (all ranks together)."""
        path = "/sys/class/net/lo/statistics/tx_bytes"
        done = subprocess.run(self.command(["cat", path]), check=True, capture_output=True,
                              text=True)  # fmt: skip
        return int(done.stdout)


def _ip(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *argv], check=check, capture_output=True, text=True)


def unavailable() -> str | None:
    """Why a shaped namespace cannot be made here, or None when it can."""
    if sys.platform != "linux":
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "creating a network namespace needs root (CAP_NET_ADMIN)"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"{tool!r} (iproute2) is not installed"
    try:
        with shaped_namespace(1000):
            pass
    except (OSError, subprocess.CalledProcessError) as error:
        detail = getattr(error, "stderr", "") or str(error)
        return f"cannot create a shaped namespace here: {detail.strip()}"
    return None


def remove_stale() -> list[str]:
    """Remove namespaces left by runs that were killed outright; returns their names."""
    listed = _ip("netns", "list", check=False).stdout.split("\n")
    removed = []
    for line in listed:
        name = line.split(" ")[0]
        if not name.startswith(PREFIX):
            continue
        try:
            pid_text, started = name[len(PREFIX) :].split("-")[:2]
            pid = int(pid_text)
        except ValueError:
            continue
        if not running(pid, started):
            _ip("netns", "del", name, check=False)
            removed.append(name)
    return removed


@contextlib.contextmanager
def shaped_namespace(
    rate_mbit: float, *, latency_ms: float = 50.0, burst_bytes: int = 0
) -> Iterator[Namespace]:
    """A namespace whose loopback carries ``rate_mbit`` Mbit/s, removed when the block ends."""
    if rate_mbit <= 0:
        raise ValueError(f"--rate-mbit must be positive, got {rate_mbit}")
    remove_stale()
    pid = os.getpid()
    name = f"{PREFIX}{pid}-{start_time(pid)}-{time.monotonic_ns() % 10**9}"
    burst = max(MIN_BURST, burst_bytes, int(rate_mbit * 1e6 / 8 * 0.002))
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}

    in_main = _is_main_thread()
    if in_main:
        for sig in previous:
            signal.signal(sig, _interrupted)
    _ip("netns", "add", name)
    try:
        _ip("netns", "exec", name, "ip", "link", "set", "lo", "up")
        subprocess.run(
            ["ip", "netns", "exec", name, "tc", "qdisc", "add", "dev", "lo", "root", "tbf",
             "rate", f"{rate_mbit}mbit", "burst", str(burst), "latency", f"{latency_ms}ms"],
            check=True, capture_output=True, text=True,
        )  # fmt: skip
        yield Namespace(name=name, rate_mbit=rate_mbit)
    finally:
        _ip("netns", "del", name, check=False)
        if in_main:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def _interrupted(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _is_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


# ---------------------------------------------------------------------------------------------
# --measure: a 2-rank gloo all-reduce inside the namespace

_ALLREDUCE = """
import os, sys, time
os.environ.setdefault("OMP_NUM_THREADS", "1")
import torch, torch.distributed as dist
rank, world, port, megabytes, repeat = (int(a) for a in sys.argv[1:6])
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                        world_size=world, timeout=__import__("datetime").timedelta(seconds=120))
tensor = torch.ones(megabytes * (1 << 20) // 4)
dist.all_reduce(tensor)  # connect and warm up
dist.barrier()
started = time.perf_counter()
for _ in range(repeat):
    dist.all_reduce(tensor)
dist.barrier()
if rank == 0:
    print(time.perf_counter() - started, flush=True)
dist.destroy_process_group()
"""


def measure_allreduce(
    ns: Namespace | None, *, megabytes: int = 32, repeat: int = 3, world: int = 2
) -> dict[str, float]:
    """All-reduce ``megabytes`` of fp32 ``repeat`` times between ``world`` ranks on 127.0.0.1
    (inside ``ns``, or on the host's loopback when None): seconds, bytes on the wire, rates."""
    import socket

    with socket.socket() as probe:  # a free port: inside a fresh namespace every port is
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    before = ns.tx_bytes() if ns is not None else 0
    with tempfile.TemporaryDirectory():
        ranks = []
        for rank in range(world):
            argv = [sys.executable, "-c", _ALLREDUCE, str(rank), str(world), str(port),
                    str(megabytes), str(repeat)]  # fmt: skip
            ranks.append(subprocess.Popen(ns.command(argv) if ns is not None else argv,
                                          stdout=subprocess.PIPE, text=True))  # fmt: skip
        outputs = [process.communicate(timeout=600)[0] for process in ranks]
    if any(process.returncode for process in ranks):
        raise RuntimeError(f"an all-reduce rank failed: exit codes {[p.returncode for p in ranks]}")
    seconds = float(outputs[0].strip().splitlines()[-1])
    wire = (ns.tx_bytes() - before) if ns is not None else 0
    payload = megabytes * (1 << 20) * repeat
    result = {"seconds": seconds, "payload_mb_per_s": payload / seconds / 1e6}
    if ns is not None:
        # The counter also holds the warm-up all-reduce and the connection set-up: scale the
        # measured bytes per timed all-reduce by the timed share (repeat of repeat + 1).
        timed_wire = wire * repeat / (repeat + 1)
        result.update(wire_bytes=float(timed_wire), wire_mbit_per_s=timed_wire * 8 / seconds / 1e6,
                      rate_mbit=ns.rate_mbit)  # fmt: skip
        result["fraction_of_rate"] = result["wire_mbit_per_s"] / ns.rate_mbit
    return result


def main(argv: Sequence[str] | None = None) -> int:
    arguments = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    arguments.add_argument("--rate-mbit", type=float, required=True)
    arguments.add_argument("--latency-ms", type=float, default=50.0)
    arguments.add_argument("--measure", action="store_true")
    arguments.add_argument("--megabytes", type=int, default=32)
    arguments.add_argument("--repeat", type=int, default=3)
    arguments.add_argument("command", nargs="*")
    args = arguments.parse_args(argv)
    for sig in (signal.SIGTERM, signal.SIGINT):  # from here on, a stop removes the namespace
        signal.signal(sig, _interrupted)
    reason = unavailable()
    if reason:
        print(f"error: {reason}", file=sys.stderr)
        return 2
    with shaped_namespace(args.rate_mbit, latency_ms=args.latency_ms) as ns:
        if args.measure:
            result = measure_allreduce(ns, megabytes=args.megabytes, repeat=args.repeat)
            print(" ".join(f"{key}={value:.4g}" for key, value in result.items()))
            return 0
        if not args.command:
            print("error: give --measure or a command after --", file=sys.stderr)
            return 2
        child = subprocess.Popen(ns.command(args.command))
        try:
            return child.wait()
        finally:  # interrupted: the command must not outlive its namespace
            if child.poll() is None:
                child.terminate()
                try:
                    child.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    child.kill()


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt as stopped:
        print(f"stopped by {stopped}; the namespace is removed", file=sys.stderr)
        sys.exit(143)
