"""Loader knobs: dataset, global batch, order, read-ahead, cache, decode, queues, policy."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from dataflow.config import ByteSize, ConfigError, parse_bytes


@dataclass(kw_only=True)
class DataConfig:
    url: str = ""
    """Dataset root (holds index.json): a local path or an s3:// URL."""
    global_batch: int = 256
    """Samples per step across all ranks; each rank takes global_batch / world_size."""
    seed: int = 0
    """Seed of the epoch order and of the augmentations."""
    shuffle: bool = True
    """Shuffle shards and samples each epoch (False: index order, for evaluation)."""
    shuffle_window: int = 8
    """Shards whose samples are mixed together (quality ↑, shards held in memory ↑)."""
    drop_last: bool = True
    """Drop the last incomplete global batch; False pads it with repeats (marked invalid)."""
    readahead_shards: int = 4
    """Shards fetched ahead of the ones being decoded."""
    fetch_workers: int = 4
    """Shards fetched concurrently (each split into ranged GETs over storage.connections)."""
    autotune: bool = False
    """While running, raise read-ahead, fetch workers and storage.connections step by step
    when the consumer stalls on storage (dataflow.pipeline.autotune); order and batches do not
    change. The values reached are in metrics()["autotune"]."""
    autotune_memory: ByteSize = 2 << 30
    """With autotune: the most that fetched shards may hold, (shuffle_window + read-ahead) ×
    the mean shard."""
    cache_dir: str = ""
    """Node-local shard cache shared by the processes of a node; empty: no disk cache."""
    cache_bytes: ByteSize = 20_000_000_000
    """Cap on the cache directory's shards; least recently used are evicted."""
    decode_workers: int = 2
    """Decode threads (libjpeg-turbo and OpenCV release the GIL); DALI's threads with DALI."""
    decode_backend: Literal["cpu", "dali"] = "cpu"
    """Who decodes images: our CPU decoders, or NVIDIA DALI (same crops, same output)."""
    decode_device: Literal["cpu", "gpu"] = "cpu"
    """With DALI: decode on the CPU (device_id=None) or with nvJPEG on the GPU ("mixed")."""
    hw_decoder_load: float = 0.65
    """With DALI on a GPU that has a hardware JPEG decoder: the share of images sent to it."""
    thread_nice: int = 10
    """Niceness added to the loader's threads (fetch, decode — DALI's inherit it — and the
    producer; Linux): they take the idle CPU without preempting the training loop, which
    measurably cut the data-wait of small models on 2 cores. 0: the process's priority."""
    prefetch_batches: int = 4
    """Batches decoded ahead of the consumer (bounds memory: this × batch bytes)."""
    prefetch_next_epoch: bool = False
    """Start epoch e + 1's fetch and decode while e's last batches are used (the trainer turns
    it on; a loader user who enables it must close() the loader, which stops that pass)."""
    image_field: str = ""
    """Field holding the image; empty: the first image field of the index."""
    label_field: str = "cls"
    """Integer label field; empty or absent from the index: no labels."""
    image_size: int = 224
    """Output height and width of images."""
    crop_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])
    """Random-resized-crop area range (fraction of the image)."""
    crop_ratio: list[float] = field(default_factory=lambda: [0.75, 4 / 3])
    """Random-resized-crop aspect-ratio range."""
    flip: bool = True
    """Random horizontal flip."""
    augment: bool = True
    """False: evaluation transform (resize + central crop, no flip)."""
    on_bad_sample: Literal["raise", "skip"] = "raise"
    """Corrupt sample or shard: stop naming shard, key and offset, or skip, count and record."""
    max_skip_fraction: float = 0.01
    """With skip: the most of an epoch's samples that a rank may skip (of those it is due,
    rounded up, so one bad sample of a small epoch is allowed); past it the epoch stops with
    TooManySkipsError. A damaged or replaced dataset then fails instead of training on
    nothing. 1.0: no limit."""
    audit: bool = False
    """Append epoch<TAB>step<TAB>key of every delivered sample to {out_dir}/audit/rank-R.tsv."""
    out_dir: str = "out"
    """Where the audit log goes."""
    device: str = ""
    """'cuda' (or 'cuda:N'): copy batches on a side CUDA stream; empty: stay on the CPU."""

    def __post_init__(self) -> None:
        for name in ("autotune_memory", "cache_bytes"):
            # Built in code, a size may still be "1GB": the same parser as the TOML loader.
            try:
                value = parse_bytes(getattr(self, name))
            except ConfigError as error:
                raise ConfigError(f"{name}: {error}") from None
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
            setattr(self, name, value)
        for name in ("global_batch", "shuffle_window", "fetch_workers", "decode_workers",
                     "prefetch_batches", "image_size"):  # fmt: skip
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_skip_fraction", "hw_decoder_load"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be within [0, 1], got {getattr(self, name)}")
        if self.decode_device == "gpu" and self.decode_backend != "dali":
            raise ValueError("decode_device = 'gpu' needs decode_backend = 'dali'")
        if not 0 <= self.thread_nice <= 19:
            raise ValueError(f"thread_nice must be within [0, 19], got {self.thread_nice}")
        if self.readahead_shards < 0:
            raise ValueError(f"readahead_shards must be >= 0, got {self.readahead_shards}")
        if len(self.crop_scale) != 2 or not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            raise ValueError(f"crop_scale must be [min, max] within (0, 1], got {self.crop_scale}")
        if len(self.crop_ratio) != 2 or not 0 < self.crop_ratio[0] <= self.crop_ratio[1]:
            raise ValueError(f"crop_ratio must be [min, max] > 0, got {self.crop_ratio}")
