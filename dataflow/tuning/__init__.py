"""I/O autotuning: the knobs (``space``), a search led by the bottleneck stage within time
and memory budgets (``search``), and a deterministic model of the loader to test it on
(``simulated``). ``tools/tune_io.py`` runs the search against the real loader and storage."""

from dataflow.tuning.search import Measurement, Result, Trial, tune
from dataflow.tuning.simulated import SimulatedPipeline
from dataflow.tuning.space import (
    Knob,
    Workload,
    batch_knobs,
    decode_knobs,
    memory_estimate,
    storage_knobs,
)

__all__ = [
    "Knob",
    "Measurement",
    "Result",
    "SimulatedPipeline",
    "Trial",
    "Workload",
    "batch_knobs",
    "decode_knobs",
    "memory_estimate",
    "storage_knobs",
    "tune",
]
