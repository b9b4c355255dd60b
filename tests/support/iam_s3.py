"""An S3 server on loopback that enforces IAM: moto in a child process with its access checks
on, so each request must be signed with the keys of a user created here, and that user's
policy decides what it may do.

moto's switch for this (``INITIAL_NO_AUTH_ACTION_COUNT``, set through ``/moto-api/reset-auth``)
is one global per process; a child process keeps it away from the tests' shared server.

    with IamS3Server() as server:
        writer = server.user("writer", ["s3:*"], bucket="data")
        server.make_bucket("data", writer)
        server.enforce()
        ... run a tool with env=writer.env(server) ...
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from types import TracebackType

from dataflow.storage.local_s3 import free_port


@dataclass(frozen=True)
class Keys:
    user: str
    access_key_id: str
    secret_access_key: str

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """``base`` (default: this process's environment) with only these credentials."""
        env = dict(os.environ if base is None else base)
        for name in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_SECURITY_TOKEN"):
            env.pop(name, None)
        env["AWS_ACCESS_KEY_ID"] = self.access_key_id
        env["AWS_SECRET_ACCESS_KEY"] = self.secret_access_key
        return env


class IamS3Server:
    def __init__(self, log: str = "") -> None:
        self.port = free_port()
        self.log = log
        """A file for the server's request log (one line per request, with its status)."""
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> IamS3Server:
        output = open(self.log, "ab") if self.log else subprocess.DEVNULL  # noqa: SIM115
        try:
            self._process = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                stdout=output, stderr=output,
            )  # fmt: skip
        finally:
            if self.log:
                output.close()  # type: ignore[union-attr]
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"{self.endpoint_url}/moto-api/data.json", timeout=2):
                    return self
            except (urllib.error.URLError, ConnectionError):
                if self._process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError("the IAM-enforcing S3 server did not start") from None
                time.sleep(0.1)

    def _client(self, service: str, keys: Keys | None = None) -> object:
        import boto3

        return boto3.client(
            service, endpoint_url=self.endpoint_url, region_name="us-east-1",
            aws_access_key_id=keys.access_key_id if keys else "admin",
            aws_secret_access_key=keys.secret_access_key if keys else "admin",
        )  # fmt: skip

    def user(self, name: str, actions: list[str], *, bucket: str) -> Keys:
        """A user allowed ``actions`` on ``bucket`` and its objects, and nothing else."""
        iam = self._client("iam")
        policy = {"Version": "2012-10-17", "Statement": [{
            "Effect": "Allow", "Action": actions,
            "Resource": [f"arn:aws:s3:::{bucket}", f"arn:aws:s3:::{bucket}/*"],
        }]}  # fmt: skip
        iam.create_user(UserName=name)  # type: ignore[attr-defined]
        arn = iam.create_policy(  # type: ignore[attr-defined]
            PolicyName=f"{name}-policy", PolicyDocument=json.dumps(policy)
        )["Policy"]["Arn"]
        iam.attach_user_policy(UserName=name, PolicyArn=arn)  # type: ignore[attr-defined]
        key = iam.create_access_key(UserName=name)["AccessKey"]  # type: ignore[attr-defined]
        return Keys(name, key["AccessKeyId"], key["SecretAccessKey"])

    def make_bucket(self, bucket: str) -> None:
        """Before :meth:`enforce` (afterwards only a user allowed to may)."""
        self._client("s3").create_bucket(Bucket=bucket)  # type: ignore[attr-defined]

    def enforce(self) -> None:
        """From now on every request is authenticated and authorized."""
        request = urllib.request.Request(
            f"{self.endpoint_url}/moto-api/reset-auth", data=b"0", method="POST",
            headers={"Content-Type": "text/plain"},
        )  # fmt: skip
        with urllib.request.urlopen(request, timeout=10):
            pass

    def stop(self) -> None:
        if self._process is not None:
            self._process.kill()
            self._process.wait(timeout=30)
            self._process = None

    def __enter__(self) -> IamS3Server:
        return self.start()

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()
