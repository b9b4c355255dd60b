#!/usr/bin/env python
"""The embedded demo: real images → shards on a local S3 server → verified → summarised.

    python tools/demo.py [--config configs/demo.toml] [--section.key=value …]

Builds scikit-learn's handwritten digits (1,797 real scans, 10 classes) as an image folder,
starts an S3 server on 127.0.0.1 when the output is s3:// and no endpoint is configured,
converts the folder into tar shards there, verifies every shard (decoding every image),
prints a summary of the dataset and streams one epoch back through the loader.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import tempfile
import time

import _cli

from dataflow import storage
from dataflow.convert.job import convert
from dataflow.datasets import write_digits_folder
from dataflow.pipeline import Loader
from dataflow.storage.local_s3 import LocalS3Server
from dataflow.summary import describe
from dataflow.verify import verify_dataset


def main() -> int:
    arguments = _cli.parser(__doc__.split("\n\n")[0])
    arguments.set_defaults(config="configs/demo.toml")
    args, config = _cli.parse(arguments)
    started = time.perf_counter()
    with contextlib.ExitStack() as stack:
        output = config.convert.output
        if storage.protocol_of(output) == "s3" and not config.storage.endpoint_url:
            server = stack.enter_context(LocalS3Server())
            print(f"[1/5] started an embedded S3 server at {server.endpoint_url}")
            config.storage = dataclasses.replace(config.storage, endpoint_url=server.endpoint_url)
        else:
            print(f"[1/5] using {storage.redact(output)}")
        source = config.convert.input
        if not source:
            source = stack.enter_context(tempfile.TemporaryDirectory(prefix="shardflow-demo-"))
            count = write_digits_folder(source)
            print(f"[2/5] wrote {count} digit images (scikit-learn, 10 classes) to {source}")
        convert_config = dataclasses.replace(config.convert, input=source, overwrite=True)
        report = convert(convert_config, config.storage, progress=not args.quiet)
        print(f"[3/5] converted: {report.summary()}")
        check = verify_dataset(output, config.storage, decode=True, progress=not args.quiet)
        for problem in check.problems:
            print(f"BAD {problem}")
        if not check.ok:
            print(f"verify FAILED with {len(check.problems)} problem(s)", file=sys.stderr)
            return 1
        print(f"[4/5] verified {check.shards} shards, {check.samples} samples, all decoded")
        print()
        print(describe(output, config.storage))
        print()
        data = dataclasses.replace(config.data, url=output)
        loader = Loader(data, config.storage, rank=0, world_size=1)
        started_epoch = time.perf_counter()
        samples = sum(len(batch["__key__"]) for batch in loader)
        rate = samples / (time.perf_counter() - started_epoch)
        print(f"[5/5] streamed one epoch back through dataflow.Loader: {samples} samples in "
              f"{len(loader)} batches of {data.global_batch}, {rate:.0f} samples/s")  # fmt: skip
        print(loader.metrics_.summary(loader.metrics()))
    print(f"\ndemo finished in {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    _cli.run(main)
