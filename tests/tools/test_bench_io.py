"""tools/bench_io.py on a dataset in S3 (the tests' local server), in seconds: every stage
measured, a bottleneck named, the report and the plot written."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from test_cli import tool

from dataflow.convert.config import ConvertConfig
from dataflow.convert.job import convert

if TYPE_CHECKING:
    from conftest import S3Bucket


@pytest.mark.timeout(240)
def test_bench_io_measures_each_stage_of_the_configured_loader(
    photo_folder: Path, s3: S3Bucket, tmp_path: Path
) -> None:
    url = f"{s3.url}/photos"
    convert(ConvertConfig(input=str(photo_folder), output=url, max_shard_samples=10, workers=1),
            s3.config, progress=False)  # fmt: skip
    done = tool("bench_io.py", f"--data.url={url}", "--data.global_batch=8",
                "--data.image_size=64", f"--storage.endpoint_url={s3.config.endpoint_url}",
                "--seconds", "0.5", "--out", str(tmp_path), "--quiet")  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "bench_io.json").read_text())
    stages = report["stages"]
    # Each row adds one stage to the one above, all read cold from storage.
    assert list(stages) == ["storage", "+ format", "+ decode + batch"]
    rates = [stage["samples_per_s"] for stage in stages.values()]
    assert all(rate > 0 for rate in rates)
    # Adding a stage cannot make a pipeline faster: the table never rises.
    assert rates == sorted(rates, reverse=True), rates
    assert all(s["samples_per_s"] <= s["measured_samples_per_s"] for s in stages.values())
    assert report["decode_and_batch_alone"]["samples_per_s"] > 0
    assert report["bottleneck"] in ("storage", "format", "decode + batch")
    assert report["dataset"]["samples"] == 60 and report["dataset"]["shards"] == 6
    assert report["config"]["data"]["url"] == url
    assert "machine" in report and "date" in report
    # One bottleneck, named once.
    assert done.stdout.count("bottleneck") == 1, done.stdout
    assert f"bottleneck: {report['bottleneck']}" in done.stdout
    assert (tmp_path / "bench_io.png").stat().st_size > 10_000


@pytest.mark.timeout(240)
def test_bench_io_out_may_name_the_report_file(photo_folder: Path, tmp_path: Path) -> None:
    shards = tmp_path / "shards"
    convert(ConvertConfig(input=str(photo_folder), output=str(shards), max_shard_samples=10,
                          workers=1), progress=False)  # fmt: skip
    out = tmp_path / "reports" / "x.json"
    done = tool("bench_io.py", f"--data.url={shards}", "--data.global_batch=8",
                "--data.image_size=64", "--seconds", "0.3", "--out", str(out))  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert out.is_file(), sorted(p.name for p in out.parent.iterdir())
    assert json.loads(out.read_text())["config"]["data"]["url"] == str(shards)
    assert (tmp_path / "reports" / "x.png").stat().st_size > 10_000
    assert f"report: {out}" in done.stdout
    # Not quiet: the loader's own stage table is printed too, and still one bottleneck.
    assert done.stdout.count("bottleneck") == 1, done.stdout


@pytest.mark.timeout(120)
def test_bench_io_stops_with_one_line_when_the_dataset_is_smaller_than_a_batch(
    photo_folder: Path, tmp_path: Path
) -> None:
    shards = tmp_path / "shards"
    convert(ConvertConfig(input=str(photo_folder), output=str(shards), max_shard_samples=10,
                          workers=1), progress=False)  # fmt: skip
    done = tool("bench_io.py", f"--data.url={shards}", "--data.global_batch=128",
                "--seconds", "0.3", "--out", str(tmp_path / "out"), "--quiet",
                timeout=100)  # fmt: skip
    assert done.returncode == 1, done.stderr[-3000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "data.global_batch" in lines[0], done.stderr[-3000:]
