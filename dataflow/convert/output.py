"""Guards on where a conversion writes: apart from its input, over nothing it did not write,
and one writer per node slice at a time.

Apart
    An output equal to the input, inside it or around it is refused before anything is read:
    writing ``shard-000000.tar`` into a folder of WebDataset tars with those names replaces
    input that is still to be read, and an output inside the input makes the next conversion
    read the shards back as input. Local paths are compared resolved (symlinks followed),
    s3:// URLs by bucket and key prefix, whole path components at a time.

Ownership
    A conversion writes only paths that are free or that a conversion of this output wrote:
    those the previous ``index.json`` lists (replaced only with ``--overwrite``) and those an
    unfinished run's ``_convert/plan.json`` lists (the plan is written before its first
    shard, so it is the claim a restart relies on). Anything else at a planned path is
    someone else's, and the conversion stops before it touches anything. One listing of the
    output finds them (one LIST per 1,000 objects on S3, no HEAD per shard).

Lease
    ``_convert/lease-node-<rank>.json`` names the process converting that node's slice. It is
    created exclusively (``O_EXCL`` locally, ``If-None-Match: *`` on S3, then read back for
    stores that ignore the header), renewed every ``LEASE_RENEW_S`` by the running job and
    taken over when it was not renewed for ``LEASE_SECONDS`` or its process is gone from this
    host: a killed run's rerun starts at once on the same machine, and after at most
    ``LEASE_SECONDS`` elsewhere. Two takeovers racing for one stale lease are not excluded;
    every other overlap is. Cost: one small write per renewal.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
import uuid
from types import TracebackType
from typing import Any

from dataflow import processes, storage
from dataflow.errors import DataError
from dataflow.storage import StorageConfig
from dataflow.storage.retry import permanent_reason

log = logging.getLogger(__name__)

STAGING = "_convert"
LEASE_SECONDS = 300.0
LEASE_RENEW_S = 30.0


class ConversionError(DataError):
    """The conversion cannot go on: bad input under the 'raise' policy, or a plan mismatch."""


# ---------------------------------------------------------------------------------------------
# Apart from the input


def _location(url: str) -> tuple[str, tuple[str, ...]]:
    """(protocol, path components) of ``url``; local paths resolved through symlinks."""
    if storage.is_local(url):
        path = os.path.realpath(storage.local_path(url))
        return "file", tuple(part for part in path.split(os.sep) if part)
    rest = url.split("://", 1)[1]
    return storage.protocol_of(url), tuple(part for part in rest.split("/") if part)


def same_place(first: str, second: str) -> bool:
    return _location(first) == _location(second)


def check_apart(source: str, output: str) -> None:
    """Refuse an ``output`` that is ``source``, lies inside it or contains it."""
    (source_kind, source_parts), (output_kind, output_parts) = _location(source), _location(output)
    if source_kind != output_kind:
        return
    if source_parts == output_parts:
        relation = "is the input"
    elif output_parts[: len(source_parts)] == source_parts:
        relation = "lies inside the input"
    elif source_parts[: len(output_parts)] == output_parts:
        relation = "contains the input"
    else:
        return
    raise ConversionError(
        f"--output {storage.redact(output)} {relation} {storage.redact(source)}: shards written "
        "there would replace or mix with the input",
        hint="choose an --output outside the input (--index-only indexes tars where they are)",
    )


# ---------------------------------------------------------------------------------------------
# Ownership


def plain_names(paths: Any) -> list[str]:
    """The entries of a stored shard list that are plain file names (anything else, say a
    hand-edited '../x', is never removed or trusted)."""
    if not isinstance(paths, list):
        return []
    return [
        path
        for path in paths
        if isinstance(path, str) and path and "/" not in path and "\\" not in path
        and not path.startswith(".")
    ]  # fmt: skip


def files_present(output: str, storage_config: StorageConfig) -> set[str]:
    """Paths of every file under ``output``, relative to it (one listing)."""
    prefix = storage.normalize_url(output).rstrip("/") + "/"
    return {
        url[len(prefix) :]
        for url in storage.list_files(output, config=storage_config)
        if url.startswith(prefix)
    }


def refuse_foreign(output: str, planned: set[str], owned: set[str], present: set[str]) -> None:
    """Stop if a path the plan writes holds a file that no conversion of ``output`` wrote."""
    foreign = sorted((planned & present) - owned)
    if foreign:
        more = f" and {len(foreign) - 1} more" if len(foreign) > 1 else ""
        raise ConversionError(
            f"{storage.redact(output)} already holds {foreign[0]}{more}, which no conversion "
            "of this output wrote; it would be overwritten",
            hint="choose an empty --output or move those files away (--overwrite replaces "
            "only what the output's index.json lists)",
        )


# ---------------------------------------------------------------------------------------------
# Lease


class Lease:
    """One writer per node slice of ``output`` (see the module docstring); a context manager."""

    def __init__(self, output: str, node_rank: int, storage_config: StorageConfig) -> None:
        self.output = storage.normalize_url(output)
        self.node_rank = node_rank
        self.url = storage.join_url(self.output, STAGING, f"lease-node-{node_rank}.json")
        self.token = uuid.uuid4().hex
        self._storage_config = storage_config
        self._renewed_at = 0.0

    def __enter__(self) -> Lease:
        return self.acquire()

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.release()

    def _document(self) -> bytes:
        return json.dumps({"token": self.token, "host": socket.gethostname(),
                           "pid": os.getpid(), "renewed": time.time()}).encode()  # fmt: skip

    def _create(self) -> bool:
        """Write the lease unless one exists; True if this call created it."""
        document = self._document()
        if storage.is_local(self.url):
            path = storage.local_path(self.url)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            try:
                descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(descriptor, "wb") as handle:
                handle.write(document)
                handle.flush()
                os.fsync(handle.fileno())
            return True
        fs = storage.filesystem(self.url, self._storage_config)
        bucket, key = self.url.split("://", 1)[1].split("/", 1)
        try:
            fs.call_s3("put_object", Bucket=bucket, Key=key, Body=document, IfNoneMatch="*")
        except Exception as error:
            # s3fs turns 412 Precondition Failed into FileExistsError.
            if isinstance(error, FileExistsError) or "PreconditionFailed" in repr(error):
                return False
            raise storage.StorageError(
                self.url, permanent_reason(error), attempts=1, last_error=error
            ) from error
        finally:
            fs.invalidate_cache(f"{bucket}/{key}")
        # A store that ignores If-None-Match overwrote any holder: the read-back tells.
        holder = self._holder()
        return holder is not None and holder.get("token") == self.token

    def _holder(self) -> dict[str, Any] | None:
        """The lease as stored; None if there is none; {} while its writer is writing it."""
        try:
            data = storage.read_bytes(self.url, config=self._storage_config)
        except storage.StorageError as error:
            if isinstance(error.last_error, FileNotFoundError):
                return None
            raise
        try:
            holder = json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError):
            return {}
        return holder if isinstance(holder, dict) else {}

    def _describe(self, holder: dict[str, Any]) -> str:
        if not holder:
            return "its lease is being written"
        age = time.time() - float(holder.get("renewed", 0))
        return f"host {holder.get('host')}, pid {holder.get('pid')}, lease renewed {age:.0f} s ago"

    def _stale(self, holder: dict[str, Any]) -> bool:
        if not holder:
            return False
        if time.time() - float(holder.get("renewed", 0)) > LEASE_SECONDS:
            return True
        pid = holder.get("pid")
        same_host = holder.get("host") == socket.gethostname()
        return same_host and isinstance(pid, int) and not processes.running(pid)

    def acquire(self) -> Lease:
        for _ in range(3):
            if self._create():
                self._renewed_at = time.monotonic()
                return self
            holder = self._holder()
            if holder is None:
                continue  # released between our write and our read: try again
            if not self._stale(holder):
                raise ConversionError(
                    f"another conversion is writing node {self.node_rank}'s shards of "
                    f"{storage.redact(self.output)} ({self._describe(holder)})",
                    hint=f"wait for it to finish; if it died on another machine, run again "
                    f"{LEASE_SECONDS:.0f} s after its last renewal or delete "
                    f"{storage.redact(self.url)}",
                )
            log.warning("taking over the stale lease %s (%s)", storage.redact(self.url),
                        self._describe(holder))  # fmt: skip
            storage.remove(self.url, config=self._storage_config)
        raise ConversionError(
            f"another conversion is starting to write {storage.redact(self.output)}",
            hint="wait for it to finish",
        )

    def renew(self) -> None:
        """Renew the lease if it is due; stop if another process has taken it over."""
        if time.monotonic() - self._renewed_at < LEASE_RENEW_S:
            return
        holder = self._holder()
        if holder is None or holder.get("token") != self.token:
            raise ConversionError(
                f"this conversion lost its lease on {storage.redact(self.output)} to another "
                "process (it was not renewed in time or was deleted)",
                hint="let the other conversion finish, then run again to check the result",
            )
        storage.write_bytes(self.url, self._document(), config=self._storage_config)
        self._renewed_at = time.monotonic()

    def release(self) -> None:
        try:
            holder = self._holder()
            if holder and holder.get("token") == self.token:
                storage.remove(self.url, config=self._storage_config)
                if storage.is_local(self.url):  # a refused run leaves no empty _convert/
                    with contextlib.suppress(OSError):
                        os.rmdir(os.path.dirname(storage.local_path(self.url)))
        except storage.StorageError as error:
            log.warning("could not release %s: %s", storage.redact(self.url), error)
