"""Gradient compression for data-parallel training.

Each compressor averages gradients over the data-parallel replicas with less traffic than a
dense fp32 all-reduce, and counts the bytes it put on the wire per rank (the payload each
rank contributes to its collectives) beside the bytes a dense all-reduce would have:
``take_bytes()`` gives both since the last call, and the trainer logs them per step.

    fp16 / bf16   divide, cast, all-reduce, cast back: half the bytes, no state
    powersgd      rank-r P·Qᵀ per gradient matrix with error feedback and warm start
                  (``powersgd``); vectors and matrices too small to gain go dense
    topk          the ratio·n largest-magnitude entries of (gradient + residual) of each
                  parameter: values and int32 indices all-gathered and summed
    sign          EF-SignSGD: one bit per entry plus an fp32 scale per block of ≤ 1,024
                  entries of one parameter

Where it applies:

- DDP: a comm hook per gradient bucket (``Compressor.hook``).
- HSDP (``dp_replicate`` > 1 and ``dp_shard`` > 1): FSDP2 shards on the ``dp_shard`` mesh
  alone, so its reduce-scatter inside the shard group stays exact fp32, and an all-reduce
  hook (``Compressor.fsdp_hook``) averages each module's reduce-scattered shard over the
  ``dp_replicate`` group — the cross-node link — compressed. Native HSDP would all-reduce
  that shard densely inside FSDP2, with no hook to compress it.

The first ``compression.start_step`` steps send every entry (in bf16). Residuals and
PowerSGD's Q are kept per parameter name (a shard's, under HSDP), so bucket layouts do not
matter; ``state_dict()`` holds this rank's state for the checkpoint, restored as it was when
the world size is unchanged; at another world size each rank starts from the mean state of
the saved ranks that held the same pieces of the parameters (``StateAverage``).

Compressors are registered by name (``COMPRESSORS``); ``compression.method`` may also be
``"package.module:function"``, called with this section, returning a ``Compressor``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from trainer.compression.base import (
    Cast,
    Compressor,
    ErrorFeedback,
    Segment,
    StateAverage,
    tile,
)
from trainer.compression.powersgd import PowerSGD
from trainer.compression.sparse import Sign, TopK
from trainer.config import CompressionConfig
from trainer.registry import Registry

__all__ = [
    "COMPRESSORS",
    "Cast",
    "Compressor",
    "ErrorFeedback",
    "PowerSGD",
    "Segment",
    "Sign",
    "StateAverage",
    "TopK",
    "build_compressor",
    "tile",
]  # fmt: skip


CompressorFactory = Callable[[CompressionConfig], Compressor | None]
COMPRESSORS: Registry[CompressorFactory] = Registry("compressor", "compression.method")
"""name → factory(config) → Compressor, or None for the plain all-reduce ('none')."""
COMPRESSORS.register("none")(lambda config: None)
COMPRESSORS.register("fp16")(lambda config: Cast(torch.float16))
COMPRESSORS.register("bf16")(lambda config: Cast(torch.bfloat16))
COMPRESSORS.register("topk")(lambda config: TopK(config.topk.ratio, start_step=config.start_step))
COMPRESSORS.register("sign")(lambda config: Sign(start_step=config.start_step))


@COMPRESSORS.register("powersgd")
def _powersgd(config: CompressionConfig) -> Compressor:
    return PowerSGD(rank=config.powersgd.rank, start_step=config.start_step,
                    warm_start=config.powersgd.warm_start)  # fmt: skip


def build_compressor(
    config: CompressionConfig, *, place: tuple[int, int, int, int] = (0, 1, 0, 1)
) -> Compressor | None:
    """The configured compressor, or None for plain all-reduce. ``place``: this rank's
    (dp_shard coordinate, dp_shard, tp coordinate, tp), see ``Compressor.place``."""
    compressor = COMPRESSORS.get(config.method)(config)
    if compressor is None:
        return None
    if not isinstance(compressor, Compressor):
        raise ValueError(
            f"compression.method = {config.method!r} returned a {type(compressor).__name__}, "
            "not a trainer.compression.Compressor"
        )
    compressor.place = torch.tensor(place)
    return compressor
