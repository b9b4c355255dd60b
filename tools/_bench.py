"""Shared pieces of the benchmarks in tools/: the photo and digit sets (and the photos as
shards), the embedded S3 server behind the shaping proxy, machine description, memory,
plots, reports."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from importlib import metadata
from typing import Any

from dataflow.convert.config import ConvertConfig
from dataflow.convert.job import convert
from dataflow.errors import DataError
from dataflow.index import DatasetIndex

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEED = 0
IMAGE_SUFFIXES = (".jpg", ".jpeg")
MARKER = ".shardflow-bench"  # in a data dir a benchmark wrote, and so may rewrite
PACKAGES = ("shardflow", "torch", "nvidia-dali-cuda130", "webdataset", "numpy", "pillow",
            "simplejpeg", "xxhash")  # fmt: skip


def rss_bytes() -> int:
    """This process's resident memory now (``/proc/self/status``)."""
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


class BenchmarkError(DataError):
    """A method's output does not hold every input sample, or a peer failed to run."""


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


def prepare_photos(data_dir: str, count: int, quiet: bool) -> list[tuple[str, int]]:
    """The photo folder at ``data_dir``, written unless it already holds ``count`` photos."""
    marker = os.path.join(data_dir, MARKER)
    if os.path.isdir(data_dir):
        files = list_images(data_dir)
        if len(files) == count:
            return files
        if os.path.exists(marker):
            shutil.rmtree(data_dir)
        elif os.listdir(data_dir):
            raise BenchmarkError(
                f"{data_dir} holds {len(files)} images, not {count}, and was not written by "
                "this benchmark, so it is left alone",
                hint="pass --count to match it, or another --data-dir",
            )
    from dataflow.datasets import write_photo_folder

    if not quiet:
        print(f"writing {count} photos into {data_dir} (once; reused by later runs)", flush=True)
    started = time.perf_counter()
    write_photo_folder(data_dir, count=count, seed=SEED)
    with open(marker, "w") as handle:
        handle.write(f"written by a tools/ benchmark: {count} photos, seed {SEED}\n")
    if not quiet:
        print(f"  done in {time.perf_counter() - started:.0f} s")
    return list_images(data_dir)


def prepare_digits(data_dir: str, quiet: bool) -> list[tuple[str, int]]:
    """scikit-learn's 1,797 digits as PNGs at ``data_dir``, written unless already there."""
    if os.path.exists(os.path.join(data_dir, MARKER)):
        return list_images(data_dir)
    if os.path.isdir(data_dir) and os.listdir(data_dir):
        raise BenchmarkError(
            f"{data_dir} is not empty and was not written by this benchmark, so it is left alone",
            hint="pass another --data-dir, or delete it if an interrupted run left it half written",
        )
    from dataflow.datasets import write_digits_folder

    if not quiet:
        print(f"writing the digits into {data_dir} (once; reused by later runs)", flush=True)
    count = write_digits_folder(data_dir)
    with open(os.path.join(data_dir, MARKER), "w") as handle:
        handle.write(f"written by a tools/ benchmark: {count} scikit-learn digits\n")
    return list_images(data_dir)


def read_all(files: list[tuple[str, int]]) -> int:
    """Read every file once so that no method pays for a cold page cache."""
    total = 0
    for path, _ in files:
        with open(path, "rb") as handle:
            total += len(handle.read())
    return total


def machine(cores: list[int]) -> dict[str, object]:
    cpu_model = platform.processor()
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    cpu_model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "missing"
    return {
        "platform": platform.platform(),
        "cpu": cpu_model,
        "cpu_count": os.cpu_count(),
        "cores_used": cores,
        "python": platform.python_version(),
        "packages": versions,
    }


def plot_bars(names: list[str], rates: list[float], path: str, title: str, unit: str) -> None:
    """Horizontal bars, ours in blue and peers in grey, values printed on the bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names, rates = names[::-1], rates[::-1]
    colors = ["tab:blue" if n.startswith("ours") else "tab:gray" for n in names]
    figure, axes = plt.subplots(figsize=(8, 0.5 * len(names) + 1.5))
    bars = axes.barh(names, rates, color=colors)
    axes.bar_label(bars, labels=[f"{rate:.0f}" for rate in rates], padding=3)
    axes.set_xlabel(f"{unit} (higher is better)")
    axes.set_title(title, fontsize=10)
    axes.set_xlim(0, max(rates) * 1.15)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def dali_own_rate(shards_root: str, *, batch: int, threads: int, decoder: str = "cpu",
                  warmup: bool = False, remote: str | None = None,
                  batches: int | None = None, epochs: int = 1) -> float:  # fmt: skip
    """samples/s of DALI's own pipeline over our shards: readers.webdataset (index files
    derived from our sample tables) → decoders.image_random_crop → resize 224 → flip.
    ``remote``: the shards are read from there (s3://…, the endpoint in ``AWS_ENDPOINT_URL``)
    by DALI's own S3 support, and the timing includes the pipeline's build, as DALI starts
    reading then. ``batches``: stop after that many (default: ``epochs`` epochs; the reader
    wraps around, and a warm-up is one epoch)."""
    from dataflow.decode.dali import import_dali
    from dataflow.formats.tar import dali_index_text
    from dataflow.index import DatasetIndex, load_table

    dali = import_dali()
    fn, types = dali.fn, dali.types
    index = DatasetIndex.load(shards_root)
    with tempfile.TemporaryDirectory() as directory:
        paths, index_paths = [], []
        for shard in index.shards:
            index_path = os.path.join(directory, shard.path + ".idx")
            with open(index_path, "w") as handle:
                handle.write(dali_index_text(load_table(shards_root, index, shard), index.fields))
            paths.append(f"{remote}/{shard.path}" if remote else
                         os.path.join(shards_root, shard.path))  # fmt: skip
            index_paths.append(index_path)

        @dali.pipeline_def(batch_size=batch, num_threads=threads, seed=SEED,
                           device_id=0 if decoder == "mixed" else None)  # fmt: skip
        def pipeline() -> Any:
            jpegs, _ = fn.readers.webdataset(
                paths=paths, index_paths=index_paths, ext=["jpg", "cls"], random_shuffle=True,
                initial_fill=1024,
            )  # fmt: skip
            images = fn.decoders.image_random_crop(jpegs, device=decoder, output_type=types.RGB)
            images = fn.resize(images, resize_x=224, resize_y=224)
            return fn.flip(images, horizontal=fn.random.coin_flip())

        started = time.perf_counter()
        built = pipeline()
        built.build()
        epoch = -(-index.num_samples // batch)
        steps = min(epoch * epochs, batches or sys.maxsize)
        for _ in range(epoch if warmup else 0):
            built.run()
        if not remote:
            started = time.perf_counter()
        for _ in range(steps):
            built.run()
        return steps * batch / (time.perf_counter() - started)


def write_report(out: str, name: str, method: str | None, fields: dict[str, Any]) -> str:
    """Write ``<out>/<name>.json``: the date, the machine, the command line that ran, the
    tool's description and ``fields``; returns its path."""
    os.makedirs(out, exist_ok=True)
    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "machine": machine(sorted(os.sched_getaffinity(0))),
        "command": " ".join(["python", f"tools/{os.path.basename(sys.argv[0])}", *sys.argv[1:]]),
        "method": method,
        **fields,
    }
    path = os.path.join(out, f"{name}.json")
    with open(path, "w") as handle:
        json.dump(report, handle, indent=1)
    return path


def prepare_shards(photos: str, shards: str, count: int, *, row_restarts: bool = False) -> str:
    """The photos converted to tar shards at ``shards`` (JPEGs with a restart marker per
    row when ``row_restarts``), written unless already there as asked."""
    try:
        index = DatasetIndex.load(shards)
        if index.num_samples == count and (
            index.metadata.get("jpeg_row_restarts", False) == row_restarts
        ):
            return shards
    except Exception:
        pass
    config = ConvertConfig(input=photos, output=shards, max_shard_samples=256, workers=0,
                           overwrite=True, jpeg_row_restarts=row_restarts)  # fmt: skip
    convert(config, progress=False)
    return shards


def upload_dataset(root: str, url: str, config: Any) -> None:
    """Copy the converted dataset at ``root`` (index, shards, sample tables) to ``url``."""
    from dataflow import storage
    from dataflow.index import DatasetIndex

    storage.make_bucket(url, config=config)
    index = DatasetIndex.load(root)
    for path in ("index.json", *(p for s in index.shards for p in (s.path, s.table))):
        storage.upload_file(os.path.join(root, path), f"{url}/{path}", config=config)


@contextlib.contextmanager
def _process(code: str, port: int) -> Iterator[str]:
    """Run a loopback server in its own interpreter (its own GIL) until the block ends."""
    environment = {**os.environ, "PYTHONPATH": os.path.join(REPO, "tests")}
    process = subprocess.Popen([sys.executable, "-c", code], env=environment,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                break
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.kill()
        process.wait()


@contextlib.contextmanager
def shaped_s3(latency_s: float, bandwidth: float) -> Iterator[tuple[str, str]]:
    """(endpoint, proxy): the embedded S3 server, and the fault proxy in front of it shaped to
    ``latency_s`` to first byte and ``bandwidth`` bytes/s per connection, each in its own
    interpreter, until the block ends."""
    from dataflow.storage.local_s3 import DUMMY_CREDENTIALS, free_port

    for name, value in DUMMY_CREDENTIALS.items():
        os.environ.setdefault(name, value)
    server_port, proxy_port = free_port(), free_port()
    server_code = (
        "import time; from moto.server import ThreadedMotoServer; "
        f"ThreadedMotoServer(ip_address='127.0.0.1', port={server_port}, verbose=False).start(); "
        "time.sleep(86400)"
    )
    with _process(server_code, server_port) as endpoint:
        proxy_code = (
            "import time; from support.faultproxy import FaultProxy; "
            f"FaultProxy({endpoint!r}, first_byte_latency_s={latency_s}, "
            f"bandwidth_bytes_per_s={bandwidth}, port={proxy_port}).start(); time.sleep(86400)"
        )
        with _process(proxy_code, proxy_port) as proxy:
            yield endpoint, proxy


@dataclasses.dataclass
class LoaderRun:
    batches: int
    samples: int
    """Valid samples delivered (padding not counted)."""
    seconds: float
    metrics: dict[str, Any]
    """``loader.metrics()`` at the end (restarted after the first batch with ``warm_up``)."""


def drive_loader(data: Any, store: Any, *, seconds: float | None = None,
                 batches: int | None = None, warm_up: bool = False) -> LoaderRun:  # fmt: skip
    """Run a new Loader (rank 0 of 1) across epochs until ``seconds`` have passed or
    ``batches`` were read, then close it. ``warm_up``: the first batch — start-up — is neither
    counted nor timed, and the loader's metrics restart after it."""
    from dataflow.pipeline import Loader

    loader = Loader(data, store, rank=0, world_size=1)
    count = samples = epoch = 0
    started = time.perf_counter()
    warming = warm_up
    try:
        while True:
            loader.set_epoch(epoch)
            delivered = False
            for batch in loader:
                delivered = True
                if warming:
                    warming = False
                    started = time.perf_counter()
                    loader.metrics_.reset()
                    continue
                count += 1
                samples += int(batch["__valid__"].sum())
                elapsed = time.perf_counter() - started
                if (batches is not None and count >= batches) or (
                    seconds is not None and elapsed >= seconds
                ):  # fmt: skip
                    return LoaderRun(count, samples, elapsed, loader.metrics())
            if not delivered:  # every later epoch would be as empty: this loop would not end
                raise BenchmarkError(
                    f"epoch {epoch} of {data.url} gave no batch",
                    hint="data.global_batch must not exceed the dataset's samples, or set "
                    "data.drop_last = false",
                )
            epoch += 1
    finally:
        loader.close()
