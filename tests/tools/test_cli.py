"""The command-line tools as a user runs them: convert → verify → inspect, config errors,
overrides, and the demo end to end."""

from __future__ import annotations

import json
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


def test_row_restarts_are_off_by_default_and_on_by_a_flag(
    photo_folder: Path, tmp_path: Path
) -> None:
    for flags, expected in (((), False), (("--jpeg-row-restarts",), True)):
        output = tmp_path / f"out-{expected}"
        result = tool("convert.py", "--input", str(photo_folder), "--output", str(output),
                      "--workers", "1", "--quiet", *flags)  # fmt: skip
        assert result.returncode == 0, result.stderr
        index = json.loads((output / "index.json").read_text())
        assert index["metadata"]["jpeg_row_restarts"] is expected
        shard = (output / index["shards"][0]["path"]).read_bytes()
        assert (b"\xff\xdd\x00\x04" in shard) is expected  # a DRI segment in the JPEGs


def test_unknown_config_key_exits_2_naming_the_nearest(tmp_path: Path) -> None:
    result = tool("convert.py", "--input", "x", "--output", "y", "--convert.workrs=2")
    assert result.returncode == 2
    assert "unknown key 'workrs'" in result.stderr and "did you mean 'workers'" in result.stderr


def test_bad_input_is_one_readable_line(tmp_path: Path) -> None:
    result = tool("convert.py", "--input", str(tmp_path / "missing"), "--output", str(tmp_path))
    assert result.returncode == 1
    assert result.stderr.startswith("error: ") and "does not exist" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "flags",
    [
        ("--max-shard-bytes", "0"),
        ("--max-shard-samples", "-1"),
        ("--workers", "-1"),
        ("--num-nodes", "0"),
        ("--node-rank", "5", "--num-nodes", "2"),
        ("--row-group-rows", "0"),
    ],
)
def test_bad_flag_values_are_one_line_naming_the_flag(
    photo_folder: Path, tmp_path: Path, flags: tuple[str, ...]
) -> None:
    result = tool("convert.py", "--input", str(photo_folder), "--output", str(tmp_path / "o"),
                  "--quiet", *flags)  # fmt: skip
    assert result.returncode != 0
    assert result.stderr.startswith(f"error: {flags[0]} ") and result.stderr.count("\n") == 1, (
        result.stderr
    )
    assert not (tmp_path / "o").exists()


def test_verify_threads_must_be_positive(photo_folder: Path, tmp_path: Path) -> None:
    converted = tool("convert.py", "--input", str(photo_folder), "--output", str(tmp_path),
                     "--workers", "1", "--quiet")  # fmt: skip
    assert converted.returncode == 0, converted.stderr
    result = tool("verify.py", str(tmp_path), "--threads", "0", "--quiet")
    assert result.returncode != 0
    assert result.stderr.startswith("error: --threads 0") and result.stderr.count("\n") == 1, (
        result.stderr
    )


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


def test_index_only_writes_beside_the_tars_not_into_another_output(tmp_path: Path) -> None:
    import webdataset

    from dataflow.datasets import photo_jpegs

    with webdataset.ShardWriter(str(tmp_path / "w-%03d.tar"), maxcount=10, verbose=0) as sink:
        for number, (label, data) in enumerate(photo_jpegs(12, seed=5)):
            sink.write({"__key__": f"s{number:04d}", "jpg": data, "cls": label})
    elsewhere = tool("convert.py", "--index-only", "--input", str(tmp_path), "--output",
                     str(tmp_path / "elsewhere"), "--quiet")  # fmt: skip
    assert elsewhere.returncode != 0
    assert elsewhere.stderr.startswith("error: --index-only") and "--output" in elsewhere.stderr
    assert not (tmp_path / "index.json").exists()
    same = tool("convert.py", "--index-only", "--input", str(tmp_path), "--output",
                f"{tmp_path}/", "--quiet")  # fmt: skip
    assert same.returncode == 0, same.stderr
    assert "indexed 12 samples in 2 tars" in same.stdout


@pytest.mark.timeout(400)
def test_demo_runs_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    result = tool("demo.py", "--quiet", f"--train.out_dir={out}", timeout=380)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "started an embedded S3 server at http://127.0.0.1:" in result.stdout
    assert "wrote 1438 training and 359 held-out digit images" in result.stdout
    assert "shardflow-demo/digits: 6 shards, 1438 samples, all decoded" in result.stdout
    assert "shardflow-demo/digits-held-out: 2 shards, 359 samples, all decoded" in result.stdout
    assert "samples      1,438" in result.stdout
    assert "streamed one epoch back through dataflow.Loader: 1408 samples in 22 batches" in (
        result.stdout
    )
    # Training: 2 processes over the S3 shards, 6 epochs of 22 steps, evaluated each epoch.
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    start = next(r for r in records if r["event"] == "start")
    assert start["world_size"] == 2 and start["strategy"] == "ddp"
    end = next(r for r in records if r["event"] == "end")
    assert end["steps"] == 132 and 0 <= end["stall_fraction"] < 1
    evals = [r for r in records if r["event"] == "eval"]
    assert [r["epoch"] for r in evals] == list(range(6))
    assert all(r["targets"] == 359 for r in evals)
    # Digits are easy: a learning model is far above chance (0.1) after six epochs.
    assert evals[-1]["accuracy"] > 0.9, evals
    assert "held-out accuracy" in result.stdout
    assert (out / "training.png").stat().st_size > 10_000
    # Every epoch: 22 global batches of 64 distinct digits over the two ranks' audit logs.
    by_epoch: dict[str, list[str]] = {}
    for rank in (0, 1):
        for line in (out / "audit" / f"rank-{rank}.tsv").read_text().splitlines():
            epoch, _, key = line.split("\t")
            by_epoch.setdefault(epoch, []).append(key)
    assert sorted(by_epoch) == [str(e) for e in range(6)]
    assert all(len(keys) == len(set(keys)) == 22 * 64 for keys in by_epoch.values())
