"""The composed loader (``dataflow/pipeline/loader.py``), single process, on small converted
datasets: exact resume (one helper, every stateful setting), determinism, exactly-once
delivery across ranks, the bad-sample policy, damaged shards, the audit log, batch content,
config errors and clean shutdown.

Several "ranks" run as separate ``Loader`` objects in one process: a rank's batches depend only
on (config, rank, world size), so this checks the same partition that N processes would get.
"""

from __future__ import annotations

import collections
import json
import shutil
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from dataflow.convert.config import ConvertConfig
from dataflow.convert.job import convert
from dataflow.errors import BadSampleError, DataError
from dataflow.formats.codec import decode_image
from dataflow.index import DatasetIndex, load_table
from dataflow.pipeline import DataConfig, Loader

SIZE = 32  # small images keep each test well under a second of decoding


# ---------------------------------------------------------------------------------------------
# Datasets (converted once per module; tests that damage data get their own copy)


def convert_folder(source: Path, output: Path, **options: Any) -> str:
    config = ConvertConfig(input=str(source), output=str(output), workers=1, **options)
    convert(config, progress=False)
    return str(output)


def all_keys(url: str) -> list[str]:
    index = DatasetIndex.load(url)
    return [key for shard in index.shards for key in load_table(url, index, shard).keys]


@pytest.fixture(scope="module")
def digits(digits_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    """1,797 PNG digits in 18 shards of 99-100."""
    return convert_folder(
        digits_folder, tmp_path_factory.mktemp("digits-data") / "ds", max_shard_samples=100
    )


@pytest.fixture(scope="module")
def photos(photo_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    """60 JPEG photos in 9 shards of 6 or 7: shard sizes differ."""
    return convert_folder(
        photo_folder, tmp_path_factory.mktemp("photo-data") / "ds", max_shard_samples=7
    )


def flip_bytes(data: bytes, start: int, count: int) -> bytes:
    damaged = bytearray(data)
    damaged[start : start + count] = bytes(b ^ 0xFF for b in damaged[start : start + count])
    return bytes(damaged)


@dataclass(frozen=True)
class CorruptDataset:
    url: str
    victim: str
    """Key of the one sample whose JPEG does not decode."""


@pytest.fixture(scope="module")
def corrupt_photos(photo_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> CorruptDataset:
    """The photos with 64 bytes flipped in one JPEG's header (same size), converted without
    validation, so the damage reaches the loader.

    The header, not the middle of the file: the decoder decodes only the crop, so damage in
    rows below a crop goes unnoticed (a documented trade-off), while a broken header fails
    every crop of every epoch.
    """
    source = tmp_path_factory.mktemp("corrupt-photos") / "photos"
    shutil.copytree(photo_folder, source)
    victim = sorted(source.rglob("*.jpg"))[7]
    original = victim.read_bytes()
    damaged = flip_bytes(original, 4, 64)  # keeps the FF D8 FF signature, breaks the markers
    with pytest.raises(ValueError):
        decode_image(damaged)  # the damage is real, not something libjpeg shrugs off
    victim.write_bytes(damaged)
    url = convert_folder(source, source.parent / "ds", max_shard_samples=7, validate_images="none")
    return CorruptDataset(url=url, victim=victim.relative_to(source).with_suffix("").as_posix())


def make(url: str, *, rank: int = 0, world_size: int = 1, **options: Any) -> Loader:
    options.setdefault("image_size", SIZE)
    options.setdefault("global_batch", 64)
    options.setdefault("shuffle_window", 3)
    return Loader(DataConfig(url=url, **options), rank=rank, world_size=world_size)


# ---------------------------------------------------------------------------------------------
# Recording batches, and the one resume helper


@dataclass
class Seen:
    """What a test compares of one batch."""

    keys: list[str]
    images: torch.Tensor
    labels: torch.Tensor
    valid: torch.Tensor


def record(batch: dict[str, Any]) -> Seen:
    return Seen(
        keys=list(batch["__key__"]),
        images=batch["image"].clone(),
        labels=batch["label"].clone(),
        valid=batch["__valid__"].clone(),
    )


def take(loader: Loader, count: int) -> list[Seen]:
    """The next ``count`` batches, going on into the next epoch(s) as a training loop would."""
    seen: list[Seen] = []
    while len(seen) < count:
        before = len(seen)
        for batch in loader:
            seen.append(record(batch))
            if len(seen) == count:
                break
        assert len(seen) > before, "the loader yielded no batch in a whole epoch"
    return seen


def one_epoch(loader: Loader) -> list[Seen]:
    return [record(batch) for batch in loader]


def assert_same_batches(got: list[Seen], want: list[Seen], what: str) -> None:
    assert len(got) == len(want), what
    for number, (have, expected) in enumerate(zip(got, want, strict=True)):
        where = f"{what}, batch {number}"
        assert have.keys == expected.keys, where
        assert torch.equal(have.labels, expected.labels), where
        assert torch.equal(have.valid, expected.valid), where
        assert torch.equal(have.images, expected.images), where


def assert_resumes_exactly(
    make_loader: Callable[[], Loader], midpoints: list[int], n_next: int
) -> None:
    """Save at each midpoint, restore into a fresh loader, and compare the next ``n_next``
    batches with an uninterrupted run (keys, labels, validity and pixels)."""
    reference_loader = make_loader()
    reference = take(reference_loader, max(midpoints) + n_next)
    reference_loader.close()
    for midpoint in midpoints:
        first = make_loader()
        take(first, midpoint)
        # Through JSON, as a checkpoint would store it.
        state = json.loads(json.dumps(first.state_dict()))
        first.close()
        resumed = make_loader()
        resumed.load_state_dict(state)
        got = take(resumed, n_next)
        resumed.close()
        assert_same_batches(
            got, reference[midpoint : midpoint + n_next], f"resumed at batch {midpoint}"
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


def valid_keys(batches: list[Seen]) -> list[str]:
    return [k for b in batches for k, v in zip(b.keys, b.valid.tolist(), strict=True) if v]


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
# Bad samples


def test_a_bad_sample_raises_naming_shard_key_and_offset(corrupt_photos: CorruptDataset) -> None:
    loader = make(corrupt_photos.url, global_batch=12)
    with pytest.raises(BadSampleError) as caught:
        one_epoch(loader)
    message = str(caught.value)
    assert caught.value.key == corrupt_photos.victim
    assert corrupt_photos.victim in message
    assert caught.value.shard is not None and caught.value.shard.endswith(".tar")
    assert caught.value.shard in message
    assert "byte" in message and caught.value.offset is not None
    assert "on_bad_sample" in message  # says what to do next
    loader.close()
    assert shardflow_threads() == []


def test_a_bad_sample_is_skipped_counted_and_recorded(corrupt_photos: CorruptDataset) -> None:
    loader = make(corrupt_photos.url, global_batch=12, on_bad_sample="skip")
    batches = one_epoch(loader)
    assert sorted(len(b.keys) for b in batches) == [11, 12, 12, 12, 12]
    keys = [k for b in batches for k in b.keys]
    assert corrupt_photos.victim not in keys
    assert sorted([*keys, corrupt_photos.victim]) == sorted(all_keys(corrupt_photos.url))
    short = next(b for b in batches if len(b.keys) == 11)
    assert short.images.shape == (11, SIZE, SIZE, 3) and short.labels.shape == (11,)
    assert loader.metrics()["skipped"] == 1
    skipped = loader.state_dict()["skipped"]
    assert len(skipped) == 1
    epoch, key, reason = skipped[0]
    assert (epoch, key) == (0, corrupt_photos.victim) and "JPEG" in reason
    # Epoch 1 meets the sample again and skips it again, recorded for that epoch.
    assert corrupt_photos.victim not in [k for b in one_epoch(loader) for k in b.keys]
    assert [(e, k) for e, k, _ in loader.state_dict()["skipped"]] == [
        (0, corrupt_photos.victim),
        (1, corrupt_photos.victim),
    ]


def test_two_ranks_skip_the_bad_sample_once_between_them(corrupt_photos: CorruptDataset) -> None:
    loaders = [
        make(corrupt_photos.url, global_batch=12, on_bad_sample="skip", rank=r, world_size=2)
        for r in range(2)
    ]
    delivered = [k for loader in loaders for k in valid_keys(one_epoch(loader))]
    assert sorted([*delivered, corrupt_photos.victim]) == sorted(all_keys(corrupt_photos.url))
    assert sum(loader.metrics()["skipped"] for loader in loaders) == 1
    skipped = [tuple(s[:2]) for loader in loaders for s in loader.state_dict()["skipped"]]
    assert skipped == [(0, corrupt_photos.victim)]


def test_a_resumed_loader_skips_the_same_sample(corrupt_photos: CorruptDataset) -> None:
    def make_loader() -> Loader:
        return make(corrupt_photos.url, global_batch=12, on_bad_sample="skip")

    everything = one_epoch(make_loader())
    victim_step = next(n for n, b in enumerate(everything) if len(b.keys) == 11)
    for midpoint in sorted({0, max(0, victim_step - 1), victim_step}):
        first = make_loader()
        take(first, midpoint)
        state = first.state_dict()
        first.close()
        resumed = make_loader()
        resumed.load_state_dict(state)
        rest = one_epoch(resumed)
        assert_same_batches(rest, everything[midpoint:], f"resumed at {midpoint}")
        assert [(e, k) for e, k, _ in resumed.state_dict()["skipped"]] == [
            (0, corrupt_photos.victim)
        ]


def damage_one_sample(url: str, shard_number: int, row: int) -> str:
    """Flip one byte in the middle of one sample's image inside a shard file; its key."""
    index = DatasetIndex.load(url)
    shard = index.shards[shard_number]
    table = load_table(url, index, shard)
    image_column = [f.kind for f in index.fields].index("image")
    span = table.field_span(row, image_column)
    assert span is not None
    path = Path(url) / shard.path
    data = bytearray(path.read_bytes())
    data[span[0] + span[1] // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    return table.keys[row]


@pytest.fixture
def damaged_photos(photo_folder: Path, tmp_path: Path) -> tuple[str, str, str]:
    """(dataset url, damaged key, its shard's path): photos in 3 shards of 20, one byte of
    one sample flipped on disk after conversion."""
    url = convert_folder(photo_folder, tmp_path / "ds", max_shard_samples=20)
    key = damage_one_sample(url, shard_number=1, row=5)
    return url, key, DatasetIndex.load(url).shards[1].path


def test_a_damaged_shard_still_delivers_its_good_samples(
    damaged_photos: tuple[str, str, str], photos: str
) -> None:
    url, damaged_key, _ = damaged_photos
    loader = make(url, global_batch=10, on_bad_sample="skip", augment=False)
    batches = one_epoch(loader)
    keys = [k for b in batches for k in b.keys]
    assert sorted([*keys, damaged_key]) == sorted(all_keys(url))
    assert sorted(len(b.keys) for b in batches) == [9, 10, 10, 10, 10, 10]
    assert loader.metrics()["skipped"] == 1
    # The whole shard was read again, then the one bad sample by byte range, before it counted.
    assert loader.metrics()["refetched"] == 2
    [(epoch, key, reason)] = loader.state_dict()["skipped"]
    assert (epoch, key) == (0, damaged_key) and "differ" in reason
    # The good samples of the damaged shard are intact: the evaluation transform (no
    # randomness) gives the same pixels as the undamaged dataset does.
    intact = {
        k: image
        for b in one_epoch(make(photos, global_batch=12, augment=False))
        for k, image in zip(b.keys, b.images, strict=True)
    }
    for batch in batches:
        for key, image in zip(batch.keys, batch.images, strict=True):
            assert torch.equal(image, intact[key]), key


def test_a_damaged_shard_raises_naming_shard_and_key(damaged_photos: tuple[str, str, str]) -> None:
    url, damaged_key, shard_path = damaged_photos
    with pytest.raises(BadSampleError) as caught:
        one_epoch(make(url, global_batch=10))
    assert caught.value.key == damaged_key and caught.value.shard == shard_path
    assert damaged_key in str(caught.value) and shard_path in str(caught.value)
    assert "byte" in str(caught.value)


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
    def images(seed: int, augment: bool) -> dict[str, torch.Tensor]:
        loader = make(photos, global_batch=12, seed=seed, augment=augment, shuffle=False)
        return {k: img for b in one_epoch(loader) for k, img in zip(b.keys, b.images, strict=True)}

    first, second = images(0, augment=False), images(1, augment=False)
    assert first.keys() == second.keys() and len(first) == 60
    assert all(torch.equal(first[k], second[k]) for k in first)
    trained = images(0, augment=True)
    assert sum(not torch.equal(trained[k], first[k]) for k in first) > 50
    repeated = images(0, augment=True)  # training crops: random, yet reproducible
    assert all(torch.equal(trained[k], repeated[k]) for k in trained)


def test_a_sample_gets_the_same_crop_on_every_rank_count(digits: str) -> None:
    """The crop is seeded by (seed, epoch, sample id): which rank decodes it is irrelevant."""
    single = {k: i for b in one_epoch(make(digits)) for k, i in zip(b.keys, b.images, strict=True)}
    rank1 = one_epoch(make(digits, rank=1, world_size=4))
    for batch in rank1:
        for key, image in zip(batch.keys, batch.images, strict=True):
            assert torch.equal(image, single[key]), key


# ---------------------------------------------------------------------------------------------
# Config errors


def test_a_global_batch_that_does_not_split_is_refused(digits: str) -> None:
    with pytest.raises(ValueError, match=r"global_batch 10 .* 3 ranks"):
        make(digits, global_batch=10, world_size=3)


def test_an_empty_url_is_a_data_error() -> None:
    with pytest.raises(DataError, match="url"):
        Loader(DataConfig(url=""), rank=0, world_size=1)


def test_an_unknown_image_field_is_a_data_error(digits: str) -> None:
    with pytest.raises(DataError, match=r"'jpg'.*png"):
        make(digits, image_field="jpg")


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("global_batch", 0, "global_batch must be >= 1, got 0"),
        ("image_size", -1, "image_size must be >= 1, got -1"),
        ("readahead_shards", -2, "readahead_shards must be >= 0, got -2"),
        ("crop_scale", [0.5, 0.2], "crop_scale"),
    ],
)
def test_config_values_are_checked(option: str, value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("[", r"\[")):
        DataConfig(url="x", **{option: value})  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# Closing


def shardflow_threads() -> list[str]:
    return [
        t.name for t in threading.enumerate() if t.name.startswith("shardflow-") and t.is_alive()
    ]


def test_breaking_out_and_iterating_again_continues(digits: str) -> None:
    reference = take(make(digits), 10)
    loader = make(digits)
    first = take(loader, 3)  # breaks out of the iteration after 3 batches
    assert loader.step == 3
    second = take(loader, 7)
    assert_same_batches(first + second, reference, "break, then iterate again")
    loader.close()
    assert shardflow_threads() == []


def test_close_stops_every_thread(digits: str) -> None:
    loader = make(digits, prefetch_batches=2)
    iterator = iter(loader)
    next(iterator)
    assert shardflow_threads() != []  # producer, fetch and decode pools are running
    loader.close()
    assert shardflow_threads() == []
    assert loader.step == 1
    # The abandoned iterator ends: no stale, half-decoded batch, and the position stays put.
    with pytest.raises(StopIteration):
        next(iterator)
    assert loader.step == 1
    assert_same_batches(take(loader, 2), take(make(digits), 3)[1:], "after close")
    loader.close()
    assert shardflow_threads() == []


@pytest.mark.timeout(30)
def test_an_iterator_closed_after_the_producer_finished_ends(photos: str) -> None:
    """All 5 batches are queued before close(): the old iterator must end, not wait forever
    on a queue that close() emptied."""
    loader = make(photos, global_batch=12, prefetch_batches=8)
    iterator = iter(loader)
    next(iterator)
    active = loader._active
    assert active is not None
    active.producer.join(timeout=10)  # everything, end marker included, is queued
    loader.close()
    with pytest.raises(StopIteration):
        next(iterator)
    assert loader.step == 1 and shardflow_threads() == []


def test_load_state_dict_during_an_iteration_restarts_from_the_state(digits: str) -> None:
    reference = take(make(digits), 6)
    loader = make(digits)
    take(loader, 2)
    state = loader.state_dict()
    iterator = iter(loader)
    for _ in range(3):
        next(iterator)
    loader.load_state_dict(state)  # closes the running pass
    with pytest.raises(StopIteration):
        next(iterator)
    assert_same_batches(take(loader, 4), reference[2:], "after load_state_dict")
    loader.close()


def test_len_counts_global_batches(digits: str) -> None:
    assert len(make(digits, global_batch=64)) == 28
    assert len(make(digits, global_batch=64, drop_last=False)) == 29
    assert make(digits, global_batch=64, world_size=4, rank=2).per_rank_batch == 16


# ---------------------------------------------------------------------------------------------
# The next epoch started ahead


def test_the_next_epoch_started_ahead_gives_the_same_batches(digits: str) -> None:
    steps = len(make(digits))
    reference = take(make(digits), 2 * steps + 3)
    loader = make(digits, prefetch_next_epoch=True)
    first_epoch = one_epoch(loader)
    ahead = loader._next
    assert ahead is not None and (ahead.epoch, ahead.start_step) == (1, 0)
    rest = take(loader, steps + 3)
    assert_same_batches(first_epoch + rest, reference, "next epoch started ahead")
    loader.close()
    assert shardflow_threads() == []


def test_a_pass_started_ahead_is_dropped_when_another_position_is_asked(digits: str) -> None:
    loader = make(digits, prefetch_next_epoch=True)
    one_epoch(loader)
    assert loader._next is not None
    loader.set_epoch(3)  # not the epoch that was started ahead
    reference_loader = make(digits)
    reference_loader.set_epoch(3)
    reference = take(reference_loader, 2)
    reference_loader.close()
    assert_same_batches(take(loader, 2), reference, "epoch 3 after epoch 1 was started ahead")
    loader.close()
    assert shardflow_threads() == []


def test_skips_of_a_pass_started_ahead_enter_the_state_when_delivered(
    corrupt_photos: CorruptDataset,
) -> None:
    loader = make(corrupt_photos.url, global_batch=12, on_bad_sample="skip", prefetch_batches=8,
                  prefetch_next_epoch=True)  # fmt: skip
    one_epoch(loader)
    ahead = loader._next
    assert ahead is not None
    ahead.producer.join(timeout=30)  # all 5 batches of epoch 1 fit in the queue
    for job in list(ahead.queue.queue):  # decoded ahead, the bad sample included
        for chunk in getattr(job, "chunks", []):
            chunk.result()
    assert sum(len(getattr(job, "skips", [])) for job in ahead.queue.queue) == 1
    assert [tuple(s[:2]) for s in loader.state_dict()["skipped"]] == [(0, corrupt_photos.victim)]
    one_epoch(loader)
    skipped = [tuple(s[:2]) for s in loader.state_dict()["skipped"]]
    assert skipped == [(0, corrupt_photos.victim), (1, corrupt_photos.victim)]
    loader.close()


def thread_nice(native_id: int) -> int:
    with open(f"/proc/self/task/{native_id}/stat") as handle:
        # Field 19 is the niceness; the command name (field 2) may hold spaces: skip past ')'.
        return int(handle.read().rsplit(")", 1)[1].split()[16])


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc")
@pytest.mark.parametrize("nice", [0, 7])
def test_loader_threads_run_at_a_lower_priority(digits: str, nice: int) -> None:
    """Fetch, decode and producer threads yield the CPU to the training loop; the caller's
    own thread keeps its priority."""
    loader = make(digits, thread_nice=nice, prefetch_next_epoch=True)
    mine = thread_nice(threading.get_native_id())
    try:
        batches = iter(loader)
        next(batches)
        ours = [t for t in threading.enumerate() if t.name.startswith("shardflow-")]
        assert {t.name.split("-")[1].split("_")[0] for t in ours} >= {"fetch", "decode",
                                                                       "producer"}  # fmt: skip
        assert {thread_nice(t.native_id) for t in ours if t.native_id} == {mine + nice}
        assert thread_nice(threading.get_native_id()) == mine
    finally:
        loader.close()
