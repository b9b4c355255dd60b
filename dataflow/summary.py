"""A readable summary of a dataset: sizes, shards, fields, classes, skips."""

from __future__ import annotations

import statistics

from dataflow import storage
from dataflow.config import format_bytes
from dataflow.index import DatasetIndex, load_table
from dataflow.storage import StorageConfig

_BAR = 40


def describe(root: str, storage_config: StorageConfig | None = None, *, examples: int = 3) -> str:
    index = DatasetIndex.load(root, config=storage_config)
    shard_bytes = [s.bytes for s in index.shards] or [0]
    shard_samples = [s.samples for s in index.shards] or [0]
    lines = [
        f"dataset      {storage.redact(storage.normalize_url(root))}",
        f"format       {index.format} (index version {index.version})",
        f"samples      {index.num_samples:,}",
        f"shards       {len(index.shards):,}  "
        f"(samples/shard min {min(shard_samples)}, mean {statistics.fmean(shard_samples):.0f}, "
        f"max {max(shard_samples)})",
        f"size         {format_bytes(index.total_bytes)}  "
        f"(shard min {format_bytes(min(shard_bytes))}, "
        f"mean {format_bytes(statistics.fmean(shard_bytes))}, "
        f"max {format_bytes(max(shard_bytes))}; "
        f"{format_bytes(index.total_bytes / max(1, index.num_samples))}/sample)",
        "fields       " + ", ".join(f"{f.name} ({f.kind})" for f in index.fields),
    ]
    source = index.metadata.get("source")
    if source:
        lines.append(f"source       {source} ({index.metadata.get('source_format', '?')})")
    lines.append(f"skipped      {len(index.skipped)} input record(s) at conversion")
    for skip in index.skipped[:5]:
        lines.append(f"             - {skip.get('source')}: {skip.get('reason')}")
    counts = index.metadata.get("class_counts")
    if counts:
        lines.append(f"classes      {len(counts)}")
        widest = max(counts.values())
        name_width = min(24, max(len(str(name)) for name in counts))
        for name, count in counts.items():
            bar = "█" * max(1, round(_BAR * count / widest))
            lines.append(f"  {str(name)[:name_width]:<{name_width}} {count:>8,} {bar}")
    if index.shards and examples:
        table = load_table(root, index, index.shards[0], config=storage_config)
        shown = ", ".join(repr(k) for k in table.keys[:examples])
        lines.append(f"first keys   {shown}  (in {index.shards[0].path})")
    return "\n".join(lines)
