"""Run a conversion: plan shards, write them in worker processes, resume, merge, index.

Algorithm
    1. The source lists its records (``Item``: key, estimated bytes, where it lives). With
       ``shuffle`` the list is permuted by a seeded generator. Records are packed greedily
       into shards under ``max_shard_bytes`` and ``max_shard_samples``. The plan is a pure
       function of (input listing, config), so every node and every restart computes the
       same one; its hash, the *plan id*, is stored in ``<output>/_convert/plan.json``
       (dataflow.convert.plan).
    2. Node ``r`` of ``N`` writes shards ``i`` with ``i % N == r``, each in a worker
       process: records are read, validated, encoded and streamed into the shard (local:
       hidden temp file renamed into place; S3: spooled and uploaded), then its sample table
       is written, then a small *shard record* (``_convert/<shard>.json``: entry, skips,
       class counts, plan id). The record is the commit point: a shard without one is
       rewritten on restart, a shard with one is kept.
    3. When all records exist, ``index.json`` is written (atomically, last) and
       ``_convert/`` removed. On several nodes each node stops after its shards and
       ``--merge`` (anywhere) writes the index. A rerun that finds ``index.json`` and the
       plan of the same conversion (a crash between the two steps) only removes ``_convert/``.

What may be written where (not over the input, not over files no conversion wrote, one
process per node slice) is guarded by dataflow.convert.output. Pool workers die with the
process that started them, kill -9 included (see dataflow.processes.die_with_parent).

The output is byte-identical whatever the worker count, node count or interruptions.
Measured cost: see tools/bench_convert.py (images/s against webdataset.ShardWriter).
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import multiprocessing
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from tqdm import tqdm

from dataflow import storage
from dataflow.convert.config import ConvertConfig
from dataflow.convert.output import (
    STAGING,
    ConversionError,
    Lease,
    check_apart,
    files_present,
    plain_names,
    refuse_foreign,
)
from dataflow.convert.plan import Plan, ShardPlan, make_plan
from dataflow.convert.sources import Source, open_source
from dataflow.errors import SourceError
from dataflow.formats import codec
from dataflow.formats.parquet import ParquetShardWriter
from dataflow.formats.tar import TarShardWriter
from dataflow.index import (
    INDEX_FILE,
    DatasetIndex,
    Field,
    SampleTable,
    ShardEntry,
    checksum,
    table_path,
)
from dataflow.processes import die_with_parent
from dataflow.storage import StorageConfig

log = logging.getLogger(__name__)

PLAN_FILE = "plan.json"


@dataclass
class ShardRecord:
    """What a finished shard contributes to the index; written last, as its commit point."""

    plan_id: str
    entry: dict[str, Any]
    skipped: list[dict[str, str]] = field(default_factory=list)
    class_counts: dict[str, int] = field(default_factory=dict)


@dataclass
class ConvertReport:
    output: str
    samples: int
    shards: int
    bytes: int
    skipped: int
    seconds: float
    shards_resumed: int
    index_written: bool

    def summary(self) -> str:
        rate = self.samples / self.seconds if self.seconds > 0 else float("inf")
        written = "index.json written" if self.index_written else "index not written yet"
        return (
            f"{self.samples} samples in {self.shards} shards ({self.bytes / 1e6:.1f} MB) "
            f"at {storage.redact(self.output)}; {self.skipped} skipped; "
            f"{self.shards_resumed} shards kept from an earlier run; "
            f"{self.seconds:.1f} s ({rate:.0f} samples/s); {written}"
        )


# ---------------------------------------------------------------------------------------------
# Planning


def _node_slice(config: ConvertConfig) -> tuple[int, int]:
    num_nodes = config.num_nodes if config.num_nodes > 0 else int(os.environ.get("WORLD_SIZE", 1))
    node_rank = config.node_rank if config.node_rank >= 0 else int(os.environ.get("RANK", 0))
    if not 0 <= node_rank < num_nodes:
        raise ConversionError(f"node rank {node_rank} is outside [0, {num_nodes})")
    return node_rank, num_nodes


# ---------------------------------------------------------------------------------------------
# Writing one shard (runs in a worker process)

_WORKER: dict[str, Any] = {}


def _init_worker(
    source: Source, config: ConvertConfig, counter: Any, environment: dict[str, str] | None
) -> None:
    if environment is not None:
        # A forkserver child inherits the server's environment, frozen when it started;
        # credentials (AWS_*) set since then must come from the parent as it is now.
        os.environ.clear()
        os.environ.update(environment)
    _WORKER.update(source=source, config=config, counter=counter)


def _init_pool_worker(
    source: Source, config: ConvertConfig, counter: Any, environment: dict[str, str], main_pid: int
) -> None:
    die_with_parent(main_pid)
    _init_worker(source, config, counter, environment)


def _count(n: int) -> None:
    counter = _WORKER.get("counter")
    if counter is not None:
        with counter.get_lock():
            counter.value += n


def write_shard(shard: ShardPlan, plan_id: str, fields: list[Field], output: str) -> ShardRecord:
    source: Source = _WORKER["source"]
    config: ConvertConfig = _WORKER["config"]
    storage_config = source.storage_config
    shard_url = storage.join_url(output, shard.path)
    skipped: list[dict[str, str]] = []
    class_counts: dict[str, int] = {}
    kinds = {f.name: f.kind for f in fields}
    batch = 64
    with storage.open_write(shard_url, config=storage_config) as handle:
        writer: TarShardWriter | ParquetShardWriter
        if config.format == "tar":
            writer = TarShardWriter(handle, fields)
        else:
            writer = ParquetShardWriter(
                handle, handle.name, fields, row_group_rows=config.row_group_rows
            )
        try:
            for start in range(0, len(shard.items), batch):
                chunk = shard.items[start : start + batch]
                for item, values in source.load(chunk):
                    if isinstance(values, SourceError):
                        if config.on_bad_input == "raise":
                            raise ConversionError(
                                f"{values} (while writing {shard.path})",
                                hint="fix or remove the input, or run the same command again "
                                "with --on-bad-input skip (finished shards are kept)",
                            )
                        log.warning("skipping %s", values)
                        skipped.append({"source": values.source, "reason": values.reason})
                        continue
                    if isinstance(writer, TarShardWriter):
                        members = {
                            name: codec.encode(kinds[name], value, allow_pickle=config.allow_pickle)
                            for name, value in values.items()
                        }
                        writer.write_sample(item.key, members)
                    else:
                        writer.write_sample(item.key, values)
                    label = source.label_of(item)
                    if label is not None:
                        class_counts[str(label)] = class_counts.get(str(label), 0) + 1
                _count(len(chunk))
        except BaseException:
            if isinstance(writer, ParquetShardWriter):
                writer.abort()  # while its file is open: no complaint from a later __del__
            raise
        table: SampleTable = writer.close()
        handle.flush()
        shard_bytes = handle.tell()
    table_bytes = table.to_bytes()
    storage.write_bytes(
        storage.join_url(output, table_path(shard.path)), table_bytes, config=storage_config
    )
    entry = ShardEntry(
        path=shard.path,
        bytes=shard_bytes,
        samples=len(table),
        checksum=writer.checksum,
        table=table_path(shard.path),
        table_bytes=len(table_bytes),
        table_checksum=checksum(table_bytes),
    )
    record = ShardRecord(plan_id, asdict(entry), skipped, class_counts)
    storage.write_bytes(
        _record_url(output, shard.path), json.dumps(asdict(record)).encode(), config=storage_config
    )
    return record


def _record_url(output: str, shard_path: str) -> str:
    return storage.join_url(output, STAGING, shard_path + ".json")


def _read_record(output: str, shard: ShardPlan, config: StorageConfig) -> ShardRecord | None:
    url = _record_url(output, shard.path)
    try:
        record = ShardRecord(**json.loads(storage.read_bytes(url, config=config)))
    except storage.StorageError as error:
        if isinstance(error.last_error, FileNotFoundError):
            return None
        raise
    except (json.JSONDecodeError, TypeError):
        return None  # a torn record cannot exist (atomic writes), but be safe: rewrite
    return record


# ---------------------------------------------------------------------------------------------
# The job


class _Progress(tqdm):
    """tqdm without its monitor thread, so that workers can be forked (see _run_pool)."""

    monitor_interval = 0


def _finished_earlier(
    output: str, plan: Plan, storage_config: StorageConfig
) -> DatasetIndex | None:
    """The index of this very conversion if a run wrote it and died before removing
    ``_convert/``; that removal is then finished here."""
    plan_url = storage.join_url(output, STAGING, PLAN_FILE)
    if not storage.exists(storage.join_url(output, INDEX_FILE), config=storage_config):
        return None
    if not storage.exists(plan_url, config=storage_config):
        return None
    previous = json.loads(storage.read_bytes(plan_url, config=storage_config))
    if previous.get("plan_id") != plan.plan_id:
        return None
    index = DatasetIndex.load(output, config=storage_config)
    log.info("%s: index.json was written; removing the leftover %s/",
             storage.redact(output), STAGING)  # fmt: skip
    storage.remove_tree(storage.join_url(output, STAGING), config=storage_config)
    return index


def _prepare_output(config: ConvertConfig, plan: Plan, storage_config: StorageConfig) -> None:
    """Check what the plan would replace, remove what ``--overwrite`` replaces, claim the
    planned paths by writing the plan (see dataflow.convert.output, Ownership)."""
    output = storage.normalize_url(config.output)
    index_url = storage.join_url(output, INDEX_FILE)
    plan_url = storage.join_url(output, STAGING, PLAN_FILE)
    # Listed before the plan is read: a shard another node wrote meanwhile was claimed by a
    # plan.json written before it, which the read below then sees.
    present = files_present(output, storage_config)
    old: DatasetIndex | None = None
    if storage.exists(index_url, config=storage_config):
        if not config.overwrite:
            raise ConversionError(
                f"{storage.redact(output)} already holds a dataset (index.json)",
                hint="pass --overwrite to replace it, or choose another --output",
            )
        old = DatasetIndex.load(output, config=storage_config)
    unfinished: list[str] = []  # shards of an unfinished run of other input or settings
    owned: set[str] = set()
    if storage.exists(plan_url, config=storage_config):
        previous = json.loads(storage.read_bytes(plan_url, config=storage_config))
        if previous.get("plan_id") != plan.plan_id:
            if not config.overwrite:
                raise ConversionError(
                    f"{storage.redact(output)} holds an unfinished conversion of different "
                    "input or settings",
                    hint="re-run with the same input and options to resume it, or pass "
                    "--overwrite to start over",
                )
            unfinished = plain_names(previous.get("shards"))
        owned.update(plain_names(previous.get("shards")))
    owned.update([table_path(path) for path in owned])
    if old is not None:
        owned.update(path for shard in old.shards for path in (shard.path, shard.table))
    planned = {s.path for s in plan.shards} | {table_path(s.path) for s in plan.shards}
    refuse_foreign(output, planned, owned, present)
    if old is not None:
        storage.remove(index_url, config=storage_config)  # the old dataset is gone first
        for shard in old.shards:
            storage.remove(storage.join_url(output, shard.path), config=storage_config)
            storage.remove(storage.join_url(output, shard.table), config=storage_config)
    for path in unfinished:
        for leftover in (path, table_path(path)):
            storage.remove(storage.join_url(output, leftover), config=storage_config)
        storage.remove(_record_url(output, path), config=storage_config)
    document = {
        "plan_id": plan.plan_id,
        "format": plan.format,
        "fields": [asdict(f) for f in plan.fields],
        "metadata": plan.metadata,
        "shards": [s.path for s in plan.shards],
        "samples_planned": plan.num_items,
    }
    storage.write_bytes(plan_url, json.dumps(document).encode(), config=storage_config)


def convert(
    config: ConvertConfig,
    storage_config: StorageConfig | None = None,
    *,
    progress: bool = True,
    source: Source | None = None,
) -> ConvertReport:
    """Convert ``config.input`` into shards at ``config.output`` (see the module docstring).

    ``source`` replaces the input named by the config: dataflow.convert.writer passes the
    samples a Python program wrote, so they take the very path the CLI's do.
    """
    storage_config = storage_config or StorageConfig()
    if not config.output:
        raise ConversionError("no output given", hint="pass --output PATH_OR_URL")
    started = time.perf_counter()
    output = storage.normalize_url(config.output)
    if source is None:
        source = open_source(config, storage_config)  # first: a missing input is named as such
        check_apart(source.root, output)
    plan = make_plan(source, config)
    if not plan.shards:
        raise ConversionError(f"{storage.redact(source.root)} holds no records")
    node_rank, num_nodes = _node_slice(config)
    storage.make_bucket(output, config=storage_config)
    with Lease(output, node_rank, storage_config) as lease:
        finished = _finished_earlier(output, plan, storage_config)
        if finished is not None:
            return ConvertReport(
                output=output,
                samples=finished.num_samples,
                shards=len(finished.shards),
                bytes=finished.total_bytes,
                skipped=len(finished.skipped),
                seconds=time.perf_counter() - started,
                shards_resumed=len(finished.shards),
                index_written=True,
            )
        _prepare_output(config, plan, storage_config)
        return _write_slice(
            config, storage_config, source, plan, node_rank, num_nodes, lease, started, progress
        )


def _write_slice(
    config: ConvertConfig,
    storage_config: StorageConfig,
    source: Source,
    plan: Plan,
    node_rank: int,
    num_nodes: int,
    lease: Lease,
    started: float,
    progress: bool,
) -> ConvertReport:
    """Write this node's shards of a prepared output; the index too once all are done."""
    output = storage.normalize_url(config.output)
    mine = [s for s in plan.shards if s.number % num_nodes == node_rank]
    records: dict[str, ShardRecord] = {}
    todo = []
    for shard in mine:
        record = _read_record(output, shard, storage_config)
        # A shard that skipped records is not what the 'raise' policy asked for: rewritten.
        keep = record is not None and record.plan_id == plan.plan_id
        if keep and record is not None and record.skipped and config.on_bad_input == "raise":
            keep = False
        if keep and record is not None:
            shard_url = storage.join_url(output, shard.path)
            if storage.exists(shard_url, config=storage_config):
                records[shard.path] = record
                continue
        todo.append(shard)
        for leftover in (shard.path, table_path(shard.path)):
            storage.discard_partial_writes(storage.join_url(output, leftover))
        storage.discard_partial_writes(_record_url(output, shard.path))
    resumed = len(records)
    workers = config.workers or os.cpu_count() or 1
    workers = max(1, min(workers, len(todo)))
    bar = _Progress(
        total=sum(len(s.items) for s in mine),
        initial=sum(len(s.items) for s in mine if s.path in records),
        unit="sample",
        desc=f"convert → {storage.redact(output)}",
        disable=not progress,
        smoothing=0.1,
    )
    try:
        if workers == 1:
            _init_worker(source, config, None, None)
            for shard in todo:
                records[shard.path] = write_shard(shard, plan.plan_id, plan.fields, output)
                bar.update(len(shard.items))
                lease.renew()
        else:
            _run_pool(source, config, plan, todo, output, workers, records, bar, lease.renew)
    finally:
        bar.close()
    done = all(
        shard.path in records or _read_record(output, shard, storage_config) is not None
        for shard in plan.shards
    )
    index_written = False
    if num_nodes == 1 or done:
        index = merge(output, storage_config)
        index_written = True
        samples, nbytes, skipped = index.num_samples, index.total_bytes, len(index.skipped)
        shard_count = len(index.shards)
    else:
        samples = sum(r.entry["samples"] for r in records.values())
        nbytes = sum(r.entry["bytes"] for r in records.values())
        skipped = sum(len(r.skipped) for r in records.values())
        shard_count = len(records)
    return ConvertReport(
        output=output,
        samples=samples,
        shards=shard_count,
        bytes=nbytes,
        skipped=skipped,
        seconds=time.perf_counter() - started,
        shards_resumed=resumed,
        index_written=index_written,
    )


def pool_context() -> multiprocessing.context.BaseContext:
    """The start method for pool workers."""
    # A plain fork starts a worker in ~5 ms but is only safe while this process runs no
    # other thread (s3fs's event loop thread may hold locks a child would inherit forever).
    # Otherwise a forkserver: a clean process, ~0.25 s to start with the preload.
    if threading.active_count() == 1:
        return multiprocessing.get_context("fork")
    multiprocessing.set_forkserver_preload(["dataflow.convert.job"])
    return multiprocessing.get_context("forkserver")


def _run_pool(
    source: Source,
    config: ConvertConfig,
    plan: Plan,
    todo: Sequence[ShardPlan],
    output: str,
    workers: int,
    records: dict[str, ShardRecord],
    bar: _Progress,
    keep_alive: Callable[[], None],
) -> None:
    context = pool_context()
    counter = context.Value("q", 0)
    base = bar.n
    with concurrent.futures.ProcessPoolExecutor(
        max_workers=workers,
        mp_context=context,
        initializer=_init_pool_worker,
        initargs=(source, config, counter, dict(os.environ), os.getpid()),
    ) as pool:
        futures = {
            pool.submit(write_shard, shard, plan.plan_id, plan.fields, output): shard
            for shard in todo
        }
        pending = set(futures)
        try:
            while pending:
                finished, pending = concurrent.futures.wait(
                    pending, timeout=0.25, return_when=concurrent.futures.FIRST_COMPLETED
                )
                bar.n = base + counter.value
                bar.refresh()
                keep_alive()
                for future in finished:
                    shard = futures[future]
                    records[shard.path] = future.result()
        except BaseException:
            for future in pending:
                future.cancel()
            raise


def merge(output: str, storage_config: StorageConfig | None = None) -> DatasetIndex:
    """Write ``index.json`` from the shard records of a finished (multi-node) conversion."""
    storage_config = storage_config or StorageConfig()
    output = storage.normalize_url(output)
    plan_url = storage.join_url(output, STAGING, PLAN_FILE)
    if not storage.exists(plan_url, config=storage_config):
        raise ConversionError(
            f"{storage.redact(output)} has no conversion to merge ({STAGING}/{PLAN_FILE})"
        )
    plan = json.loads(storage.read_bytes(plan_url, config=storage_config))
    entries, skipped, missing = [], [], []
    class_counts: dict[str, int] = {}
    for path in plan["shards"]:
        record_url = _record_url(output, path)
        if not storage.exists(record_url, config=storage_config):
            missing.append(path)
            continue
        record = ShardRecord(**json.loads(storage.read_bytes(record_url, config=storage_config)))
        if record.plan_id != plan["plan_id"]:
            missing.append(path)
            continue
        entries.append(ShardEntry(**record.entry))
        skipped.extend(record.skipped)
        for label, count in record.class_counts.items():
            class_counts[label] = class_counts.get(label, 0) + count
    if missing:
        raise ConversionError(
            f"{len(missing)} of {len(plan['shards'])} shards are not finished "
            f"(first: {missing[:3]})",
            hint="run the conversion on the nodes that own them (same command, same "
            "--num-nodes), then merge again",
        )
    metadata = dict(plan["metadata"])
    if class_counts:
        classes = metadata.get("classes", [])
        metadata["class_counts"] = {
            (classes[int(label)] if int(label) < len(classes) else label): count
            for label, count in sorted(class_counts.items(), key=lambda kv: int(kv[0]))
        }
    metadata["samples_planned"] = plan["samples_planned"]
    index = DatasetIndex(
        format=plan["format"],
        fields=[Field(**f) for f in plan["fields"]],
        shards=entries,
        metadata=metadata,
        skipped=skipped,
    )
    index.save(output, config=storage_config)
    storage.remove_tree(storage.join_url(output, STAGING), config=storage_config)
    return index
