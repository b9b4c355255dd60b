"""Least-privilege credentials against an S3 server that enforces IAM (``support.iam_s3``).

- A converting user needs, on its bucket, s3:ListBucket plus s3:GetObject, s3:PutObject and
  s3:DeleteObject; no bucket-level permission beyond listing (the bucket exists already).
- Verifying and training need s3:GetObject alone: read-only keys train.
- Those read-only keys cannot write: a conversion fails at its first write with an
  access-denied error after one attempt, and leaves nothing behind. A bucket outside a
  user's policy is denied the same way.

The tools run as child processes with only the user's keys in their environment, as a user
would run them.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.iam_s3 import IamS3Server, Keys

ROOT = Path(__file__).resolve().parents[2]
WRITE = ["s3:ListBucket", "s3:GetObject", "s3:PutObject", "s3:DeleteObject"]
READ = ["s3:GetObject"]


class Users:
    def __init__(self, server: IamS3Server) -> None:
        self.server = server
        self.writer = server.user("writer", WRITE, bucket="data")
        self.reader = server.user("reader", READ, bucket="data")
        self.outsider = server.user("outsider", WRITE, bucket="elsewhere")

    def run(self, keys: Keys, *arguments: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, *arguments, f"--storage.endpoint_url={self.server.endpoint_url}",
                   "--storage.backoff_initial_s=0.01"]  # fmt: skip
        return subprocess.run(command, cwd=ROOT, env=keys.env(), capture_output=True, text=True,
                              timeout=240)  # fmt: skip


@pytest.fixture(scope="module")
def users(digits_folder: Path) -> Iterator[Users]:
    with IamS3Server() as server:
        everyone = Users(server)
        server.make_bucket("data")
        server.make_bucket("elsewhere")
        server.enforce()
        done = everyone.run(everyone.writer, "tools/convert.py", "--input", str(digits_folder),
                            "--output", "s3://data/digits", "--max-shard-samples", "256",
                            "--workers", "1")  # fmt: skip
        assert done.returncode == 0, done.stderr[-4000:]
        yield everyone


def convert_command(output: str, folder: Path) -> list[str]:
    return ["tools/convert.py", "--input", str(folder), "--output", output,
            "--max-shard-samples", "256", "--workers", "1"]  # fmt: skip


@pytest.mark.timeout(300)
def test_read_only_keys_verify_and_train(users: Users, tmp_path: Path) -> None:
    done = users.run(users.reader, "tools/verify.py", "s3://data/digits")
    assert done.returncode == 0, done.stdout + done.stderr[-4000:]
    assert "OK — 8 shards, 1797 samples" in done.stdout

    done = users.run(users.reader, "-m", "trainer.train", "--config", "configs/demo.toml",
                     "--data.url=s3://data/digits", "--data.decode_backend=cpu",
                     "--model.cnn.width=8", "--train.epochs=1", "--train.max_steps=4",
                     "--train.eval_url=", "--train.progress=false",
                     f"--train.out_dir={tmp_path / 'run'}")  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    assert "finished: 4 steps" in done.stdout


@pytest.mark.timeout(300)
def test_read_only_keys_cannot_write_and_leave_nothing(users: Users, digits_folder: Path) -> None:
    done = users.run(users.reader, *convert_command("s3://data/stolen", digits_folder))
    assert done.returncode == 1
    assert "s3://data/stolen/" in done.stderr
    assert "access denied (AccessDenied); after 1 attempt" in done.stderr, done.stderr[-4000:]
    assert "Traceback" not in done.stderr

    assert _object_keys(users.server, users.writer, "stolen/") == []


@pytest.mark.timeout(300)
def test_keys_of_another_bucket_are_denied(users: Users, digits_folder: Path) -> None:
    done = users.run(users.outsider, "tools/verify.py", "s3://data/digits")
    assert done.returncode == 1
    assert "access denied" in done.stderr and "Traceback" not in done.stderr, done.stderr[-4000:]
    # ... while its own bucket is fine.
    done = users.run(users.outsider, *convert_command("s3://elsewhere/digits", digits_folder))
    assert done.returncode == 0, done.stderr[-4000:]


def _object_keys(server: IamS3Server, keys: Keys, prefix: str) -> list[str]:
    import boto3

    client = boto3.client("s3", endpoint_url=server.endpoint_url, region_name="us-east-1",
                          aws_access_key_id=keys.access_key_id,
                          aws_secret_access_key=keys.secret_access_key)  # fmt: skip
    listed = client.list_objects_v2(Bucket="data", Prefix=prefix)
    return [entry["Key"] for entry in listed.get("Contents", [])]
