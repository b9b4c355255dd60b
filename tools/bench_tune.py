#!/usr/bin/env python
"""The tuner against an exhaustive grid, from a deliberately bad config behind S3 latency.

    python tools/bench_tune.py [--count 3000] [--trial-seconds 2.5] [--out reports/]

The photo set (tar shards, as bench_peers) on the embedded S3 server behind the shaping proxy
(≈30 ms first byte, ≈90 MB/s per connection; tests/support/faultproxy.py), and a starting
config with 1 connection, no read-ahead, 1 fetch worker and 1 decode worker. Over the same
knobs — connections (1, 2, 4, 8), read-ahead shards (0, 1, 2, 4), fetch workers (1, 4),
decode workers (1, 2, 3) — ``tools/tune_io.py``'s search runs first, then every setting of
the grid, each measured the same way (the loader alone for ``--trial-seconds`` after its
first batch). Reports the search's best against the grid's best and its time against the
grid's, in ``<out>/bench_tune.json`` and a PNG of both.

Between the two, the runtime autotune (``data.autotune``) from the same bad config for
``--autotune-seconds``: its rate with the ramp included, the changes it made, and the setting
it reached measured alone. It turns storage knobs only, so the grid's best with one decode
worker is its ceiling, reported beside it. ``--skip-grid`` stops after it (no report).
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import sys
import time
from typing import Any

import _cli
from _bench import (
    drive_loader,
    prepare_photos,
    prepare_shards,
    rss_bytes,
    shaped_s3,
    upload_dataset,
    write_report,
)
from tune_io import LoaderTrial, apply

from dataflow.index import DatasetIndex
from dataflow.pipeline import DataConfig
from dataflow.storage import StorageConfig
from dataflow.tuning import Knob, Workload, memory_estimate, tune

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KNOBS = [
    Knob("storage.connections", (1, 2, 4, 8), "fetch"),
    Knob("data.readahead_shards", (0, 1, 2, 4), "fetch"),
    Knob("data.fetch_workers", (1, 4), "fetch"),
    Knob("data.decode_workers", (1, 2, 3), "decode"),
]
BAD = {"storage.connections": 1, "data.readahead_shards": 0, "data.fetch_workers": 1,
       "data.decode_workers": 1}  # fmt: skip
LATENCY_S, BANDWIDTH = 0.030, 90e6


def plot(search: list[tuple[float, float]], grid: list[tuple[float, float]], path: str,
         title: str) -> None:  # fmt: skip
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(10, 4.5))
    for points, label, style in ((grid, "exhaustive grid", "-"), (search, "tune_io", "-o")):
        best, xs, ys = 0.0, [], []
        for seconds, rate in points:
            best = max(best, rate)
            xs.append(seconds)
            ys.append(best)
        axis.plot(xs, ys, style, label=f"{label} (best so far)")
    axis.set_xlabel("seconds of measuring")
    axis.set_ylabel("best samples/s found")
    axis.set_title(title, fontsize=10)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def runtime_autotune(data: DataConfig, store: StorageConfig, trial: LoaderTrial,
                     seconds: float, quiet: bool) -> dict[str, Any]:  # fmt: skip
    """The bad start with ``data.autotune`` on for ``seconds``: the rate with its ramp, the
    changes it made, and the setting it reached measured alone as a trial. It tunes storage
    knobs only, so its ceiling is the best setting with the start's one decode worker."""
    if not quiet:
        print("runtime autotune from the start config:", flush=True)
    start, store = apply(BAD, data, store)
    run = drive_loader(dataclasses.replace(start, autotune=True), store, seconds=seconds,
                       warm_up=True)  # fmt: skip
    report = run.metrics["autotune"]
    reached = {"storage.connections": report["connections"],
               "data.readahead_shards": report["readahead_shards"],
               "data.fetch_workers": report["fetch_workers"]}  # fmt: skip
    alone = trial({**BAD, **reached})
    return {"seconds": run.seconds, "rate": run.samples / run.seconds, "changes": report["changes"],
            "reached": reached, "reached_rate": alone.rate}  # fmt: skip


def main() -> int:
    arguments = _cli.parser(__doc__.split("\n\n")[0])
    arguments.add_argument("--count", type=int, default=3000)
    arguments.add_argument("--data-dir", default="/tmp/shardflow-bench/photos")
    arguments.add_argument("--trial-seconds", type=float, default=2.5)
    arguments.add_argument("--autotune-seconds", type=float, default=20.0)
    arguments.add_argument("--skip-grid", action="store_true",
                           help="the search and the runtime autotune only (no report)")  # fmt: skip
    arguments.add_argument("--out", default=os.path.join(REPO, "reports"))
    args, _ = _cli.parse(arguments)
    prepare_photos(args.data_dir, args.count, args.quiet)
    shards = prepare_shards(args.data_dir, args.data_dir.rstrip("/") + "-shards", args.count)
    index = DatasetIndex.load(shards)
    with shaped_s3(LATENCY_S, BANDWIDTH) as (endpoint, proxy):
        direct = StorageConfig(endpoint_url=endpoint)
        url = "s3://bench-tune/photos"
        upload_dataset(shards, url, direct)
        store = StorageConfig(endpoint_url=proxy, connections=1)
        data = DataConfig(url=url, global_batch=64, readahead_shards=0, fetch_workers=1,
                          decode_workers=1)  # fmt: skip
        trial = LoaderTrial(data, store, args.trial_seconds, rss_bytes(), args.quiet)
        shard_bytes = sum(s.bytes for s in index.shards) / len(index.shards)
        workload = Workload(shard_bytes=shard_bytes, batch_bytes=64 * 224 * 224 * 3)
        if not args.quiet:
            print("tune_io's search:", flush=True)
        began = time.perf_counter()
        result = tune(KNOBS, BAD, trial, budget_s=1e9, memory_budget=8e9,
                      estimate=lambda v: memory_estimate(v, workload))  # fmt: skip
        search_s = time.perf_counter() - began
        search = [(t.elapsed, t.measurement.rate) for t in result.trials if t.measurement]
        autotuned = runtime_autotune(data, store, trial, args.autotune_seconds, args.quiet)
        if args.skip_grid:
            print(f"runtime autotune: {autotuned}")
            return 0
        if not args.quiet:
            print("the exhaustive grid:", flush=True)
        grid: list[tuple[float, float]] = []
        grid_best: tuple[float, dict[str, Any]] = (0.0, {})
        one_decoder: tuple[float, dict[str, Any]] = (0.0, {})
        clock, began = 0.0, time.perf_counter()
        for combination in itertools.product(*(k.values for k in KNOBS)):
            values = dict(zip((k.path for k in KNOBS), combination, strict=True))
            measured = trial(values)
            clock += measured.seconds
            grid.append((clock, measured.rate))
            if measured.rate > grid_best[0]:
                grid_best = (measured.rate, values)
            if values["data.decode_workers"] == 1 and measured.rate > one_decoder[0]:
                one_decoder = (measured.rate, values)
        grid_s = time.perf_counter() - began
    assert result.best.measurement is not None and result.start.measurement is not None
    found = result.best.measurement.rate
    fields = {
        "knobs": {k.path: list(k.values) for k in KNOBS}, "start": BAD,
        "trial_seconds": args.trial_seconds,
        "proxy": {"first_byte_latency_s": LATENCY_S, "bandwidth_per_connection": BANDWIDTH},
        "start_rate": result.start.measurement.rate,
        "search": {"best_rate": found, "best": result.best.values, "settings": len(search),
                   "seconds": search_s, "converged": result.converged},
        "grid": {"best_rate": grid_best[0], "best": grid_best[1], "settings": len(grid),
                 "seconds": grid_s},
        "fraction_of_grid_best": found / grid_best[0],
        "fraction_of_grid_time": search_s / grid_s,
        "runtime_autotune": {**autotuned, "grid_best_one_decode_worker": one_decoder[0],
                             "grid_best_one_decode_worker_setting": one_decoder[1]},
    }  # fmt: skip
    print(f"\nstart {result.start.measurement.rate:,.0f} samples/s; tune_io {found:,.0f} "
          f"({len(search)} settings, {search_s:.0f} s); grid best {grid_best[0]:,.0f} "
          f"({len(grid)} settings, {grid_s:.0f} s)")  # fmt: skip
    print(f"tune_io reached {100 * found / grid_best[0]:.1f}% of the grid's best in "
          f"{100 * search_s / grid_s:.1f}% of its time")  # fmt: skip
    print(f"  tune_io: {result.best.values}\n  grid:    {grid_best[1]}")
    print(f"runtime autotune (data.autotune, storage knobs; 1 decode worker): "
          f"{autotuned['rate']:,.0f} samples/s over {autotuned['seconds']:.0f} s, ramp "
          f"included; its last setting {autotuned['reached']} measured alone "
          f"{autotuned['reached_rate']:,.0f}; the grid's best with 1 decode worker "
          f"{one_decoder[0]:,.0f}")  # fmt: skip
    path = write_report(args.out, "bench_tune", __doc__, fields)
    plot(search, grid, os.path.join(args.out, "bench_tune.png"),
         f"from 1 connection, no read-ahead, 1 decode worker, behind 30 ms / 90 MB/s: "
         f"tune_io {100 * found / grid_best[0]:.0f}% of the grid's best in "
         f"{100 * search_s / grid_s:.0f}% of its time")  # fmt: skip
    print(f"report: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
