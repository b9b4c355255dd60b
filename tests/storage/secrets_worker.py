"""Run by test_secrets.py in a child process whose environment holds canary credentials:
the work a user runs against S3 — convert, train one epoch through transient faults with the
audit log on, a deleted shard, an access-denied read — with every logger at DEBUG as
``--verbose`` sets them. It prints what a user would see (errors, metrics, loader state) and
leaves the written files in OUT; the test then looks for the canaries in all of it.

    python tests/storage/secrets_worker.py OUT
"""

from __future__ import annotations

import json
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from support.faultproxy import FaultProxy, FaultSchedule

from dataflow.convert.config import ConvertConfig
from dataflow.convert.job import convert
from dataflow.datasets import write_photo_folder
from dataflow.errors import DataError
from dataflow.index import DatasetIndex
from dataflow.pipeline import DataConfig, Loader
from dataflow.storage import StorageConfig, StorageError, make_bucket, read_bytes, remove
from dataflow.storage.local_s3 import LocalS3Server

NOISY = ("botocore", "aiobotocore", "s3fs", "fsspec", "urllib3", "werkzeug")  # as tools/_cli.py


def show(label: str, value: object) -> None:
    print(f"== {label}\n{value}", flush=True)


def main(out: str) -> None:
    logging.basicConfig(level=logging.DEBUG, format="%(levelname)s %(name)s: %(message)s")
    for noisy in NOISY:
        logging.getLogger(noisy).setLevel(logging.WARNING)
    with LocalS3Server(set_credentials=False) as server:
        direct = StorageConfig(endpoint_url=server.endpoint_url, backoff_initial_s=0.01)
        make_bucket("s3://canary", config=direct)
        folder = os.path.join(out, "photos")
        write_photo_folder(folder, count=60)
        url = "s3://canary/photos"
        convert(ConvertConfig(input=folder, output=url, max_shard_samples=10, workers=1), direct,
                progress=False)  # fmt: skip
        show("index.json", read_bytes(f"{url}/index.json", config=direct).decode())
        faults = FaultSchedule(seed=5, reset_mid_body=0.1, slowdown_503=0.05, error_500=0.05)
        with FaultProxy(server.endpoint_url, faults) as proxy:
            through = StorageConfig(endpoint_url=proxy.url, backoff_initial_s=0.01)
            cache = os.path.join(out, "cache")
            config = DataConfig(url=url, global_batch=8, image_size=32, audit=True, out_dir=out,
                                cache_dir=cache, on_bad_sample="skip", drop_last=False)  # fmt: skip
            loader = Loader(config, through, rank=0, world_size=1)
            show("samples", sum(int(b["__valid__"].sum()) for b in loader))
            show("metrics", json.dumps(loader.metrics(), default=str))
            show("state", json.dumps(loader.state_dict()))
            loader.close()

            shard = DatasetIndex.load(url, config=direct).shards[0].path
            remove(f"{url}/{shard}", config=direct)
            strict = DataConfig(url=url, global_batch=8, image_size=32, out_dir=out)
            loader = Loader(strict, through, rank=0, world_size=1)
            try:
                sum(1 for _ in loader)
            except (DataError, StorageError) as error:
                show("deleted shard", f"{type(error).__name__}: {error!s} {error!r}")
            finally:
                loader.close()

            proxy.set_schedule(FaultSchedule(script=("denied_403",) * 20))
            try:
                read_bytes(f"{url}/index.json", config=through)
            except StorageError as error:
                show("access denied", f"{error!s} {error!r}")


if __name__ == "__main__":
    main(sys.argv[1])
