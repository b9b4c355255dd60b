"""tools/shaped_link.py: a namespace whose loopback really runs at the set rate, and is
removed on every path (issue 20.1). Skips where namespaces or tc are unavailable."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))

import shaped_link  # noqa: E402

REASON = shaped_link.unavailable()
pytestmark = pytest.mark.skipif(REASON is not None, reason=REASON or "")


def namespaces() -> set[str]:
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {line.split(" ")[0] for line in listed.splitlines() if line}


def test_the_shaped_link_limits_an_allreduce_to_the_set_rate() -> None:
    with shaped_link.shaped_namespace(200) as ns:
        shaped = shaped_link.measure_allreduce(ns, megabytes=16, repeat=3)
    host = shaped_link.measure_allreduce(None, megabytes=16, repeat=3)
    print(f"shaped at 200 Mbit/s: {shaped}; host loopback: {host}")
    # Bytes on the wire per second (both ranks' sends, counted by the interface) stay under
    # the set rate (plus 10 % for tbf's burst), and are close to it: the link is the limit.
    assert 0.5 <= shaped["fraction_of_rate"] <= 1.1
    # A ring all-reduce of N bytes on 2 ranks puts 2N on the wire: the counter saw the traffic.
    assert shaped["wire_bytes"] >= 1.5 * 16 * (1 << 20) * 3
    # Unshaped loopback is far faster, so the shaping is what limits.
    assert host["payload_mb_per_s"] > 3 * shaped["payload_mb_per_s"]


def test_the_namespace_is_removed_when_the_block_raises() -> None:
    with pytest.raises(RuntimeError, match="inside"), shaped_link.shaped_namespace(100) as ns:
        assert ns.name in namespaces()
        raise RuntimeError("inside")
    assert ns.name not in namespaces()


def test_a_killed_runs_namespace_is_removed_by_the_next_run() -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time; sys.path.insert(0, 'tools'); import shaped_link\n"
         "with shaped_link.shaped_namespace(100) as ns:\n"
         "    print(ns.name, flush=True); time.sleep(600)"],
        cwd=ROOT, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert holder.stdout is not None
    name = holder.stdout.readline().strip()
    assert name in namespaces()
    holder.kill()
    holder.wait(timeout=10)
    assert name in namespaces()  # SIGKILL: nothing ran to remove it
    assert name in shaped_link.remove_stale()
    assert name not in namespaces()


def test_sigterm_removes_the_namespace() -> None:
    holder = subprocess.Popen(
        [sys.executable, "tools/shaped_link.py", "--rate-mbit", "100", "--", "sleep", "600"],
        cwd=ROOT, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while not subprocess.run(["pgrep", "-f", "^sleep 600$"], capture_output=True).stdout:
        assert time.monotonic() < deadline, "the command never started"
        time.sleep(0.1)
    assert any(n.startswith(f"shardflow-{holder.pid}-") for n in namespaces())
    holder.terminate()
    assert holder.wait(timeout=30) == 143
    assert not any(n.startswith(f"shardflow-{holder.pid}-") for n in namespaces())
    assert holder.stderr is not None
    assert "Traceback" not in holder.stderr.read()
    left = subprocess.run(["pgrep", "-f", "^sleep 600$"], capture_output=True, text=True)
    assert not left.stdout.strip(), "the command outlived its namespace"


def test_a_bad_rate_is_one_line() -> None:
    with (
        pytest.raises(ValueError, match="--rate-mbit must be positive"),
        shaped_link.shaped_namespace(0),
    ):
        pass
