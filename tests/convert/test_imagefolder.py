"""Image folder → tar/Parquet shards: contents, limits, determinism, bad images, S3 output."""

from __future__ import annotations

import filecmp
import io
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from dataflow import storage
from dataflow.convert.config import ConvertConfig
from dataflow.convert.job import ConversionError, convert
from dataflow.formats.codec import decode_image
from dataflow.index import DatasetIndex, load_table
from dataflow.verify import verify_dataset


def run(source: Path | str, output: Path | str, **options: object) -> DatasetIndex:
    config = ConvertConfig(input=str(source), output=str(output), **options)  # type: ignore[arg-type]
    convert(config, progress=False)
    return DatasetIndex.load(str(output))


def source_images(folder: Path) -> dict[str, tuple[bytes, str]]:
    """key → (file bytes, class folder) for an image folder, keys as the converter makes them."""
    found = {}
    for path in sorted(folder.rglob("*.*")):
        relative = path.relative_to(folder).with_suffix("").as_posix().replace(".", "_")
        found[relative] = (path.read_bytes(), path.parent.name)
    return found


def test_every_image_lands_once_with_its_label(digits_folder: Path, tmp_path: Path) -> None:
    index = run(digits_folder, tmp_path / "out", max_shard_samples=300, workers=2)
    expected = source_images(digits_folder)
    classes = index.metadata["classes"]
    assert classes == [str(d) for d in range(10)]
    assert [f.name for f in index.fields] == ["png", "cls"]
    seen = {}
    for shard in index.shards:
        assert shard.samples <= 300
        with tarfile.open(tmp_path / "out" / shard.path) as archive:
            members = {m.name: archive.extractfile(m).read() for m in archive}  # type: ignore[union-attr]
        table = load_table(str(tmp_path / "out"), index, shard)
        for key in table.keys:
            seen[key] = (members[f"{key}.png"], classes[int(members[f"{key}.cls"])])
    assert seen == expected
    assert index.num_samples == 1797
    assert sum(index.metadata["class_counts"].values()) == 1797


def test_count_limit_spreads_samples_evenly(digits_folder: Path, tmp_path: Path) -> None:
    index = run(digits_folder, tmp_path / "out", max_shard_samples=256, workers=1)
    counts = [s.samples for s in index.shards]
    assert len(counts) == 8 and sum(counts) == 1797  # not 7 × 256 + 5
    assert max(counts) - min(counts) <= 1 and max(counts) <= 256


def test_byte_limit_is_respected_and_balanced(photo_folder: Path, tmp_path: Path) -> None:
    index = run(photo_folder, tmp_path / "out", max_shard_bytes=300_000, workers=1)
    sizes = [s.bytes for s in index.shards]
    total = sum(sizes)
    assert len(sizes) == -(-total // 300_000) or len(sizes) == -(-total // 300_000) + 1
    assert all(size <= 300_000 for size in sizes)
    assert max(sizes) - min(sizes) < 100_000  # a balanced split, no small straggler
    assert index.num_samples == 60


def test_output_is_identical_whatever_the_worker_count(photo_folder: Path, tmp_path: Path) -> None:
    run(photo_folder, tmp_path / "one", max_shard_samples=16, workers=1)
    run(photo_folder, tmp_path / "two", max_shard_samples=16, workers=2)
    one = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert one == sorted(p.name for p in (tmp_path / "two").iterdir())
    match, mismatch, errors = filecmp.cmpfiles(tmp_path / "one", tmp_path / "two", one, False)
    assert mismatch == [] and errors == []
    assert "index.json" in match


def test_shuffle_mixes_classes_and_seed_changes_order(photo_folder: Path, tmp_path: Path) -> None:
    index = run(photo_folder, tmp_path / "a", max_shard_samples=20, workers=1, seed=1)
    first = load_table(str(tmp_path / "a"), index, index.shards[0])
    assert len({key.split("/")[0] for key in first.keys}) >= 5  # classes mixed in one shard
    other = run(photo_folder, tmp_path / "b", max_shard_samples=20, workers=1, seed=2)
    assert load_table(str(tmp_path / "b"), other, other.shards[0]).keys != first.keys
    plain = run(photo_folder, tmp_path / "c", max_shard_samples=20, workers=1, shuffle=False)
    keys = load_table(str(tmp_path / "c"), plain, plain.shards[0]).keys
    assert keys == sorted(keys)


def corrupt(path: Path) -> bytes:
    original = path.read_bytes()
    damaged = bytearray(original)
    middle = len(damaged) // 2
    damaged[middle : middle + 64] = b"\x00" * 64
    path.write_bytes(bytes(damaged))
    return original


def test_corrupt_image_is_fatal_by_default_and_names_the_file(
    small_photo_copy: Path, tmp_path: Path
) -> None:
    victim = sorted(small_photo_copy.rglob("*.jpg"))[7]
    corrupt(victim)
    with pytest.raises(ConversionError) as caught:
        run(small_photo_copy, tmp_path / "out", workers=1)
    assert str(victim) in str(caught.value)
    assert "--on-bad-input skip" in str(caught.value)
    assert not (tmp_path / "out" / "index.json").exists()


def test_truncated_image_is_skipped_counted_and_recorded(
    small_photo_copy: Path, tmp_path: Path
) -> None:
    victim = sorted(small_photo_copy.rglob("*.jpg"))[3]
    victim.write_bytes(victim.read_bytes()[:5000])
    not_an_image = small_photo_copy / "class-00" / "notes.png"
    not_an_image.write_bytes(b"this is text, not a PNG")
    index = run(small_photo_copy, tmp_path / "out", workers=2, on_bad_input="skip")
    assert index.num_samples == 59
    assert sorted(s["source"] for s in index.skipped) == sorted([str(not_an_image), str(victim)])
    assert all(s["reason"] for s in index.skipped)
    assert verify_dataset(str(tmp_path / "out"), decode=True, progress=False).ok


@pytest.mark.parametrize("validate", ["decode", "header"])
def test_skip_reasons_name_the_file_and_what_is_wrong(
    small_photo_copy: Path, tmp_path: Path, validate: str, caplog: pytest.LogCaptureFixture
) -> None:
    not_an_image = small_photo_copy / "class-00" / "notes.png"
    not_an_image.write_bytes(b"this is text, not a PNG")
    index = run(small_photo_copy, tmp_path / "out", workers=1, on_bad_input="skip",
                validate_images=validate)  # fmt: skip
    [skip] = index.skipped
    assert skip["source"] == str(not_an_image)
    assert skip["reason"].startswith(f"{not_an_image}: not an image")
    assert " at 0x" not in skip["reason"], skip["reason"]  # no <_io.BytesIO object at 0x…>
    logged = [r.getMessage() for r in caplog.records if "skipping" in r.getMessage()]
    assert logged == [f"skipping {skip['reason']}"]


def test_refuses_to_overwrite_a_dataset_unless_asked(photo_folder: Path, tmp_path: Path) -> None:
    run(photo_folder, tmp_path / "out", workers=1)
    with pytest.raises(ConversionError, match="--overwrite"):
        run(photo_folder, tmp_path / "out", workers=1)
    index = run(photo_folder, tmp_path / "out", workers=1, overwrite=True, max_shard_samples=7)
    assert len(index.shards) == 9
    assert sorted(p.name for p in (tmp_path / "out").glob("*.tar")) == [
        s.path for s in index.shards
    ]


def test_parquet_output_from_images(photo_folder: Path, tmp_path: Path) -> None:
    index = run(photo_folder, tmp_path / "out", format="parquet", row_group_rows=8, workers=1)
    assert index.format == "parquet"
    table = pq.read_table(tmp_path / "out" / index.shards[0].path)
    assert table.num_rows == 60
    row = table.slice(0, 1).to_pylist()[0]
    assert decode_image(row["jpg"]).shape[2] == 3
    assert verify_dataset(str(tmp_path / "out"), decode=True, progress=False).ok


@pytest.mark.timeout(120)
def test_convert_to_s3_and_verify_there(photo_folder: Path, s3) -> None:  # type: ignore[no-untyped-def]
    output = f"{s3.url}/photos"
    config = ConvertConfig(input=str(photo_folder), output=output, max_shard_samples=16, workers=2)
    report = convert(config, s3.config, progress=False)
    assert report.samples == 60 and report.index_written
    index = DatasetIndex.load(output, config=s3.config)
    assert len(index.shards) == 4
    report_check = verify_dataset(output, s3.config, decode=True, progress=False)
    assert report_check.ok, report_check.problems
    # Fetch one sample's image by byte range, as a loader will.
    table = load_table(output, index, index.shards[1], config=s3.config)
    offset, size = table.field_span(5, 0)  # type: ignore[misc]
    data = storage.read_range(
        storage.join_url(output, index.shards[1].path), offset, offset + size, config=s3.config
    )
    key = table.keys[5]
    assert data == (photo_folder / f"{key}.jpg").read_bytes()
    staged = [u for u in storage.list_files(output, config=s3.config) if "_convert" in u]
    assert staged == []


def test_input_from_s3(photo_folder: Path, s3, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    for path in photo_folder.rglob("*.jpg"):
        relative = path.relative_to(photo_folder).as_posix()
        storage.write_bytes(f"{s3.url}/raw/{relative}", path.read_bytes(), config=s3.config)
    config = ConvertConfig(input=f"{s3.url}/raw", output=str(tmp_path / "out"), workers=1)
    convert(config, s3.config, progress=False)
    local = run(photo_folder, tmp_path / "local", workers=1)
    remote = DatasetIndex.load(str(tmp_path / "out"))
    assert [s.checksum for s in remote.shards] == [s.checksum for s in local.shards]


def stored_images(output: Path, index: DatasetIndex) -> dict[str, bytes]:
    images = {}
    for shard in index.shards:
        with tarfile.open(output / shard.path) as archive:
            for member in archive:
                if member.name.endswith(".jpg"):
                    images[member.name[:-4]] = archive.extractfile(member).read()  # type: ignore[union-attr]
    return images


def test_jpegs_get_a_restart_marker_per_row_and_keep_their_pixels(
    small_photo_copy: Path, tmp_path: Path
) -> None:
    truncated = sorted(small_photo_copy.rglob("*.jpg"))[5]
    truncated.write_bytes(truncated.read_bytes()[:4000])
    source = source_images(small_photo_copy)
    index = run(small_photo_copy, tmp_path / "out", workers=2, validate_images="none",
                jpeg_row_restarts=True)  # fmt: skip
    stored = stored_images(tmp_path / "out", index)
    assert stored.keys() == source.keys()
    for key, data in stored.items():
        original = source[key][0]
        if key == truncated.relative_to(small_photo_copy).with_suffix("").as_posix():
            assert data == original  # unreadable past its header: stored as it came
            continue
        assert b"\xff\xdd\x00\x04" in data and b"\xff\xdd" not in original  # DRI added
        assert len(data) <= len(original) + 511  # within the tar block the plan counted
        np.testing.assert_array_equal(decode_image(data), decode_image(original))
    plain = run(small_photo_copy, tmp_path / "plain", workers=1, validate_images="none")
    assert stored_images(tmp_path / "plain", plain) == {k: v[0] for k, v in source.items()}


def test_decoded_pixels_survive(photo_folder: Path, tmp_path: Path) -> None:
    index = run(photo_folder, tmp_path / "out", workers=1)
    shard = index.shards[0]
    table = load_table(str(tmp_path / "out"), index, shard)
    data = (tmp_path / "out" / shard.path).read_bytes()
    offset, size = table.field_span(0, 0)  # type: ignore[misc]
    pixels = decode_image(data[offset : offset + size])
    original = decode_image((photo_folder / f"{table.keys[0]}.jpg").read_bytes())
    assert np.array_equal(pixels, original)
    assert io.BytesIO(data).getbuffer().nbytes == shard.bytes
