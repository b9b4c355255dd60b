"""DALI's ``readers.webdataset`` reads our tar shards through index files derived from the
sample table (no tar scan), on CPU: the same bytes in the same order, decodable images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dataflow.datasets import photo_jpegs
from dataflow.formats import codec
from dataflow.formats.tar import TarShardWriter, dali_index_text
from dataflow.index import Field

dali = pytest.importorskip("nvidia.dali")

FIELDS = [Field(name="jpg", kind="image"), Field(name="cls", kind="int")]
BATCH = 4


@pytest.fixture(scope="module")
def photos() -> list[tuple[int, bytes]]:
    return photo_jpegs(16, seed=5, long_side=64)


def write_shard_and_index(
    directory: Path, samples: list[tuple[str, dict[str, bytes]]]
) -> tuple[Path, Path]:
    tar = directory / "shard-000000.tar"
    with open(tar, "wb") as handle:
        writer = TarShardWriter(handle, FIELDS)
        for key, members in samples:
            writer.write_sample(key, members)
        table = writer.close()
    index = directory / "shard-000000.idx"
    index.write_text(dali_index_text(table, FIELDS))
    return tar, index


def photo_samples(photos: list[tuple[int, bytes]]) -> list[tuple[str, dict[str, bytes]]]:
    return [
        (f"sample-{n:04d}", {"jpg": jpeg, "cls": codec.encode("int", label)})
        for n, (label, jpeg) in enumerate(photos)
    ]


def run_reader(tar: Path, index: Path, batches: int, *, missing: str, decode: bool) -> list:
    @dali.pipeline_def(batch_size=BATCH, num_threads=1, device_id=None, seed=0)
    def pipeline() -> tuple:
        jpegs, labels = dali.fn.readers.webdataset(
            paths=[str(tar)],
            index_paths=[str(index)],
            ext=["jpg", "cls"],
            missing_component_behavior=missing,
            random_shuffle=False,
            name="reader",
        )
        if decode:
            return (
                jpegs,
                labels,
                dali.fn.decoders.image(jpegs, device="cpu", output_type=dali.types.RGB),
            )
        return jpegs, labels

    pipe = pipeline()
    pipe.build()
    rows: list = []
    for _ in range(batches):
        outputs = pipe.run()
        for sample in range(BATCH):
            rows.append(tuple(np.array(output.at(sample)) for output in outputs))
    return rows


def test_dali_reads_our_shard_in_order(tmp_path: Path, photos: list[tuple[int, bytes]]) -> None:
    samples = photo_samples(photos)
    tar, index = write_shard_and_index(tmp_path, samples)
    rows = run_reader(tar, index, len(samples) // BATCH, missing="error", decode=True)
    assert len(rows) == len(samples)
    for (key, members), (jpeg, label, image), (expected_label, _) in zip(
        samples, rows, photos, strict=True
    ):
        assert jpeg.dtype == np.uint8 and jpeg.tobytes() == members["jpg"], key
        assert codec.decode("int", label.tobytes()) == expected_label
        reference = codec.decode_image(members["jpg"])
        assert image.shape == reference.shape
        # Both are libjpeg-turbo based; allow for a different IDCT or upsampling choice.
        assert np.abs(image.astype(np.int16) - reference).mean() < 2.0


def test_dali_missing_component_from_index(tmp_path: Path, photos: list[tuple[int, bytes]]) -> None:
    samples = photo_samples(photos[:8])
    del samples[3][1]["cls"]
    tar, index = write_shard_and_index(tmp_path, samples)

    rows = run_reader(tar, index, 2, missing="empty", decode=False)
    assert [row[0].tobytes() for row in rows] == [members["jpg"] for _, members in samples]
    assert rows[3][1].size == 0
    assert [row[1].tobytes() for row in rows] == [m.get("cls", b"") for _, m in samples]

    skipped = run_reader(tar, index, 1, missing="skip", decode=False)
    kept = [members["jpg"] for _, members in samples if "cls" in members]
    assert [row[0].tobytes() for row in skipped] == kept[:BATCH]


def test_dali_uses_the_index_file(tmp_path: Path, photos: list[tuple[int, bytes]]) -> None:
    """Guard against DALI silently re-scanning the tar: a shifted offset shows in the bytes."""
    samples = photo_samples(photos[:4])
    tar, index = write_shard_and_index(tmp_path, samples)
    header, first, *rest = index.read_text().splitlines()
    words = first.split(" ")
    # Move the first sample's jpg data offset one tar block on (DALI requires block alignment).
    words[1] = str(int(words[1]) + 512)
    index.write_text("\n".join([header, " ".join(words), *rest]) + "\n")
    rows = run_reader(tar, index, 1, missing="error", decode=False)
    jpeg = samples[0][1]["jpg"]
    assert rows[0][0].tobytes() == tar.read_bytes()[int(words[1]) : int(words[1]) + len(jpeg)]
    assert rows[0][0].tobytes() != jpeg
    assert rows[1][0].tobytes() == samples[1][1]["jpg"]
