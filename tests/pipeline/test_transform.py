"""User transforms in the loader (dataflow/pipeline/transform.py, decoding.py's transform
step): exact resume with a random transform at the same world size and after 2 ranks → 1,
the thread and process pools giving the same bytes, a transform that raises (raise / skip /
resume), a wrong output type, callables named by path, and the runner's lifetime."""

from __future__ import annotations

import gc
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from dataflow.config import ConfigError
from dataflow.errors import BadSampleError, DataError
from dataflow.pipeline import DataConfig, Loader
from dataflow.pipeline.transform import (
    ThreadTransformRunner,
    TransformOutputError,
    make_transform_runner,
    sample_rng,
)
from dataflow.pipeline.transform_pool import ProcessTransformRunner

from . import user_transforms
from .loader_support import SIZE, assert_resumes_exactly, make, one_epoch, take

NOISY = "pipeline.user_transforms:noisy_crop"


def batches_of(loader: Loader, count: int) -> list[dict[str, Any]]:
    """The next ``count`` batches (into later epochs as needed), every field kept."""
    out: list[dict[str, Any]] = []
    while len(out) < count:
        for batch in loader:
            out.append(batch)
            if len(out) == count:
                break
    return out


def assert_same(got: list[dict[str, Any]], want: list[dict[str, Any]], what: str) -> None:
    assert len(got) == len(want), what
    for number, (have, expected) in enumerate(zip(got, want, strict=True)):
        assert sorted(have) == sorted(expected), f"{what}, batch {number}"
        for name, value in expected.items():
            where = f"{what}, batch {number}, field {name}"
            if isinstance(value, torch.Tensor):
                assert have[name].dtype == value.dtype and torch.equal(have[name], value), where
            elif name == "tokens":
                assert [t.tolist() for t in have[name]] == [t.tolist() for t in value], where
            else:
                assert have[name] == value, where


def test_a_random_transform_resumes_exactly(digits: str) -> None:
    """Keys, pixels and every transformed field (image crop + noise, label, a draw) match an
    uninterrupted run, mid-epoch and across the epoch boundary (28 steps)."""
    assert_resumes_exactly(lambda: make(digits, sample_transform=NOISY),
                           midpoints=[0, 5, 27, 29], n_next=3)  # fmt: skip
    # The fields the helper does not record: the draws and the ragged tokens.
    reference = batches_of(make(digits, sample_transform=NOISY), 8)
    first = make(digits, sample_transform=NOISY)
    batches_of(first, 5)
    state = json.loads(json.dumps(first.state_dict()))
    first.close()
    resumed = make(digits, sample_transform=NOISY)
    resumed.load_state_dict(state)
    assert_same(batches_of(resumed, 3), reference[5:8], "resumed at batch 5")
    resumed.close()
    assert reference[0]["image"].shape == (64, 24, 24, 3)  # the transform's crop
    assert isinstance(reference[0]["tokens"], list)  # ragged: one array per sample


def test_a_random_transform_resumes_exactly_from_two_ranks_on_one(digits: str) -> None:
    """Two ranks run 4 steps and save; one process resumes: the same samples, pixels and
    transformed fields as an uninterrupted one-process run, whose batches are also the two
    ranks' halves side by side (a sample's generator does not depend on the rank)."""
    whole = batches_of(make(digits, sample_transform=NOISY), 7)
    halves = [make(digits, rank=rank, world_size=2, sample_transform=NOISY) for rank in (0, 1)]
    parts = [batches_of(loader, 4) for loader in halves]
    states = [loader.state_dict() for loader in halves]
    for loader in halves:
        loader.close()
    assert states[0] == states[1]
    for step in range(4):
        for name in ("image", "label", "draw"):
            joined = torch.cat([parts[0][step][name], parts[1][step][name]])
            assert torch.equal(joined, whole[step][name]), f"step {step}, {name}"
        assert parts[0][step]["__key__"] + parts[1][step]["__key__"] == whole[step]["__key__"]
    resumed = make(digits, sample_transform=NOISY)
    resumed.load_state_dict(json.loads(json.dumps(states[0])))
    assert_same(batches_of(resumed, 3), whole[4:7], "resumed on 1 rank from 2")
    resumed.close()


def test_the_transform_gets_the_samples_generator(digits: str) -> None:
    """The generator is sample_rng(seed, epoch, sample id): rebuilt here, it gives the draw."""
    loader = make(digits, sample_transform=NOISY, seed=5, shuffle=False, global_batch=8)
    batch = next(iter(loader))
    loader.close()
    # Unshuffled, position p of epoch 0 is sample id p; noisy_crop's 4th draw is `draw`.
    for sample_id, draw in enumerate(batch["draw"].tolist()):
        rng = sample_rng(5, 0, sample_id)
        rng.integers(0, SIZE - 24 + 1), rng.integers(0, SIZE - 24 + 1)
        rng.integers(-8, 9, size=(24, 24, 3), dtype=np.int16)
        rng.random(8)
        rng.integers(0, 3)
        assert draw == rng.random()


def test_the_process_pool_gives_the_thread_pools_bytes(digits: str) -> None:
    threads = batches_of(make(digits, sample_transform=NOISY), 4)
    with_processes = make(digits, sample_transform=NOISY, transform_pool="process",
                          transform_workers=2)  # fmt: skip
    processes = batches_of(with_processes, 4)
    with_processes.close()
    assert_same(processes, threads, "process pool against thread pool")
    python = "pipeline.user_transforms:pure_python_brightness"
    assert_same(
        batches_of(make(digits, sample_transform=python, transform_pool="process"), 2),
        batches_of(make(digits, sample_transform=python), 2),
        "a pure-Python transform",
    )


def test_the_process_pool_lives_as_long_as_the_loader(digits: str) -> None:
    def alive(pid: int) -> bool:
        try:
            return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
        except FileNotFoundError:
            return False

    loader = make(digits, sample_transform=NOISY, transform_pool="process", global_batch=600)
    assert loader.transform_runner is None  # started by the first pass
    one_epoch(loader)
    runner = loader.transform_runner
    assert isinstance(runner, ProcessTransformRunner)
    pids = runner.pids
    assert len(pids) == 2 and all(alive(pid) for pid in pids)  # transform_workers' default
    # Like the decode threads, the workers run data.thread_nice (10) above the loader.
    mine = os.getpriority(os.PRIO_PROCESS, 0)
    assert [os.getpriority(os.PRIO_PROCESS, pid) for pid in pids] == [min(19, mine + 10)] * 2
    one_epoch(loader)  # the next epoch keeps the same pool
    assert loader.transform_runner is runner and runner.pids == pids
    loader.close()
    assert loader.transform_runner is None and not any(alive(pid) for pid in pids)
    one_epoch(loader)  # iterating after close() starts a new pool
    again = loader.transform_runner
    assert isinstance(again, ProcessTransformRunner) and set(again.pids).isdisjoint(pids)
    loader.close()
    assert not any(alive(pid) for pid in again.pids)


def test_a_transform_that_raises_names_shard_key_and_transform(digits: str) -> None:
    loader = make(digits, sample_transform="pipeline.user_transforms:fails_on_sevens",
                  shuffle=False, global_batch=200)  # fmt: skip
    with pytest.raises(BadSampleError) as caught:
        one_epoch(loader)
    error = caught.value
    assert error.key is not None and error.key.startswith("7/")
    assert error.shard is not None and error.shard.endswith(".tar")
    message = str(error)
    assert error.shard in message and repr(error.key) in message
    assert "pipeline.user_transforms:fails_on_sevens" in message
    assert "TransformBroke" in message and "on_bad_sample" in message


def test_a_transform_that_raises_is_skipped_counted_and_resumed(digits: str) -> None:
    def make_loader() -> Loader:
        return make(digits, sample_transform=user_transforms.fails_on_sevens,
                    on_bad_sample="skip", max_skip_fraction=0.2)  # fmt: skip

    loader = make_loader()
    batches = one_epoch(loader)
    sevens = [k for b in batches for k in b.keys if k.startswith("7/")]
    assert sevens == []
    skipped = loader.state_dict()["skipped"]
    assert len(skipped) == loader.metrics()["skipped"] > 150  # 179 sevens minus the last batch's
    assert all(key.startswith("7/") and "fails_on_sevens" in reason for _, key, reason in skipped)
    loader.close()
    assert_resumes_exactly(make_loader, midpoints=[3, 14], n_next=3)


def test_a_wrong_output_type_is_one_error_naming_the_field(digits: str) -> None:
    loader = make(digits, sample_transform="pipeline.user_transforms:returns_a_set",
                  on_bad_sample="skip")  # fmt: skip
    with pytest.raises(TransformOutputError, match=r"field 'labels' as builtins\.set"):
        next(iter(loader))
    loader.close()
    loader = make(digits, sample_transform=user_transforms.returns_a_list)
    with pytest.raises(TransformOutputError, match="returned list, not a dict"):
        next(iter(loader))
    loader.close()


@pytest.mark.parametrize(
    ("key", "spec", "message"),
    [
        ("sample_transform", "pipeline.user_transforms", "expected 'package.module:function'"),
        ("batch_transform", "no_such_module_here:fn", "cannot import module 'no_such_module_here'"),
        ("collate", "pipeline.user_transforms:nope", "has no attribute 'nope'"),
        ("sample_transform", "pipeline.user_transforms:NOT_A_FUNCTION", "names a int"),
    ],
)
def test_a_bad_path_is_a_config_error_at_construction(
    digits: str, key: str, spec: str, message: str
) -> None:
    with pytest.raises(ConfigError, match=f"data.{key} = .*{message}"):
        make(digits, **{key: spec})


def test_callables_given_in_code_and_the_batch_transform(digits: str) -> None:
    loader = make(digits, global_batch=10, collate=user_transforms.samples_as_batch,
                  batch_transform=user_transforms.count_batch)  # fmt: skip
    batch = next(iter(loader))
    loader.close()
    assert batch["count"] == 10 and len(batch["samples"]) == 10
    sample = batch["samples"][0]
    assert sorted(sample) == ["__key__", "image", "label"]
    assert sample["image"].shape == (SIZE, SIZE, 3) and isinstance(sample["label"], int)
    assert batch["__valid__"].tolist() == [True] * 10


def test_transforms_that_drop_the_key_still_leave_the_loaders_record(
    digits: str, tmp_path: Path
) -> None:
    """The loader counts and audits what it delivered from its own record, not from the
    fields a transform chose to return."""
    plain = make(digits, global_batch=10, shuffle=False)
    want = [batch["__key__"] for batch in batches_of(plain, 2)]
    keyless = make(digits, global_batch=10, shuffle=False,
                   sample_transform=user_transforms.without_key)  # fmt: skip
    assert [batch["__key__"] for batch in batches_of(keyless, 2)] == want
    bare = make(digits, global_batch=10, shuffle=False, audit=True, out_dir=str(tmp_path),
                sample_transform=user_transforms.without_key,
                batch_transform=user_transforms.without_bookkeeping)  # fmt: skip
    batches = batches_of(bare, 2)
    bare.close()
    assert [sorted(batch) for batch in batches] == [["image"], ["image"]]
    assert bare.metrics()["samples"] == 20
    audit = (tmp_path / "audit" / "rank-0.tsv").read_text().splitlines()
    assert [line.split("\t")[2] for line in audit] == [key for keys in want for key in keys]


def test_samples_handed_out_keep_their_pixels_while_later_batches_decode(digits: str) -> None:
    """A collate or transform that keeps a sample's image as it got it holds a view of one
    row of the batch's memory: later batches must not be decoded into that memory."""
    plain = take(make(digits, global_batch=16, shuffle=False), 12)
    for options in ({"collate": user_transforms.samples_as_batch},
                    {"collate": user_transforms.samples_as_batch,
                     "sample_transform": user_transforms.identity}):  # fmt: skip
        held = []
        for batch in batches_of(make(digits, global_batch=16, shuffle=False, **options), 12):
            held.append(batch)
            gc.collect()  # what the pool watches goes as soon as nothing refers to it
        for want, got in zip(plain, held, strict=True):
            images = np.stack([sample["image"] for sample in got["samples"]])
            assert np.array_equal(images, want.images.numpy()), options


def test_the_runner_factory() -> None:
    runner = make_transform_runner(NOISY, pool="thread", workers=1)
    assert isinstance(runner, ThreadTransformRunner)
    assert runner.name == "pipeline.user_transforms:noisy_crop"
    with pytest.raises(ConfigError, match="transform_pool = 'gpu'"):
        make_transform_runner(NOISY, pool="gpu", workers=1)


def test_dali_refuses_what_it_cannot_run(digits: str) -> None:
    with pytest.raises(DataError, match=r"image_pipeline = 'decode' needs data\.decode_backend"):
        Loader(DataConfig(url=digits, decode_backend="dali", image_pipeline="decode"))
    with pytest.raises(DataError, match=r"decode_device = 'gpu' leaves DALI's images on the GPU"):
        Loader(DataConfig(url=digits, decode_backend="dali", decode_device="gpu"),
               sample_transform=user_transforms.identity)  # fmt: skip


def test_eval_crops_reach_the_transform(photos: str) -> None:
    """With "eval" the transform receives the centre crop: the fast path's pixels."""
    plain = take(make(photos, global_batch=12, image_pipeline="eval", shuffle=False), 5)
    seen = batches_of(make(photos, global_batch=12, image_pipeline="eval", shuffle=False,
                           collate=user_transforms.samples_as_batch), 5)  # fmt: skip
    for want, got in zip(plain, seen, strict=True):
        images = np.stack([s["image"] for s in got["samples"]])
        assert np.array_equal(images, want.images.numpy())


def test_a_transform_runs_on_dalis_output(photos: str) -> None:
    pytest.importorskip("nvidia.dali")

    def run(**options: Any) -> list[dict[str, Any]]:
        loader = make(photos, global_batch=12, decode_backend="dali", decode_workers=1, **options)
        batches = batches_of(loader, 3)
        loader.close()
        return batches

    plain = run()
    transformed = run(collate=user_transforms.samples_as_batch)
    for want, got in zip(plain, transformed, strict=True):
        images = np.stack([s["image"] for s in got["samples"]])
        assert np.array_equal(images, want["image"].numpy())
    noisy = run(sample_transform=NOISY)
    again = run(sample_transform=NOISY)
    assert_same(again, noisy, "DALI + transform, twice")
    assert noisy[0]["image"].shape == (12, 24, 24, 3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_transformed_batches_reach_the_gpu(digits: str) -> None:  # pragma: no cover - GPU only
    """data.device = "cuda": the transform path (collated on the host, then copied on the side
    stream) and the fast path (pinned batch arrays) deliver the CPU run's batches."""
    for options in (
        {"sample_transform": NOISY, "collate": "dataflow.pipeline.collate:pad_collate",
         "batch_transform": user_transforms.count_batch},
        {},
    ):  # fmt: skip
        on_cpu = batches_of(make(digits, **options), 4)
        loader = make(digits, device="cuda", **options)
        on_gpu = batches_of(loader, 4)
        loader.close()
        for number, (cpu, gpu) in enumerate(zip(on_cpu, on_gpu, strict=True)):
            assert sorted(cpu) == sorted(gpu), number
            for name, value in cpu.items():
                if isinstance(value, torch.Tensor):
                    assert gpu[name].is_cuda, (number, name)
                    assert torch.equal(gpu[name].cpu(), value), (number, name)
                elif name == "tokens":
                    assert [t.tolist() for t in gpu[name]] == [t.tolist() for t in value]
                else:
                    assert gpu[name] == value, (number, name)
