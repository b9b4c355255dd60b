"""Where the loader's samples come from: one dataset (``data.url``) or a weighted mix of several
(``data.mix``), behind one index, one epoch order and one fetcher.

Each dataset is opened as a single one always was: index.json loaded, its sample counts
checked before anything allocates by them, an empty dataset refused. A mix adds:

- the sources must agree on the shard format and on their fields by name and kind, but for
  an image field's name (png in one, jpg in another: both arrive as ``image``); a tar
  source's columns are reordered to the first source's, which the decoders index by; the
  first difference is one error naming both URLs;
- the epoch order is a ``dataflow.mix.MixOrder``, whose shard numbers are *reads* (a shard of
  a source that wraps inside a mix epoch is read again as another read); ``MixFetcher`` routes
  a read to its source's own ``ShardFetcher`` (own sample tables, buffer pool and
  dataset-changed check), and names shards by their full URL in errors;
- ``dataset_id`` covers every source's shard checksums and its positions per mix epoch
  (what the weights decide), so a checkpoint resumes only into the same mix;
- delivered samples are counted per source (``Loader.metrics()["mix"]``, by URL).

The combined ``index`` (format, fields, every source's shards, the first source's metadata)
is what the rest of the loader reads for fields and sizes; its sample count is the length of
a mix epoch. One dataset is exactly the loader as before: same order, ids and dataset_id.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import xxhash

from dataflow import storage
from dataflow.errors import DataError
from dataflow.index import INDEX_FILE, DatasetIndex
from dataflow.metrics import StageMetrics
from dataflow.mix import MixLayout, MixOrder
from dataflow.order import EpochOrder, SampleOrder
from dataflow.pipeline.config import DataConfig
from dataflow.pipeline.shards import ShardFetcher, ShardView
from dataflow.storage import StorageConfig
from dataflow.storage.cache import ShardCache

log = logging.getLogger(__name__)


def load_index(root: str, config: StorageConfig) -> DatasetIndex:
    """A dataset's index, checked before a reader allocates by it; empty is an error."""
    index = DatasetIndex.load(root, config=config)
    # Before the epoch order allocates by them (8 bytes per sample of a block of shards).
    index.check_counts(storage.redact(storage.join_url(root, INDEX_FILE)))
    if index.num_samples == 0:
        raise DataError(f"{storage.redact(root)} holds no samples")
    return index


@dataclass(frozen=True)
class Source:
    """One opened dataset."""

    root: str
    """Normalised URL of the dataset root."""
    index: DatasetIndex
    weight: float

    @property
    def name(self) -> str:
        """The root as messages and metrics show it (credentials redacted)."""
        return storage.redact(self.root)


class Sources:
    """The dataset(s) of a ``DataConfig``: index, order, fetcher, id (module docstring)."""

    def __init__(self, config: DataConfig, storage_config: StorageConfig) -> None:
        if not config.url and not config.mix:
            raise DataError(
                "data.url is empty", hint="point it at a dataset's root, or list datasets in "
                "data.mix"
            )  # fmt: skip
        self.mixing = bool(config.mix)
        wanted = [(m.url, m.weight) for m in config.mix] if config.mix else [(config.url, 1.0)]
        self.sources = []
        for url, weight in wanted:
            root = storage.normalize_url(url)
            self.sources.append(Source(root, load_index(root, storage_config), weight))
        self.root = self.sources[0].root
        self.layout: MixLayout | None = None
        self.columns: list[np.ndarray | None] = [None]
        if self.mixing:
            self.columns = self._field_columns()
            try:
                self.layout = MixLayout(
                    [[s.samples for s in source.index.shards] for source in self.sources],
                    [source.weight for source in self.sources],
                    names=[f"data.mix[{n}] ({s.name})" for n, s in enumerate(self.sources)],
                )
            except ValueError as error:
                raise DataError(str(error)) from None
            self.index = self._combined_index()
        else:
            self.index = self.sources[0].index
        self.dataset_id = self._dataset_id()
        self._delivered = np.zeros(len(self.sources), dtype=np.int64)
        self._delivered_lock = threading.Lock()

    @property
    def local(self) -> bool:
        """Every dataset is on a local or parallel file system (no connections to tune)."""
        return all(storage.is_local(source.root) for source in self.sources)

    def describe(self) -> str:
        """The dataset(s) for messages: a URL, or 'the mix of A, B'."""
        if not self.mixing:
            return self.sources[0].name
        return "the mix of " + ", ".join(source.name for source in self.sources)

    def order(
        self, epoch: int, *, seed: int, window: int, shuffle: bool, block: int
    ) -> SampleOrder:
        """The order of epoch ``epoch``: an ``EpochOrder``, or a ``MixOrder`` whose blocks of
        positions are ``block`` long (the loader passes the global batch)."""
        if self.layout is None:
            sizes = [s.samples for s in self.index.shards]
            return EpochOrder(sizes, seed=seed, epoch=epoch, window=window, shuffle=shuffle)
        return MixOrder(self.layout, seed=seed, epoch=epoch, window=window, block=block,
                        shuffle=shuffle)  # fmt: skip

    def fetcher(
        self,
        storage_config: StorageConfig,
        *,
        cache: ShardCache | None,
        metrics: StageMetrics,
        skip_bad: bool,
    ) -> ShardFetcher | MixFetcher:
        fetchers = [
            ShardFetcher(
                source.root,
                source.index,
                storage_config,
                cache=cache,
                metrics=metrics,
                skip_bad=skip_bad,
            )
            for source in self.sources
        ]
        if self.layout is None:
            return fetchers[0]
        return MixFetcher(self.layout, self.sources, fetchers, self.columns)

    def count_delivered(self, reads: np.ndarray) -> None:
        """Count delivered samples by the reads (shard numbers of the order) they came from."""
        if self.layout is None or not len(reads):
            return
        sources, _ = self.layout.locate_reads(reads)
        counts = np.bincount(sources, minlength=len(self.sources))
        with self._delivered_lock:
            self._delivered += counts

    def delivered(self) -> dict[str, int]:
        """Samples delivered per source URL since the loader started (a mix only)."""
        with self._delivered_lock:
            counts = self._delivered.tolist()
        return {source.name: int(count) for source, count in zip(self.sources, counts, strict=True)}

    # -----------------------------------------------------------------------------------------

    def _field_columns(self) -> list[np.ndarray | None]:
        """Per source, the column holding each field of the mix (the first source's fields,
        in its column order), or None where the columns already line up.

        Fields match by name and must have the same kind; an image field may have another
        name (png in one, jpg in the other: both arrive as ``image``). Tar samples are found
        by column, so a source's columns are reordered to the mix's; Parquet rows are read
        by column name, so there the names must agree. Anything else is one error naming
        both URLs."""
        first = self.sources[0]
        fields = first.index.fields
        names = {f.name for f in fields}
        columns: list[np.ndarray | None] = [None]
        for other in self.sources[1:]:
            where = f"data.mix: {other.name} and {first.name}"
            if other.index.format != first.index.format:
                raise DataError(
                    f"{where} hold {other.index.format} and {first.index.format} shards; a "
                    "mix needs one format",
                    hint="convert them with the same --format",
                )
            theirs = {f.name: (column, f.kind) for column, f in enumerate(other.index.fields)}
            unmatched_images = [f.name for f in other.index.fields
                                if f.kind == "image" and f.name not in names]  # fmt: skip
            mapping = []
            for field in fields:
                if field.name in theirs:
                    column, kind = theirs[field.name]
                    if kind != field.kind:
                        raise DataError(f"data.mix: field {field.name!r} is {kind} in "
                                        f"{other.name}, {field.kind} in {first.name}")  # fmt: skip
                elif field.kind == "image" and len(unmatched_images) == 1:
                    name = unmatched_images.pop()
                    column = theirs[name][0]
                    if other.index.format == "parquet":
                        raise DataError(
                            f"{where} name their image column {name!r} and {field.name!r}; "
                            "Parquet rows are read by column name, so a mix needs one name",
                            hint="convert them with the same image column name",
                        )
                else:
                    raise DataError(f"data.mix: {other.name} lacks field {field.name!r} "
                                    f"({field.kind}) that {first.name} has",
                                    hint="mix datasets converted with the same fields")  # fmt: skip
                mapping.append(column)
            extra = sorted(set(theirs) - {other.index.fields[c].name for c in mapping})
            if extra:
                raise DataError(
                    f"data.mix: {other.name} has fields {extra} that {first.name} lacks",
                    hint="mix datasets converted with the same fields",
                )
            identity = mapping == list(range(len(mapping)))
            columns.append(None if identity else np.asarray(mapping, dtype=np.int64))
        return columns

    def _combined_index(self) -> DatasetIndex:
        """Every source's shards (paths as full URLs) under the first source's fields."""
        first = self.sources[0]
        shards = [
            dataclasses.replace(entry, path=storage.join_url(source.name, entry.path))
            for source in self.sources
            for entry in source.index.shards
        ]
        metadata = dict(first.index.metadata)
        classes = [source.index.metadata.get("classes") or [] for source in self.sources]
        if any(c != classes[0] for c in classes):
            # Labels are used as stored. Of the class lists, the longest is kept: what sizes
            # a classifier (the trainer reads its length) then covers every source's labels.
            longest = max(range(len(classes)), key=lambda number: len(classes[number]))
            metadata["classes"] = classes[longest]
            log.warning("data.mix: the datasets' class lists differ; labels are used as "
                        "stored, named by %s's classes", self.sources[longest].name)  # fmt: skip
        return dataclasses.replace(first.index, shards=shards, metadata=metadata, skipped=[])

    def _dataset_id(self) -> str:
        if len(self.sources) == 1:  # as before mixing existed (a mix of one is that order)
            checksums = "".join(s.checksum for s in self.index.shards)
            return xxhash.xxh64(checksums.encode()).hexdigest()
        assert self.layout is not None
        digest = xxhash.xxh64()
        for source, count in zip(self.sources, self.layout.counts.tolist(), strict=True):
            digest.update("".join(s.checksum for s in source.index.shards).encode())
            digest.update(f"|{count}|".encode())
        return "mix-" + digest.hexdigest()


class MixFetcher:
    """``ShardFetcher``'s interface over a mix: a read number → its source's fetcher.

    A shard read again while an earlier read of it is still held (read-ahead, or a batch
    being decoded) shares that read's bytes instead of fetching them again: a small source
    that wraps many times per epoch, whose consecutive reads overlap, is then fetched about
    once per stretch of overlap. Only views something still holds are found (weak
    references), so this costs no memory."""

    def __init__(
        self,
        layout: MixLayout,
        sources: Sequence[Source],
        fetchers: Sequence[ShardFetcher],
        columns: Sequence[np.ndarray | None],
    ) -> None:
        self.layout = layout
        self.sources = list(sources)
        self.fetchers = list(fetchers)
        self.columns = list(columns)
        """Per source: its tar columns in the mix's field order (None: already so)."""
        self._held: weakref.WeakValueDictionary[tuple[int, int], ShardView] = (
            weakref.WeakValueDictionary()
        )
        self._held_lock = threading.Lock()

    @property
    def config(self) -> StorageConfig:
        return self.fetchers[0].config

    @config.setter
    def config(self, value: StorageConfig) -> None:  # autotune raises connections for all
        for fetcher in self.fetchers:
            fetcher.config = value

    @property
    def refetched(self) -> int:
        return sum(fetcher.refetched for fetcher in self.fetchers)

    def fetch(self, read: int) -> ShardView:
        sources, shards = self.layout.locate_reads(np.asarray([read]))
        source, shard = int(sources[0]), int(shards[0])
        with self._held_lock:
            held = self._held.get((source, shard))
            if held is not None:
                again = dataclasses.replace(held, number=read)
                self._held[(source, shard)] = again
                return again
        view = self.fetchers[source].fetch(shard)
        # Errors and skip records name the shard with its dataset: two sources may both
        # hold a shard-000000.tar.
        url = storage.join_url(self.sources[source].name, view.entry.path)
        table, columns = view.table, self.columns[source]
        if columns is not None and table.field_offsets.size:
            table = dataclasses.replace(table, field_offsets=table.field_offsets[:, columns],
                                        field_sizes=table.field_sizes[:, columns])  # fmt: skip
        entry = dataclasses.replace(view.entry, path=url)
        view = dataclasses.replace(view, number=read, entry=entry, table=table)
        with self._held_lock:
            self._held[(source, shard)] = view
        return view

    def check_index_unchanged(self) -> None:
        for fetcher in self.fetchers:
            fetcher.check_index_unchanged()
