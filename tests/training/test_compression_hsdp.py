"""Compression on HSDP's replicate dimension only, 4 gloo ranks (dp_replicate 2 × dp_shard 2).

FSDP2 then shards over the dp_shard group alone — its reduce-scatter stays exact fp32 — and
the compressor's all-reduce hook averages each module's reduce-scattered shard over the
dp_replicate group. Checked: with nothing worth compressing the hook path trains exactly like
native HSDP (so the plumbing — which group, which scale, which entries — is right); the bytes
counted are those of the replicate all-reduce of this rank's shard; each compressor learns
like native HSDP; and a resume restores the per-shard state bit for bit.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from trainer.config import GPTConfig, ModelConfig
from trainer.models import build_model

from .conftest import (
    GPT,
    ROOT,
    SEQ_LEN,
    TRAINER_TIMEOUT_S,
    VOCAB,
    read_metrics,
    step_losses,
    trainer_command,
    trainer_env,
)

Run = Callable[..., list[dict[str, Any]]]
HSDP = ["--parallel.dp_shard=2", "--parallel.dp_replicate=2"]
TOKENS = [*GPT, *HSDP, "--data.global_batch=16", "--optim.name=sgd", "--optim.lr=0.05",
          "--data.audit=false", "--checkpoint.interval=0"]  # fmt: skip
DIGITS = [
    "--config", "configs/demo.toml", *HSDP, "--data.global_batch=64", "--data.audit=false",
    "--data.decode_backend=cpu", "--model.cnn.width=8", "--train.progress=false",
    "--checkpoint.interval=0", "--optim.warmup_steps=5",
]  # fmt: skip


def steps(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in records if r["event"] == "step"]


def shard_entries() -> int:
    """Entries of rank 0's shards of the test GPT: dim 0 of every parameter split in 2."""
    with torch.device("meta"):
        gpt = GPTConfig(vocab_size=VOCAB, seq_len=SEQ_LEN, dim=32, layers=4, heads=4)
        model = build_model(ModelConfig(name="gpt", gpt=gpt), num_classes=0)
    return sum(-(-p.shape[0] // 2) * (p.numel() // p.shape[0]) for p in model.parameters())


def launch(out_dir: Path, overrides: list[str]) -> list[dict[str, Any]]:
    """A 4-rank run for module-scoped fixtures (which cannot use ``run_trainer``)."""
    command = trainer_command(4, [f"--train.out_dir={out_dir}", *overrides])
    done = subprocess.run(command, cwd=ROOT, env=trainer_env(), capture_output=True, text=True,
                          timeout=TRAINER_TIMEOUT_S)  # fmt: skip
    assert done.returncode == 0, done.stderr[-6000:]
    return read_metrics(out_dir)


@pytest.fixture(scope="module")
def native(token_dataset: str, tmp_path_factory: pytest.TempPathFactory) -> list[Any]:
    return launch(tmp_path_factory.mktemp("native-hsdp"),
                  [*TOKENS, "--train.max_steps=6", f"--data.url={token_dataset}"])  # fmt: skip


@pytest.fixture(scope="module")
def native_digits(digits_dataset: str, tmp_path_factory: pytest.TempPathFactory) -> list[Any]:
    return steps(launch(tmp_path_factory.mktemp("native-digits"),
                        [*DIGITS, f"--data.url={digits_dataset}", "--train.epochs=3"]))  # fmt: skip


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_the_hook_path_trains_exactly_like_native_hsdp(
    token_dataset: str, native: list[Any], run_trainer: Run, tmp_path: Path
) -> None:
    """PowerSGD whose rank saves nothing sends every parameter dense through the hook from
    step 0: the losses must be native HSDP's, and the bytes the fp32 replicate all-reduce of
    rank 0's shards (the reduce-scatter inside the shard group is not counted)."""
    records = run_trainer(tmp_path, [*TOKENS, "--train.max_steps=6", f"--data.url={token_dataset}",
                                     "--compression.method=powersgd",
                                     "--compression.powersgd.rank=4096",
                                     "--compression.start_step=0"], nproc=4)  # fmt: skip
    got, want = step_losses(records), step_losses(native)
    np.testing.assert_allclose(list(got.values()), list(want.values()), rtol=1e-4, atol=1e-5)
    for record in steps(records):
        assert record["comm_bytes"] == record["comm_bytes_dense"] == 4 * shard_entries()
        assert record["comm_s"] > 0


# Mean training loss of the third epoch (84 steps), compressed minus native HSDP (0.529):
# measured PowerSGD rank 4 +0.015, sign +0.16. Bytes ratios measured: 1.69× and 29.1× —
# the width-8 CNN's shards are small matrices (4×72), which rank 4 barely compresses.
LOSS_TOLERANCE = {"powersgd": 0.15, "sign": 0.4}
LEAST_RATIO = {"powersgd": 1.5, "sign": 25}


@pytest.mark.slow
@pytest.mark.timeout(300)
# Sign trained within +0.16 of native here too (tolerance 0.4); it is left out to keep the
# suite's time, as the DDP tests run every compressor and the HSDP plumbing is shared.
@pytest.mark.parametrize("method", ["powersgd"])
def test_hsdp_with_compression_learns_like_native(
    method: str, digits_dataset: str, native_digits: list[Any], run_trainer: Run, tmp_path: Path
) -> None:
    common = [*DIGITS, f"--data.url={digits_dataset}", "--train.epochs=3"]
    native = native_digits
    records = steps(run_trainer(tmp_path / method, [*common, f"--compression.method={method}",
                                                   "--compression.start_step=5"],
                                nproc=4))  # fmt: skip
    ratios = [r["compression_ratio"] for r in records[10:]]
    assert min(ratios) > LEAST_RATIO[method], ratios

    def last_epoch(rows: list[dict[str, Any]]) -> float:
        last = [r["loss"] for r in rows if r["epoch"] == rows[-1]["epoch"]]
        return sum(last) / len(last)

    assert last_epoch(records) < last_epoch(native) + LOSS_TOLERANCE[method], (
        last_epoch(records), last_epoch(native))  # fmt: skip


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("method", ["topk"])
def test_an_hsdp_resume_restores_the_compression_state_exactly(
    method: str, digits_dataset: str, run_trainer: Run, tmp_path: Path
) -> None:
    options = [*DIGITS, f"--data.url={digits_dataset}", f"--compression.method={method}",
               "--train.max_steps=16", "--checkpoint.interval=8"]  # fmt: skip
    whole = run_trainer(tmp_path / "whole", options, nproc=4)
    checkpoint = tmp_path / "whole" / "checkpoints" / "step-00000008"
    shutil.copytree(checkpoint, tmp_path / "resumed" / "checkpoints" / checkpoint.name)
    resumed = run_trainer(tmp_path / "resumed", options, nproc=4)
    assert [r for r in resumed if r["event"] == "start"][-1]["step"] == 8
    losses, again = step_losses(whole), step_losses(resumed)
    assert sorted(again) == list(range(9, 17))
    assert again == {step: losses[step] for step in range(9, 17)}  # bit for bit
