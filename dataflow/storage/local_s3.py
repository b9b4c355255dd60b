"""An embedded S3 server on 127.0.0.1 (moto's ThreadedMotoServer) for the demo and tests.

It speaks real S3 over HTTP, so everything above it — s3fs, botocore, retries, ranged
GETs — runs exactly as against a remote store. Throughput here is ~700 MB/s on loopback.
Credentials are dummies; nothing leaves the machine.
"""

from __future__ import annotations

import os
import socket
import urllib.request
from types import TracebackType

DUMMY_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "shardflow-local",
    "AWS_SECRET_ACCESS_KEY": "shardflow-local",
}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class LocalS3Server:
    """``with LocalS3Server() as server: ... server.endpoint_url ...``"""

    def __init__(self, port: int = 0, *, set_credentials: bool = True) -> None:
        self.port = port or free_port()
        self.set_credentials = set_credentials
        self._server: object | None = None

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> LocalS3Server:
        try:
            from moto.server import ThreadedMotoServer
        except ImportError:  # pragma: no cover - the dev/demo extras install it
            raise ImportError(
                "the embedded S3 server needs moto: pip install 'shardflow[demo]'"
            ) from None
        if self.set_credentials:
            for name, value in DUMMY_CREDENTIALS.items():
                os.environ.setdefault(name, value)
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        server.start()
        self._server = server
        return self

    def reset(self) -> None:
        """Forget every bucket and object (moto's reset API)."""
        request = urllib.request.Request(f"{self.endpoint_url}/moto-api/reset", method="POST")
        with urllib.request.urlopen(request, timeout=10):
            pass

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()  # type: ignore[attr-defined]
            self._server = None

    def __enter__(self) -> LocalS3Server:
        return self.start()

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()
