#!/usr/bin/env python
"""The configured loader alone (no model), and stage by stage: where does the time go?

    python tools/bench_io.py --config FILE [--seconds 10] [--out reports/ | --out FILE.json]
                             [--section.key=value ...]

On the dataset and storage the config names (``data.url``, ``[storage]``), one run after the
other, each for ``--seconds``, each row adding one stage to the row above, all read cold
from storage:

    storage           whole shards read with storage.read_range, ``data.fetch_workers`` at a
                      time (S3: ranged GETs of ``storage.range_size`` over
                      ``storage.connections``; POSIX: ``storage.block_size`` reads)
    + format          the loader's fetch stage: read, xxh64 check, sample table
    + decode + batch  the whole loader: fetch, decode, batch

Each as samples/s (storage at the dataset's mean sample size) and MB/s. Adding a stage
cannot make a pipeline faster, so a row measured faster than the row above (noise: a few
percent between runs) is shown at the row above's rate, its measurement kept in the report.
The bottleneck is the one stage that adds the most time per sample. Then, for reference,
decode + batch alone: the same batches again with the shards already read (the loader's
cache for S3, the page cache for files). The cold loader's per-stage metrics (items/s, MB/s,
busy and blocked time, queue depth) are printed with the first run. Writes
``<out>/bench_io.json`` (machine, date, the full config, versions) and ``<out>/bench_io.png``,
or, when ``--out`` names a ``.json`` file, that file and the plot beside it. The peer
comparison on the photo set is ``tools/bench_peers.py``; tuning the knobs is
``tools/tune_io.py``.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import tempfile
import threading
import time
from typing import Any

import _cli
from _bench import drive_loader, plot_bars, write_report

from dataflow import storage
from dataflow.index import DatasetIndex
from dataflow.metrics import PipelineMetrics, StageMetrics
from dataflow.pipeline.shards import ShardFetcher

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def timed_shards(work: Any, shards: int, workers: int, seconds: float) -> tuple[int, int, float]:
    """Run ``work(number) -> bytes`` over the shards, round robin, ``workers`` at a time, until
    ``seconds`` have passed; returns (shards done, bytes, elapsed)."""
    lock, done, nbytes, stop = threading.Lock(), [0], [0], threading.Event()
    counter = iter(range(1 << 62))

    def worker() -> None:
        while not stop.is_set():
            with lock:
                number = next(counter) % shards
            size = work(number)
            with lock:
                done[0] += 1
                nbytes[0] += size

    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        futures = [pool.submit(worker) for _ in range(workers)]
        time.sleep(seconds)
        stop.set()
        for future in futures:
            future.result()
    return done[0], nbytes[0], time.perf_counter() - started


def main() -> int:
    arguments = _cli.parser(__doc__.split("\n\n")[0])
    arguments.add_argument("--seconds", type=float, default=10.0, help="per stage")
    arguments.add_argument("--out", default=os.path.join(REPO, "reports"),
                           help="a folder, or the report's .json file")  # fmt: skip
    args, config = _cli.parse(arguments)
    if args.out.endswith(".json"):
        out, report_name = os.path.split(os.path.abspath(args.out))
        report_name = report_name.removesuffix(".json")
    else:
        out, report_name = args.out, "bench_io"
    if os.path.isfile(out):
        arguments.error(f"--out {out} is a file: name a folder, or a .json file to write")
    if not config.data.url:
        arguments.error("the config (or --data.url=…) must name the dataset")
    data, store = config.data, config.storage
    say = (lambda *a: None) if args.quiet else (lambda *a: print(*a, flush=True))
    index = DatasetIndex.load(data.url, config=store)
    shards = len(index.shards)
    sample_bytes = sum(s.bytes for s in index.shards) / max(1, index.num_samples)
    say(f"{data.url}: {index.num_samples:,} samples in {shards} shards, "
        f"{sample_bytes / 1e3:.1f} KB a sample; {args.seconds:.0f} s a stage")  # fmt: skip
    rows: dict[str, dict[str, float]] = {}

    def per_second(samples: int, seconds: float) -> dict[str, float]:
        return {"samples_per_s": samples / seconds,
                "mb_per_s": samples * sample_bytes / 1e6 / seconds}  # fmt: skip

    def storage_read(number: int) -> int:
        entry = index.shards[number]
        url = storage.join_url(data.url, entry.path)
        return len(storage.read_range(url, 0, entry.bytes, config=store))

    done, nbytes, elapsed = timed_shards(storage_read, shards, data.fetch_workers, args.seconds)
    rows["storage"] = {"samples_per_s": nbytes / sample_bytes / elapsed,
                       "mb_per_s": nbytes / 1e6 / elapsed, "shards": done}  # fmt: skip
    say(f"  storage: {rows['storage']['mb_per_s']:.1f} MB/s")

    stage = StageMetrics("fetch", data.fetch_workers)
    fetcher = ShardFetcher(data.url, index, store, cache=None, metrics=stage, skip_bad=True)
    samples = [0]

    def fetch(number: int) -> int:
        view = fetcher.fetch(number)
        samples[0] += len(view.table.keys)
        return len(view.data)

    done, nbytes, elapsed = timed_shards(fetch, shards, data.fetch_workers, args.seconds)
    rows["+ format"] = {"samples_per_s": samples[0] / elapsed, "mb_per_s": nbytes / 1e6 / elapsed,
                        "shards": done}  # fmt: skip
    say(f"  + format: {rows['+ format']['samples_per_s']:.0f} samples/s")

    with tempfile.TemporaryDirectory(prefix="bench-io-cache-") as cache:
        cold = dataclasses.replace(data, cache_dir=cache,
                                   audit=False, prefetch_next_epoch=False)  # fmt: skip
        first = drive_loader(cold, store, seconds=args.seconds)
        metrics = first.metrics
        rows["+ decode + batch"] = per_second(first.samples, first.seconds)
        # Its stage lines only: the one bottleneck is named from the table below.
        loader_stages = PipelineMetrics.summary(metrics).rsplit("; bottleneck:", 1)[0]
        say(f"  + decode + batch: {rows['+ decode + batch']['samples_per_s']:.0f} samples/s\n"
            + loader_stages)  # fmt: skip
        again = drive_loader(cold, store, batches=first.batches)
        alone = per_second(again.samples, again.seconds)
    say(f"  decode + batch alone (shards already read): {alone['samples_per_s']:.0f} samples/s")
    bottleneck = bound_rows(rows)
    width = max(map(len, rows))
    print(f"\n  {'stage':<{width}}{'samples/s':>11}{'MB/s':>9}")
    for name, row in rows.items():
        noise = ""
        if row["measured_samples_per_s"] > row["samples_per_s"]:
            noise = f"  (measured {row['measured_samples_per_s']:,.0f}: noise)"
        print(f"  {name:<{width}}{row['samples_per_s']:>11,.0f}{row['mb_per_s']:>9.1f}{noise}")
    print(f"  decode + batch alone, shards already read: {alone['samples_per_s']:,.0f} samples/s")
    print(f"bottleneck: {bottleneck}")
    path = write_report(out, report_name, __doc__, {
        "config": {"data": dataclasses.asdict(data), "storage": dataclasses.asdict(store)},
        "dataset": {"samples": index.num_samples, "shards": shards, "sample_bytes": sample_bytes},
        "seconds_per_stage": args.seconds, "stages": rows, "bottleneck": bottleneck,
        "decode_and_batch_alone": alone, "loader_metrics": metrics,
    })  # fmt: skip
    name = os.path.basename(data.url.rstrip("/"))
    plot_bars([*rows, "decode + batch alone"],
              [*(r["samples_per_s"] for r in rows.values()), alone["samples_per_s"]],
              os.path.join(out, f"{report_name}.png"),
              f"{name}: stage by stage (bottleneck: {bottleneck})", "samples/s")  # fmt: skip
    print(f"report: {path}")
    return 0


def bound_rows(rows: dict[str, dict[str, float]]) -> str:
    """Bound each row by the one above (in place; the measurement kept as
    ``measured_samples_per_s``) and return the stage that adds the most time per sample."""
    above = float("inf")
    added: dict[str, float] = {}
    for name, row in rows.items():
        row["measured_samples_per_s"] = row["samples_per_s"]
        if row["samples_per_s"] > above:
            row["mb_per_s"] *= above / row["samples_per_s"]
            row["samples_per_s"] = above
        added[name.removeprefix("+ ")] = 1 / max(row["samples_per_s"], 1e-9) - 1 / above
        above = row["samples_per_s"]
    return max(added, key=lambda stage: added[stage])


if __name__ == "__main__":
    _cli.run(main)
