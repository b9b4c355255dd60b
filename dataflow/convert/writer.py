"""Write shards from Python: ``ShardWriter`` (one process) and ``convert_samples`` (many).

Samples follow the WebDataset convention: a dict with ``__key__`` and one entry per field,
named by extension (``jpg``, ``txt``, ``cls``, ``json``, ``npy`` …). A field's kind comes from
its extension (dataflow.formats.codec.kind_for_extension) and its value is encoded by that
kind: ``cls`` int → ASCII, ``txt`` str → UTF-8, ``json`` object → JSON, ``npy`` ndarray →
.npy; bytes pass through as the member's stored bytes. A value of the wrong type, a bad or
repeated key, is refused in ``write`` with the key and the field named
(dataflow.convert.samples).

Algorithm
    ``write`` validates and encodes a sample and appends its member bytes to a *spool*
    (``<output>/_convert/spool-*/`` for a local output, a temporary folder for s3://). When
    the ``with`` block ends, the spool becomes a conversion source (``SpooledSamples``: one
    ``Item`` per sample, exact tar size, fields in first-seen order as for WebDataset tars)
    and dataflow.convert.job.convert plans, writes, resumes and indexes it exactly as
    ``tools/convert.py`` does with its own sources. The output is therefore byte-identical
    to the CLI's on the same samples, by construction, and guarded by the same rules
    (dataflow.convert.output: an existing dataset needs ``overwrite``, foreign files at a
    planned path are never replaced).

    ``convert_samples(fn, inputs, output, workers=N)`` runs ``fn`` on each input in N
    processes, each spooling its samples into one part file per input; the items are
    gathered in input order, so plan and bytes do not depend on N. A run killed while
    writing shards resumes on rerun (same inputs, same options): the spool is rebuilt, its
    references are relative to the spool, so the plan id is the same and finished shards
    are kept.

Nothing lost: if the ``with`` block raises, nothing is written to the output (the spool is
removed); the samples were never shards. A crash while the shards are written leaves an
unfinished run that the same program resumes, as the CLI's does. A process killed inside the
block leaves its spool in ``_convert/``, removed when a conversion of that output finishes
(or in the temporary folder, for an s3:// output).

Cost: every sample is written twice, once to the spool and once into its shard: a local
copy at disk speed, the price of the CLI's balanced shards (its plan needs every sample's
size before the first shard is cut) and of parity by construction.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal

from dataflow import storage
from dataflow.config import ByteSize
from dataflow.convert.config import ConvertConfig
from dataflow.convert.job import (
    ConvertReport,
    _Progress,
    convert,
    pool_context,
)
from dataflow.convert.output import STAGING, ConversionError
from dataflow.convert.samples import SampleError, encode_sample
from dataflow.convert.sources import Item, Source, tar_bytes
from dataflow.errors import SourceError
from dataflow.formats import codec
from dataflow.index import INDEX_FILE, Field
from dataflow.processes import die_with_parent
from dataflow.storage import StorageConfig

# ---------------------------------------------------------------------------------------------
# The spool and the source it becomes


@dataclass(frozen=True)
class SpooledSample:
    key: str
    part: str
    """Spool file, relative to the spool folder: the plan id must not depend on where it is."""
    offset: int
    members: tuple[tuple[str, int], ...]


class SpoolPart:
    """One append-only spool file; samples are the concatenation of their member bytes."""

    def __init__(self, directory: str, name: str) -> None:
        self.name = name
        self._handle = open(os.path.join(directory, name), "wb")  # noqa: SIM115 (closed in close)
        self._offset = 0

    def append(self, key: str, members: list[tuple[str, bytes]]) -> SpooledSample:
        offset = self._offset
        for _, data in members:
            self._handle.write(data)
            self._offset += len(data)
        return SpooledSample(key, self.name, offset, tuple((n, len(d)) for n, d in members))

    def close(self) -> None:
        self._handle.close()


class SpooledSamples(Source):
    """The samples of a spool as a conversion source (see the module docstring)."""

    kind = "python"

    def __init__(
        self,
        directory: str,
        samples: Sequence[SpooledSample],
        metadata: dict[str, Any],
        config: ConvertConfig,
        storage_config: StorageConfig,
    ) -> None:
        self.root = directory
        self.config = config
        self.storage_config = storage_config
        self._metadata = metadata
        names: dict[str, None] = {}
        for sample in samples:
            for name, _ in sample.members:
                names.setdefault(name, None)
        self._fields = [Field(name=n, kind=codec.kind_for_extension(n)) for n in names]
        self._items: list[Item] = [
            Item(key=s.key, size=tar_bytes([size for _, size in s.members]),
                 ref=(s.part, s.offset, s.members))
            for s in samples
        ]  # fmt: skip

    def items(self) -> list[Item]:
        # Handed over once, to the plan: workers receive this object and need no listing.
        items, self._items = self._items, []
        return items

    def fields(self) -> list[Field]:
        return list(self._fields)

    def metadata(self, items: Sequence[Item]) -> dict[str, Any]:
        return dict(self._metadata)

    def load(self, items: Sequence[Item]) -> Iterator[tuple[Item, dict[str, Any] | SourceError]]:
        handles: dict[str, Any] = {}
        try:
            for item in items:
                part, offset, members = item.ref
                if part not in handles:
                    handles[part] = open(os.path.join(self.root, part), "rb")  # noqa: SIM115
                handle = handles[part]
                handle.seek(offset)
                yield item, {name: codec.Encoded(handle.read(size)) for name, size in members}
        finally:
            for handle in handles.values():
                handle.close()


def _spool_directory(output: str) -> str:
    """A new spool folder: beside the shards for a local output (same disk, removed with
    ``_convert/`` when the index is written), in the temporary folder for a remote one."""
    if storage.is_local(output):
        directory = os.path.join(
            storage.local_path(output), STAGING, f"spool-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        )
        os.makedirs(directory)
        return directory
    return tempfile.mkdtemp(prefix="shardflow-spool-")


def _remove_spool(directory: str, output: str) -> None:
    shutil.rmtree(directory, ignore_errors=True)
    if storage.is_local(output):  # a refused or failed run leaves no empty _convert/
        with contextlib.suppress(OSError):
            os.rmdir(os.path.join(storage.local_path(output), STAGING))


def _refuse_existing_dataset(output: str, overwrite: bool, storage_config: StorageConfig) -> None:
    """Before any sample is spooled: the one refusal that needs no plan (the others, foreign
    files at planned paths, are made by convert before it writes anything)."""
    if not overwrite and storage.exists(
        storage.join_url(output, INDEX_FILE), config=storage_config
    ):
        raise ConversionError(
            f"{storage.redact(output)} already holds a dataset (index.json)",
            hint="pass overwrite=True to replace it, or choose another output",
        )


@dataclass(kw_only=True)
class _Options:
    output: str
    format: Literal["tar", "parquet"]
    max_shard_bytes: ByteSize
    max_shard_samples: int
    shuffle: bool
    seed: int
    row_group_rows: int
    shard_prefix: str
    validate_images: Literal["decode", "header", "none"]
    allow_pickle: bool
    overwrite: bool
    metadata: dict[str, Any] | None

    def config(self, workers: int) -> ConvertConfig:
        return ConvertConfig(
            output=self.output, format=self.format, max_shard_bytes=self.max_shard_bytes,
            max_shard_samples=self.max_shard_samples, workers=workers, shuffle=self.shuffle,
            seed=self.seed, row_group_rows=self.row_group_rows, shard_prefix=self.shard_prefix,
            validate_images=self.validate_images, allow_pickle=self.allow_pickle,
            overwrite=self.overwrite, num_nodes=1, node_rank=0,
        )  # fmt: skip

    def index_metadata(self) -> dict[str, Any]:
        return {"source": "python", "source_format": "python", **(self.metadata or {})}


def _write_spool(
    options: _Options,
    directory: str,
    samples: list[SpooledSample],
    storage_config: StorageConfig,
    workers: int,
    progress: bool,
) -> ConvertReport:
    if not samples:
        raise ConversionError(
            f"no sample was written for {storage.redact(options.output)}; nothing to index",
            hint="call write(sample) at least once",
        )
    config = options.config(workers)
    source = SpooledSamples(directory, samples, options.index_metadata(), config, storage_config)
    return convert(config, storage_config, progress=progress, source=source)


# ---------------------------------------------------------------------------------------------
# ShardWriter


class ShardWriter:
    """Write samples into shards and ``index.json`` at ``output``, as tools/convert.py does.

    ::

        with ShardWriter("out/", format="tar", max_shard_samples=1000) as writer:
            writer.write({"__key__": "a0", "jpg": jpeg_bytes, "cls": 3})

    Shards and index are written when the block ends (see the module docstring); ``report``
    then holds what was written. ``shuffle=True`` mixes samples across shards with ``seed``
    as the CLI does by default; the default keeps the order of ``write`` calls. ``metadata``
    adds to (or replaces) the index's ``source`` and ``source_format`` entries.
    """

    def __init__(
        self,
        output: str,
        format: Literal["tar", "parquet"] = "tar",
        max_shard_bytes: ByteSize = 256_000_000,
        max_shard_samples: int = 0,
        storage_config: StorageConfig | None = None,
        *,
        shuffle: bool = False,
        seed: int = 0,
        row_group_rows: int = 1024,
        shard_prefix: str = "shard",
        validate_images: Literal["decode", "header", "none"] = "decode",
        allow_pickle: bool = False,
        overwrite: bool = False,
        metadata: dict[str, Any] | None = None,
        workers: int = 1,
        progress: bool = False,
    ) -> None:
        self._options = _Options(
            output=storage.normalize_url(output), format=format, max_shard_bytes=max_shard_bytes,
            max_shard_samples=max_shard_samples, shuffle=shuffle, seed=seed,
            row_group_rows=row_group_rows, shard_prefix=shard_prefix,
            validate_images=validate_images, allow_pickle=allow_pickle, overwrite=overwrite,
            metadata=metadata,
        )  # fmt: skip
        self._options.config(workers)  # its checks name a bad limit before any sample
        self._storage_config = storage_config or StorageConfig()
        self._workers = workers
        self._progress = progress
        self._directory: str | None = None
        self._part: SpoolPart | None = None
        self._samples: list[SpooledSample] = []
        self._keys: set[str] = set()
        self._closed = False
        self.report: ConvertReport | None = None

    @property
    def output(self) -> str:
        return self._options.output

    def __enter__(self) -> ShardWriter:
        self._open()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if error is None:
            self.close()
        else:
            self.abort()

    def _open(self) -> SpoolPart:
        if self._closed:
            raise RuntimeError("this ShardWriter is closed; open a new one for more shards")
        if self._part is None:
            _refuse_existing_dataset(self.output, self._options.overwrite, self._storage_config)
            self._directory = _spool_directory(self.output)
            self._part = SpoolPart(self._directory, "part-000000000.bin")
        return self._part

    def write(self, sample: Mapping[str, Any]) -> None:
        """Spool one sample (see the module docstring for what a sample is)."""
        part = self._open()
        key, members = encode_sample(
            sample,
            validate_images=self._options.validate_images,
            allow_pickle=self._options.allow_pickle,
        )
        if key in self._keys:
            raise SampleError("the key was written before; each sample needs its own key", key=key)
        self._keys.add(key)
        self._samples.append(part.append(key, members))

    def close(self) -> ConvertReport:
        """Write the shards and ``index.json``; called by the end of the ``with`` block."""
        part = self._open()
        self._closed = True
        part.close()
        assert self._directory is not None
        try:
            self.report = _write_spool(
                self._options, self._directory, self._samples, self._storage_config,
                self._workers, self._progress,
            )  # fmt: skip
        finally:
            _remove_spool(self._directory, self.output)
        return self.report

    def abort(self) -> None:
        """Drop every sample written so far; the output is left as it was."""
        self._closed = True
        if self._part is not None:
            self._part.close()
        if self._directory is not None:
            _remove_spool(self._directory, self.output)


# ---------------------------------------------------------------------------------------------
# convert_samples


_SPOOL_WORKER: dict[str, Any] = {}


def _init_spool_worker(
    fn: Callable[[Any], Any], directory: str, options: _Options, main_pid: int | None
) -> None:
    if main_pid is not None:
        die_with_parent(main_pid)
    _SPOOL_WORKER.update(fn=fn, directory=directory, options=options)


def _spool_input(position: int, value: Any) -> list[SpooledSample]:
    """Run ``fn`` on one input and spool its samples into that input's own part file."""
    options: _Options = _SPOOL_WORKER["options"]
    produced = _SPOOL_WORKER["fn"](value)
    if produced is None:
        produced = []
    elif isinstance(produced, Mapping):
        produced = [produced]
    part = SpoolPart(_SPOOL_WORKER["directory"], f"part-{position:09d}.bin")
    try:
        spooled = []
        for sample in produced:
            try:
                key, members = encode_sample(
                    sample,
                    validate_images=options.validate_images,
                    allow_pickle=options.allow_pickle,
                )
            except SampleError as error:
                described = repr(value)
                described = described if len(described) <= 80 else described[:77] + "..."
                raise type(error)(f"{error} (from input {position}: {described})") from None
            spooled.append(part.append(key, members))
    finally:
        part.close()
    return spooled


def convert_samples(
    fn: Callable[[Any], Mapping[str, Any] | Iterable[Mapping[str, Any]] | None],
    inputs: Iterable[Any],
    output: str,
    *,
    workers: int = 0,
    format: Literal["tar", "parquet"] = "tar",
    max_shard_bytes: ByteSize = 256_000_000,
    max_shard_samples: int = 0,
    storage_config: StorageConfig | None = None,
    shuffle: bool = False,
    seed: int = 0,
    row_group_rows: int = 1024,
    shard_prefix: str = "shard",
    validate_images: Literal["decode", "header", "none"] = "decode",
    allow_pickle: bool = False,
    overwrite: bool = False,
    metadata: dict[str, Any] | None = None,
    progress: bool = True,
) -> ConvertReport:
    """Shards at ``output`` from ``fn(input)`` for every input, in ``workers`` processes
    (0: one per core); ``fn`` returns one sample dict or an iterable of them (see the module
    docstring). Same bytes for any ``workers``; a killed run resumes when run again.

    With ``workers`` > 1, ``fn`` and the inputs go to worker processes: where they start by
    forkserver (this process runs threads, e.g. an s3:// client), ``fn`` must be importable
    (a module-level function)."""
    storage_config = storage_config or StorageConfig()
    options = _Options(
        output=storage.normalize_url(output), format=format, max_shard_bytes=max_shard_bytes,
        max_shard_samples=max_shard_samples, shuffle=shuffle, seed=seed,
        row_group_rows=row_group_rows, shard_prefix=shard_prefix,
        validate_images=validate_images, allow_pickle=allow_pickle, overwrite=overwrite,
        metadata=metadata,
    )  # fmt: skip
    options.config(workers)  # bad limits are named before any work
    values = list(inputs)
    workers = max(1, min(workers or os.cpu_count() or 1, len(values) or 1))
    _refuse_existing_dataset(options.output, overwrite, storage_config)
    directory = _spool_directory(options.output)
    try:
        bar = _Progress(
            total=len(values), unit="input", desc="samples from inputs", disable=not progress
        )
        with bar:
            batches = _spool_all(fn, values, directory, options, workers, bar)
        samples: list[SpooledSample] = []
        first_input: dict[str, int] = {}
        for position, batch in enumerate(batches):
            for sample in batch:
                if sample.key in first_input:
                    raise SampleError(
                        f"the key comes from inputs {first_input[sample.key]} and {position}; "
                        "each sample needs its own key",
                        key=sample.key,
                    )
                first_input[sample.key] = position
                samples.append(sample)
        return _write_spool(options, directory, samples, storage_config, workers, progress)
    finally:
        _remove_spool(directory, options.output)


def _spool_all(
    fn: Callable[[Any], Any],
    values: list[Any],
    directory: str,
    options: _Options,
    workers: int,
    bar: _Progress,
) -> list[list[SpooledSample]]:
    """Each input's spooled samples, in input order whatever the worker count."""
    if workers == 1:
        _init_spool_worker(fn, directory, options, None)
        batches = []
        for position, value in enumerate(values):
            batches.append(_spool_input(position, value))
            bar.update(1)
        return batches
    with concurrent.futures.ProcessPoolExecutor(
        max_workers=workers,
        mp_context=pool_context(),
        initializer=_init_spool_worker,
        initargs=(fn, directory, options, os.getpid()),
    ) as pool:
        futures = [pool.submit(_spool_input, p, v) for p, v in enumerate(values)]
        try:
            for future in concurrent.futures.as_completed(futures):
                future.result()  # the first failure stops the run
                bar.update(1)
        except BaseException:
            for future in futures:
                future.cancel()
            raise
        return [future.result() for future in futures]
