"""``python -m trainer.train`` on bad input: one readable line and a non-zero exit, no hang;
and the launch the README recommends for restarts."""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

from .conftest import RENDEZVOUS, ROOT, free_port, trainer_command, trainer_env
from .test_checkpoint import restartable_env


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
    assert "train.lm.token_field 'tokens' is not in the batch" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_missing_dataset_names_it(tmp_path: Path) -> None:
    done = run("--config=configs/demo.toml", f"--data.url={tmp_path}/nowhere",
               f"--train.out_dir={tmp_path}/out")  # fmt: skip
    assert done.returncode == 1
    assert f"{tmp_path}/nowhere/index.json does not exist" in done.stderr


def test_a_rank_whose_peers_never_come_fails_within_the_collective_timeout(
    digits_dataset: str, tmp_path: Path
) -> None:
    """Rank 0 of 2, alone: the process group cannot form. Bounded by
    train.collective_timeout_s, and said in one line."""
    env = dict(trainer_env(), WORLD_SIZE="2", RANK="0", LOCAL_RANK="0",
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))  # fmt: skip
    command = [sys.executable, "-m", "trainer.train", "--config=configs/demo.toml",
               f"--data.url={digits_dataset}", f"--train.out_dir={tmp_path}",
               "--train.collective_timeout_s=3", "--train.progress=false"]  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert done.returncode == 1, done.stderr[-3000:]
    assert done.stderr.strip().splitlines() == [done.stderr.strip()], done.stderr[-3000:]
    formed = "rank 0 of 2: the process group did not form within train.collective_timeout_s = 3 s"
    assert formed in done.stderr


def test_the_readme_restart_recipe_is_what_the_restart_tests_launch() -> None:
    readme = (ROOT / "README.md").read_text()
    recipe = readme.split("- **Restarts**")[1].split("```bash")[1].split("```")[0]
    words = shlex.split(recipe.replace("\\\n", " "))
    variable, launcher = words[0], words[1]
    assert (launcher, variable) == ("torchrun", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1")
    assert restartable_env()["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] == "1"
    assert not [w for w in words if w.startswith("--master")], words

    def rendezvous(arguments: list[str]) -> list[str]:
        flags = [w for w in arguments if w.startswith(("--rdzv", "--nnodes"))]
        return sorted(f.split("=")[0] if f.startswith("--rdzv-endpoint") else f for f in flags)

    tested = trainer_command(2, [], max_restarts=1)
    assert (
        rendezvous(words)
        == rendezvous(tested)
        == sorted(["--nnodes=1", "--rdzv-endpoint", *RENDEZVOUS])
    )
