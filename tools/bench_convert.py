#!/usr/bin/env python
"""Conversion speed: our converter against webdataset.ShardWriter and litdata.optimize.

    python tools/bench_convert.py [--count 3000] [--data-dir DIR] [--repeat N] [--out reports/]

Every method turns the same ImageNet-like image folder into ~64 MB shards on local disk, in
one run, pinned to the same ``--cores`` CPUs (default 2):

    ours (decode)           dataflow.convert.job.convert as by default: workers = cores,
                            shuffled, every JPEG decoded at 1/8 scale to prove it is
                            readable, its bytes stored as they are
    ours (decode + row      jpeg_row_restarts = true: every JPEG's coefficients copied into
      restarts)             one with a restart marker per row (reading every coded byte:
                            the proof that it decodes)
    ours (no validation)    validate_images="none": the peers' amount of work
    webdataset 1 process    the documented ShardWriter loop: read each file's bytes,
                            sink.write({"__key__", "jpg", "cls"}), as users write it
    webdataset N processes  that loop in N forked processes, each over its share of files
    litdata N workers       litdata.optimize(fn -> {"image": bytes, "label": int}),
                            in .venv-peers (tools/peers/setup.sh); skipped if missing

Imports are outside every timed span: ``import webdataset`` (it pulls in torch, ~1.3 s)
happens at start-up like ``import dataflow``; the forked webdataset workers inherit it.
The images are real-photo JPEGs of ~33 KB (dataflow.datasets.write_photo_folder), generated
once into ``--data-dir`` and reused while the count matches; all are read once before
timing, so every method starts from a warm page cache. Each timed span covers listing the
folder, worker start-up and writing every shard. Ours and litdata run in a fresh
interpreter each time and time themselves from after their imports, so each pays its own
forkserver or spawn start-up, as a user's single run does; the interpreter's start and
litdata's ``import torch`` are outside (reported for litdata). The output folder is emptied
between runs, and every output is counted back (our index.json, the peers' tar members,
litdata's index.json); a dropped sample stops the benchmark.

Writes ``<out>/bench_convert.json`` (machine, date, config, results) and
``<out>/bench_convert.png`` (images/s per method).
"""

from __future__ import annotations

import concurrent.futures
import datetime
import json
import multiprocessing
import os
import random
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import _cli
import webdataset as wds
from _bench import (
    SEED,
    BenchmarkError,
    list_images,
    machine,
    plot_bars,
    prepare_photos,
    read_all,
)

from dataflow.config import format_bytes
from dataflow.convert.config import ConvertConfig
from dataflow.index import DatasetIndex

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PEER_PYTHON = os.path.join(REPO, ".venv-peers", "bin", "python")
LITDATA_SCRIPT = os.path.join(REPO, "tools", "peers", "litdata_convert.py")
SHARD_BYTES = 64_000_000


@dataclass
class Result:
    method: str
    seconds: float
    samples: int
    shards: int
    bytes: int
    note: str = ""
    details: dict[str, object] = field(default_factory=dict)

    @property
    def images_per_second(self) -> float:
        return self.samples / self.seconds


# ---------------------------------------------------------------------------------------------
# Input


def folder_bytes(root: str) -> int:
    return sum(
        os.path.getsize(os.path.join(folder, name))
        for folder, _, names in os.walk(root)
        for name in names
    )


def check_count(method: str, samples: int, expected: int) -> None:
    if samples != expected:
        raise BenchmarkError(
            f"{method} wrote {samples} samples, the input has {expected}",
            hint="the comparison is void: a method that drops samples is not doing the work",
        )


# ---------------------------------------------------------------------------------------------
# Methods. Each one writes into an empty ``output`` folder and returns its verified Result.


# ``convert`` in a fresh interpreter, as tools/convert.py runs it: its forkserver starts
# once per process, so a second call in this one would skip a start-up users pay.
OURS_CHILD = """
import json, sys, time
from dataflow.convert.config import ConvertConfig
from dataflow.convert.job import convert
config = ConvertConfig(**json.loads(sys.argv[1]))
started = time.perf_counter()
convert(config, progress=False)
print(json.dumps({"seconds": time.perf_counter() - started}))
"""


def run_ours(
    data_dir: str, output: str, *, workers: int, validate: str, restarts: bool, expected: int
) -> Result:
    method = "ours (" + ("no validation" if validate == "none" else validate)
    method += " + row restarts)" if restarts else ")"
    config = {
        "input": data_dir,
        "output": output,
        "workers": workers,
        "validate_images": validate,
        "jpeg_row_restarts": restarts,
        "shuffle": True,
        "seed": SEED,
        "max_shard_bytes": SHARD_BYTES,
    }
    ConvertConfig(**config)  # type: ignore[arg-type]  # fail here, not in the child
    finished = subprocess.run(
        [sys.executable, "-c", OURS_CHILD, json.dumps(config)], stdout=subprocess.PIPE
    )
    lines = finished.stdout.decode(errors="replace").strip().splitlines()
    if finished.returncode != 0 or not lines:
        raise BenchmarkError(f"{method} failed (exit {finished.returncode})")
    seconds = json.loads(lines[-1])["seconds"]
    index = DatasetIndex.load(output)
    check_count(method, index.num_samples, expected)
    return Result(method, seconds, index.num_samples, len(index.shards), folder_bytes(output))


def write_webdataset(pattern: str, files: list[tuple[str, int]]) -> int:
    """The loop webdataset's documentation shows; runs in the caller or in a worker."""
    with wds.ShardWriter(pattern, maxsize=SHARD_BYTES, verbose=0) as sink:
        for path, label in files:
            with open(path, "rb") as handle:
                data = handle.read()
            key = os.path.splitext(os.path.basename(path))[0]
            sink.write({"__key__": key, "jpg": data, "cls": label})
    return len(files)


def run_webdataset(data_dir: str, output: str, *, processes: int, expected: int) -> Result:
    started = time.perf_counter()
    files = list_images(data_dir)
    random.Random(SEED).shuffle(files)
    if processes == 1:
        write_webdataset(os.path.join(output, "shard-%06d.tar"), files)
    else:
        # fork: the cheapest start-up there is (Linux's default before Python 3.14).
        parts = [files[i * len(files) // processes : (i + 1) * len(files) // processes]
                 for i in range(processes)]  # fmt: skip
        patterns = [os.path.join(output, f"part{i}-shard-%06d.tar") for i in range(processes)]
        context = multiprocessing.get_context("fork")
        with concurrent.futures.ProcessPoolExecutor(processes, mp_context=context) as pool:
            list(pool.map(write_webdataset, patterns, parts))
    seconds = time.perf_counter() - started
    method = f"webdataset {processes} process{'es' if processes > 1 else ''}"
    shards = sorted(name for name in os.listdir(output) if name.endswith(".tar"))
    images = labels = 0
    for name in shards:
        with tarfile.open(os.path.join(output, name)) as archive:
            for member in archive:
                images += member.name.endswith(".jpg")
                labels += member.name.endswith(".cls")
    check_count(method, images, expected)
    check_count(f"{method} (labels)", labels, expected)
    return Result(method, seconds, images, len(shards), folder_bytes(output))


def run_litdata(
    data_dir: str, output: str, *, workers: int, expected: int, quiet: bool, scratch: str
) -> Result:
    method = f"litdata {workers} workers"
    environment = dict(os.environ)
    # litdata's caches would default to ~/.lightning; keep them in the scratch folder.
    environment["DATA_OPTIMIZER_CACHE_FOLDER"] = os.path.join(scratch, "litdata-cache", "chunks")
    environment["DATA_OPTIMIZER_DATA_CACHE_FOLDER"] = os.path.join(scratch, "litdata-cache", "data")
    environment["LITDATA_DISABLE_VERSION_CHECK"] = "1"
    command = [
        PEER_PYTHON, LITDATA_SCRIPT, "--input", data_dir, "--output", output,
        "--workers", str(workers), "--chunk-bytes", str(SHARD_BYTES), "--seed", str(SEED),
    ]  # fmt: skip
    if quiet:
        command.append("--quiet")
    started = time.perf_counter()
    finished = subprocess.run(
        command,
        env=environment,
        stdout=subprocess.PIPE,
        stderr=None if not quiet else subprocess.PIPE,
    )
    outside = time.perf_counter() - started
    lines = finished.stdout.decode(errors="replace").strip().splitlines()
    if finished.returncode != 0 or not lines or not lines[-1].startswith("{"):
        stderr = (finished.stderr or b"").decode(errors="replace")[-2000:]
        raise BenchmarkError(
            f"{method} failed (exit {finished.returncode}): {stderr or lines[-5:]}",
            hint="re-create the peer environment: bash tools/peers/setup.sh",
        )
    timing = json.loads(lines[-1])
    with open(os.path.join(output, "index.json")) as handle:
        index = json.load(handle)
    samples = sum(chunk["chunk_size"] for chunk in index["chunks"])
    check_count(method, samples, expected)
    result = Result(method, timing["seconds"], samples, len(index["chunks"]), folder_bytes(output))
    versions = ", ".join(f"{k} {v}" for k, v in timing["versions"].items())
    result.note = f"{outside:.2f} s with interpreter start and import torch; {versions}"
    result.details = {"seconds_with_interpreter": outside, "versions": timing["versions"]}
    return result


# ---------------------------------------------------------------------------------------------
# Report


def ratios(results: list[Result]) -> dict[str, dict[str, float]]:
    """ours ÷ peer in images/s, for each of our variants against each peer."""
    ours = [r for r in results if r.method.startswith("ours")]
    peers = [r for r in results if not r.method.startswith("ours")]
    return {
        o.method: {p.method: o.images_per_second / p.images_per_second for p in peers} for o in ours
    }


def print_table(results: list[Result], count: int, cores: int) -> None:
    print(f"\n{count} photos, {cores} cores, best of the runs:")
    print(f"{'method':<30} {'seconds':>8} {'images/s':>9} {'shards':>6} {'output':>10}")
    for r in results:
        print(
            f"{r.method:<30} {r.seconds:>8.2f} {r.images_per_second:>9.0f} {r.shards:>6} "
            f"{format_bytes(r.bytes):>10}"
        )
    for r in results:
        if r.note:
            print(f"  {r.method}: {r.note}")
    table = ratios(results)
    if table:
        print("\nratio ours ÷ peer (images/s; >1: ours is faster)")
        peers = list(next(iter(table.values())))
        print(f"{'':<30}" + "".join(f" {p:>22}" for p in peers))
        for name, row in table.items():
            print(f"{name:<30}" + "".join(f" {row[p]:>22.2f}" for p in peers))


def plot(results: list[Result], path: str, title: str) -> None:
    names = [r.method for r in results]
    plot_bars(names, [r.images_per_second for r in results], path, title, "images/s")


# ---------------------------------------------------------------------------------------------


def main() -> int:
    arguments = _cli.parser(__doc__.split("\n\n")[0])
    arguments.add_argument("--count", type=int, default=3000, help="photos in the input set")
    arguments.add_argument(
        "--data-dir", default="/tmp/shardflow-bench/photos", help="where the photos are cached"
    )
    arguments.add_argument("--out", default=os.path.join(REPO, "reports"), help="report folder")
    arguments.add_argument("--repeat", type=int, default=3, help="runs per method; best counts")
    arguments.add_argument("--cores", type=int, default=2, help="CPUs to pin to; = workers")
    args, _ = _cli.parse(arguments)
    if args.count < 1 or args.repeat < 1 or args.cores < 1:
        arguments.error("--count, --repeat and --cores must be >= 1")
    data_dir = os.path.abspath(args.data_dir)

    available = sorted(os.sched_getaffinity(0))
    cores = available[: args.cores]
    if len(cores) < args.cores:
        print(f"warning: only {len(cores)} CPUs available, asked for {args.cores}")
    os.sched_setaffinity(0, cores)  # inherited by every worker and subprocess
    workers = args.cores

    files = prepare_photos(data_dir, args.count, args.quiet)
    input_bytes = read_all(files)
    if not args.quiet:
        print(
            f"{len(files)} photos, {format_bytes(input_bytes)} in {data_dir}; CPUs {cores}",
            flush=True,
        )
    # A folder of our own beside the photos (same file system), removed at the end.
    scratch = tempfile.mkdtemp(prefix="bench-convert-", dir=os.path.dirname(data_dir))
    output = os.path.join(scratch, "dataset")

    methods: list[tuple[str, Callable[[], Result]]] = [
        ("ours (decode)", lambda: run_ours(
            data_dir, output, workers=workers, validate="decode", restarts=False,
            expected=len(files))),
        ("ours (decode + row restarts)", lambda: run_ours(
            data_dir, output, workers=workers, validate="decode", restarts=True,
            expected=len(files))),
        ("ours (no validation)", lambda: run_ours(
            data_dir, output, workers=workers, validate="none", restarts=False,
            expected=len(files))),
        ("webdataset 1 process", lambda: run_webdataset(
            data_dir, output, processes=1, expected=len(files))),
        (f"webdataset {workers} processes", lambda: run_webdataset(
            data_dir, output, processes=workers, expected=len(files))),
    ]  # fmt: skip
    skipped = ""
    if os.path.exists(PEER_PYTHON):
        methods.append(
            (f"litdata {workers} workers", lambda: run_litdata(
                data_dir, output, workers=workers, expected=len(files),
                quiet=args.quiet, scratch=scratch))
        )  # fmt: skip
    else:
        skipped = "litdata skipped: .venv-peers is missing"
        print(f"{skipped}; create it with: bash tools/peers/setup.sh")

    best: dict[str, Result] = {}
    runs: list[dict[str, object]] = []
    try:
        # Round-robin, so drift on the machine spreads over all methods alike.
        for round_number in range(args.repeat):
            for name, run in methods:
                shutil.rmtree(output, ignore_errors=True)
                os.makedirs(output)
                result = run()
                runs.append({"round": round_number, **asdict(result)})
                if not args.quiet:
                    print(
                        f"  [{round_number + 1}/{args.repeat}] {name:<24} "
                        f"{result.seconds:7.2f} s  {result.images_per_second:6.0f} images/s",
                        flush=True,  # before a peer's own output
                    )
                if name not in best or result.seconds < best[name].seconds:
                    best[name] = result
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    results = [best[name] for name, _ in methods]
    print_table(results, len(files), workers)

    os.makedirs(args.out, exist_ok=True)
    config = {
        "count": len(files),
        "input_bytes": input_bytes,
        "data_dir": data_dir,
        "seed": SEED,
        "cores": args.cores,
        "workers": workers,
        "repeat": args.repeat,
        "max_shard_bytes": SHARD_BYTES,
        "ours": {
            "shuffle": True,
            "validate_images": ["decode", "none"],
            "format": "tar",
            "jpeg_row_restarts": [True, False],
        },
        "webdataset": {"maxsize": SHARD_BYTES, "members": ["jpg", "cls"], "start": "fork"},
        "litdata": {"chunk_bytes": SHARD_BYTES, "fn": "{image: bytes, label: int}"},
        "skipped": skipped,
    }
    host = machine(cores)
    for result in results:
        if "versions" in result.details:
            host["peer_packages"] = result.details["versions"]
    report = {
        "benchmark": "convert",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": host,
        "config": config,
        "results": [{**asdict(r), "images_per_second": r.images_per_second} for r in results],
        "ratios_ours_over_peer": ratios(results),
        "runs": runs,
    }
    json_path = os.path.join(args.out, "bench_convert.json")
    with open(json_path, "w") as handle:
        json.dump(report, handle, indent=2)
        handle.write("\n")
    png_path = os.path.join(args.out, "bench_convert.png")
    cpu = str(host["cpu"])
    plot(
        results,
        png_path,
        f"convert {len(files)} photos → ~64 MB tar shards, {workers} cores\n{cpu}",
    )
    print(f"\nwrote {json_path} and {png_path}")
    return 0


if __name__ == "__main__":
    _cli.run(main)
