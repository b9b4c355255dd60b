"""Decoding one batch: samples out of fetched shards, fields decoded by kind, transformed.

The CPU path (``decode_range``) runs in chunks on the decode thread pool; the DALI path
(``decode_with_dali``) runs once per batch and hands the JPEGs to DALI with our crop
windows. With ``image_pipeline`` "train" or "eval" the image is cropped while it is decoded,
straight into the batch's preallocated uint8 array (the fast path: no per-sample array);
with "decode" or "none" it is a field like the others (dataflow.pipeline.fields). When a
sample transform is set, each chunk's samples then become dicts — ``__key__``, ``image``
(a view of the batch array on the fast path), ``label``, other fields by name — and go
through the transform runner in the same decode thread, seeded by (seed, epoch, sample id).

Every step shares the bad-sample policy (``reject``): raise naming shard, key and byte
offset (and the transform, when it was the transform that raised), or skip — the sample is
dropped from its batch, counted, logged and recorded in the loader's state so that a resumed
run skips it too. The stage gets what it needs as a ``DecodeContext``, not the Loader.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from dataflow.decode.dali import DaliDecodeError, DaliImageDecoder
from dataflow.decode.image import ImageAugment, crop_box, dali_image_size, decode_augment_into
from dataflow.errors import BadSampleError, DataError
from dataflow.formats import codec
from dataflow.formats.codec import check_image
from dataflow.formats.parquet import decode_column_value
from dataflow.index import DatasetIndex, Field
from dataflow.metrics import StageMetrics
from dataflow.pipeline.config import DataConfig
from dataflow.pipeline.fields import FieldDecoders
from dataflow.pipeline.shards import ShardView
from dataflow.pipeline.transform import TransformFailure, TransformRunner, UserCode

log = logging.getLogger(__name__)

# What a bad sample raises while it is decoded; the on_bad_sample policy handles these.
BAD_SAMPLE_ERRORS = (BadSampleError, ValueError, KeyError, UnicodeDecodeError)


def _decodes(data: bytes | memoryview) -> bool:
    try:
        check_image(data)
        return True
    except ValueError:
        return False


def make_dali_decoder(
    config: DataConfig,
    *,
    batch: int,
    device: torch.device | None,
    images: bool,
    user_code: UserCode,
) -> DaliImageDecoder | None:
    """DALI for data.decode_backend = "dali" (None otherwise, or without images). DALI
    crops ("train", "eval"); a sample transform or collate then runs on its CPU output."""
    if config.decode_backend != "dali" or not images:
        return None
    if config.image_pipeline not in ("train", "eval"):
        raise DataError(
            f"data.decode_backend = 'dali' crops images (image_pipeline 'train' or 'eval'); "
            f"data.image_pipeline = {config.image_pipeline!r} needs data.decode_backend = 'cpu'"
        )
    if config.decode_device == "gpu" and (user_code.sample_transform or user_code.collate):
        raise DataError(
            "a sample_transform or collate runs on the CPU, but data.decode_device = 'gpu' "
            "leaves DALI's images on the GPU; use decode_device = 'cpu', or a batch_transform "
            "(it gets the batch on the GPU)"
        )
    return DaliImageDecoder(
        max_batch=batch, size=config.image_size, threads=config.decode_workers,
        device=config.decode_device, device_id=device.index if device is not None else None,
        hw_decoder_load=config.hw_decoder_load,
        pipelines=config.dali_pipelines or (2 if config.decode_device == "gpu" else 1),
    )  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class DecodeContext:
    """What the decode and transform stages need to know of the loader, for one pass."""

    format: str
    """The dataset's shard format: "tar" or "parquet"."""
    fields: tuple[Field, ...]
    """The index's fields, in column order."""
    image_fields: tuple[str, ...]
    """Fields that may hold the image (the first present one is used)."""
    label_field: str
    """The integer label field; empty: none."""
    image_pipeline: str
    """``train`` or ``eval`` (crop while decoding, into the batch array), ``decode``, ``none``."""
    augment: ImageAugment
    """The crop rule of "train" and "eval"."""
    decoders: FieldDecoders
    """The decoder of every field (built-in by kind or registered by the user)."""
    on_bad_sample: str
    """``raise`` or ``skip``."""
    skip_keys: frozenset[tuple[int, str]]
    """(epoch, key) the saved state records as skipped: skipped again without decoding."""
    stage: StageMetrics
    """Where the decode stage's time and items are counted."""
    seed: int
    """data.seed: with epoch and sample id, what a sample's transform generator depends on."""
    runner: TransformRunner | None = None
    """Applies the sample transform; None: no transform."""
    transform_stage: StageMetrics | None = None
    """Where the transform's time is counted (with a runner)."""
    samples_out: bool = False
    """Build per-sample dicts for a transform or a user collate (Job.outputs)."""
    dali: DaliImageDecoder | None = None
    """DALI decodes the images of the "train"/"eval" pipelines when set."""

    @classmethod
    def for_dataset(
        cls, index: DatasetIndex, config: DataConfig, *, stage: StageMetrics
    ) -> DecodeContext:
        """A loader's context before any pass: which fields hold the image (data.image_field,
        else every image field: the first present is used) and the label (none when absent),
        the crop rule and every field's decoder. A pass adds its skips and transform runner
        with ``dataclasses.replace``."""
        names = [f.name for f in index.fields]
        image_fields = [config.image_field] if config.image_field else [
            f.name for f in index.fields if f.kind == "image"
        ]  # fmt: skip
        for name in image_fields:
            if name not in names:
                raise DataError(f"no field {name!r} in the dataset; fields: {names}")
        augment = ImageAugment(
            size=config.image_size, scale=(config.crop_scale[0], config.crop_scale[1]),
            ratio=(config.crop_ratio[0], config.crop_ratio[1]), flip=config.flip,
            train=config.image_pipeline == "train",
        )  # fmt: skip
        return cls(
            format=index.format, fields=tuple(index.fields), image_fields=tuple(image_fields),
            label_field=config.label_field if config.label_field in names else "",
            image_pipeline=config.image_pipeline, augment=augment,
            decoders=FieldDecoders([(f.name, f.kind) for f in index.fields]),
            on_bad_sample=config.on_bad_sample, skip_keys=frozenset(), stage=stage,
            seed=config.seed,
        )  # fmt: skip

    @property
    def image_columns(self) -> list[int]:
        names = [f.name for f in self.fields]
        return [names.index(name) for name in self.image_fields]

    @property
    def label_column(self) -> int:
        names = [f.name for f in self.fields]
        return names.index(self.label_field) if self.label_field else -1

    @property
    def crops(self) -> bool:
        """Whether images are cropped while decoded into the batch array (train, eval)."""
        return self.image_pipeline in ("train", "eval") and bool(self.image_fields)


@dataclass
class Job:
    """One step's batch on its way: what to decode, where it goes, what came out."""

    step: int
    samples: np.ndarray
    valid: np.ndarray
    shards: np.ndarray
    rows: np.ndarray
    views: dict[int, concurrent.futures.Future[ShardView]]
    images: np.ndarray | None
    draws: np.ndarray
    labels: np.ndarray
    ok: np.ndarray
    extras: list[dict[str, Any]]
    keys: list[str]
    chunks: list[concurrent.futures.Future[None]]
    device_images: tuple[torch.Tensor, list[int]] | None = None
    """DALI on a GPU: the decoded CUDA tensor and the batch slots its rows belong to."""
    skips: list[tuple[int, str, str]] = dataclasses.field(default_factory=list)
    """(epoch, key, reason) of samples skipped here; the loader's state takes them when
    the batch is delivered (a pass started ahead must not record skips it never delivered)."""
    outputs: list[dict[str, Any] | None] | None = None
    """With a sample transform or a user collate: each sample's dict after the transform
    (None where skipped); None on the fast path."""


class BatchDecoder:
    """The decode side of one pass over an epoch (see the module docstring)."""

    def __init__(self, context: DecodeContext, epoch: int, stop: threading.Event) -> None:
        self.context = context
        self.epoch = epoch
        self.stop = stop
        self.image_columns = context.image_columns
        self.label_column = context.label_column

    def decode_range(self, job: Job, lo: int, hi: int) -> None:
        stage = self.context.stage
        started = time.perf_counter()
        waited = 0.0
        nbytes = 0
        places: dict[int, tuple[ShardView, str, int | None]] = {}
        for i in range(lo, hi):
            if self.stop.is_set():
                return
            view, row, key, offset, wait = self._open(job, i)
            waited += wait
            places[i] = (view, key, offset)
            if not job.ok[i]:
                continue
            try:
                self._raise_if_fetched_bad(view, row, key, offset)
                nbytes += self.decode_one(job, i, view, row)
            except BAD_SAMPLE_ERRORS as error:
                self.reject(job, i, view, key, offset, error)
        elapsed = time.perf_counter() - started
        stage.add(items=hi - lo, nbytes=nbytes, busy_s=elapsed - waited)
        stage.add_wait(wait_in_s=waited)
        self.transform(job, list(range(lo, hi)), places)

    def _open(self, job: Job, i: int) -> tuple[ShardView, int, str, int | None, float]:
        """Sample ``i``'s shard (waiting for its fetch), row, key and byte offset, and the
        seconds waited; a sample the state records as skipped is marked not ok."""
        before = time.perf_counter()
        view = job.views[int(job.shards[i])].result()
        waited = time.perf_counter() - before
        row = int(job.rows[i])
        key = view.table.keys[row]
        job.keys[i] = key
        offset = int(view.table.offsets[row]) if len(view.table.offsets) else None
        if (self.epoch, key) in self.context.skip_keys:
            job.ok[i] = False
        return view, row, key, offset, waited

    @staticmethod
    def _raise_if_fetched_bad(view: ShardView, row: int, key: str, offset: int | None) -> None:
        """A sample the fetch found damaged (after its re-reads) enters the policy here."""
        if row in view.bad:
            raise BadSampleError(view.bad[row], shard=view.entry.path, key=key, offset=offset)

    def reject(
        self, job: Job, i: int, view: ShardView, key: str, offset: int | None, error: Exception
    ) -> None:
        """Apply on_bad_sample: raise naming shard, key and offset, or skip and record."""
        if self.context.on_bad_sample == "raise":
            if isinstance(error, BadSampleError):
                raise error
            raise BadSampleError(
                str(error), shard=view.entry.path, key=key, offset=offset,
                hint="set data.on_bad_sample = 'skip' to skip such samples",
            ) from error  # fmt: skip
        job.ok[i] = False
        reason = error.reason if isinstance(error, BadSampleError) else str(error)
        log.warning("skipping sample %r of %s: %s", key, view.entry.path, reason)
        job.skips.append((self.epoch, key, reason))

    # Transform -------------------------------------------------------------------------------

    def sample(self, job: Job, i: int) -> dict[str, Any]:
        """Sample ``i`` as a transform sees it: the names of a batch row without one."""
        sample: dict[str, Any] = {"__key__": job.keys[i]}
        if job.images is not None:
            sample["image"] = job.images[i]
        if self.context.label_field:
            sample["label"] = int(job.labels[i])
        sample.update(job.extras[i])
        return sample

    def transform(
        self, job: Job, rows: list[int], places: dict[int, tuple[ShardView, str, int | None]]
    ) -> None:
        """Rows' sample dicts into ``job.outputs``, through the sample transform if any; a
        transform that raises on a sample follows on_bad_sample, naming the transform."""
        context = self.context
        if job.outputs is None or self.stop.is_set():
            return
        kept = [i for i in rows if job.ok[i]]
        if not kept:
            return
        samples = [self.sample(job, i) for i in kept]
        if context.runner is None:  # a user collate without a transform
            for i, sample in zip(kept, samples, strict=True):
                job.outputs[i] = sample
            return
        started = time.perf_counter()
        seeds = [(context.seed, self.epoch, int(job.samples[i])) for i in kept]
        results = context.runner.run(samples, seeds)  # TransformOutputError: always raised
        if context.transform_stage is not None:
            context.transform_stage.add(items=len(kept), busy_s=time.perf_counter() - started)
        for i, result in zip(kept, results, strict=True):
            if isinstance(result, TransformFailure):
                view, key, offset = places[i]
                error = BadSampleError(
                    result.describe(), shard=view.entry.path, key=key, offset=offset,
                    hint="fix the transform, or set data.on_bad_sample = 'skip' to skip "
                    "the samples it fails on",
                )  # fmt: skip
                log.debug("sample_transform failed on %r:\n%s", key, result.traceback)
                self.reject(job, i, view, key, offset, error)
            else:
                job.outputs[i] = result

    # DALI ------------------------------------------------------------------------------------

    def decode_with_dali(self, job: Job) -> None:
        """Crops, labels and checks here; decode + crop + resize + flip of JPEGs and PNGs in
        DALI (other formats take the CPU path, with the same crop rule)."""
        context = self.context
        assert context.dali is not None
        stage = context.stage
        started = time.perf_counter()
        waited = 0.0
        encoded: list[memoryview] = []
        boxes: list[tuple[int, int, int, int, bool]] = []
        slots: list[int] = []
        places: dict[int, tuple[ShardView, str, int | None]] = {}
        nbytes = 0
        for i in range(len(job.samples)):
            if self.stop.is_set():
                return
            view, row, key, offset, wait = self._open(job, i)
            waited += wait
            places[i] = (view, key, offset)
            if not job.ok[i]:
                continue
            try:
                self._raise_if_fetched_bad(view, row, key, offset)
                data = next((d for c in self.image_columns
                             if (d := view.member(row, c)) is not None), None)  # fmt: skip
                size = dali_image_size(data) if data is not None else None
                if data is None or size is None or job.images is None:
                    nbytes += self.decode_one(job, i, view, row)
                    continue
                height, width = size
                self.fields_into(job, i, view, row)
                encoded.append(data)
                boxes.append(crop_box(height, width, context.augment, job.draws[i].tolist()))
                slots.append(i)
                nbytes += len(data)
            except BAD_SAMPLE_ERRORS as error:
                self.reject(job, i, view, key, offset, error)
        while encoded:
            try:
                images = context.dali.decode(encoded, boxes, into=job.images, rows=slots)
                break
            except DaliDecodeError as error:
                # Find the samples DALI choked on with our own (full) decoder, drop them,
                # and run the batch again.
                bad = [k for k, data in enumerate(encoded) if not _decodes(data)]
                if not bad:
                    raise BadSampleError(f"DALI failed on a batch: {error}") from error
                for k in reversed(bad):
                    view, key, offset = places[slots[k]]
                    self.reject(job, slots[k], view, key, offset, ValueError(str(error)))
                    del encoded[k], boxes[k], slots[k]
        else:
            images = None
        if isinstance(images, torch.Tensor):  # pragma: no cover - DALI on a GPU
            job.device_images = (images, slots)
        stage.add(items=len(job.samples), nbytes=nbytes,
                  busy_s=time.perf_counter() - started - waited)  # fmt: skip
        stage.add_wait(wait_in_s=waited)
        self.transform(job, list(range(len(job.samples))), places)

    # CPU decode ------------------------------------------------------------------------------

    def fields_into(self, job: Job, i: int, view: ShardView, row: int) -> None:
        """The label and the non-image fields of one tar sample."""
        context = self.context
        label_column = self.label_column
        for column, field in enumerate(context.fields):
            if field.kind == "image" or column == label_column:
                continue
            member = view.member(row, column)
            if member is not None:
                job.extras[i][field.name] = context.decoders.decode(field.name, member)
        if label_column >= 0:
            member = view.member(row, label_column)
            if member is None:
                raise KeyError(f"missing field {context.label_field!r}")
            job.labels[i] = codec.decode("int", member)

    def _image(self, job: Job, i: int, name: str, data: bytes | memoryview) -> None:
        """The image field into the batch array (train, eval) or into the sample's fields."""
        context = self.context
        if job.images is not None:
            decode_augment_into(data, context.augment, job.draws[i].tolist(), job.images[i])
        else:
            job.extras[i]["image"] = context.decoders.decode_image(
                name, data, context.image_pipeline
            )

    def decode_one(self, job: Job, i: int, view: ShardView, row: int) -> int:
        context = self.context
        nbytes = 0
        if context.format == "parquet":
            record = view.parquet_row(row)
            for field in context.fields:
                value = decode_column_value(field.kind, record.get(field.name))
                if field.name in context.image_fields:
                    if not isinstance(value, bytes):
                        raise KeyError(f"missing image field {field.name!r}")
                    self._image(job, i, field.name, value)
                elif field.name == context.label_field:
                    if value is None:
                        raise KeyError(f"missing field {field.name!r}")
                    job.labels[i] = int(value)
                else:
                    job.extras[i][field.name] = context.decoders.decode_cell(field.name, value)
            return 0
        if context.image_fields:
            for name, column in zip(context.image_fields, self.image_columns, strict=True):
                data = view.member(row, column)
                if data is not None:
                    self._image(job, i, name, data)
                    nbytes += len(data)
                    break
            else:
                raise KeyError(f"no image field ({list(context.image_fields)}) in this sample")
        self.fields_into(job, i, view, row)
        return nbytes
