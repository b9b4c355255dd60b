"""Restartable and multi-node conversion: interrupted runs resume into byte-identical output;
node slices merge into the same dataset as one node would write."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dataflow.convert.config import ConvertConfig
from dataflow.convert.job import STAGING, ConversionError, convert, merge

ROOT = Path(__file__).resolve().parents[2]


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}  # fmt: skip


def without_source(files: dict[str, bytes]) -> dict[str, bytes]:
    """index.json names the input path; everything else must match byte for byte."""
    return {name: data for name, data in files.items() if name != "index.json"}


def test_failed_run_resumes_into_identical_output(small_photo_copy: Path, tmp_path: Path) -> None:
    options = {"max_shard_samples": 4, "workers": 1, "shuffle": False}
    convert(ConvertConfig(input=str(small_photo_copy), output=str(tmp_path / "clean"), **options),
            progress=False)  # fmt: skip
    victim = sorted(small_photo_copy.rglob("*.jpg"))[30]  # in shard 7 of 15
    original = victim.read_bytes()
    damaged = bytearray(original)
    damaged[len(damaged) // 2 : len(damaged) // 2 + 64] = b"\0" * 64  # same size: same plan
    victim.write_bytes(bytes(damaged))
    resumed_output = tmp_path / "resumed"
    config = ConvertConfig(input=str(small_photo_copy), output=str(resumed_output), **options)
    with pytest.raises(ConversionError):
        convert(config, progress=False)
    assert not (resumed_output / "index.json").exists()
    assert len(list((resumed_output / STAGING).glob("*.json"))) == 7 + 1  # 7 shards + plan
    victim.write_bytes(original)
    report = convert(config, progress=False)
    assert report.shards_resumed == 7
    assert tree(resumed_output) == tree(tmp_path / "clean") | {
        "index.json": (resumed_output / "index.json").read_bytes()
    }
    assert not (resumed_output / STAGING).exists()
    assert (resumed_output / "index.json").read_bytes().replace(b"resumed", b"clean") == (
        tmp_path / "clean" / "index.json"
    ).read_bytes()


@pytest.mark.timeout(180)
def test_killed_run_resumes_into_identical_output(digits_folder: Path, tmp_path: Path) -> None:
    command = [sys.executable, str(ROOT / "tools" / "convert.py"), "--input", str(digits_folder),
               "--max-shard-samples", "12", "--workers", "1", "--quiet"]  # fmt: skip
    subprocess.run([*command, "--output", str(tmp_path / "clean")], check=True, timeout=120)
    output = tmp_path / "killed"
    process = subprocess.Popen([*command, "--output", str(output)])
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        records = list((output / STAGING).glob("shard-*.json")) if output.exists() else []
        if len(records) >= 20:
            break
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    assert process.wait(timeout=30) == -signal.SIGKILL, "conversion ended before it was killed"
    assert not (output / "index.json").exists()
    subprocess.run([*command, "--output", str(output)], check=True, timeout=120)
    assert without_source(tree(output)) == without_source(tree(tmp_path / "clean"))
    assert not [p for p in output.rglob(".*") if p.name.startswith(".")]  # no temp files left


def test_changed_input_is_not_mixed_into_an_unfinished_run(
    small_photo_copy: Path, tmp_path: Path
) -> None:
    config = ConvertConfig(
        input=str(small_photo_copy), output=str(tmp_path / "out"), max_shard_samples=4, workers=1
    )
    victim = sorted(small_photo_copy.rglob("*.jpg"))[-1]
    victim.write_bytes(b"not a jpeg")
    with pytest.raises(ConversionError):
        convert(config, progress=False)
    victim.unlink()
    with pytest.raises(ConversionError, match="different input or settings"):
        convert(config, progress=False)
    overwrite = ConvertConfig(**{**config.__dict__, "overwrite": True})
    assert convert(overwrite, progress=False).samples == 59


def test_nodes_convert_disjoint_slices_and_merge(photo_folder: Path, tmp_path: Path) -> None:
    single = tmp_path / "single"
    convert(ConvertConfig(input=str(photo_folder), output=str(single), max_shard_samples=5,
                          workers=1), progress=False)  # fmt: skip
    shared = tmp_path / "shared"
    reports = []
    for rank in range(3):
        config = ConvertConfig(input=str(photo_folder), output=str(shared), max_shard_samples=5,
                               workers=1, node_rank=rank, num_nodes=3)  # fmt: skip
        reports.append(convert(config, progress=False))
    assert [r.shards for r in reports[:2]] == [4, 4]
    assert [r.index_written for r in reports] == [False, False, True]
    # The last node to finish found every shard done and wrote the index of all 12 itself.
    assert reports[-1].shards == 12 and reports[-1].samples == 60
    assert tree(shared) == tree(single)


def test_merge_refuses_unfinished_slices(photo_folder: Path, tmp_path: Path) -> None:
    config = ConvertConfig(input=str(photo_folder), output=str(tmp_path / "out"),
                           max_shard_samples=5, workers=1, node_rank=1, num_nodes=2)  # fmt: skip
    convert(config, progress=False)
    with pytest.raises(ConversionError, match="6 of 12 shards are not finished"):
        merge(str(tmp_path / "out"))


def test_node_slice_from_environment(photo_folder: Path, tmp_path: Path) -> None:
    environment = {**os.environ, "RANK": "1", "WORLD_SIZE": "2"}
    subprocess.run(
        [sys.executable, str(ROOT / "tools" / "convert.py"), "--input", str(photo_folder),
         "--output", str(tmp_path / "out"), "--max-shard-samples", "30", "--quiet"],
        check=True, env=environment, timeout=120,
    )  # fmt: skip
    assert sorted(p.name for p in (tmp_path / "out").glob("*.tar")) == ["shard-000001.tar"]
    result = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "convert.py"), "--merge", "--output",
         str(tmp_path / "out")], capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 1 and "not finished" in result.stderr
