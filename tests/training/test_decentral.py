"""Decentralized training through the trainer (``parallel.decentralized``): gossip and local
SGD / DiLoCo (``MODES``) learn like the all-reduce baseline on the reference CNN, keep the ranks'
parameters close together, and resume from a checkpoint into exactly the state of a run
never interrupted (each rank's own parameters and optimizer state, the anchor and outer
momentum).

4 gloo ranks, digits CNN (width 8), global batch 32, AdamW at lr 3e-3, 2 epochs (112 steps).
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import pytest
import torch

from .conftest import read_metrics
from .test_checkpoint import flat_state, train

EPOCHS, STEPS = 2, 112
COMMON = ["--config", "configs/demo.toml", "--data.global_batch=32", "--data.audit=false",
          "--data.decode_backend=cpu", "--model.cnn.width=8", "--optim.lr=3e-3",
          "--train.progress=false", "--train.eval_url=", f"--train.epochs={EPOCHS}",
          "--parallel.consensus_every=7"]  # fmt: skip
MODES = {
    "gossip-ring": ["--parallel.decentralized=gossip", "--parallel.gossip_graph=ring"],
    "gossip-exponential": ["--parallel.decentralized=gossip",
                           "--parallel.gossip_graph=exponential"],
    "local-sgd": ["--parallel.decentralized=local_sgd", "--parallel.local_steps=4"],
    # DiLoCo's outer lr 0.7, with momentum 0.5: its 0.9 is for hundreds of inner steps; at 4
    # it overshoots (measured: +0.32 over all-reduce after 4 epochs, against +0.06 at 0.5).
    "diloco": ["--parallel.decentralized=local_sgd", "--parallel.local_steps=4",
               "--parallel.outer_lr=0.7", "--parallel.outer_momentum=0.5"],
}  # fmt: skip
# The last epoch's mean loss may exceed the all-reduce run's (0.567) by this much. Measured
# after 2 epochs: gossip ring +0.195, exponential +0.190, local SGD +0.200, DiLoCo +0.136;
# after 4 epochs the gaps narrow to +0.10, +0.10, +0.11 and +0.06 (all-reduce 0.300).
# Each rank steps on 8 samples' gradients instead of 32 between mixings.
LOSS_TOLERANCE = 0.25
# Mean relative distance of a rank's parameters from the ranks' average (measured ≤ 0.012).
CONSENSUS_BOUND = 0.05


def last_epoch_loss(records: list[dict[str, Any]]) -> float:
    steps = [r for r in records if r["event"] == "step"]
    return statistics.mean(r["loss"] for r in steps if r["epoch"] == EPOCHS - 1)


@pytest.fixture(scope="module")
def baseline(digits_dataset: str, tmp_path_factory: pytest.TempPathFactory) -> float:
    out = tmp_path_factory.mktemp("allreduce")
    run = train(out, [*COMMON, f"--data.url={digits_dataset}"], nproc=4)
    return last_epoch_loss(run.records)


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("mode", ["gossip-ring", "diloco"])
def test_decentralized_training_learns_like_all_reduce(
    mode: str, baseline: float, digits_dataset: str, tmp_path: Path
) -> None:
    run = train(tmp_path, [*COMMON, f"--data.url={digits_dataset}", *MODES[mode]], nproc=4)
    (start,) = run.events("start")
    assert start["strategy"] == ("gossip" if mode.startswith("gossip") else "local_sgd")
    loss = last_epoch_loss(run.records)
    assert loss <= baseline + LOSS_TOLERANCE, f"{mode}: {loss:.3f} vs all-reduce {baseline:.3f}"
    consensus = [r["consensus"] for r in run.events("step") if "consensus" in r]
    assert len(consensus) == STEPS // 7
    assert max(consensus) <= CONSENSUS_BOUND, (mode, consensus)
    sent = [r["comm_bytes"] for r in run.events("step")]
    assert sum(sent) > 0


@pytest.mark.timeout(300)
def test_a_diloco_resume_continues_exactly(digits_dataset: str, tmp_path: Path) -> None:
    # Saved at step 10, mid-period (local steps of 4): the ranks' own parameters and
    # optimizer states, the anchor, the outer momentum and the step count all matter. (The
    # gossip mixer keeps the same per-rank state, without anchor and momentum.) 2 ranks: the
    # state is per rank all the same, and 2 start faster than 4.
    options = [*COMMON, f"--data.url={digits_dataset}", *MODES["diloco"], "--train.epochs=1",
               "--checkpoint.interval=10", "--parallel.consensus_every=0"]  # fmt: skip
    whole = train(tmp_path / "whole", [*options, "--train.max_steps=20"], nproc=2)
    train(tmp_path / "resumed", [*options, "--train.max_steps=10"], nproc=2)
    resumed = train(tmp_path / "resumed", [*options, "--train.max_steps=20"], nproc=2)
    assert [r["resumed_from"] != "" for r in resumed.events("start")] == [False, True]
    final = "step-00000020"
    got = flat_state(resumed.checkpoints / final, tmp_path / "got.pt")
    want = flat_state(whole.checkpoints / final, tmp_path / "want.pt")
    assert sorted(got) == sorted(want)
    assert any(name.startswith("decentral.rank1.param-") for name in want)
    different = [name for name, value in want.items() if isinstance(value, torch.Tensor)
                 and not torch.equal(got[name], value)]  # fmt: skip
    assert not different, different[:5]
    losses = {
        r["step"]: r["loss"] for r in read_metrics(tmp_path / "resumed") if r["event"] == "step"
    }
    assert losses == {r["step"]: r["loss"] for r in whole.events("step")}
