"""Pipeline parallelism of a user's module: ``ModelSpec.pp_cut_points``.

``token_net`` (``user_models``) is no StagedModel: an embedding, a ModuleList of residual
blocks, a norm and a head, whose forward skips what a stage does not hold. Cut at its
spec's points, each stage keeps its units under their own names, the stages run one after
another give the whole model's output, and a bad cut point is one error naming the units.

Through the real entry point, 2 gloo ranks with 1F1B (2 stages) and interleaved 1F1B (4
stages) log the single-process losses, to the tolerance ``test_parallel`` explains (SGD,
so a gradient scaled wrongly shows; measured gap ≤ 1e-6), and the same training accuracy:
with pp > 1 the schedule keeps the outputs, and the loop now reads them per microbatch
through the loss it gives the schedule. A pipelined checkpoint resumes in one process.

Cost: 4 launches, ~40 s on 2 cores.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from trainer.models import ModelSpec
from trainer.parallel.pipeline import cut_module, pipeline_units, split_stage, stage_units

from .conftest import SEQ_LEN, VOCAB
from .test_checkpoint import Run, seed_checkpoint, train
from .user_models import DigitNet, TokenNet

STEPS = 4
RTOL, ATOL = 1e-4, 1e-5
UNITS = ["embed", "layers.0", "layers.1", "layers.2", "layers.3", "norm", "head"]


def token_args(dataset: str, cut_points: list[str], *extra: str) -> list[str]:
    points = ", ".join(f'"{point}"' for point in cut_points)
    return [
        "--model.name=tests.training.user_models:token_net",
        f"--model.options={{vocab_size = {VOCAB}, dim = 32, layers = 4, "
        f"cut_points = [{points}]}}",
        "--train.task=tests.training.user_models:next_token",
        f"--data.url={dataset}", "--data.label_field=", "--data.shuffle_window=2",
        "--data.global_batch=16", "--data.audit=true", f"--train.max_steps={STEPS}",
        "--optim.name=sgd", "--optim.lr=0.05", "--train.progress=false", *extra,
    ]  # fmt: skip


def net() -> TokenNet:
    torch.manual_seed(0)
    return TokenNet(vocab_size=VOCAB, dim=16, layers=4)


def test_stages_keep_their_units_and_together_compute_the_model() -> None:
    model = net()
    assert pipeline_units(model) == UNITS
    cuts = ["layers.1", "layers.3", "head"]
    assert stage_units(model, cuts, 4, described="t") == [
        ["embed", "layers.0"], ["layers.1", "layers.2"], ["layers.3", "norm"], ["head"]
    ]  # fmt: skip
    parts = [split_stage(model, cuts, stage, 4, described="t") for stage in range(4)]
    whole = dict(model.named_parameters())
    seen: list[str] = []
    for part in parts:
        for name, parameter in part.named_parameters():
            assert torch.equal(parameter, whole[name]), name
            seen.append(name)
    assert sorted(seen) == sorted(whole)  # every parameter on exactly one stage
    assert parts[0].head is None and parts[3].embed is None and len(parts[3].layers) == 0
    tokens = torch.randint(0, VOCAB, (3, SEQ_LEN))
    x: torch.Tensor = tokens
    for part in parts:
        x = part(x)
    torch.testing.assert_close(x, model(tokens), rtol=0, atol=0)


def test_a_sequential_is_cut_between_its_items() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    first, second = (
        cut_module(model, units) for units in stage_units(model, ["1"], 2, described="t")
    )
    assert [n for n, _ in second.named_parameters()] == ["2.weight", "2.bias"]
    x = torch.randn(5, 4)
    torch.testing.assert_close(second(first(x)), model(x), rtol=0, atol=0)


@pytest.mark.parametrize(
    ("model", "cuts", "stages", "message"),
    [
        (net, ["layer.2"], 2, r"'layer.2' is no unit; did you mean 'layers.2'\?.*embed, layers.0"),
        (net, ["layers.2", "layers.1"], 3, r"'layers.1' does not come after the previous cut"),
        (net, ["embed"], 2, r"'embed' does not come after the previous cut"),
        (net, ["layers.2"], 4, r"1 cut points make 2 stages; the layout runs 4"),
        (lambda: DigitNet(), ["head"], 2, r"holds parameter 'class_bias' itself"),
        (lambda: DigitNet(), [], 2, r"give ModelSpec.pp_cut_points .*of trunk.0, .*, head\)"),
    ],
    ids=["unknown", "out-of-order", "first-unit", "wrong-count", "root-parameter", "none"],
)
def test_a_bad_cut_is_one_error_naming_the_units(model: Any, cuts: list[str], stages: int,
                                                 message: str) -> None:  # fmt: skip
    with pytest.raises(ValueError, match=message):
        split_stage(model(), cuts, 0, stages, described="model.name = 'x'")


def test_a_spec_keeps_its_cut_points_as_a_tuple() -> None:
    spec = ModelSpec(module=net(), pp_cut_points=["layers.2"])  # type: ignore[arg-type]
    assert spec.pp_cut_points == ("layers.2",)


def step_values(run: Run, name: str) -> list[float]:
    steps = run.events("step")
    assert [r["step"] for r in steps] == list(range(1, STEPS + 1))
    return [r[name] for r in steps]


@pytest.fixture(scope="module")
def reference(token_dataset: str, tmp_path_factory: pytest.TempPathFactory) -> Run:
    out_dir = tmp_path_factory.mktemp("token-net-single")
    return train(out_dir, token_args(token_dataset, ["layers.2"],
                                     "--checkpoint.interval=2"))  # fmt: skip


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    ("cuts", "extra"),
    [
        (["layers.2"], ["--parallel.pp_schedule=1f1b"]),
        (["layers.1", "layers.3", "head"],
         ["--parallel.pp_schedule=interleaved_1f1b", "--parallel.stages_per_rank=2"]),
    ],
    ids=["1f1b", "interleaved"],
)  # fmt: skip
def test_a_pipelined_user_module_trains_like_one_process(
    token_dataset: str, reference: Run, tmp_path: Path, cuts: list[str], extra: list[str]
) -> None:
    run = train(tmp_path, token_args(token_dataset, cuts, "--parallel.pp=2",
                                     "--checkpoint.interval=2", *extra), nproc=2)  # fmt: skip
    start = run.events("start")[0]
    assert (start["world_size"], start["layout"]) == (2, "pp=2")
    np.testing.assert_allclose(step_values(run, "loss"), step_values(reference, "loss"),
                               rtol=RTOL, atol=ATOL)  # fmt: skip
    # The same argmax hits over the step's 16 × 32 targets (one flip allowed for ties).
    accuracy = step_values(run, "train_accuracy")
    np.testing.assert_allclose(accuracy, step_values(reference, "train_accuracy"),
                               rtol=0, atol=1.01 / (16 * SEQ_LEN))  # fmt: skip
    assert max(accuracy) > 0
    if extra[0].endswith("=1f1b"):
        resumed_dir = tmp_path / "resumed"
        seed_checkpoint(run.checkpoints / f"step-{2:08d}", resumed_dir)
        resumed = train(resumed_dir, token_args(token_dataset, cuts))
        assert resumed.events("start")[-1]["step"] == 2
        got = resumed.losses()
        want = reference.losses()
        np.testing.assert_allclose([got[s] for s in (3, 4)], [want[s] for s in (3, 4)],
                                   rtol=RTOL, atol=ATOL)  # fmt: skip
