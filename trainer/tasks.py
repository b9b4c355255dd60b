"""What a batch means to each reference model: (inputs, targets) on the device.

- ``cnn``: the loader's uint8 images (N×H×W×3, normalised inside the model) and labels.
- ``gpt``: each sample holds ``seq_len + 1`` tokens; inputs are the first ``seq_len``,
  targets the last ``seq_len`` (next-token prediction).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from trainer.config import ModelConfig


def split_batch(
    config: ModelConfig, batch: dict[str, Any], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    if config.name == "cnn":
        if "image" not in batch or "label" not in batch:
            raise ValueError(
                f"model.name = 'cnn' needs image and label fields; the batch has {sorted(batch)}"
            )
        return batch["image"].to(device, non_blocking=True), batch["label"].to(device)
    field = config.token_field
    if field not in batch:
        raise ValueError(f"model.token_field {field!r} is not in the batch; it has {sorted(batch)}")
    rows = batch[field]
    tokens = rows if torch.is_tensor(rows) else torch.from_numpy(np.stack(rows).astype(np.int64))
    if tokens.shape[1] != config.seq_len + 1:
        raise ValueError(
            f"samples hold {tokens.shape[1]} tokens; model.seq_len = {config.seq_len} needs "
            f"{config.seq_len + 1} (inputs plus the next token)"
        )
    if int(tokens.max()) >= config.vocab_size or int(tokens.min()) < 0:
        raise ValueError(
            f"token ids span [{int(tokens.min())}, {int(tokens.max())}] but model.vocab_size "
            f"is {config.vocab_size}"
        )
    tokens = tokens.to(device, non_blocking=True)
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
