"""Re-sharding existing WebDataset tars validates their images as an image folder's are
(``validate_images``, with the pixel-limit guard against image bombs): a truncated JPEG or
one declaring 60,000 × 60,000 pixels stops the conversion naming the tar and the member, or
is skipped, counted and recorded under ``on_bad_input = "skip"``; never copied silently."""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from support.fuzz import _jpeg_with_size

from dataflow.convert.config import ConvertConfig
from dataflow.convert.job import ConversionError, convert
from dataflow.datasets import photo_jpegs
from dataflow.formats import codec
from dataflow.index import DatasetIndex

ROOT = Path(__file__).resolve().parents[2]
BAD = {"part-0000.tar": "cut.short", "part-0001.tar": "huge"}
"""Where the two bad JPEGs are, by tar and key (a dotted key, as webdataset allows: the
error must name the member as the tar has it)."""


@pytest.fixture
def tars(tmp_path: Path) -> Path:
    """Two tars of six good photos each; the first also holds a JPEG cut in half, the second
    one whose header declares 60,000 × 60,000 pixels (3.6 G: a decompression bomb)."""
    import webdataset

    source = tmp_path / "wds"
    source.mkdir()
    photos = photo_jpegs(12, seed=4, long_side=96)
    jpeg = photos[0][1]
    bad = {"cut.short": jpeg[: len(jpeg) // 2], "huge": _jpeg_with_size(jpeg, 60_000, 60_000)}
    with webdataset.ShardWriter(str(source / "part-%04d.tar"), maxcount=7, verbose=0) as sink:
        for number, (label, data) in enumerate(photos):
            sink.write({"__key__": f"good{number:03d}", "jpg": data, "cls": label})
            if number in (2, 8):
                key = "cut.short" if number == 2 else "huge"
                sink.write({"__key__": key, "jpg": bad[key], "cls": 0})
    assert sorted(p.name for p in source.iterdir()) == sorted(BAD)
    return source


def written_jpegs(root: Path, index: DatasetIndex) -> dict[str, bytes]:
    """Sample key → JPEG bytes of every shard the conversion wrote."""
    jpegs = {}
    for shard in index.shards:
        with tarfile.open(root / shard.path) as archive:
            for member in archive:
                if member.name.endswith(".jpg"):
                    jpegs[member.name[: -len(".jpg")]] = archive.extractfile(member).read()  # type: ignore[union-attr]
    return jpegs


def reshard(source: Path, output: Path, **options: object) -> object:
    config = ConvertConfig(input=str(source), output=str(output), input_format="webdataset",
                           workers=1, **options)  # type: ignore[arg-type]  # fmt: skip
    return convert(config, progress=False)


@pytest.mark.parametrize("mode", ["decode", "header"])
def test_a_bad_jpeg_stops_the_reshard_naming_tar_and_member(
    tars: Path, tmp_path: Path, mode: str
) -> None:
    with pytest.raises(ConversionError) as caught:
        reshard(tars, tmp_path / "out", validate_images=mode, shuffle=False)
    message = str(caught.value)
    assert "\n" not in message
    # The first bad member in the order the conversion reads them, named as the tar has it.
    named = [(tar, key) for tar, key in BAD.items() if tar in message]
    assert len(named) == 1, message
    _, key = named[0]
    assert f"{key}.jpg" in message, message
    assert "--on-bad-input skip" in message
    if key == "huge":
        assert "over the 67,108,864-pixel limit" in message
    assert not (tmp_path / "out" / "index.json").exists()


@pytest.mark.parametrize("mode", ["decode", "header"])
def test_skip_counts_and_records_them(tars: Path, tmp_path: Path, mode: str) -> None:
    report = reshard(tars, tmp_path / "out", validate_images=mode, on_bad_input="skip")
    assert report.skipped == (2 if mode == "decode" else 1)  # type: ignore[attr-defined]
    index = DatasetIndex.load(str(tmp_path / "out"))
    recorded = {(record["source"], record["reason"]) for record in index.skipped}
    bad = BAD if mode == "decode" else {"part-0001.tar": "huge"}  # a header can be whole
    for tar, key in bad.items():
        assert any(tar in source and f"{key}.jpg" in source for source, _ in recorded), recorded
    jpegs = written_jpegs(tmp_path / "out", index)
    assert len(jpegs) == index.num_samples == 14 - len(bad)
    assert "huge" not in jpegs
    if mode == "decode":  # everything written decodes
        assert "cut_short" not in jpegs
        for data in jpegs.values():
            codec.check_image(data)


def test_validate_images_none_still_copies_them(tars: Path, tmp_path: Path) -> None:
    """'none' is the documented way to copy bytes unchecked: nothing is skipped."""
    report = reshard(tars, tmp_path / "out", validate_images="none")
    assert report.skipped == 0  # type: ignore[attr-defined]
    assert DatasetIndex.load(str(tmp_path / "out")).num_samples == 14


def test_the_cli_prints_one_line_and_fails(tars: Path, tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "tools/convert.py", "--input", str(tars), "--output",
         str(tmp_path / "out"), "--input-format", "webdataset", "--workers", "1", "--quiet"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode != 0
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    assert any(tar in lines[0] and f"{key}.jpg" in lines[0] for tar, key in BAD.items())
    skipped = subprocess.run(
        [sys.executable, "tools/convert.py", "--input", str(tars), "--output",
         str(tmp_path / "out"), "--input-format", "webdataset", "--workers", "1", "--quiet",
         "--on-bad-input", "skip", "--overwrite"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert skipped.returncode == 0, skipped.stderr
    assert "; 2 skipped;" in skipped.stdout, skipped.stdout
    assert json.loads((tmp_path / "out" / "index.json").read_text())["num_samples"] == 12


def test_an_image_folder_bomb_under_header_validation_is_a_clear_error(tmp_path: Path) -> None:
    """The same check serves image folders: 'header' now applies the pixel limit too (a
    60,000² JPEG raised Pillow's DecompressionBombError out of the conversion)."""
    folder = tmp_path / "images" / "cats"
    folder.mkdir(parents=True)
    jpeg = photo_jpegs(1, seed=4, long_side=96)[0][1]
    (folder / "huge.jpg").write_bytes(_jpeg_with_size(jpeg, 60_000, 60_000))
    (folder / "large.jpg").write_bytes(_jpeg_with_size(jpeg, 9_000, 9_000))  # under Pillow's
    config = ConvertConfig(input=str(tmp_path / "images"), output=str(tmp_path / "out"),
                           validate_images="header", on_bad_input="skip", workers=1)  # fmt: skip
    report = convert(config, progress=False)
    assert report.skipped == 2 and report.samples == 0
    reasons = [record["reason"] for record in DatasetIndex.load(str(tmp_path / "out")).skipped]
    assert all("over the 67,108,864-pixel limit" in reason for reason in reasons), reasons
