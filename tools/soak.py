#!/usr/bin/env python
"""Soak: many epochs from S3 through a shard cache under pressure; RSS, open file
descriptors, threads and the cache's temporaries per epoch.

    python tools/soak.py [--epochs 20] [--samples 600] [--cache-fraction 0.4] [--out reports/]

Real-photo JPEGs (scikit-learn's sample photos, ``dataflow.datasets.photo_jpegs``) are
converted into ~20 tar shards on the embedded S3 server (moto, 127.0.0.1). One Loader reads
them for ``--epochs`` epochs (decode + random-resized-crop 64 + flip) through a node-local
cache capped at ``--cache-fraction`` of the dataset, so shards are evicted and fetched again
every epoch. After each epoch: the process's resident memory, its open file descriptors and
threads, the cache's bytes against its cap, and its hidden temporaries (a leaked one would
stay); after ``close()``, the same again. Writes ``<out>/soak.json`` and ``<out>/soak.png``.
"""

from __future__ import annotations

import os
import tempfile
import threading
import time
from typing import Any

import _cli
from _bench import write_report

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def resident_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def cache_state(directory: str) -> dict[str, int]:
    """Bytes and count of published shards, and temporaries, in the cache directory."""
    published = temporaries = count = 0
    for folder, _, files in os.walk(directory):
        if os.path.basename(folder) == ".locks":
            continue
        for name in files:
            size = os.path.getsize(os.path.join(folder, name))
            if "tmp-" in name:
                temporaries += 1
            else:
                published += size
                count += 1
    return {"cache_bytes": published, "cache_files": count, "temporaries": temporaries}


def snapshot(cache_dir: str) -> dict[str, Any]:
    return {"rss_mb": round(resident_mb(), 1), "fds": open_fds(),
            "threads": threading.active_count(), **cache_state(cache_dir),
            "thread_names": sorted(t.name for t in threading.enumerate())}  # fmt: skip


def soak(epochs: int, samples: int, cache_fraction: float, progress: bool) -> dict[str, Any]:
    from tqdm import tqdm

    from dataflow.convert.config import ConvertConfig
    from dataflow.convert.job import convert
    from dataflow.datasets import write_photo_folder
    from dataflow.index import DatasetIndex
    from dataflow.pipeline import DataConfig, Loader
    from dataflow.storage import StorageConfig, make_bucket
    from dataflow.storage.local_s3 import LocalS3Server

    with LocalS3Server() as server, tempfile.TemporaryDirectory(prefix="soak-") as scratch:
        storage = StorageConfig(endpoint_url=server.endpoint_url)
        make_bucket("s3://soak", config=storage)
        folder = os.path.join(scratch, "photos")
        write_photo_folder(folder, count=samples)
        url = "s3://soak/photos"
        convert(ConvertConfig(input=folder, output=url, max_shard_samples=max(1, samples // 20),
                              workers=1), storage, progress=False)  # fmt: skip
        index = DatasetIndex.load(url, config=storage)
        cache_dir = os.path.join(scratch, "cache")
        cap = int(index.total_bytes * cache_fraction)
        config = DataConfig(url=url, global_batch=32, image_size=64, cache_dir=cache_dir,
                            cache_bytes=cap, decode_workers=2, readahead_shards=2)  # fmt: skip
        before = snapshot(cache_dir)
        loader = Loader(config, storage, rank=0, world_size=1)
        rows = []
        for epoch in tqdm(range(epochs), desc="soak", unit="epoch", disable=not progress):
            started = time.perf_counter()
            loader.set_epoch(epoch)
            delivered = sum(int(batch["__valid__"].sum()) for batch in loader)
            rows.append({"epoch": epoch, "samples": delivered,
                         "seconds": round(time.perf_counter() - started, 2),
                         **snapshot(cache_dir)})  # fmt: skip
        loader.close()
        after = snapshot(cache_dir)
        return {"dataset_bytes": index.total_bytes, "shards": len(index.shards),
                "samples": index.num_samples, "cache_cap_bytes": cap, "before": before,
                "epochs": rows, "after_close": after}  # fmt: skip


def plot(result: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["epochs"]
    epochs = [r["epoch"] for r in rows]
    figure, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    axes[0].plot(epochs, [r["rss_mb"] for r in rows], marker="o")
    axes[0].set_ylabel("resident memory after the epoch (MB)")
    axes[0].set_ylim(bottom=0)
    axes[1].plot(epochs, [r["fds"] for r in rows], marker="o", label="open fds")
    axes[1].plot(epochs, [r["threads"] for r in rows], marker="s", label="threads")
    axes[1].legend()
    axes[2].plot(epochs, [r["cache_bytes"] / 1e6 for r in rows], marker="o", label="cache")
    axes[2].axhline(result["cache_cap_bytes"] / 1e6, color="red", linestyle="--", label="cap")
    axes[2].set_ylabel("MB")
    axes[2].legend()
    for axis in axes:
        axis.set_xlabel("epoch")
    figure.suptitle(f"soak: {len(rows)} epochs from S3 through a cache capped at "
                    f"{result['cache_cap_bytes'] / result['dataset_bytes']:.0%} of the "
                    "dataset", fontsize=10)  # fmt: skip
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main() -> int:
    arguments = _cli.parser(__doc__.split("\n\n")[0])
    arguments.add_argument("--epochs", type=int, default=20)
    arguments.add_argument("--samples", type=int, default=600)
    arguments.add_argument("--cache-fraction", type=float, default=0.4)
    arguments.add_argument("--out", default=os.path.join(REPO, "reports"))
    args, _ = _cli.parse(arguments)
    if args.epochs < 2 or args.samples < 40 or not 0 < args.cache_fraction < 1:
        arguments.error("needs --epochs >= 2, --samples >= 40 and 0 < --cache-fraction < 1")
    result = soak(args.epochs, args.samples, args.cache_fraction, progress=not args.quiet)
    print(f"{'epoch':>5}{'samples':>9}{'s':>7}{'RSS MB':>9}{'fds':>6}{'threads':>9}"
          f"{'cache MB':>10}{'tmp':>5}")  # fmt: skip
    for r in result["epochs"]:
        print(f"{r['epoch']:>5}{r['samples']:>9}{r['seconds']:>7.1f}{r['rss_mb']:>9.1f}"
              f"{r['fds']:>6}{r['threads']:>9}{r['cache_bytes'] / 1e6:>10.2f}"
              f"{r['temporaries']:>5}")  # fmt: skip
    b, a = result["before"], result["after_close"]
    print(
        f"before: {b['fds']} fds, {b['threads']} threads; after close: {a['fds']} fds, "
        f"{a['threads']} threads, {a['temporaries']} temporaries; cache cap "
        f"{result['cache_cap_bytes'] / 1e6:.2f} MB of {result['dataset_bytes'] / 1e6:.2f} MB"
    )
    write_report(args.out, "soak", __doc__, result)
    plot(result, os.path.join(args.out, "soak.png"))
    print(f"wrote {args.out}/soak.json and {args.out}/soak.png")
    return 0


if __name__ == "__main__":
    _cli.run(main)
