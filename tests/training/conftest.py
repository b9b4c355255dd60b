"""Fixtures for trainer tests: converted datasets and a launcher for ``trainer.train``.

``digits_dataset``: the 1,797 scikit-learn digits as tar shards (256 samples each).
``token_dataset``: 512 sequences of 33 tokens (a deterministic, learnable next-token task:
each sequence counts up by a per-sequence stride, modulo the vocabulary) in Parquet shards.
``run_trainer`` launches ``python -m trainer.train`` — under torchrun when ``nproc`` > 1 —
with the given overrides and returns the parsed metrics.jsonl.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from dataflow.convert.config import ConvertConfig
from dataflow.convert.job import convert

ROOT = Path(__file__).resolve().parents[2]
VOCAB = 64
SEQ_LEN = 32
TRAINER_TIMEOUT_S = 240

# The GPT settings every token test shares (small enough for 4 gloo ranks on 2 cores).
GPT = [
    "--model.name=gpt", f"--model.gpt.vocab_size={VOCAB}", f"--model.gpt.seq_len={SEQ_LEN}",
    "--model.gpt.dim=32", "--model.gpt.layers=4", "--model.gpt.heads=4", "--data.label_field=",
    "--data.shuffle_window=2", "--optim.lr=0.01", "--train.progress=false",
]  # fmt: skip


@pytest.fixture(scope="session")
def digits_dataset(digits_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    root = str(tmp_path_factory.mktemp("digits-shards") / "ds")
    convert(ConvertConfig(input=str(digits_folder), output=root, max_shard_samples=256,
                          workers=1), progress=False)  # fmt: skip
    return root


@pytest.fixture(scope="session")
def token_dataset(tmp_path_factory: pytest.TempPathFactory) -> str:
    base = tmp_path_factory.mktemp("tokens")
    rng = np.random.default_rng(0)
    lines = []
    for number in range(512):
        start, stride = int(rng.integers(0, VOCAB)), int(rng.integers(1, 4))
        tokens = [(start + stride * i) % VOCAB for i in range(SEQ_LEN + 1)]
        lines.append(json.dumps({"id": f"seq{number:04d}", "tokens": tokens}))
    (base / "tokens.jsonl").write_text("\n".join(lines) + "\n")
    root = str(base / "ds")
    convert(ConvertConfig(input=str(base / "tokens.jsonl"), output=root, format="parquet",
                          key_field="id", row_group_rows=32, max_shard_samples=128,
                          workers=1), progress=False)  # fmt: skip
    return root


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# The rendezvous of the README's restart recipe (a test checks that they agree).
RENDEZVOUS = ["--rdzv-backend=c10d", "--rdzv-conf=join_timeout=120,read_timeout=60"]


def trainer_command(nproc: int, overrides: list[str], *, max_restarts: int = 0) -> list[str]:
    if nproc == 1 and not max_restarts:
        return [sys.executable, "-m", "trainer.train", *overrides]
    return [
        sys.executable, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc-per-node={nproc}",
        f"--max-restarts={max_restarts}", *RENDEZVOUS,
        f"--rdzv-endpoint=127.0.0.1:{free_port()}", "--monitor-interval=0.2",
        "-m", "trainer.train", *overrides,
    ]  # fmt: skip


def trainer_env() -> dict[str, str]:
    # These are the CPU/gloo tests (on a GPU machine too: train.device = auto must not pick
    # one GPU for two ranks); tools/gpu_check.py runs the NCCL ones.
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), CUDA_VISIBLE_DEVICES="")


def read_metrics(out_dir: Path) -> list[dict[str, Any]]:
    lines = (out_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def step_losses(records: list[dict[str, Any]]) -> dict[int, float]:
    """step → loss, the last record of each step winning (a resumed run repeats steps)."""
    return {r["step"]: r["loss"] for r in records if r["event"] == "step"}


@pytest.fixture
def run_trainer() -> Callable[..., list[dict[str, Any]]]:
    def run(out_dir: Path, overrides: list[str], *, nproc: int = 1,
            timeout: float = TRAINER_TIMEOUT_S) -> list[dict[str, Any]]:  # fmt: skip
        command = trainer_command(nproc, [f"--train.out_dir={out_dir}", *overrides])
        done = subprocess.run(command, cwd=ROOT, env=trainer_env(), capture_output=True,
                              text=True, timeout=timeout)  # fmt: skip
        if done.returncode != 0:
            raise AssertionError(
                f"{' '.join(command)} exited {done.returncode}\n{done.stdout[-4000:]}\n"
                f"{done.stderr[-8000:]}"
            )
        return read_metrics(out_dir)

    return run
