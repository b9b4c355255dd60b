"""The loader's bad-input policy: a corrupt sample raises naming shard, key and offset, or is
skipped — counted, recorded, once across ranks and again after resume; damaged shards."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from dataflow.errors import BadSampleError, DatasetChangedError, TooManySkipsError
from dataflow.index import DatasetIndex, load_table
from dataflow.pipeline import Loader

from .loader_support import (
    SIZE,
    CorruptDataset,
    all_keys,
    assert_same_batches,
    convert_folder,
    make,
    one_epoch,
    shardflow_threads,
    take,
    valid_keys,
)


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
    loader = make(url, global_batch=10, on_bad_sample="skip", image_pipeline="eval")
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
        for b in one_epoch(make(photos, global_batch=12, image_pipeline="eval"))
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
# A dataset replaced under a running loader, and the skip budget


def test_a_dataset_replaced_between_epochs_stops_the_loader(
    photo_folder: Path, tmp_path: Path
) -> None:
    """`tools/convert.py --overwrite` under a running job with on_bad_sample = skip: epoch 1
    delivered nothing (every sample failed its digest and was skipped, with only WARNINGs),
    and so did every epoch after it."""
    url = convert_folder(photo_folder, tmp_path / "ds", max_shard_samples=7)
    loader = make(url, global_batch=12, on_bad_sample="skip")
    assert len(valid_keys(one_epoch(loader))) == 60
    convert_folder(photo_folder, tmp_path / "ds", max_shard_samples=5, overwrite=True)
    with pytest.raises(DatasetChangedError) as caught:
        one_epoch(loader)
    message = str(caught.value)
    assert "index.json" in message and "changed" in message and "restart" in message
    loader.close()
    assert shardflow_threads() == []


def test_a_dataset_replaced_mid_epoch_stops_the_loader(photo_folder: Path, tmp_path: Path) -> None:
    url = convert_folder(photo_folder, tmp_path / "ds", max_shard_samples=7)
    loader = make(url, global_batch=4, on_bad_sample="skip", shuffle_window=1,
                  readahead_shards=0, prefetch_batches=1, fetch_workers=1)  # fmt: skip
    batches = iter(loader)
    delivered = len(next(batches)["__key__"])
    convert_folder(photo_folder, tmp_path / "ds", max_shard_samples=5, overwrite=True)
    with pytest.raises(DatasetChangedError, match="restart"):
        for batch in batches:
            delivered += len(batch["__key__"])
    assert delivered < 60
    loader.close()


def test_skips_past_max_skip_fraction_stop_the_epoch(photos: str, tmp_path: Path) -> None:
    """A shard lost for good (its file deleted, the index unchanged): its 7 samples are 12 %
    of the epoch, past the default budget of 1 %."""
    url = tmp_path / "ds"
    shutil.copytree(photos, url)
    index = DatasetIndex.load(str(url))
    (url / index.shards[4].path).unlink()
    with pytest.raises(TooManySkipsError) as caught:
        one_epoch(make(str(url), global_batch=12, on_bad_sample="skip"))
    message = str(caught.value)
    assert "data.max_skip_fraction" in message and "epoch 0" in message
    assert index.shards[4].path in message  # the last skip's shard
    # A budget that covers the lost shard: the rest is delivered, every skip counted.
    loader = make(str(url), global_batch=12, on_bad_sample="skip", max_skip_fraction=0.2)
    keys = [k for batch in one_epoch(loader) for k in batch.keys]
    assert len(keys) + index.shards[4].samples == 60
    assert loader.metrics()["skipped"] == index.shards[4].samples
