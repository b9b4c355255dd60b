"""The mix of several datasets (``dataflow/mix.py``): pure functions, so every property is
checked exhaustively on small shard layouts, against brute force where there is one."""

from __future__ import annotations

from collections import Counter
from fractions import Fraction

import numpy as np
import pytest

from dataflow.mix import MixLayout, MixOrder, apportion
from dataflow.order import EpochOrder

# Unequal shard sizes on purpose; the third source is small, so it wraps inside a mix epoch.
LARGE = [7, 5, 9, 6, 8, 3, 10, 4]  # 52
MEDIUM = [6, 6, 5, 7]  # 24
SMALL = [3, 4]  # 7
SOURCES = [LARGE, MEDIUM, SMALL]
WEIGHTS = [0.5, 0.2, 0.3]  # L = 83: SMALL holds 25 positions, more than 3 of its epochs


def mix_order(epoch: int, *, block: int = 8, window: int = 2, seed: int = 3,
              shuffle: bool = True) -> MixOrder:  # fmt: skip
    return MixOrder(MixLayout(SOURCES, WEIGHTS), seed=seed, epoch=epoch, window=window,
                    block=block, shuffle=shuffle)  # fmt: skip


def delivered(order: MixOrder) -> list[tuple[int, int, int]]:
    """(source, source epoch, sample within the source) of every position, in order."""
    ids = order.take(0, order.total)
    sources = order.layout.source_of_ids(ids)
    out = []
    for sample_id, source in zip(ids.tolist(), sources.tolist(), strict=True):
        span = order.layout.spans[source]
        wrap, local = divmod(sample_id - span.id_base, span.samples)
        out.append((source, order.first_epochs[source] + wrap, local))
    return out


# ---------------------------------------------------------------------------------------------
# Counts


@pytest.mark.parametrize("total", [1, 7, 83, 1000, 10**9 + 7])
def test_apportion_sums_and_stays_within_one_of_each_quota(total: int) -> None:
    weights = [0.5, 0.2, 0.3, 1e-3]
    counts = apportion(weights, total)
    assert int(counts.sum()) == total
    quotas = np.asarray(weights) / sum(weights) * total
    assert np.all(np.abs(counts - quotas) < 1)


def test_each_epoch_holds_each_source_exactly_its_count() -> None:
    """The must-show: the configured weights over an epoch, here to within one sample."""
    layout = MixLayout(SOURCES, WEIGHTS)
    # 83 × (0.5, 0.2, 0.3) = 41.5, 16.6, 24.9: the two left over go to the largest remainders
    assert layout.counts.tolist() == [41, 17, 25]
    for epoch in range(4):
        counts = Counter(source for source, _, _ in delivered(mix_order(epoch)))
        assert [counts[s] for s in range(3)] == layout.counts.tolist()
        shares = np.asarray([counts[s] for s in range(3)]) / layout.total
        assert np.all(np.abs(shares - np.asarray(WEIGHTS)) < 0.02)


def test_merge_positions_are_the_sorted_ideal_times() -> None:
    """The closed form against brute force: items sorted by ((2r + 1) / 2n, source)."""
    layout = MixLayout(SOURCES, WEIGHTS)
    items = sorted(
        (Fraction(2 * rank + 1, 2 * count), source, rank)
        for source, count in enumerate(layout.counts.tolist())
        for rank in range(count)
    )
    for position, (_, source, rank) in enumerate(items):
        assert int(layout.merge_position(source, np.asarray([rank]))[0]) == position
    for position in range(layout.total + 1):
        before = [layout.items_before(s, position) for s in range(3)]
        assert sum(before) == position
        # Low discrepancy: any leading positions hold each source's share to within one.
        quotas = layout.counts / layout.total * position
        assert np.all(np.abs(np.asarray(before) - quotas) <= 1)


@pytest.mark.parametrize("block", [1, 5, 8, 83])
def test_every_block_holds_each_source_within_one_of_its_share(block: int) -> None:
    order = mix_order(1, block=block)
    sources = [source for source, _, _ in delivered(order)]
    for start in range(0, order.total, block):
        counts = Counter(sources[start : start + block])
        for source, count in enumerate(order.layout.counts.tolist()):
            quota = count / order.total * len(sources[start : start + block])
            assert abs(counts[source] - quota) < 2, (start, source)


# ---------------------------------------------------------------------------------------------
# Each source's own epochs


def test_every_sample_of_a_source_once_per_epoch_of_that_source() -> None:
    """Over several mix epochs, each source's deliveries, grouped by source epoch, are a
    permutation of its samples (the last, partial one: without repeats)."""
    per_source_epoch: dict[tuple[int, int], list[int]] = {}
    for epoch in range(5):
        for source, source_epoch, local in delivered(mix_order(epoch)):
            per_source_epoch.setdefault((source, source_epoch), []).append(local)
    layout = MixLayout(SOURCES, WEIGHTS)
    for (source, source_epoch), locals_ in per_source_epoch.items():
        samples = layout.spans[source].samples
        assert len(set(locals_)) == len(locals_), (source, source_epoch)
        assert set(locals_) <= set(range(samples))
        last = (5 * layout.spans[source].count - 1) // samples
        if source_epoch < last:
            assert sorted(locals_) == list(range(samples)), (source, source_epoch)


def test_a_source_walks_its_own_epoch_orders_across_mix_epochs() -> None:
    """Source s's items, in mix order, are its EpochOrder sequence over its own epochs (the
    block shuffle moves which slots a source holds, never the order of its items)."""
    layout = MixLayout(SOURCES, WEIGHTS)
    for source, sizes in enumerate(SOURCES):
        walked: list[int] = []
        for epoch in range(3):
            order = mix_order(epoch)
            walked += [local for s, _, local in delivered(order) if s == source]
        span = layout.spans[source]
        expected: list[int] = []
        for source_epoch in range(-(-len(walked) // span.samples)):
            whole = EpochOrder(sizes, seed=3, epoch=source_epoch, window=2)
            expected += whole.take(0, whole.total).tolist()
        assert walked == expected[: len(walked)]


def test_the_small_source_wraps_inside_a_mix_epoch_with_distinct_ids() -> None:
    """SMALL (7 samples, 25 positions) touches 4 or 5 of its epochs in one mix epoch: each
    delivery has its own id, so crop draws and transform generators differ between them."""
    order = mix_order(0)
    triples = [t for t in delivered(order) if t[0] == 2]
    assert len({source_epoch for _, source_epoch, _ in triples}) == 4  # 25 = 3 × 7 + 4
    ids = order.take(0, order.total)
    assert len(set(ids.tolist())) == order.total


def test_one_source_at_weight_one_is_the_plain_epoch_order() -> None:
    for epoch in range(3):
        mixed = MixOrder(MixLayout([LARGE], [1.0]), seed=4, epoch=epoch, window=3, block=16)
        plain = EpochOrder(LARGE, seed=4, epoch=epoch, window=3)
        np.testing.assert_array_equal(mixed.take(0, mixed.total), plain.take(0, plain.total))
        np.testing.assert_array_equal(mixed.need_order, plain.need_order)


# ---------------------------------------------------------------------------------------------
# Determinism


def test_same_seed_and_epoch_give_the_same_order_and_others_differ() -> None:
    first = mix_order(2).take(0, 83)
    np.testing.assert_array_equal(first, mix_order(2).take(0, 83))
    assert not np.array_equal(first, mix_order(3).take(0, 83))
    assert not np.array_equal(first, mix_order(2, seed=4).take(0, 83))


def test_any_range_of_positions_is_the_same_slice_of_the_whole_epoch() -> None:
    """What a resumed or another-sized world asks for: positions alone decide the ids."""
    whole = mix_order(1).take(0, 83)
    for start, stop in [(0, 1), (5, 17), (40, 83), (79, 91)]:
        fresh = mix_order(1)  # no cache from earlier calls
        np.testing.assert_array_equal(fresh.take(start, stop), np.resize(whole, 91)[start:stop])


# ---------------------------------------------------------------------------------------------
# Ids → shards, and the read-ahead protocol


def test_ids_map_to_the_shard_and_row_that_hold_the_sample() -> None:
    order = mix_order(1)
    ids = order.take(0, order.total)
    reads, rows = order.shard_of(ids)
    sources, shards = order.layout.locate_reads(reads)
    for sample_id, source, shard, row in zip(ids.tolist(), sources.tolist(), shards.tolist(),
                                             rows.tolist(), strict=True):  # fmt: skip
        span = order.layout.spans[source]
        local = (sample_id - span.id_base) % span.samples
        assert span.shard_starts[shard] + row == local
        assert 0 <= row < SOURCES[source][shard]


@pytest.mark.parametrize("block", [1, 4, 8, 32])
@pytest.mark.parametrize("window", [1, 2, 100])
def test_every_read_is_scheduled_before_its_position_and_kept_until_its_last(
    block: int, window: int
) -> None:
    """The SampleOrder contract that _Run._schedule relies on, position by position: the
    read a position needs is among the first needed_count(p) of need_order, and its
    last_position is not before p (so read-ahead neither misses nor drops it early)."""
    for epoch in range(3):
        order = mix_order(epoch, block=block, window=window)
        assert len(set(order.need_order.tolist())) == len(order.need_order)
        reads, _ = order.shard_of(order.take(0, order.total))
        for position, read in enumerate(reads.tolist()):
            assert read in order.need_order[: order.needed_count(position)].tolist()
            assert order.last_position[read] >= position
        # Every read in the plan is made: none is fetched for nothing.
        assert set(order.need_order.tolist()) == set(reads.tolist())


def test_shards_live_at_once_are_bounded_by_the_window_not_the_data() -> None:
    """Reads whose span covers a position: about (window + 1) blocks of shards per source,
    whatever the number of shards."""
    sizes = [[5] * 200, [4] * 150]
    order = MixOrder(MixLayout(sizes, [0.6, 0.4]), seed=0, epoch=1, window=2, block=16)
    first = dict(zip(order.need_order.tolist(), order.first_positions.tolist(), strict=True))
    live = [
        sum(1 for read, start in first.items() if start <= p <= order.last_position[read])
        for p in range(0, order.total, 16)
    ]
    assert max(live) <= 2 * (2 * 2 + 2), max(live)


# ---------------------------------------------------------------------------------------------
# Bad layouts


@pytest.mark.parametrize(
    ("sizes", "weights", "message"),
    [
        ([LARGE, SMALL], [1.0], "one weight per source"),
        ([LARGE, SMALL], [1.0, 0.0], "weight must be > 0"),
        ([LARGE, SMALL], [1.0, float("nan")], "weight must be > 0"),
        ([LARGE, [0, 0]], [1.0, 1.0], "holds no samples"),
        ([LARGE, SMALL], [1.0, 1e-6], "gives it no position"),
    ],
)
def test_bad_layouts_are_refused(
    sizes: list[list[int]], weights: list[float], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        MixLayout(sizes, weights)
