"""Transforms a user would write, at module level so that a config names them by path
("pipeline.user_transforms:noisy_crop") and process-pool workers import them."""

from __future__ import annotations

from typing import Any

import numpy as np


def noisy_crop(sample: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    """Draws from rng three ways: a random 24×24 crop, additive noise, a random token drop;
    the label moves by a draw too, so every delivered field depends on the generator."""
    image = sample["image"]
    top, left = rng.integers(0, image.shape[0] - 24 + 1), rng.integers(0, image.shape[1] - 24 + 1)
    crop = image[top : top + 24, left : left + 24].astype(np.int16)
    noise = rng.integers(-8, 9, size=crop.shape, dtype=np.int16)
    sample["image"] = np.clip(crop + noise, 0, 255).astype(np.uint8)
    tokens = np.arange(8, dtype=np.int64) + sample["label"] * 100
    sample["tokens"] = tokens[rng.random(8) > 0.3]  # ragged: a list in the batch
    sample["label"] = sample["label"] + 10 * int(rng.integers(0, 3))
    sample["draw"] = float(rng.random())
    return sample


def identity(sample: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    return sample


def pure_python_brightness(sample: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    """Per-pixel Python work (holds the GIL), the kind a process pool is for."""
    image = sample["image"]
    gain = 0.5 + rng.random()
    flat = image.reshape(-1).tolist()
    sample["image"] = np.asarray([min(255, int(v * gain)) for v in flat], np.uint8).reshape(
        image.shape
    )
    return sample


class TransformBroke(RuntimeError):
    pass


def fails_on_sevens(sample: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    """Raises on the samples of one class (the digits' 7s, the photos' class 7)."""
    if sample["__key__"].startswith(("7/", "class-07/")):
        raise TransformBroke(f"cannot handle {sample['__key__']}")
    return sample


def returns_a_set(sample: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    sample["labels"] = {sample["label"]}
    return sample


def returns_a_list(sample: dict[str, Any], rng: np.random.Generator) -> Any:
    return [sample]


def samples_as_batch(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """A collate that keeps the samples as they are: lets a test see each one."""
    return {"samples": samples, "__key__": [s["__key__"] for s in samples]}


def count_batch(batch: dict[str, Any]) -> dict[str, Any]:
    batch["count"] = len(batch["__key__"])
    return batch


NOT_A_FUNCTION = 3


def without_key(sample: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    """Returns a new dict with the image alone: no ``__key__``."""
    return {"image": sample["image"]}


def without_bookkeeping(batch: dict[str, Any]) -> dict[str, Any]:
    """A batch transform that keeps the images only."""
    return {"image": batch["image"]}
