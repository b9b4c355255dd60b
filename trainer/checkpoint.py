"""Checkpoints with torch.distributed.checkpoint (DCP): atomic, resharding, optionally async.

A checkpoint is a directory ``{dir}/step-NNNNNNNN/`` holding

- the DCP shards and ``.metadata`` of ``{"model": …, "optim": …}`` — taken with
  ``get_state_dict`` so names are the unwrapped model's, whatever DDP/FSDP/TP/PP did; DCP
  stores each shard once with its global offsets, so a run at another world size (or
  layout) loads it and reshards on the fly;
- ``train_state.json``: step, loader position (epoch, batches delivered, skipped samples
  of every rank), the config and layout it was written by;
- ``rng/rank-R.json``: each rank's torch RNG state (restored when the world size is the same);
- state that differs from rank to rank, inside DCP under ``<name>.rankR.*``: with
  ``[compression]`` the compressor's (error-feedback residuals and PowerSGD's Q per
  parameter, step counts) under ``compression``; with gossip or local SGD each rank's own
  parameters and optimizer tensors under ``decentral``. Restored as saved when the world
  size is the same, as the RNG is; at another, each rank takes the mean state of the saved
  ranks that held its place (``StateAverage``).

Everything outside DCP is JSON: nothing is unpickled on resume.

Atomic: every rank writes into ``step-NNNNNNNN.partial/``; DCP's coordinator (rank 0)
writes ``.metadata`` only after all ranks' writes returned, and then renames the directory
to its final name. A crash at any moment leaves either a ``.partial`` directory, which is
never resumed from (and is deleted by the next run), or a complete checkpoint.

Async (``checkpoint.async_save``): DCP stages the state to CPU memory (a copy), returns, and
writes on a background thread while training continues, coordinating over a process group
of its own (so its collectives never interleave with the training's); the rename happens
as soon as the write completes. At most one save is in flight: the next one first waits.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import re
import shutil
import threading
import time
from concurrent.futures import Future
from typing import Any, Protocol

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from trainer.compression import StateAverage
from trainer.config import CheckpointConfig

log = logging.getLogger(__name__)


class RankState(Protocol):
    """State that differs from rank to rank, saved per rank (see the module note)."""

    place: torch.Tensor
    """Ranks with equal places can stand in for each other at another world size."""

    def state_dict(self) -> dict[str, torch.Tensor]: ...

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None: ...


_NAME = re.compile(r"^step-(\d{8})$")
_PARTIAL = ".partial"
TRAIN_STATE = "train_state.json"
_OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True, strict=False)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def complete_checkpoints(directory: str) -> list[tuple[int, str]]:
    """(step, path) of every complete checkpoint in ``directory``, oldest first."""
    if not os.path.isdir(directory):
        return []
    found = []
    for name in os.listdir(directory):
        match = _NAME.match(name)
        path = os.path.join(directory, name)
        if (
            match
            and os.path.exists(os.path.join(path, ".metadata"))
            and os.path.exists(os.path.join(path, TRAIN_STATE))
        ):
            found.append((int(match.group(1)), path))
    return sorted(found)


class Checkpointer:
    """Save and restore model parts, their optimizers, the loader position and RNG."""

    def __init__(
        self,
        config: CheckpointConfig,
        directory: str,
        *,
        parts: list[nn.Module],
        optimizers: list[torch.optim.Optimizer],
        rank: int,
        world_size: int,
        rank_states: dict[str, RankState] | None = None,
    ) -> None:
        self.config = config
        self.rank_states = rank_states or {}
        """name → an object whose state differs per rank (compressor, decentralized sync)."""
        self.directory = directory
        self.parts = parts
        self.optimizers = optimizers
        self.rank = rank
        self.world_size = world_size
        self._pending: Future[Any] | None = None
        self._finished = threading.Event()
        self._async_group = None
        if config.async_save and _distributed():
            self._async_group = dist.new_group(backend="gloo")
        self.saves: list[dict[str, Any]] = []
        if rank == 0:
            os.makedirs(directory, exist_ok=True)
            for name in os.listdir(directory):
                if name.endswith(_PARTIAL):  # a save that a crash interrupted
                    shutil.rmtree(os.path.join(directory, name), ignore_errors=True)
        if _distributed():
            dist.barrier()

    # -----------------------------------------------------------------------------------------
    # State

    def _state(self) -> dict[str, Any]:
        model: dict[str, Any] = {}
        optim: dict[str, Any] = {}
        for part, optimizer in zip(self.parts, self.optimizers, strict=True):
            model.update(get_model_state_dict(part, options=_OPTIONS))
            optim.update(get_optimizer_state_dict(part, optimizer, options=_OPTIONS))
        state: dict[str, Any] = {"model": model, "optim": optim}
        for name, holder in self.rank_states.items():
            state[name] = {f"rank{self.rank}": holder.state_dict()}
        return state

    def latest(self) -> str | None:
        found = complete_checkpoints(self.directory)
        return found[-1][1] if found else None

    # -----------------------------------------------------------------------------------------
    # Save

    def save(self, step: int, train_state: dict[str, Any]) -> None:
        """Save at ``step``; ``train_state`` (JSON-able) must be the same on every rank."""
        self.wait()
        started = time.perf_counter()
        final = os.path.join(self.directory, f"step-{step:08d}")
        partial = final + _PARTIAL
        os.makedirs(os.path.join(partial, "rng"), exist_ok=True)
        rng = base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()
        _write_json(os.path.join(partial, "rng", f"rank-{self.rank}.json"), {"torch": rng})
        if self.rank == 0:
            _write_json(os.path.join(partial, TRAIN_STATE), train_state)
        state = self._state()

        def finish() -> None:
            if self.rank == 0:
                os.replace(partial, final)
                _fsync_directory(self.directory)
                self._prune()
            self.saves.append({"step": step, "seconds": time.perf_counter() - started})

        if self._async_group is not None:
            self._finished.clear()
            pending = dcp.async_save(state, checkpoint_id=partial, process_group=self._async_group)
            assert isinstance(pending, Future), "DCP's thread checkpointer returns a Future"
            self._pending = pending

            def done(future: Future[Any]) -> None:
                try:
                    if future.exception() is None:
                        finish()
                finally:
                    self._finished.set()

            pending.add_done_callback(done)
        else:
            dcp.save(state, checkpoint_id=partial, no_dist=not _distributed())
            finish()
        blocked = time.perf_counter() - started
        log.info("checkpoint step %d: %s (%.2f s blocking)", step, final, blocked)

    def wait(self) -> None:
        """Finish an async save in flight, if any."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()  # raises what the background save raised
            self._finished.wait()

    def _prune(self) -> None:
        for _, path in complete_checkpoints(self.directory)[: -self.config.keep]:
            shutil.rmtree(path, ignore_errors=True)

    # -----------------------------------------------------------------------------------------
    # Load

    def load(self, path: str) -> dict[str, Any]:
        """Restore model parts, optimizers and (same world size) RNG; returns train_state."""
        with open(os.path.join(path, TRAIN_STATE), encoding="utf-8") as handle:
            train_state: dict[str, Any] = json.load(handle)
        state = self._state()
        same_world = train_state.get("world_size") == self.world_size
        for name in self.rank_states:
            del state[name]
            saved = self._saved(path, name, self.rank) if same_world else {}
            if saved:
                state[name] = {f"rank{self.rank}": saved}
        dcp.load(state, checkpoint_id=path, no_dist=not _distributed())
        for part, optimizer in zip(self.parts, self.optimizers, strict=True):
            set_model_state_dict(part, state["model"], options=_OPTIONS)
            set_optimizer_state_dict(part, optimizer, state["optim"], options=_OPTIONS)
        for name, holder in self.rank_states.items():
            if name in state:
                holder.load_state_dict(state[name][f"rank{self.rank}"])
            else:
                self._load_averaged(path, name, holder)
        rng_path = os.path.join(path, "rng", f"rank-{self.rank}.json")
        if same_world and os.path.exists(rng_path):
            with open(rng_path, encoding="utf-8") as handle:
                raw = base64.b64decode(json.load(handle)["torch"])
            torch.set_rng_state(torch.frombuffer(bytearray(raw), dtype=torch.uint8))
        return train_state

    def _saved(self, path: str, name: str, rank: int) -> dict[str, torch.Tensor]:
        """Empty tensors for rank ``rank``'s saved ``name`` state, shaped as recorded."""
        prefix = f"{name}.rank{rank}."
        metadata = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
        return {
            key[len(prefix) :]: torch.empty(entry.size, dtype=entry.properties.dtype)
            for key, entry in metadata.items()
            if key.startswith(prefix) and isinstance(entry, TensorStorageMetadata)
        }

    def _load_averaged(self, path: str, name: str, holder: RankState) -> None:
        """At another world size: the mean state of the saved ranks that held this rank's
        place (the same pieces of the parameters), read one saved rank at a time so memory
        stays at two states. Every rank makes the same sequence of (collective) DCP loads."""
        metadata = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
        saved_ranks = sorted(
            int(key.split(".")[1][len("rank") :])
            for key in metadata
            if key.startswith(f"{name}.rank") and key.endswith(".place")
        )
        places = {f"rank{r}": {"place": torch.zeros(4, dtype=torch.int64)} for r in saved_ranks}
        if places:
            dcp.load({name: places}, checkpoint_id=path, no_dist=not _distributed())
        average, used = StateAverage(), []
        for r in saved_ranks:
            wanted = {}
            if torch.equal(places[f"rank{r}"]["place"], holder.place):
                wanted = self._saved(path, name, r)
                used.append(r)
            dcp.load({name: {f"rank{r}": wanted}}, checkpoint_id=path,
                     no_dist=not _distributed())  # fmt: skip
            if wanted:
                average.add(wanted)
        if used:
            holder.load_state_dict(average.result())
            log.info("%s state: the mean of saved ranks %s (the world size changed)", name,
                     used)  # fmt: skip
        else:
            log.info("%s state starts afresh: no saved rank held this rank's place", name)


def _write_json(path: str, value: Any) -> None:
    temporary = f"{path}.tmp"
    with open(temporary, "w", encoding="utf-8") as handle:
        json.dump(value, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def _fsync_directory(path: str) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
