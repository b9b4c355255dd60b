"""tools/verify.py and dataflow.verify: a damaged dataset is caught, and each problem names
its shard, sample and byte offset."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from dataflow.convert.config import ConvertConfig
from dataflow.convert.job import convert
from dataflow.index import DatasetIndex, load_table
from dataflow.verify import verify_dataset

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def dataset(photo_folder: Path, tmp_path: Path) -> Path:
    output = tmp_path / "data"
    convert(
        ConvertConfig(input=str(photo_folder), output=str(output), max_shard_samples=15, workers=1),
        progress=False,
    )
    return output


def problems(root: Path, decode: bool = False) -> list[str]:
    return [str(p) for p in verify_dataset(str(root), decode=decode, progress=False).problems]


def test_clean_dataset_passes(dataset: Path) -> None:
    report = verify_dataset(str(dataset), decode=True, progress=False)
    assert report.ok and report.shards == 4 and report.samples == 60


def test_flipped_byte_names_the_sample(dataset: Path) -> None:
    index = DatasetIndex.load(str(dataset))
    shard = index.shards[2]
    table = load_table(str(dataset), index, shard)
    offset, size = table.field_span(9, 0)  # type: ignore[misc]
    path = dataset / shard.path
    data = bytearray(path.read_bytes())
    data[offset + size // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    found = problems(dataset)
    assert f"{shard.path}: checksum differs from the index" in found
    assert (
        f"{shard.path} sample {table.keys[9]!r} at byte {int(table.offsets[9])}: "
        "sample bytes differ from the index"
    ) in found
    assert len(found) == 2


def test_missing_truncated_and_foreign_shards(dataset: Path) -> None:
    index = DatasetIndex.load(str(dataset))
    (dataset / index.shards[0].path).unlink()
    last = dataset / index.shards[3].path
    last.write_bytes(last.read_bytes()[:20_000])
    found = problems(dataset)
    assert any(p.startswith(f"{index.shards[0].path}: cannot be read") and "not found" in p
               for p in found)  # fmt: skip
    assert any(p.startswith(f"{index.shards[3].path}: has 20000 bytes") for p in found)
    assert any("past the end" in p or "truncated" in p for p in found)


def test_damaged_header_and_table(dataset: Path) -> None:
    index = DatasetIndex.load(str(dataset))
    shard = dataset / index.shards[1].path
    data = bytearray(shard.read_bytes())
    data[0:8] = b"../evil."  # the first member's name
    shard.write_bytes(bytes(data))
    table = dataset / index.shards[2].table
    table.write_bytes(table.read_bytes()[:-10])
    found = problems(dataset)
    assert any(index.shards[1].path in p and "byte 0" in p for p in found)
    assert any(p.startswith(index.shards[2].table) and "does not match" in p for p in found)


def test_decode_finds_an_undecodable_image_the_index_agrees_with(
    small_photo_copy: Path, tmp_path: Path
) -> None:
    victim = sorted(small_photo_copy.rglob("*.jpg"))[5]
    victim.write_bytes(victim.read_bytes()[:3000])
    output = tmp_path / "data"
    convert(ConvertConfig(input=str(small_photo_copy), output=str(output), workers=1,
                          validate_images="none"), progress=False)  # fmt: skip
    assert problems(output) == []
    found = problems(output, decode=True)
    key = victim.relative_to(small_photo_copy).with_suffix("").as_posix()
    assert len(found) == 1 and repr(key) in found[0] and "undecodable JPEG" in found[0]


def test_tool_exit_codes_and_report(dataset: Path) -> None:
    tool = [sys.executable, str(ROOT / "tools" / "verify.py"), "--quiet"]
    ok = subprocess.run([*tool, str(dataset)], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0 and ok.stdout.startswith("OK")
    index = json.loads((dataset / "index.json").read_text())
    (dataset / index["shards"][0]["path"]).unlink()
    bad = subprocess.run([*tool, str(dataset)], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1
    assert f"BAD {index['shards'][0]['path']}" in bad.stdout and "FAILED" in bad.stdout
    missing = subprocess.run([*tool, str(dataset / "nowhere")], capture_output=True, text=True,
                             timeout=120)  # fmt: skip
    assert missing.returncode == 1 and "index.json does not exist" in missing.stderr
