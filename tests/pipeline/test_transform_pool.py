"""ProcessTransformRunner: the same outputs as ThreadTransformRunner from worker processes,
arrays through shared memory; failures, wrong outputs, dead workers, concurrent callers,
segments that are too small, and nothing left in /dev/shm or the process table.

The transforms are module-level functions of this file: the workers import them by name."""

from __future__ import annotations

import ctypes
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from dataflow.pipeline.transform import (
    SampleSeed,
    ThreadTransformRunner,
    TransformFailure,
    TransformOutputError,
)
from dataflow.pipeline.transform_pool import (
    SHM_PREFIX,
    ProcessTransformRunner,
    TransformWorkerError,
)

from .loader_support import make

REPO = Path(__file__).resolve().parents[2]
SHM = Path("/dev/shm")

# ---------------------------------------------------------------------------------------------
# Transforms (module level: workers import them)


def augment(sample: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    """Draws from rng, returns strided views, its inputs unchanged, new dtypes and types."""
    out: dict[str, Any] = {}
    for name, value in sample.items():
        if isinstance(value, np.ndarray) and value.ndim >= 1 and value.dtype.kind in "iuf":
            out[name] = value[::-1]  # a strided view of the input
            out[name + ".scaled"] = (value * rng.uniform(0.5, 2.0)).astype(np.float32)
        elif isinstance(value, torch.Tensor):
            out[name] = value.flip(0) if value.ndim else value
            out[name + ".noise"] = value.to(torch.float32) + float(rng.normal())
        else:
            out[name] = value  # as given: str, bytes, lists, dicts, scalars, other arrays
    out["draw"] = int(rng.integers(1 << 30))
    out["draws"] = [float(x) for x in rng.random(3)]
    out["nested"] = {"mask": rng.random((4, 5)) > 0.5, "pair": (np.float64(rng.random()), "x")}
    out["bf16"] = torch.from_numpy(rng.random(6, dtype=np.float32)).to(torch.bfloat16).view(2, 3)
    return out


def raise_on_odd(sample: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    if int(sample["__key__"]) % 2:
        raise ValueError(f"odd key {sample['__key__']}")
    return {"__key__": sample["__key__"], "value": rng.random(2)}


def return_list(sample: dict[str, Any], rng: np.random.Generator) -> list[Any]:
    return [sample]


def return_set_field(sample: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    return {**sample, "labels": {1, 2}}


def crash_on_key_3(sample: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    if sample["__key__"] == "3":
        ctypes.string_at(0)  # a segfault, as native code in a transform may do
    return sample


def expand(sample: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    """Outputs 8× its input (float64 from uint8): outputs outgrow the segment."""
    return {
        "__key__": sample["__key__"],
        "image": sample["image"].astype(np.float64) + rng.random(),
    }


def slow_identity(sample: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    time.sleep(0.2)
    return sample


def _unavailable() -> None:
    raise RuntimeError("this transform needs a licence server the workers cannot reach")


class LoadsOnlyHere:
    """A callable object whose unpickling fails: as a transform whose state cannot be
    rebuilt in a worker process."""

    def __call__(self, sample: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        return sample

    def __reduce__(self) -> tuple[Any, ...]:
        return (_unavailable, ())


# ---------------------------------------------------------------------------------------------
# Helpers


def random_sample(rng: np.random.Generator, number: int) -> dict[str, Any]:
    """A sample with arrays of several dtypes, shapes and layouts, tensors, str, bytes, ints,
    floats, None and nested lists and dicts."""
    image = rng.integers(0, 256, (int(rng.integers(1, 40)), int(rng.integers(1, 40)), 3), np.uint8)
    read_only = rng.random(7).astype(np.float32)
    read_only.flags.writeable = False
    return {
        "__key__": str(number),
        "image": image,
        "crop": image[1:, ::2],  # not contiguous
        "mask": rng.random((5, 6)) > 0.5,
        "tokens": rng.integers(-(1 << 40), 1 << 40, int(rng.integers(0, 50))),
        "pcm": rng.standard_normal(int(rng.integers(1, 3000))).astype(np.float32),
        "be": np.arange(5, dtype=">i4"),
        "complex": (rng.random(3) + 1j * rng.random(3)).astype(np.complex64),
        "scalar_array": np.array(rng.random()),
        "empty": np.zeros((0, 4), np.int16),
        "read_only": read_only,
        "objects": np.array([{"a": 1}, None], dtype=object),
        "tensor": torch.from_numpy(rng.random((3, 4))).t(),  # not contiguous
        "tensor_int": torch.arange(int(rng.integers(1, 9))),
        "tensor_scalar": torch.tensor(float(rng.random())),
        "txt": "caption " * int(rng.integers(0, 5)),
        "cls": int(rng.integers(10)),
        "ratio": float(rng.random()),
        "none": None,
        "small": bytes(rng.integers(0, 256, 10, np.uint8)),
        "raw": bytes(rng.integers(0, 256, 9000, np.uint8)),
        "json": {"boxes": [[1, 2, 3, 4], [5, 6, 7, 8]], "tags": ["a", "b"], "score": 0.5},
    }


def seeds_for(samples: list[dict[str, Any]], epoch: int = 0) -> list[SampleSeed]:
    return [(7, epoch, int(sample["__key__"])) for sample in samples]


def assert_same(process_value: Any, thread_value: Any, where: str = "") -> None:
    """Same types, dtypes, shapes and bytes; the process pool's arrays are C-contiguous."""
    if isinstance(thread_value, np.ndarray) and not thread_value.dtype.hasobject:
        assert type(process_value) is np.ndarray, where
        assert process_value.dtype == thread_value.dtype, where
        assert process_value.shape == thread_value.shape, where
        assert process_value.flags.c_contiguous and process_value.flags.writeable, where
        assert process_value.tobytes() == thread_value.tobytes(), where
    elif isinstance(thread_value, torch.Tensor):
        assert type(process_value) is torch.Tensor, where
        assert process_value.dtype == thread_value.dtype, where
        assert process_value.shape == thread_value.shape, where
        assert process_value.is_contiguous(), where
        assert torch.equal(process_value, thread_value), where
    elif isinstance(thread_value, dict):
        assert type(process_value) is dict and list(process_value) == list(thread_value), where
        for name in thread_value:
            assert_same(process_value[name], thread_value[name], f"{where}.{name}")
    elif isinstance(thread_value, list | tuple):
        assert type(process_value) is type(thread_value), where
        assert len(process_value) == len(thread_value), where
        for i, (p, t) in enumerate(zip(process_value, thread_value, strict=True)):
            assert_same(p, t, f"{where}[{i}]")
    elif isinstance(thread_value, np.ndarray):  # object arrays: pickled copies
        assert process_value.dtype == thread_value.dtype, where
        assert process_value.tolist() == thread_value.tolist(), where
    else:
        assert type(process_value) is type(thread_value), where
        assert process_value == thread_value, where


def segments_of(pid: int) -> set[str]:
    return {p.name for p in SHM.glob(f"{SHM_PREFIX}{pid}-*")}


def wait_until(condition: Callable[[], bool], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.fixture(scope="module")
def pool() -> Any:
    """Two workers running ``augment``, shared by the tests that only call run()."""
    with ProcessTransformRunner(augment, workers=2) as runner:
        yield runner


# ---------------------------------------------------------------------------------------------
# Outputs


def test_same_outputs_as_the_thread_runner(pool: ProcessTransformRunner) -> None:
    rng = np.random.default_rng(0)
    samples = [random_sample(rng, number) for number in range(40)]
    expected = ThreadTransformRunner(augment).run(samples, seeds_for(samples))
    for start in range(0, 40, 10):  # chunks of 10, as decode threads send them
        chunk = samples[start : start + 10]
        got = pool.run(chunk, seeds_for(chunk))
        assert_same(got, expected[start : start + 10])
    assert pool.pickled_samples == 0


def test_outputs_depend_on_the_seed_alone() -> None:
    rng = np.random.default_rng(1)
    samples = [random_sample(rng, number) for number in range(12)]
    with ProcessTransformRunner("pipeline.test_transform_pool:augment", workers=1) as one:
        whole = one.run(samples, seeds_for(samples))
        again = one.run(samples, seeds_for(samples))
        next_epoch = one.run(samples, seeds_for(samples, epoch=1))
    with ProcessTransformRunner(augment, workers=2, shm_bytes=32 << 10) as small:
        in_pieces = small.run(samples[:5], seeds_for(samples[:5]))
        in_pieces += small.run(samples[5:], seeds_for(samples[5:]))
    assert_same(again, whole)
    assert_same(in_pieces, whole)
    assert [s["draw"] for s in next_epoch] != [s["draw"] for s in whole]


def test_transform_errors_come_back_per_sample() -> None:
    samples: list[dict[str, Any]] = [{"__key__": str(n)} for n in range(6)]
    expected = ThreadTransformRunner(raise_on_odd).run(samples, seeds_for(samples))
    with ProcessTransformRunner(raise_on_odd, workers=1) as runner:
        got = runner.run(samples, seeds_for(samples))
    for number, (result, reference) in enumerate(zip(got, expected, strict=True)):
        if number % 2:
            assert isinstance(result, TransformFailure) and isinstance(reference, TransformFailure)
            assert (result.transform, result.error_type, result.message) == (
                reference.transform,
                "ValueError",
                f"odd key {number}",
            )
            assert "raise_on_odd" in result.traceback  # the worker's frames
            assert result.describe() == reference.describe()
        else:
            assert_same(result, reference)


@pytest.mark.parametrize(
    ("transform", "field"),
    [(return_list, "returned list, not a dict"), (return_set_field, "'labels'")],
)
def test_a_wrong_output_type_raises_in_the_caller(
    transform: Callable[..., Any], field: str
) -> None:
    samples: list[dict[str, Any]] = [{"__key__": "0", "image": np.zeros((2, 2), np.uint8)}]
    with pytest.raises(TransformOutputError) as thread_error:
        ThreadTransformRunner(transform).run(samples, seeds_for(samples))
    with ProcessTransformRunner(transform, workers=1) as runner:
        with pytest.raises(TransformOutputError, match=field) as process_error:
            runner.run(samples, seeds_for(samples))
        assert str(process_error.value) == str(thread_error.value)
        with pytest.raises(TransformOutputError):  # the worker carries on
            runner.run(samples, seeds_for(samples))


def local_transforms() -> list[Callable[..., Any]]:
    def inner(sample: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        return sample

    return [lambda sample, rng: sample, inner]


@pytest.mark.parametrize("transform", local_transforms(), ids=["lambda", "local function"])
def test_a_transform_workers_cannot_import_is_refused(transform: Callable[..., Any]) -> None:
    before = segments_of(os.getpid())
    with pytest.raises(TypeError, match=r'top level of a module.*data\.transform_pool = "thread"'):
        ProcessTransformRunner(transform, workers=1)
    assert segments_of(os.getpid()) == before


def test_a_bad_transform_name_names_the_setting() -> None:
    with pytest.raises(ValueError, match=r"data\.sample_transform = 'no_such_module:fn'"):
        ProcessTransformRunner("no_such_module:fn", workers=1)


def test_a_transform_the_workers_cannot_load_is_an_error_naming_it() -> None:
    samples: list[dict[str, Any]] = [{"__key__": "0"}]
    with (
        ProcessTransformRunner(LoadsOnlyHere(), workers=1) as runner,
        pytest.raises(TransformWorkerError, match=r"could not load it.*licence server"),
    ):
        runner.run(samples, seeds_for(samples))


# ---------------------------------------------------------------------------------------------
# Workers


def test_a_crashed_worker_is_an_error_naming_the_transform_then_replaced() -> None:
    samples: list[dict[str, Any]] = [{"__key__": str(n)} for n in range(5)]
    with ProcessTransformRunner(crash_on_key_3, workers=1) as runner:
        (first,) = runner.pids
        with pytest.raises(
            TransformWorkerError, match=r"crash_on_key_3.*exit code -11 \(SIGSEGV\)"
        ):
            runner.run(samples, seeds_for(samples))
        assert not running(first)
        assert runner.run(samples[:3], seeds_for(samples[:3])) == samples[:3]
        assert runner.pids != [first]


def test_a_killed_worker_ends_the_wait() -> None:
    samples: list[dict[str, Any]] = [{"__key__": str(n)} for n in range(20)]
    with ProcessTransformRunner(slow_identity, workers=1) as runner:
        runner.run(samples[:1], seeds_for(samples[:1]))  # started and ready
        (pid,) = runner.pids
        threading.Timer(0.5, os.kill, (pid, signal.SIGKILL)).start()
        started = time.monotonic()
        with pytest.raises(TransformWorkerError, match=rf"worker process {pid} died.*SIGKILL"):
            runner.run(samples, seeds_for(samples))
        assert time.monotonic() - started < 3.0  # not the 4 s the chunk needs


def test_close_during_a_run_ends_it() -> None:
    samples: list[dict[str, Any]] = [{"__key__": str(n)} for n in range(50)]
    before = segments_of(os.getpid())  # the module's pool has its own
    runner = ProcessTransformRunner(slow_identity, workers=1)
    threading.Timer(0.5, runner.close).start()
    with pytest.raises(TransformWorkerError, match="closed"):
        runner.run(samples, seeds_for(samples))
    with pytest.raises(RuntimeError, match="closed"):
        runner.run(samples, seeds_for(samples))
    assert segments_of(os.getpid()) == before


def test_concurrent_callers_from_four_threads(pool: ProcessTransformRunner) -> None:
    rng = np.random.default_rng(2)
    chunks = [[random_sample(rng, 8 * c + n) for n in range(8)] for c in range(16)]
    expected = [ThreadTransformRunner(augment).run(c, seeds_for(c)) for c in chunks]
    got: dict[int, Any] = {}
    errors: list[BaseException] = []

    def call(thread: int) -> None:
        try:
            for number in range(thread, len(chunks), 4):
                got[number] = pool.run(chunks[number], seeds_for(chunks[number]))
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=call, args=(t,)) for t in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors
    for number, chunk_expected in enumerate(expected):
        assert_same(got[number], chunk_expected, f"chunk {number}")


def test_no_segment_or_process_left_after_close() -> None:
    before = segments_of(os.getpid())  # the module's pool has its own
    runner = ProcessTransformRunner(augment, workers=2)
    rng = np.random.default_rng(3)
    samples = [random_sample(rng, n) for n in range(4)]
    runner.run(samples, seeds_for(samples))
    pids = runner.pids
    # An input and an output segment per worker, named after this process.
    assert len(segments_of(os.getpid()) - before) == 4
    runner.close()
    runner.close()  # idempotent
    assert segments_of(os.getpid()) == before
    assert not any(running(pid) for pid in pids)


def test_chunks_and_samples_larger_than_the_segment(caplog: pytest.LogCaptureFixture) -> None:
    rng = np.random.default_rng(4)
    images = [rng.integers(0, 256, (100, 100, 3), np.uint8) for _ in range(6)]  # 30 KB each
    images[4] = rng.integers(0, 256, (300, 300, 3), np.uint8)  # 270 KB: alone too big
    samples = [{"__key__": str(n), "image": image} for n, image in enumerate(images)]
    expected = ThreadTransformRunner(expand).run(samples, seeds_for(samples))
    with (
        caplog.at_level(logging.WARNING, logger="dataflow.pipeline.transform_pool"),
        ProcessTransformRunner(expand, workers=1, shm_bytes=256 << 10) as runner,
    ):
        got = runner.run(samples, seeds_for(samples))
        assert_same(got, expected)
        # In: sample 4 alone; out: samples 0-3 (240 KB each as float64) one by one, and 4.
        assert runner.pickled_samples == 2
        runner.run(samples, seeds_for(samples))
        assert runner.pickled_samples == 4
    warnings = [r.getMessage() for r in caplog.records if "pickled" in r.getMessage()]
    assert len(warnings) == 1 and "shm_bytes" in warnings[0]


def test_the_loaders_segment_size_setting_reaches_the_pool(
    digits: str, caplog: pytest.LogCaptureFixture
) -> None:
    """data.transform_shm_bytes = 16 KiB: 32×32×3 images in, 24 KiB float64 images out (each
    alone too big): the thread pool's batches all the same, and one warning naming the key."""
    expand_path = "pipeline.test_transform_pool:expand"
    threads = make(digits, sample_transform=expand_path, global_batch=32)
    processes = make(digits, sample_transform=expand_path, global_batch=32,
                     transform_pool="process", transform_shm_bytes="16KiB")  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="dataflow.pipeline.transform_pool"):
        for _, want, got in zip(range(3), threads, processes, strict=False):
            assert list(got) == list(want)
            for name, value in want.items():
                assert_same(got[name], value, name)
        runner = processes.transform_runner
        assert isinstance(runner, ProcessTransformRunner)
        assert runner.shm_bytes == 16 << 10 and runner.pickled_samples >= 3 * 32
    processes.close()
    threads.close()
    warnings = [r.getMessage() for r in caplog.records if "pickled" in r.getMessage()]
    assert len(warnings) == 1 and "data.transform_shm_bytes" in warnings[0]


_KILLED_PARENT = """
import json, sys, time
from dataflow.pipeline.transform_pool import ProcessTransformRunner
runner = ProcessTransformRunner("pipeline.test_transform_pool:slow_identity", workers=2)
print(json.dumps(runner.pids), flush=True)
runner.run([{"__key__": "0"}] * 100, [(0, 0, 0)] * 100)  # busy when killed
"""


def test_workers_and_segments_go_with_a_killed_parent() -> None:
    environment = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'tests'}"}
    parent = subprocess.Popen(
        [sys.executable, "-c", _KILLED_PARENT], stdout=subprocess.PIPE, env=environment, text=True
    )
    assert parent.stdout is not None
    pids = json.loads(parent.stdout.readline())
    assert len(pids) == 2 and wait_until(lambda: len(segments_of(parent.pid)) == 4, 10)
    time.sleep(0.3)
    parent.kill()
    parent.wait()
    assert wait_until(lambda: not any(running(pid) for pid in pids), 10)
    # multiprocessing's resource tracker unlinks what the killed process created.
    assert wait_until(lambda: not segments_of(parent.pid), 10)
