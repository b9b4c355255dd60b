"""Reference models: a small ResNet for image shards, a small GPT for token shards.

Both are ``StagedModel``s — an optional input layer, a ``ModuleDict`` of blocks, an optional
output layer — so pipeline parallelism can cut them between blocks without changing the
parameter names (checkpoints then load into any layout), and activation checkpointing and
FSDP can wrap block by block.
"""

from __future__ import annotations

from trainer.config import ModelConfig
from trainer.models.base import StagedModel
from trainer.models.cnn import ResNet
from trainer.models.gpt import GPT
from trainer.models.init import init_weights

__all__ = ["GPT", "ResNet", "StagedModel", "build_model", "init_weights"]


def build_model(config: ModelConfig, *, num_classes: int) -> StagedModel:
    """The configured model (on the current default device: call under ``torch.device``)."""
    if config.name == "cnn":
        classes = config.num_classes or num_classes
        if classes < 2:
            raise ValueError(
                "model.num_classes is 0 and the dataset's index records no classes; "
                "set model.num_classes"
            )
        return ResNet(width=config.width, blocks=config.blocks, num_classes=classes)
    return GPT(vocab_size=config.vocab_size, seq_len=config.seq_len, dim=config.dim,
               layers=config.layers, heads=config.heads)  # fmt: skip
