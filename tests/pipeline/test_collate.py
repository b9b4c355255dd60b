"""The collate stage (dataflow/pipeline/collate.py): the column rule of the default collate,
padding with masks, a user collate and a collate named by path in the loader, and the
fast path's batch equal to the default collate of the samples a transform sees."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dataflow.pipeline.collate import collate_column, default_collate, pad_collate

from . import user_transforms
from .loader_support import assert_same_batches, make, take


def test_the_column_rule() -> None:
    ints = collate_column([1, 2, 3])
    assert isinstance(ints, torch.Tensor) and ints.dtype == torch.int64
    floats = collate_column([0.5, 1.5])
    assert isinstance(floats, torch.Tensor) and floats.dtype == torch.float64
    flags = collate_column([True, False])
    assert isinstance(flags, torch.Tensor) and flags.dtype == torch.bool
    arrays = collate_column([np.ones((2, 3), np.float32), np.zeros((2, 3), np.float32)])
    assert isinstance(arrays, torch.Tensor) and arrays.shape == (2, 2, 3)
    assert arrays.dtype == torch.float32 and arrays[0].sum() == 6
    tensors = collate_column([torch.arange(4), torch.arange(4)])
    assert isinstance(tensors, torch.Tensor) and tensors.shape == (2, 4)
    scalars = collate_column([np.float32(1.5), np.float32(2.5)])
    assert isinstance(scalars, torch.Tensor) and scalars.tolist() == [1.5, 2.5]
    # Lists: text, bytes, ragged arrays, mixed dtypes, a field one sample lacks, mixed kinds.
    assert collate_column(["a", "b"]) == ["a", "b"]
    assert collate_column([b"x", b"y"]) == [b"x", b"y"]
    ragged = [np.arange(3), np.arange(5)]
    assert collate_column(ragged) == ragged
    assert isinstance(collate_column([np.zeros(2, np.int32), np.zeros(2, np.int64)]), list)
    assert collate_column([1, None]) == [1, None]
    assert collate_column([1, 2.5]) == [1, 2.5]
    assert isinstance(collate_column([torch.zeros(2), np.zeros(2)]), list)


def test_default_collate_keeps_every_field() -> None:
    samples = [
        {"__key__": "a", "image": np.zeros((4, 4, 3), np.uint8), "label": 1, "txt": "x"},
        {"__key__": "b", "image": np.ones((4, 4, 3), np.uint8), "label": 2, "extra": {"k": 1}},
    ]
    batch = default_collate(samples)
    assert next(iter(batch)) == "__key__" and batch["__key__"] == ["a", "b"]
    assert batch["image"].shape == (2, 4, 4, 3) and batch["image"].dtype == torch.uint8
    assert batch["label"].tolist() == [1, 2]
    assert batch["txt"] == ["x", None] and batch["extra"] == [None, {"k": 1}]


def test_pad_collate_pads_ragged_arrays_with_a_mask() -> None:
    samples = [
        {"tokens": np.array([1, 2, 3]), "patch": np.ones((2, 3), np.float32), "label": 0},
        {"tokens": np.array([4]), "patch": np.ones((3, 1), np.float32), "label": 1},
    ]
    batch = pad_collate(samples)
    assert batch["tokens"].tolist() == [[1, 2, 3], [4, 0, 0]]
    assert batch["tokens_mask"].tolist() == [[True, True, True], [True, False, False]]
    assert batch["patch"].shape == (2, 3, 3) and batch["patch"].sum() == 9
    assert batch["patch_mask"].sum() == 9 and not batch["patch_mask"][1, :, 1:].any()
    assert batch["label"].tolist() == [0, 1] and "label_mask" not in batch
    # Equal shapes stack without a mask; different ranks or dtypes stay lists.
    equal = pad_collate([{"x": np.zeros(2)}, {"x": np.ones(2)}])
    assert sorted(equal) == ["x"]
    unpaddable = pad_collate([{"x": np.zeros(2)}, {"x": np.zeros((2, 2))}])
    assert isinstance(unpaddable["x"], list) and "x_mask" not in unpaddable


def test_the_default_collate_of_the_samples_is_the_fast_paths_batch(digits: str) -> None:
    """A transform that changes nothing, then the default collate: the same batches, to the
    byte, as the fast path that decodes into one preallocated array."""
    fast = take(make(digits), 4)
    through_samples = take(make(digits, sample_transform="pipeline.user_transforms:identity"), 4)
    assert_same_batches(through_samples, fast, "identity transform + default collate")
    with_collate = take(make(digits, collate="dataflow.pipeline.collate:default_collate"), 4)
    assert_same_batches(with_collate, fast, "default collate named by path")


def test_pad_collate_in_the_loader(digits: str) -> None:
    loader = make(digits, sample_transform="pipeline.user_transforms:noisy_crop",
                  collate="dataflow.pipeline.collate:pad_collate")  # fmt: skip
    batch = next(iter(loader))
    loader.close()
    tokens, mask = batch["tokens"], batch["tokens_mask"]
    assert tokens.shape == mask.shape and tokens.shape[0] == 64 and tokens.shape[1] <= 8
    assert (tokens[~mask] == 0).all() and mask.any(dim=1).all()
    assert batch["image"].shape == (64, 24, 24, 3) and "image_mask" not in batch


def test_a_collate_that_returns_no_dict_is_refused(digits: str) -> None:
    loader = make(digits, collate=lambda samples: samples)
    with pytest.raises(TypeError, match="the collate function returned list, not a dict"):
        next(iter(loader))
    loader.close()
    loader = make(digits, batch_transform=user_transforms.count_batch)
    assert next(iter(loader))["count"] == 64
    loader.close()
