"""A job's life on a shared cluster: requeued after it finished, preempted (SIGTERM), launched
twice into one ``train.out_dir``, orphaned by a SIGKILLed torchrun agent.

Each test launches real trainer processes (one, or two ranks under torchrun) on the small
digits CNN of ``test_checkpoint`` and compares what a stopped-and-resumed run trained with the
uninterrupted runs there: the same batches, and the same losses bit for bit.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from trainer.lease import Lease, OutDirBusyError
from trainer.metrics import current

from .conftest import ROOT, TRAINER_TIMEOUT_S, read_metrics, trainer_command, trainer_env
from .test_checkpoint import (
    STEPS,
    Run,
    assert_losses_close,
    assert_same_batches,
    checkpoint_names,
    ddp_run,  # noqa: F401 - a fixture
    digits_args,
    read_progress,
    single_run,  # noqa: F401 - a fixture
    stop,
    train,
    worker_pids,
)

LEASE = "train.lease"


def launch(
    out_dir: Path, overrides: list[str], log: Path, *, nproc: int = 1
) -> subprocess.Popen[bytes]:
    """Start a run in the background; its output (workers' too) goes to ``log``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    command = trainer_command(nproc, [f"--train.out_dir={out_dir}", *overrides])
    with open(log, "wb") as handle:
        return subprocess.Popen(command, cwd=ROOT, env=trainer_env(), stdout=handle,
                                stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip


def wait_for_step(process: subprocess.Popen[bytes], out_dir: Path, step: int, log: Path) -> None:
    deadline = time.monotonic() + TRAINER_TIMEOUT_S
    while True:
        assert process.poll() is None, (
            f"exit {process.returncode} before step {step}\n" + (log.read_text()[-4000:])
        )
        progress = read_progress(out_dir / "metrics.jsonl")
        if [r for r in progress if r["event"] == "step" and r["step"] >= step]:
            return
        assert time.monotonic() < deadline, f"no step {step} in time\n{log.read_text()[-4000:]}"
        time.sleep(0.02)


def state(pid: int) -> str:
    """The process's state letter ('' once it is gone; Z: exited, not yet reaped)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return ""
    return status.split("State:")[1].split()[0]


def wait_until(condition: Callable[[], bool], what: str, log: Path) -> None:
    deadline = time.monotonic() + TRAINER_TIMEOUT_S
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not in time\n{log.read_text()[-4000:]}"
        time.sleep(0.02)


@pytest.mark.timeout(300)
def test_a_requeued_finished_run_exits_0_and_says_it_is_complete(
    digits_dataset: str, tmp_path: Path
) -> None:
    """Before that, a run SIGKILLed mid-way left its lease behind: the next launch on this host
    sees the holder's pid gone and takes the lease over."""
    out_dir, log = tmp_path / "out", tmp_path / "killed.log"
    overrides = digits_args(digits_dataset, "--train.max_steps=3", "--checkpoint.interval=0")
    killed = launch(out_dir, [*overrides, "--train.max_steps=0"], log)
    try:
        wait_for_step(killed, out_dir, 1, log)
        os.kill(killed.pid, signal.SIGKILL)
        killed.wait()
    finally:
        stop(killed)
    assert (out_dir / LEASE).exists()
    first = train(out_dir, overrides)
    assert first.events("start")[-1]["lease_taken_from"] == (
        f"pid {killed.pid} on {socket.gethostname()}"
    )
    assert first.events("end")[-1]["steps"] == 3
    again = subprocess.run(
        trainer_command(1, [f"--train.out_dir={out_dir}", *overrides]), cwd=ROOT,
        env=trainer_env(), capture_output=True, text=True, timeout=TRAINER_TIMEOUT_S,
    )  # fmt: skip
    assert again.returncode == 0, again.stderr[-3000:]
    assert "already complete: step 3 of 3" in again.stdout, again.stdout
    assert "Traceback" not in again.stderr
    assert checkpoint_names(first) == ["step-00000003"]
    assert not (out_dir / LEASE).exists()
    # Each launch has a run id of its own on every record.
    records = read_metrics(out_dir)
    assert all(r.get("run") for r in records), records[0]
    runs = [r["run"] for r in records if r["event"] == "start"]
    assert len(set(runs)) == len(runs) == 3
    assert records[-1]["event"] == "end" and records[-1]["steps_this_run"] == 0


@pytest.mark.timeout(300)
def test_a_second_job_is_refused_and_sigterm_saves_and_the_resume_continues_exactly(
    single_run: Run,  # noqa: F811 - the fixture imported above
    digits_dataset: str,
    tmp_path: Path,
) -> None:
    """One process trains (held stopped mid-run, so it stays alive and its step is known); a
    second launch into its out_dir is refused, naming the holder, and touches nothing. Then
    the first is SIGTERMed: it saves, exits 143, and the relaunch continues as the
    uninterrupted run did, bit for bit."""
    out_dir, log = tmp_path / "out", tmp_path / "first.log"
    overrides = digits_args(digits_dataset, "--checkpoint.interval=0")
    process = launch(out_dir, overrides, log)
    try:
        wait_for_step(process, out_dir, 2, log)
        os.kill(process.pid, signal.SIGSTOP)
        before = sorted(p.name for p in out_dir.rglob("*"))
        second = subprocess.run(
            trainer_command(1, [f"--train.out_dir={out_dir}", *overrides]), cwd=ROOT,
            env=trainer_env(), capture_output=True, text=True, timeout=TRAINER_TIMEOUT_S,
        )  # fmt: skip
        assert second.returncode == 1, second.stderr[-3000:]
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1, second.stderr[-3000:]
        assert (
            f"pid {process.pid} on host {socket.gethostname()} holds {out_dir / LEASE}"
            in (lines[0])
        )
        assert sorted(p.name for p in out_dir.rglob("*")) == before
        stepped = [r["step"] for r in read_progress(out_dir / "metrics.jsonl")
                   if r["event"] == "step"]  # fmt: skip
        os.kill(process.pid, signal.SIGTERM)
        os.kill(process.pid, signal.SIGCONT)
        process.wait(timeout=TRAINER_TIMEOUT_S)
    finally:
        stop(process)
    assert process.returncode == 128 + signal.SIGTERM, log.read_text()[-3000:]
    saved = read_metrics(out_dir)[-1]
    # The step in flight when the signal came finishes; the save follows it.
    assert saved["event"] == "stopped" and saved["step"] in (stepped[-1], stepped[-1] + 1)
    assert f"stopped at step {saved['step']} on SIGTERM" in log.read_text()
    assert "Traceback" not in log.read_text()
    assert not (out_dir / LEASE).exists()
    resumed = train(out_dir, overrides)
    assert resumed.events("start")[-1]["step"] == saved["step"]
    assert_same_batches(resumed, single_run, range(1, STEPS + 1))
    assert [r["step"] for r in current(resumed.records)] == list(range(1, STEPS + 1))
    assert_losses_close(resumed, single_run, range(1, STEPS + 1), 0.0)


@pytest.mark.timeout(600)
def test_two_ranks_stop_together_when_their_agent_dies_or_on_sigterm_and_resume_exactly(
    ddp_run: Run,  # noqa: F811 - the fixture imported above
    digits_dataset: str,
    tmp_path: Path,
) -> None:
    """Under torchrun: (1) the agent alone is SIGKILLed: its two workers notice, save after
    the same step and exit (no orphans training on); (2) the relaunch is preempted: SIGTERM
    to the agent, which passes it on; (3) the next relaunch finishes. The whole equals the
    uninterrupted 2-rank run, bit for bit."""
    out_dir = tmp_path / "out"
    overrides = digits_args(digits_dataset, "--checkpoint.interval=0")
    log = tmp_path / "orphaned.log"
    agent = launch(out_dir, overrides, log, nproc=2)
    workers: dict[int, int] = {}
    try:
        wait_for_step(agent, out_dir, 2, log)
        workers = worker_pids(agent.pid)
        assert sorted(workers) == [0, 1], workers
        os.kill(agent.pid, signal.SIGKILL)
        agent.wait()
        for pid in workers.values():
            wait_until(lambda pid=pid: state(pid) in ("", "Z"), f"worker {pid} exits", log)
    finally:
        stop(agent)
        for pid in workers.values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    orphaned = read_metrics(out_dir)[-1]
    assert orphaned["event"] == "stopped", log.read_text()[-4000:]
    assert "the death of the torchrun agent" in orphaned["reason"]
    assert not (out_dir / LEASE).exists()

    log = tmp_path / "preempted.log"
    agent = launch(out_dir, overrides, log, nproc=2)
    try:
        wait_for_step(agent, out_dir, orphaned["step"] + 2, log)
        os.kill(agent.pid, signal.SIGTERM)  # the agent passes it on to its workers
        agent.wait(timeout=TRAINER_TIMEOUT_S)
    finally:
        stop(agent)
    preempted = read_metrics(out_dir)[-1]
    assert (preempted["event"], preempted["reason"]) == ("stopped", "SIGTERM"), log.read_text()[
        -4000:
    ]
    assert orphaned["step"] + 1 < preempted["step"] < STEPS, "the run ended first: make it longer"
    for rank in (0, 1):
        assert f"rank {rank}: stopped at step {preempted['step']} on SIGTERM" in log.read_text()

    resumed = train(out_dir, overrides, nproc=2)
    starts = resumed.events("start")
    assert [s["step"] for s in starts] == [0, orphaned["step"], preempted["step"]]
    assert [r["step"] for r in current(resumed.records)] == list(range(1, STEPS + 1))
    assert_same_batches(resumed, ddp_run, range(1, STEPS + 1))
    assert_losses_close(resumed, ddp_run, range(1, STEPS + 1), 0.0)


def test_a_lease_from_another_host_is_refused_while_its_heartbeat_goes_on(tmp_path: Path) -> None:
    """No pid can be checked on another host: its holder is alive while the file's mtime
    moves (the holder's heartbeat), and taken over once it has stood still long enough."""
    path = tmp_path / LEASE
    path.write_text(json.dumps({"host": "elsewhere", "pid": 1, "run": "theirs", "since": 0}))
    stopped = threading.Event()

    def heartbeat() -> None:
        while not stopped.wait(0.1):
            os.utime(path)

    beating = threading.Thread(target=heartbeat)
    beating.start()
    try:
        with pytest.raises(OutDirBusyError, match=f"pid 1 on host elsewhere holds {path}"):
            Lease(str(tmp_path), "mine", stale_after_s=1).acquire()
    finally:
        stopped.set()
        beating.join()
    lease = Lease(str(tmp_path), "mine", stale_after_s=1)
    lease.acquire()
    assert lease.took_over is not None and lease.took_over["host"] == "elsewhere"
    assert json.loads(path.read_text())["run"] == "mine"
    lease.release()
    assert list(tmp_path.iterdir()) == [], "the lease left files behind"
