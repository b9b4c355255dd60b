"""The composed loader (``dataflow/pipeline/loader.py``), single process, on small converted
datasets: exact resume (one helper, every stateful setting), determinism, exactly-once
delivery across ranks, the audit log and batch content.

Several "ranks" run as separate ``Loader`` objects in one process: a rank's batches depend only
on (config, rank, world size), so this checks the same partition that N processes would get.
"""

from __future__ import annotations

import collections
from pathlib import Path

import pytest
import torch

from dataflow.errors import DataError
from dataflow.index import DatasetIndex
from dataflow.pipeline import Loader

from .loader_support import (
    SIZE,
    CorruptDataset,
    all_keys,
    assert_resumes_exactly,
    assert_same_batches,
    make,
    one_epoch,
    take,
    valid_keys,
)


def test_resume_is_exact_mid_epoch(digits: str) -> None:
    # 28 batches per epoch; resume at the start, after one batch and inside later blocks.
    assert_resumes_exactly(lambda: make(digits), midpoints=[0, 1, 7, 20], n_next=4)


def test_resume_is_exact_across_the_epoch_boundary(digits: str) -> None:
    steps = len(make(digits))
    assert steps == 1797 // 64
    # Saved just before, exactly at and just after the end of epoch 0.
    assert_resumes_exactly(lambda: make(digits), midpoints=[steps - 1, steps, steps + 1], n_next=3)
    loader = make(digits)
    take(loader, steps)
    state = loader.state_dict()
    loader.close()
    assert (state["epoch"], state["step"]) == (0, steps)
    resumed = make(digits)
    resumed.load_state_dict(state)
    take(resumed, 1)
    assert (resumed.epoch, resumed.step) == (1, 1)  # the next iteration started epoch 1
    resumed.close()


def test_resume_is_exact_with_padding(digits: str) -> None:
    # 1797 = 17 × 100 + 97: the last batch of each epoch holds 3 padding samples.
    def make_loader() -> Loader:
        return make(digits, global_batch=100, drop_last=False)

    assert len(make_loader()) == 18
    assert_resumes_exactly(make_loader, midpoints=[0, 16, 17, 18], n_next=2)


def test_resume_is_exact_at_another_rank_count(digits: str) -> None:
    """A state saved by rank 0 of 2 restores rank 1 of 2 to the same step."""
    reference = take(make(digits, rank=1, world_size=2), 6)
    first = make(digits, rank=0, world_size=2)
    take(first, 3)
    state = first.state_dict()
    first.close()
    resumed = make(digits, rank=1, world_size=2)
    resumed.load_state_dict(state)
    assert_same_batches(take(resumed, 3), reference[3:], "rank 1 resumed from rank 0's state")
    resumed.close()


def test_resume_is_exact_while_skipping_a_bad_sample(corrupt_photos: CorruptDataset) -> None:
    # 60 samples, 5 batches of 12 per epoch: midpoints around the victim, and into epoch 1.
    assert_resumes_exactly(
        lambda: make(corrupt_photos.url, global_batch=12, on_bad_sample="skip"),
        midpoints=[0, 1, 2, 3, 4, 5, 6],
        n_next=3,
    )


def test_resume_refuses_another_seed_or_batch(digits: str) -> None:
    loader = make(digits)
    take(loader, 2)
    state = loader.state_dict()
    loader.close()
    with pytest.raises(ValueError, match="seed"):
        make(digits, seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match="global_batch"):
        make(digits, global_batch=32).load_state_dict(state)
    with pytest.raises(ValueError, match="lacks"):
        make(digits).load_state_dict({"epoch": 0})


# ---------------------------------------------------------------------------------------------
# Determinism


def test_same_config_gives_identical_batches(digits: str) -> None:
    first, second = one_epoch(make(digits)), one_epoch(make(digits))
    assert len(first) == 28
    assert_same_batches(first, second, "second loader")


def test_another_seed_gives_another_order(digits: str) -> None:
    first = one_epoch(make(digits, global_batch=256, drop_last=False))
    other = one_epoch(make(digits, global_batch=256, drop_last=False, seed=1))
    assert [b.keys for b in first] != [b.keys for b in other]
    assert sorted(valid_keys(first)) == sorted(valid_keys(other))


def test_set_epoch_changes_the_order_reproducibly(digits: str) -> None:
    uninterrupted = take(make(digits), 2 * 28)  # epoch 0, then epoch 1 on its own
    epoch_zero, epoch_one = uninterrupted[:28], uninterrupted[28:]
    loader = make(digits)
    loader.set_epoch(1)
    chosen = one_epoch(loader)
    assert [b.keys for b in chosen] != [b.keys for b in epoch_zero]
    assert_same_batches(chosen, epoch_one, "set_epoch(1)")
    again = make(digits)
    again.set_epoch(1)
    assert_same_batches(one_epoch(again), chosen, "set_epoch(1) again")
    loader.set_epoch(0)
    assert_same_batches(one_epoch(loader), epoch_zero, "back to epoch 0")


# ---------------------------------------------------------------------------------------------
# Exactly once


def test_an_epoch_delivers_every_sample_once_with_padding(digits: str) -> None:
    batches = one_epoch(make(digits, global_batch=64, drop_last=False))  # 1797 = 28 × 64 + 5
    assert len(batches) == 29
    assert all(len(b.keys) == 64 for b in batches)
    assert int(batches[-1].valid.sum()) == 5
    assert collections.Counter(valid_keys(batches)) == collections.Counter(all_keys(digits))
    assert len(set(all_keys(digits))) == 1797


@pytest.mark.parametrize("world_size", [2, 4])
def test_ranks_share_an_epoch_exactly_once(digits: str, world_size: int) -> None:
    single = one_epoch(make(digits, global_batch=64, drop_last=False))
    per_rank = [
        one_epoch(make(digits, global_batch=64, drop_last=False, rank=r, world_size=world_size))
        for r in range(world_size)
    ]
    assert {len(batches) for batches in per_rank} == {len(single)}  # same number of steps
    union = [k for batches in per_rank for k in valid_keys(batches)]
    assert collections.Counter(union) == collections.Counter(all_keys(digits))
    for step, whole in enumerate(single):
        # The ranks' slices of a step, side by side, are the single-process batch.
        assert [k for batches in per_rank for k in batches[step].keys] == whole.keys
        assert torch.equal(torch.cat([batches[step].images for batches in per_rank]), whole.images)


@pytest.mark.parametrize("drop_last", [True, False])
def test_uneven_shards_give_every_rank_the_same_number_of_batches(
    photos: str, drop_last: bool
) -> None:
    sizes = [s.samples for s in DatasetIndex.load(photos).shards]
    assert len(set(sizes)) > 1 and sum(sizes) == 60  # 7s and 6s
    per_rank = [
        one_epoch(make(photos, global_batch=8, drop_last=drop_last, rank=r, world_size=2))
        for r in range(2)
    ]
    expected = 60 // 8 if drop_last else -(-60 // 8)
    assert [len(b) for b in per_rank] == [expected, expected]
    assert all(len(batch.keys) == 4 for batches in per_rank for batch in batches)
    union = [k for batches in per_rank for k in valid_keys(batches)]
    assert len(union) == len(set(union)) == (56 if drop_last else 60)
    assert set(union) <= set(all_keys(photos))


# ---------------------------------------------------------------------------------------------
# Audit log


def read_audit(out_dir: Path, rank: int = 0) -> list[tuple[int, int, str]]:
    lines = (out_dir / "audit" / f"rank-{rank}.tsv").read_text().splitlines()
    return [(int(e), int(s), k) for e, s, k in (line.split("\t") for line in lines)]


def test_audit_lists_every_delivered_key_once(digits: str, tmp_path: Path) -> None:
    loader = make(digits, drop_last=False, audit=True, out_dir=str(tmp_path))
    batches = one_epoch(loader)
    audit = read_audit(tmp_path)
    assert [k for _, _, k in audit] == valid_keys(batches)  # padding is not audited
    assert collections.Counter(k for _, _, k in audit) == collections.Counter(all_keys(digits))
    for number, batch in enumerate(batches):
        assert {s for _, s, k in audit if k in set(valid_keys([batch]))} == {number}
    assert {e for e, _, _ in audit} == {0}


def test_audit_after_a_resume_has_each_key_once(digits: str, tmp_path: Path) -> None:
    def make_loader() -> Loader:
        return make(digits, audit=True, out_dir=str(tmp_path))

    first = make_loader()
    take(first, 5)
    state = first.state_dict()  # completes step 4 in the log
    take(first, 6)  # steps 5..10 happen, then the "crash"
    first.state_dict()
    first.close()
    assert max(s for _, s, _ in read_audit(tmp_path)) == 10
    resumed = make_loader()
    resumed.load_state_dict(state)
    assert max(s for _, s, _ in read_audit(tmp_path)) == 4  # lines from step 5 on are gone
    rest = one_epoch(resumed)
    audit = read_audit(tmp_path)
    delivered = [k for _, _, k in audit]
    assert len(delivered) == len(set(delivered)) == 28 * 64
    assert delivered[5 * 64 :] == [k for b in rest for k in b.keys]
    assert [s for _, s, _ in audit] == sorted(s for _, s, _ in audit)


def test_audit_keeps_the_last_batch_before_a_break(digits: str, tmp_path: Path) -> None:
    """Breaking out of the loop and saving: the checkpoint says 3 steps are done, so the
    audit must list those 3 steps (the log and the checkpoint agree)."""
    loader = make(digits, audit=True, out_dir=str(tmp_path))
    seen = take(loader, 3)
    state = loader.state_dict()
    assert state["step"] == 3
    assert [k for _, _, k in read_audit(tmp_path)] == [k for b in seen for k in b.keys]
    seen += one_epoch(loader)  # the rest of the epoch, in a new iteration
    assert [k for _, _, k in read_audit(tmp_path)] == [k for b in seen for k in b.keys]


# ---------------------------------------------------------------------------------------------
# Batch content and metrics


def test_batches_have_the_documented_types_and_labels(digits: str) -> None:
    loader = make(digits, global_batch=64)
    classes = DatasetIndex.load(digits).metadata["classes"]
    batches = [batch for _, batch in zip(range(3), loader, strict=False)]
    for batch in batches:
        assert batch["image"].dtype == torch.uint8 and batch["image"].shape == (64, SIZE, SIZE, 3)
        assert batch["label"].dtype == torch.int64 and batch["label"].shape == (64,)
        assert batch["__valid__"].dtype == torch.bool and bool(batch["__valid__"].all())
        expected = [classes.index(key.split("/")[0]) for key in batch["__key__"]]
        assert batch["label"].tolist() == expected
        assert int(batch["image"].max()) > 0  # not an untouched buffer of zeros
    metrics = loader.metrics()
    assert {"fetch", "decode", "batch"} <= set(metrics["stages"])
    assert isinstance(metrics["bottleneck"], str) and metrics["bottleneck"]
    assert metrics["samples_per_s"] > 0 and metrics["batches"] == 3
    assert metrics["stages"]["decode"]["items"] >= 3 * 64
    loader.close()


def test_eval_transform_does_not_depend_on_the_seed(photos: str) -> None:
    def images(seed: int, pipeline: str) -> dict[str, torch.Tensor]:
        loader = make(photos, global_batch=12, seed=seed, image_pipeline=pipeline, shuffle=False)
        return {k: img for b in one_epoch(loader) for k, img in zip(b.keys, b.images, strict=True)}

    first, second = images(0, "eval"), images(1, "eval")
    assert first.keys() == second.keys() and len(first) == 60
    assert all(torch.equal(first[k], second[k]) for k in first)
    trained = images(0, "train")
    assert sum(not torch.equal(trained[k], first[k]) for k in first) > 50
    repeated = images(0, "train")  # training crops: random, yet reproducible
    assert all(torch.equal(trained[k], repeated[k]) for k in trained)


def test_a_sample_gets_the_same_crop_on_every_rank_count(digits: str) -> None:
    """The crop is seeded by (seed, epoch, sample id): which rank decodes it is irrelevant."""
    single = {k: i for b in one_epoch(make(digits)) for k, i in zip(b.keys, b.images, strict=True)}
    rank1 = one_epoch(make(digits, rank=1, world_size=4))
    for batch in rank1:
        for key, image in zip(batch.keys, batch.images, strict=True):
            assert torch.equal(image, single[key]), key


def test_a_dataset_smaller_than_one_global_batch_is_refused(photos: str) -> None:
    """60 samples, global batch 64, drop_last: every epoch would be empty, and a loop that
    waits for a batch (tools/tune_io.py, bench_io.py) would wait forever."""
    with pytest.raises(DataError) as caught:
        make(photos, global_batch=64)
    message = str(caught.value)
    assert "data.global_batch" in message and "64" in message and "60 samples" in message
    assert "data.drop_last" in message  # says what to do next
    # Without drop_last the one short batch is padded, as documented.
    loader = make(photos, global_batch=64, drop_last=False)
    [batch] = one_epoch(loader)
    assert len(batch.keys) == 64 and int(batch.valid.sum()) == 60
