"""The epoch order and each rank's slice of it (``dataflow/order.py``): pure functions, so
every property is checked exhaustively on small shard layouts."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from dataflow.order import EpochOrder, num_batches, rank_batch, samples_due, shuffle_quality

# Unequal shard sizes on purpose: block boundaries then fall at irregular positions.
SIZES = [7, 5, 9, 6, 8, 3, 10, 4]
TOTAL = sum(SIZES)  # 52


def full_order(order: EpochOrder) -> np.ndarray:
    return order.take(0, order.total)


def shard_ranges(sizes: list[int]) -> list[range]:
    starts = np.concatenate([[0], np.cumsum(sizes)])
    return [range(int(a), int(b)) for a, b in itertools.pairwise(starts)]


# ---------------------------------------------------------------------------------------------
# EpochOrder


@pytest.mark.parametrize("window", [1, 2, 3, len(SIZES), 100])
@pytest.mark.parametrize("shuffle", [True, False])
def test_positions_are_a_permutation_of_all_samples(window: int, shuffle: bool) -> None:
    order = EpochOrder(SIZES, seed=3, epoch=1, window=window, shuffle=shuffle)
    assert len(order) == TOTAL
    ids = full_order(order)
    assert ids.dtype == np.int64
    assert sorted(ids.tolist()) == list(range(TOTAL))


def test_same_seed_and_epoch_give_the_same_order() -> None:
    first = full_order(EpochOrder(SIZES, seed=5, epoch=2, window=3))
    again = full_order(EpochOrder(SIZES, seed=5, epoch=2, window=3))
    np.testing.assert_array_equal(first, again)


@pytest.mark.parametrize(("seed", "epoch"), [(5, 3), (6, 2), (0, 0)])
def test_another_seed_or_epoch_gives_another_order(seed: int, epoch: int) -> None:
    reference = full_order(EpochOrder(SIZES, seed=5, epoch=2, window=3))
    other = full_order(EpochOrder(SIZES, seed=seed, epoch=epoch, window=3))
    assert not np.array_equal(reference, other)


def test_no_shuffle_is_the_index_order() -> None:
    for window in (1, 3, 100):
        order = EpochOrder(SIZES, seed=9, epoch=4, window=window, shuffle=False)
        np.testing.assert_array_equal(full_order(order), np.arange(TOTAL))


def test_window_one_keeps_each_shard_contiguous() -> None:
    order = EpochOrder(SIZES, seed=1, epoch=0, window=1)
    ids = full_order(order)
    assert len(order.blocks) == len(SIZES)
    ranges = shard_ranges(SIZES)
    position = 0
    for block, shard in zip(order.blocks, order.shard_order, strict=True):
        assert block.tolist() == [shard]  # a block is exactly one shard
        chunk = ids[position : position + SIZES[shard]]
        assert sorted(chunk.tolist()) == list(ranges[shard])
        position += SIZES[shard]
    assert position == TOTAL
    # And it does shuffle: shards come in a permuted order, samples within them too.
    assert order.shard_order.tolist() != list(range(len(SIZES)))
    assert ids.tolist() != sorted(ids.tolist())


def test_a_block_mixes_exactly_its_window_of_shards() -> None:
    order = EpochOrder(SIZES, seed=2, epoch=0, window=3)
    ranges = shard_ranges(SIZES)
    assert [len(b) for b in order.blocks] == [3, 3, 2]
    for number, block in enumerate(order.blocks):
        members = sorted(i for shard in block for i in ranges[int(shard)])
        ids = order.take(int(order.block_starts[number]), int(order.block_starts[number + 1]))
        assert sorted(ids.tolist()) == members


@pytest.mark.parametrize("window", [1, 3])
def test_take_across_block_boundaries_equals_slicing(window: int) -> None:
    order = EpochOrder(SIZES, seed=8, epoch=1, window=window)
    ids = full_order(order)
    # Every (start, stop) pair, including spans covering several blocks, in a fresh order
    # object each time so the block cache cannot hide a wrong computation.
    for start in range(0, TOTAL + 1, 3):
        for stop in range(start, TOTAL + 1, 5):
            fresh = EpochOrder(SIZES, seed=8, epoch=1, window=window)
            np.testing.assert_array_equal(fresh.take(start, stop), ids[start:stop])
    for start in range(TOTAL):  # with a warm cache too (11-wide spans; the last ones wrap)
        expected = ids[np.arange(start, start + 11) % TOTAL]
        np.testing.assert_array_equal(order.take(start, start + 11), expected)


def test_positions_past_the_end_wrap_around() -> None:
    order = EpochOrder(SIZES, seed=4, epoch=0, window=2)
    ids = full_order(order)
    np.testing.assert_array_equal(order.take(TOTAL, TOTAL + 5), ids[:5])
    np.testing.assert_array_equal(order.take(TOTAL - 3, TOTAL + 4), np.r_[ids[-3:], ids[:4]])
    np.testing.assert_array_equal(order.take(2 * TOTAL + 1, 2 * TOTAL + 3), ids[1:3])


def test_shard_of_maps_ids_back_to_shard_and_row() -> None:
    order = EpochOrder(SIZES, seed=0, epoch=0, window=2)
    shards, rows = order.shard_of(np.arange(TOTAL))
    expected = [(s, r) for s, size in enumerate(SIZES) for r in range(size)]
    assert list(zip(shards.tolist(), rows.tolist(), strict=True)) == expected


def test_window_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="got 0"):
        EpochOrder(SIZES, seed=0, epoch=0, window=0)


# ---------------------------------------------------------------------------------------------
# rank_batch


def all_plans(order: EpochOrder, global_batch: int, world_size: int, drop_last: bool):  # type: ignore[no-untyped-def]
    steps = num_batches(order.total, global_batch, drop_last)
    return {
        rank: [
            rank_batch(order, step, global_batch=global_batch, rank=rank, world_size=world_size)
            for step in range(steps)
        ]
        for rank in range(world_size)
    }


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize("drop_last", [True, False])
def test_ranks_cover_the_order_exactly_once(world_size: int, drop_last: bool) -> None:
    global_batch = 12  # divisible by 1, 2, 3 and 4; 52 = 4 × 12 + 4
    order = EpochOrder(SIZES, seed=7, epoch=0, window=3)
    ids = full_order(order)
    plans = all_plans(order, global_batch, world_size, drop_last)
    steps = num_batches(TOTAL, global_batch, drop_last)
    assert steps == (4 if drop_last else 5)
    assert all(len(p) == steps for p in plans.values())  # every rank: same number of batches
    per_rank = global_batch // world_size
    for rank, rank_plans in plans.items():
        for step, plan in enumerate(rank_plans):
            assert plan.step == step
            assert len(plan.samples) == len(plan.valid) == per_rank
            positions = np.arange(per_rank) + step * global_batch + rank * per_rank
            np.testing.assert_array_equal(plan.valid, positions < TOTAL)  # pad: exactly past N
            np.testing.assert_array_equal(plan.samples[plan.valid], ids[positions[plan.valid]])
    # Interleave the ranks' slices step by step: that is the global order, position by position.
    delivered = np.concatenate(
        [plans[r][s].samples[plans[r][s].valid] for s in range(steps) for r in range(world_size)]
    )
    if drop_last:
        np.testing.assert_array_equal(delivered, ids[: steps * global_batch])
        assert TOTAL - len(delivered) < global_batch  # only an incomplete batch is dropped
    else:
        np.testing.assert_array_equal(delivered, ids)  # every sample, exactly once
        padding = np.concatenate([p.samples[~p.valid] for ps in plans.values() for p in ps])
        assert len(padding) == steps * global_batch - TOTAL
        assert set(padding.tolist()) <= set(ids.tolist())


def test_a_global_batch_that_does_not_split_is_refused_with_the_numbers() -> None:
    order = EpochOrder(SIZES, seed=0, epoch=0, window=2)
    with pytest.raises(ValueError, match=r"global batch 10 .* 3 ranks"):
        rank_batch(order, 0, global_batch=10, rank=0, world_size=3)


def test_num_batches() -> None:
    assert num_batches(52, 12, drop_last=True) == 4
    assert num_batches(52, 12, drop_last=False) == 5
    assert num_batches(48, 12, drop_last=False) == num_batches(48, 12, drop_last=True) == 4
    assert num_batches(5, 12, drop_last=True) == 0


# ---------------------------------------------------------------------------------------------
# Elastic resume: batches are positions of the global order, so a run that changes its world
# size mid-epoch (same global batch) still delivers each sample exactly once.


@pytest.mark.parametrize(
    ("before", "after", "global_batch", "switch_at"),
    [(2, 1, 8, 3), (1, 2, 8, 1), (1, 3, 12, 2), (4, 2, 12, 1), (3, 4, 12, 4)],
)
def test_resume_at_another_world_size_delivers_every_sample_once(
    before: int, after: int, global_batch: int, switch_at: int
) -> None:
    order = EpochOrder(SIZES, seed=11, epoch=3, window=2)
    steps = num_batches(TOTAL, global_batch, drop_last=False)
    assert 0 < switch_at < steps
    delivered: list[int] = []
    for step in range(steps):
        world_size = before if step < switch_at else after
        for rank in range(world_size):
            plan = rank_batch(
                order, step, global_batch=global_batch, rank=rank, world_size=world_size
            )
            delivered.extend(plan.samples[plan.valid].tolist())
    assert sorted(delivered) == list(range(TOTAL))
    assert delivered == full_order(order).tolist()  # and in the uninterrupted order


# ---------------------------------------------------------------------------------------------
# shuffle_quality


def test_shuffle_quality_grows_with_the_window() -> None:
    sizes = [100] * 40  # 4,000 samples: a full shuffle puts ~all 40 shards in 256 samples
    local = shuffle_quality(EpochOrder(sizes, seed=0, epoch=0, window=1))
    middle = shuffle_quality(EpochOrder(sizes, seed=0, epoch=0, window=8))
    full = shuffle_quality(EpochOrder(sizes, seed=0, epoch=0, window=len(sizes)))
    assert full["shards_per_batch"] == pytest.approx(1.0)
    assert local["shards_per_batch"] < middle["shards_per_batch"] < full["shards_per_batch"]
    assert local["shards_per_batch"] < 0.2  # 256 consecutive samples span ~3-4 of 40 shards
    assert full["displacement"] == pytest.approx(1.0, abs=0.1)
    ordered = shuffle_quality(EpochOrder(sizes, seed=0, epoch=0, window=1, shuffle=False))
    assert ordered["displacement"] == 0.0


@pytest.mark.parametrize(("total", "global_batch", "world_size", "drop_last"),
                         [(1797, 64, 4, True), (1797, 100, 4, False), (60, 12, 3, False),
                          (10, 8, 2, False)])  # fmt: skip
def test_samples_due_over_all_ranks_are_the_epoch(
    total: int, global_batch: int, world_size: int, drop_last: bool
) -> None:
    """What the skip budget is a fraction of: each rank's real (not padding) positions."""
    steps = num_batches(total, global_batch, drop_last)
    order = EpochOrder([total], seed=0, epoch=0, window=1)
    due = [samples_due(total, global_batch, steps, rank=r, world_size=world_size)
           for r in range(world_size)]  # fmt: skip
    for rank in range(world_size):
        plans = [rank_batch(order, s, global_batch=global_batch, rank=rank,
                            world_size=world_size) for s in range(steps)]  # fmt: skip
        assert due[rank] == sum(int(plan.valid.sum()) for plan in plans)
    assert sum(due) == (steps * global_batch if drop_last else total)
