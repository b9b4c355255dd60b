"""Your own model and task through the real entry point: ``model.name`` and ``train.task``
as ``"package.module:function"`` (``tests/training/user_models.py``).

``DigitNet`` is no StagedModel: a trunk with BatchNorm, a custom ``nn.Parameter`` pair on the
root, a linear head; the task is classification with a label-smoothed loss. It trains in one
process, under DDP and under FSDP2 (2 ranks, wrapped by the module's children); a checkpoint
resumes exactly at the same world size, and at another.

Exact at the same world size: the resumed run's losses equal the uninterrupted run's bit for
bit (the same batches, deterministic CPU kernels, the optimizer state, the BatchNorm
buffers and RNG restored). At another world size BatchNorm normalises over another per-rank
batch (16 samples, not 32), so the losses differ by what that does (measured: ≤ 2.7e-3 over
the six resumed steps, 2 → 1 and 1 → 2 ranks): the test checks the batches are the same and
the losses within 2e-2, while a model that had lost its trained weights would be ~0.3 off
(2.28 at step 1, 2.00 at step 7).

The same loop runs from Python (``Trainer``): the API run's losses and checkpoints are the
CLI run's. TensorBoard events (when the package is installed) hold the metrics.jsonl scalars.
A Hugging Face GPT-2 (when ``transformers`` is installed) trains under DDP and FSDP2 on token
shards. ``examples/your_own_model.py`` runs as the README shows it.

Cost: 8 launches of a few seconds each, one in-process run, 2 GPT-2 launches and the example
(3 launches): ~3 minutes on 2 cores.
"""

from __future__ import annotations

import functools
import importlib.util
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from trainer import Trainer
from trainer.config import load

from .conftest import ROOT, SEQ_LEN, VOCAB, read_metrics, trainer_env
from .test_checkpoint import Run, assert_same_batches, seed_checkpoint, train
from .user_models import digit_net, smoothed_classify

HAS_TENSORBOARD = importlib.util.find_spec("tensorboard") is not None
HAS_TRANSFORMERS = importlib.util.find_spec("transformers") is not None

STEPS = 12
INTERVAL = 6
USER = [
    "--config", "configs/demo.toml", "--data.global_batch=32", "--data.audit=true",
    "--data.decode_backend=cpu", "--train.progress=false",
    "--model.name=tests.training.user_models:digit_net", "--model.options={width = 8}",
    "--train.task=tests.training.user_models:smoothed_classify",
    "--train.task_options={smoothing = 0.05}",
    # Constant lr: a run stopped at step 6 and one going on to 12 take the same steps.
    "--optim.lr=0.005", "--optim.warmup_steps=0", "--optim.schedule=constant",
    f"--checkpoint.interval={INTERVAL}", "--checkpoint.keep=2",
]  # fmt: skip
TENSORBOARD = [f"--train.tensorboard={str(HAS_TENSORBOARD).lower()}"]
LAYOUTS = {"single": (1, TENSORBOARD), "ddp": (2, []), "fsdp": (2, ["--parallel.dp_shard=2"])}
OTHER_WORLD_TOLERANCE = 2e-2


def user_args(dataset: str, *extra: str) -> list[str]:
    return [*USER, f"--data.url={dataset}", f"--train.max_steps={STEPS}", *extra]


@pytest.fixture(scope="module")
def runs(digits_dataset: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Run]:
    """Uninterrupted runs, checkpointing at steps 6 and 12."""
    done = {}
    for name, (ranks, extra) in LAYOUTS.items():
        out_dir = tmp_path_factory.mktemp(f"user-{name}")
        done[name] = train(out_dir, user_args(digits_dataset, *extra), nproc=ranks)
    return done


@pytest.mark.timeout(600)
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_a_user_module_trains_in_every_data_parallel_layout(
    runs: dict[str, Run], name: str
) -> None:
    run = runs[name]
    start = run.events("start")[0]
    ranks, _ = LAYOUTS[name]
    assert (start["world_size"], start["strategy"]) == (ranks, {"single": "none"}.get(name, name))
    steps = run.events("step")
    assert [r["step"] for r in steps] == list(range(1, STEPS + 1))
    losses = [r["loss"] for r in steps]
    assert losses[-1] < losses[0] - 0.2, losses
    # Classification logs its training accuracy (a global mean over the step's samples).
    assert all(0.0 <= r["train_accuracy"] <= 1.0 for r in steps)
    assert steps[-1]["train_accuracy"] > steps[0]["train_accuracy"]
    assert [c["step"] for c in run.events("checkpoint")] == [INTERVAL, STEPS]


@pytest.mark.timeout(600)
@pytest.mark.parametrize("name", ["ddp", "fsdp"])
def test_a_user_module_resumes_exactly_at_the_same_world_size(
    runs: dict[str, Run], name: str, digits_dataset: str, tmp_path: Path
) -> None:
    ranks, extra = LAYOUTS[name]
    seed_checkpoint(runs[name].checkpoints / f"step-{INTERVAL:08d}", tmp_path)
    resumed = train(tmp_path, user_args(digits_dataset, *extra), nproc=ranks)
    start = resumed.events("start")[-1]
    assert (start["world_size"], start["step"]) == (ranks, INTERVAL)
    assert_same_batches(resumed, runs[name], range(INTERVAL + 1, STEPS + 1))
    assert resumed.losses() == {
        step: runs[name].losses()[step] for step in range(INTERVAL + 1, STEPS + 1)
    }


@pytest.mark.timeout(600)
@pytest.mark.parametrize(("source", "ranks"), [("fsdp", 1), ("single", 2)])
def test_a_user_module_resumes_at_another_world_size(
    runs: dict[str, Run], source: str, ranks: int, digits_dataset: str, tmp_path: Path
) -> None:
    seed_checkpoint(runs[source].checkpoints / f"step-{INTERVAL:08d}", tmp_path)
    resumed = train(tmp_path, user_args(digits_dataset), nproc=ranks)
    start = resumed.events("start")[-1]
    assert (start["world_size"], start["step"]) == (ranks, INTERVAL)
    assert_same_batches(resumed, runs[source], range(INTERVAL + 1, STEPS + 1))
    got, want = resumed.losses(), runs[source].losses()
    assert sorted(got) == list(range(INTERVAL + 1, STEPS + 1))
    for step in got:
        assert abs(got[step] - want[step]) <= OTHER_WORLD_TOLERANCE, (step, got, want)


@pytest.mark.timeout(600)
def test_the_python_api_trains_as_the_cli_does(
    runs: dict[str, Run], digits_dataset: str, tmp_path: Path
) -> None:
    """``Trainer(config, model=function, task=Task)`` in this process: the CLI run's losses,
    step for step, and its checkpoints."""
    cli = [arg[2:] for arg in user_args(digits_dataset) if arg.startswith("--")]
    names = ("model.name", "model.options", "train.task", "train.task_options", "config")
    overrides = [arg for arg in cli if arg.split("=")[0] not in names]
    config = load(ROOT / "configs" / "demo.toml", [*overrides, f"train.out_dir='{tmp_path}'"])
    summary = Trainer(config, model=functools.partial(digit_net, width=8),
                      task=smoothed_classify(smoothing=0.05)).fit()  # fmt: skip
    api = Run(tmp_path, read_metrics(tmp_path))
    assert summary["steps"] == STEPS
    assert api.losses() == runs["single"].losses()
    saved = sorted(p.name for p in api.checkpoints.iterdir())
    assert saved == [f"step-{INTERVAL:08d}", f"step-{STEPS:08d}"]


@pytest.mark.timeout(600)
@pytest.mark.skipif(not HAS_TENSORBOARD, reason="tensorboard is not installed (extra: tensorboard)")
def test_tensorboard_holds_the_metrics_jsonl_scalars(runs: dict[str, Run]) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = runs["single"]
    board = EventAccumulator(str(run.out_dir / "tensorboard"))
    board.Reload()
    for field in ("loss", "lr", "train_accuracy", "stall_fraction", "step_s"):
        events = board.Scalars(f"step/{field}")
        assert [e.step for e in events] == list(range(1, STEPS + 1)), field
        want = [r[field] for r in run.events("step")]
        np.testing.assert_allclose([e.value for e in events], want, rtol=1e-6, err_msg=field)


GPT2 = [
    "--model.name=tests.training.user_models:gpt2", f"--model.gpt.vocab_size={VOCAB}",
    f"--model.gpt.seq_len={SEQ_LEN}", "--model.options={dim = 32, layers = 2, heads = 4}",
    "--data.label_field=", "--data.shuffle_window=2", "--data.global_batch=16",
    "--train.max_steps=4", "--optim.lr=0.01", "--train.progress=false",
]  # fmt: skip


@pytest.mark.timeout(600)
@pytest.mark.skipif(not HAS_TRANSFORMERS, reason="transformers is not installed (extra: hf)")
def test_a_hugging_face_gpt2_trains_under_ddp_and_fsdp(
    run_trainer: Any, token_dataset: str, tmp_path: Path
) -> None:
    """model.name = "...:gpt2" (the lm task by the spec), its GPT2Blocks as FSDP units: both
    layouts start from the same weights and compute the same losses, which fall."""
    losses = {}
    for name, extra in (("ddp", []), ("fsdp", ["--parallel.dp_shard=2"])):
        records = run_trainer(tmp_path / name, [*GPT2, f"--data.url={token_dataset}", *extra],
                              nproc=2)  # fmt: skip
        (start,) = [r for r in records if r["event"] == "start"]
        assert start["strategy"] == name
        losses[name] = [r["loss"] for r in records if r["event"] == "step"]
    assert len(losses["ddp"]) == 4 and losses["ddp"][-1] < losses["ddp"][0] - 0.1
    np.testing.assert_allclose(losses["fsdp"], losses["ddp"], rtol=1e-4, atol=1e-5)


@pytest.mark.timeout(600)
def test_the_example_trains_under_ddp_and_fsdp_and_resumes_on_one_rank(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, str(ROOT / "examples" / "your_own_model.py"),
                           str(tmp_path)], cwd=ROOT, env=trainer_env(), capture_output=True,
                          text=True, timeout=500)  # fmt: skip
    assert done.returncode == 0, done.stderr[-8000:]
    assert "ddp: 8 steps" in done.stdout and "fsdp: 4 steps" in done.stdout
    assert "resume: 8 steps" in done.stdout
    assert "the resume started at step 4 on 1 rank" in done.stdout
    records = read_metrics(tmp_path / "fsdp")
    strategies = [(r["world_size"], r["strategy"]) for r in records if r["event"] == "start"]
    assert strategies == [(2, "fsdp"), (1, "none")]
    assert [r["step"] for r in records if r["event"] == "step"] == list(range(1, 9))
    # The README's section "Your own model" runs this file.
    assert "python examples/your_own_model.py" in (ROOT / "README.md").read_text()


@pytest.mark.timeout(600)
def test_activation_checkpointing_and_bf16_train_a_user_module(
    runs: dict[str, Run], digits_dataset: str, tmp_path: Path
) -> None:
    """Checkpointing the module's children recomputes the same losses; bf16 under FSDP2
    (parameters cast by FSDP2, fp32 master weights) learns close to fp32."""
    recompute = user_args(digits_dataset, "--train.activation_checkpointing=true")
    recomputed = train(tmp_path / "recompute", recompute)
    want = runs["single"].losses()
    np.testing.assert_allclose(list(recomputed.losses().values()), list(want.values()),
                               rtol=1e-5)  # fmt: skip
    half = train(tmp_path / "bf16", user_args(digits_dataset, "--parallel.dp_shard=2",
                                             "--train.mixed_precision=bf16"), nproc=2)  # fmt: skip
    got, fp32 = half.losses(), runs["fsdp"].losses()
    assert sorted(got) == list(range(1, STEPS + 1))
    np.testing.assert_allclose(list(got.values()), list(fp32.values()), atol=0.05)


@pytest.mark.timeout(600)
def test_the_trainer_reads_the_loader_it_is_given(digits_dataset: str, tmp_path: Path) -> None:
    """``loader=`` a function (rank, world_size) → Loader is called with this rank's place; a
    Loader built for another place is refused, naming both."""
    from dataflow.pipeline import Loader

    overrides = [f"data.url='{digits_dataset}'", "data.global_batch=32", "train.max_steps=2",
                 "data.decode_backend='cpu'", "train.progress=false",
                 f"train.out_dir='{tmp_path}'", "model.cnn.width=8"]  # fmt: skip
    config = load(ROOT / "configs" / "demo.toml", overrides)
    asked = []

    def loader(rank: int, world_size: int) -> Loader:
        asked.append((rank, world_size))
        return Loader(config.data, config.storage, rank=rank, world_size=world_size)

    assert Trainer(config, loader=loader).fit()["steps"] == 2
    assert asked == [(0, 1)]
    elsewhere = Loader(config.data, config.storage, rank=1, world_size=2)
    try:
        with pytest.raises(ValueError, match=re.escape("the loader given is rank 1 of 2, but")):
            Trainer(config, loader=elsewhere).fit()
    finally:
        elsewhere.close()
