"""A seeded fuzzer of shards: hostile and broken tars and Parquet files, and what our code
does with them.

Each case takes a small valid dataset, damages one shard in one of ``TAR_MUTATIONS`` or
``PARQUET_MUTATIONS`` ways (case number → mutation and bytes, all from one seed), and runs
what a user runs on shards from elsewhere:

- tars: index them in place (``index_existing_tars``, the attacker also writes the index —
  and in ``INDEX_FORGERIES`` lies in it over intact tars: sizes, counts, sample tables),
  train on them one epoch with ``on_bad_sample = "skip"`` (decode, crop, labels), and
  ``verify`` them against that index, decoding every field;
- Parquet: the loader (skip) and ``verify`` against the index written before the damage;
- tars again: re-shard them (``convert`` with ``on_bad_input = "skip"``): every sample is
  written or counted as skipped, and no written image fails the decode check (a truncated
  or oversized JPEG once passed silently, issue 17.11).

A case must end in success — every indexed sample delivered or skipped and counted — or in
a typed ``DataError`` that names the shard and an offset or key. Anything else (another
exception, a timeout, the interpreter dying, a file written outside the case's folder) is a
finding. ``run_cases`` returns the outcomes; ``tools/fuzz_shards.py`` runs and reports them.
"""

from __future__ import annotations

import io
import json
import os
import random
import signal
import struct
import tarfile
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dataflow.errors import DataError, DatasetIndexError
from dataflow.formats.tar import BLOCK, iter_members, member_header, padded

CASE_TIMEOUT_S = 20
SAMPLES = 8


# -- the valid material ----------------------------------------------------------------------
def _jpeg(rng: np.random.Generator, height: int, width: int) -> bytes:
    """A JPEG as conversion stores it: with a restart marker per row of blocks, so the
    loader's crops below the second row take the decoder's cut of the stream."""
    from PIL import Image

    from dataflow.decode.image import add_row_restarts, can_add_row_restarts

    base = rng.integers(0, 255, (height // 8 + 1, width // 8 + 1, 3), dtype=np.uint8)
    pixels = np.kron(base, np.ones((8, 8, 1), np.uint8))[:height, :width]
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG", quality=85)
    return add_row_restarts(out.getvalue()) if can_add_row_restarts() else out.getvalue()


def sample_members(seed: int, shard: int) -> list[tuple[str, bytes]]:
    """(member name, bytes) of one shard: a JPEG, a class and a JSON record per sample."""
    rng = np.random.default_rng([seed, shard])
    members = []
    for number in range(SAMPLES):
        key = f"s{shard:02d}-{number:03d}"
        members.append((f"{key}.jpg", _jpeg(rng, int(rng.integers(40, 160)),
                                              int(rng.integers(40, 90)))))  # fmt: skip
        members.append((f"{key}.cls", str(int(rng.integers(0, 10))).encode()))
        members.append((f"{key}.json", json.dumps({"n": number}).encode()))
    return members


def pack(members: list[tuple[str, bytes]], *, headers: list[bytes] | None = None) -> bytes:
    """A tar of ``members`` (optionally with given header blocks), ended properly."""
    out = bytearray()
    for number, (name, data) in enumerate(members):
        out += headers[number] if headers is not None else member_header(name, len(data))
        out += data + b"\0" * (padded(len(data)) - len(data))
    return bytes(out + b"\0" * (2 * BLOCK))


# -- tar mutations ---------------------------------------------------------------------------
def _fix_checksum(header: bytearray) -> None:
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\0 " % sum(header)


def _header_spans(data: bytes) -> list[tuple[int, int, int]]:
    """(header offset, data offset, size) of each member of a valid tar."""
    members = iter_members(io.BytesIO(data), shard="base", total_size=len(data))
    return [(m.header_offset, m.data_offset, m.size) for m in members]


def _edit_header(data: bytes, rng: random.Random, edit: Callable[[bytearray], None],
                 fix: bool = True) -> bytes:  # fmt: skip
    spans = _header_spans(data)
    start = rng.choice(spans)[0]
    header = bytearray(data[start : start + BLOCK])
    edit(header)
    if fix:
        _fix_checksum(header)
    return data[:start] + bytes(header) + data[start + BLOCK :]


def _replace_member(members: list[tuple[str, bytes]], rng: random.Random, suffix: str,
                    payload: bytes) -> list[tuple[str, bytes]]:  # fmt: skip
    chosen = rng.choice([i for i, (name, _) in enumerate(members) if name.endswith(suffix)])
    edited = list(members)
    edited[chosen] = (members[chosen][0], payload)
    return edited


def _png_bomb(width: int, height: int) -> bytes:
    """A small PNG that declares width × height RGB pixels, all zero when inflated."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (struct.pack(">I", len(body)) + kind + body
                + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF))  # fmt: skip

    row = b"\0" * (1 + 3 * min(width, 4096))
    compressor = zlib.compressobj(9)
    body = b"".join(compressor.compress(row) for _ in range(min(height, 2048)))
    body += compressor.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", body)
            + chunk(b"IEND", b""))  # fmt: skip


def _jpeg_with_size(jpeg: bytes, height: int, width: int) -> bytes:
    """The JPEG with its SOF0 frame header declaring height × width."""
    at = jpeg.find(b"\xff\xc0")
    if at < 0:
        return jpeg
    edited = bytearray(jpeg)
    edited[at + 5 : at + 9] = struct.pack(">HH", height, width)
    return bytes(edited)


def _flip(data: bytes, rng: random.Random, lo: int, hi: int, count: int) -> bytes:
    edited = bytearray(data)
    for _ in range(count):
        edited[rng.randrange(lo, max(lo + 1, hi))] ^= 1 << rng.randrange(8)
    return bytes(edited)


def _tar_mutations() -> dict[str, Callable[[bytes, list[tuple[str, bytes]], random.Random], bytes]]:
    def truncate(data: bytes, _: Any, rng: random.Random) -> bytes:
        return data[: rng.randrange(0, len(data))]

    def flip_header(data: bytes, _: Any, rng: random.Random) -> bytes:
        start = rng.choice(_header_spans(data))[0]
        return _flip(data, rng, start, start + BLOCK, rng.randint(1, 4))

    def flip_header_field(data: bytes, _: Any, rng: random.Random) -> bytes:
        # Damage that keeps the checksum right, so parsing goes past it.
        lo, hi = rng.choice([(0, 100), (100, 124), (124, 136), (156, 157), (257, 265),
                             (345, 500)])  # fmt: skip
        return _edit_header(data, rng, lambda h: h.__setitem__(
            slice(lo, hi), bytes(rng.randrange(256) for _ in range(hi - lo))))  # fmt: skip

    def flip_payload(data: bytes, _: Any, rng: random.Random) -> bytes:
        _, start, size = rng.choice(_header_spans(data))
        return _flip(data, rng, start, start + size, rng.randint(1, 16))

    def huge_size(data: bytes, _: Any, rng: random.Random) -> bytes:
        size = rng.choice([b"77777777777\0", b"%011o\0" % (len(data) * 4)])
        return _edit_header(data, rng, lambda h: h.__setitem__(slice(124, 136), size))

    def base256_size(data: bytes, _: Any, rng: random.Random) -> bytes:
        value = rng.choice([-1, -(2**40), 2**62, 2**80 % 2**88])
        raw = (value % 2**88).to_bytes(11, "big")
        return _edit_header(data, rng, lambda h: h.__setitem__(slice(124, 136),
                                                                b"\x80" + raw))  # fmt: skip

    def duplicate_key(_: bytes, members: list[tuple[str, bytes]], rng: random.Random) -> bytes:
        chosen = rng.randrange(len(members))
        return pack([*members[: chosen + 1], members[chosen], *members[chosen + 1 :]])

    def escaping_name(_: bytes, members: list[tuple[str, bytes]], rng: random.Random) -> bytes:
        chosen = rng.randrange(len(members))
        name = members[chosen][0]
        renamed = rng.choice([f"../{name}", f"/tmp/{name}", f"a/../../{name}", f"./../{name}"])
        edited = list(members)
        edited[chosen] = (renamed, members[chosen][1])
        return pack(edited)

    def link_member(data: bytes, _: Any, rng: random.Random) -> bytes:
        kind = rng.choice([b"1", b"2", b"3", b"4", b"6"])

        def edit(header: bytearray) -> None:
            header[156:157] = kind
            header[157:257] = b"/etc/passwd".ljust(100, b"\0")

        return _edit_header(data, rng, edit)

    def pax_header(_: bytes, members: list[tuple[str, bytes]], rng: random.Random) -> bytes:
        chosen = rng.randrange(len(members))
        record = rng.choice([b"99999999 size=1\n", b"30 size=99999999999999999999\n",
                             b"20 path=../../evil\n", b"x", b"12 size=-5\n",
                             b"18 path=/etc/passwd\n"])  # fmt: skip
        info = tarfile.TarInfo("PaxHeader")
        info.type = tarfile.XHDTYPE
        info.size = len(record)
        header = info.tobuf(format=tarfile.USTAR_FORMAT)
        blob = pack(members[:chosen])[: -2 * BLOCK]
        blob += header + record + b"\0" * (padded(len(record)) - len(record))
        return blob + pack(members[chosen:])

    def image_bomb(_: bytes, members: list[tuple[str, bytes]], rng: random.Random) -> bytes:
        if rng.random() < 0.5:
            payload = _png_bomb(rng.choice([30_000, 60_000, 2**31 - 1]), rng.choice([30_000, 1]))
        else:
            jpeg = next(data for name, data in members if name.endswith(".jpg"))
            payload = _jpeg_with_size(jpeg, rng.choice([65_500, 1, 0]), rng.choice([65_500, 0]))
        return pack(_replace_member(members, rng, ".jpg", payload))

    def hostile_value(_: bytes, members: list[tuple[str, bytes]], rng: random.Random) -> bytes:
        suffix, payload = rng.choice([
            (".json", b"[" * 200_000), (".json", b'{"a": ' * 50_000), (".json", b"\xff\xfe"),
            (".cls", b"9" * 100_000), (".cls", b"-"), (".cls", b"\xff"),
            (".jpg", b""), (".jpg", b"\xff\xd8\xff"), (".jpg", os.urandom(0) + b"GIF89a"),
        ])  # fmt: skip
        return pack(_replace_member(members, rng, suffix, payload))

    def missing_field(_: bytes, members: list[tuple[str, bytes]], rng: random.Random) -> bytes:
        chosen = rng.randrange(len(members))
        return pack(members[:chosen] + members[chosen + 1 :])

    def damaged_scan(_: bytes, members: list[tuple[str, bytes]], rng: random.Random) -> bytes:
        """A JPEG's coded rows damaged: bits flipped, a restart marker renumbered, removed
        or made up, fill bytes inserted, or the restart interval in its header changed."""
        name, jpeg = rng.choice([m for m in members if m[0].endswith(".jpg")])
        data = bytearray(jpeg)
        scan = data.find(b"\xff\xda")
        markers = [n for n in range(scan, len(data) - 1)
                   if data[n] == 0xFF and 0xD0 <= data[n + 1] <= 0xD7]  # fmt: skip
        for _ in range(rng.randint(1, 3)):
            edit = rng.randrange(5)
            if edit == 0 or not markers:
                data[rng.randrange(scan, len(data))] ^= 1 << rng.randrange(8)
            elif edit == 1:
                data[rng.choice(markers) + 1] = 0xD0 + rng.randrange(8)
            elif edit == 2:
                at = rng.choice(markers)
                data[at : at + 2] = b""
                markers = [m - 2 if m > at else m for m in markers if m != at]
            elif edit == 3:
                at = rng.randrange(scan, len(data))
                data[at:at] = rng.choice([b"\xff\xd3", b"\xff" * rng.randint(1, 9)])
            else:
                at = data.find(b"\xff\xdd")
                if at >= 0:
                    data[at + 4 : at + 6] = rng.randrange(65536).to_bytes(2, "big")
        return pack([(n, bytes(data) if n == name else d) for n, d in members])

    def truncated_image(_: bytes, members: list[tuple[str, bytes]], rng: random.Random) -> bytes:
        """A JPEG member cut short inside its coded data; the tar itself is whole."""
        jpeg = next(data for name, data in members if name.endswith(".jpg"))
        cut = rng.randrange(jpeg.find(b"\xff\xda") + 2, len(jpeg) - 2)
        return pack(_replace_member(members, rng, ".jpg", jpeg[:cut]))

    def early_end(data: bytes, _: Any, rng: random.Random) -> bytes:
        start = rng.choice(_header_spans(data))[0]
        return data[:start] + b"\0" * BLOCK + data[start:]

    return {f.__name__: f for f in (
        truncate, flip_header, flip_header_field, flip_payload, huge_size, base256_size,
        duplicate_key, escaping_name, link_member, pax_header, image_bomb, hostile_value,
        damaged_scan, missing_field, early_end, truncated_image,
    )}  # fmt: skip


TAR_MUTATIONS = _tar_mutations()
PARQUET_MUTATIONS = ("flip_footer", "truncate_footer", "footer_length", "flip_body", "truncate")


# -- index forgeries: the attacker who writes the index lies in it (issue 17.10) ---------------
def _forge(folder: str, edit: Callable[[dict[str, Any]], None]) -> None:
    path = os.path.join(folder, "index.json")
    with open(path) as handle:
        document = json.load(handle)
    edit(document)
    document["num_samples"] = sum(shard["samples"] for shard in document["shards"])
    with open(path, "w") as handle:
        json.dump(document, handle)


def _forge_table(folder: str, name: str, rows: int, payload: Iterator[bytes]) -> None:
    """Shard 0's sample table with member ``name`` (int64, ``rows`` long by its header)
    deflated from ``payload``, and the index's size and checksum of the table to match."""
    import zipfile

    from dataflow.index import checksum

    path = os.path.join(folder, "shard-000.tar.samples.npz")
    with np.load(path) as arrays:
        kept = {key: arrays[key] for key in arrays.files if key != name}
    buffer = io.BytesIO()
    np.savez(buffer, **kept)  # type: ignore[arg-type]
    header = {"descr": "<i8", "fortran_order": False, "shape": (rows,)}
    with (
        zipfile.ZipFile(buffer, "a", compression=zipfile.ZIP_DEFLATED) as archive,
        archive.open(f"{name}.npy", "w", force_zip64=True) as member,
    ):
        np.lib.format.write_array_header_1_0(member, header)
        for chunk in payload:
            member.write(chunk)
    data = buffer.getvalue()
    with open(path, "wb") as handle:
        handle.write(data)
    _forge(folder, lambda d: d["shards"][0].update(table_bytes=len(data),
                                                   table_checksum=checksum(data)))  # fmt: skip


def _index_forgeries() -> dict[str, Callable[[str, random.Random], None]]:
    def forged_shard_bytes(folder: str, rng: random.Random) -> None:
        size = rng.choice([10**12, 2**40, 2**31])
        _forge(folder, lambda d: d["shards"][0].update(bytes=size))

    def forged_sample_count(folder: str, rng: random.Random) -> None:
        count = rng.choice([2 * 10**9, 2**24 + 1, 10**6])
        _forge(folder, lambda d: d["shards"][0].update(samples=count))

    def inflating_table(folder: str, rng: random.Random) -> None:
        rows = rng.choice([8 << 20, 2 << 20])  # 64 or 16 MiB of offsets from a few KB
        zeros = bytes(1 << 20)
        _forge_table(folder, "offsets", rows, (zeros for _ in range(rows * 8 >> 20)))

    def table_header_lies(folder: str, rng: random.Random) -> None:
        rows = rng.choice([2**40, 2**31, SAMPLES + 1])
        _forge_table(folder, "sizes", rows, iter([bytes(8 * SAMPLES)]))

    return {f.__name__: f for f in (
        forged_shard_bytes, forged_sample_count, inflating_table, table_header_lies,
    )}  # fmt: skip


INDEX_FORGERIES = _index_forgeries()


def mutate_parquet(data: bytes, mutation: str, rng: random.Random) -> bytes:
    if mutation == "flip_footer":
        return _flip(data, rng, max(0, len(data) - 512), len(data), rng.randint(1, 8))
    if mutation == "truncate_footer":
        return data[: len(data) - rng.randint(1, 64)]
    if mutation == "footer_length":
        length = rng.choice([0, 2**31 - 1, len(data), len(data) - 7, 2**32 - 1])
        return data[:-8] + struct.pack("<I", length) + data[-4:]
    if mutation == "flip_body":
        return _flip(data, rng, 4, max(5, len(data) - 8), rng.randint(1, 16))
    return data[: rng.randrange(0, len(data))]


# -- running cases ---------------------------------------------------------------------------
@dataclass
class Outcome:
    case: int
    kind: str
    """tar or parquet."""
    mutation: str
    result: str
    """ok, typed, or a finding: crash, untyped, timeout, escaped, lost, missed."""
    detail: str = ""
    seconds: float = 0.0
    skipped: int = 0
    resharded_skipped: int = 0
    """Samples the re-shard of a tar case skipped (and counted)."""


@dataclass
class Summary:
    outcomes: list[Outcome] = field(default_factory=list)
    peak_rss_mb: float = 0.0
    start_rss_mb: float = 0.0

    @property
    def findings(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.result not in ("ok", "typed")]

    def table(self) -> dict[str, Counter[str]]:
        rows: dict[str, Counter[str]] = {}
        for outcome in self.outcomes:
            rows.setdefault(f"{outcome.kind}:{outcome.mutation}", Counter())[outcome.result] += 1
        return rows


class _Timeout(BaseException):
    """Raised by the alarm; a BaseException so no ``except Exception`` in the code swallows it."""


def _on_alarm(signum: int, frame: Any) -> None:
    raise _Timeout()


def _rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _typed(error: DataError, shard: str) -> tuple[str, str]:
    text = str(error)
    # An index error names the shard's entry and field; there is no sample byte to name.
    located = error.offset is not None or error.key is not None
    named = shard in text and (located or isinstance(error, DatasetIndexError))
    return ("typed" if named else "untyped"), text[:300]


def _epoch(url: str) -> tuple[int, int]:
    """(samples delivered, samples skipped) of one epoch with on_bad_sample = skip."""
    from dataflow import DataConfig, Loader

    config = DataConfig(url=url, image_field="jpg", label_field="cls", image_size=32,
                        global_batch=4, drop_last=False, shuffle_window=2, on_bad_sample="skip",
                        decode_workers=1, fetch_workers=1, readahead_shards=1,
                        prefetch_batches=1, max_skip_fraction=1.0)  # fmt: skip
    loader = Loader(config, rank=0, world_size=1)
    try:
        delivered = sum(int(batch["__valid__"].sum()) for batch in loader)
        skipped = len(loader.skipped)
    finally:
        loader.close()
    return delivered, skipped


def _files(folder: str) -> set[str]:
    return {os.path.relpath(os.path.join(d, f), folder) for d, _, fs in os.walk(folder) for f in fs}


def plan(number: int, seed: int) -> tuple[str, str, random.Random]:
    """Case ``number``'s shard kind (even: tar, odd: Parquet), mutation, and random source."""
    rng = random.Random(seed * 1_000_003 + number)
    if number % 2 == 0:
        return "tar", rng.choice(sorted(TAR_MUTATIONS) + sorted(INDEX_FORGERIES)), rng
    return "parquet", rng.choice(PARQUET_MUTATIONS), rng


def run_tar_case(number: int, seed: int, sandbox: str) -> Outcome:
    from dataflow.convert.existing import index_existing_tars
    from dataflow.index import DatasetIndex
    from dataflow.verify import verify_dataset

    _, mutation, rng = plan(number, seed)
    members = sample_members(seed, 0)
    forgery = INDEX_FORGERIES.get(mutation)  # intact tars, a lying index
    damaged = pack(members) if forgery else TAR_MUTATIONS[mutation](pack(members), members, rng)
    folder = os.path.join(sandbox, f"case-{number:05d}")
    os.makedirs(folder)
    shard = "shard-000.tar"
    with open(os.path.join(folder, shard), "wb") as handle:
        handle.write(damaged)
    with open(os.path.join(folder, "shard-001.tar"), "wb") as handle:
        handle.write(pack(sample_members(seed, 1)))
    outcome = Outcome(number, "tar", mutation, "ok")
    try:
        try:
            index = index_existing_tars(folder, progress=False, threads=1)
            if forgery is not None:
                forgery(folder, rng)
                index = DatasetIndex.load(folder)
        except DataError as error:
            outcome.result, outcome.detail = _typed(error, shard)
            return _reshard(folder, shard, outcome)
        delivered, skipped = _epoch(folder)
        outcome.skipped = skipped
        if delivered + skipped != index.num_samples:
            outcome.result = "lost"
            outcome.detail = f"{delivered} delivered + {skipped} skipped of {index.num_samples}"
        verify_dataset(folder, decode=True, threads=1, progress=False)
    except DataError as error:
        outcome.result, outcome.detail = _typed(error, shard)
    return _reshard(folder, shard, outcome)


def _reshard(folder: str, shard: str, outcome: Outcome) -> Outcome:
    """The case's tars re-sharded by ``convert`` (skip policy, images decode-checked), after
    the checks above: each sample written or skipped and counted, no written image failing
    the decode check; or a typed error naming the damaged tar. Input and output lie in
    folders of their own inside the case's, so the checks above never see them."""
    import shutil
    import tarfile

    from dataflow.convert.config import ConvertConfig
    from dataflow.convert.job import convert
    from dataflow.convert.sources import scan_tar
    from dataflow.formats.codec import check_image
    from dataflow.storage import StorageConfig

    source, output = os.path.join(folder, "reshard-in"), os.path.join(folder, "reshard-out")
    os.makedirs(source)
    for name in (shard, "shard-001.tar"):
        shutil.copyfile(os.path.join(folder, name), os.path.join(source, name))
    try:
        report = convert(ConvertConfig(input=source, output=output, input_format="webdataset",
                                       on_bad_input="skip", shuffle=False, workers=1),
                         progress=False)  # fmt: skip
        listed = sum(len(scan_tar(os.path.join(source, name), StorageConfig()))
                     for name in os.listdir(source))  # fmt: skip
    except DataError as error:
        if outcome.result in ("ok", "typed"):  # the re-shard must name the tar too
            outcome.result, outcome.detail = _typed(error, shard)
        return outcome
    outcome.resharded_skipped = report.skipped
    written: set[str] = set()
    for name in sorted(os.listdir(output)):
        if not name.endswith(".tar"):
            continue
        with tarfile.open(os.path.join(output, name)) as archive:
            for member in archive:
                written.add(member.name.split(".", 1)[0])
                data = archive.extractfile(member)
                if not member.name.endswith(".jpg") or data is None:
                    continue
                try:
                    check_image(data.read())
                except ValueError as error:
                    outcome.result = "missed"
                    outcome.detail = f"re-shard copied {member.name}: {error}"[:300]
                    return outcome
    if len(written) + report.skipped != listed:
        outcome.result = "lost"
        outcome.detail = f"re-shard: {len(written)} written + {report.skipped} skipped of {listed}"
    return outcome


def run_parquet_case(number: int, seed: int, sandbox: str, base: str) -> Outcome:
    import shutil

    from dataflow.verify import verify_dataset

    _, mutation, rng = plan(number, seed)
    folder = os.path.join(sandbox, f"case-{number:05d}")
    shutil.copytree(base, folder)
    victim = sorted(f for f in _files(folder) if f.endswith(".parquet"))[0]
    path = os.path.join(folder, victim)
    with open(path, "rb") as handle:
        data = handle.read()
    with open(path, "wb") as handle:
        handle.write(mutate_parquet(data, mutation, rng))
    outcome = Outcome(number, "parquet", mutation, "ok")
    try:
        from dataflow import DataConfig, Loader

        loader = Loader(DataConfig(url=folder, label_field="", global_batch=4, drop_last=False,
                                   on_bad_sample="skip", fetch_workers=1, decode_workers=1,
                                   max_skip_fraction=1.0),
                        rank=0, world_size=1)  # fmt: skip
        try:
            delivered = sum(int(batch["__valid__"].sum()) for batch in loader)
            outcome.skipped = len(loader.skipped)
            if delivered + outcome.skipped != loader.index.num_samples:
                outcome.result = "lost"
                outcome.detail = f"{delivered} + {outcome.skipped} of {loader.index.num_samples}"
        finally:
            loader.close()
        # The index predates the damage: verify must see it.
        if verify_dataset(folder, decode=True, threads=1, progress=False).ok:
            outcome.result, outcome.detail = "missed", "verify found the damaged shard fine"
    except DataError as error:
        outcome.result, outcome.detail = _typed(error, os.path.basename(victim))
    return outcome


def run_cases(cases: Iterator[int] | range, *, seed: int, sandbox: str, parquet_base: str,
              on_case: Callable[[Outcome], None] | None = None,
              on_start: Callable[[int], None] | None = None) -> Summary:  # fmt: skip
    """Run the cases (even numbers tar, odd Parquet) in this process, each under an alarm."""
    import logging

    logging.getLogger("dataflow").setLevel(logging.CRITICAL)  # damage is expected
    summary = Summary(start_rss_mb=_rss_mb())
    previous = signal.signal(signal.SIGALRM, _on_alarm)
    try:
        for number in cases:
            if on_start is not None:
                on_start(number)
            before = _files(sandbox)
            started = time.perf_counter()
            signal.alarm(CASE_TIMEOUT_S)
            try:
                if number % 2 == 0:
                    outcome = run_tar_case(number, seed, sandbox)
                else:
                    outcome = run_parquet_case(number, seed, sandbox, parquet_base)
            except _Timeout:
                kind, mutation, _ = plan(number, seed)
                outcome = Outcome(number, kind, mutation, "timeout", f"over {CASE_TIMEOUT_S} s")
            except Exception as error:  # a finding, recorded with its type
                kind, mutation, _ = plan(number, seed)
                outcome = Outcome(number, kind, mutation, "crash",
                                  f"{type(error).__name__}: {str(error)[:300]}")  # fmt: skip
            finally:
                signal.alarm(0)
            outcome.seconds = time.perf_counter() - started
            folder = f"case-{number:05d}"
            outside = {f for f in _files(sandbox) - before if not f.startswith(folder + os.sep)}
            if outside:
                outcome.result, outcome.detail = "escaped", f"wrote {sorted(outside)[:3]}"
            summary.outcomes.append(outcome)
            if on_case is not None:
                on_case(outcome)
    finally:
        signal.signal(signal.SIGALRM, previous)
    summary.peak_rss_mb = _rss_mb()
    return summary
