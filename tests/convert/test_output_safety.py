"""What a conversion may write: never into, onto or around its own input, never over files it
did not create (local and S3), and never two conversions of one node slice at once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dataflow import storage
from dataflow.convert.config import ConvertConfig
from dataflow.convert.job import STAGING, ConversionError, convert
from dataflow.datasets import photo_jpegs
from dataflow.index import DatasetIndex

from .gates import GatedFolder

ROOT = Path(__file__).resolve().parents[2]


def tool(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(ROOT / "tools" / "convert.py"), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def snapshot(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}  # fmt: skip


def webdataset_folder(root: Path, count: int = 40) -> Path:
    """Tars named as the converter names its shards: the layout that lost images."""
    import webdataset

    root.mkdir(parents=True)
    with webdataset.ShardWriter(str(root / "shard-%06d.tar"), maxcount=10, verbose=0) as sink:
        for number, (label, jpeg) in enumerate(photo_jpegs(count, seed=7)):
            sink.write({"__key__": f"s{number:05d}", "jpg": jpeg, "cls": label})
    return root


def test_output_equal_to_the_input_is_refused_and_the_input_kept(tmp_path: Path) -> None:
    source = webdataset_folder(tmp_path / "wds")
    before = snapshot(source)
    config = ConvertConfig(input=str(source), output=str(source), max_shard_samples=7, workers=1)
    with pytest.raises(ConversionError, match=r"--output .* is the input"):
        convert(config, progress=False)
    process = tool("--input", str(source), "--output", f"{source}/", "--quiet")
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 1
    assert stderr.startswith("error: --output") and stderr.count("\n") == 1, stderr
    assert snapshot(source) == before


@pytest.mark.parametrize("where", ["inside", "around", "symlink"])
def test_output_inside_around_or_linked_to_the_input_is_refused(
    tmp_path: Path, photo_folder: Path, where: str
) -> None:
    source = tmp_path / "photos"
    source.symlink_to(photo_folder, target_is_directory=True)
    output = {
        "inside": source / "class-03" / "shards",
        "around": photo_folder.parent,
        "symlink": tmp_path / "alias",
    }[where]
    if where == "symlink":
        output.symlink_to(photo_folder, target_is_directory=True)
    before = snapshot(photo_folder)
    with pytest.raises(ConversionError, match="--output"):
        convert(ConvertConfig(input=str(source), output=str(output), workers=1), progress=False)
    assert snapshot(photo_folder) == before


def test_a_sibling_whose_name_extends_the_input_is_fine(tmp_path: Path) -> None:
    source = webdataset_folder(tmp_path / "wds", count=12)
    report = convert(ConvertConfig(input=str(source), output=str(tmp_path / "wds-shards"),
                                   workers=1), progress=False)  # fmt: skip
    assert report.samples == 12


@pytest.mark.timeout(120)
def test_s3_output_overlapping_the_input_is_refused(s3, photo_folder: Path) -> None:  # type: ignore[no-untyped-def]
    for path in sorted(photo_folder.rglob("*.jpg"))[:12]:
        relative = path.relative_to(photo_folder).as_posix()
        storage.write_bytes(f"{s3.url}/raw/{relative}", path.read_bytes(), config=s3.config)
    before = storage.list_objects(f"{s3.url}/raw", config=s3.config)
    for output in (f"{s3.url}/raw/", f"{s3.url}/raw/shards", s3.url):
        config = ConvertConfig(input=f"{s3.url}/raw", output=output, workers=1)
        with pytest.raises(ConversionError, match="--output"):
            convert(config, s3.config, progress=False)
    assert storage.list_objects(f"{s3.url}/raw", config=s3.config) == before
    config = ConvertConfig(input=f"{s3.url}/raw", output=f"{s3.url}/raw-shards", workers=1)
    assert convert(config, s3.config, progress=False).samples == 12


def test_foreign_files_in_the_output_are_never_overwritten(
    photo_folder: Path, tmp_path: Path
) -> None:
    output = tmp_path / "out"
    output.mkdir()
    foreign = output / "shard-000000.tar"
    foreign.write_bytes(b"somebody else's tar")
    for overwrite in (False, True):
        config = ConvertConfig(input=str(photo_folder), output=str(output), workers=1,
                               overwrite=overwrite)  # fmt: skip
        with pytest.raises(ConversionError, match=r"shard-000000\.tar"):
            convert(config, progress=False)
        assert foreign.read_bytes() == b"somebody else's tar"
    assert sorted(p.name for p in output.iterdir()) == ["shard-000000.tar"]


def test_overwrite_removes_only_what_the_previous_index_lists(
    photo_folder: Path, tmp_path: Path
) -> None:
    output = tmp_path / "out"
    first = ConvertConfig(input=str(photo_folder), output=str(output), max_shard_samples=25,
                          workers=1)  # fmt: skip
    convert(first, progress=False)
    (output / "notes.txt").write_text("mine")
    (output / "shard-000005.tar").write_bytes(b"not from a conversion")
    again = ConvertConfig(**{**first.__dict__, "max_shard_samples": 7, "overwrite": True})
    with pytest.raises(ConversionError, match=r"shard-000005\.tar"):
        convert(again, progress=False)
    assert (output / "shard-000005.tar").read_bytes() == b"not from a conversion"
    (output / "shard-000005.tar").unlink()
    report = convert(again, progress=False)
    assert report.shards == 9
    assert (output / "notes.txt").read_text() == "mine"


@pytest.mark.timeout(120)
def test_foreign_objects_on_s3_are_never_overwritten(s3, photo_folder: Path) -> None:  # type: ignore[no-untyped-def]
    output = f"{s3.url}/out"
    foreign = f"{output}/shard-000001.tar"
    storage.write_bytes(foreign, b"somebody else's object", config=s3.config)
    for overwrite in (False, True):
        config = ConvertConfig(input=str(photo_folder), output=output, max_shard_samples=30,
                               workers=1, overwrite=overwrite)  # fmt: skip
        with pytest.raises(ConversionError, match=r"shard-000001\.tar"):
            convert(config, s3.config, progress=False)
        assert storage.read_bytes(foreign, config=s3.config) == b"somebody else's object"
    assert storage.list_files(output, config=s3.config) == [foreign]


@pytest.mark.timeout(180)
def test_a_second_conversion_into_the_same_output_fails_with_one_line(
    gated_digits: GatedFolder, tmp_path: Path
) -> None:
    output = tmp_path / "out"
    command = ["--input", str(gated_digits.root), "--output", str(output), "--no-shuffle",
               "--max-shard-samples", "4", "--workers", "1", "--on-bad-input", "skip",
               "--quiet"]  # fmt: skip
    first = tool(*command)
    second = None
    try:
        deadline = time.monotonic() + 60
        while len(list((output / STAGING).glob("shard-*.json"))) < 5:
            assert time.monotonic() < deadline and first.poll() is None
            time.sleep(0.01)
        second = tool(*command)
        _, second_error = second.communicate(timeout=30)
        assert gated_digits.release()
        first_output, first_error = first.communicate(timeout=60)
    finally:
        gated_digits.release(wait_s=0)
        for process in (first, second):
            if process is not None and process.poll() is None:
                process.kill()
    assert second.returncode == 1
    assert second_error.startswith("error: ") and second_error.count("\n") == 1, second_error
    assert "another conversion" in second_error
    assert first.returncode == 0, first_error
    assert "20 samples" in first_output and "1 skipped" in first_output
    assert DatasetIndex.load(str(output)).num_samples == 20


@pytest.mark.timeout(60)
def test_s3_lease_is_exclusive_and_a_stale_one_is_taken_over(s3) -> None:  # type: ignore[no-untyped-def]
    from dataflow.convert.output import LEASE_SECONDS, Lease

    output = f"{s3.url}/out"
    with Lease(output, 0, s3.config):
        with pytest.raises(ConversionError, match="another conversion"):
            Lease(output, 0, s3.config).acquire()
        with Lease(output, 1, s3.config):  # another node's slice: no conflict
            pass
    # A lease nobody renewed for longer than LEASE_SECONDS (its host died) is taken over.
    url = storage.join_url(output, STAGING, "lease-node-0.json")
    stale = {"token": "x", "host": "gone", "pid": 1, "renewed": time.time() - LEASE_SECONDS - 1}
    storage.write_bytes(url, json.dumps(stale).encode(), config=s3.config)
    with Lease(output, 0, s3.config) as lease:
        held = json.loads(storage.read_bytes(url, config=s3.config))
        assert held["token"] == lease.token
    assert not storage.exists(url, config=s3.config)
