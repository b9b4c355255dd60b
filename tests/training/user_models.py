"""Models and tasks a user would write, named by the tests as
``"tests.training.user_models:function"`` (the launcher puts the repository on PYTHONPATH).

``digit_net``: not a StagedModel — a convolutional trunk with BatchNorm (running statistics
in buffers), a custom ``nn.Parameter`` on the root (a learned per-class logit bias scaled by a
learned temperature) and a linear head. ``gpt2``: a Hugging Face GPT-2 from a small
``GPT2Config``, its blocks as FSDP units, returning logits for the ``lm`` task.
``token_net``: a small language model that is no StagedModel, pipelined at the cut points
its spec gives; ``next_token``: next-token prediction with its accuracy logged.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from trainer import ModelSpec, Task
from trainer.tasks import correct


class DigitNet(nn.Module):
    def __init__(self, *, classes: int = 10, width: int = 8) -> None:
        super().__init__()
        self.trunk = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(4),
            nn.Flatten(),
        )
        self.head = nn.Linear(2 * width * 16, classes)
        self.class_bias = nn.Parameter(torch.zeros(classes))
        self.temperature = nn.Parameter(torch.ones(1))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = image.permute(0, 3, 1, 2).float().contiguous().div(127.5).sub(1.0)
        return self.head(self.trunk(x)) * self.temperature + self.class_bias


def digit_net(classes: int = 10, width: int = 8) -> nn.Module:
    return DigitNet(classes=classes, width=width)


def smoothed_classify(smoothing: float = 0.1) -> Task:
    """Classification with a label-smoothed loss (a custom loss), accuracy logged."""

    def split(batch: dict[str, Any], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        return batch["image"].to(device), batch["label"].to(device)

    def loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(output.float(), target, label_smoothing=smoothing)

    return Task(split=split, loss=loss, metrics=correct, train_metrics=True)


class Logits(nn.Module):
    """A Hugging Face causal LM as tokens → logits (the ``lm`` task's contract)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.model(input_ids=tokens).logits
        return logits


def gpt2(vocab_size: int = 64, seq_len: int = 32, dim: int = 32, layers: int = 2,
         heads: int = 4) -> ModelSpec:  # fmt: skip
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.models.gpt2.modeling_gpt2 import GPT2Block

    config = GPT2Config(vocab_size=vocab_size, n_positions=seq_len, n_embd=dim, n_layer=layers,
                        n_head=heads, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # fmt: skip
    return ModelSpec(module=Logits(GPT2LMHeadModel(config)), wrap_classes=(GPT2Block,), task="lm")


class Residual(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.up = nn.Linear(dim, 2 * dim)
        self.down = nn.Linear(2 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(nn.functional.gelu(self.up(self.norm(x))))


class TokenNet(nn.Module):
    """Embedding → residual blocks → norm → head. Its forward skips what a pipeline stage
    does not hold (None children, deleted blocks), as ModelSpec.pp_cut_points asks."""

    def __init__(self, *, vocab_size: int, dim: int, layers: int) -> None:
        super().__init__()
        self.embed: nn.Module | None = nn.Embedding(vocab_size, dim)
        self.layers = nn.ModuleList(Residual(dim) for _ in range(layers))
        self.norm: nn.Module | None = nn.LayerNorm(dim)
        self.head: nn.Module | None = nn.Linear(dim, vocab_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.embed is not None:
            x = self.embed(x)
        for layer in self.layers:
            x = layer(x)
        if self.norm is not None:
            x = self.norm(x)
        if self.head is not None:
            x = self.head(x)
        return x


def token_net(vocab_size: int = 64, dim: int = 32, layers: int = 4,
              cut_points: tuple[str, ...] = ()) -> ModelSpec:  # fmt: skip
    module = TokenNet(vocab_size=vocab_size, dim=dim, layers=layers)
    return ModelSpec(module=module, pp_cut_points=tuple(cut_points), task="lm")


def next_token(field: str = "tokens") -> Task:
    """Next-token prediction over a token field, its training accuracy logged."""

    def split(batch: dict[str, Any], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = batch[field].long().to(device)
        return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()

    return Task(split=split, metrics=correct, train_metrics=True)
