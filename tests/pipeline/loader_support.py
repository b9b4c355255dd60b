"""Helpers shared by the loader tests: the loader they build, what they record of a batch,
and the one resume helper."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dataflow.convert.config import ConvertConfig
from dataflow.convert.job import convert
from dataflow.index import DatasetIndex, load_table
from dataflow.pipeline import DataConfig, Loader

SIZE = 32  # small images keep each test well under a second of decoding


def convert_folder(source: Path, output: Path, **options: Any) -> str:
    config = ConvertConfig(input=str(source), output=str(output), workers=1, **options)
    convert(config, progress=False)
    return str(output)


def all_keys(url: str) -> list[str]:
    index = DatasetIndex.load(url)
    return [key for shard in index.shards for key in load_table(url, index, shard).keys]


def flip_bytes(data: bytes, start: int, count: int) -> bytes:
    damaged = bytearray(data)
    damaged[start : start + count] = bytes(b ^ 0xFF for b in damaged[start : start + count])
    return bytes(damaged)


@dataclass(frozen=True)
class CorruptDataset:
    url: str
    victim: str
    """Key of the one sample whose JPEG does not decode."""


def make(url: str, *, rank: int = 0, world_size: int = 1, **options: Any) -> Loader:
    options.setdefault("image_size", SIZE)
    options.setdefault("global_batch", 64)
    options.setdefault("shuffle_window", 3)
    # Functions go to the Loader; "module:function" paths stay in the config.
    given = {name: options.pop(name) for name in ("sample_transform", "batch_transform", "collate")
             if callable(options.get(name))}  # fmt: skip
    return Loader(DataConfig(url=url, **options), rank=rank, world_size=world_size, **given)


# ---------------------------------------------------------------------------------------------
# Recording batches, and the one resume helper


@dataclass
class Seen:
    """What a test compares of one batch."""

    keys: list[str]
    images: torch.Tensor
    labels: torch.Tensor
    valid: torch.Tensor


def record(batch: dict[str, Any]) -> Seen:
    return Seen(
        keys=list(batch["__key__"]),
        images=batch["image"].clone(),
        labels=batch["label"].clone(),
        valid=batch["__valid__"].clone(),
    )


def take(loader: Loader, count: int) -> list[Seen]:
    """The next ``count`` batches, going on into the next epoch(s) as a training loop would."""
    seen: list[Seen] = []
    while len(seen) < count:
        before = len(seen)
        for batch in loader:
            seen.append(record(batch))
            if len(seen) == count:
                break
        assert len(seen) > before, "the loader yielded no batch in a whole epoch"
    return seen


def one_epoch(loader: Loader) -> list[Seen]:
    return [record(batch) for batch in loader]


def assert_same_batches(got: list[Seen], want: list[Seen], what: str) -> None:
    assert len(got) == len(want), what
    for number, (have, expected) in enumerate(zip(got, want, strict=True)):
        where = f"{what}, batch {number}"
        assert have.keys == expected.keys, where
        assert torch.equal(have.labels, expected.labels), where
        assert torch.equal(have.valid, expected.valid), where
        assert torch.equal(have.images, expected.images), where


def assert_resumes_exactly(
    make_loader: Callable[[], Loader], midpoints: list[int], n_next: int
) -> None:
    """Save at each midpoint, restore into a fresh loader, and compare the next ``n_next``
    batches with an uninterrupted run (keys, labels, validity and pixels)."""
    reference_loader = make_loader()
    reference = take(reference_loader, max(midpoints) + n_next)
    reference_loader.close()
    for midpoint in midpoints:
        first = make_loader()
        take(first, midpoint)
        # Through JSON, as a checkpoint would store it.
        state = json.loads(json.dumps(first.state_dict()))
        first.close()
        resumed = make_loader()
        resumed.load_state_dict(state)
        got = take(resumed, n_next)
        resumed.close()
        assert_same_batches(
            got, reference[midpoint : midpoint + n_next], f"resumed at batch {midpoint}"
        )


def valid_keys(batches: list[Seen]) -> list[str]:
    return [k for b in batches for k, v in zip(b.keys, b.valid.tolist(), strict=True) if v]


def shardflow_threads() -> list[str]:
    return [
        t.name for t in threading.enumerate() if t.name.startswith("shardflow-") and t.is_alive()
    ]
