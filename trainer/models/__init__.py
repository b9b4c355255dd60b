"""Models: the reference ones — a small ResNet for image shards, a small GPT for token
shards — and the way in for your own (``model.name = "package.module:function"``).

Both reference models are ``StagedModel``s — an optional input layer, a ``ModuleDict`` of
blocks, an optional output layer — so pipeline parallelism can cut them between blocks
without changing the parameter names (checkpoints then load into any layout), and activation
checkpointing and FSDP can wrap block by block. Any other ``nn.Module`` trains under DDP and
FSDP2 (``ModelSpec`` says how to wrap it, and how to split it for tensor parallelism).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from trainer.config import ModelConfig
from trainer.models.base import StagedModel
from trainer.models.cnn import ResNet
from trainer.models.gpt import GPT
from trainer.models.init import copy_values, init_weights
from trainer.models.spec import ModelSpec, as_spec, own_values
from trainer.registry import Registry, is_import_path

__all__ = [
    "GPT",
    "MODELS",
    "ModelSpec",
    "ResNet",
    "StagedModel",
    "build_model",
    "build_spec",
    "copy_values",
    "init_weights",
    "own_values",
]

ModelFactory = Callable[..., object]
MODELS: Registry[ModelFactory] = Registry("model", "model.name")
"""name → factory(config: ModelConfig, *, num_classes: int) → nn.Module | ModelSpec."""


@MODELS.register("cnn")
def _cnn(config: ModelConfig, *, num_classes: int) -> ModelSpec:
    classes = config.cnn.num_classes or num_classes
    if classes < 2:
        raise ValueError(
            "model.cnn.num_classes is 0 and the dataset's index records no classes; "
            "set model.cnn.num_classes"
        )
    with torch.device("meta"):
        module = ResNet(width=config.cnn.width, blocks=config.cnn.blocks, num_classes=classes)
    return ModelSpec(module=module, init=init_weights, task="classify")


@MODELS.register("gpt")
def _gpt(config: ModelConfig, *, num_classes: int) -> ModelSpec:
    with torch.device("meta"):
        gpt = config.gpt
        module = GPT(vocab_size=gpt.vocab_size, seq_len=gpt.seq_len, dim=gpt.dim,
                     layers=gpt.layers, heads=gpt.heads)  # fmt: skip
    return ModelSpec(module=module, init=init_weights, task="lm", heads=config.gpt.heads)


def build_spec(config: ModelConfig, *, num_classes: int, seed: int) -> ModelSpec:
    """The configured model as a spec. A function named by import path is called with
    ``model.options`` under ``torch.manual_seed(seed)``, so its layers' own initialisation
    is the same on every rank."""
    factory = MODELS.get(config.name)
    if not is_import_path(config.name):
        return as_spec(factory(config, num_classes=num_classes), setting="model.name")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            built = factory(**config.options)
        except TypeError as error:
            raise ValueError(
                f"model.name = {config.name!r} failed with model.options = {config.options}: "
                f"{error}"
            ) from error
    return as_spec(built, setting=f"model.name = {config.name!r}")


def build_model(config: ModelConfig, *, num_classes: int) -> torch.nn.Module:
    """The configured reference model, on the meta device (materialise with ``to_empty``)."""
    return build_spec(config, num_classes=num_classes, seed=0).module
