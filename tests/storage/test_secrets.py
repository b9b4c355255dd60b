"""Credentials stay secret, and a permanent fault is a clear error at once.

The canary run (secrets_worker.py, a child process whose AWS credentials are canaries):
convert to S3, train an epoch through resets, 503s and 500s with the audit log and the shard
cache on, hit a deleted shard and an access-denied read — with every logger at DEBUG as
``--verbose`` sets them. No canary may appear in its output (logs, errors, metrics, loader
state) or in any file it wrote, and the index and cache must not record them either.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from support.faultproxy import FaultProxy, FaultSchedule

from dataflow.storage import StorageConfig, StorageError, read_bytes, write_bytes

if TYPE_CHECKING:
    from conftest import S3Bucket

ROOT = Path(__file__).resolve().parents[2]
CANARIES = {
    "AWS_ACCESS_KEY_ID": "AKIACANARY0SHARDFLOW",
    "AWS_SECRET_ACCESS_KEY": "canary/Secret+Key0123456789shardflowXYZ",
    "AWS_SESSION_TOKEN": "canarySessionToken0123456789shardflow",
}


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_credentials_appear_in_no_log_error_metric_or_file(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    env = dict(os.environ, **CANARIES, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    done = subprocess.run(
        [sys.executable, "tests/storage/secrets_worker.py", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=280,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    seen = done.stdout + done.stderr
    # The run did what it says: faults, a missing shard and a denial were all met.
    assert "== samples\n60" in done.stdout, done.stdout[-2000:]
    assert "== deleted shard" in done.stdout and "== access denied" in done.stdout
    assert "DEBUG dataflow" in done.stderr  # our loggers really were at DEBUG
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.parent.name == "audit" for p in files)
    for name, canary in CANARIES.items():
        for piece in (canary, canary[:12], canary[-12:]):
            assert piece not in seen, f"{name} appears in the output"
            for path in files:
                assert piece.encode() not in path.read_bytes(), f"{name} appears in {path}"
                assert piece not in str(path), f"{name} appears in a file name"


@pytest.mark.timeout(60)
def test_access_denied_fails_at_once_naming_the_url_the_attempts_and_the_status(
    s3: S3Bucket,
) -> None:
    url = f"{s3.url}/private/object.bin"
    write_bytes(url, b"x" * 1000, config=s3.config)
    with FaultProxy(s3.server.endpoint_url, FaultSchedule(script=("denied_403",) * 50)) as proxy:
        through = StorageConfig(endpoint_url=proxy.url, backoff_initial_s=0.01)
        started = time.monotonic()
        with pytest.raises(StorageError) as caught:
            read_bytes(url, config=through)
        elapsed = time.monotonic() - started
        requests = proxy.stats["requests"]
    message = str(caught.value)
    assert url in message, message
    assert "AccessDenied" in message or "403" in message, message
    assert "after 1 attempt" in message, message  # permanent: not retried
    assert requests == 1, requests
    assert elapsed < 5, elapsed  # never a wait, let alone a hang
