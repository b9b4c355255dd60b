"""Buckets: whether a write may create a missing one, and making sure it exists.

A bucket is infrastructure (its region, policy and lifecycle rules are set by whoever owns
the account), so a missing one is created only where that cannot hide a mistake: on a
loopback endpoint (the embedded server of the demo and tests) or with
``storage.create_bucket = true``. Elsewhere a typo in a bucket name is an error naming the
bucket and the setting, not a new, empty bucket that a later read takes for a missing
dataset. The check costs one HEAD request per conversion.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from typing import Any
from urllib.parse import urlsplit

from dataflow.storage.config import StorageConfig
from dataflow.storage.io import (
    _DEFAULT_CONFIG,
    _fail,
    _object_path,
    endpoint_of,
    filesystem,
    local_path,
    protocol_of,
)
from dataflow.storage.retry import StorageError, counting_requests


def may_create_bucket(config: StorageConfig) -> bool:
    """Whether a write may create a missing bucket: ``storage.create_bucket`` when set, else
    only on a loopback endpoint (the embedded server of the demo and tests). Elsewhere a
    bucket is infrastructure: a typo in its name must not quietly make a new one."""
    if config.create_bucket is not None:
        return config.create_bucket
    host = urlsplit(endpoint_of(config)).hostname
    if not host:
        return False  # AWS itself
    try:
        addresses = {str(info[4][0]) for info in socket.getaddrinfo(host, None)}
    except (socket.gaierror, UnicodeError):
        return False
    return bool(addresses) and all(
        ipaddress.ip_address(address.split("%", 1)[0]).is_loopback for address in addresses
    )


def make_bucket(url: str, *, config: StorageConfig | None = None) -> None:
    """Create the bucket of an s3:// URL if it does not exist and ``may_create_bucket``;
    otherwise a missing bucket is an error that names it and the setting to flip.

    Credentials that may only write objects (no bucket permissions: least privilege) get a
    403 on the bucket itself; the bucket is then taken to exist, and the writes that follow
    say whether they are allowed.
    """
    config = config or _DEFAULT_CONFIG
    if protocol_of(url) != "s3":
        os.makedirs(local_path(url), exist_ok=True)
        return
    fs = filesystem(url, config)
    bucket = _object_path(url).split("/", 1)[0]
    with counting_requests() as count:
        try:
            fs.call_s3("head_bucket", Bucket=bucket)
            return
        except FileNotFoundError:
            pass  # create it below
        except PermissionError:
            return
        except Exception as error:
            raise _fail(url, error, max(1, count.last_attempts), None, count.seconds) from error
    if not may_create_bucket(config):
        raise StorageError(
            url, f"bucket '{bucket}' does not exist; create it, or set storage.create_bucket "
            "= true to let shardflow create it (check the name and storage.endpoint_url first)",
        )  # fmt: skip
    region = fs.client_kwargs.get("region_name", "us-east-1")
    request: dict[str, Any] = {"Bucket": bucket}
    if region != "us-east-1":  # us-east-1 is the one region S3 refuses as a constraint
        request["CreateBucketConfiguration"] = {"LocationConstraint": region}
    with counting_requests() as count:
        try:
            fs.call_s3("create_bucket", **request)
        except Exception as error:
            if "BucketAlreadyOwnedByYou" not in str(error):
                raise _fail(url, error, max(1, count.last_attempts), None, count.seconds) from error
    fs.invalidate_cache()
