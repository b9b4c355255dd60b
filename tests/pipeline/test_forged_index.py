"""A forged or damaged index.json must not decide how much memory the loader takes.

Each case edits the index of a copy of the photos dataset and runs one epoch in a child
process whose address space is capped (RLIMIT_AS): a loader that allocates by a forged
number dies there with a MemoryError, reported back, instead of taking this machine's
memory; a fixed one ends in a typed error or delivers the samples that are intact.
"""

from __future__ import annotations

import json
import resource
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from dataflow import storage
from dataflow.convert.config import ConvertConfig
from dataflow.convert.job import convert
from dataflow.storage import StorageConfig

if TYPE_CHECKING:
    from conftest import S3Bucket

ROOT = Path(__file__).resolve().parents[2]
ADDRESS_SPACE = 6 << 30  # torch and the loader's threads map ~2 GiB; the forged sizes far more

EPOCH = """
import json, sys
from dataflow import DataConfig, Loader
from dataflow.storage import StorageConfig
try:
    storage_config = StorageConfig(**json.loads(sys.argv[3]))
    loader = Loader(DataConfig(url=sys.argv[1], global_batch=10, image_size=32,
                               shuffle_window=3, **json.loads(sys.argv[2])), storage_config,
                    rank=0, world_size=1)
    keys = [key for batch in loader for key in batch["__key__"]]
    print(json.dumps({"delivered": len(keys), "skipped": len(loader.skipped)}))
except Exception as error:
    print(json.dumps({"error": type(error).__name__, "message": str(error)}))
"""


def _cap_address_space() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE, ADDRESS_SPACE))


def run_epoch(url: str, storage_options: dict[str, Any], **options: Any) -> dict[str, Any]:
    """One epoch in a child process with a capped address space and a time limit."""
    done = subprocess.run(
        [sys.executable, "-c", EPOCH, url, json.dumps(options), json.dumps(storage_options)],
        cwd=ROOT, capture_output=True, text=True, timeout=60, preexec_fn=_cap_address_space,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    result: dict[str, Any] = json.loads(done.stdout.splitlines()[-1])
    return result


def forge_index(url: str, forge: Callable[[dict[str, Any]], None],
                config: StorageConfig | None = None) -> None:  # fmt: skip
    index_url = storage.join_url(url, "index.json")
    document = json.loads(storage.read_bytes(index_url, config=config))
    forge(document)
    document["num_samples"] = sum(shard["samples"] for shard in document["shards"])
    storage.write_bytes(index_url, json.dumps(document).encode(), config=config)


def epoch_with_forged_index(
    photos: str, tmp_path: Path, forge: Callable[[dict[str, Any]], None], **options: Any
) -> dict[str, Any]:
    """One epoch over a copy of ``photos`` whose index.json ``forge`` edited; what it did."""
    copy = tmp_path / "ds"
    shutil.copytree(photos, copy)
    forge_index(str(copy), forge)
    return run_epoch(str(copy), {}, **options)


@pytest.mark.timeout(180)
def test_a_forged_shard_size_is_not_allocated(photos: str, tmp_path: Path) -> None:
    """``bytes = 1e12``: the shard buffer was sized by it (a MemoryError in buffers.py). The
    file's own size bounds the read; every sample still checks against its own digest."""

    def forge(document: dict[str, Any]) -> None:
        document["shards"][1]["bytes"] = 10**12

    outcome = epoch_with_forged_index(photos, tmp_path, forge)
    assert outcome == {"delivered": 60, "skipped": 0}, outcome


@pytest.mark.timeout(180)
def test_a_forged_sample_count_is_refused_before_the_order_is_built(
    photos: str, tmp_path: Path
) -> None:
    """``samples = 2e9``: the epoch order's block was a 15 GiB np.arange."""

    def forge(document: dict[str, Any]) -> None:
        document["shards"][1]["samples"] = 2_000_000_000

    outcome = epoch_with_forged_index(photos, tmp_path, forge, on_bad_sample="skip")
    assert outcome.get("error") == "DatasetIndexError", outcome
    assert "shards[1].samples = 2000000000" in outcome["message"]
    assert "index.json" in outcome["message"]


@pytest.mark.timeout(120)
def test_a_forged_shard_size_costs_one_request_on_s3(photo_folder: Path, s3: S3Bucket) -> None:
    """On S3 the same ``bytes = 1e12`` was split into ~119,000 ranged GETs, each answered 416
    (still sending after 12 minutes, 2.8 GB RSS); now one HEAD finds the object's size when
    the index claims far more than the shard's table lists, and the samples check against
    their own digests."""
    url = f"{s3.url}/photos"
    convert(ConvertConfig(input=str(photo_folder), output=url, max_shard_samples=8, workers=1),
            s3.config, progress=False)  # fmt: skip

    def forge(document: dict[str, Any]) -> None:
        document["shards"][1]["bytes"] = 10**12

    forge_index(url, forge, s3.config)
    storage_options = {"endpoint_url": s3.config.endpoint_url, "backoff_initial_s": 0.01}
    outcome = run_epoch(url, storage_options, drop_last=False)
    assert outcome == {"delivered": 60, "skipped": 0}, outcome
