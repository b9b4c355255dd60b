"""Users' own transforms: how they are named, the generator each sample gets, how they run.

A *sample transform* is ``fn(sample: dict, rng: numpy.random.Generator) -> dict``. ``sample``
holds ``__key__`` and the sample's fields, decoded by kind (see dataflow.pipeline.fields);
``rng`` is seeded from (seed, epoch, sample id) alone, so a transform that draws only from it
gives the same output for the same sample in an uninterrupted run, a resumed one, at any
world size and in any worker (thread or process). A *batch transform* is ``fn(batch) ->
batch``, applied after collation; a *collate* is ``fn(samples: list[dict]) -> batch``.

In configs they are named by import path, ``"package.module:function"`` (``load_callable``).

Runners apply a sample transform to a chunk of samples and return, per sample, its output
or a ``TransformFailure`` (the caller applies ``data.on_bad_sample`` with the shard and key,
which it knows and the runner does not). ``ThreadTransformRunner`` runs in the calling
decode thread — right for work that releases the GIL (numpy, OpenCV, the built-in decoders);
``dataflow.pipeline.transform_pool.ProcessTransformRunner`` runs in worker processes and
returns arrays through shared memory — right for pure-Python work. Both deliver the same
bytes. A transform that returns something other than a dict of arrays, tensors, numbers,
strings, bytes, lists or dicts is a programming error, not a bad sample: it raises
``TransformOutputError`` naming the transform and the field whatever the skip policy.
"""

from __future__ import annotations

import importlib
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final, Protocol

import numpy as np
import torch

from dataflow.config import ConfigError
from dataflow.pipeline.config import DataConfig

SampleTransform = Callable[[dict[str, Any], np.random.Generator], dict[str, Any]]
BatchTransform = Callable[[dict[str, Any]], dict[str, Any]]
Collate = Callable[[list[dict[str, Any]]], dict[str, Any]]

SampleSeed = tuple[int, int, int]
"""(seed, epoch, sample id): all a sample's generator depends on."""

_SALT_TRANSFORM: Final = 0x5EED_0003
_UINT64: Final = (1 << 64) - 1

ALLOWED_VALUES: Final = (np.ndarray, np.generic, torch.Tensor, bool, int, float, str, bytes,
                         list, tuple, dict, type(None))  # fmt: skip


def sample_rng(seed: int, epoch: int, sample_id: int) -> np.random.Generator:
    """The generator a sample transform gets: a pure function of (seed, epoch, sample id).

    Salted so that it never repeats the stream of the built-in crop draws."""
    entropy = [_SALT_TRANSFORM, seed & _UINT64, epoch & _UINT64, sample_id & _UINT64]
    return np.random.default_rng(entropy)


def callable_name(fn: Callable[..., Any]) -> str:
    """``module:qualname`` of a function, for messages."""
    module = getattr(fn, "__module__", None) or "?"
    return f"{module}:{getattr(fn, '__qualname__', repr(fn))}"


def load_callable(spec: str, *, setting: str) -> Callable[..., Any]:
    """The function a config names as ``"package.module:function"`` (dotted after the colon
    for attributes of attributes). ``setting`` names the config key in errors."""
    module_name, colon, attribute = spec.partition(":")
    if not colon or not module_name or not attribute:
        raise ConfigError(
            f"{setting} = {spec!r}: expected 'package.module:function' (a module path, a "
            "colon, and the function's name in that module)"
        )
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as error:
        raise ConfigError(
            f"{setting} = {spec!r}: cannot import module {module_name!r} ({error}); is its "
            "package installed, or its folder on PYTHONPATH?"
        ) from error
    for part in attribute.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise ConfigError(
                f"{setting} = {spec!r}: module {module_name!r} has no attribute {attribute!r}"
            ) from None
    if not callable(target):
        raise ConfigError(f"{setting} = {spec!r} names a {type(target).__name__}, not a function")
    return target


class TransformOutputError(TypeError):
    """A transform returned something the pipeline cannot carry (always raised)."""


def check_output(output: object, transform: str) -> dict[str, Any]:
    """``output`` as a sample dict, or ``TransformOutputError`` naming the bad field."""
    if not isinstance(output, dict):
        raise TransformOutputError(
            f"sample_transform {transform} returned {type(output).__name__}, not a dict; "
            "return the sample dict (the one it was given, changed, or a new one)"
        )
    for name, value in output.items():
        if not isinstance(name, str):
            raise TransformOutputError(
                f"sample_transform {transform} returned a field named {name!r} "
                f"({type(name).__name__}); field names must be str"
            )
        if not isinstance(value, ALLOWED_VALUES):
            raise TransformOutputError(
                f"sample_transform {transform} returned field {name!r} as "
                f"{type(value).__module__}.{type(value).__qualname__}; return numpy arrays, "
                "torch tensors, numbers, str, bytes, lists or dicts (e.g. np.asarray(image) "
                "for a PIL image)"
            )
    return output


@dataclass(frozen=True)
class TransformFailure:
    """A sample transform raised on one sample (the caller applies on_bad_sample)."""

    transform: str
    error_type: str
    message: str
    traceback: str

    def describe(self) -> str:
        return f"sample_transform {self.transform} raised {self.error_type}: {self.message}"

    @classmethod
    def from_exception(cls, transform: str, error: BaseException) -> TransformFailure:
        return cls(
            transform=transform,
            error_type=type(error).__name__,
            message=str(error),
            traceback="".join(traceback.format_exception(error)),
        )


class TransformRunner(Protocol):
    """Applies one sample transform to chunks of samples (see the module docstring)."""

    def run(
        self, samples: list[dict[str, Any]], seeds: Sequence[SampleSeed]
    ) -> list[dict[str, Any] | TransformFailure]:
        """Per sample, in order: the checked output, or the failure. May raise
        ``TransformOutputError``; must be safe to call from several threads at once."""
        ...

    def close(self) -> None:
        """Release workers and shared memory; idempotent."""
        ...


class ThreadTransformRunner:
    """Runs the transform in the calling thread (the loader's decode threads)."""

    def __init__(self, transform: SampleTransform) -> None:
        self.transform = transform
        self.name = callable_name(transform)

    def run(
        self, samples: list[dict[str, Any]], seeds: Sequence[SampleSeed]
    ) -> list[dict[str, Any] | TransformFailure]:
        results: list[dict[str, Any] | TransformFailure] = []
        for sample, seed in zip(samples, seeds, strict=True):
            try:
                output = self.transform(sample, sample_rng(*seed))
            except Exception as error:  # the user's code: any exception is this sample's
                results.append(TransformFailure.from_exception(self.name, error))
                continue
            results.append(check_output(output, self.name))
        return results

    def close(self) -> None:
        pass


def make_transform_runner(
    transform: SampleTransform | str,
    *,
    pool: str,
    workers: int,
    shm_bytes: int = 64 << 20,
    setting: str = "data.sample_transform",
    nice: int = 0,
) -> TransformRunner:
    """The runner for ``data.transform_pool``: "thread" runs in the decode threads,
    "process" in ``workers`` processes (imported only then). ``transform`` is the callable or
    its "module:function" path; a process pool gets the path as given, so its workers import
    the function themselves."""
    if pool == "thread":
        function = (
            load_callable(transform, setting=setting) if isinstance(transform, str) else (transform)
        )
        return ThreadTransformRunner(function)
    if pool == "process":
        from dataflow.pipeline.transform_pool import ProcessTransformRunner

        return ProcessTransformRunner(transform, workers=workers, shm_bytes=shm_bytes, nice=nice)
    raise ConfigError(f"data.transform_pool = {pool!r}: choose 'thread' or 'process'")


@dataclass(frozen=True)
class UserCode:
    """The user's callables of one loader: given to the Loader, else named in the config."""

    sample_transform: SampleTransform | str | None
    """The callable, or its path (a process pool's workers import it by that)."""
    batch_transform: BatchTransform | None
    collate: Collate | None

    @classmethod
    def resolve(
        cls,
        config: DataConfig,
        *,
        sample_transform: SampleTransform | None,
        batch_transform: BatchTransform | None,
        collate: Collate | None,
    ) -> UserCode:
        """A callable given in code wins over the config's path; a bad path fails here,
        at construction, naming its key, not at the first batch."""
        if sample_transform is None and config.sample_transform:
            load_callable(config.sample_transform, setting="data.sample_transform")
        if batch_transform is None and config.batch_transform:
            batch_transform = load_callable(config.batch_transform, setting="data.batch_transform")
        if collate is None and config.collate:
            collate = load_callable(config.collate, setting="data.collate")
        return cls(sample_transform or config.sample_transform or None, batch_transform, collate)
