"""Dry runs of a parallel layout for a cluster that is not here: one process plays chosen
ranks of a world of any size, one after the other, on torch's fake process group (every
collective returns at once, without data), and for each builds the device mesh, applies
parallelize as the trainer does, and runs one training step on a synthetic batch.

It catches, before a cluster job starts, what only a rank of that job would hit: degrees that
do not divide the world, tensor parallelism that does not divide the heads, more pipeline
stages than blocks, a batch that does not split over the data-parallel ranks and
microbatches, a hierarchical all-reduce whose nodes do not tile the ranks, a compressor on a
layout that cannot take one. It also reports what each played rank holds: its share of the
parameters and the bytes of parameters, gradients and optimizer state.

The losses are meaningless (the fake collectives move no data); the shapes are real. Pipeline
stages other than the first would wait for activations that never come, so with ``pp`` > 1
the step runs on the single-stage ranks only and the others stop after parallelize.
"""

from __future__ import annotations

import contextlib
import multiprocessing
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from trainer.config import Config
from trainer.models import build_spec
from trainer.optim import build_optimizer
from trainer.parallel import build_layout, parallelize
from trainer.step import forward_backward
from trainer.tasks import build_task


@dataclass
class RankReport:
    rank: int
    layout: str
    coordinates: dict[str, int]
    strategy: str
    parameters: int
    """Entries of the parameters this rank holds (its shards and stages)."""
    parameter_bytes: int
    gradient_bytes: int
    optimizer_bytes: int
    stepped: bool
    """Whether a training step ran (see the module note on pipeline stages)."""
    notes: list[str] = field(default_factory=list)


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def _synthetic_batch(config: Config, task: str, rows: int) -> dict[str, Any]:
    """A batch as the loader would deliver it for ``task`` (classify or lm)."""
    generator = torch.Generator().manual_seed(0)
    if task not in ("classify", "lm"):
        raise ValueError(
            f"the dry run makes synthetic batches for train.task = 'classify' or 'lm', not "
            f"{task!r}; set one of them for the dry run if your model takes such batches"
        )
    if task == "classify":
        size = config.data.image_size
        return {
            "image": torch.randint(0, 256, (rows, size, size, 3), dtype=torch.uint8,
                                   generator=generator),
            "label": torch.randint(0, max(config.model.cnn.num_classes, 2), (rows,),
                                   generator=generator),
        }  # fmt: skip
    gpt = config.model.gpt
    tokens = torch.randint(0, gpt.vocab_size, (rows, gpt.seq_len + 1),
                           generator=generator)  # fmt: skip
    return {config.train.lm.token_field: tokens}


def check_batch(config: Config, dp_world: int) -> int:
    """The per-rank batch, or a ValueError naming the settings that do not divide."""
    if config.data.global_batch % dp_world:
        fits = -(-config.data.global_batch // dp_world) * dp_world  # the next multiple up
        raise ValueError(
            f"data.global_batch = {config.data.global_batch} does not split over the "
            f"{dp_world} data-parallel ranks: use a multiple of {dp_world}, e.g. "
            f"--data.global_batch={fits}"
        )
    per_rank = config.data.global_batch // dp_world
    if config.parallel.pp > 1 and per_rank % config.parallel.microbatches:
        raise ValueError(
            f"the per-rank batch {per_rank} does not split into parallel.microbatches = "
            f"{config.parallel.microbatches}"
        )
    return per_rank


def play_rank(config: Config, world_size: int, rank: int) -> RankReport:
    """One rank of a ``world_size``-rank job, on the fake process group."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", rank=rank, world_size=world_size, store=FakeStore())
    try:
        layout = build_layout(config.parallel, rank=rank, world_size=world_size,
                              device_type="cpu")  # fmt: skip
        per_rank = check_batch(config, layout.dp_world)
        classes = config.model.cnn.num_classes or 10
        spec = build_spec(config.model, num_classes=classes, seed=config.train.seed)
        task_name = config.train.task or spec.task
        task = build_task(config, task_name)
        model = parallelize(
            config.model, config.parallel, layout=layout, device=torch.device("cpu"),
            num_classes=classes, seed=config.train.seed,
            activation_checkpointing=config.train.activation_checkpointing,
            compression=config.compression, spec=spec, loss_fn=task.loss,
        )  # fmt: skip
        optimizers = [build_optimizer(config.optim, part.parameters()) for part in model.parts]
        params = [p for part in model.parts for p in part.parameters()]
        stepped = model.schedule is None or (model.first_stage and model.last_stage)
        if stepped:
            inputs, targets = task.split(_synthetic_batch(config, task_name, per_rank),
                                         torch.device("cpu"))  # fmt: skip
            forward_backward(model, inputs, targets, precision=contextlib.nullcontext())
            for optimizer in optimizers:
                optimizer.step()
        state = [_local(value) for optimizer in optimizers for per_param in optimizer.state.values()
                 for value in per_param.values() if torch.is_tensor(value)]  # fmt: skip
        local = [_local(p) for p in params]
        return RankReport(
            rank=rank, layout=layout.describe(), coordinates=layout.coordinates,
            strategy=model.strategy, parameters=sum(t.numel() for t in local),
            parameter_bytes=sum(t.numel() * t.element_size() for t in local),
            gradient_bytes=sum(_local(p.grad).numel() * p.grad.element_size()
                               for p in params if p.grad is not None),
            optimizer_bytes=sum(t.numel() * t.element_size() for t in state),
            stepped=stepped,
        )  # fmt: skip
    finally:
        dist.destroy_process_group()


def play_ranks(config: Config, world_size: int, ranks: list[int]) -> list[RankReport]:
    """``play_rank`` for each rank, each in a forked child: DTensor and FSDP keep caches per
    mesh that a second rank's mesh (equal, but with new process groups) would wrongly hit.
    A rank's error is raised here, as the ValueError/RuntimeError it was, naming the rank."""
    context = multiprocessing.get_context("fork")
    reports = []
    for rank in ranks:
        receive, send = context.Pipe(duplex=False)
        child = context.Process(target=_play_in_child, args=(config, world_size, rank, send))
        child.start()
        send.close()
        try:
            kind, payload = receive.recv()
        except EOFError:
            kind, payload = "error", ("RuntimeError", f"the process playing rank {rank} died")
        child.join()
        if kind == "error":
            name, message = payload
            error = ValueError if name == "ValueError" else RuntimeError
            raise error(f"rank {rank} of {world_size}: {message}")
        reports.append(payload)
    return reports


def _play_in_child(config: Config, world_size: int, rank: int, send: Any) -> None:
    try:
        send.send(("ok", play_rank(config, world_size, rank)))
    except Exception as error:  # reported to the parent, which raises it
        send.send(("error", (type(error).__name__, str(error))))
    finally:
        send.close()


def default_ranks(world_size: int) -> list[int]:
    """The first, last and middle ranks (and the one before the middle): enough to meet every
    pipeline edge, both ends of each mesh dimension and a rank inside."""
    middle = world_size // 2
    return sorted({0, max(middle - 1, 0), middle, world_size - 1})
