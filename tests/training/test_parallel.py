"""Every parallel layout trains like one process: multi-process gloo runs through the real
entry point (torchrun → ``python -m trainer.train``) against a single-process run.

Each layout must log the same per-step loss (the global-batch mean) as one process on the
same global batch, to ``rtol = 1e-4, atol = 1e-5``. The layouts reduce in another order
than one process (all-reduce of gradients, sharded reductions, microbatch accumulation), so
float32 results differ in the last bits: the measured gap over 4 steps is ≤ 1e-6. A real
mistake moves the loss far more: the wrong batch, a missed reduction, or a gradient scaled
by 2 (sum instead of mean, a microbatch scale applied twice) moves step 2 by ≥ 1e-2. That
last one is why the GPT runs use SGD: AdamW divides the scale of the gradient away.

The audit log ({out_dir}/audit/rank-R.tsv, R the data-parallel rank the loader is built
with) checks the batches themselves: data-parallel ranks read disjoint parts of the global
batch that one process reads; tensor- and pipeline-parallel peers share a data-parallel
rank and so one audit file, which holds exactly what one process read (each peer's loader
is built with that same rank; the equal losses show the peers consumed the same batch).

Cost: one launch is ~5–10 s on 2 CPU cores (4 ranks ~15–20 s); the single-process runs are
module-scoped fixtures, so the file takes ~2 minutes.
"""

from __future__ import annotations

import subprocess
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from .conftest import GPT, ROOT, TRAINER_TIMEOUT_S, read_metrics, trainer_command, trainer_env

STEPS = 4
RTOL, ATOL = 1e-4, 1e-5

# Global batch 16 splits over 4 data-parallel ranks and into 4 microbatches per rank with pp.
TOKENS = [*GPT, "--data.global_batch=16", f"--train.max_steps={STEPS}", "--data.audit=true",
          "--optim.name=sgd", "--optim.lr=0.05"]  # fmt: skip
# The demo CNN narrowed to width 8, on local shards, without warm-up (4 steps would barely move).
DIGITS = [
    "--config", "configs/demo.toml", "--data.global_batch=32", f"--train.max_steps={STEPS}",
    "--data.audit=true", "--model.cnn.width=8", "--optim.lr=0.003", "--optim.warmup_steps=0",
    "--train.progress=false",
]  # fmt: skip

Records = list[dict[str, Any]]
Audit = dict[int, list[str]]  # step → keys, in delivery order


def single_process(out_dir: Path, overrides: list[str]) -> Records:
    """``run_trainer`` for module-scoped fixtures (which cannot use a per-test fixture)."""
    command = trainer_command(1, [f"--train.out_dir={out_dir}", *overrides])
    done = subprocess.run(command, cwd=ROOT, env=trainer_env(), capture_output=True, text=True,
                          timeout=TRAINER_TIMEOUT_S)  # fmt: skip
    assert done.returncode == 0, f"{' '.join(command)}\n{done.stderr[-8000:]}"
    return read_metrics(out_dir)


def losses(records: Records) -> list[float]:
    steps = [r for r in records if r["event"] == "step"]
    assert [r["step"] for r in steps] == list(range(1, STEPS + 1))
    return [r["loss"] for r in steps]


def start_event(records: Records) -> dict[str, Any]:
    (start,) = [r for r in records if r["event"] == "start"]
    return start


def read_audits(out_dir: Path) -> dict[str, Audit]:
    """audit file name → its steps."""
    audits: dict[str, Audit] = {}
    for path in sorted((out_dir / "audit").iterdir()):
        steps: Audit = defaultdict(list)
        for line in path.read_text().splitlines():
            epoch, step, key = line.split("\t")
            assert epoch == "0"
            steps[int(step)].append(key)
        audits[path.name] = dict(steps)
    return audits


class Reference:
    def __init__(self, out_dir: Path, overrides: list[str]) -> None:
        self.records = single_process(out_dir, overrides)
        self.losses = losses(self.records)
        (self.audit,) = read_audits(out_dir).values()


@pytest.fixture(scope="module")
def gpt_reference(token_dataset: str, tmp_path_factory: pytest.TempPathFactory) -> Reference:
    out_dir = tmp_path_factory.mktemp("gpt-single")
    return Reference(out_dir, [*TOKENS, f"--data.url={token_dataset}"])


@pytest.fixture(scope="module")
def cnn_reference(digits_dataset: str, tmp_path_factory: pytest.TempPathFactory) -> Reference:
    out_dir = tmp_path_factory.mktemp("cnn-single")
    return Reference(out_dir, [*DIGITS, f"--data.url={digits_dataset}"])


def check_same_batches(out_dir: Path, reference: Audit, dp_world: int) -> None:
    """Rank d's audit holds 1/dp_world of each step's global batch; together, that batch."""
    audits = read_audits(out_dir)
    assert sorted(audits) == [f"rank-{rank}.tsv" for rank in range(dp_world)]
    for step, keys in reference.items():
        per_rank = [audit[step] for audit in audits.values()]
        assert [len(part) for part in per_rank] == [len(keys) // dp_world] * dp_world
        assert sorted(key for part in per_rank for key in part) == sorted(keys), step


def test_single_process_reference_learns(gpt_reference: Reference) -> None:
    """The comparisons below mean something only if the loss moves from step to step."""
    start = start_event(gpt_reference.records)
    assert (start["world_size"], start["layout"], start["strategy"]) == (
        1, "single process", "none"
    )  # fmt: skip
    assert np.all(np.isfinite(gpt_reference.losses))
    assert gpt_reference.losses[-1] < gpt_reference.losses[0] - 0.1
    assert sorted(gpt_reference.audit) == list(range(STEPS))
    assert all(len(keys) == 16 for keys in gpt_reference.audit.values())


# (name, ranks, overrides, the start event's layout and strategy, data-parallel ranks)
LAYOUTS = [
    ("ddp", 2, [], "dp_replicate=2", "ddp", 2),
    ("ddp-flat", 2, ["--parallel.allreduce=flat"], "dp_replicate=2", "flat", 2),
    ("ddp-hierarchical", 4, ["--parallel.allreduce=hierarchical", "--parallel.node_size=2"],
     "dp_replicate=4", "ddp", 4),
    ("fsdp", 2, ["--parallel.dp_shard=2"], "dp_shard=2", "fsdp", 2),
    ("tp", 2, ["--parallel.tp=2"], "tp=2", "none", 1),
    ("pp-gpipe", 2, ["--parallel.pp=2", "--parallel.pp_schedule=gpipe"], "pp=2", "none", 1),
    ("pp-1f1b", 2, ["--parallel.pp=2", "--parallel.pp_schedule=1f1b"], "pp=2", "none", 1),
    ("pp-interleaved", 2,
     ["--parallel.pp=2", "--parallel.pp_schedule=interleaved_1f1b",
      "--parallel.stages_per_rank=2"], "pp=2", "none", 1),
    ("hsdp", 4, ["--parallel.dp_replicate=2", "--parallel.dp_shard=2"],
     "dp_replicate=2 × dp_shard=2", "hsdp", 4),
    ("fsdp-tp", 4, ["--parallel.dp_shard=2", "--parallel.tp=2"], "dp_shard=2 × tp=2", "fsdp", 2),
    # FSDP2 replicates (DDP's reducer cannot follow a pipeline's microbatches).
    ("pp-dp", 4, ["--parallel.pp=2", "--parallel.dp_replicate=2"], "pp=2 × dp_replicate=2",
     "replicate", 2),
]  # fmt: skip


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    ("ranks", "overrides", "layout", "strategy", "dp_world"),
    [pytest.param(*case[1:], id=case[0]) for case in LAYOUTS],
)
def test_gpt_layout_matches_one_process(
    run_trainer: Any,
    token_dataset: str,
    gpt_reference: Reference,
    tmp_path: Path,
    ranks: int,
    overrides: list[str],
    layout: str,
    strategy: str,
    dp_world: int,
) -> None:
    records = run_trainer(tmp_path, [*TOKENS, f"--data.url={token_dataset}", *overrides],
                          nproc=ranks)  # fmt: skip
    start = start_event(records)
    assert (start["world_size"], start["layout"], start["strategy"]) == (ranks, layout, strategy)
    np.testing.assert_allclose(losses(records), gpt_reference.losses, rtol=RTOL, atol=ATOL)
    check_same_batches(tmp_path, gpt_reference.audit, dp_world)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_cnn_fsdp_matches_one_process(
    run_trainer: Any, digits_dataset: str, cnn_reference: Reference, tmp_path: Path
) -> None:
    """The image path (decode, augment per sample, GroupNorm) under FSDP2 and AdamW."""
    records = run_trainer(tmp_path, [*DIGITS, f"--data.url={digits_dataset}",
                                     "--parallel.dp_shard=2"], nproc=2)  # fmt: skip
    start = start_event(records)
    assert (start["world_size"], start["layout"], start["strategy"]) == (2, "dp_shard=2", "fsdp")
    assert cnn_reference.losses[-1] < cnn_reference.losses[0]
    np.testing.assert_allclose(losses(records), cnn_reference.losses, rtol=RTOL, atol=ATOL)
    check_same_batches(tmp_path, cnn_reference.audit, 2)
