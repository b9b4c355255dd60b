"""The composed loader: order → read-ahead → decode → batch → device."""

from dataflow.pipeline.config import DataConfig, MixSource
from dataflow.pipeline.loader import Loader

__all__ = ["DataConfig", "Loader", "MixSource"]
