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
from typing import Any

import _cli
import torch
from _bench import machine, prepare_photos
from bench_io import prepare_shards

from dataflow.decode.dali import import_dali
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


def dali_own_rate(shards: str, batch: int, threads: int) -> float:
    import tempfile

    from dataflow.formats.tar import dali_index_text
    from dataflow.index import DatasetIndex, load_table

    dali = import_dali()
    fn, types = dali.fn, dali.types
    index = DatasetIndex.load(shards)
    with tempfile.TemporaryDirectory() as directory:
        paths, index_paths = [], []
        for shard in index.shards:
            index_path = os.path.join(directory, shard.path + ".idx")
            with open(index_path, "w") as handle:
                handle.write(dali_index_text(load_table(shards, index, shard), index.fields))
            paths.append(os.path.join(shards, shard.path))
            index_paths.append(index_path)

        @dali.pipeline_def(batch_size=batch, num_threads=threads, device_id=0, seed=0)
        def pipeline() -> Any:
            jpegs, _ = fn.readers.webdataset(
                paths=paths, index_paths=index_paths, ext=["jpg", "cls"], random_shuffle=True,
                initial_fill=1024,
            )  # fmt: skip
            images = fn.decoders.image_random_crop(jpegs, device="mixed", output_type=types.RGB)
            images = fn.resize(images, resize_x=224, resize_y=224)
            return fn.flip(images, horizontal=fn.random.coin_flip())

        built = pipeline()
        built.build()
        steps = -(-index.num_samples // batch)
        for _ in range(steps):  # warm-up epoch
            built.run()
        started = time.perf_counter()
        for _ in range(steps):
            built.run()
        return steps * batch / (time.perf_counter() - started)


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
        "DALI's own pipeline (mixed)": dali_own_rate(shards, 256, threads),
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
