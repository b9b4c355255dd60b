"""The parallel layout's arithmetic, pipeline cuts, layout-independent init, the learning-rate
schedule and the trainer's config checks, in this process (no launches; ~2 s in all).

Meshes of more than one rank are built on torch's fake process group (a FakeStore, every
collective a no-op): enough to compare ``Layout``'s arithmetic with the coordinates and
groups that ``DeviceMesh`` itself assigns for a 16-rank 4-D layout. Tensor parallelism on a
real group uses 1-rank gloo over a FileStore. Whether the layouts compute the same thing is
``test_parallel.py``'s job.
"""

from __future__ import annotations

import contextlib
import itertools
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor
from torch.testing._internal.distributed.fake_pg import FakeStore

from trainer.config import GPTConfig, OptimConfig, ParallelConfig, load
from trainer.models import GPT, ResNet, StagedModel, init_weights
from trainer.optim import learning_rate
from trainer.parallel.data import apply_activation_checkpointing
from trainer.parallel.mesh import DIMENSIONS, Layout, build_layout, resolve
from trainer.parallel.pipeline import split_blocks, split_model, stage_indices
from trainer.parallel.tensor import apply_tensor_parallel


@contextlib.contextmanager
def fake_process_group(rank: int, world_size: int) -> Iterator[None]:
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.fixture
def gloo_one_rank(tmp_path: Path) -> Iterator[None]:
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def small_gpt() -> GPT:
    return GPT(vocab_size=64, seq_len=8, dim=16, layers=4, heads=2)


def small_resnet() -> ResNet:
    return ResNet(width=8, blocks=[1, 1], num_classes=10)


# ---------------------------------------------------------------------------------------------
# Layout


@pytest.mark.parametrize(
    ("degrees", "world_size", "expected"),
    [
        ({}, 4, (1, 4, 1, 1)),
        ({"pp": 2, "tp": 2}, 8, (2, 2, 1, 2)),
        ({"dp_shard": 2, "tp": 2}, 4, (1, 1, 2, 2)),
        ({"dp_replicate": 2, "dp_shard": 2}, 4, (1, 2, 2, 1)),
        ({}, 1, (1, 1, 1, 1)),
    ],
)
def test_resolve_fills_dp_replicate_with_the_ranks_left(
    degrees: dict[str, Any], world_size: int, expected: tuple[int, int, int, int]
) -> None:
    assert resolve(ParallelConfig(**degrees), world_size) == expected


def test_resolve_names_the_numbers_when_the_world_size_does_not_fit() -> None:
    with pytest.raises(ValueError, match=r"WORLD_SIZE 6 is not divisible by .* = 2 × 1 × 2 = 4"):
        resolve(ParallelConfig(pp=2, tp=2), 6)
    with pytest.raises(ValueError, match=r"2 × 2 × 1 × 2 = 8, but WORLD_SIZE is 4"):
        resolve(ParallelConfig(pp=2, dp_replicate=2, tp=2), 4)


def test_layout_coordinates_of_one_rank_in_a_4d_layout() -> None:
    # 13 = 0b1101 over 2 × 2 × 2 × 2, tp innermost.
    layout = Layout(rank=13, world_size=16, pp=2, dp_replicate=2, dp_shard=2, tp=2)
    assert layout.coordinates == {"pp": 1, "dp_replicate": 1, "dp_shard": 0, "tp": 1}
    assert (layout.pp_rank, layout.dp_rank, layout.tp_rank) == (1, 2, 1)
    assert layout.dp_world == 4
    assert layout.describe() == "pp=2 × dp_replicate=2 × dp_shard=2 × tp=2"


def test_layout_covers_every_coordinate_once() -> None:
    sizes = (2, 1, 3, 2)  # pp, dp_replicate, dp_shard, tp
    seen = []
    for rank in range(12):
        layout = Layout(rank=rank, world_size=12, pp=2, dp_replicate=1, dp_shard=3, tp=2)
        seen.append(tuple(layout.coordinates[name] for name in DIMENSIONS))
        assert layout.dp_rank == layout.coordinates["dp_shard"]
    assert seen == list(itertools.product(*(range(size) for size in sizes)))


def test_layout_agrees_with_the_device_mesh_on_16_ranks() -> None:
    """Coordinates match the mesh's; dp_rank is the position in the data-parallel group (what
    the loader partitions by); tensor- and pipeline-parallel peers share the dp_rank."""
    config = ParallelConfig(pp=2, dp_replicate=2, dp_shard=2, tp=2)
    layouts = {}
    for rank in range(16):
        with fake_process_group(rank, 16):
            layout = build_layout(config, rank=rank, world_size=16, device_type="cpu")
            assert layout.mesh is not None
            coordinate = layout.mesh.get_coordinate()
            assert coordinate is not None
            assert tuple(layout.coordinates[name] for name in DIMENSIONS) == tuple(coordinate)
            data_parallel = layout.submesh("dp_replicate", "dp_shard").mesh.flatten().tolist()
            assert data_parallel.index(rank) == layout.dp_rank
            peers = {name: layout.submesh(name).mesh.tolist() for name in ("pp", "tp", "dp_shard")}
            layouts[rank] = (layout, peers)
    for layout, peers in layouts.values():
        for peer in peers["tp"]:
            other = layouts[peer][0]
            assert (other.dp_rank, other.pp_rank) == (layout.dp_rank, layout.pp_rank)
        for peer in peers["pp"]:
            other = layouts[peer][0]
            assert (other.dp_rank, other.tp_rank) == (layout.dp_rank, layout.tp_rank)
        assert len({layouts[peer][0].dp_rank for peer in peers["dp_shard"]}) == 2


def test_one_process_layout_has_no_mesh() -> None:
    layout = build_layout(ParallelConfig(), rank=0, world_size=1, device_type="cpu")
    assert layout.mesh is None
    assert (layout.dp_rank, layout.dp_world, layout.describe()) == (0, 1, "single process")


# ---------------------------------------------------------------------------------------------
# Pipeline cuts


@pytest.mark.parametrize(
    ("schedule", "pp_rank", "expected"),
    [
        ("interleaved_1f1b", 0, ([0, 2], 4)),
        ("interleaved_1f1b", 1, ([1, 3], 4)),
        ("1f1b", 1, ([1], 2)),
        ("gpipe", 0, ([0], 2)),
    ],
)
def test_stage_indices(schedule: str, pp_rank: int, expected: tuple[list[int], int]) -> None:
    config = ParallelConfig(pp=2, pp_schedule=schedule, stages_per_rank=2)  # type: ignore[arg-type]
    assert stage_indices(config, pp_rank) == expected


def test_stage_indices_interleave_three_stages_per_rank() -> None:
    config = ParallelConfig(pp=2, pp_schedule="interleaved_1f1b", stages_per_rank=3)
    assert stage_indices(config, 1) == ([1, 3, 5], 6)


def test_split_blocks_into_contiguous_near_equal_runs() -> None:
    names = [str(i) for i in range(5)]
    assert split_blocks(names, 2) == [["0", "1", "2"], ["3", "4"]]
    assert split_blocks(names, 3) == [["0", "1"], ["2", "3"], ["4"]]
    assert split_blocks(names, 5) == [[name] for name in names]
    with pytest.raises(ValueError, match=re.escape("5 blocks, too few for 6 pipeline stages")):
        split_blocks(names, 6)


@pytest.mark.parametrize("stages", [2, 4])
def test_split_model_keeps_names_and_puts_input_and_output_at_the_ends(stages: int) -> None:
    with torch.device("meta"):
        whole = small_gpt()
    parts = [split_model(whole, stage, stages) for stage in range(stages)]
    assert [part.input_layer is not None for part in parts] == [True] + [False] * (stages - 1)
    assert [part.output_layer is not None for part in parts] == [False] * (stages - 1) + [True]
    assert [list(part.blocks) for part in parts] == split_blocks(list(whole.blocks), stages)
    names = [name for part in parts for name, _ in part.named_parameters()]
    assert sorted(names) == sorted(name for name, _ in whole.named_parameters())
    assert len(whole.blocks) == 4  # the cut copies; the whole model is untouched


def test_split_model_refuses_more_stages_than_blocks() -> None:
    with torch.device("meta"):
        whole = small_resnet()  # 2 blocks
    with pytest.raises(ValueError, match=re.escape("2 blocks, too few for 3 pipeline stages")):
        split_model(whole, 0, 3)


# ---------------------------------------------------------------------------------------------
# Weight init


def parameters(*models: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach() for model in models for name, p in model.named_parameters()}


@pytest.mark.parametrize("build", [small_gpt, small_resnet], ids=["gpt", "resnet"])
def test_init_weights_are_the_same_whole_and_cut_into_stages(
    build: Callable[[], StagedModel],
) -> None:
    whole = build()
    init_weights(whole, seed=3)
    expected = parameters(whole)
    with torch.device("meta"):
        template = build()
    stages = len(template.blocks)
    parts = [split_model(template, stage, stages) for stage in range(stages)]
    for part in parts:
        part.to_empty(device="cpu")
        init_weights(part, seed=3)
    cut = parameters(*parts)
    assert sorted(cut) == sorted(expected)
    for name, value in expected.items():
        assert torch.equal(cut[name], value), name


def test_init_weights_ignore_wrapper_prefixes_and_follow_the_seed() -> None:
    plain, wrapped, other_seed = small_gpt(), small_gpt(), small_gpt()
    apply_activation_checkpointing(wrapped)
    init_weights(plain, seed=0)
    init_weights(wrapped, seed=0)
    init_weights(other_seed, seed=1)
    first = parameters(plain)
    assert "blocks.0._checkpoint_wrapped_module.attention.wq.weight" in parameters(wrapped)
    for name, value in parameters(wrapped).items():
        assert torch.equal(value, first[name.replace("_checkpoint_wrapped_module.", "")]), name
    again = parameters(other_seed)
    assert not torch.equal(
        again["blocks.0.attention.wq.weight"], first["blocks.0.attention.wq.weight"]
    )
    # Each parameter draws from its own name's stream, so same-shaped layers differ.
    assert not torch.equal(
        first["blocks.0.attention.wq.weight"], first["blocks.1.attention.wq.weight"]
    )
    assert not torch.equal(
        first["blocks.0.attention.wq.weight"], first["blocks.0.attention.wk.weight"]
    )


# ---------------------------------------------------------------------------------------------
# Tensor parallelism


def test_tensor_parallel_refuses_a_model_without_a_plan_and_indivisible_heads() -> None:
    with fake_process_group(0, 2):
        mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("tp",))
        with pytest.raises(
            ValueError, match=re.escape("ResNet has no tensor-parallel plan; use parallel.tp = 1")
        ):
            apply_tensor_parallel(small_resnet(), mesh=mesh, heads=1)
        gpt = GPT(vocab_size=64, seq_len=8, dim=24, layers=2, heads=3)
        with pytest.raises(
            ValueError,
            match=re.escape("the model's 3 attention heads are not divisible by parallel.tp 2"),
        ):
            apply_tensor_parallel(gpt, mesh=mesh, heads=3)


def test_tensor_parallel_plan_on_one_gloo_rank_computes_the_same(gloo_one_rank: None) -> None:
    """The plan's names exist in every block, and a DTensor-split GPT (initialised through
    its DTensor parameters) gives the plain model's logits."""
    plain, split = small_gpt(), small_gpt()
    mesh = init_device_mesh("cpu", (1,), mesh_dim_names=("tp",))
    apply_tensor_parallel(split, mesh=mesh, heads=2)
    init_weights(plain, seed=5)
    init_weights(split, seed=5)
    planned = {f"blocks.{b}.{name}.weight" for b in split.blocks for name in GPT.TP_PLAN}
    assert {n for n, p in split.named_parameters() if isinstance(p, DTensor)} == planned
    tokens = torch.randint(0, 64, (3, 8), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(split(tokens), plain(tokens))


# ---------------------------------------------------------------------------------------------
# Learning rate


def test_learning_rate_warms_up_then_decays_along_a_cosine_to_the_floor() -> None:
    config = OptimConfig(lr=1.0, warmup_steps=4, schedule="cosine", min_lr_ratio=0.1)
    total = 13  # steps 4..12 decay: 8 intervals, so step 8 is halfway
    rates = [learning_rate(config, step, total) for step in range(total)]
    assert rates[:5] == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0])
    assert rates[8] == pytest.approx(0.1 + 0.9 * 0.5)
    assert rates[-1] == pytest.approx(0.1)  # the last step gets the floor
    assert all(a >= b for a, b in itertools.pairwise(rates[3:]))


def test_learning_rate_without_warmup_starts_at_the_peak() -> None:
    config = OptimConfig(lr=0.5, warmup_steps=0, schedule="cosine", min_lr_ratio=0.0)
    assert learning_rate(config, 0, 5) == pytest.approx(0.5)
    assert learning_rate(config, 4, 5) == pytest.approx(0.0, abs=1e-12)
    assert learning_rate(config, 0, 1) == pytest.approx(0.5)  # one step: the peak, no division


def test_constant_learning_rate_after_warmup() -> None:
    config = OptimConfig(lr=0.2, warmup_steps=2, schedule="constant")
    rates = [learning_rate(config, step, 10) for step in range(10)]
    assert rates == pytest.approx([0.1] + [0.2] * 9)


# ---------------------------------------------------------------------------------------------
# Config checks


def test_trainer_configs_reject_bad_values_naming_them() -> None:
    with pytest.raises(ValueError, match=re.escape("model.gpt.dim 30 is not divisible by heads 4")):
        GPTConfig(dim=30, heads=4)
    with pytest.raises(
        ValueError, match=re.escape("parallel.dp_replicate must be >= 1 or -1, got 0")
    ):
        ParallelConfig(dp_replicate=0)
    with pytest.raises(ValueError, match=re.escape("parallel.tp must be >= 1, got 0")):
        ParallelConfig(tp=0)
    with pytest.raises(
        ValueError, match=r"\[parallel\] parallel.dp_replicate must be >= 1 or -1, got -2"
    ):
        load(None, ["parallel.dp_replicate=-2"])


def test_unknown_parallel_key_names_the_closest_one(tmp_path: Path) -> None:
    path = tmp_path / "typo.toml"
    path.write_text("[parallel]\ndp_shards = 2\n")
    with pytest.raises(
        ValueError, match=r"unknown key 'dp_shards' in \[parallel\]; did you mean 'dp_shard'"
    ):
        load(path)
