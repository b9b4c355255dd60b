"""shardflow's training library; it builds on ``dataflow`` and owns the root config."""
