"""Peer loaders on the photo set, run inside .venv-peers by tools/bench_peers.py: MosaicML
``streaming`` (MDS shards, StreamingDataset + torch DataLoader) and ``litdata``
(litdata.optimize chunks, StreamingDataset + StreamingDataLoader), each reading one epoch with
decode + random-resized-crop + flip in PIL (the same work as bench_peers' webdataset peer),
``--workers`` DataLoader processes. Prints one JSON line: samples, seconds, samples/s and the
conversion's seconds (the converted set is kept under --work and reused).

    .venv-peers/bin/python tools/peers/loader_peers.py --peer streaming --photos DIR \\
        --work DIR [--workers 2] [--batch 64] [--size 224] \\
        [--remote s3://BUCKET/PREFIX --endpoint URL --upload-endpoint URL]

With ``--remote`` the converted set is first uploaded there through ``--upload-endpoint`` (not
timed), then read from S3 through ``--endpoint`` the way each peer streams from object
storage: into an empty local cache of its own, shards downloaded as the epoch needs them.

Self-contained: .venv-peers holds the peers, not shardflow.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import math
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

import numpy as np


def list_photos(root: str) -> list[tuple[str, int]]:
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    files = []
    for label, name in enumerate(classes):
        for file_name in sorted(os.listdir(os.path.join(root, name))):
            if file_name.lower().endswith((".jpg", ".jpeg")):
                files.append((os.path.join(root, name, file_name), label))
    return files


class PilCrop:
    """torchvision's RandomResizedCrop (scale 0.08–1, ratio ¾–4⁄3) + flip, in PIL."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.rng = random.Random()

    def box(self, height: int, width: int) -> tuple[int, int, int, int]:
        area = height * width
        for _ in range(10):
            target = area * self.rng.uniform(0.08, 1.0)
            ratio = math.exp(self.rng.uniform(math.log(3 / 4), math.log(4 / 3)))
            w = round(math.sqrt(target * ratio))
            h = round(math.sqrt(target / ratio))
            if 0 < w <= width and 0 < h <= height:
                return self.rng.randint(0, height - h), self.rng.randint(0, width - w), h, w
        side = min(height, width)
        return (height - side) // 2, (width - side) // 2, side, side

    def __call__(self, data: bytes) -> Any:
        import torch
        from PIL import Image

        image = Image.open(io.BytesIO(data)).convert("RGB")
        top, left, h, w = self.box(image.height, image.width)
        image = image.resize((self.size, self.size), Image.Resampling.BILINEAR,
                             box=(left, top, left + w, top + h))  # fmt: skip
        if self.rng.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return torch.from_numpy(np.asarray(image))


def convert_streaming(photos: list[tuple[str, int]], out: str) -> None:
    _torchvision_for_streaming()
    from streaming import MDSWriter

    with MDSWriter(out=out, columns={"jpg": "bytes", "cls": "int"}, size_limit=8 << 20) as writer:
        for path, label in photos:
            with open(path, "rb") as handle:
                writer.write({"jpg": handle.read(), "cls": label})


def _torchvision_for_streaming() -> None:
    """``import streaming`` imports its vision datasets, hence torchvision. torchvision's wheel
    on the package index links CUDA torch, and fails to load beside the CPU torch the peers
    must use (libc10_cuda.so missing). Streaming's reading path never touches torchvision,
    so it gets the two names its vision module imports, and nothing else."""
    import importlib.machinery
    import sys
    import types

    try:
        import torchvision  # noqa: F401
    except Exception:  # RuntimeError from the CUDA-linked ops, or ImportError
        for name in [n for n in sys.modules if n.split(".")[0] == "torchvision"]:
            del sys.modules[name]
        stub = types.ModuleType("torchvision")
        datasets = types.ModuleType("torchvision.datasets")
        transforms = types.ModuleType("torchvision.transforms")
        functional = types.ModuleType("torchvision.transforms.functional")
        datasets.VisionDataset = type("VisionDataset", (), {})  # type: ignore[attr-defined]
        functional.to_tensor = lambda image: image  # type: ignore[attr-defined]
        stub.datasets, stub.transforms = datasets, transforms  # type: ignore[attr-defined]
        transforms.functional = functional  # type: ignore[attr-defined]
        for module in (stub, datasets, transforms, functional):
            module.__spec__ = importlib.machinery.ModuleSpec(module.__name__, None)
        sys.modules.update({"torchvision": stub, "torchvision.datasets": datasets,
                            "torchvision.transforms": transforms,
                            "torchvision.transforms.functional": functional})  # fmt: skip


def streaming_dataset(source: Source, batch: int, size: int) -> Any:
    _torchvision_for_streaming()
    from streaming import StreamingDataset

    class Photos(StreamingDataset):
        def __init__(self) -> None:
            super().__init__(remote=source.remote, local=source.local, shuffle=True,
                             batch_size=batch)  # fmt: skip
            self.crop = PilCrop(size)

        def __getitem__(self, index: int) -> Any:
            sample = super().__getitem__(index)
            return self.crop(sample["jpg"]), sample["cls"]

    globals()["StreamingPhotos"] = Photos  # workers unpickle it by name
    Photos.__qualname__ = Photos.__name__ = "StreamingPhotos"
    return Photos()


def read_streaming(source: Source, workers: int, batch: int, size: int) -> int:
    import torch

    if source.endpoint:
        os.environ["S3_ENDPOINT_URL"] = source.endpoint  # streaming's way to name the store
    loader = torch.utils.data.DataLoader(streaming_dataset(source, batch, size), batch_size=batch,
                                         num_workers=workers)  # fmt: skip
    return sum(len(labels) for _, labels in loader)


def _litdata_item(item: tuple[str, int]) -> dict[str, Any]:
    path, label = item
    with open(path, "rb") as handle:
        return {"jpg": handle.read(), "cls": label}


def convert_litdata(photos: list[tuple[str, int]], out: str) -> None:
    import litdata

    litdata.optimize(fn=_litdata_item, inputs=photos, output_dir=out, chunk_bytes="8MB",
                     num_workers=1)  # fmt: skip


def read_litdata(source: Source, workers: int, batch: int, size: int) -> int:
    import litdata

    remote: dict[str, Any] = {}
    if source.remote:
        # litdata fetches chunks with obstore, which refuses plain http unless told; a real
        # S3 endpoint is https and needs no such option.
        from litdata.streaming import downloader

        downloader._OBSTORE_CLIENT_OPTIONS = {**downloader._OBSTORE_CLIENT_OPTIONS,
                                              "allow_http": "true"}  # fmt: skip
        remote = {"cache_dir": source.local,
                  "storage_options": {"endpoint_url": source.endpoint}}  # fmt: skip

    class Photos(litdata.StreamingDataset):
        def __init__(self) -> None:
            super().__init__(source.remote or source.local, shuffle=True, **remote)
            self.crop = PilCrop(size)

        def __getitem__(self, index: Any) -> Any:
            sample = super().__getitem__(index)
            return self.crop(sample["jpg"]), sample["cls"]

    globals()["LitdataPhotos"] = Photos
    Photos.__qualname__ = Photos.__name__ = "LitdataPhotos"
    loader = litdata.StreamingDataLoader(Photos(), batch_size=batch, num_workers=workers)
    return sum(len(labels) for _, labels in loader)


@dataclasses.dataclass
class Source:
    """Where a peer reads the converted set: ``local`` alone, or ``remote`` (s3://) through
    ``endpoint`` with ``local`` as its cache."""

    local: str
    remote: str | None = None
    endpoint: str | None = None


def upload(directory: str, remote: str, endpoint: str) -> None:
    import boto3

    bucket, _, prefix = remote.removeprefix("s3://").partition("/")
    client = boto3.client("s3", endpoint_url=endpoint)
    try:
        client.head_bucket(Bucket=bucket)
    except client.exceptions.ClientError:
        client.create_bucket(Bucket=bucket)
    for root, _, names in os.walk(directory):
        for name in names:
            if not name.startswith("."):
                path = os.path.join(root, name)
                key = f"{prefix}/{os.path.relpath(path, directory)}".lstrip("/")
                client.upload_file(path, bucket, key)


PEERS = {"streaming": (convert_streaming, read_streaming),
         "litdata": (convert_litdata, read_litdata)}  # fmt: skip


def main() -> None:
    arguments = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    arguments.add_argument("--peer", choices=sorted(PEERS), required=True)
    arguments.add_argument("--photos", required=True)
    arguments.add_argument("--work", required=True)
    arguments.add_argument("--workers", type=int, default=2)
    arguments.add_argument("--batch", type=int, default=64)
    arguments.add_argument("--size", type=int, default=224)
    arguments.add_argument("--remote", help="s3://bucket/prefix to upload to and read from")
    arguments.add_argument("--endpoint", help="the S3 endpoint reads go through")
    arguments.add_argument("--upload-endpoint", help="the S3 endpoint the upload goes to")
    arguments.add_argument("--convert-only", action="store_true", help=argparse.SUPPRESS)
    args = arguments.parse_args()
    if args.remote and not (args.endpoint and args.upload_endpoint):
        arguments.error("--remote needs --endpoint and --upload-endpoint")
    photos = list_photos(args.photos)
    out = os.path.join(args.work, f"{args.peer}-{len(photos)}")
    convert, read = PEERS[args.peer]
    if args.convert_only:
        shutil.rmtree(out, ignore_errors=True)
        convert(photos, out)
        open(os.path.join(out, ".complete"), "w").close()
        return
    convert_s = 0.0
    if not os.path.exists(os.path.join(out, ".complete")):
        # In a process of its own: reading right after litdata.optimize in the same process
        # kills the DataLoader's workers (measured; a fresh process reads the same chunks).
        started = time.perf_counter()
        subprocess.run([sys.executable, __file__, "--convert-only", "--peer", args.peer,
                        "--photos", args.photos, "--work", args.work], check=True)  # fmt: skip
        convert_s = time.perf_counter() - started
    source = Source(out)
    if args.remote:
        upload(out, args.remote, args.upload_endpoint)
        cache = tempfile.mkdtemp(prefix=f"{args.peer}-cache-", dir=args.work)
        source = Source(os.path.join(cache, "local"), args.remote, args.endpoint)
    try:
        started = time.perf_counter()
        samples = read(source, args.workers, args.batch, args.size)
        seconds = time.perf_counter() - started
    finally:
        if args.remote:
            shutil.rmtree(cache, ignore_errors=True)
    print(json.dumps({"peer": args.peer, "samples": samples, "seconds": seconds,
                      "samples_per_s": samples / seconds, "convert_s": convert_s}))  # fmt: skip


if __name__ == "__main__":
    main()
