"""Dry runs for 1,024 ranks on the fake process group (``trainer.dry_run``): each layout
builds and steps as the played ranks would, each rank reports its share of the model, and
the settings a cluster job would trip over fail here, naming the rank and the setting."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys

import pytest

from trainer.config import load
from trainer.dry_run import default_ranks, play_ranks

from .conftest import ROOT, trainer_env

WORLD = 1024
BASE = ["--data.global_batch=1024", "--model.gpt.heads=8"]


def config(*overrides: str):  # type: ignore[no-untyped-def]
    return load(ROOT / "configs" / "hybrid-parallel.toml", [*BASE, *overrides])


@pytest.fixture(scope="module")
def total() -> int:
    (one,) = play_ranks(config("--parallel.dp_shard=1", "--parallel.tp=1"), 1, [0])
    assert one.strategy == "none" and one.stepped
    return one.parameters


LAYOUTS = {
    # name: (overrides, strategy, how many ways the parameters are split on a rank)
    "ddp-hierarchical-powersgd": (["--parallel.dp_shard=1", "--parallel.tp=1",
                                   "--parallel.allreduce=hierarchical", "--parallel.node_size=8",
                                   "--compression.method=powersgd"], "ddp", 1),
    "hsdp-16x64": (["--parallel.dp_replicate=16", "--parallel.dp_shard=64", "--parallel.tp=1",
                    "--compression.method=topk"], "hsdp", 64),
    "fsdp-128xtp-8": (["--parallel.dp_shard=128", "--parallel.tp=8"], "fsdp", 128 * 8),
    "pp-4xfsdp-32xtp-8": (["--parallel.pp=4", "--parallel.dp_shard=32", "--parallel.tp=8",
                           "--parallel.microbatches=8"], "fsdp", 4 * 32 * 8),
}  # fmt: skip


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_1024_rank_layouts_build_and_step(name: str, total: int) -> None:
    overrides, strategy, ways = LAYOUTS[name]
    # Both ends of every mesh dimension; the middle ranks too where they start a stage.
    ranks = default_ranks(WORLD) if "--parallel.pp=4" in overrides else [0, WORLD - 1]
    reports = play_ranks(config(*overrides), WORLD, ranks)
    assert [r.rank for r in reports] == ranks
    for report in reports:
        assert report.strategy == strategy
        assert report.coordinates == {**report.coordinates}  # every dimension named
        # Sharded: a small fraction of the model. (Over 1,024 ways this 1 M-parameter model
        # cannot split evenly: every tensor leaves at least a row on a rank; the exact
        # accounting is checked on 8 ranks below.)
        assert 0 < report.parameters <= (total if ways == 1 else total / 8), (report, total)
        assert report.stepped == ("--parallel.pp=4" not in overrides)
        if report.stepped:
            assert report.gradient_bytes == report.parameter_bytes
            assert report.optimizer_bytes >= 2 * report.parameter_bytes  # AdamW: two moments
    if ways == 1:
        assert all(r.parameters == total for r in reports)
    # The last pipeline stage holds other blocks than the first.
    if "--parallel.pp=4" in overrides:
        assert [r.coordinates["pp"] for r in reports] == [0, 1, 2, 3]


@pytest.mark.timeout(120)
def test_fsdp_shards_add_up_to_the_model(total: int) -> None:
    reports = play_ranks(config("--parallel.dp_shard=8", "--parallel.tp=1"), 8, list(range(8)))
    assert sum(r.parameters for r in reports) == total
    assert max(r.parameters for r in reports) <= total / 8 * 1.25


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["--parallel.tp=3"], "WORLD_SIZE 1024 is not divisible by parallel.pp × dp_shard × tp"),
        (["--parallel.tp=16"], "heads"),
        (["--parallel.pp=8", "--parallel.tp=1", "--parallel.dp_shard=1"], "too few for 8"),
        (["--data.global_batch=1000"], "does not split over the 512 data-parallel ranks"),
        (
            [
                "--parallel.dp_shard=1",
                "--parallel.tp=1",
                "--parallel.allreduce=hierarchical",
                "--parallel.node_size=48",
            ],
            "parallel.node_size = 48 does not divide",
        ),
        (["--parallel.allreduce=flat"], "parallel.allreduce = 'flat' replaces DDP"),
    ],
    ids=["degrees", "tp-heads", "pp-blocks", "batch", "node-size", "flat-on-fsdp"],
)
def test_settings_a_cluster_job_would_trip_over_fail_here(
    overrides: list[str], message: str
) -> None:
    with pytest.raises(ValueError, match="rank 0 of 1024") as caught:
        play_ranks(config(*overrides), WORLD, [0])
    assert message in str(caught.value)


@pytest.mark.timeout(120)
def test_the_tool_prints_each_played_rank() -> None:
    command = [sys.executable, "tools/dry_run.py", "--config", "configs/hybrid-parallel.toml",
               "--world", "1024", "--ranks", "0,1023", *BASE, "--parallel.dp_shard=128",
               "--parallel.tp=8"]  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, env=trainer_env(), capture_output=True, text=True,
                          timeout=100)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "1024 ranks: dp_shard=128 × tp=8; data parallelism: fsdp" in done.stdout
    assert "pp=0 dp_replicate=0 dp_shard=127 tp=7" in done.stdout


def documented_commands() -> list[list[str]]:
    """The dry-run commands that the README and the tool's own usage text give."""
    usage = (ROOT / "tools" / "dry_run.py").read_text().split('"""')[1]
    found = re.findall(r"`(python tools/dry_run\.py [^`]*)`", (ROOT / "README.md").read_text())
    found += [" ".join(line.strip().rstrip("\\").strip() for line in usage.split("\n\n")[1]
                       .splitlines())]  # fmt: skip
    return [shlex.split(command) for command in found]


@pytest.mark.timeout(120)
def test_the_documented_dry_run_command_runs_as_written() -> None:
    commands = documented_commands()
    assert len(commands) == 2, commands
    for command in commands:
        done = subprocess.run([sys.executable, *command[1:]], cwd=ROOT, env=trainer_env(),
                              capture_output=True, text=True, timeout=100)  # fmt: skip
        assert done.returncode == 0, (command, done.stderr[-3000:])
        assert done.stdout.startswith("1024 ranks: "), done.stdout


def test_every_tool_the_docs_and_code_name_exists() -> None:
    named = {}
    for path in [ROOT / "README.md", *ROOT.glob("configs/*.toml"), *ROOT.glob("trainer/**/*.py"),
                 *ROOT.glob("tools/*.py"), *ROOT.glob("dataflow/**/*.py")]:  # fmt: skip
        # tools/x.py, not tests/tools/x.py (a test file beside the tools' tests)
        for tool in re.findall(r"(?<![\w/])tools/\w+\.py\b", path.read_text()):
            named.setdefault(tool, path.relative_to(ROOT))
    missing = {tool: str(where) for tool, where in named.items() if not (ROOT / tool).exists()}
    assert not missing, f"named but not in tools/: {missing}"


def test_a_batch_that_does_not_split_says_what_would() -> None:
    with pytest.raises(ValueError, match="rank 0 of 1024") as caught:
        play_ranks(config("--data.global_batch=1000"), WORLD, [0])
    assert "use a multiple of 512, e.g. --data.global_batch=1024" in str(caught.value)


def test_a_user_model_dry_runs_with_a_built_in_task_and_names_what_it_cannot_synthesise() -> None:
    user = ["--model.name=tests.training.user_models:digit_net", "--data.image_size=32",
            "--data.global_batch=64", "--parallel.dp_shard=8", "--parallel.tp=1"]  # fmt: skip
    (played,) = play_ranks(config(*user, "--train.task=classify"), 64, [9])
    assert (played.strategy, played.stepped) == ("hsdp", True)
    own_task = "--train.task=tests.training.user_models:smoothed_classify"
    with pytest.raises(ValueError, match=re.escape("batches for train.task = 'classify' or 'lm'")):
        play_ranks(config(*user, own_task), 64, [0])
