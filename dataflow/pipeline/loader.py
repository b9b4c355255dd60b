"""``Loader``: the composed pipeline — order → read-ahead → decode → transform → batch → device.

Threads and queues (each bounded by a config knob):

    producer ─ plans step s (dataflow.order), schedules shard fetches ahead
       │           fetch pool (fetch_workers): ShardFetcher.fetch → ShardView, via the cache
       ▼           (dataflow.pipeline.readahead)
    decode pool (decode_workers) ─ decodes the samples of step s into one preallocated
       │                           uint8 batch array, chunk by chunk; with a sample transform
       │                           each chunk then goes through the transform runner
       ▼                           (dataflow.pipeline.decoding, .fields, .transform)
    batch queue (prefetch_batches) ─▶ consumer (__next__): waits, collates, audits
                                      (dataflow.pipeline.collate, .audit)

Each stage is its own module and gets a context object, not the Loader; the Loader builds
them, owns the threads of a pass (``_Run``) and the state.

Shards are needed in the order of the epoch's shard permutation, block by block; the
producer keeps the shards of the blocks that the current global batch touches plus
``readahead_shards`` more in flight, and drops a shard once the global position has passed
its block. Memory is therefore bounded by (shuffle_window + readahead_shards) shards plus
``prefetch_batches`` batches, whatever the dataset size.

Exactness: batches are positions of the global order (pure in seed and epoch), the crop of
a sample and the generator its transform gets are seeded by (seed, epoch, sample id), and the
state is (epoch, steps delivered),
so a resumed loader — at any world size with the same global batch — yields exactly what an
uninterrupted one would have.

Bad samples follow ``on_bad_sample``: raise with shard, key and offset, or skip (the batch
is one shorter; the skip is counted, logged and kept in the state so that a resumed run
skips the same samples). Skips past ``max_skip_fraction`` of an epoch stop it, and a dataset
replaced under the job (index.json is read again at each later epoch and when a shard fails
its checks) is an error, not an epoch of skips.

With ``autotune``, a ``ReadAheadTuner`` watches the consumer's stall and the decoders' wait
for shards after every batch, and raises read-ahead, the fetches in flight (a ``Gate`` in front
of a pool sized for the most it may allow) and the storage connections while storage is what
the consumer waits for (dataflow.pipeline.autotune).

Epoch boundaries: with ``prefetch_next_epoch`` (the trainer sets it), once the producer has
queued an epoch's last batch it starts the next epoch's pass, so shard fetches and decode
for epoch e + 1 run while the trainer finishes epoch e (and evaluates); the next ``iter()``
picks that pass up if it asks for epoch e + 1 from its start, and closes it otherwise.
Memory then briefly holds the shards of both passes. Without it, each epoch's first step
waited for the pipeline to fill: 20–70 % stall spikes at every boundary of the digits demo.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import itertools
import logging
import math
import os
import queue
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any, Final

import numpy as np
import torch

from dataflow.decode.image import sample_draws
from dataflow.errors import DataError, TooManySkipsError
from dataflow.metrics import PipelineMetrics
from dataflow.order import num_batches, rank_batch, samples_due
from dataflow.pipeline.audit import AuditLog
from dataflow.pipeline.autotune import Gate, ReadAheadTuner, Setting, Totals
from dataflow.pipeline.buffers import BufferPool
from dataflow.pipeline.collate import assemble
from dataflow.pipeline.config import DataConfig
from dataflow.pipeline.decoding import BatchDecoder, DecodeContext, Job, make_dali_decoder
from dataflow.pipeline.device import prefetch_to_device
from dataflow.pipeline.readahead import ReadAhead
from dataflow.pipeline.shards import ShardView
from dataflow.pipeline.sources import Sources
from dataflow.pipeline.transform import (
    BatchTransform,
    Collate,
    SampleTransform,
    TransformRunner,
    UserCode,
    make_transform_runner,
)
from dataflow.storage import StorageConfig
from dataflow.storage.cache import ShardCache

log = logging.getLogger(__name__)

Batch = dict[str, Any]


def resolve_rank(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """Explicit values, else torch.distributed's, else $RANK/$WORLD_SIZE, else (0, 1)."""
    if rank is not None and world_size is not None:
        return rank, world_size
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


_END: Final = object()


class Loader:
    """Iterate batches of a converted dataset; see the module docstring.

    Batches are dicts: ``image`` (uint8 tensor, N×H×W×3), ``label`` (int64, N), ``__key__``
    (list of keys), ``__valid__`` (bool, N: False for padding), plus any other fields —
    or what ``collate`` and ``batch_transform`` make of the samples ``sample_transform``
    returns. The three callables may instead be named in ``config`` ("module:function");
    given here, they take precedence. ``close()`` stops the threads and the transform pool.
    """

    STATE_EPOCH: Final = "epoch"
    STATE_STEP: Final = "step"
    STATE_SEED: Final = "seed"
    STATE_GLOBAL_BATCH: Final = "global_batch"
    STATE_DATASET: Final = "dataset"
    STATE_SKIPPED: Final = "skipped"

    def __init__(
        self,
        config: DataConfig,
        storage_config: StorageConfig | None = None,
        *,
        sample_transform: SampleTransform | None = None,
        batch_transform: BatchTransform | None = None,
        collate: Collate | None = None,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        self.config = config
        self.storage_config = storage_config or StorageConfig()
        self.rank, self.world_size = resolve_rank(rank, world_size)
        # The loader's threads run at this niceness (per thread on Linux, inherited by the
        # threads they start — DALI's among them — so it is set absolutely, not added again).
        self._thread_nice = 0
        if sys.platform == "linux" and config.thread_nice:
            self._thread_nice = min(19, os.getpriority(os.PRIO_PROCESS, 0) + config.thread_nice)
        if config.global_batch % self.world_size:
            raise ValueError(
                f"data.global_batch {config.global_batch} does not split over "
                f"{self.world_size} ranks; choose a multiple of the world size"
            )
        self.sources = Sources(config, self.storage_config)  # data.url, or data.mix
        self.root = self.sources.root
        self.index = self.sources.index
        if config.drop_last and self.index.num_samples < config.global_batch:
            # Every epoch would be empty: a loop waiting for a batch would wait forever.
            raise DataError(
                f"data.global_batch = {config.global_batch} is more than the "
                f"{self.index.num_samples} samples of {self.sources.describe()}, so with "
                "data.drop_last every epoch has no batch",
                hint=f"lower data.global_batch to at most {self.index.num_samples}, or set "
                "data.drop_last = false",
            )
        self.metrics_ = PipelineMetrics()
        self._decode_stage = self.metrics_.stage("decode", config.decode_workers)
        # Image and label fields, crop rule, field decoders; a pass adds its skips and runner.
        self.decoding = DecodeContext.for_dataset(self.index, config, stage=self._decode_stage)
        self.user_code = UserCode.resolve(
            config, sample_transform=sample_transform, batch_transform=batch_transform,
            collate=collate,
        )  # fmt: skip
        self._runner: TransformRunner | None = None  # started on first use, closed by close()
        self.dataset_id = self.sources.dataset_id
        self.epoch = 0
        self.step = 0
        self.skipped: list[tuple[int, str, str]] = []
        self._skip_keys: set[tuple[int, str]] = set()
        self._fetch_stage = self.metrics_.stage("fetch", config.fetch_workers)
        self._transform_stage = (
            self.metrics_.stage("transform", config.transform_workers)
            if self.user_code.sample_transform is not None else None
        )  # fmt: skip
        self._queue: queue.Queue[Any] | None = None
        self._batch_stage = self.metrics_.stage(
            "batch", 1, lambda: self._queue.qsize() if self._queue is not None else 0
        )
        cache = ShardCache(config.cache_dir, config.cache_bytes) if config.cache_dir else None
        self.cache = cache
        self._fetcher = self.sources.fetcher(
            self.storage_config, cache=cache, metrics=self._fetch_stage,
            skip_bad=config.on_bad_sample == "skip",
        )  # fmt: skip
        self._audit = (
            AuditLog(os.path.join(config.out_dir, "audit", f"rank-{self.rank}.tsv"))
            if config.audit else None
        )  # fmt: skip
        # What the producer and the fetch pool use; autotune raises them while running.
        self.readahead = config.readahead_shards
        self._fetch_gate = Gate(config.fetch_workers)
        self.autotuner: ReadAheadTuner | None = None
        if config.autotune:
            connections = self.storage_config.connections
            local = self.sources.local  # local reads have no connections to add
            self.autotuner = ReadAheadTuner(
                Setting(config.readahead_shards, config.fetch_workers, connections),
                shard_bytes=sum(s.bytes for s in self.index.shards) / len(self.index.shards),
                shuffle_window=config.shuffle_window, memory_bytes=config.autotune_memory,
                max_fetch_workers=max(16, config.fetch_workers),
                max_connections=connections if local else max(32, connections),
            )  # fmt: skip
        self._active: _Run | None = None
        self._next: _Run | None = None  # the next epoch's pass, started ahead
        self._index_just_loaded = True  # the first pass need not read index.json again
        self._next_lock = threading.Lock()
        self.device: torch.device | None = None
        if config.device:
            self.device = torch.device(config.device)
            if self.device.type == "cuda" and not torch.cuda.is_available():
                raise ValueError(
                    f"data.device = {config.device!r} but CUDA is not available here; "
                    "leave it empty to stay on the CPU"
                )
        self.dali = make_dali_decoder(
            config, batch=self.per_rank_batch, device=self.device,
            images=bool(self.decoding.image_fields), user_code=self.user_code,
        )  # fmt: skip
        # Pinned when batches go to a GPU: the copy then runs asynchronously on a side stream.
        on_gpu = self.device is not None and self.device.type == "cuda"
        self._buffers = BufferPool(pinned=on_gpu)

    # -----------------------------------------------------------------------------------------
    # Public API

    def __len__(self) -> int:
        return num_batches(self.index.num_samples, self.config.global_batch, self.config.drop_last)

    @property
    def transform_runner(self) -> TransformRunner | None:
        """The sample transform's runner: started by the first pass, kept across epochs,
        closed by close() (None before and after)."""
        return self._runner

    @property
    def per_rank_batch(self) -> int:
        return self.config.global_batch // self.world_size

    def set_epoch(self, epoch: int) -> None:
        """Start epoch ``epoch`` at its first batch (a no-op if already there or inside it)."""
        if epoch != self.epoch:
            self.epoch, self.step = epoch, 0

    def state_dict(self) -> dict[str, Any]:
        """The exact position: batches delivered so far in this epoch, and what was skipped.

        Taken after a step, it also completes that step in the audit log, so the log and the
        checkpoint always agree.
        """
        if self._active is not None:
            self._active._flush_audit()
        return {
            self.STATE_EPOCH: self.epoch,
            self.STATE_STEP: self.step,
            self.STATE_SEED: self.config.seed,
            self.STATE_GLOBAL_BATCH: self.config.global_batch,
            self.STATE_DATASET: self.dataset_id,
            self.STATE_SKIPPED: [list(s) for s in self.skipped],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = {self.STATE_EPOCH, self.STATE_STEP, self.STATE_SEED} - set(state)
        if missing:
            raise ValueError(f"loader state lacks {sorted(missing)}; was it saved by Loader?")
        for key, mine in (
            (self.STATE_SEED, self.config.seed),
            (self.STATE_GLOBAL_BATCH, self.config.global_batch),
            (self.STATE_DATASET, self.dataset_id),
        ):
            if key in state and state[key] != mine:
                raise ValueError(
                    f"cannot resume: the saved {key} is {state[key]!r}, this loader's is "
                    f"{mine!r} (an exact resume needs the same dataset, seed and global batch)"
                )
        self._stop_passes()
        self.epoch = int(state[self.STATE_EPOCH])
        self.step = int(state[self.STATE_STEP])
        self.skipped = [(int(e), str(k), str(r)) for e, k, r in state.get(self.STATE_SKIPPED, [])]
        self._skip_keys = {(e, k) for e, k, _ in self.skipped}
        if self._audit is not None:
            self._audit.truncate(self.epoch, self.step)

    def metrics(self) -> dict[str, Any]:
        self.metrics_.refetched = self._fetcher.refetched
        snapshot = self.metrics_.snapshot()
        if self.autotuner is not None:
            snapshot["autotune"] = self.autotuner.report()
        if self.sources.mixing:
            snapshot["mix"] = self.sources.delivered()
        return snapshot

    def __iter__(self) -> Iterator[Batch]:
        if self.step >= len(self):
            self.epoch, self.step = self.epoch + 1, 0
        with self._next_lock:
            ahead, self._next = self._next, None
        self._stop_passes()
        if ahead is not None and (ahead.epoch, ahead.start_step) == (self.epoch, self.step):
            run = ahead
        else:
            if ahead is not None:
                ahead.close()
            run = _Run(self, self.epoch, self.step)
        self._queue = run.queue
        self._active = run
        try:
            if self.device is not None and self.device.type == "cuda":
                yield from prefetch_to_device(iter(run), self.device)
            else:
                yield from run
        finally:
            run.close()
            if self._active is run:
                self._active = None

    def close(self) -> None:
        """Stop background threads and the transform pool (iteration restarts from the saved
        position, with a new pool)."""
        self._stop_passes()
        runner, self._runner = self._runner, None
        if runner is not None:
            runner.close()

    def __del__(self) -> None:
        # Worker processes of a transform pool must not outlive a loader nobody closed.
        runner = getattr(self, "_runner", None)
        if runner is not None:
            runner.close()

    def _stop_passes(self) -> None:
        """Stop the pass in progress and the one started ahead (the runner stays up)."""
        if self._active is not None:
            self._active.close()  # joins its producer: no next pass can start after this
            self._active = None
        with self._next_lock:
            ahead, self._next = self._next, None
        if ahead is not None:
            ahead.close()

    def _start_next_epoch(self, finished: _Run) -> None:
        """Called by a producer that queued its epoch's last batch: start epoch + 1 ahead."""
        with self._next_lock:
            if self._next is None and not finished.stop.is_set():
                self._next = _Run(self, finished.epoch + 1, 0)

    def _fetch(self, shard: int) -> ShardView:
        with self._fetch_gate:
            return self._fetcher.fetch(shard)

    def _autotune(self) -> None:
        """After each delivered batch: let the tuner look, and apply what it decides."""
        if self.autotuner is None:
            return
        metrics, decode = self.metrics_, self._decode_stage
        change = self.autotuner.observe(Totals(
            elapsed_s=time.perf_counter() - metrics.started, batches=metrics.batches,
            stall_s=metrics.stall_s, decode_busy_s=decode.busy_s,
            decode_wait_in_s=decode.wait_in_s,
        ))  # fmt: skip
        if change is None:
            return
        after = change.after
        self.readahead = after.readahead_shards
        self._fetch_gate.set_limit(after.fetch_workers)
        self._fetch_stage.workers = after.fetch_workers
        self._fetcher.config = dataclasses.replace(self._fetcher.config,
                                                   connections=after.connections)  # fmt: skip

    def _lower_priority(self) -> None:
        """Run the calling loader thread at data.thread_nice (a no-op when it is 0)."""
        if self._thread_nice:
            try:
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), self._thread_nice)
            except OSError as error:  # raising niceness is always allowed; be safe anyway
                log.debug("could not lower the priority of a loader thread: %s", error)

    # -----------------------------------------------------------------------------------------
    # Stages

    def _transform_runner(self) -> TransformRunner | None:
        """The sample transform's runner, started on first use and kept until close()."""
        transform = self.user_code.sample_transform
        if transform is not None and self._runner is None:
            self._runner = make_transform_runner(
                transform, pool=self.config.transform_pool,
                workers=self.config.transform_workers,
                shm_bytes=self.config.transform_shm_bytes, setting="data.sample_transform",
                nice=self._thread_nice,
            )  # fmt: skip
        return self._runner

    def _decode_context(self, epoch: int) -> DecodeContext:
        """What the decode and transform stages of a pass over ``epoch`` need."""
        runner = self._transform_runner()
        return dataclasses.replace(
            self.decoding, skip_keys=frozenset(k for k in self._skip_keys if k[0] == epoch),
            runner=runner, transform_stage=self._transform_stage, dali=self.dali,
            samples_out=runner is not None or self.user_code.collate is not None,
        )  # fmt: skip


class _Run:
    """One pass over (the rest of) one epoch: owns the threads and queues."""

    def __init__(self, loader: Loader, epoch: int, start_step: int) -> None:
        self.loader = loader
        config = loader.config
        self.epoch = epoch
        self.order = loader.sources.order(
            epoch, seed=config.seed, window=config.shuffle_window, shuffle=config.shuffle,
            block=config.global_batch,
        )  # fmt: skip
        self.steps = len(loader)
        self.start_step = start_step
        self.check_index, loader._index_just_loaded = not loader._index_just_loaded, False
        self.due = samples_due(self.order.total, config.global_batch, self.steps,
                               rank=loader.rank, world_size=loader.world_size)  # fmt: skip
        self.allowed_skips = math.ceil(config.max_skip_fraction * self.due)
        self.skipped = sum(1 for e, _, _ in loader.skipped if e == epoch)  # resumed: saved ones
        self.stop = threading.Event()
        self.context = loader._decode_context(epoch)
        self.decoder = BatchDecoder(self.context, epoch, self.stop)
        tuner = loader.autotuner
        self.fetch_pool = concurrent.futures.ThreadPoolExecutor(
            tuner.max_fetch_workers if tuner else config.fetch_workers,
            thread_name_prefix="shardflow-fetch",
            initializer=loader._lower_priority,
        )  # fmt: skip
        self.decode_pool = concurrent.futures.ThreadPoolExecutor(
            config.decode_workers, thread_name_prefix="shardflow-decode",
            initializer=loader._lower_priority,
        )  # fmt: skip
        self.queue: queue.Queue[Any] = queue.Queue(maxsize=config.prefetch_batches)
        self.readahead = ReadAhead(
            self.order, global_batch=config.global_batch, readahead=lambda: loader.readahead,
            fetch=loader._fetch, pool=self.fetch_pool,
        )  # fmt: skip
        self.producer = threading.Thread(
            target=self._produce, name="shardflow-producer", daemon=True
        )
        self.producer.start()
        self.pending_audit: tuple[int, list[str]] | None = None

    # Producer side -----------------------------------------------------------------------

    def _produce(self) -> None:
        self.loader._lower_priority()
        loader, config = self.loader, self.loader.config
        try:
            if self.check_index:  # once per epoch: was the dataset replaced since?
                loader._fetcher.check_index_unchanged()
            for step in range(self.start_step, self.steps):
                if self.stop.is_set():
                    return
                plan = rank_batch(
                    self.order, step, global_batch=config.global_batch, rank=loader.rank,
                    world_size=loader.world_size,
                )  # fmt: skip
                self.readahead.schedule(step)
                shards, rows = self.order.shard_of(plan.samples)
                count = len(plan.samples)
                job = Job(
                    step=step, samples=plan.samples, valid=plan.valid, shards=shards, rows=rows,
                    views={int(s): self.readahead.view(int(s)) for s in np.unique(shards)},
                    images=self._image_buffer(count) if self.context.crops else None,
                    draws=sample_draws(config.seed, self.epoch, plan.samples),
                    labels=np.full(count, -1, np.int64), ok=np.ones(count, bool),
                    extras=[{} for _ in range(count)], keys=[""] * count, chunks=[],
                    outputs=[None] * count if self.context.samples_out else None,
                )  # fmt: skip
                if loader.dali is not None:  # DALI threads itself: one task per batch
                    job.chunks = [self.decode_pool.submit(self.decoder.decode_with_dali, job)]
                else:
                    pieces = max(1, min(count, 2 * config.decode_workers))
                    bounds = np.linspace(0, count, pieces + 1).astype(int)
                    job.chunks = [
                        self.decode_pool.submit(self.decoder.decode_range, job, int(lo), int(hi))
                        for lo, hi in itertools.pairwise(bounds)
                        if hi > lo
                    ]
                waited = time.perf_counter()
                self._put(job)
                loader._batch_stage.add_wait(wait_out_s=time.perf_counter() - waited)
            self._put(_END)
            if config.prefetch_next_epoch and not self.stop.is_set():
                loader._start_next_epoch(self)
        except BaseException as error:  # surfaced to the consumer, never lost
            self._put(error)

    def _image_buffer(self, count: int) -> np.ndarray:
        size = self.loader.config.image_size
        if self.context.samples_out:
            # Samples hand out views of single rows (to the transform, or to a user collate
            # as they are). A row's view keeps only the memory's owner alive, not the pooled
            # batch view the pool watches, so the pool would reuse the memory under them:
            # this batch gets memory of its own, freed when its last row view goes.
            return np.empty((count, size, size, 3), np.uint8)
        return self.loader._buffers.array((count, size, size, 3))

    def _put(self, item: object) -> None:
        """Block until the queue takes ``item``, or until the run is stopped."""
        while not self.stop.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    # Consumer side -------------------------------------------------------------------------

    def __iter__(self) -> Iterator[Batch]:
        loader = self.loader
        while True:
            if self.stop.is_set():
                # Closed (Loader.close, load_state_dict): whatever is queued is stale, and
                # nothing more will come. Asking this pass again ends it.
                return
            waited = time.perf_counter()
            item = self.queue.get()
            if item is _END:
                self._flush_audit()
                return
            if isinstance(item, BaseException):
                raise item
            job: Job = item
            for chunk in job.chunks:
                chunk.result()
            stall = time.perf_counter() - waited
            with loader._batch_stage.busy(items=1):
                batch = assemble(job, label_field=self.context.label_field,
                                 user_code=loader.user_code)  # fmt: skip
            # The loader's own record of what it delivered, whatever the user's transforms
            # left in the batch.
            kept = np.flatnonzero(job.ok)
            loader.metrics_.consumed(samples=len(kept), stall_s=stall)
            loader.sources.count_delivered(job.shards[job.ok & job.valid])
            for skip in job.skips:
                loader.skipped.append(skip)
                loader._skip_keys.add(skip[:2])
            loader.metrics_.count(skipped=len(job.skips))
            self.skipped += len(job.skips)
            if self.skipped > self.allowed_skips:
                self._too_many_skips(job)
            loader._autotune()
            self._flush_audit()
            loader.step = job.step + 1
            self.pending_audit = (job.step, [job.keys[i] for i in kept if job.valid[i]])
            yield batch

    def _too_many_skips(self, job: Job) -> None:
        loader = self.loader
        _, key, reason = job.skips[-1]
        views = [f.result() for f in job.views.values() if f.done() and not f.exception()]
        shard = next((view.entry.path for view in views if key in view.table.keys), None)
        raise TooManySkipsError(
            f"rank {loader.rank} skipped {self.skipped} of the {self.due} samples it is due "
            f"in epoch {self.epoch}, more than data.max_skip_fraction = "
            f"{loader.config.max_skip_fraction} allows ({self.allowed_skips}); the last: {reason}",
            shard=shard, key=key,
            hint="check the dataset with tools/verify.py, or raise data.max_skip_fraction",
        )  # fmt: skip

    def _flush_audit(self) -> None:
        """The previous batch's step is complete once the next one is asked for."""
        if self.pending_audit is not None and self.loader._audit is not None:
            self.loader._audit.write(self.epoch, *self.pending_audit)
        self.pending_audit = None

    def close(self) -> None:
        # loader.step already counts the last batch handed out: the log must list it too,
        # or a checkpoint taken after a `break` resumes past keys the audit never saw.
        self._flush_audit()
        self.stop.set()
        while True:
            try:
                self.queue.get_nowait()
            except queue.Empty:
                break
        self.producer.join(timeout=10)
        self.decode_pool.shutdown(wait=True, cancel_futures=True)
        self.fetch_pool.shutdown(wait=True, cancel_futures=True)
        self.readahead.clear()
