"""The loader over a mix of datasets (``data.mix``): real converted datasets, locally and on a
real S3 server, through the same Loader users build.

The mix here: 60 photos (9 shards of ≤ 7) at weight 0.7 and 40 other photos (8 shards of 5)
at 0.3. A mix epoch has 100 positions: 70 from the photos, which therefore wrap (their
second epoch starts inside the first mix epoch), and 30 of the 40 others.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import torch
from PIL import Image

from dataflow.config import ConfigError
from dataflow.convert.config import ConvertConfig
from dataflow.convert.job import convert
from dataflow.convert.writer import ShardWriter
from dataflow.datasets import photo_jpegs
from dataflow.errors import BadSampleError, DataError, DatasetChangedError
from dataflow.index import DatasetIndex
from dataflow.mix import MixOrder
from dataflow.pipeline import DataConfig, Loader, MixSource
from dataflow.pipeline.shards import ShardView
from dataflow.pipeline.sources import MixFetcher
from dataflow.storage import StorageConfig
from trainer.config import load

from .loader_support import (
    SIZE,
    CorruptDataset,
    Seen,
    all_keys,
    assert_resumes_exactly,
    assert_same_batches,
    convert_folder,
    record,
    take,
    valid_keys,
)

if TYPE_CHECKING:
    from conftest import S3Bucket

ROOT = Path(__file__).resolve().parents[2]
WEIGHTS = (0.7, 0.3)
GLOBAL_BATCH = 10
EPOCH = 100  # positions: 60 + 40


@pytest.fixture(scope="module")
def other_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40 other photo crops (keys other-NNNN) in class folders."""
    source = tmp_path_factory.mktemp("other-photos")
    for number, (label, data) in enumerate(photo_jpegs(40, seed=2)):
        directory = source / f"class-{label:02d}"
        directory.mkdir(exist_ok=True)
        (directory / f"other-{number:04d}.jpg").write_bytes(data)
    return source


@pytest.fixture(scope="module")
def others(other_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The other photos in 8 shards of 5, same fields as ``photos``: jpg and cls."""
    return convert_folder(other_folder, tmp_path_factory.mktemp("other-data") / "ds",
                          max_shard_samples=5)  # fmt: skip


def mix_loader(
    first: str,
    second: str,
    *,
    rank: int = 0,
    world_size: int = 1,
    storage_config: StorageConfig | None = None,
    **options: Any,
) -> Loader:
    options.setdefault("image_size", SIZE)
    options.setdefault("global_batch", GLOBAL_BATCH)
    options.setdefault("shuffle_window", 2)
    config = DataConfig(mix=MixSource.from_weights({first: WEIGHTS[0], second: WEIGHTS[1]}),
                        **options)  # fmt: skip
    return Loader(config, storage_config, rank=rank, world_size=world_size)


def source_counts(keys: list[str], first_keys: set[str]) -> tuple[int, int]:
    first = sum(1 for key in keys if key in first_keys)
    return first, len(keys) - first


def test_an_epoch_holds_the_configured_weights(photos: str, others: str) -> None:
    """The must-show: the weights over an epoch (exactly 70 / 30 here, within 2 % by far),
    each batch within one sample of its share, and metrics() counting per source."""
    loader = mix_loader(photos, others)
    assert len(loader) == EPOCH // GLOBAL_BATCH
    photo_keys = set(all_keys(photos))
    for epoch in range(2):
        batches = [record(batch) for batch in loader]
        keys = valid_keys(batches)
        from_photos, from_others = source_counts(keys, photo_keys)
        assert len(keys) == EPOCH
        assert abs(from_photos / EPOCH - WEIGHTS[0]) <= 0.02
        assert abs(from_others / EPOCH - WEIGHTS[1]) <= 0.02
        assert (from_photos, from_others) == (70, 30)
        for batch in batches:
            assert source_counts(batch.keys, photo_keys)[0] in (6, 7, 8), (epoch, batch.keys)
        if epoch == 0:
            # Each source's samples once per epoch of that source: the photos (70 positions
            # of 60 samples) repeat exactly 10 keys, from their second epoch; the others none.
            repeats = Counter(keys)
            assert sum(1 for key, n in repeats.items() if n > 1 and key in photo_keys) == 10
            assert max(repeats.values()) == 2
            assert all(repeats[key] == 1 for key in keys if key not in photo_keys)
        assert loader.metrics()["mix"] == {photos: 70 * (epoch + 1), others: 30 * (epoch + 1)}
    loader.close()


def test_over_mix_epochs_each_source_walks_its_own_epochs(photos: str, others: str) -> None:
    """Three mix epochs deliver 210 photos = 3.5 photo epochs and 90 others = 2.25 of theirs:
    every complete epoch of a source holds each of its samples exactly once."""
    loader = mix_loader(photos, others)
    keys = valid_keys(take(loader, 3 * len(loader)))
    loader.close()
    for url, size in ((photos, 60), (others, 40)):
        mine = set(all_keys(url))
        walked = [key for key in keys if key in mine]
        for start in range(0, len(walked) - size + 1, size):
            assert sorted(walked[start : start + size]) == sorted(mine), (url, start)
        tail = walked[len(walked) // size * size :]
        assert len(set(tail)) == len(tail)


def test_a_repeated_sample_gets_another_crop_in_its_next_source_epoch(
    photos: str, others: str
) -> None:
    """The 10 photos delivered twice in one mix epoch come with different crops: their ids
    (which seed the crop and a transform's generator) differ between source epochs."""
    loader = mix_loader(photos, others)
    seen: dict[str, list[Any]] = {}
    for batch in loader:
        for key, image in zip(batch["__key__"], batch["image"], strict=True):
            seen.setdefault(key, []).append(image.clone())
    loader.close()
    twice = [images for images in seen.values() if len(images) == 2]
    assert len(twice) == 10
    assert all(not (first == second).all() for first, second in twice)


def test_resume_is_exact_mid_epoch_and_across_epochs(photos: str, others: str) -> None:
    assert_resumes_exactly(lambda: mix_loader(photos, others), midpoints=[3, 8], n_next=5)


def test_the_next_epoch_started_ahead_gives_the_same_batches(photos: str, others: str) -> None:
    """prefetch_next_epoch (the trainer's setting) plans epoch e + 1's mix while e ends."""
    ahead = mix_loader(photos, others, prefetch_next_epoch=True)
    plain = mix_loader(photos, others)
    assert_same_batches(take(ahead, 3 * len(ahead)), take(plain, 3 * len(plain)), "ahead")
    ahead.close()
    plain.close()


def test_resume_from_two_ranks_to_one_is_exact(photos: str, others: str) -> None:
    """Two ranks take 4 steps (each its half of every global batch); one rank resumes from
    rank 0's state and continues the global sequence an uninterrupted one-rank run gives."""
    reference_loader = mix_loader(photos, others)
    reference = take(reference_loader, 12)
    reference_loader.close()
    halves: list[list[Seen]] = []
    states = []
    for rank in range(2):
        loader = mix_loader(photos, others, rank=rank, world_size=2)
        halves.append(take(loader, 4))
        states.append(json.loads(json.dumps(loader.state_dict())))
        loader.close()
    assert states[0] == states[1]
    for step in range(4):  # the two slices of a step are the one-rank batch, in rank order
        assert halves[0][step].keys + halves[1][step].keys == reference[step].keys
    resumed = mix_loader(photos, others)
    resumed.load_state_dict(states[0])
    got = take(resumed, 8)
    resumed.close()
    assert_same_batches(got, reference[4:12], "one rank resumed from two")


def test_resume_with_other_weights_is_refused(photos: str, others: str) -> None:
    loader = mix_loader(photos, others)
    take(loader, 2)
    state = loader.state_dict()
    loader.close()
    other_weights = Loader(DataConfig(
        mix=MixSource.from_weights({photos: 0.5, others: 0.5}), image_size=SIZE,
        global_batch=GLOBAL_BATCH,
    ))  # fmt: skip
    with pytest.raises(ValueError, match="cannot resume: the saved dataset"):
        other_weights.load_state_dict(state)
    plain = Loader(DataConfig(url=photos, image_size=SIZE, global_batch=GLOBAL_BATCH))
    with pytest.raises(ValueError, match="cannot resume: the saved dataset"):
        plain.load_state_dict(state)


def test_one_source_at_weight_one_is_the_plain_loader(photos: str) -> None:
    """Same batches, pixels included, and the same dataset id: a checkpoint of one resumes
    into the other."""
    plain = Loader(DataConfig(url=photos, image_size=SIZE, global_batch=12, shuffle_window=2))
    mixed = Loader(DataConfig(mix=[MixSource(url=photos, weight=1.0)], image_size=SIZE,
                              global_batch=12, shuffle_window=2))  # fmt: skip
    assert_same_batches(take(mixed, 8), take(plain, 8), "a mix of one")
    assert mixed.state_dict() == plain.state_dict()
    plain.close()
    mixed.close()


def write_captioned(output: Path, *, count: int, seed: int, image: str, order: list[str]) -> str:
    """``count`` photo crops with a caption, fields written in ``order`` (ShardWriter keeps
    it as the column order); the image as ``jpg`` or re-encoded as ``png``."""
    with ShardWriter(str(output), max_shard_samples=6) as writer:
        for number, (label, jpeg) in enumerate(photo_jpegs(count, seed=seed, long_side=64)):
            data = jpeg
            if image == "png":
                encoded = io.BytesIO()
                Image.open(io.BytesIO(jpeg)).save(encoded, format="PNG")
                data = encoded.getvalue()
            fields = {image: data, "txt": f"photo {number} of class {label}", "cls": label}
            writer.write({"__key__": f"{image}-{number:04d}"} | {n: fields[n] for n in order})
    return str(output)


def test_fields_in_another_order_and_another_image_name_mix(tmp_path: Path) -> None:
    """A tar source's columns are matched to the first source's by name (png to jpg as the
    image): every delivered sample equals what a loader of its own dataset gives for it —
    image (the deterministic eval crop), label and caption."""
    first = write_captioned(tmp_path / "a", count=30, seed=3, image="jpg",
                            order=["jpg", "txt", "cls"])  # fmt: skip
    second = write_captioned(tmp_path / "b", count=20, seed=4, image="png",
                             order=["cls", "txt", "png"])  # fmt: skip
    fields = [[f.name for f in DatasetIndex.load(url).fields] for url in (first, second)]
    assert fields == [["jpg", "txt", "cls"], ["cls", "txt", "png"]]
    options: dict[str, Any] = {"image_pipeline": "eval", "global_batch": 10}
    alone = {}
    for url in (first, second):
        loader = Loader(DataConfig(url=url, image_size=SIZE, drop_last=False, **options))
        for batch in loader:
            for row, key in enumerate(batch["__key__"]):
                alone[key] = (batch["image"][row], int(batch["label"][row]), batch["txt"][row])
        loader.close()
    mixed = mix_loader(first, second, **options)
    delivered = 0
    for batch in mixed:
        for row, key in enumerate(batch["__key__"]):
            image, label, caption = alone[key]
            assert torch.equal(batch["image"][row], image), key
            assert (int(batch["label"][row]), batch["txt"][row]) == (label, caption), key
            delivered += 1
    assert delivered == 50 and mixed.metrics()["mix"] == {first: 35, second: 15}
    mixed.close()


def test_sources_with_other_fields_or_formats_are_refused_naming_both(
    photos: str, other_folder: Path, tmp_path: Path
) -> None:
    captioned = write_captioned(tmp_path / "captioned", count=12, seed=3, image="jpg",
                                order=["jpg", "txt", "cls"])  # fmt: skip
    with pytest.raises(DataError) as caught:
        mix_loader(photos, captioned)
    assert str(caught.value).startswith(
        f"data.mix: {captioned} has fields ['txt'] that {photos} lacks"
    )
    with pytest.raises(DataError) as caught:
        mix_loader(captioned, photos)
    assert str(caught.value).startswith(
        f"data.mix: {photos} lacks field 'txt' (str) that {captioned} has"
    )
    table = convert_folder(other_folder, tmp_path / "parquet", max_shard_samples=5,
                           format="parquet")  # fmt: skip
    with pytest.raises(DataError, match=r"hold parquet and tar shards; a mix needs one format"):
        mix_loader(photos, table)


def test_a_weight_too_small_for_any_position_is_refused_naming_the_entry(
    photos: str, others: str
) -> None:
    config = DataConfig(mix=MixSource.from_weights({photos: 1.0, others: 1e-6}))
    with pytest.raises(
        DataError, match=r"data\.mix\[1\] \(.*\): weight 1e-06 gives it no position"
    ):
        Loader(config)


def test_a_toml_file_with_data_mix_runs(photos: str, others: str, tmp_path: Path) -> None:
    path = tmp_path / "mix.toml"
    path.write_text(
        f"[data]\nglobal_batch = {GLOBAL_BATCH}\nimage_size = {SIZE}\n\n"
        f'[[data.mix]]\nurl = "{photos}"\nweight = 7\n\n'
        f'[[data.mix]]\nurl = "{others}"\nweight = 3\n'
    )
    loader = Loader(load(path).data)
    keys = valid_keys([record(batch) for batch in loader])
    assert source_counts(keys, set(all_keys(photos))) == (70, 30)
    loader.close()
    path.write_text(path.read_text().replace("weight = 3", "weight = -3"))
    with pytest.raises(ConfigError, match=r"\[data\.mix\[1\]\] weight must be a number > 0"):
        load(path)


def test_a_source_replaced_under_the_job_is_named(photos: str, others: str, tmp_path: Path) -> None:
    copy = tmp_path / "others"
    shutil.copytree(others, copy)
    loader = mix_loader(photos, str(copy))
    assert len(valid_keys([record(batch) for batch in loader])) == EPOCH
    index = DatasetIndex.load(str(copy))
    index.metadata["replaced"] = True
    index.save(str(copy))
    with pytest.raises(DatasetChangedError, match=f"{copy}/index.json changed"):
        [record(batch) for batch in loader]
    loader.close()


@pytest.mark.timeout(120)
def test_a_mix_on_s3_holds_the_weights_and_resumes(
    photo_folder: Path, other_folder: Path, s3: S3Bucket
) -> None:
    """Both datasets on a real S3 server: the same counts, per-source metrics by URL, and an
    exact resume."""
    urls = [f"{s3.url}/photos", f"{s3.url}/others"]
    for source, url, per_shard in ((photo_folder, urls[0], 7), (other_folder, urls[1], 5)):
        convert(ConvertConfig(input=str(source), output=url, max_shard_samples=per_shard,
                              workers=1), s3.config, progress=False)  # fmt: skip

    def make_loader() -> Loader:
        return mix_loader(urls[0], urls[1], storage_config=s3.config)

    loader = make_loader()
    keys = valid_keys([record(batch) for batch in loader])
    assert sum(1 for key in keys if not key.split("/")[-1].startswith("other-")) == 70
    assert loader.metrics()["mix"] == {urls[0]: 70, urls[1]: 30}
    loader.close()
    assert_resumes_exactly(make_loader, midpoints=[4], n_next=4)


@pytest.mark.timeout(180)
def test_the_trainer_trains_on_a_mix_and_evaluates_on_eval_url(
    photos: str, others: str, tmp_path: Path
) -> None:
    """``python -m trainer.train`` with data.mix on the command line: one epoch (10 steps),
    then the held-out pass, whose loader takes train.eval_url in place of the mix."""
    mix = f'[{{url = "{photos}", weight = 0.7}}, {{url = "{others}", weight = 0.3}}]'
    command = [
        sys.executable, "-m", "trainer.train", "--config=configs/demo.toml", "--data.url=",
        f"--data.mix={mix}", "--data.decode_backend=cpu", f"--data.global_batch={GLOBAL_BATCH}",
        f"--train.eval_url={others}", "--train.epochs=1", f"--train.out_dir={tmp_path}",
        "--train.progress=false", "--data.audit=false",
    ]  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=150,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    end = records[-1]
    assert end["event"] == "end" and end["steps"] == EPOCH // GLOBAL_BATCH
    assert end["eval"]["targets"] == 40  # the held-out pass read the other photos alone
    assert 'mix = [{url = "' in (tmp_path / "config.toml").read_text()


def test_a_bad_sample_names_its_dataset_shard_and_key(
    corrupt_photos: CorruptDataset, others: str
) -> None:
    """Two datasets may both hold a shard-000000.tar: errors name the shard by full URL."""
    loader = mix_loader(corrupt_photos.url, others)
    with pytest.raises(BadSampleError) as caught:
        [record(batch) for batch in loader]
    loader.close()
    assert caught.value.key == corrupt_photos.victim
    shard = caught.value.shard
    assert shard is not None and shard.startswith(corrupt_photos.url + "/")
    assert shard.endswith(".tar") and shard in str(caught.value)


def test_a_small_source_read_again_while_held_is_not_fetched_again(
    photos: str, tmp_path: Path
) -> None:
    """5 samples in one shard at weight 0.5 beside the 60 photos: the shard is read 6 or 7
    times a mix epoch (one read per epoch of its own), and a read made while the previous
    one is still held shares its bytes instead of fetching them again."""
    source = tmp_path / "tiny-source"
    for number, (label, data) in enumerate(photo_jpegs(5, seed=5)):
        (source / f"class-{label:02d}").mkdir(parents=True, exist_ok=True)
        (source / f"class-{label:02d}" / f"tiny-{number:04d}.jpg").write_bytes(data)
    tiny = convert_folder(source, tmp_path / "tiny")
    loader = Loader(DataConfig(mix=MixSource.from_weights({photos: 0.5, tiny: 0.5}),
                               image_size=SIZE, global_batch=GLOBAL_BATCH))  # fmt: skip
    fetcher = loader._fetcher
    assert isinstance(fetcher, MixFetcher)
    tiny_fetcher = fetcher.fetchers[1]
    fetches = []
    real_fetch = tiny_fetcher.fetch

    def counted(shard: int) -> ShardView:
        fetches.append(shard)
        return real_fetch(shard)

    tiny_fetcher.fetch = counted  # type: ignore[method-assign]
    reads = 0
    for epoch in range(3):
        config = loader.config
        order = loader.sources.order(epoch, seed=config.seed, window=config.shuffle_window,
                                     shuffle=config.shuffle, block=config.global_batch)  # fmt: skip
        assert isinstance(order, MixOrder)
        reads += int((order.layout.locate_reads(order.need_order)[0] == 1).sum())
    keys = valid_keys(take(loader, 3 * len(loader)))
    loader.close()
    tiny_keys = set(all_keys(tiny))
    assert sum(1 for key in keys if key in tiny_keys) == loader.metrics()["mix"][tiny] == 90
    # 22 reads and 3 fetches (one per mix epoch) here; the bound leaves room for timing.
    assert reads >= 18 and len(fetches) <= reads // 2, (len(fetches), reads)
    # The class lists differ (the tiny set has fewer classes): the longest names the labels,
    # whichever dataset comes first, so a classifier sized by it covers both.
    photo_classes = DatasetIndex.load(photos).metadata["classes"]
    assert len(DatasetIndex.load(tiny).metadata["classes"]) < len(photo_classes)
    tiny_first = Loader(DataConfig(mix=MixSource.from_weights({tiny: 0.5, photos: 0.5}),
                                   global_batch=GLOBAL_BATCH))  # fmt: skip
    assert tiny_first.index.metadata["classes"] == loader.index.metadata["classes"] == photo_classes
