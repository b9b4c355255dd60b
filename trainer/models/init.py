"""Weight init that does not depend on the parallel layout.

Each parameter's full initial value is drawn from a generator seeded by (seed, parameter
name) and then cut to the local shard when the parameter is a DTensor. One process, DDP,
FSDP, TP and any pipeline cut therefore start from the same weights, which is what lets the
tests compare their losses; the cost is one full-size temporary per parameter (never a full
model), and it also works on a model that was built on the meta device and then
materialised with ``to_empty``.
"""

from __future__ import annotations

import math

import torch
import xxhash
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

_WRAPPER_PARTS = ("_checkpoint_wrapped_module.", "_fsdp_wrapped_module.", "module.")


def clean_name(name: str) -> str:
    """A parameter name without the prefixes that wrappers insert."""
    for part in _WRAPPER_PARTS:
        name = name.replace(part, "")
    return name


def _full_value(
    module: nn.Module, name: str, shape: tuple[int, ...], generator: torch.Generator
) -> torch.Tensor:
    if name == "bias" or isinstance(module, (nn.LayerNorm, nn.GroupNorm)):
        return torch.ones(shape) if name == "weight" else torch.zeros(shape)
    if isinstance(module, nn.Embedding):
        return torch.randn(shape, generator=generator) * 0.02
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        # He init for the ReLU convolutions, 1/sqrt(fan_in) for the linear layers.
        fan_in = math.prod(shape[1:])
        gain = 2.0 if isinstance(module, nn.Conv2d) else 1.0
        return torch.randn(shape, generator=generator) * math.sqrt(gain / fan_in)
    raise TypeError(f"no init rule for {type(module).__name__}.{name}")


@torch.no_grad()
def init_weights(model: nn.Module, seed: int) -> None:
    """Initialise every parameter of ``model`` in place, see the module docstring."""
    for module_name, module in model.named_modules():
        for name, param in module.named_parameters(recurse=False):
            full_name = clean_name(f"{module_name}.{name}" if module_name else name)
            generator = torch.Generator().manual_seed(
                xxhash.xxh64_intdigest(f"{seed}:{full_name}".encode()) & (2**63 - 1)
            )
            value = _full_value(module, name, tuple(param.shape), generator)
            if isinstance(param, DTensor):
                local = distribute_tensor(
                    value, param.device_mesh, param.placements, src_data_rank=None
                ).to_local()
                param.to_local().copy_(local)
            else:
                param.copy_(value)
