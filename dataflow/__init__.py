"""shardflow's data library: index, shard formats, storage, conversion and (soon) the loader.

``dataflow`` never imports ``trainer``; the trainer builds on it.
"""

from dataflow.index import DatasetIndex, Field, SampleTable, ShardEntry

__all__ = ["DatasetIndex", "Field", "SampleTable", "ShardEntry"]
