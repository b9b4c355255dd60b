"""JSONL, CSV, Parquet and WebDataset sources → tar and Parquet shards."""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv
import pyarrow.parquet as pq
import pytest

from dataflow.convert.config import ConvertConfig
from dataflow.convert.job import ConversionError, convert
from dataflow.datasets import photo_jpegs
from dataflow.errors import SourceError
from dataflow.formats import codec
from dataflow.formats.parquet import decode_column_value
from dataflow.index import DatasetIndex, load_table
from dataflow.verify import verify_dataset

ROOT = Path(__file__).resolve().parents[2]


def run(source: Path, output: Path, **options: object) -> DatasetIndex:
    config = ConvertConfig(input=str(source), output=str(output), **options)  # type: ignore[arg-type]
    convert(config, progress=False)
    return DatasetIndex.load(str(output))


def records(count: int) -> list[dict[str, object]]:
    rng = np.random.default_rng(0)
    return [
        {
            "id": f"doc-{i:04d}",
            "text": f"document number {i} — ünïcode",
            "tokens": rng.integers(0, 50_000, size=int(rng.integers(5, 40))).tolist(),
            "score": float(i) / 7,
            "meta": {"source": "test", "n": i},
        }
        for i in range(count)
    ]


def read_tar_samples(root: Path, index: DatasetIndex) -> dict[str, dict[str, object]]:
    kinds = {f.name: f.kind for f in index.fields}
    samples: dict[str, dict[str, object]] = {}
    for shard in index.shards:
        with tarfile.open(root / shard.path) as archive:
            for member in archive:
                key, extension = member.name.split(".", 1)
                data = archive.extractfile(member).read()  # type: ignore[union-attr]
                samples.setdefault(key, {})[extension] = codec.decode(kinds[extension], data)
    return samples


def write_jsonl(path: Path, rows: list[dict[str, object]]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def test_jsonl_to_tar_keeps_every_value(tmp_path: Path) -> None:
    rows = records(50)
    write_jsonl(tmp_path / "in.jsonl", rows)
    index = run(tmp_path / "in.jsonl", tmp_path / "out", key_field="id", max_shard_samples=20)
    assert {f.name: f.kind for f in index.fields} == {
        "text": "str", "tokens": "tokens", "score": "float", "meta": "json",
    }  # fmt: skip
    samples = read_tar_samples(tmp_path / "out", index)
    assert sorted(samples) == sorted(r["id"] for r in rows)  # type: ignore[type-var]
    for row in rows:
        sample = samples[row["id"]]  # type: ignore[index]
        assert sample["text"] == row["text"]
        assert sample["tokens"].tolist() == row["tokens"]  # type: ignore[attr-defined]
        assert sample["score"] == row["score"]
        assert sample["meta"] == row["meta"]
    assert verify_dataset(str(tmp_path / "out"), decode=True, progress=False).ok


def test_jsonl_to_parquet_row_groups(tmp_path: Path) -> None:
    rows = records(40)
    write_jsonl(tmp_path / "in.jsonl", rows)
    index = run(tmp_path / "in.jsonl", tmp_path / "out", format="parquet", row_group_rows=8)
    shard = index.shards[0]
    table = load_table(str(tmp_path / "out"), index, shard)
    assert table.row_groups[:, 1].tolist() == [8] * 5
    parquet = pq.ParquetFile(tmp_path / "out" / shard.path)
    by_key = {r["__key__"]: r for r in parquet.read().to_pylist()}
    assert len(by_key) == 40
    first = by_key["in_000000001"]
    assert decode_column_value("tokens", first["tokens"]).tolist() == rows[0]["tokens"]
    assert decode_column_value("json", first["meta"]) == rows[0]["meta"]
    assert verify_dataset(str(tmp_path / "out"), decode=True, progress=False).ok


def test_jsonl_missing_field_names_file_and_line(tmp_path: Path) -> None:
    rows = records(10)
    del rows[6]["text"]
    write_jsonl(tmp_path / "in.jsonl", rows)
    with pytest.raises(ConversionError) as caught:
        run(tmp_path / "in.jsonl", tmp_path / "out", workers=1)
    assert f"{tmp_path / 'in.jsonl'}:7" in str(caught.value)
    assert "missing field" in str(caught.value) and "text" in str(caught.value)


def test_jsonl_skip_policy_records_bad_lines(tmp_path: Path) -> None:
    rows = records(10)
    del rows[2]["score"]
    write_jsonl(tmp_path / "in.jsonl", rows)
    with open(tmp_path / "in.jsonl", "a") as handle:
        handle.write("{not json\n\n")
    index = run(tmp_path / "in.jsonl", tmp_path / "out", workers=1, on_bad_input="skip")
    assert index.num_samples == 9
    reasons = {s["source"]: s["reason"] for s in index.skipped}
    assert reasons.keys() == {f"{tmp_path / 'in.jsonl'}:3", f"{tmp_path / 'in.jsonl'}:11"}


def test_bad_jsonl_into_parquet_is_one_line_without_writer_noise(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "in.jsonl", records(10))
    with open(tmp_path / "in.jsonl", "a") as handle:
        handle.write("{not json\n")
    result = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "convert.py"), "--input", str(tmp_path / "in.jsonl"),
         "--output", str(tmp_path / "out"), "--format", "parquet", "--workers", "1", "--quiet"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 1
    assert result.stderr.startswith(f"error: {tmp_path / 'in.jsonl'}:11: not valid JSON")
    assert result.stderr.count("\n") == 1, result.stderr  # no "Exception ignored in ..."
    assert [p.name for p in (tmp_path / "out").glob("*.parquet")] == []


def test_chosen_fields_only(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "in.jsonl", records(5))
    index = run(tmp_path / "in.jsonl", tmp_path / "out", fields=["text", "score"])
    assert [f.name for f in index.fields] == ["text", "score"]


def test_parquet_and_csv_tables(tmp_path: Path) -> None:
    table = pa.table(
        {
            "label": pa.array(range(30), pa.int64()),
            "caption": pa.array([f"caption {i}" for i in range(30)]),
            "tokens": pa.array([[i, i + 1, i + 2] for i in range(30)], pa.list_(pa.int64())),
            "blob": pa.array([bytes([i]) * 10 for i in range(30)], pa.binary()),
        }
    )
    (tmp_path / "tables").mkdir()
    pq.write_table(table.slice(0, 12), tmp_path / "tables" / "part-a.parquet")
    pq.write_table(table.slice(12), tmp_path / "tables" / "part-b.parquet")
    index = run(tmp_path / "tables", tmp_path / "out", shuffle=False, max_shard_samples=10)
    assert {f.name: f.kind for f in index.fields} == {
        "label": "int", "caption": "str", "tokens": "tokens", "blob": "bytes",
    }  # fmt: skip
    samples = read_tar_samples(tmp_path / "out", index)
    assert samples["part-a_000000003"]["caption"] == "caption 3"
    assert samples["part-b_000000000"]["label"] == 12
    assert samples["part-b_000000001"]["tokens"].tolist() == [13, 14, 15]  # type: ignore[attr-defined]
    assert samples["part-b_000000001"]["blob"] == bytes([13]) * 10

    pyarrow.csv.write_csv(table.select(["label", "caption"]), tmp_path / "t.csv")
    csv_index = run(tmp_path / "t.csv", tmp_path / "csv-out", format="parquet")
    assert csv_index.num_samples == 30
    rows = pq.read_table(tmp_path / "csv-out" / csv_index.shards[0].path).to_pylist()
    assert {r["caption"] for r in rows} == {f"caption {i}" for i in range(30)}


def test_unreadable_table_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(SourceError, match=r"bad\.parquet"):
        run(tmp_path / "bad.parquet", tmp_path / "out")


def test_webdataset_tars_are_resharded_byte_for_byte(tmp_path: Path) -> None:
    import webdataset

    source = tmp_path / "wds"
    source.mkdir()
    originals = {}
    with webdataset.ShardWriter(str(source / "part-%04d.tar"), maxcount=12, verbose=0) as sink:
        for number, (label, jpeg) in enumerate(photo_jpegs(30, seed=3)):
            key = f"sample{number:05d}"
            originals[key] = (jpeg, label)
            sink.write({"__key__": key, "jpg": jpeg, "cls": label, "txt": f"photo {number}"})
    index = run(source, tmp_path / "out", max_shard_samples=8)
    assert {f.name: f.kind for f in index.fields} == {"jpg": "image", "cls": "int", "txt": "str"}
    samples = read_tar_samples(tmp_path / "out", index)
    assert sorted(samples) == sorted(originals)
    for key, (jpeg, label) in originals.items():
        assert samples[key]["jpg"] == jpeg
        assert samples[key]["cls"] == label


def test_pickle_members_are_refused_unless_opted_in(tmp_path: Path) -> None:
    import webdataset

    source = tmp_path / "wds"
    source.mkdir()
    with webdataset.TarWriter(str(source / "p.tar")) as sink:
        sink.write({"__key__": "a", "pyd": {"x": 1}, "cls": 1})
    with pytest.raises(SourceError, match="pickle"):
        run(source, tmp_path / "out")
    index = run(source, tmp_path / "ok", allow_pickle=True, overwrite=True)
    assert index.field("pyd").kind == "pickle"
