#!/usr/bin/env python
"""One command for a machine with a GPU: DALI mixed-decode throughput and the GPU tests.

    python tools/gpu_check.py [--count 3000] [--out reports/]

Needs CUDA, PyTorch and NVIDIA DALI (``pip install nvidia-dali-cuda130``, or the wheel files
carried to the machine). It writes the ImageNet-like photo set (or reuses it), converts it
to tar shards, then measures over one epoch each, batch 256, decode + random-resized-crop
224 + flip:

    ours, DALI mixed decode   Loader(decode_backend="dali", decode_device="gpu",
                              device="cuda"): nvJPEG / hardware JPEG decoder, CUDA tensors
    ours, CPU decode          the CPU path, copied to the GPU on the side stream
    DALI's own pipeline       readers.webdataset → decoders.image_random_crop("mixed")

and runs ``pytest -m gpu``. Prints a table and writes ``<out>/gpu_check.json``. Takes a few
minutes; nothing in CI runs it (CI has no GPU).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import subprocess
import sys
import time

import _cli
import torch
from _bench import dali_own_rate, machine, prepare_photos
from bench_io import prepare_shards

from dataflow.pipeline import DataConfig, Loader

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def epoch_rate(config: DataConfig) -> float:
    loader = Loader(config, rank=0, world_size=1)
    for _ in loader:  # warm-up epoch: CUDA contexts, nvJPEG handles, allocator
        pass
    torch.cuda.synchronize()
    started = time.perf_counter()
    samples = 0
    for batch in loader:
        samples += len(batch["__key__"])
    torch.cuda.synchronize()
    return samples / (time.perf_counter() - started)


def main() -> int:
    arguments = _cli.parser(__doc__.split("\n\n")[0])
    arguments.add_argument("--count", type=int, default=3000)
    arguments.add_argument("--data-dir", default="/tmp/shardflow-bench/photos")
    arguments.add_argument("--out", default=os.path.join(REPO, "reports"))
    args, config = _cli.parse(arguments)
    if not torch.cuda.is_available():
        print("error: no CUDA device here; this check is for a GPU machine", file=sys.stderr)
        return 1
    prepare_photos(args.data_dir, args.count, args.quiet)
    shards = prepare_shards(args.data_dir, args.data_dir.rstrip("/") + "-shards", args.count)
    threads = max(2, len(os.sched_getaffinity(0)) // 2)
    base = dataclasses.replace(config.data, url=shards, global_batch=256, image_size=224,
                               decode_workers=threads, device="cuda")  # fmt: skip
    results = {
        "ours, DALI mixed decode": epoch_rate(
            dataclasses.replace(base, decode_backend="dali", decode_device="gpu")
        ),
        "ours, CPU decode": epoch_rate(base),
        "DALI's own pipeline (mixed)": dali_own_rate(
            shards, batch=256, threads=threads, decoder="mixed", warmup=True
        ),
    }
    for name, rate in results.items():
        print(f"{name:<32}{rate:>10.0f} samples/s")
    tests = subprocess.run(
        [sys.executable, "-m", "pytest", "-m", "gpu", "-q", os.path.join(REPO, "tests")],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    print(tests.stdout[-3000:])
    os.makedirs(args.out, exist_ok=True)
    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "machine": machine(sorted(os.sched_getaffinity(0))),
        "gpu": torch.cuda.get_device_name(0),
        "samples_per_s": results,
        "gpu_tests_exit_code": tests.returncode,
    }
    with open(os.path.join(args.out, "gpu_check.json"), "w") as handle:
        json.dump(report, handle, indent=1)
    return tests.returncode


if __name__ == "__main__":
    _cli.run(main)
