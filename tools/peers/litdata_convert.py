"""Convert an image folder with ``litdata.optimize``; print the timing as one JSON line.

    .venv-peers/bin/python tools/peers/litdata_convert.py --input DIR --output DIR

Runs in .venv-peers (tools/peers/setup.sh), never in the project's .venv, and is called by
tools/bench_convert.py. It does what litdata's documentation shows for an image folder: list
the files, and ``optimize`` a function that returns one sample per file, here
``{"image": <raw JPEG bytes>, "label": <int>}``. Bytes are stored as they are (litdata's
``bytes`` serializer): nothing is decoded, as in the other peer, webdataset.ShardWriter.

The timed span is listing + ``optimize`` (its worker start-up included: litdata spawns its
workers, which import torch again); the interpreter's own start and ``import litdata`` are
not in it, the caller measures those from outside. The last stdout line is
``{"seconds": ..., "inputs": ..., "versions": {...}}``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from importlib import metadata

# litdata may ask PyPI whether it is the newest release; never inside a timed run.
os.environ.setdefault("LITDATA_DISABLE_VERSION_CHECK", "1")

# This script runs in .venv-peers, where shardflow is not installed, so it cannot share
# tools/_bench.py's list_images; the two must list the same files in the same order.
IMAGE_SUFFIXES = (".jpg", ".jpeg")


def list_images(root: str) -> list[tuple[str, int]]:
    """(path, label) for ``root/<class>/<image>``; label = class folder's sorted position."""
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    files = []
    for label, name in enumerate(classes):
        folder = os.path.join(root, name)
        for file_name in sorted(os.listdir(folder)):
            if file_name.lower().endswith(IMAGE_SUFFIXES):
                files.append((os.path.join(folder, file_name), label))
    return files


def to_sample(item: tuple[str, int]) -> dict[str, object]:
    path, label = item
    with open(path, "rb") as handle:
        return {"image": handle.read(), "label": label}


def main() -> int:
    arguments = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    arguments.add_argument("--input", required=True, help="image folder: <root>/<class>/<image>")
    arguments.add_argument("--output", required=True, help="output folder (must not exist)")
    arguments.add_argument("--workers", type=int, default=2)
    arguments.add_argument("--chunk-bytes", default="64MB", help="e.g. 64MB or 64000000")
    arguments.add_argument("--seed", type=int, default=0, help="seed of the input shuffle")
    arguments.add_argument("--quiet", action="store_true", help="no litdata progress output")
    args = arguments.parse_args()

    import litdata

    started = time.perf_counter()
    files = list_images(args.input)
    random.Random(args.seed).shuffle(files)
    # litdata prints to stdout; keep stdout's last line for the result.
    stdout = sys.stdout
    sys.stdout = sys.stderr
    try:
        litdata.optimize(
            fn=to_sample,
            inputs=files,
            output_dir=args.output,
            num_workers=args.workers,
            # litdata parses "64MB" (10**6 units) but not a bare number given as a string.
            chunk_bytes=int(args.chunk_bytes) if args.chunk_bytes.isdigit() else args.chunk_bytes,
            verbose=not args.quiet,
        )
    finally:
        sys.stdout = stdout
    seconds = time.perf_counter() - started
    versions = {name: metadata.version(name) for name in ("litdata", "torch", "numpy")}
    print(json.dumps({"seconds": seconds, "inputs": len(files), "versions": versions}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
