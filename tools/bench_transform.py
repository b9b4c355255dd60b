#!/usr/bin/env python
"""A pure-Python sample transform: the loader's process pool against its thread pool and
against webdataset + torch DataLoader, in one run on the same cores.

    python tools/bench_transform.py [--datasets digits,photos] [--photos 1000]
                                    [--transform-ms 2.0] [--repeat 3] [--out reports/]

The transform (``PythonTransform``) is what the process pool is for: a per-pixel Python
loop (a 16-bin histogram and a brightness gain drawn from the sample's generator) that holds
the GIL, calibrated at start to ``--transform-ms`` of CPU time per sample on this machine.
Each method decodes + random-resized-crops every sample of the set, applies the transform
and batches 64, over the same tar shards (converted once by dataflow.convert, as
tools/convert.py does):

    ours, process × N     dataflow.Loader, data.transform_pool = "process",
                          transform_workers = N (1 and 2), decode_workers = N + 2
    ours, thread          the same with transform_pool = "thread" (decode_workers = 2): the
                          GIL serialises the transform, the reference the pool must beat
    webdataset + DataLoader (2 workers)
                          webdataset.WebDataset over the same shards, shuffle(1000), PIL
                          decode + crop-resize + flip, the same transform (a generator per
                          sample made as ours are), torch DataLoader with num_workers = 2,
                          batch 64

(all with data.thread_nice = 0: the loader's threads are not deprioritised against the
peer's processes when the machine runs other work) on two sets, chosen to show the two
sides of the cost: ``digits`` (1,797 32×32 PNGs, dataflow.datasets.write_digits_folder;
decode ≈ 0.1 ms, so the transform is most of the work and the pool's scaling shows) and
``photos`` (``--photos`` real-photo JPEGs of ~33 KB cropped to 224, write_photo_folder;
our decode ≈ 0.6 ms, PIL's ≈ 2 ms: decode weighs as with ImageNet-like data). Each method
runs ``--repeat`` rounds taking turns, each round one epoch after a warm-up epoch (pool
start, page cache); the best round counts, since other work on a shared machine only ever
slows a round down. Each round also records the CPU time of the whole process tree per
sample (ours: main process, forkserver, workers; the peer: main process, DataLoader
workers), which other work on the machine hardly changes; ``cores`` / that cost is the
most the method can deliver on this machine's cores, ``cpu_bound_samples_per_s`` (with one
worker, and with threads, which the GIL serialises, also at most 1 / transform cost).
Also measured, as CPU time per sample: the transform, our decode (a Loader without
transform, one decode thread) and the webdataset side's PIL decode + crop. Writes
``<out>/bench_transform.json`` (machine, date, config, rates, costs, ratios) and
``<out>/bench_transform.png``.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import os
import time
from typing import Any

import _cli
import numpy as np
from _bench import (
    SEED,
    list_images,
    prepare_digits,
    prepare_photos,
    prepare_shards,
    write_report,
)

from dataflow.decode.image import ImageAugment, crop_box
from dataflow.index import DatasetIndex
from dataflow.pipeline import DataConfig, Loader
from dataflow.pipeline.transform import sample_rng

BATCH = 64
PEER_WORKERS = 2
CALIBRATION_SAMPLES = 200


class PythonTransform:
    """A histogram of ``steps`` pixel values (the image's, cycled) and a gain, by a Python
    loop: pure-Python work that holds the GIL, ~``steps`` × 0.1 µs."""

    def __init__(self, steps: int) -> None:
        self.steps = steps

    def __repr__(self) -> str:
        return f"PythonTransform(steps={self.steps})"

    def __call__(self, sample: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        image = sample["image"]
        pixels = image[:, :, 0].reshape(-1)[:4096].tolist()
        count = len(pixels)
        gain = float(rng.uniform(0.8, 1.2))
        histogram = [0] * 16
        for step in range(self.steps):
            value = int(pixels[step % count] * gain)
            histogram[min(value, 255) >> 4] += 1
        total = float(sum(histogram))
        return {
            "__key__": sample["__key__"],
            "image": image,
            "label": sample["label"],
            "histogram": np.array([h / total for h in histogram], np.float32),
        }


def calibrate(images: list[np.ndarray], target_ms: float) -> tuple[PythonTransform, float]:
    """The transform whose mean cost per sample on one core is ~``target_ms``, and that cost."""

    def mean_ms(transform: PythonTransform) -> float:
        # CPU time of this thread: what a sample costs, whatever else the machine runs.
        started = time.thread_time()
        for number, image in enumerate(images):
            transform({"__key__": "", "image": image, "label": 0}, sample_rng(SEED, 0, number))
        return (time.thread_time() - started) * 1000 / len(images)

    transform = PythonTransform(10_000)
    for _ in range(2):  # the second pass corrects the per-sample overhead's share
        cost = min(mean_ms(transform) for _ in range(3))
        transform = PythonTransform(max(1, round(transform.steps * target_ms / cost)))
    return transform, min(mean_ms(transform) for _ in range(3))


# ---------------------------------------------------------------------------------------------
# The methods


def tree_cpu_seconds() -> float:
    """CPU seconds (user + system) so far of this process and every live descendant (our
    forkserver and its transform workers, DataLoader workers)."""
    parents, cpu = {}, {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        pid = int(entry.name)
        parents[pid] = int(fields[1])
        cpu[pid] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    total, me = 0.0, os.getpid()
    for pid, seconds in cpu.items():
        ancestor = pid
        while ancestor not in (me, 0, 1) and ancestor in parents:
            ancestor = parents[ancestor]
        total += seconds if ancestor == me else 0.0
    return total


def timed_epoch(epoch: Any) -> tuple[float, float]:
    """(samples/s, CPU ms per sample of the whole process tree) of one epoch."""
    cpu, started = tree_cpu_seconds(), time.perf_counter()
    samples = epoch()
    wall, cpu = time.perf_counter() - started, tree_cpu_seconds() - cpu
    return samples / wall, cpu * 1000 / samples


def loader_epoch(loader: Loader, epoch: int) -> int:
    loader.set_epoch(epoch)
    return sum(int(batch["__valid__"].sum()) for batch in loader)


class WebdatasetMapper:
    """PIL decode + random-resized crop + flip (as webdataset users write it), then the
    transform with the generator our loader would give the sample."""

    def __init__(self, field: str, size: int, transform: PythonTransform) -> None:
        self.field, self.size, self.transform = field, size, transform
        self.augment = ImageAugment(size=size)

    def decode(self, sample: dict[str, Any], rng: np.random.Generator) -> np.ndarray:
        from PIL import Image

        image = Image.open(io.BytesIO(sample[self.field])).convert("RGB")
        top, left, height, width, flip = crop_box(
            image.height, image.width, self.augment, rng.random(42).tolist()
        )
        image = image.resize((self.size, self.size), Image.Resampling.BILINEAR,
                             box=(left, top, left + width, top + height))  # fmt: skip
        if flip:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return np.array(image)  # writeable, as torchvision's pil_to_tensor makes it

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        number = int.from_bytes(sample["__key__"].encode()[-8:].rjust(8, b"\0"), "little")
        rng = sample_rng(SEED, 0, number)
        image = self.decode(sample, rng)
        sample = {"__key__": sample["__key__"], "image": image, "label": int(sample["cls"])}
        return self.transform(sample, rng)


def webdataset_loader(shards: list[str], mapper: WebdatasetMapper) -> Any:
    import torch
    import webdataset as wds

    dataset = wds.WebDataset(shards, shardshuffle=len(shards), empty_check=False, seed=SEED)
    dataset = dataset.shuffle(1000).map(mapper)
    return torch.utils.data.DataLoader(
        dataset, batch_size=BATCH, num_workers=PEER_WORKERS, persistent_workers=True
    )


def webdataset_epoch(loader: Any) -> int:
    return sum(len(batch["label"]) for batch in loader)


# ---------------------------------------------------------------------------------------------
# One dataset


def decode_costs(data: DataConfig, shards: list[str], mapper: WebdatasetMapper) -> dict[str, float]:
    """CPU ms per sample: our loader without a transform (one decode thread; the whole
    process), and the webdataset side's PIL decode + crop of the same samples."""
    loader = Loader(dataclasses.replace(data, decode_workers=1), rank=0, world_size=1)
    try:
        loader_epoch(loader, 0)
        ours = min(timed_epoch(lambda: loader_epoch(loader, 1))[1] for _ in range(2))
    finally:
        loader.close()
    import webdataset as wds

    samples = list(wds.WebDataset(shards[:2], shardshuffle=False, empty_check=False))
    started = time.thread_time()
    for number, sample in enumerate(samples):
        mapper.decode(sample, sample_rng(SEED, 0, number))
    pil = (time.thread_time() - started) * 1000 / len(samples)
    return {"ours_decode_ms": ours, "pil_decode_ms": pil}


def bench_dataset(name: str, shards_root: str, size: int, target_ms: float, repeat: int,
                  say: Any) -> dict[str, Any]:  # fmt: skip
    index = DatasetIndex.load(shards_root)
    urls = [os.path.join(shards_root, s.path) for s in index.shards]
    image_field = next(f.name for f in index.fields if f.name in ("jpg", "png"))
    # thread_nice = 0: on a machine shared with other work, our decode threads compete on the
    # same terms as the peer's processes (on an idle machine the setting changes nothing).
    data = DataConfig(url=shards_root, global_batch=BATCH, image_size=size, seed=SEED,
                      thread_nice=0)  # fmt: skip
    probe = Loader(dataclasses.replace(data, shuffle=False), rank=0, world_size=1)
    # The images the transform will see (decoded and cropped), for its calibration.
    try:
        images = [image for batch in probe for image in batch["image"].numpy()]
    finally:
        probe.close()
    transform, transform_ms = calibrate(images[:CALIBRATION_SAMPLES], target_ms)
    mapper = WebdatasetMapper(image_field, size, transform)
    costs = {"transform_ms": transform_ms, **decode_costs(data, urls, mapper)}
    say(f"{name}: {index.num_samples} samples at {size}×{size}; one core: transform "
        f"{transform_ms:.2f} ms ({transform}), our decode {costs['ours_decode_ms']:.2f} ms, "
        f"PIL decode {costs['pil_decode_ms']:.2f} ms per sample")  # fmt: skip

    methods: dict[str, Any] = {}
    for workers in (1, 2):
        config = dataclasses.replace(data, transform_pool="process", transform_workers=workers,
                                     decode_workers=workers + 2)  # fmt: skip
        methods[f"ours, process × {workers}"] = (config, Loader(config, sample_transform=transform,
                                                                rank=0, world_size=1))  # fmt: skip
    config = dataclasses.replace(data, transform_pool="thread", decode_workers=2)
    methods["ours, thread"] = (config, Loader(config, sample_transform=transform, rank=0,
                                              world_size=1))  # fmt: skip
    peer = "webdataset + DataLoader (2 workers)"
    methods[peer] = (None, webdataset_loader(urls, mapper))
    rates: dict[str, list[float]] = {method: [] for method in methods}
    cpu_ms: dict[str, list[float]] = {method: [] for method in methods}
    try:
        for round_number in range(repeat + 1):  # round 0 warms up
            for method, (_, loader) in methods.items():
                if isinstance(loader, Loader):
                    rate, cost = timed_epoch(functools.partial(loader_epoch, loader, round_number))
                else:
                    rate, cost = timed_epoch(functools.partial(webdataset_epoch, loader))
                if round_number:
                    rates[method].append(rate)
                    cpu_ms[method].append(cost)
            if round_number:
                say(f"  round {round_number}: " + ", ".join(
                    f"{m} {r[-1]:.0f}" for m, r in rates.items()) + " samples/s")  # fmt: skip
    finally:
        for _, loader in methods.values():
            if isinstance(loader, Loader):
                loader.close()
    best = {method: max(values) for method, values in rates.items()}
    ratios = {
        "process × 2 / process × 1": best["ours, process × 2"] / best["ours, process × 1"],
        "process × 2 / thread": best["ours, process × 2"] / best["ours, thread"],
        "process × 2 / webdataset + DataLoader (2)": best["ours, process × 2"] / best[peer],
    }
    cpu = {method: min(values) for method, values in cpu_ms.items()}
    cores = len(os.sched_getaffinity(0))
    bound = {method: 1000 * cores / cost for method, cost in cpu.items()}
    for serial in ("ours, process × 1", "ours, thread"):  # one worker; the GIL
        bound[serial] = min(bound[serial], 1000 / transform_ms)
    for ratio, value in ratios.items():
        say(f"  {ratio}: {value:.2f}×")
    say("  CPU ms per sample (all processes): " + ", ".join(
        f"{m} {c:.2f}" for m, c in cpu.items()))  # fmt: skip
    say("  CPU bound on these cores: " + ", ".join(
        f"{m} {b:.0f}" for m, b in bound.items()) + " samples/s")  # fmt: skip
    return {
        "samples": index.num_samples,
        "image_size": size,
        "transform": repr(transform),
        "cpu_ms_per_sample_alone": costs,
        "configs": {m: dataclasses.asdict(c) for m, (c, _) in methods.items() if c is not None},
        "rounds_samples_per_s": rates,
        "best_samples_per_s": best,
        "median_samples_per_s": {m: float(np.median(v)) for m, v in rates.items()},
        "rounds_cpu_ms_per_sample": cpu_ms,
        "cpu_ms_per_sample": cpu,
        "cpu_bound_samples_per_s": bound,
        "ratios": ratios,
        "cpu_bound_ratios": {
            "process × 2 / process × 1": bound["ours, process × 2"] / bound["ours, process × 1"],
            "process × 2 / webdataset + DataLoader (2)": bound["ours, process × 2"] / bound[peer],
        },
    }


def plot(results: dict[str, dict[str, Any]], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(results), figsize=(7.5 * len(results), 3.8), squeeze=False)
    for axis, (name, result) in zip(axes[0], results.items(), strict=True):
        names = list(result["best_samples_per_s"])[::-1]
        rates = [result["best_samples_per_s"][n] for n in names]
        bounds = [result["cpu_bound_samples_per_s"][n] for n in names]
        colors = ["tab:blue" if n.startswith("ours") else "tab:gray" for n in names]
        rows = np.arange(len(names))
        axis.barh(rows + 0.2, bounds, height=0.4, color=colors, alpha=0.35,
                  label="CPU bound: cores / CPU per sample")  # fmt: skip
        bars = axis.barh(rows - 0.2, rates, height=0.4, color=colors, label="measured, best round")
        axis.bar_label(bars, labels=[f"{r:.0f}" for r in rates], padding=3)
        axis.set_yticks(rows, names)
        axis.legend(fontsize=7, loc="lower right")
        costs = result["cpu_ms_per_sample_alone"]
        axis.set_title(f"{name}: transform {costs['transform_ms']:.1f} ms, our decode "
                       f"{costs['ours_decode_ms']:.2f} ms per sample", fontsize=9)  # fmt: skip
        axis.set_xlabel("samples/s (higher is better)")
        axis.set_xlim(0, max(rates + bounds) * 1.2)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main() -> int:
    arguments = _cli.parser(__doc__.split("\n\n")[0])
    arguments.add_argument("--datasets", default="digits,photos", help="digits, photos or both")
    arguments.add_argument("--photos", type=int, default=1000, help="photos in that set")
    arguments.add_argument("--transform-ms", type=float, default=2.0)
    arguments.add_argument("--repeat", type=int, default=3, help="timed epochs per method")
    arguments.add_argument("--data-dir", default="/tmp/shardflow-bench")
    arguments.add_argument("--out", default=os.path.join(os.path.dirname(_cli.__file__), "..",
                                                         "reports"))  # fmt: skip
    args, _ = _cli.parse(arguments)
    say = (lambda *a: None) if args.quiet else (lambda *a: print(*a, flush=True))
    cores = len(os.sched_getaffinity(0))
    load_before = os.getloadavg()
    results: dict[str, dict[str, Any]] = {}
    for name in args.datasets.split(","):
        if name == "digits":
            folder = os.path.join(args.data_dir, "digits")
            count = len(prepare_digits(folder, args.quiet))
            size = 32
        elif name == "photos":
            folder = os.path.join(args.data_dir, "photos-transform")
            count = len(prepare_photos(folder, args.photos, args.quiet))
            size = 224
        else:
            arguments.error(f"--datasets: unknown set {name!r}; choose digits and/or photos")
        shards = prepare_shards(folder, folder + "-shards", count)
        assert len(list_images(folder)) == count
        results[name] = bench_dataset(name, shards, size, args.transform_ms, args.repeat, say)
    path = write_report(args.out, "bench_transform", __doc__, {
        "cores": cores,
        "load_average_before_after": [load_before, os.getloadavg()],
        "batch": BATCH,
        "peer_workers": PEER_WORKERS,
        "transform_ms_target": args.transform_ms,
        "repeat": args.repeat,
        "results": results,
    })  # fmt: skip
    plot(results, os.path.join(args.out, "bench_transform.png"),
         f"pure-Python transform, {cores} cores: best of {args.repeat} epochs (load average "
         f"{load_before[0]:.1f} before, {os.getloadavg()[0]:.1f} after)")  # fmt: skip
    say(f"wrote {path}")
    return 0


if __name__ == "__main__":
    _cli.run(main)
