"""The command-line tools as a user runs them: convert → verify → inspect, config errors,
overrides, and the demo end to end."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def tool(name: str, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ROOT / "tools" / name), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def test_convert_verify_inspect(photo_folder: Path, tmp_path: Path) -> None:
    output = tmp_path / "out"
    converted = tool(
        "convert.py", "--input", str(photo_folder), "--output", str(output),
        "--max-shard-samples", "25", "--workers", "2", "--quiet",
    )  # fmt: skip
    assert converted.returncode == 0, converted.stderr
    assert "60 samples in 3 shards" in converted.stdout
    verified = tool("verify.py", str(output), "--decode", "--quiet")
    assert verified.returncode == 0 and "OK — 3 shards, 60 samples" in verified.stdout
    for script in ("inspect.py", "inspect_dataset.py"):
        inspected = tool(script, str(output))
        assert inspected.returncode == 0, inspected.stderr
        assert "samples      60" in inspected.stdout
        assert "jpg (image), cls (int)" in inspected.stdout
        assert "class-00" in inspected.stdout and "█" in inspected.stdout


def test_config_file_and_overrides(photo_folder: Path, tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text(f'[convert]\ninput = "{photo_folder}"\nmax_shard_samples = 30\n')
    result = tool(
        "convert.py", "--config", str(config), "--output", str(tmp_path / "out"),
        "--convert.max_shard_samples=12", "--convert.format=parquet", "--quiet",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "60 samples in 5 shards" in result.stdout
    assert len(list((tmp_path / "out").glob("*.parquet"))) == 5


def test_unknown_config_key_exits_2_naming_the_nearest(tmp_path: Path) -> None:
    result = tool("convert.py", "--input", "x", "--output", "y", "--convert.workrs=2")
    assert result.returncode == 2
    assert "unknown key 'workrs'" in result.stderr and "did you mean 'workers'" in result.stderr


def test_bad_input_is_one_readable_line(tmp_path: Path) -> None:
    result = tool("convert.py", "--input", str(tmp_path / "missing"), "--output", str(tmp_path))
    assert result.returncode == 1
    assert result.stderr.startswith("error: ") and "does not exist" in result.stderr
    assert "Traceback" not in result.stderr


def test_index_existing_tars_in_place(tmp_path: Path) -> None:
    import webdataset

    from dataflow.datasets import photo_jpegs

    with webdataset.ShardWriter(str(tmp_path / "w-%03d.tar"), maxcount=10, verbose=0) as sink:
        for number, (label, data) in enumerate(photo_jpegs(25, seed=5)):
            sink.write({"__key__": f"s{number:04d}", "jpg": data, "cls": label})
    indexed = tool("convert.py", "--index-only", "--input", str(tmp_path), "--quiet")
    assert indexed.returncode == 0, indexed.stderr
    assert "indexed 25 samples in 3 tars" in indexed.stdout
    verified = tool("verify.py", str(tmp_path), "--decode", "--quiet")
    assert verified.returncode == 0, verified.stdout


@pytest.mark.timeout(300)
def test_demo_runs_end_to_end() -> None:
    result = tool("demo.py", "--quiet", timeout=280)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "started an embedded S3 server at http://127.0.0.1:" in result.stdout
    assert "verified 8 shards, 1797 samples, all decoded" in result.stdout
    assert "samples      1,797" in result.stdout
    assert "streamed one epoch back through dataflow.Loader: 1792 samples in 28 batches" in (
        result.stdout
    )
