"""Conversion inputs: image folders, JSONL, Parquet/CSV tables and existing WebDataset tars.

A source does two things. In the main process, ``items()`` lists every record cheaply and in
a deterministic order as ``Item(key, size, ref)`` — ``size`` is the record's estimated bytes
in the output shard, exact for images — so shards can be planned before any data is read.
In a worker, ``load(items)`` reads a run of records (one ranged read where they are
contiguous) and yields, per item, either its field values or a ``SourceError`` naming the
input file (and line or row) and what is wrong with it.

Sources are plain picklable objects: conversion workers receive them once, at start-up.
"""

from __future__ import annotations

import io
import json
import os
import posixpath
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from dataflow import storage
from dataflow.convert.config import ConvertConfig
from dataflow.decode.image import add_row_restarts, can_add_row_restarts
from dataflow.errors import DataError, SourceError
from dataflow.formats import codec
from dataflow.formats.parquet import kind_for_arrow
from dataflow.formats.tar import BLOCK, ScannedSample, iter_members, iter_samples, padded
from dataflow.index import Field
from dataflow.storage import StorageConfig

IMAGE_EXTENSIONS = {
    ".jpg": "jpg",
    ".jpeg": "jpg",
    ".png": "png",
    ".webp": "webp",
    ".bmp": "bmp",
    ".gif": "gif",
    ".tif": "tiff",
    ".tiff": "tiff",
}
_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_\-/]")
_OBJECT_REPR = re.compile(r"\s*<[^<>]* at 0x[0-9a-fA-F]+>")


@dataclass(frozen=True)
class Item:
    key: str
    size: int
    """Estimated bytes of this record in a tar shard (headers and padding included)."""
    ref: tuple[Any, ...]
    """Where the record lives in the source; only the source interprets it."""


def tar_bytes(sizes: Sequence[int]) -> int:
    """Bytes of tar members of these data sizes, headers and padding included."""
    return sum(BLOCK + padded(size) for size in sizes)


def sanitize_key(text: str) -> str:
    """A WebDataset-safe key: no dots, no '..', nothing outside [A-Za-z0-9_-/]."""
    key = _KEY_UNSAFE.sub("_", text).strip("/")
    parts = [part for part in key.split("/") if part and part not in (".", "..")]
    return "/".join(parts) or "_"


def unique_keys(keys: Sequence[str]) -> list[str]:
    """Make keys unique deterministically by suffixing repeats with _2, _3, …"""
    seen: dict[str, int] = {}
    result = []
    for key in keys:
        count = seen.get(key, 0) + 1
        seen[key] = count
        candidate = key if count == 1 else f"{key}_{count}"
        while candidate in seen and count > 1:
            count += 1
            candidate = f"{key}_{count}"
        seen.setdefault(candidate, 1)
        result.append(candidate)
    return result


class Source:
    """Base class: see the module docstring."""

    kind = "source"

    def __init__(self, config: ConvertConfig, storage_config: StorageConfig) -> None:
        self.root = storage.normalize_url(config.input)
        self.config = config
        self.storage_config = storage_config

    def items(self) -> list[Item]:
        raise NotImplementedError

    def fields(self) -> list[Field]:
        raise NotImplementedError

    def metadata(self, items: Sequence[Item]) -> dict[str, Any]:
        return {"source": storage.redact(self.root), "source_format": self.kind}

    def load(self, items: Sequence[Item]) -> Iterator[tuple[Item, dict[str, Any] | SourceError]]:
        raise NotImplementedError

    def label_of(self, item: Item) -> int | None:
        """Class label known at planning time (image folders), for per-class counts."""
        return None


# ---------------------------------------------------------------------------------------------
# Image folders


class ImageFolderSource(Source):
    """``root/<class>/<...>/<image>``: label = index of the class folder in sorted order."""

    kind = "imagefolder"

    def __init__(self, config: ConvertConfig, storage_config: StorageConfig) -> None:
        super().__init__(config, storage_config)
        self._classes: list[str] = []
        self._extensions: list[str] = []

    def items(self) -> list[Item]:
        objects = storage.list_objects(self.root, config=self.storage_config)
        images = []
        for url, size in objects:
            relative = url[len(self.root) :].lstrip("/")
            extension = IMAGE_EXTENSIONS.get(posixpath.splitext(relative)[1].lower())
            if extension is None or "/" not in relative:
                continue
            if any(part.startswith(".") for part in relative.split("/")):
                continue
            images.append((relative, url, size, extension))
        if not images:
            raise SourceError(
                "no images in class sub-folders",
                source=storage.redact(self.root),
                hint="expected <root>/<class name>/<image>.jpg|png|…",
            )
        self._classes = sorted({relative.split("/", 1)[0] for relative, *_ in images})
        label = {name: i for i, name in enumerate(self._classes)}
        self._extensions = sorted({extension for *_, extension in images})
        keys = unique_keys([sanitize_key(posixpath.splitext(r)[0]) for r, *_ in images])
        return [
            Item(
                key=key,
                size=tar_bytes([size, len(str(label[relative.split("/", 1)[0]]))]),
                ref=(url, extension, label[relative.split("/", 1)[0]]),
            )
            for key, (relative, url, size, extension) in zip(keys, images, strict=True)
        ]

    def fields(self) -> list[Field]:
        return [Field(name=e, kind="image") for e in self._extensions] + [
            Field(name="cls", kind="int")
        ]

    def label_of(self, item: Item) -> int | None:
        return int(item.ref[2])

    def metadata(self, items: Sequence[Item]) -> dict[str, Any]:
        restarts = self.config.jpeg_row_restarts and can_add_row_restarts()
        return {**super().metadata(items), "classes": list(self._classes),
                "jpeg_row_restarts": restarts}  # fmt: skip

    def load(self, items: Sequence[Item]) -> Iterator[tuple[Item, dict[str, Any] | SourceError]]:
        for item in items:
            url, extension, label = item.ref
            try:
                data = storage.read_bytes(url, config=self.storage_config)
            except storage.StorageError as error:
                yield item, SourceError(f"unreadable: {error}", source=storage.redact(url))
                continue
            try:
                data = self._prepare(data)
            except ValueError as error:
                yield item, SourceError(image_problem(error), source=storage.redact(url))
                continue
            yield item, {extension: data, "cls": label}

    def _prepare(self, data: bytes) -> bytes:
        """``data`` validated as configured; a JPEG with row restart markers when asked."""
        mode = self.config.validate_images
        if self.config.jpeg_row_restarts and codec.is_jpeg(data) and can_add_row_restarts():
            try:
                restarted = add_row_restarts(data)
            except ValueError:
                if mode == "decode":
                    raise
                return self._validate(data, mode)  # left as it is, checked as far as asked
            # The copy read every entropy-coded byte with libjpeg's warnings as errors: the
            # same proof as the 'decode' check. The plan counted the source's bytes.
            return restarted if padded(len(restarted)) <= padded(len(data)) else data
        return self._validate(data, mode)

    @staticmethod
    def _validate(data: bytes, mode: str) -> bytes:
        """``data`` checked as ``validate_images`` asks; re-sharded tars' images too."""
        if mode == "decode":
            codec.check_image(data)
        elif mode == "header":
            from PIL import Image, UnidentifiedImageError

            try:
                with Image.open(io.BytesIO(data)) as image:
                    # The decode check's limit: a few header bytes can declare gigabytes.
                    codec.check_pixels(image.height, image.width)
            except Image.DecompressionBombError as error:  # over Pillow's limit, so ours
                raise ValueError(
                    f"over the {codec.MAX_IMAGE_PIXELS:,}-pixel limit "
                    f"(dataflow.formats.codec.MAX_IMAGE_PIXELS): {error}"
                ) from None
            except (UnidentifiedImageError, OSError) as error:
                raise ValueError(f"not an image: {error}") from None
        return data


def image_problem(error: ValueError) -> str:
    """What is wrong with an image, in words for a skip record. PIL names the in-memory
    buffer it was handed ("cannot identify image file <_io.BytesIO object at 0x7f…>"),
    which says nothing; the record names the file already."""
    text = str(error)
    if "cannot identify image file" in text:
        return "not an image in a format PIL can read (unknown type or damaged header)"
    return _OBJECT_REPR.sub("", text)


# ---------------------------------------------------------------------------------------------
# JSONL


def _input_files(root: str, suffixes: tuple[str, ...], config: StorageConfig) -> list[str]:
    files = [
        url
        for url, _ in storage.list_objects(root, config=config)
        if url.lower().endswith(suffixes) and not posixpath.basename(url).startswith(".")
    ]
    if not files:
        raise SourceError(f"no {'/'.join(suffixes)} files", source=storage.redact(root))
    return files


def _stem(url: str) -> str:
    return sanitize_key(posixpath.basename(url).split(".", 1)[0])


class _FieldsFromRecords:
    """Fields chosen by config, else those of the first record, kinds from the values."""

    def _choose_fields(self, config: ConvertConfig, first: dict[str, Any], source: str) -> None:
        names = list(config.fields) or [k for k in first if k != config.key_field]
        missing = [name for name in names if name not in first]
        if missing:
            raise SourceError(f"the first record lacks fields {missing}", source=source)
        self._fields = [Field(name=name, kind=codec.kind_for_value(first[name])) for name in names]

    def fields(self) -> list[Field]:
        return list(self._fields)


class JsonlSource(_FieldsFromRecords, Source):
    """One JSON object per line; blank lines are ignored."""

    kind = "jsonl"

    def items(self) -> list[Item]:
        items: list[Item] = []
        keys: list[str] = []
        self._fields: list[Field] = []
        for url in _input_files(self.root, (".jsonl", ".ndjson"), self.storage_config):
            data = storage.read_bytes(url, config=self.storage_config)
            offset = 0
            for line_number, line in enumerate(data.splitlines(keepends=True), start=1):
                start, offset = offset, offset + len(line)
                if not line.strip():
                    continue
                key = f"{_stem(url)}_{line_number:09d}"
                if self.config.key_field or not self._fields:
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError:
                        record = None
                    if not self._fields and isinstance(record, dict):
                        self._choose_fields(self.config, record, f"{url}:{line_number}")
                    if isinstance(record, dict) and self.config.key_field in record:
                        key = sanitize_key(str(record[self.config.key_field]))
                keys.append(key)
                size = len(line) + BLOCK * (1 + len(self._fields))
                items.append(Item(key=key, size=size, ref=(url, start, offset, line_number)))
        if not self._fields:
            raise SourceError("no valid JSON object on any line", source=self.root)
        return [
            Item(key=k, size=i.size, ref=i.ref)
            for k, i in zip(unique_keys(keys), items, strict=True)
        ]

    def load(self, items: Sequence[Item]) -> Iterator[tuple[Item, dict[str, Any] | SourceError]]:
        for url, group in _runs_by_file(items):
            start = min(i.ref[1] for i in group)
            end = max(i.ref[2] for i in group)
            data = storage.read_range(url, start, end, config=self.storage_config)
            for item in group:
                _, line_start, line_end, line_number = item.ref
                where = f"{storage.redact(url)}:{line_number}"
                try:
                    record = json.loads(data[line_start - start : line_end - start])
                except (json.JSONDecodeError, UnicodeDecodeError) as error:
                    yield item, SourceError(f"not valid JSON ({error})", source=where)
                    continue
                yield item, _pick_fields(record, self._fields, where)


def _runs_by_file(items: Sequence[Item]) -> Iterator[tuple[str, list[Item]]]:
    """Group items by source file, keeping their order within each file."""
    groups: dict[str, list[Item]] = {}
    for item in items:
        groups.setdefault(item.ref[0], []).append(item)
    yield from groups.items()


def _pick_fields(record: Any, fields: Sequence[Field], where: str) -> dict[str, Any] | SourceError:
    if not isinstance(record, dict):
        return SourceError(f"expected a JSON object, got {type(record).__name__}", source=where)
    missing = [f.name for f in fields if f.name not in record or record[f.name] is None]
    if missing:
        return SourceError(f"missing field(s) {missing}", source=where)
    values = {}
    for field in fields:
        value = record[field.name]
        try:
            codec.encode(field.kind, value)
        except (TypeError, ValueError) as error:
            return SourceError(f"field {field.name!r}: {error}", source=where)
        values[field.name] = value
    return values


# ---------------------------------------------------------------------------------------------
# Parquet and CSV tables


_TABLES: dict[tuple[str, str], pa.Table] = {}


def _read_table(url: str, kind: str, storage_config: StorageConfig) -> pa.Table:
    """Whole table of one input file, kept for the next run of rows (a few files at most)."""
    import pyarrow.csv
    import pyarrow.parquet as pq

    table = _TABLES.get((url, kind))
    if table is None:
        data = storage.read_bytes(url, config=storage_config)
        if kind == "csv":
            table = pyarrow.csv.read_csv(pa.BufferReader(data))
        else:
            table = pq.read_table(pa.BufferReader(data))
        if len(_TABLES) >= 4:
            _TABLES.pop(next(iter(_TABLES)))
        _TABLES[(url, kind)] = table
    return table


class TableSource(_FieldsFromRecords, Source):
    """Rows of Parquet or CSV files; columns become fields."""

    def __init__(self, config: ConvertConfig, storage_config: StorageConfig, kind: str) -> None:
        super().__init__(config, storage_config)
        self.kind = kind

    def items(self) -> list[Item]:
        suffixes = (".parquet", ".pq") if self.kind == "parquet" else (".csv",)
        items: list[Item] = []
        keys: list[str] = []
        self._fields: list[Field] = []
        for url in _input_files(self.root, suffixes, self.storage_config):
            try:
                table = _read_table(url, self.kind, self.storage_config)
            except (pa.ArrowInvalid, OSError) as error:
                raise SourceError(f"unreadable {self.kind}: {error}", source=url) from None
            if not self._fields:
                names = list(self.config.fields) or [
                    n for n in table.column_names if n != self.config.key_field
                ]
                missing = [n for n in names if n not in table.column_names]
                if missing:
                    raise SourceError(f"no column(s) {missing}", source=url)
                self._fields = [
                    Field(name=n, kind=kind_for_arrow(table.schema.field(n).type)) for n in names
                ]
            row_bytes = max(1, table.nbytes // max(1, table.num_rows))
            if self.config.key_field:
                if self.config.key_field not in table.column_names:
                    raise SourceError(f"no key column {self.config.key_field!r}", source=url)
                file_keys = [
                    sanitize_key(str(v)) for v in table.column(self.config.key_field).to_pylist()
                ]
            else:
                file_keys = [f"{_stem(url)}_{row:09d}" for row in range(table.num_rows)]
            keys.extend(file_keys)
            size = row_bytes + BLOCK * (1 + len(self._fields))
            items.extend(Item(key="", size=size, ref=(url, row)) for row in range(table.num_rows))
        return [
            Item(key=k, size=i.size, ref=i.ref)
            for k, i in zip(unique_keys(keys), items, strict=True)
        ]

    def load(self, items: Sequence[Item]) -> Iterator[tuple[Item, dict[str, Any] | SourceError]]:
        for url, group in _runs_by_file(items):
            table = _read_table(url, self.kind, self.storage_config)
            names = [f.name for f in self._fields]
            rows = table.select(names).take(pa.array([i.ref[1] for i in group])).to_pylist()
            for item, record in zip(group, rows, strict=True):
                where = f"{storage.redact(url)}:row {item.ref[1]}"
                yield item, _pick_fields(record, self._fields, where)


# ---------------------------------------------------------------------------------------------
# Existing WebDataset tars


class WebDatasetSource(Source):
    """Samples of existing tars (e.g. written by ``webdataset.ShardWriter``), re-sharded."""

    kind = "webdataset"

    def items(self) -> list[Item]:
        items: list[Item] = []
        extensions: dict[str, None] = {}
        for url in _input_files(self.root, (".tar",), self.storage_config):
            for sample in scan_tar(url, self.storage_config):
                members = []
                for member in sample.members:
                    extension = member.name[len(sample.key) + 1 :]
                    extensions.setdefault(extension, None)
                    members.append((extension, member.data_offset, member.size))
                items.append(
                    Item(
                        key=sanitize_key(sample.key),
                        size=tar_bytes([m.size for m in sample.members]),
                        ref=(url, tuple(members), sample.start, sample.end, sample.key),
                    )
                )
        self._fields = [Field(name=e, kind=codec.kind_for_extension(e)) for e in extensions]
        if any(f.kind == "pickle" for f in self._fields) and not self.config.allow_pickle:
            raise SourceError(
                "has pickle-encoded members",
                source=self.root,
                hint="pickle can run code; set allow_pickle only for data you trust",
            )
        keys = unique_keys([i.key for i in items])
        return [Item(key=k, size=i.size, ref=i.ref) for k, i in zip(keys, items, strict=True)]

    def fields(self) -> list[Field]:
        return list(self._fields)

    def load(self, items: Sequence[Item]) -> Iterator[tuple[Item, dict[str, Any] | SourceError]]:
        for url, group in _runs_by_file(items):
            spans = [(i.ref[2], i.ref[3]) for i in group]
            blobs = storage.read_ranges(url, spans, config=self.storage_config)
            for item, blob in zip(group, blobs, strict=True):
                yield item, self._sample(url, item, blob)

    def _sample(self, url: str, item: Item, blob: bytes) -> dict[str, Any] | SourceError:
        """One sample's members, kept as their exact bytes (only Parquet output decodes
        them); its images checked as an image folder's are, named by tar and member."""
        _, members, start, _, tar_key = item.ref
        images = {f.name for f in self._fields if f.kind == "image"}
        values: dict[str, Any] = {}
        for extension, data_offset, size in members:
            data = blob[data_offset - start : data_offset - start + size]
            if extension in images:
                try:
                    ImageFolderSource._validate(data, self.config.validate_images)
                except ValueError as error:
                    where = f"{storage.redact(url)}:{tar_key}.{extension}"
                    return SourceError(str(error), source=where)
            values[extension] = codec.Encoded(data)
        return values


def scan_tar(url: str, storage_config: StorageConfig) -> list[ScannedSample]:
    """Members of one tar grouped into samples, validated (see formats.tar.iter_members)."""
    total = storage.size(url, config=storage_config)
    with storage.open_read(url, config=storage_config) as handle:
        return list(
            iter_samples(
                iter_members(handle, shard=storage.redact(url), total_size=total),
                shard=storage.redact(url),
            )
        )


# ---------------------------------------------------------------------------------------------


def detect_format(root: str, storage_config: StorageConfig) -> str:
    """Guess the input format from the file extensions under ``root``."""
    counts: dict[str, int] = {}
    for url, _ in storage.list_objects(root, config=storage_config)[:10_000]:
        extension = posixpath.splitext(url)[1].lower()
        counts[extension] = counts.get(extension, 0) + 1
    by_kind = {
        "webdataset": counts.get(".tar", 0),
        "jsonl": counts.get(".jsonl", 0) + counts.get(".ndjson", 0),
        "parquet": counts.get(".parquet", 0) + counts.get(".pq", 0),
        "csv": counts.get(".csv", 0),
        "imagefolder": sum(counts.get(e, 0) for e in IMAGE_EXTENSIONS),
    }
    best = max(by_kind, key=lambda k: by_kind[k])
    if by_kind[best] == 0:
        raise SourceError(
            "cannot tell the input format from its files",
            source=storage.redact(root),
            hint="pass --input-format imagefolder|jsonl|parquet|csv|webdataset",
        )
    return best


def open_source(config: ConvertConfig, storage_config: StorageConfig) -> Source:
    if not config.input:
        raise DataError("no input given", hint="pass --input PATH_OR_URL")
    root = storage.normalize_url(config.input)
    if storage.is_local(root) and not os.path.exists(root):
        raise SourceError("does not exist", source=root)
    kind: str = config.input_format
    if kind == "auto":
        kind = detect_format(root, storage_config)
    if kind == "imagefolder":
        return ImageFolderSource(config, storage_config)
    if kind == "jsonl":
        return JsonlSource(config, storage_config)
    if kind in ("parquet", "csv"):
        return TableSource(config, storage_config, kind)
    return WebDatasetSource(config, storage_config)


def stable_permutation(count: int, seed: int) -> np.ndarray:
    return np.random.default_rng(np.random.SeedSequence([seed, 0x5F3759DF])).permutation(count)
