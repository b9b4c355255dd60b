"""Weight init that does not depend on the parallel layout.

Each parameter's full initial value is drawn from a generator seeded by (seed, parameter
name) and then cut to the local shard when the parameter is a DTensor. One process, DDP,
FSDP, TP and any pipeline cut therefore start from the same weights, which is what lets the
tests compare their losses; the cost is one full-size temporary per parameter (never a full
model), and it also works on a model that was built on the meta device and then
materialised with ``to_empty``. Norm layers (LayerNorm, GroupNorm, BatchNorm) start as
identity; a parameter of a module with no rule here (a custom ``nn.Parameter``) draws
N(0, 0.02²) when it is a matrix and starts at zero when it is a vector.

``copy_values`` is the other way in (a user model's own values, ``trainer.models.spec``):
full values by name, cut to each local shard the same way.
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
    if isinstance(module, (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase)):
        return torch.ones(shape) if name == "weight" else torch.zeros(shape)
    if name == "bias":
        return torch.zeros(shape)
    if isinstance(module, nn.Embedding):
        return torch.randn(shape, generator=generator) * 0.02
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        # He init for the ReLU convolutions, 1/sqrt(fan_in) for the linear layers.
        fan_in = math.prod(shape[1:])
        gain = 2.0 if isinstance(module, nn.Conv2d) else 1.0
        return torch.randn(shape, generator=generator) * math.sqrt(gain / fan_in)
    if len(shape) >= 2:
        return torch.randn(shape, generator=generator) * 0.02
    return torch.zeros(shape)


def _assign(target: torch.Tensor, value: torch.Tensor) -> None:
    """Copy a full value into ``target``, or into its local shard when it is a DTensor."""
    if isinstance(target, DTensor):
        local = distribute_tensor(
            value, target.device_mesh, target.placements, src_data_rank=None
        ).to_local()
        target.to_local().copy_(local)
    else:
        target.copy_(value)


@torch.no_grad()
def init_weights(model: nn.Module, seed: int) -> None:
    """Initialise every parameter of ``model`` in place, see the module docstring."""
    for module_name, module in model.named_modules():
        for name, param in module.named_parameters(recurse=False):
            full_name = clean_name(f"{module_name}.{name}" if module_name else name)
            generator = torch.Generator().manual_seed(
                xxhash.xxh64_intdigest(f"{seed}:{full_name}".encode()) & (2**63 - 1)
            )
            _assign(param, _full_value(module, name, tuple(param.shape), generator))


@torch.no_grad()
def copy_values(model: nn.Module, values: dict[str, torch.Tensor]) -> None:
    """Set every parameter and buffer of ``model`` (wrapped, sharded, a pipeline stage) from
    the full ``values`` of the unwrapped model, by name."""
    named = [*model.named_parameters(), *model.named_buffers()]
    for name, tensor in named:
        clean = clean_name(name)
        if clean not in values:
            raise KeyError(f"no initial value for {clean!r} (the model changed after it was built)")
        _assign(tensor, values[clean].to(tensor.dtype))
