"""The loader over Parquet shards: tables (pass-through fields) and images in row groups."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from dataflow.convert.config import ConvertConfig
from dataflow.convert.job import convert
from dataflow.index import DatasetIndex, load_table
from dataflow.pipeline import DataConfig, Loader


def test_table_rows_pass_through_with_labels(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    rows = [
        {"id": f"r{i:03d}", "label": i % 5, "tokens": rng.integers(0, 999, 6).tolist(),
         "text": f"row {i}", "meta": {"n": i}}
        for i in range(50)
    ]  # fmt: skip
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    convert(ConvertConfig(input=str(tmp_path / "in.jsonl"), output=str(tmp_path / "ds"),
                          format="parquet", key_field="id", row_group_rows=8,
                          max_shard_samples=20, workers=1), progress=False)  # fmt: skip
    loader = Loader(DataConfig(url=str(tmp_path / "ds"), global_batch=10, label_field="label",
                               drop_last=False), rank=0, world_size=1)  # fmt: skip
    by_key = {}
    for batch in loader:
        assert "image" not in batch and batch["label"].dtype == torch.int64
        for position, key in enumerate(batch["__key__"]):
            by_key[key] = (int(batch["label"][position]), batch["tokens"][position],
                           batch["text"][position], batch["meta"][position])  # fmt: skip
    assert sorted(by_key) == sorted(r["id"] for r in rows)
    for row in rows:
        label, tokens, text, meta = by_key[row["id"]]
        assert label == row["label"] and text == row["text"] and meta == row["meta"]
        assert np.asarray(tokens).tolist() == row["tokens"]


def test_images_in_parquet_shards(photo_folder: Path, tmp_path: Path) -> None:
    root = str(tmp_path / "ds")
    config = ConvertConfig(
        input=str(photo_folder), output=root, format="parquet", row_group_rows=8, workers=1
    )
    convert(config, progress=False)
    index = DatasetIndex.load(root)
    assert index.format == "parquet"
    assert len(load_table(root, index, index.shards[0]).row_groups) > 1
    loader = Loader(DataConfig(url=str(tmp_path / "ds"), global_batch=12, image_size=32),
                    rank=0, world_size=1)  # fmt: skip
    batches = list(loader)
    assert len(batches) == 5
    assert all(b["image"].shape == (12, 32, 32, 3) for b in batches)
    keys = [k for b in batches for k in b["__key__"]]
    assert len(set(keys)) == 60
    classes = index.metadata["classes"]
    for batch in batches:
        for key, label in zip(batch["__key__"], batch["label"].tolist(), strict=True):
            assert classes[label] == key.split("/")[0]
