"""The loader across real processes: two gloo ranks under torchrun, and elastic resumes.

One torchrun launch (two ranks) runs three jobs of ``dist_worker.py`` over the digits
dataset (1,797 samples, which 24 — the global batch — does not divide): a whole epoch, the
first 20 steps of an epoch with a checkpoint, and the end of an epoch resumed from a
one-process checkpoint taken after 15 steps. The one-process halves run in this process.
Launching torchrun once keeps the file under ten seconds (each launch costs ~4 s).

What is checked: every sample of the epoch is delivered exactly once over the ranks and
over a 2 → 1 or 1 → 2 resume; a resumed step holds the same keys and the same image crops
as that step of the uninterrupted two-rank epoch; every rank delivers the same number of
batches, all of the same size (padding included).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from dataflow.convert.config import ConvertConfig
from dataflow.convert.job import convert
from dataflow.index import DatasetIndex, load_table

from .dist_worker import GLOBAL_BATCH, run_job

WORKER = Path(__file__).with_name("dist_worker.py")
WORLD = 2
FIRST_STEPS_TWO_RANKS = 20
FIRST_STEPS_ONE_RANK = 15
TORCHRUN_TIMEOUT_S = 120

pytestmark = pytest.mark.timeout(120)


@dataclass
class Runs:
    dataset: str
    keys: list[str]
    """Every key of the dataset, from its sample tables."""
    out: Path
    """Where the jobs wrote their batches, states and counts (see dist_worker.py)."""

    @property
    def steps(self) -> int:
        """Global batches in the epoch (the last one padded)."""
        return -(-len(self.keys) // GLOBAL_BATCH)


def records(out: Path, name: str, rank: int) -> list[dict[str, Any]]:
    lines = (out / f"{name}-rank-{rank}.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def state(out: Path, name: str, rank: int) -> dict[str, Any]:
    return json.loads((out / f"{name}-state-rank-{rank}.json").read_text())


def counts(out: Path, name: str, rank: int) -> list[int]:
    return json.loads((out / f"{name}-counts-rank-{rank}.json").read_text())


def delivered_keys(*batches: list[dict[str, Any]]) -> Counter[str]:
    return Counter(key for run in batches for record in run for key in record["keys"])


def global_steps(*ranks: list[dict[str, Any]]) -> dict[int, tuple[list[str], list[str]]]:
    """step → (keys, image digests) of the whole global batch, ranks concatenated in order."""
    steps: dict[int, tuple[list[str], list[str]]] = {}
    for run in ranks:
        for record in run:
            keys, digests = steps.setdefault(record["step"], ([], []))
            keys.extend(record["keys"])
            digests.extend(record["digests"])
    return steps


def torchrun(dataset: str, out: Path, jobs: list[dict[str, Any]]) -> None:
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc-per-node={WORLD}", str(WORKER), dataset, str(out), json.dumps(jobs),
    ]  # fmt: skip
    # Keep an outer launcher's rank variables from leaking into the workers' rendezvous.
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    result = subprocess.run(
        command, env=env, capture_output=True, text=True, timeout=TORCHRUN_TIMEOUT_S, check=False
    )
    assert result.returncode == 0, (
        f"torchrun failed:\n{result.stdout[-4000:]}\n{result.stderr[-8000:]}"
    )


@pytest.fixture(scope="module")
def runs(digits_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Runs:
    root = tmp_path_factory.mktemp("distributed")
    dataset = str(root / "digits")
    convert(
        ConvertConfig(input=str(digits_folder), output=dataset, max_shard_samples=150, workers=1),
        progress=False,
    )
    index = DatasetIndex.load(dataset)
    keys = [key for shard in index.shards for key in load_table(dataset, index, shard).keys]
    out = root / "runs"
    out.mkdir()
    # One process, 15 steps, checkpoint: resumed below by two ranks.
    run_job(
        dataset, out, {"name": "single-first", "steps": FIRST_STEPS_ONE_RANK}, rank=0, world_size=1
    )
    torchrun(
        dataset,
        out,
        [
            {"name": "epoch"},
            {"name": "first", "steps": FIRST_STEPS_TWO_RANKS},
            {"name": "rest", "load": str(out / "single-first-state-rank-0.json")},
        ],
    )
    # Two ranks' checkpoint after 20 steps, finished by one process.
    run_job(dataset, out, {"name": "single-rest", "load": str(out / "first-state-rank-0.json")},
            rank=0, world_size=1)  # fmt: skip
    return Runs(dataset=dataset, keys=keys, out=out)


def test_dataset_size_is_not_a_multiple_of_the_global_batch(runs: Runs) -> None:
    # The premise of the padding checks below.
    assert len(runs.keys) == 1797 == len(set(runs.keys))
    assert len(runs.keys) % GLOBAL_BATCH != 0


def test_two_ranks_deliver_every_sample_once_in_equal_batches(runs: Runs) -> None:
    ranks = [records(runs.out, "epoch", rank) for rank in range(WORLD)]
    assert delivered_keys(*ranks) == Counter(runs.keys)
    # Neither rank's share overlaps the other's.
    assert not delivered_keys(ranks[0]).keys() & delivered_keys(ranks[1]).keys()
    steps = runs.steps
    for rank, batches in enumerate(ranks):
        assert [b["step"] for b in batches] == list(range(steps))
        assert {(b["rank"], b["world_size"], b["epoch"]) for b in batches} == {(rank, WORLD, 0)}
        # Padding keeps every batch full: no rank waits on a shorter one.
        assert {b["size"] for b in batches} == {GLOBAL_BATCH // WORLD}
        assert counts(runs.out, "epoch", rank) == [steps] * WORLD
    # Only the last global batch holds padding, at its end (here: on rank 1 only).
    valid_in_last = [len(r[-1]["keys"]) for r in ranks]
    assert sum(valid_in_last) == len(runs.keys) - (steps - 1) * GLOBAL_BATCH
    assert valid_in_last == [12, 9]


def test_resume_on_one_process_from_two_ranks(runs: Runs) -> None:
    first = [records(runs.out, "first", rank) for rank in range(WORLD)]
    rest = records(runs.out, "single-rest", 0)
    # The checkpoint is global: both ranks saved the same state, and nothing of their own.
    saved = [state(runs.out, "first", rank) for rank in range(WORLD)]
    assert saved[0] == saved[1]
    assert saved[0]["step"] == FIRST_STEPS_TWO_RANKS and saved[0]["epoch"] == 0
    assert [counts(runs.out, "first", rank) for rank in range(WORLD)] == [
        [FIRST_STEPS_TWO_RANKS] * WORLD
    ] * WORLD

    assert [b["step"] for b in rest] == list(range(FIRST_STEPS_TWO_RANKS, runs.steps))
    assert {b["size"] for b in rest} == {GLOBAL_BATCH}
    assert delivered_keys(*first, rest) == Counter(runs.keys)
    # The same global batches, crops included, as the uninterrupted two-rank epoch.
    epoch = global_steps(*(records(runs.out, "epoch", rank) for rank in range(WORLD)))
    assert global_steps(*first) == {s: epoch[s] for s in range(FIRST_STEPS_TWO_RANKS)}
    assert global_steps(rest) == {s: epoch[s] for s in range(FIRST_STEPS_TWO_RANKS, runs.steps)}


def test_resume_on_two_ranks_from_one_process(runs: Runs) -> None:
    first = records(runs.out, "single-first", 0)
    rest = [records(runs.out, "rest", rank) for rank in range(WORLD)]
    assert [b["step"] for b in first] == list(range(FIRST_STEPS_ONE_RANK))
    remaining = runs.steps - FIRST_STEPS_ONE_RANK
    for rank in range(WORLD):
        assert [b["step"] for b in rest[rank]] == list(range(FIRST_STEPS_ONE_RANK, runs.steps))
        assert counts(runs.out, "rest", rank) == [remaining] * WORLD
        assert state(runs.out, "rest", rank)["step"] == runs.steps
    assert delivered_keys(first, *rest) == Counter(runs.keys)
    epoch = global_steps(*(records(runs.out, "epoch", rank) for rank in range(WORLD)))
    assert global_steps(first) == {s: epoch[s] for s in range(FIRST_STEPS_ONE_RANK)}
    assert global_steps(*rest) == {s: epoch[s] for s in range(FIRST_STEPS_ONE_RANK, runs.steps)}
