"""Shared fixtures: a real S3 server over HTTP on loopback (reset per test), small real
image folders (scikit-learn digits and photo crops) and a corrupt JPEG."""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from dataflow.datasets import photo_jpegs, write_digits_folder
from dataflow.storage import StorageConfig, make_bucket
from dataflow.storage.local_s3 import LocalS3Server

os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def s3_server() -> Iterator[LocalS3Server]:
    with LocalS3Server() as server:
        yield server


@dataclass
class S3Bucket:
    server: LocalS3Server
    url: str
    """s3://<bucket> — fresh and empty for each test."""
    config: StorageConfig


@pytest.fixture
def s3(s3_server: LocalS3Server) -> S3Bucket:
    """A new bucket on a freshly reset server, and the StorageConfig that reaches it."""
    s3_server.reset()
    config = StorageConfig(
        endpoint_url=s3_server.endpoint_url, backoff_initial_s=0.01, backoff_max_s=0.1
    )
    url = f"s3://test-{uuid.uuid4().hex[:12]}"
    make_bucket(url, config=config)
    return S3Bucket(server=s3_server, url=url, config=config)


@pytest.fixture(scope="session")
def digits_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """scikit-learn's 1,797 digits as PNGs in class folders (read-only for tests)."""
    root = tmp_path_factory.mktemp("digits")
    write_digits_folder(str(root))
    return root


@pytest.fixture(scope="session")
def photo_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """60 real-photo JPEG crops in 10 class folders (read-only for tests)."""
    root = tmp_path_factory.mktemp("photos")
    for number, (label, data) in enumerate(photo_jpegs(60, seed=1)):
        directory = root / f"class-{label:02d}"
        directory.mkdir(exist_ok=True)
        (directory / f"photo-{number:04d}.jpg").write_bytes(data)
    return root


@pytest.fixture
def small_photo_copy(photo_folder: Path, tmp_path: Path) -> Path:
    """A private, writable copy of ``photo_folder`` that a test may damage."""
    target = tmp_path / "photos"
    shutil.copytree(photo_folder, target)
    return target
