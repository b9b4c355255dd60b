"""shardflow's data library: index, shard formats, storage, conversion and the loader.

``dataflow`` never imports ``trainer``; the trainer builds on it.
"""

from typing import Any

from dataflow.index import DatasetIndex, Field, SampleTable, ShardEntry

__all__ = [
    "DataConfig",
    "DatasetIndex",
    "Field",
    "Loader",
    "MixSource",
    "SampleTable",
    "ShardEntry",
    "ShardWriter",
    "convert_samples",
]


def __getattr__(name: str) -> Any:
    # The loader imports torch (~1 s); conversion tools and their workers never need it.
    if name in ("Loader", "DataConfig", "MixSource"):
        from dataflow import pipeline

        return getattr(pipeline, name)
    if name in ("ShardWriter", "convert_samples"):
        from dataflow.convert import writer

        return getattr(writer, name)
    raise AttributeError(f"module 'dataflow' has no attribute {name!r}")
