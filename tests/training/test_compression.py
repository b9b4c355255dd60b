"""Gradient compression on 2 gloo ranks: each compressor's averaged gradient, its error
feedback (the running sum of compressed gradients approaches the exact one), its bytes, and
short training runs against uncompressed training."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from trainer.config import CompressionConfig, TopKConfig

from .conftest import ROOT, TRAINER_TIMEOUT_S, free_port, trainer_env

WORKER = Path(__file__).with_name("compression_worker.py")


@pytest.fixture(scope="module")
def worker_results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("compression") / "results.json"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
               "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}",
               str(WORKER), str(out)]  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, env=trainer_env(), capture_output=True, text=True,
                          timeout=TRAINER_TIMEOUT_S)  # fmt: skip
    assert done.returncode == 0, done.stderr[-6000:]
    results: dict[str, Any] = json.loads(out.read_text())
    return results


def ratio(result: dict[str, Any]) -> float:
    return float(result["bytes_dense"]) / result["bytes_sent"]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_casts_halve_the_bytes_within_their_rounding(worker_results: dict[str, Any]) -> None:
    for name, bound in (("fp16", 1e-3), ("bf16", 5e-3)):
        result = worker_results[name]
        assert result["ranks_agree"], name
        assert ratio(result) == 2.0, result
        assert result["first_step_error"] < bound, result  # measured 3.0e-4 and 2.4e-3


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    ("name", "least_ratio", "final_error"),
    [("powersgd", 19, 0.02), ("topk", 42, 0.08), ("sign", 27, 0.06)],
)
def test_error_feedback_brings_the_running_sum_to_the_exact_one(
    worker_results: dict[str, Any], name: str, least_ratio: float, final_error: float
) -> None:
    """A 256×128 matrix and a 128 vector, a fixed gradient per rank. Measured after 800 steps:
    PowerSGD rank 4 19.8× fewer bytes, error 0.0085; top-k 1% 50.1×, 0.052; sign 31.0×, 0.044
    (from 0.64, 0.93 and 0.67 for a single step). Top-k and sign send the vector exactly
    since issue 20 (its 512 bytes are 16 % and 11 % of what they send): 42.1× and 27.8×."""
    result = worker_results[name]
    assert result["ranks_agree"]
    assert ratio(result) >= least_ratio, result
    errors = {int(count): error for count, error in result["running_error"].items()}
    counts = sorted(errors)
    assert all(errors[a] > errors[b] for a, b in itertools.pairwise(counts)), errors
    assert errors[counts[-1]] < final_error < result["first_step_error"], errors
    if name != "sign":
        # The residual (error × steps) stops growing: the error falls like 1 / steps.
        assert errors[800] * 800 <= 1.1 * errors[400] * 400, errors


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_powersgd_passes_a_gradient_of_lower_rank_through_exactly(
    worker_results: dict[str, Any],
) -> None:
    """Each rank's 256×128 gradient is a multiple of one rank-3 matrix: one step of rank-4
    PowerSGD (from a random Q) spans it, so the average arrives exact, at 19.8× fewer bytes."""
    result = worker_results["powersgd_lowrank"]
    assert result["ranks_agree"]
    assert result["first_step_error"] < 1e-5, result
    assert ratio(result) >= 19, result


def test_compression_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="start_step"):
        CompressionConfig(method="powersgd", start_step=-1)
    with pytest.raises(ValueError, match=r"compression\.topk\.ratio"):
        TopKConfig(ratio=0.0)


DIGITS = [
    "--config", "configs/demo.toml", "--data.global_batch=64", "--data.audit=false",
    "--data.decode_backend=cpu", "--model.cnn.width=8", "--train.progress=false",
    "--checkpoint.interval=0", "--train.epochs=3", "--optim.warmup_steps=5",
]  # fmt: skip


@pytest.fixture(scope="module")
def uncompressed(digits_dataset: str, tmp_path_factory: pytest.TempPathFactory) -> list[Any]:
    from .conftest import read_metrics, trainer_command

    out_dir = tmp_path_factory.mktemp("uncompressed")
    command = trainer_command(2, [f"--train.out_dir={out_dir}", *DIGITS,
                                  f"--data.url={digits_dataset}"])  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, env=trainer_env(), capture_output=True, text=True,
                          timeout=TRAINER_TIMEOUT_S)  # fmt: skip
    assert done.returncode == 0, done.stderr[-6000:]
    return read_metrics(out_dir)


def last_epoch_loss(records: list[dict[str, Any]]) -> float:
    steps = [r for r in records if r["event"] == "step"]
    last = [r["loss"] for r in steps if r["epoch"] == steps[-1]["epoch"]]
    return sum(last) / len(last)


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("method", ["fp16", "bf16", "powersgd", "topk", "sign"])
def test_training_with_compression_learns_like_without(
    method: str, digits_dataset: str, uncompressed: list[Any],
    run_trainer: Callable[..., list[dict[str, Any]]], tmp_path: Path,
) -> None:  # fmt: skip
    records = run_trainer(tmp_path, [*DIGITS, f"--data.url={digits_dataset}",
                                     f"--compression.method={method}",
                                     "--compression.start_step=5"], nproc=2)  # fmt: skip
    steps = [r for r in records if r["event"] == "step"]
    assert all("comm_bytes" in r and r["comm_bytes"] > 0 for r in steps)
    compressed = [r["compression_ratio"] for r in steps[10:]]
    assert min(compressed) > 1.9, compressed  # every compressed step sent fewer bytes
    baseline = last_epoch_loss(uncompressed)
    assert last_epoch_loss(records) < baseline + LOSS_TOLERANCE[method], (
        method, last_epoch_loss(records), baseline)  # fmt: skip


# Mean training loss of the third epoch (84 steps), compressed minus uncompressed (0.527).
# Measured: fp16 +0.002, bf16 +0.001, PowerSGD rank 4 +0.05, sign +0.18, top-k 1% +0.90 —
# top-k sends each weight about once in 100 steps, so 84 steps leave it far behind; all
# stay well below chance (2.30), and the error-feedback test above shows where they go.
LOSS_TOLERANCE = {"fp16": 0.02, "bf16": 0.02, "powersgd": 0.15, "sign": 0.4, "topk": 1.2}


@pytest.mark.slow
@pytest.mark.timeout(300)
# Sign keeps the state top-k keeps (ErrorFeedback's residuals per parameter name, and the
# step count), saved and restored by the same code: top-k stands for both (suite time).
@pytest.mark.parametrize("method", ["powersgd", "topk"])
def test_a_resume_restores_the_compression_state_exactly(
    method: str, digits_dataset: str, run_trainer: Callable[..., list[dict[str, Any]]],
    tmp_path: Path,
) -> None:  # fmt: skip
    import shutil

    import torch.distributed.checkpoint as dcp

    options = [*DIGITS, f"--data.url={digits_dataset}", f"--compression.method={method}",
               "--compression.start_step=5", "--train.max_steps=20",
               "--checkpoint.interval=10", "--checkpoint.keep=3"]  # fmt: skip
    whole = run_trainer(tmp_path / "whole", options, nproc=2)
    checkpoint = tmp_path / "whole" / "checkpoints" / "step-00000010"
    saved = dcp.FileSystemReader(str(checkpoint)).read_metadata().state_dict_metadata
    for rank in (0, 1):  # each rank's own residuals, per parameter, are in it
        prefix = f"compression.rank{rank}.residual-output_layer.fc.weight"
        assert any(key.startswith(prefix) for key in saved), sorted(saved)
    shutil.copytree(checkpoint, tmp_path / "resumed" / "checkpoints" / checkpoint.name)
    resumed = run_trainer(tmp_path / "resumed", options, nproc=2)
    start = [r for r in resumed if r["event"] == "start"][-1]
    assert start["step"] == 10
    losses = {r["step"]: r["loss"] for r in whole if r["event"] == "step"}
    again = {r["step"]: r["loss"] for r in resumed if r["event"] == "step"}
    assert sorted(again) == list(range(11, 21))
    assert again == {step: losses[step] for step in range(11, 21)}  # bit for bit


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_a_resume_at_another_world_size_starts_from_the_mean_residuals(
    digits_dataset: str, run_trainer: Callable[..., list[dict[str, Any]]], tmp_path: Path
) -> None:
    """2 ranks save their top-k residuals; a rank of a 4-rank run loads their mean (what
    the ranks owed the mean update in total is kept), and 4 ranks train on from there."""
    import shutil

    import torch
    import torch.distributed.checkpoint as dcp

    from trainer.checkpoint import Checkpointer
    from trainer.compression import TopK, build_compressor
    from trainer.config import CheckpointConfig

    options = [*DIGITS, f"--data.url={digits_dataset}", "--compression.method=topk",
               "--compression.start_step=2", "--checkpoint.interval=10"]  # fmt: skip
    run_trainer(tmp_path / "two", [*options, "--train.max_steps=10"], nproc=2)
    checkpoint = tmp_path / "two" / "checkpoints" / "step-00000010"

    compressor = build_compressor(CompressionConfig(method="topk"))
    assert isinstance(compressor, TopK)
    checkpointer = Checkpointer(
        CheckpointConfig(), str(tmp_path / "scratch"), parts=[], optimizers=[], rank=0,
        world_size=4, rank_states={"compression": compressor},
    )  # fmt: skip
    checkpointer._load_averaged(str(checkpoint), "compression", compressor)
    saved = []
    for rank in (0, 1):
        state = checkpointer._saved(str(checkpoint), "compression", rank)
        dcp.load({"compression": {f"rank{rank}": state}}, checkpoint_id=str(checkpoint),
                 no_dist=True)  # fmt: skip
        saved.append(state)
    assert compressor.steps == 10
    assert set(compressor.residuals) == {key[len("residual-") :] for key in saved[0]
                                         if key.startswith("residual-")}  # fmt: skip
    for name, residual in compressor.residuals.items():
        mean = (saved[0][f"residual-{name}"] + saved[1][f"residual-{name}"]) / 2
        assert torch.equal(residual, mean), name
        assert not torch.equal(saved[0][f"residual-{name}"], saved[1][f"residual-{name}"])

    shutil.copytree(checkpoint, tmp_path / "four" / "checkpoints" / checkpoint.name)
    records = run_trainer(tmp_path / "four", [*options, "--train.max_steps=14"], nproc=4)
    assert [r for r in records if r["event"] == "start"][-1]["step"] == 10
    steps = [r for r in records if r["event"] == "step"]
    assert [r["step"] for r in steps] == [11, 12, 13, 14]
    assert all(r["compression_ratio"] > 10 for r in steps)
