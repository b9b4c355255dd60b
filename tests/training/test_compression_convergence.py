"""The convergence fixes of the compressors, each shown on what it does, on a 1-rank gloo group
(the averaging of several ranks is test_compression.py's): bf16 warm-up steps, small tensors
and embedding tables sent exactly, a collapsed warm-start Q drawn afresh."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from trainer.compression import ErrorFeedback, PowerSGD, Sign, TopK, tile


@pytest.fixture
def one_rank(tmp_path: Path) -> Iterator[dist.ProcessGroup]:
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


def average(
    compressor: ErrorFeedback, group: dist.ProcessGroup, flat: torch.Tensor, segments: tuple
) -> torch.Tensor:
    return compressor.compress(group, flat.clone(), segments).wait()


SHAPES = [("blocks.0.weight", (256, 128)), ("blocks.0.norm.weight", (128,)),
          ("blocks.0.bias", (128,))]  # fmt: skip


@pytest.mark.parametrize(
    "make", [lambda: TopK(0.01, start_step=0), lambda: Sign(start_step=0)], ids=["topk", "sign"]
)
def test_vectors_travel_exactly(
    one_rank: dist.ProcessGroup, make: Callable[[], ErrorFeedback]
) -> None:
    """Biases and norm gains arrive exact on the first compressed step and keep no residual;
    only the 256×128 matrix is compressed and owes the rest."""
    segments = tile(SHAPES)
    flat = torch.randn(segments[-1].end, generator=torch.Generator().manual_seed(0))
    compressor = make()
    got = average(compressor, one_rank, flat, segments)
    matrix, *small = segments
    for segment in small:
        assert torch.equal(got[segment.offset : segment.end], flat[segment.offset : segment.end])
    assert set(compressor.residuals) == {matrix.name}
    sent, dense = compressor.take_bytes()
    exact_bytes = 4 * sum(segment.numel for segment in small)
    compressed_bytes = sent - exact_bytes
    # top-k 1 %: 327 values + 327 indices; sign: 32,768 bits + 32 block scales
    assert compressed_bytes == (327 * 8 if isinstance(compressor, TopK) else 4096 + 32 * 4)
    assert dense == 4 * flat.numel()
    # The matrix part plus its residual is the gradient: nothing is lost, only delayed.
    assert torch.allclose(got[: matrix.end] + compressor.residuals[matrix.name],
                          flat[: matrix.end], atol=1e-6)  # fmt: skip


def test_powersgd_sends_vectors_exactly(one_rank: dist.ProcessGroup) -> None:
    segments = tile(SHAPES)
    flat = torch.randn(segments[-1].end, generator=torch.Generator().manual_seed(1))
    compressor = PowerSGD(rank=4, start_step=0, warm_start=True)
    got = average(compressor, one_rank, flat, segments)
    for segment in segments[1:]:
        assert torch.equal(got[segment.offset : segment.end], flat[segment.offset : segment.end])
    assert set(compressor.qs) == {segments[0].name}


def test_powersgd_warm_start_recovers_after_a_step_without_gradient(
    one_rank: dist.ProcessGroup,
) -> None:
    """A step where a matrix gets no gradient (a branch not taken, a frozen layer) leaves the
    warm-start Q̄ = Mᵀ·P̂ all zeros. Used as it was, the next P = M·Q̄ is zero and P̂ an
    arbitrary basis: that step's update missed 99.4 % of a rank-4 gradient (measured before
    this fix). Drawn afresh instead, Q spans enough again and the step is exact (3e-5: fp32)."""
    generator = torch.Generator().manual_seed(0)
    rows, columns = 256, 96
    left = torch.randn(rows, 4, generator=generator)
    low_rank = left @ torch.randn(4, columns, generator=generator)
    segments = tile([("w", (rows, columns))])
    compressor = PowerSGD(rank=4, start_step=0, warm_start=True)
    assert torch.equal(average(compressor, one_rank, torch.zeros(rows * columns), segments),
                       torch.zeros(rows * columns))  # fmt: skip
    assert torch.count_nonzero(compressor.qs["w"]) == 0
    compressor.step_done()
    got = average(compressor, one_rank, low_rank.reshape(-1), segments).view(rows, columns)
    assert float((got - low_rank).norm() / low_rank.norm()) < 1e-4


def test_powersgd_sends_embedding_tables_exactly(one_rank: dist.ProcessGroup) -> None:
    """A table's gradient has unrelated rows, one per token of the batch: rank 4 would carry
    a few tokens a step. The table goes exact; a linear layer of the same shape is compressed."""
    model = torch.nn.Sequential(torch.nn.Embedding(512, 64), torch.nn.Linear(64, 512))
    compressor = PowerSGD(rank=4, start_step=0, warm_start=True)
    compressor.name_parameters(model)
    assert compressor.tables == {"0.weight"}
    segments = tile([(name, tuple(p.shape)) for name, p in model.named_parameters()])
    flat = torch.randn(segments[-1].end, generator=torch.Generator().manual_seed(2))
    got = average(compressor, one_rank, flat, segments)
    table, linear = segments[0], segments[1]
    assert torch.equal(got[table.offset : table.end], flat[table.offset : table.end])
    assert not torch.allclose(got[linear.offset : linear.end], flat[linear.offset : linear.end])
    assert set(compressor.qs) == {"1.weight"}


def test_warm_up_steps_send_every_entry_in_bf16(one_rank: dist.ProcessGroup) -> None:
    """The first start_step steps average everything, rounded to bf16 (half fp32's bytes),
    and leave no residual; the step after is compressed."""
    segments = tile(SHAPES)
    flat = torch.randn(segments[-1].end, generator=torch.Generator().manual_seed(3))
    compressor = TopK(0.01, start_step=1)
    got = compressor.average(one_rank, flat.clone(), segments).wait()
    assert torch.equal(got, flat.to(torch.bfloat16).float())
    assert compressor.take_bytes() == (2 * flat.numel(), 4 * flat.numel())
    assert compressor.residuals == {}
    compressor.step_done()
    compressor.average(one_rank, flat.clone(), segments).wait()
    sent, dense = compressor.take_bytes()
    assert sent < dense / 20
