"""Gradient compression for data-parallel (DDP) training, as DDP comm hooks.

Each compressor averages one gradient bucket over the data-parallel group with less traffic
than a dense fp32 all-reduce, and counts the bytes it put on the wire per rank (the payload
each rank contributes to its collectives) beside the bytes a dense all-reduce would have:
``take_bytes()`` gives both since the last call, and the trainer logs them per step.

    fp16 / bf16   torch's cast hooks: half the bytes, no state
    powersgd      torch's PowerSGD hook (rank-r P·Qᵀ per gradient matrix, error feedback,
                  warm start); vectors and matrices too small to gain are sent dense
    topk          the ratio·n largest-magnitude entries of (gradient + residual) in each
                  gradient tensor: values and int32 indices all-gathered and summed; the rest
                  stays in the residual
    sign          EF-SignSGD (Karimireddy et al., 2019): one bit per entry, packed, plus one
                  fp32 scale mean|g + e| per block of up to 1,024 entries of one parameter;
                  the residual keeps the rest

DDP settles its buckets during the first step, so every compressor sends the first
``warmup_steps`` steps dense (2 at least). Top-k and sign keep their residuals per parameter
name, so bucket layouts do not matter; ``state_dict()`` holds this rank's state for the
checkpoint, restored when the world size is unchanged (a residual belongs to one rank's share
of the data; another world size starts afresh). PowerSGD's residuals and P, Q live per bucket
inside torch's hook: only its step counters are saved (see PowerSGD.state_dict).
"""

from __future__ import annotations

import threading
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as powersgd

from trainer.config import CompressionConfig

Future = torch.futures.Future


class Compressor:
    """A DDP comm hook (``hook``) that averages a bucket and counts its bytes."""

    name = "none"

    def __init__(self, warmup_steps: int = 0) -> None:
        self.warmup_steps = warmup_steps
        self.steps = 0
        self._sent = 0
        self._dense = 0
        self._lock = threading.Lock()

    def count(self, sent: int, dense: int) -> None:
        with self._lock:
            self._sent += sent
            self._dense += dense

    def take_bytes(self) -> tuple[int, int]:
        """(bytes sent, bytes a dense fp32 all-reduce would have sent) since the last call."""
        with self._lock:
            taken = (self._sent, self._dense)
            self._sent = self._dense = 0
        return taken

    def name_parameters(self, module: torch.nn.Module) -> None:
        """Learn the parameters' names (before DDP wraps ``module``), for per-name state."""

    def state_dict(self) -> dict[str, torch.Tensor]:
        """This rank's state (error feedback differs per rank), as tensors for DCP."""
        return {"steps": torch.tensor(self.steps)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.steps = int(state["steps"])

    def hook(self, group: dist.ProcessGroup, bucket: dist.GradBucket) -> Future[torch.Tensor]:
        buffer = bucket.buffer()
        dense = buffer.numel() * 4
        if self.steps < self.warmup_steps:
            future = default_hooks.allreduce_hook(group, bucket)
            self.count(dense, dense)
        else:
            future = self.compress(group, bucket)
        if bucket.is_last():
            self.steps += 1
        return future

    def compress(self, group: dist.ProcessGroup, bucket: dist.GradBucket) -> Future[torch.Tensor]:
        dense = bucket.buffer().numel() * 4
        self.count(dense, dense)
        return default_hooks.allreduce_hook(group, bucket)


# DDP checks a hook's annotations itself; under `from __future__ import annotations` they
# would be strings, and it would refuse the hook.
Compressor.hook.__annotations__["bucket"] = dist.GradBucket
Compressor.hook.__annotations__["return"] = torch.futures.Future[torch.Tensor]


class Cast(Compressor):
    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        self.name = "fp16" if dtype == torch.float16 else "bf16"
        self._hook = (default_hooks.fp16_compress_hook if dtype == torch.float16
                      else default_hooks.bf16_compress_hook)  # fmt: skip

    def compress(self, group: dist.ProcessGroup, bucket: dist.GradBucket) -> Future[torch.Tensor]:
        numel = bucket.buffer().numel()
        self.count(numel * 2, numel * 4)
        return self._hook(group, bucket)


class PowerSGD(Compressor):
    name = "powersgd"

    def __init__(self, group: dist.ProcessGroup, *, rank: int, start_step: int,
                 warm_start: bool) -> None:  # fmt: skip
        super().__init__()  # PowerSGDState runs its own dense warm-up steps
        self.state = powersgd.PowerSGDState(
            process_group=group, matrix_approximation_rank=rank, start_powerSGD_iter=start_step,
            use_error_feedback=True, warm_start=warm_start, random_seed=0,
        )  # fmt: skip

    def state_dict(self) -> dict[str, torch.Tensor]:
        # Only the counters: torch keeps the residuals and P, Q per *bucket*, and DDP's first
        # step after a restart runs with its initial bucket layout, not the rebuilt one the
        # state was kept in, so they would land on the wrong entries. A resumed run
        # restarts them (zero residual, fresh Q), which error feedback absorbs.
        return {"steps": torch.tensor(self.steps), "iter": torch.tensor(self.state.iter)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.steps, self.state.iter = int(state["steps"]), int(state["iter"])

    def compress(self, group: dist.ProcessGroup, bucket: dist.GradBucket) -> Future[torch.Tensor]:
        numel = bucket.buffer().numel()
        if self.state.iter < self.state.start_powerSGD_iter:
            self.count(numel * 4, numel * 4)
            return powersgd.powerSGD_hook(self.state, bucket)
        before = self.state.total_numel_after_compression
        future = powersgd.powerSGD_hook(self.state, bucket)
        self.count((self.state.total_numel_after_compression - before) * 4, numel * 4)
        return future


class _ErrorFeedback(Compressor):
    """Residual bookkeeping shared by top-k and sign, per parameter (by name): DDP lays its
    buckets out again after the first step — and a restarted run starts from the initial
    layout — so a residual kept per bucket would move to other entries."""

    def __init__(self) -> None:
        super().__init__(warmup_steps=2)
        self.residuals: dict[str, torch.Tensor] = {}
        self.names: dict[int, str] = {}

    def name_parameters(self, module: torch.nn.Module) -> None:
        self.names = {id(param): name for name, param in module.named_parameters()}

    def _names(self, bucket: dist.GradBucket) -> list[str]:
        return [self.names.get(id(p), f"#{id(p)}") for p in bucket.parameters()]

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = super().state_dict()
        state.update({f"residual-{name}": r for name, r in self.residuals.items()})
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        super().load_state_dict(state)
        prefix = "residual-"
        self.residuals = {key[len(prefix) :]: tensor.clone()
                          for key, tensor in state.items() if key.startswith(prefix)}  # fmt: skip

    def corrected(self, bucket: dist.GradBucket) -> torch.Tensor:
        """The bucket's gradients plus each parameter's residual, flat in bucket order."""
        buffer = bucket.buffer()
        parts = []
        for name, gradient in zip(self._names(bucket), bucket.gradients(), strict=True):
            residual = self.residuals.get(name)
            if residual is None or residual.numel() != gradient.numel():
                residual = torch.zeros(gradient.numel(), dtype=buffer.dtype, device=buffer.device)
            parts.append(residual.reshape(-1))
        return buffer + torch.cat(parts)

    def keep(self, bucket: dist.GradBucket, residual: torch.Tensor) -> None:
        """Store the flat residual back per parameter."""
        sizes = [gradient.numel() for gradient in bucket.gradients()]
        for name, part in zip(self._names(bucket), residual.split(sizes), strict=True):
            self.residuals[name] = part


class TopK(_ErrorFeedback):
    name = "topk"

    def __init__(self, ratio: float) -> None:
        super().__init__()
        self.ratio = ratio

    def compress(self, group: dist.ProcessGroup, bucket: dist.GradBucket) -> Future[torch.Tensor]:
        buffer = bucket.buffer()
        numel, world = buffer.numel(), group.size()
        corrected = self.corrected(bucket)
        # Top-k of each gradient tensor, not of the whole bucket: a layer whose gradients are
        # small next to another's would otherwise send nothing for many steps.
        magnitudes, chosen, offset = corrected.abs(), [], 0
        for gradient in bucket.gradients():
            size = gradient.numel()
            keep = max(1, int(size * self.ratio))
            chosen.append(magnitudes[offset : offset + size].topk(keep, sorted=False).indices
                          + offset)  # fmt: skip
            offset += size
        indices = torch.cat(chosen)
        k = indices.numel()
        values = corrected[indices]
        residual = corrected.clone()
        residual[indices] = 0
        self.keep(bucket, residual)
        if k * 8 >= numel * 4:  # sparse would cost more than dense: all-reduce the kept values
            sparse = torch.zeros_like(buffer)
            sparse[indices] = values
            self.count(numel * 4, numel * 4)
            work = dist.all_reduce(sparse, group=group, async_op=True)
            return work.get_future().then(lambda _: buffer.copy_(sparse.div_(world)))
        payload = torch.cat([values, indices.to(torch.int32).view(values.dtype)])
        gathered = [torch.empty_like(payload) for _ in range(world)]
        self.count(payload.numel() * payload.element_size(), numel * 4)
        work = dist.all_gather(gathered, payload, group=group, async_op=True)

        def scatter(_: Future[Any]) -> torch.Tensor:
            buffer.zero_()
            for part in gathered:
                buffer.index_add_(0, part[k:].view(torch.int32).long(), part[:k])
            return buffer.div_(world)

        return work.get_future().then(scatter)


class Sign(_ErrorFeedback):
    name = "sign"
    block = 1024
    """Entries of one parameter sharing one fp32 scale (≈ 1.03 bits an entry). One scale per
    bucket let the residual grow like steps^0.55 on a fixed gradient; blocks grow it far less.
    Blocks lie within each parameter, so DDP's bucket layout does not change them."""

    def __init__(self) -> None:
        super().__init__()
        self._blocks: dict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor]] = {}

    def blocks(self, bucket: dist.GradBucket) -> tuple[torch.Tensor, torch.Tensor]:
        """Each entry's block number, and each block's entry count."""
        sizes = tuple(gradient.numel() for gradient in bucket.gradients())
        if sizes not in self._blocks:
            numbers, first = [], 0
            for size in sizes:
                numbers.append(torch.arange(size) // self.block + first)
                first += -(-size // self.block)
            of_entry = torch.cat(numbers).to(bucket.buffer().device)
            self._blocks[sizes] = (of_entry, torch.bincount(of_entry, minlength=first))
        return self._blocks[sizes]

    def compress(self, group: dist.ProcessGroup, bucket: dist.GradBucket) -> Future[torch.Tensor]:
        buffer = bucket.buffer()
        numel, world = buffer.numel(), group.size()
        of_entry, counts = self.blocks(bucket)
        corrected = self.corrected(bucket)
        scales = torch.zeros(counts.numel(), dtype=torch.float32, device=buffer.device)
        scales.index_add_(0, of_entry, corrected.abs().float()).div_(counts)
        positive = corrected >= 0
        sent = positive.to(buffer.dtype).mul_(2).sub_(1).mul_(scales[of_entry])
        # What this rank contributes: scale · sign; the rest carries over to the next step.
        self.keep(bucket, corrected - sent)
        # Scales first: a float32 view needs an offset divisible by 4.
        payload = torch.cat([scales.view(torch.uint8), _pack(positive)])
        gathered = [torch.empty_like(payload) for _ in range(world)]
        self.count(payload.numel(), numel * 4)
        work = dist.all_gather(gathered, payload, group=group, async_op=True)
        start = counts.numel() * 4

        def decode(_: Future[Any]) -> torch.Tensor:
            buffer.zero_()
            for part in gathered:
                their_scales = part[:start].view(torch.float32)[of_entry]
                their_signs = _unpack(part[start:], numel).to(buffer.dtype).mul_(2).sub_(1)
                buffer.add_(their_signs.mul_(their_scales))
            return buffer.div_(world)

        return work.get_future().then(decode)


_BITS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)


def _pack(flags: torch.Tensor) -> torch.Tensor:
    """Booleans → bytes, 8 to a byte (little-endian bit order), padded with zeros."""
    padded = torch.zeros(-(-flags.numel() // 8) * 8, dtype=torch.uint8, device=flags.device)
    padded[: flags.numel()] = flags.to(torch.uint8)
    return (padded.view(-1, 8) * _BITS.to(flags.device)).sum(dim=1, dtype=torch.uint8)


def _unpack(packed: torch.Tensor, count: int) -> torch.Tensor:
    bits = packed.unsqueeze(1).bitwise_and(_BITS.to(packed.device)).ne(0)
    return bits.view(-1)[:count]


def build_compressor(config: CompressionConfig, group: dist.ProcessGroup) -> Compressor | None:
    """The configured compressor, or None for plain all-reduce."""
    if config.method == "none":
        return None
    if config.method in ("fp16", "bf16"):
        return Cast(torch.float16 if config.method == "fp16" else torch.bfloat16)
    if config.method == "powersgd":
        return PowerSGD(group, rank=config.powersgd_rank, start_step=config.powersgd_start_step,
                        warm_start=config.powersgd_warm_start)  # fmt: skip
    if config.method == "topk":
        return TopK(config.topk_ratio)
    return Sign()
