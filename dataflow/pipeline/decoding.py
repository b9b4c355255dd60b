"""Decoding one batch: samples out of fetched shards into the batch's preallocated arrays.

The CPU path (``decode_range``) runs in chunks on the decode thread pool; the DALI path
(``decode_with_dali``) runs once per batch and hands the JPEGs to DALI with our crop
windows. Both share the bad-sample policy (``reject``): raise naming shard, key and byte
offset, or skip — the sample is dropped from its batch, counted, logged and recorded in the
loader's state so that a resumed run skips it too.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from dataflow.decode.dali import DaliDecodeError
from dataflow.decode.image import crop_box, dali_image_size, decode_augment_into
from dataflow.errors import BadSampleError
from dataflow.formats import codec
from dataflow.formats.codec import check_image
from dataflow.formats.parquet import decode_column_value
from dataflow.pipeline.shards import ShardView

if TYPE_CHECKING:
    from dataflow.pipeline.loader import Loader

log = logging.getLogger(__name__)

# What a bad sample raises while it is decoded; the on_bad_sample policy handles these.
BAD_SAMPLE_ERRORS = (BadSampleError, ValueError, KeyError, UnicodeDecodeError)


def _decodes(data: bytes | memoryview) -> bool:
    try:
        check_image(data)
        return True
    except ValueError:
        return False


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


class BatchDecoder:
    """The decode side of one pass over an epoch (see the module docstring)."""

    def __init__(self, loader: Loader, epoch: int, stop: threading.Event) -> None:
        self.loader = loader
        self.epoch = epoch
        self.stop = stop
        names = [f.name for f in loader.index.fields]
        self.image_columns = [names.index(name) for name in loader.image_fields]
        self.label_column = names.index(loader.label_field) if loader.label_field else -1

    def decode_range(self, job: Job, lo: int, hi: int) -> None:
        loader = self.loader
        stage = loader._decode_stage
        started = time.perf_counter()
        waited = 0.0
        image_columns, label_column = self.image_columns, self.label_column
        nbytes = 0
        for i in range(lo, hi):
            if self.stop.is_set():
                return
            view, row, key, offset, wait = self._open(job, i)
            waited += wait
            if not job.ok[i]:
                continue
            try:
                self._raise_if_fetched_bad(view, row, key, offset)
                nbytes += self.decode_one(job, i, view, row, image_columns, label_column)
            except BAD_SAMPLE_ERRORS as error:
                self.reject(job, i, view, key, offset, error)
        elapsed = time.perf_counter() - started
        stage.add(items=hi - lo, nbytes=nbytes, busy_s=elapsed - waited)
        stage.add_wait(wait_in_s=waited)

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
        if (self.epoch, key) in self.loader._skip_keys:
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
        loader = self.loader
        if loader.config.on_bad_sample == "raise":
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

    def decode_with_dali(self, job: Job) -> None:
        """Crops, labels and checks here; decode + crop + resize + flip of JPEGs and PNGs in
        DALI (other formats take the CPU path, with the same crop rule)."""
        loader = self.loader
        assert loader.dali is not None
        stage = loader._decode_stage
        started = time.perf_counter()
        waited = 0.0
        image_columns, label_column = self.image_columns, self.label_column
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
                data = next((d for c in image_columns if (d := view.member(row, c)) is not None),
                            None)  # fmt: skip
                size = dali_image_size(data) if data is not None else None
                if data is None or size is None or job.images is None:
                    nbytes += self.decode_one(job, i, view, row, image_columns, label_column)
                    continue
                height, width = size
                self.fields_into(job, i, view, row, label_column)
                encoded.append(data)
                boxes.append(crop_box(height, width, loader.augment, job.draws[i].tolist()))
                slots.append(i)
                nbytes += len(data)
            except BAD_SAMPLE_ERRORS as error:
                self.reject(job, i, view, key, offset, error)
        while encoded:
            try:
                images = loader.dali.decode(encoded, boxes, into=job.images, rows=slots)
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

    def fields_into(self, job: Job, i: int, view: ShardView, row: int, label_column: int) -> None:
        """The label and the non-image fields of one tar sample."""
        loader = self.loader
        for column, field in enumerate(loader.index.fields):
            if field.kind == "image" or column == label_column:
                continue
            member = view.member(row, column)
            if member is not None:
                job.extras[i][field.name] = codec.decode(field.kind, member)
        if label_column >= 0:
            member = view.member(row, label_column)
            if member is None:
                raise KeyError(f"missing field {loader.label_field!r}")
            job.labels[i] = codec.decode("int", member)

    def decode_one(
        self,
        job: Job,
        i: int,
        view: ShardView,
        row: int,
        image_columns: list[int],
        label_column: int,
    ) -> int:
        loader = self.loader
        nbytes = 0
        if loader.index.format == "parquet":
            record = view.parquet_row(row)
            for field in loader.index.fields:
                value = decode_column_value(field.kind, record.get(field.name))
                if field.name in loader.image_fields and job.images is not None:
                    if not isinstance(value, bytes):
                        raise KeyError(f"missing image field {field.name!r}")
                    decode_augment_into(value, loader.augment, job.draws[i].tolist(), job.images[i])
                elif field.name == loader.label_field:
                    if value is None:
                        raise KeyError(f"missing field {field.name!r}")
                    job.labels[i] = int(value)
                else:
                    job.extras[i][field.name] = value
            return 0
        if job.images is not None:
            data = None
            for column in image_columns:
                data = view.member(row, column)
                if data is not None:
                    break
            if data is None:
                raise KeyError(f"no image field ({loader.image_fields}) in this sample")
            decode_augment_into(data, loader.augment, job.draws[i].tolist(), job.images[i])
            nbytes += len(data)
        self.fields_into(job, i, view, row, label_column)
        return nbytes
