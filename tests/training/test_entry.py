"""``python -m trainer.train`` on bad input: one readable line and a non-zero exit, no hang."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from .conftest import ROOT, trainer_env


def run(*arguments: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "trainer.train", *arguments]
    return subprocess.run(command, cwd=ROOT, env=trainer_env(), capture_output=True, text=True,
                          timeout=120)  # fmt: skip


def test_an_unknown_key_names_the_closest_one() -> None:
    done = run("--train.epoch=3")
    assert done.returncode == 2
    assert "unknown key 'epoch' in [train]; did you mean 'epochs'" in done.stderr


def test_a_layout_that_does_not_fit_the_world_says_why(digits_dataset: str, tmp_path: Path) -> None:
    done = run("--config=configs/demo.toml", f"--data.url={digits_dataset}", "--parallel.tp=3",
               f"--train.out_dir={tmp_path}")  # fmt: skip
    assert done.returncode == 1
    assert "WORLD_SIZE 1 is not divisible by parallel.pp × dp_shard × tp = 1 × 1 × 3 = 3" in (
        done.stderr
    )
    assert "Traceback" not in done.stderr


def test_a_model_that_does_not_fit_the_data_says_why(digits_dataset: str, tmp_path: Path) -> None:
    done = run("--config=configs/demo.toml", f"--data.url={digits_dataset}", "--model.name=gpt",
               f"--train.out_dir={tmp_path}", "--train.max_steps=1")  # fmt: skip
    assert done.returncode == 1
    assert "model.token_field 'tokens' is not in the batch" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_missing_dataset_names_it(tmp_path: Path) -> None:
    done = run("--config=configs/demo.toml", f"--data.url={tmp_path}/nowhere",
               f"--train.out_dir={tmp_path}/out")  # fmt: skip
    assert done.returncode == 1
    assert f"{tmp_path}/nowhere/index.json does not exist" in done.stderr
