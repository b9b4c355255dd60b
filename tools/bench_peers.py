#!/usr/bin/env python
"""Loader throughput against its peers, read throughput from S3, and memory over epochs.

    python tools/bench_peers.py [--config FILE] [--count 3000] [--repeat 2] [--out reports/]
                                [--skip-peers] [--skip-s3] [--rss-epochs 5]
    python tools/bench_peers.py --baseline REF [--baseline-only] …

All in one run on the same cores (default: every core this process may use), on an
ImageNet-like set of real-photo JPEGs (~33 KB; dataflow.datasets.write_photo_folder)
converted once to tar shards, every method doing decode + random-resized-crop 224 + flip:

    ours                        dataflow.Loader (threads: decode_workers from [data], 2 by
                                default), the best of --repeat epochs of one Loader, from
                                local shards converted with the default settings
    ours, shards with row       the same from shards converted with jpeg_row_restarts = true
      restarts                  (a restart marker per row: a crop's decode starts at its row)
    reference × cores           the fastest in-process loop we can write, no I/O: bytes
                                already in memory, simplejpeg decode + OpenCV crop-resize +
                                flip on one core, multiplied by the number of cores
    reference, one loop per     the same loop in one process per core, all at once, rates
      core at once              summed: what the cores give together (shared caches, memory
                                bandwidth, the host's scheduling), against "× cores"
    webdataset + DataLoader     webdataset.WebDataset over the same shards, shuffle(1000),
                                PIL decode + crop-resize + flip, torch DataLoader with
                                num_workers = cores, batch 64
    MosaicML streaming          the photos as MDS shards; StreamingDataset (shuffled) + torch
                                DataLoader, the same PIL work, num_workers = cores, batch 64
    litdata                     the photos as litdata.optimize chunks; StreamingDataset
                                (shuffled) + StreamingDataLoader, likewise (both in
                                .venv-peers: tools/peers/loader_peers.py; skipped without it)
    ours (DALI CPU decode)      the same Loader with data.decode_backend = "dali" (decode_workers
                                is both our threads and DALI's; 3–4 beat 2 on 2 cores)
    DALI's own pipeline         readers.webdataset over the same shards (index files from our
                                sample tables) → decoders.image_random_crop → resize → flip
    DALI decode alone           DALI decoding our crop windows of photos already in memory,
                                batch 64, no loader: the DALI backend's ceiling on these cores

With ``--baseline REF`` (a commit), "ours" is also measured from a checkout of REF (a
``git worktree`` with this tree's compiled extension), both in fresh processes taking turns,
--repeat rounds each, best of each: a regression check in one run on the same cores, written
to ``<out>/bench_peers_baseline.json`` (``--baseline-only`` stops there).

Then every loader again, one epoch each from S3 behind a local S3 server and the fault proxy
shaped to ≈30 ms first byte and ≈90 MB/s per connection, as its users read remote data: ours
with read-ahead over ``storage.connections`` and no cache; webdataset over presigned URLs
(curl); streaming and litdata into an empty local cache; DALI with its own S3 reader (8
batches: it fetches sample by sample). Then
the storage path alone from S3: a local S3 server behind the fault proxy shaped to
≈30 ms first byte and ≈90 MB/s per connection (tests/support/faultproxy.py), reading every
shard once — one connection, one shard after another (the sequential reader) vs our
concurrent ranged GETs over ``storage.connections``. And the loader's peak RSS per epoch
over ``--rss-epochs`` epochs. Writes ``<out>/bench_peers.json`` (machine, date, config,
results) and ``<out>/bench_peers.png``.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import datetime
import io
import json
import os
import subprocess
import sys
import time
from typing import Any

import _cli
import numpy as np
from _bench import (
    SEED,
    BenchmarkError,
    dali_own_rate,
    list_images,
    machine,
    plot_bars,
    prepare_photos,
    prepare_shards,
    rss_bytes,
    shaped_s3,
    upload_dataset,
)

from dataflow import storage
from dataflow.index import DatasetIndex
from dataflow.pipeline import DataConfig, Loader
from dataflow.storage import StorageConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------------------------------------
# The three loaders


def run_ours(
    config: DataConfig, storage_config: StorageConfig, epochs: int
) -> tuple[float, Loader]:
    """The best samples/s over ``epochs`` epochs of one Loader, as a training run uses it
    (from the second epoch on, local shards are read into the memory of the first)."""
    loader = Loader(config, storage_config, rank=0, world_size=1)
    best = 0.0
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        started = time.perf_counter()
        samples = sum(len(batch["__key__"]) for batch in loader)
        best = max(best, samples / (time.perf_counter() - started))
    return best, loader


# Runs "ours" in a fresh interpreter whose ``dataflow`` is the tree at argv[1] (argv[2]: the
# [data] settings as JSON; settings that tree's DataConfig lacks are dropped and named).
_OURS_IN_TREE = """
import dataclasses, json, sys, time
sys.path.insert(0, sys.argv[1])
from dataflow.pipeline import DataConfig, Loader
settings, epochs = json.loads(sys.argv[2]), int(sys.argv[3])
known = {f.name for f in dataclasses.fields(DataConfig)}
config = DataConfig(**{k: v for k, v in settings.items() if k in known})
loader = Loader(config, rank=0, world_size=1)
best = 0.0
for epoch in range(epochs):
    loader.set_epoch(epoch)
    started = time.perf_counter()
    samples = sum(len(batch["__key__"]) for batch in loader)
    best = max(best, samples / (time.perf_counter() - started))
print(json.dumps({"rate": best, "dropped": sorted(set(settings) - known)}))
"""


def baseline_tree(ref: str, work: str) -> str:
    """A checkout of ``ref`` at ``work`` (a git worktree, reused), with the compiled ROI
    decoder copied from this tree so that both sides decode with the same extension."""
    import glob
    import shutil

    commit = subprocess.run(["git", "-C", REPO, "rev-parse", ref], check=True, text=True,
                            capture_output=True).stdout.strip()  # fmt: skip
    head = ""
    if os.path.isdir(work):
        head = subprocess.run(["git", "-C", work, "rev-parse", "HEAD"], text=True,
                              capture_output=True).stdout.strip()  # fmt: skip
    if head != commit:
        subprocess.run(["git", "-C", REPO, "worktree", "remove", "--force", work],
                       capture_output=True)  # fmt: skip
        shutil.rmtree(work, ignore_errors=True)
        subprocess.run(["git", "-C", REPO, "worktree", "add", "--detach", work, commit],
                       check=True, capture_output=True)  # fmt: skip
    for built in glob.glob(os.path.join(REPO, "dataflow", "decode", "*.so")):
        shutil.copy(built, os.path.join(work, "dataflow", "decode"))
    return commit


def run_against_baseline(data: DataConfig, ref: str, work: str, rounds: int,
                         epochs: int) -> dict[str, Any]:  # fmt: skip
    """Ours from this tree and from ``ref``, each in a fresh process, taking turns."""
    commit = baseline_tree(ref, work)
    settings = json.dumps(dataclasses.asdict(data))
    rates: dict[str, list[float]] = {"this tree": [], f"ours @{commit[:10]}": []}
    dropped: list[str] = []
    for _ in range(rounds):
        for name, tree in (("this tree", REPO), (f"ours @{commit[:10]}", work)):
            done = subprocess.run([sys.executable, "-c", _OURS_IN_TREE, tree, settings,
                                   str(epochs)], check=True, text=True,
                                  capture_output=True)  # fmt: skip
            result = json.loads(done.stdout.strip().splitlines()[-1])
            rates[name].append(result["rate"])
            dropped = dropped or result["dropped"]
    best = {name: max(values) for name, values in rates.items()}
    this, before = best["this tree"], best[f"ours @{commit[:10]}"]
    return {
        "baseline": commit,
        "rounds": rates,
        "best": best,
        "ratio": this / before,
        "settings_the_baseline_lacks": dropped,
    }


def run_reference(photos: list[bytes], size: int) -> float:
    import cv2
    import simplejpeg

    from dataflow.decode.image import ImageAugment, crop_box, sample_draws

    cv2.setNumThreads(1)
    augment = ImageAugment(size=size)
    draws = sample_draws(SEED, 0, np.arange(len(photos))).tolist()
    out = np.empty((size, size, 3), np.uint8)
    started = time.perf_counter()
    for data, uniforms in zip(photos, draws, strict=True):
        image = simplejpeg.decode_jpeg(data, colorspace="RGB")
        top, left, height, width, flip = crop_box(image.shape[0], image.shape[1], augment,
                                                  uniforms)  # fmt: skip
        region = image[top : top + height, left : left + width]
        cv2.resize(region, (size, size), dst=out, interpolation=cv2.INTER_LINEAR)
        if flip:
            cv2.flip(out, 1, dst=out)
    return len(photos) / (time.perf_counter() - started)


def _reference_in_process(photos: list[bytes], size: int, start: Any, rates: Any) -> None:
    start.wait()
    rates.put(run_reference(photos, size))


def run_reference_per_core(photos: list[bytes], size: int, cores: int) -> float:
    """The reference loop in ``cores`` processes at once, each on its own copy of the photos:
    what the cores together really give, against the "× cores" extrapolation."""
    import multiprocessing

    context = multiprocessing.get_context("fork")
    start, rates = context.Barrier(cores), context.Queue()
    processes = [context.Process(target=_reference_in_process, args=(photos, size, start, rates))
                 for _ in range(cores)]  # fmt: skip
    for process in processes:
        process.start()
    total = sum(rates.get(timeout=600) for _ in processes)
    for process in processes:
        process.join()
    return total


def _decode_for_pool(item: tuple[bytes, list[float]]) -> np.ndarray:
    from dataflow.decode.image import ImageAugment, decode_augment_into

    out = np.empty((224, 224, 3), np.uint8)
    decode_augment_into(item[0], ImageAugment(size=224), item[1], out)
    return out


def run_pools(photos: list[bytes], workers: int) -> dict[str, float]:
    """Decode + crop through a thread pool vs a process pool (results pickled back)."""
    from dataflow.decode.image import sample_draws

    items = list(zip(photos, sample_draws(SEED, 0, np.arange(len(photos))).tolist(), strict=True))
    rates = {}
    for name, pool_type in (("threads", concurrent.futures.ThreadPoolExecutor),
                            ("processes", concurrent.futures.ProcessPoolExecutor)):  # fmt: skip
        with pool_type(workers) as pool:
            list(pool.map(_decode_for_pool, items[: workers * 4]))  # start-up outside the timing
            started = time.perf_counter()
            list(pool.map(_decode_for_pool, items, chunksize=16))
            rates[name] = len(items) / (time.perf_counter() - started)
    return rates


def run_dali_alone(photos: list[bytes], size: int, threads: int, batch: int = 64) -> float:
    """DALI's decode of our crop windows with the batches already in memory, no loader: the
    ceiling of ``decode_backend = "dali"`` on these cores."""
    from dataflow.decode.dali import DaliImageDecoder
    from dataflow.decode.image import ImageAugment, crop_box, jpeg_size, sample_draws

    augment = ImageAugment(size=size)
    draws = sample_draws(SEED, 0, np.arange(len(photos))).tolist()
    boxes = [crop_box(*jpeg_size(data), augment, u) for data, u in zip(photos, draws, strict=True)]
    decoder = DaliImageDecoder(max_batch=batch, size=size, threads=threads)
    out = np.empty((batch, size, size, 3), np.uint8)
    decoder.decode(photos[:batch], boxes[:batch])  # builds the pipeline outside the timing
    count = len(photos) // batch * batch
    started = time.perf_counter()
    for first in range(0, count, batch):
        decoder.decode(photos[first : first + batch], boxes[first : first + batch], into=out,
                       rows=range(batch))  # fmt: skip
    return count / (time.perf_counter() - started)


class PilCrop:
    """torchvision-style RandomResizedCrop + flip with PIL, as webdataset users write it."""

    def __init__(self, size: int) -> None:
        from dataflow.decode.image import ImageAugment

        self.size = size
        self.augment = ImageAugment(size=size)
        self.rng = np.random.default_rng()

    def __call__(self, sample: dict[str, Any]) -> tuple[Any, int]:
        import torch
        from PIL import Image

        from dataflow.decode.image import crop_box

        image = Image.open(io.BytesIO(sample["jpg"])).convert("RGB")
        uniforms = self.rng.random(42).tolist()
        top, left, height, width, flip = crop_box(image.height, image.width, self.augment,
                                                  uniforms)  # fmt: skip
        image = image.resize((self.size, self.size), Image.Resampling.BILINEAR,
                             box=(left, top, left + width, top + height))  # fmt: skip
        if flip:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return torch.from_numpy(np.asarray(image)), int(sample["cls"])


def run_webdataset(shards: list[str], size: int, workers: int, batch: int) -> tuple[float, int]:
    import torch
    import webdataset as wds

    dataset = wds.WebDataset(shards, shardshuffle=len(shards), empty_check=False)
    dataset = dataset.shuffle(1000).map(PilCrop(size))
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, num_workers=workers)
    started = time.perf_counter()
    samples = sum(len(labels) for _, labels in loader)
    return samples / (time.perf_counter() - started), samples


PEER_PYTHON = os.path.join(REPO, ".venv-peers", "bin", "python")
PEER_LOADERS = {"streaming": "MosaicML streaming + DataLoader",
                "litdata": "litdata StreamingDataLoader"}  # fmt: skip


def run_peer_loader(peer: str, photos_dir: str, work: str, workers: int,
                    s3: tuple[str, str, str] | None = None) -> float:  # fmt: skip
    """One epoch of a peer loader in .venv-peers (tools/peers/loader_peers.py): samples/s.
    ``s3``: (remote, read endpoint, upload endpoint) to read it from S3."""
    command = [PEER_PYTHON, os.path.join(REPO, "tools", "peers", "loader_peers.py"), "--peer",
               peer, "--photos", photos_dir, "--work", work, "--workers", str(workers)]  # fmt: skip
    if s3:
        command += ["--remote", s3[0], "--endpoint", s3[1], "--upload-endpoint", s3[2]]
    done = subprocess.run(command, capture_output=True, text=True, check=False,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    if done.returncode != 0:
        raise BenchmarkError(f"{peer} failed (exit {done.returncode}): {done.stderr[-2000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if result["samples"] != len(list_images(photos_dir)):
        raise BenchmarkError(f"{peer} read {result['samples']} samples, not every photo")
    return float(result["samples_per_s"])


# ---------------------------------------------------------------------------------------------
# The loaders again, from S3 behind the shaping proxy


def presigned_urls(url: str, keys: list[str], endpoint: str) -> list[str]:
    """Presigned HTTP GET URLs for ``url``/key through ``endpoint``: how webdataset users
    stream private S3 shards (webdataset opens http:// with curl)."""
    import boto3

    bucket, _, prefix = url.removeprefix("s3://").partition("/")
    client = boto3.client("s3", endpoint_url=endpoint)
    return [client.generate_presigned_url("get_object", ExpiresIn=3600,
                                          Params={"Bucket": bucket, "Key": f"{prefix}/{key}"})
            for key in keys]  # fmt: skip


def run_loaders_from_s3(
    shards: str, photos_dir: str, work: str, data: DataConfig, store: StorageConfig,
    workers: int, repeat: int, dali: bool, say: Any,
) -> dict[str, float]:  # fmt: skip
    """One epoch of every loader from S3 through the proxy shaped to 30 ms first byte and
    90 MB/s per connection, each as its users configure remote reading: ours with its
    read-ahead over ``storage.connections``, no cache; webdataset over presigned URLs;
    streaming and litdata into an empty local cache each run; DALI with its own S3 reader.
    Uploads go straight to the server and are not timed."""
    rates: dict[str, float] = {}
    with shaped_s3(0.030, 90e6) as (endpoint, proxy):
        url = "s3://bench-peers/ours"
        upload_dataset(shards, url, StorageConfig(endpoint_url=endpoint))
        through = dataclasses.replace(store, endpoint_url=proxy)
        remote = dataclasses.replace(data, url=url)
        rates["ours"] = run_ours(remote, through, repeat)[0]
        say(f"  ours: {rates['ours']:.0f} samples/s")
        index = DatasetIndex.load(shards)
        urls = presigned_urls(url, [s.path for s in index.shards], proxy)
        name = "webdataset + DataLoader"
        rates[name] = max(run_webdataset(urls, 224, workers, 64)[0] for _ in range(repeat))
        say(f"  {name}: {rates[name]:.0f} samples/s")
        for peer, name in PEER_LOADERS.items():
            if os.path.exists(PEER_PYTHON):
                s3 = (f"s3://bench-peers/{peer}", proxy, endpoint)
                rates[name] = max(run_peer_loader(peer, photos_dir, work, workers, s3)
                                  for _ in range(repeat))  # fmt: skip
                say(f"  {name}: {rates[name]:.0f} samples/s")
        if dali:
            name = "ours (DALI CPU decode)"
            rates[name] = run_ours(dataclasses.replace(remote, decode_backend="dali"), through,
                                   repeat)[0]  # fmt: skip
            say(f"  {name}: {rates[name]:.0f} samples/s")
            name = "DALI's own pipeline"
            os.environ["AWS_ENDPOINT_URL"] = proxy  # DALI's S3 reader (the AWS SDK) reads it
            try:
                # Measured: DALI's S3 reader fetches sample by sample, one request after
                # another (~13 samples/s at 30 ms; read_ahead changes nothing), so an epoch
                # would take minutes: 8 batches, once, tell its rate.
                rates[name] = dali_own_rate(shards, batch=64, threads=workers, remote=url,
                                            batches=8)  # fmt: skip
            finally:
                del os.environ["AWS_ENDPOINT_URL"]
            say(f"  {name}: {rates[name]:.0f} samples/s")
    return rates


# ---------------------------------------------------------------------------------------------
# S3 read throughput behind a latency/bandwidth-shaping proxy


def run_s3(
    shards_root: str, connections: int, latency_s: float, bandwidth: float
) -> dict[str, Any]:
    """Every shard read once through the shaping proxy: sequential vs ours (concurrent)."""
    index = DatasetIndex.load(shards_root)
    with shaped_s3(latency_s, bandwidth) as (endpoint, proxy):
        bucket = "s3://bench-io"
        upload_dataset(shards_root, bucket, StorageConfig(endpoint_url=endpoint))
        urls = [(f"{bucket}/{s.path}", s.bytes) for s in index.shards]
        total = sum(size for _, size in urls)
        biggest = max(size for _, size in urls)
        sequential = StorageConfig(endpoint_url=proxy, connections=1, range_size=biggest + 1)
        started = time.perf_counter()
        for url, size in urls:
            storage.read_range(url, 0, size, config=sequential)
        sequential_rate = total / 1e6 / (time.perf_counter() - started)
        # Ours, as the loader's read-ahead does it: `connections` shards in flight at
        # once. (Splitting each shard into small ranged GETs is what real S3 rewards, but
        # moto copies the whole object for every ranged GET, so here a GET per shard.)
        ours = StorageConfig(endpoint_url=proxy, connections=connections,
                             range_size=max(4096, biggest))  # fmt: skip
        started = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(connections) as pool:
            list(pool.map(lambda u: storage.read_range(u[0], 0, u[1], config=ours), urls))
        ours_rate = total / 1e6 / (time.perf_counter() - started)
    ideal = connections * bandwidth / 1e6
    return {
        "bytes": total,
        "connections": connections,
        "first_byte_latency_s": latency_s,
        "bandwidth_per_connection_mb_s": bandwidth / 1e6,
        "sequential_mb_s": sequential_rate,
        "ours_mb_s": ours_rate,
        "ideal_mb_s": ideal,
        "fraction_of_ideal": ours_rate / ideal,
        "speedup_vs_sequential": ours_rate / sequential_rate,
    }


# ---------------------------------------------------------------------------------------------


RESTARTS = "ours (shards with JPEG row restarts)"


def ratios_of(rates: dict[str, float]) -> dict[str, float]:
    """Ours over each peer; ours with DALI decode over DALI's own pipeline and its ceiling."""
    if "ours" not in rates:
        return {}
    ratios = {f"ours ÷ {name}": rates["ours"] / rate for name, rate in rates.items()
              if not name.startswith("ours")}  # fmt: skip
    if RESTARTS in rates:
        ratios[f"{RESTARTS} ÷ ours"] = rates[RESTARTS] / rates["ours"]
    if "ours (DALI CPU decode)" in rates:
        for name in ("DALI's own pipeline", "DALI decode alone (in memory)"):
            if name in rates:
                ratios[f"ours (DALI CPU decode) ÷ {name}"] = (
                    rates["ours (DALI CPU decode)"] / rates[name]
                )
    return ratios


def main() -> int:
    arguments = _cli.parser(__doc__.split("\n\n")[0])
    arguments.add_argument("--count", type=int, default=3000, help="photos in the set")
    arguments.add_argument("--data-dir", default="/tmp/shardflow-bench/photos")
    arguments.add_argument("--repeat", type=int, default=2, help="epochs per method; best counts")
    arguments.add_argument("--rss-epochs", type=int, default=5)
    arguments.add_argument("--skip-peers", action="store_true")
    arguments.add_argument("--skip-s3", action="store_true")
    arguments.add_argument("--skip-dali", action="store_true")
    arguments.add_argument("--s3-connections", type=int, default=4)
    arguments.add_argument("--out", default=os.path.join(REPO, "reports"))
    arguments.add_argument(
        "--baseline", default="", help="also measure ours at this commit (a regression check)"
    )
    arguments.add_argument(
        "--baseline-only", action="store_true", help="with --baseline: measure only ours against it"
    )
    args, config = _cli.parse(arguments)
    cores = len(os.sched_getaffinity(0))
    photos_dir = args.data_dir
    files = prepare_photos(photos_dir, args.count, args.quiet)
    shards = prepare_shards(photos_dir, photos_dir.rstrip("/") + "-shards", args.count)
    data = dataclasses.replace(config.data, url=shards, global_batch=64, image_size=224)
    results: dict[str, float] = {}
    say = (lambda *a: None) if args.quiet else (lambda *a: print(*a, flush=True))
    if args.baseline:
        work = args.data_dir.rstrip("/") + "-baseline-tree"
        against = run_against_baseline(data, args.baseline, work, args.repeat * 2, args.repeat)
        for name, values in against["rounds"].items():
            say(f"{name}: " + ", ".join(f"{v:.0f}" for v in values) + " samples/s")
        say(f"this tree ÷ {args.baseline} ({against['baseline'][:10]}): {against['ratio']:.3f}×")
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "bench_peers_baseline.json"), "w") as handle:
            json.dump({
                "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
                "machine": machine(sorted(os.sched_getaffinity(0))),
                "command": " ".join(sys.argv), "config": dataclasses.asdict(data), **against,
            }, handle, indent=1)  # fmt: skip
        if args.baseline_only:
            return 0

    photos = []
    for path, _ in files:
        with open(path, "rb") as handle:
            photos.append(handle.read())
    say(f"{len(photos)} photos, mean {np.mean([len(p) for p in photos]) / 1000:.1f} KB, "
        f"{cores} cores")  # fmt: skip
    results["reference × cores"] = cores * max(
        run_reference(photos, 224) for _ in range(args.repeat)
    )
    say(f"reference × cores: {results['reference × cores']:.0f} samples/s")
    results["reference, one loop per core at once"] = max(
        run_reference_per_core(photos, 224, cores) for _ in range(args.repeat)
    )
    say(f"reference, one loop per core at once: "
        f"{results['reference, one loop per core at once']:.0f} samples/s")  # fmt: skip
    pools = run_pools(photos, cores)
    say(f"decode pool of {cores}: threads {pools['threads']:.0f} samples/s, processes "
        f"{pools['processes']:.0f} samples/s")  # fmt: skip
    results["ours"], loader = run_ours(data, config.storage, args.repeat)
    stage_table = loader.metrics_.summary(loader.metrics())
    say(f"ours: {results['ours']:.0f} samples/s\n{stage_table}")
    restarted = prepare_shards(photos_dir, photos_dir.rstrip("/") + "-shards-restarts",
                               args.count, row_restarts=True)  # fmt: skip
    results[RESTARTS] = run_ours(dataclasses.replace(data, url=restarted), config.storage,
                                 args.repeat)[0]  # fmt: skip
    say(f"{RESTARTS}: {results[RESTARTS]:.0f} samples/s")
    if not args.skip_peers:
        index = DatasetIndex.load(shards)
        urls = [os.path.join(shards, s.path) for s in index.shards]
        results["webdataset + DataLoader"] = max(
            run_webdataset(urls, 224, cores, 64)[0] for _ in range(args.repeat)
        )
        say(f"webdataset + DataLoader: {results['webdataset + DataLoader']:.0f} samples/s")
        for peer, name in PEER_LOADERS.items():
            if not os.path.exists(PEER_PYTHON):
                say(f"{name} skipped: .venv-peers is missing (bash tools/peers/setup.sh)")
                continue
            results[name] = max(run_peer_loader(peer, photos_dir, args.data_dir + "-peers",
                                                cores) for _ in range(args.repeat))  # fmt: skip
            say(f"{name}: {results[name]:.0f} samples/s")

    if not args.skip_dali:
        results["ours (DALI CPU decode)"] = run_ours(
            dataclasses.replace(data, decode_backend="dali"), config.storage, args.repeat
        )[0]
        results["DALI's own pipeline"] = max(
            dali_own_rate(shards, batch=64, threads=cores) for _ in range(args.repeat)
        )
        dali_own = results["DALI's own pipeline"]
        dali_alone = max(run_dali_alone(photos, 224, data.decode_workers)
                         for _ in range(args.repeat))  # fmt: skip
        results["DALI decode alone (in memory)"] = dali_alone
        say(
            f"ours with DALI CPU decode: {results['ours (DALI CPU decode)']:.0f} samples/s; "
            f"DALI's own webdataset pipeline: {dali_own:.0f} samples/s; DALI decoding our "
            f"crops from memory, no loader: {dali_alone:.0f} samples/s"
        )

    rss = []
    loader = Loader(data, config.storage, rank=0, world_size=1)
    for epoch in range(args.rss_epochs):
        loader.set_epoch(epoch)
        peak = 0
        for _ in loader:
            peak = max(peak, rss_bytes())
        rss.append(peak)
    say("peak RSS per epoch (MB): " + ", ".join(f"{r / 1e6:.0f}" for r in rss))

    s3: list[dict[str, Any]] = []
    if not args.skip_s3:
        for connections, bandwidth in ((args.s3_connections, 90e6), (4, 20e6), (8, 20e6)):
            result = run_s3(shards, connections, 0.030, bandwidth)
            s3.append(result)
            say(f"S3 via shaping proxy (30 ms, {bandwidth / 1e6:.0f} MB/s per connection): "
                f"sequential {result['sequential_mb_s']:.0f} MB/s, ours "
                f"{result['ours_mb_s']:.0f} MB/s over {connections} connections "
                f"({result['fraction_of_ideal']:.0%} of {result['ideal_mb_s']:.0f} MB/s; "
                f"{result['speedup_vs_sequential']:.1f}× sequential)")  # fmt: skip

    from_s3: dict[str, float] = {}
    if not args.skip_s3:
        say("the loaders from S3 via the shaping proxy (30 ms, 90 MB/s per connection):")
        from_s3 = run_loaders_from_s3(
            shards, photos_dir, args.data_dir + "-peers", data, config.storage, cores,
            args.repeat, dali=not args.skip_dali, say=say,
        )  # fmt: skip

    ratios, s3_ratios = ratios_of(results), ratios_of(from_s3)
    for heading, rates, table in (
        ("local shards", results, ratios),
        ("from S3 behind the shaping proxy", from_s3, s3_ratios),
    ):
        if rates:
            print(f"\nsamples/s, {heading} (decode + random-resized-crop 224 + flip):")
            for name, rate in rates.items():
                print(f"  {name:<{max(map(len, rates))}}{rate:>9.0f}")
            for name, ratio in table.items():
                print(f"  {name:<{max(map(len, table))}}{ratio:>7.2f}×")
    os.makedirs(args.out, exist_ok=True)
    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "machine": machine(sorted(os.sched_getaffinity(0))),
        "command": " ".join(sys.argv),
        "config": {"data": dataclasses.asdict(data), "storage": dataclasses.asdict(config.storage)},
        "photos": {"count": len(photos), "mean_bytes": float(np.mean([len(p) for p in photos]))},
        "samples_per_s": results,
        "decode_pool_samples_per_s": pools,
        "ratios": ratios,
        "samples_per_s_from_s3": from_s3,
        "ratios_from_s3": s3_ratios,
        "loader_stages": loader.metrics(),
        "peak_rss_bytes_per_epoch": rss,
        "s3": s3,
    }
    with open(os.path.join(args.out, "bench_peers.json"), "w") as handle:
        json.dump(report, handle, indent=1, default=str)
    title = f"{len(photos)} photos, {cores} cores: decode + RRC 224 + flip"
    plot_bars(list(results), list(results.values()), os.path.join(args.out, "bench_peers.png"),
              title, "samples/s")  # fmt: skip
    if from_s3:
        s3_title = f"{title}\nfrom S3 behind 30 ms to first byte, 90 MB/s per connection"
        plot_bars(list(from_s3), list(from_s3.values()),
                  os.path.join(args.out, "bench_peers_s3.png"), s3_title, "samples/s")  # fmt: skip
    print(f"wrote {args.out}/bench_peers.json and {args.out}/bench_peers*.png")
    return 0


if __name__ == "__main__":
    _cli.run(main)
