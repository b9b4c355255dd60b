"""Stages on their own, without a Loader: read-ahead over a real epoch order and real shard
fetches (dataflow/pipeline/readahead.py), the audit log (audit.py), and the decode stage
driven by a DecodeContext (decoding.py)."""

from __future__ import annotations

import concurrent.futures
import threading
from pathlib import Path

import numpy as np

from dataflow.decode.image import ImageAugment, sample_draws
from dataflow.index import DatasetIndex
from dataflow.metrics import PipelineMetrics
from dataflow.order import EpochOrder, rank_batch
from dataflow.pipeline.audit import AuditLog
from dataflow.pipeline.decoding import BatchDecoder, DecodeContext, Job
from dataflow.pipeline.fields import FieldDecoders
from dataflow.pipeline.readahead import ReadAhead
from dataflow.pipeline.shards import ShardFetcher, ShardView
from dataflow.pipeline.transform import ThreadTransformRunner
from dataflow.storage import StorageConfig

from . import user_transforms

GLOBAL_BATCH = 12


def fetcher(url: str) -> ShardFetcher:
    index = DatasetIndex.load(url)
    stage = PipelineMetrics().stage("fetch", 2)
    return ShardFetcher(url, index, StorageConfig(), cache=None, metrics=stage, skip_bad=False)


def test_read_ahead_keeps_the_batchs_shards_plus_its_margin(photos: str) -> None:
    """9 shards in blocks of 3: each step's shards are in flight before it is decoded, at
    most a block and the margin are held, and every shard is fetched once per epoch."""
    shards = fetcher(photos)
    order = EpochOrder([s.samples for s in shards.index.shards], seed=1, epoch=0, window=3)
    fetched: list[int] = []
    lock = threading.Lock()

    def fetch(number: int) -> ShardView:
        with lock:
            fetched.append(number)
        return shards.fetch(number)

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        ahead = ReadAhead(order, global_batch=GLOBAL_BATCH, readahead=lambda: 1, fetch=fetch,
                          pool=pool)  # fmt: skip
        for step in range(60 // GLOBAL_BATCH):
            ahead.schedule(step)
            plan = rank_batch(order, step, global_batch=GLOBAL_BATCH, rank=0, world_size=1)
            needed, _ = order.shard_of(plan.samples)
            assert set(needed.tolist()) <= set(ahead.views), f"step {step}"
            assert len(ahead.views) <= 3 + 3 + 1  # a block, the next (a batch spans two), margin
            for shard in set(needed.tolist()):
                view = ahead.view(shard).result()
                assert view.number == shard
        ahead.clear()
    assert sorted(fetched) == list(range(9))  # each once


def test_the_audit_log_truncates_past_a_position(tmp_path: Path) -> None:
    log = AuditLog(str(tmp_path / "audit" / "rank-0.tsv"))
    log.write(0, 0, ["a", "b"])
    log.write(0, 1, ["c"])
    log.write(1, 0, ["d"])
    log.truncate(0, 1)
    assert Path(log.path).read_text() == "0\t0\ta\n0\t0\tb\n"
    AuditLog(str(tmp_path / "absent.tsv")).truncate(0, 0)  # nothing to truncate: no file


def test_the_decode_stage_runs_from_its_context(photos: str) -> None:
    """One batch decoded and transformed by BatchDecoder given only a DecodeContext."""
    shards = fetcher(photos)
    index = shards.index
    order = EpochOrder([s.samples for s in index.shards], seed=0, epoch=0, window=3)
    plan = rank_batch(order, 0, global_batch=GLOBAL_BATCH, rank=0, world_size=1)
    shard_numbers, rows = order.shard_of(plan.samples)
    stage = PipelineMetrics().stage("decode", 1)
    context = DecodeContext(
        format=index.format, fields=tuple(index.fields),
        image_fields=tuple(f.name for f in index.fields if f.kind == "image"),
        label_field="cls", image_pipeline="train", augment=ImageAugment(size=16),
        decoders=FieldDecoders([(f.name, f.kind) for f in index.fields]), on_bad_sample="raise",
        skip_keys=frozenset(), stage=stage, seed=0,
        runner=ThreadTransformRunner(user_transforms.identity), samples_out=True,
    )  # fmt: skip
    count = len(plan.samples)
    views: dict[int, concurrent.futures.Future[ShardView]] = {}
    for number in np.unique(shard_numbers).tolist():
        future: concurrent.futures.Future[ShardView] = concurrent.futures.Future()
        future.set_result(shards.fetch(number))
        views[number] = future
    job = Job(
        step=0, samples=plan.samples, valid=plan.valid, shards=shard_numbers, rows=rows,
        views=views, images=np.zeros((count, 16, 16, 3), np.uint8),
        draws=sample_draws(0, 0, plan.samples), labels=np.full(count, -1, np.int64),
        ok=np.ones(count, bool), extras=[{} for _ in range(count)], keys=[""] * count,
        chunks=[], outputs=[None] * count,
    )  # fmt: skip
    BatchDecoder(context, 0, threading.Event()).decode_range(job, 0, count)
    assert job.ok.all() and (job.labels >= 0).all() and job.images.any()
    assert job.outputs is not None
    for i, output in enumerate(job.outputs):
        assert output is not None and output["__key__"] == job.keys[i]
        assert np.shares_memory(output["image"], job.images)  # a view of the batch array
    assert stage.snapshot(elapsed=1.0)["items"] == count
