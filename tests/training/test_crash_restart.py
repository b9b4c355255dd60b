"""Crash and restart, repeatedly: under ``torchrun --max-restarts`` a worker (rank chosen by
the seed) is SIGKILLed at seeded random steps across a multi-epoch run. Each time torchrun
restarts the job, which resumes from its last checkpoint. At the end every epoch's audit log
holds each sample exactly once, in the batches an uninterrupted loader delivers, and the
final model and optimizer state equal, bit for bit, those of a run never interrupted (CPU,
gloo: deterministic).

CI kills 3 times; ``SHARDFLOW_KILLS=10`` runs the full schedule of the reliability suite.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

from .conftest import ROOT, TRAINER_TIMEOUT_S, read_metrics, trainer_command
from .test_checkpoint import (
    DIGITS,
    GLOBAL_BATCH,
    STEPS_PER_EPOCH,
    Run,
    audit_batches,
    flat_state,
    read_progress,
    restartable_env,
    stop,
    train,
    uninterrupted_batches,
    worker_pids,
)

KILLS = int(os.environ.get("SHARDFLOW_KILLS", "3"))
EPOCHS, INTERVAL, SEED = 3, 4, 2026


def kill_on_schedule(launcher: subprocess.Popen[bytes], out_dir: Path, log: Path,
                     targets: list[tuple[int, int]]) -> None:  # fmt: skip
    """For each (step, rank): once the current round has logged that step, SIGKILL that
    rank's worker, then wait for the next round to start."""
    deadline = time.monotonic() + TRAINER_TIMEOUT_S * (1 + len(targets))
    for round_number, (step, rank) in enumerate(targets):
        while True:
            assert launcher.poll() is None, (
                f"the run ended (exit {launcher.returncode}) before kill {round_number + 1} at "
                f"step {step}\n{log.read_text()[-4000:]}"
            )
            assert time.monotonic() < deadline, f"kill schedule stuck\n{log.read_text()[-4000:]}"
            progress = read_progress(out_dir / "metrics.jsonl")
            starts = [i for i, r in enumerate(progress) if r["event"] == "start"]
            if starts and progress[starts[-1]]["restart"] == round_number:
                stepped = [r["step"] for r in progress[starts[-1] :] if r["event"] == "step"]
                if stepped and stepped[-1] >= step:
                    workers = worker_pids(launcher.pid)
                    if rank in workers:
                        os.kill(workers[rank], signal.SIGKILL)
                        break
            time.sleep(0.02)
        # The next round has begun when its start record appears.
        while not any(r["event"] == "start" and r["restart"] == round_number + 1
                      for r in read_progress(out_dir / "metrics.jsonl")):  # fmt: skip
            assert launcher.poll() is None, log.read_text()[-4000:]
            assert time.monotonic() < deadline, f"no restart\n{log.read_text()[-4000:]}"
            time.sleep(0.05)


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_seeded_kills_lose_nothing_and_end_in_the_uninterrupted_state(
    digits_dataset: str, tmp_path: Path
) -> None:
    total = EPOCHS * STEPS_PER_EPOCH
    common = [*DIGITS, f"--data.url={digits_dataset}", f"--train.epochs={EPOCHS}",
              f"--checkpoint.interval={INTERVAL}", "--checkpoint.keep=2"]  # fmt: skip
    rng = random.Random(SEED)
    steps = sorted(rng.sample(range(INTERVAL + 1, total - 1), KILLS))
    targets = [(step, rng.randrange(2)) for step in steps]

    killed = tmp_path / "killed"
    command = trainer_command(2, [f"--train.out_dir={killed}", *common], max_restarts=KILLS)
    killed.mkdir()
    log = killed / "torchrun.log"
    with open(log, "w") as handle:
        launcher = subprocess.Popen(command, cwd=ROOT, env=restartable_env(), stdout=handle,
                                    stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    try:
        kill_on_schedule(launcher, killed, log, targets)
        returncode = launcher.wait(timeout=TRAINER_TIMEOUT_S)
    finally:
        stop(launcher)
    assert returncode == 0, log.read_text()[-8000:]
    run = Run(killed, read_metrics(killed))
    assert [r["restart"] for r in run.events("start")] == list(range(KILLS + 1))
    assert run.events("end")[-1]["steps"] == total

    # Exactly once per epoch, in the uninterrupted order.
    delivered = audit_batches(killed)
    for epoch in range(EPOCHS):
        keys = [k for (e, _), batch in delivered.items() if e == epoch for k in batch]
        repeated = [k for k, n in Counter(keys).items() if n > 1]
        assert not repeated, f"epoch {epoch} delivered {repeated[:5]} more than once"
        assert len(keys) == STEPS_PER_EPOCH * GLOBAL_BATCH
    assert delivered == uninterrupted_batches(killed / "config.toml", EPOCHS)

    # The same model and optimizer state as a run never interrupted.
    whole = train(tmp_path / "whole", common, nproc=2)
    final = f"step-{total:08d}"
    got = flat_state(run.checkpoints / final, tmp_path / "got.pt")
    want = flat_state(whole.checkpoints / final, tmp_path / "want.pt")
    assert sorted(got) == sorted(want)
    different = [name for name, value in want.items() if isinstance(value, torch.Tensor)
                 and not torch.equal(got[name], value)]  # fmt: skip
    assert not different, different[:5]
    assert {k: v for k, v in got.items() if not isinstance(v, torch.Tensor)} == {
        k: v for k, v in want.items() if not isinstance(v, torch.Tensor)
    }
