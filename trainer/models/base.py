"""``StagedModel``: input layer → blocks → output layer, cut-able between blocks."""

from __future__ import annotations

import torch
from torch import nn


class StagedModel(nn.Module):
    """A model whose forward is ``output(blocks(input(x)))``, any part of which may be absent.

    A pipeline stage is a copy with the blocks of other stages deleted (and the input or
    output layer unless it is the first or last stage); the names of what stays do not
    change. ``blocks`` keys are the block numbers as strings.
    """

    input_layer: nn.Module | None
    blocks: nn.ModuleDict
    output_layer: nn.Module | None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_layer is not None:
            x = self.input_layer(x)
        for block in self.blocks.values():
            x = block(x)
        if self.output_layer is not None:
            x = self.output_layer(x)
        return x
