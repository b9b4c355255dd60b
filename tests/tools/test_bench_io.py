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
    assert list(stages) == ["storage", "+ format", "loader, cold", "+ decode + batch"]
    assert all(stage["samples_per_s"] > 0 for stage in stages.values())
    assert report["bottleneck"] in ("storage", "+ format", "+ decode + batch")
    assert report["dataset"]["samples"] == 60 and report["dataset"]["shards"] == 6
    assert report["config"]["data"]["url"] == url
    assert "machine" in report and "date" in report
    assert f"bottleneck: {report['bottleneck']}" in done.stdout
    assert (tmp_path / "bench_io.png").stat().st_size > 10_000
