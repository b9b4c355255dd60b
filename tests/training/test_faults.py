"""Faults under a multi-rank training job: storage that misbehaves, a rank that hangs, a rank
that dies. Training must lose and repeat nothing through transient storage faults, and end
with an error, never a hang, when a rank is gone for good.

- Two DDP ranks train an epoch from S3 through ``support.faultproxy`` at the reliability
  suite's rates (5% connection resets mid-body, 1% 503 SlowDown, a 500, and a stall longer
  than the read timeout); every audit line together holds each sample of the index once.
- A rank stopped (SIGSTOP) mid-run leaves its peer waiting in a gradient all-reduce: after
  ``train.collective_timeout_s`` the peer fails with an error naming that setting and the
  job ends (no restarts asked for).
- A rank SIGKILLed without ``--max-restarts`` ends the job at once, with a non-zero exit.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from support.faultproxy import FaultProxy, FaultSchedule

from dataflow.convert.config import ConvertConfig
from dataflow.convert.job import convert
from dataflow.index import DatasetIndex, load_table
from trainer.trainer import collective_failure

from .conftest import ROOT, TRAINER_TIMEOUT_S, trainer_command, trainer_env
from .test_checkpoint import DIGITS, audit_batches, read_progress, stop, worker_pids

if TYPE_CHECKING:
    from conftest import S3Bucket

KiB = 1024


@pytest.mark.timeout(300)
def test_two_ranks_train_an_epoch_through_storage_faults_exactly_once(
    digits_folder: Path, s3: S3Bucket, tmp_path: Path
) -> None:
    url = f"{s3.url}/digits"
    convert(ConvertConfig(input=str(digits_folder), output=url, max_shard_samples=128,
                          workers=1), s3.config, progress=False)  # fmt: skip
    index = DatasetIndex.load(url, config=s3.config)
    tables = [load_table(url, index, shard, config=s3.config) for shard in index.shards]
    keys = [key for table in tables for key in table.keys]
    assert len(keys) == index.num_samples == 1797

    # Scripted faults first (so each kind surely happens), then the random rates.
    script = ["none"] * 40
    script[10], script[20], script[30] = "slowdown_503", "error_500", "stall"
    schedule = FaultSchedule(seed=8, reset_mid_body=0.05, slowdown_503=0.01,
                             script=tuple(script), stall_seconds=6)  # fmt: skip
    with FaultProxy(s3.server.endpoint_url, schedule) as proxy:
        out = tmp_path / "run"
        overrides = [
            f"--train.out_dir={out}", *DIGITS, f"--data.url={url}", "--train.epochs=1",
            "--data.drop_last=false",
            f"--storage.endpoint_url={proxy.url}", "--storage.read_timeout_s=2",
            "--storage.backoff_initial_s=0.01", "--storage.backoff_max_s=0.1",
            f"--storage.range_size={16 * KiB}", "--storage.connections=4",
        ]  # fmt: skip
        done = subprocess.run(trainer_command(2, overrides), cwd=ROOT, env=trainer_env(),
                              capture_output=True, text=True,
                              timeout=TRAINER_TIMEOUT_S)  # fmt: skip
        stats = proxy.stats
    assert done.returncode == 0, done.stderr[-8000:]
    faults = stats["faults"]
    assert faults["stall"] == 1 and faults["error_500"] == 1, stats
    assert faults["slowdown_503"] >= 1 and faults["reset_mid_body"] >= 3, stats

    delivered = audit_batches(out)
    assert {epoch for epoch, _ in delivered} == {0}
    counts = Counter(key for batch in delivered.values() for key in batch)
    assert counts == Counter(keys), "the audit differs from the index's samples"


def launch(
    out: Path, digits_dataset: str, timeout_s: float
) -> tuple[subprocess.Popen[bytes], Path]:
    """Two ranks, three epochs, no restarts; returns once step 5 is logged."""
    out.mkdir()
    overrides = [f"--train.out_dir={out}", *DIGITS, f"--data.url={digits_dataset}",
                 "--train.epochs=3", f"--train.collective_timeout_s={timeout_s}"]  # fmt: skip
    log = out / "torchrun.log"
    with open(log, "w") as handle:
        launcher = subprocess.Popen(trainer_command(2, overrides), cwd=ROOT, env=trainer_env(),
                                    stdout=handle, stderr=subprocess.STDOUT,
                                    start_new_session=True)  # fmt: skip
    deadline = time.monotonic() + TRAINER_TIMEOUT_S
    while not any(r["event"] == "step" and r["step"] >= 5
                  for r in read_progress(out / "metrics.jsonl")):  # fmt: skip
        assert launcher.poll() is None, log.read_text()[-4000:]
        assert time.monotonic() < deadline, log.read_text()[-4000:]
        time.sleep(0.05)
    return launcher, log


@pytest.mark.timeout(300)
def test_a_hung_rank_fails_the_job_after_the_collective_timeout(
    digits_dataset: str, tmp_path: Path
) -> None:
    timeout_s = 5
    launcher, log = launch(tmp_path / "run", digits_dataset, timeout_s)
    workers = worker_pids(launcher.pid)
    os.kill(workers[1], signal.SIGSTOP)
    stopped = time.monotonic()
    try:
        # Rank 0 must give up by itself; then the stopped rank may take torchrun's SIGTERM.
        while _alive(workers[0]):
            assert time.monotonic() - stopped < 120, f"rank 0 hangs\n{log.read_text()[-4000:]}"
            time.sleep(0.05)
        waited = time.monotonic() - stopped
        os.kill(workers[1], signal.SIGCONT)
        returncode = launcher.wait(timeout=60)
    finally:
        stop(launcher)
    text = log.read_text()
    assert returncode != 0, text[-4000:]
    assert waited >= timeout_s, waited
    failed = [line for line in text.splitlines() if "rank 0 failed at step" in line]
    assert failed, text[-4000:]
    assert "a collective timed out" in failed[0], failed[0]
    assert f"collective_timeout_s = {timeout_s} s" in failed[0], failed[0]


@pytest.mark.parametrize("gloo_says", [
    "[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Timed out waiting 5000ms for recv "
    "operation to complete",
    "Got the following error when running the callback: RuntimeError: Application timeout "
    "caused pair closure",
])  # fmt: skip
def test_every_wording_of_a_gloo_timeout_is_named_a_timeout(gloo_says: str) -> None:
    """gloo words a timed-out collective in more than one way (CI once saw the second)."""
    line = collective_failure(RuntimeError(gloo_says + "\nException raised from ..."), 5)
    assert line.startswith("a collective timed out: a peer did not join within "
                           "train.collective_timeout_s = 5 s (RuntimeError: "), line  # fmt: skip
    assert "Exception raised from" not in line
    other = collective_failure(RuntimeError("Connection closed by peer [127.0.0.1]:1"), 5)
    assert other == ("RuntimeError: Connection closed by peer [127.0.0.1]:1 (ranks wait for "
                     "each other at most train.collective_timeout_s = 5 s)")  # fmt: skip


@pytest.mark.timeout(300)
def test_a_killed_rank_ends_the_job_when_no_restart_is_asked_for(
    digits_dataset: str, tmp_path: Path
) -> None:
    launcher, log = launch(tmp_path / "run", digits_dataset, 600)
    workers = worker_pids(launcher.pid)
    os.kill(workers[1], signal.SIGKILL)
    try:
        # Well inside the 600 s collective timeout: the dead peer's socket closes at once.
        returncode = launcher.wait(timeout=60)
    finally:
        stop(launcher)
    text = log.read_text()
    assert returncode != 0, text[-4000:]
    assert "exitcode  : -9" in text and "(SIGKILL)" in text, text[-4000:]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by torchrun) counts as gone.
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False
