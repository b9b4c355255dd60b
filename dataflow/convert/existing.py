"""Index tars that already exist (``webdataset.ShardWriter`` output, tars made with ``tar``)
in place: sample tables beside them and an ``index.json`` at their root, no rewriting.

Each tar is read once (whole, so the per-sample digests come with the scan), parsed strictly
(see formats.tar.iter_members) and grouped into samples. Fields are the union of member
extensions in order of first appearance; a sample lacking one has -1 in the table. Tars are
scanned by a few threads at a time: the work is reading, and reads release the GIL.
"""

from __future__ import annotations

import concurrent.futures
import io
from dataclasses import dataclass

from tqdm import tqdm

from dataflow import storage
from dataflow.errors import DataError
from dataflow.formats import codec
from dataflow.formats.tar import ScannedSample, iter_members, iter_samples, table_from_scan
from dataflow.index import INDEX_FILE, DatasetIndex, Field, ShardEntry, checksum, table_path
from dataflow.storage import StorageConfig


@dataclass
class _Scanned:
    url: str
    relative: str
    size: int
    checksum: str
    samples: list[ScannedSample]
    data: bytes


def _scan(url: str, root: str, config: StorageConfig) -> _Scanned:
    data = storage.read_bytes(url, config=config)
    shard = storage.redact(url)
    samples = list(
        iter_samples(iter_members(io.BytesIO(data), shard=shard, total_size=len(data)), shard=shard)
    )
    return _Scanned(url, url[len(root) :].lstrip("/"), len(data), checksum(data), samples, data)


def index_existing_tars(
    root: str,
    storage_config: StorageConfig | None = None,
    *,
    overwrite: bool = False,
    threads: int = 4,
    progress: bool = True,
    allow_pickle: bool = False,
) -> DatasetIndex:
    """Write sample tables and ``index.json`` for the tars under ``root``."""
    storage_config = storage_config or StorageConfig()
    root = storage.normalize_url(root)
    if storage.exists(storage.join_url(root, INDEX_FILE), config=storage_config) and not overwrite:
        raise DataError(
            f"{storage.redact(root)} already has an index.json",
            hint="pass --overwrite to index it again",
        )
    tars = [u for u in storage.list_files(root, config=storage_config) if u.endswith(".tar")]
    if not tars:
        raise DataError(f"no .tar files under {storage.redact(root)}")
    extensions: dict[str, None] = {}
    scanned: list[_Scanned] = []
    with (
        concurrent.futures.ThreadPoolExecutor(threads) as pool,
        tqdm(total=len(tars), unit="shard", desc="index tars", disable=not progress) as bar,
    ):
        for result in pool.map(lambda url: _scan(url, root, storage_config), tars):
            for sample in result.samples:
                for member in sample.members:
                    extensions.setdefault(member.name[len(sample.key) + 1 :], None)
            scanned.append(result)
            bar.update(1)
    fields = [Field(name=e, kind=codec.kind_for_extension(e)) for e in extensions]
    if any(f.kind == "pickle" for f in fields) and not allow_pickle:
        raise DataError(
            f"{storage.redact(root)} has pickle-encoded members "
            f"({[f.name for f in fields if f.kind == 'pickle']})",
            hint="pickle can run code; pass --allow-pickle only for data you trust",
        )
    entries = []
    for result in scanned:
        table = table_from_scan(result.samples, fields, result.data)
        table_bytes = table.to_bytes()
        storage.write_bytes(
            storage.join_url(root, table_path(result.relative)), table_bytes, config=storage_config
        )
        entries.append(
            ShardEntry(
                path=result.relative,
                bytes=result.size,
                samples=len(result.samples),
                checksum=result.checksum,
                table=table_path(result.relative),
                table_bytes=len(table_bytes),
                table_checksum=checksum(table_bytes),
            )
        )
    index = DatasetIndex(
        format="tar",
        fields=fields,
        shards=entries,
        metadata={"source": storage.redact(root), "source_format": "webdataset (indexed in place)"},
    )
    index.save(root, config=storage_config)
    return index
