"""Loader knobs: dataset, global batch, order, read-ahead, cache, decode, queues, policy."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Literal

from dataflow.config import ByteSize, ConfigError, parse_bytes


@dataclass(kw_only=True)
class MixSource:
    """One dataset of a mix (``data.mix``)."""

    url: str
    """Dataset root (holds index.json): a local path or an s3:// URL."""
    weight: float = 1.0
    """Its share of every batch; normalised over the mix (0.7 and 0.3, or 7 and 3)."""

    def __post_init__(self) -> None:
        if not self.url:
            raise ValueError("url is empty; point it at a dataset's root")
        if not (isinstance(self.weight, int | float) and 0 < self.weight < float("inf")):
            raise ValueError(f"weight must be a number > 0, got {self.weight!r} ({self.url})")

    @classmethod
    def from_weights(cls, weights: dict[str, float]) -> list[MixSource]:
        """``{url: weight}`` as ``data.mix``: ``DataConfig(mix=MixSource.from_weights(...))``."""
        return [cls(url=url, weight=weight) for url, weight in weights.items()]


@dataclass(kw_only=True)
class DataConfig:
    url: str = ""
    """Dataset root (holds index.json): a local path or an s3:// URL. Empty with ``mix``."""
    mix: list[MixSource] = field(default_factory=list)
    """Several datasets mixed by weight instead of ``url`` (dataflow.mix): each batch holds
    each one's share, each walks its own epochs, and resume stays exact."""
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
    dali_pipelines: int = 0
    """With DALI: pipelines per loader, each decoding one batch at a time with decode_workers
    threads, so one batch's host work overlaps another's GPU work. 0: 2 with decode_device =
    "gpu" (on an H200, 13,400 -> 19,700 samples/s; reports/gpu_dali_pipelines.json), else 1."""
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
    image_pipeline: Literal["train", "eval", "decode", "none"] = "train"
    """The image field: "train" random-resized crop + flip decoded straight into the batch
    (the fast path), "eval" centre crop, "decode" full H×W×3 uint8 image, "none" the
    encoded bytes (dataflow.pipeline.fields)."""
    augment: bool | None = None
    """Deprecated: use image_pipeline ("train" for true, "eval" for false)."""
    sample_transform: str = ""
    """``package.module:function`` called as fn(sample, rng) -> sample on every sample;
    empty: none (dataflow.pipeline.transform)."""
    batch_transform: str = ""
    """``package.module:function`` called as fn(batch) -> batch after collation; empty: none."""
    collate: str = ""
    """``package.module:function`` turning a list of sample dicts into a batch; empty: the
    default (dataflow.pipeline.collate; "dataflow.pipeline.collate:pad_collate" pads)."""
    transform_pool: Literal["thread", "process"] = "thread"
    """Where the sample transform runs: the decode threads (numpy, OpenCV: code that
    releases the GIL) or worker processes (pure-Python code); both give the same batches."""
    transform_workers: int = 2
    """With transform_pool = "process": worker processes."""
    transform_shm_bytes: ByteSize = 64 << 20
    """With transform_pool = "process": each worker's shared memory for a chunk's arrays, in
    and again out; a sample whose arrays exceed it is pickled instead (slower, counted)."""
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
        self._check_mix()
        for name in ("autotune_memory", "cache_bytes", "transform_shm_bytes"):
            # Built in code, a size may still be "1GB": the same parser as the TOML loader.
            try:
                value = parse_bytes(getattr(self, name))
            except ConfigError as error:
                raise ConfigError(f"{name}: {error}") from None
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
            setattr(self, name, value)
        for name in ("global_batch", "shuffle_window", "fetch_workers", "decode_workers",
                     "prefetch_batches", "image_size", "transform_workers"):  # fmt: skip
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.dali_pipelines < 0:
            raise ValueError(f"dali_pipelines must be >= 0 (0: auto), got {self.dali_pipelines}")
        for name in ("max_skip_fraction", "hw_decoder_load"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be within [0, 1], got {getattr(self, name)}")
        for name in ("sample_transform", "batch_transform", "collate"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(
                    f"{name} must be a 'package.module:function' string; pass a function "
                    f"itself as Loader({name}=...)"
                )
        if self.augment is not None:
            self._apply_deprecated_augment()
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

    def _check_mix(self) -> None:
        if not self.mix:
            return
        if self.url:
            raise ValueError(
                f"data.url = {self.url!r} and data.mix are both set; leave data.url empty "
                "(data.mix lists every dataset, this one too if it is meant)"
            )
        urls = [source.url for source in self.mix]
        for number, url in enumerate(urls):
            if url in urls[:number]:
                raise ValueError(
                    f"data.mix[{number}].url = {url!r} is listed twice; give it one entry "
                    "with the summed weight"
                )

    def _apply_deprecated_augment(self) -> None:
        """``augment`` → ``image_pipeline`` (one knob for one thing), with a warning."""
        wanted: Literal["train", "eval"] = "train" if self.augment else "eval"
        warnings.warn(
            f"data.augment is deprecated; use data.image_pipeline = {wanted!r}",
            DeprecationWarning,
            stacklevel=4,
        )
        if self.image_pipeline == "train":
            self.image_pipeline = wanted
        elif self.image_pipeline != wanted:
            raise ValueError(
                f"data.augment = {str(self.augment).lower()} contradicts data.image_pipeline "
                f"= {self.image_pipeline!r}; drop data.augment (deprecated)"
            )
        self.augment = None
