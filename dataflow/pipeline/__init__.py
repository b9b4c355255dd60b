"""The composed loader: order → read-ahead → decode → transform → batch → device."""

from dataflow.pipeline.collate import default_collate, pad_collate
from dataflow.pipeline.config import DataConfig, MixSource
from dataflow.pipeline.fields import register_decoder
from dataflow.pipeline.loader import Loader
from dataflow.pipeline.transform import TransformOutputError, sample_rng

__all__ = [
    "DataConfig",
    "Loader",
    "MixSource",
    "TransformOutputError",
    "default_collate",
    "pad_collate",
    "register_decoder",
    "sample_rng",
]
