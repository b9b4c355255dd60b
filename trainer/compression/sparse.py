"""Top-k sparsification and sign (1-bit) compression, both with error feedback."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from trainer.compression.base import ErrorFeedback, Future, Segment


class TopK(ErrorFeedback):
    """The ratio·n largest-magnitude entries of (gradient + residual) of each compressible
    parameter: values and int32 indices all-gathered and summed, or the kept values
    all-reduced densely when that is cheaper; the rest stays in the residual. Biases and
    norm gains travel exactly beside them (``ErrorFeedback.compressible``)."""

    name = "topk"

    def __init__(self, ratio: float, *, start_step: int) -> None:
        super().__init__(warmup_steps=start_step)
        self.ratio = ratio

    def compress(
        self, group: dist.ProcessGroup, flat: torch.Tensor, segments: tuple[Segment, ...]
    ) -> Future[torch.Tensor]:
        numel, world = flat.numel(), group.size()
        partition = self.partition(segments, flat.device)
        corrected = self.corrected(flat, partition.compressed)
        # Top-k of each parameter, not of the whole buffer: a layer whose gradients are small
        # next to another's would otherwise send nothing for many steps.
        magnitudes, chosen = corrected.abs(), [partition.exact_at[:0]]
        for segment in partition.compressed:
            keep = max(1, int(segment.numel * self.ratio))
            part = magnitudes[segment.offset : segment.end]
            chosen.append(part.topk(keep, sorted=False).indices + segment.offset)
        indices = torch.cat(chosen)
        k, exact_at = indices.numel(), partition.exact_at
        values, exact = corrected[indices], flat[exact_at]
        residual = corrected.clone()
        residual[indices] = 0
        self.keep(residual, partition.compressed)
        if k * 8 + exact.numel() * 4 >= numel * 4:  # sparse would cost more than dense
            sparse = torch.zeros_like(flat)
            sparse[indices] = values
            sparse[exact_at] = exact
            self.count(numel * 4, numel * 4)
            work = dist.all_reduce(sparse, group=group, async_op=True)
            return work.get_future().then(lambda _: flat.copy_(sparse.div_(world)))
        payload = torch.cat([values, exact, indices.to(torch.int32).view(values.dtype)])
        gathered = [torch.empty_like(payload) for _ in range(world)]
        self.count(payload.numel() * payload.element_size(), numel * 4)
        work = dist.all_gather(gathered, payload, group=group, async_op=True)
        sent_indices_at = k + exact.numel()

        def scatter(_: Future[Any]) -> torch.Tensor:
            flat.zero_()
            for part in gathered:
                flat.index_add_(0, part[sent_indices_at:].view(torch.int32).long(), part[:k])
                flat.index_add_(0, exact_at, part[k:sent_indices_at])
            return flat.div_(world)

        return work.get_future().then(scatter)


class Sign(ErrorFeedback):
    """EF-SignSGD (Karimireddy et al., 2019): one bit per entry, packed, plus one fp32 scale
    mean|g + e| per block of up to ``block`` entries of one parameter; the residual keeps
    the rest. Vectors travel exactly (``ErrorFeedback.compressible``)."""

    name = "sign"
    block = 1024
    """Entries of one parameter sharing one fp32 scale (≈ 1.03 bits an entry). One scale per
    bucket let the residual grow like steps^0.55 on a fixed gradient; blocks grow it far less.
    Blocks lie within each parameter, so bucket layouts do not change them."""

    def __init__(self, *, start_step: int) -> None:
        super().__init__(warmup_steps=start_step)
        self._blocks: dict[tuple[Segment, ...], tuple[torch.Tensor, ...]] = {}

    def blocks(
        self, segments: tuple[Segment, ...], device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The positions in the buffer of the entries sent as signs, each one's block number,
        and each block's entry count."""
        if segments not in self._blocks:
            positions, numbers, first = [], [], 0
            for segment in self.partition(segments, device).compressed:
                positions.append(torch.arange(segment.offset, segment.end))
                numbers.append(torch.arange(segment.numel) // self.block + first)
                first += -(-segment.numel // self.block)
            at = torch.cat(positions) if positions else torch.zeros(0, dtype=torch.long)
            of_entry = torch.cat(numbers) if numbers else at
            counts = torch.bincount(of_entry, minlength=first)
            self._blocks[segments] = (at.to(device), of_entry.to(device), counts.to(device))
        at, of_entry, counts = self._blocks[segments]
        return at, of_entry, counts

    def compress(
        self, group: dist.ProcessGroup, flat: torch.Tensor, segments: tuple[Segment, ...]
    ) -> Future[torch.Tensor]:
        world = group.size()
        partition = self.partition(segments, flat.device)
        at, of_entry, counts = self.blocks(segments, flat.device)
        corrected = self.corrected(flat, partition.compressed)
        chosen = corrected[at]
        scales = torch.zeros(counts.numel(), dtype=torch.float32, device=flat.device)
        scales.index_add_(0, of_entry, chosen.abs().float()).div_(counts.clamp(min=1))
        positive = chosen >= 0
        sent = positive.to(flat.dtype).mul_(2).sub_(1).mul_(scales[of_entry])
        # What this rank contributes: scale · sign; the rest carries over to the next step.
        residual = corrected
        residual[at] -= sent
        self.keep(residual, partition.compressed)
        exact_at = partition.exact_at
        exact = flat[exact_at].float()
        # Scales and exact values first: a float32 view needs an offset divisible by 4.
        payload = torch.cat([scales.view(torch.uint8), exact.view(torch.uint8), _pack(positive)])
        gathered = [torch.empty_like(payload) for _ in range(world)]
        self.count(payload.numel(), flat.numel() * 4)
        work = dist.all_gather(gathered, payload, group=group, async_op=True)
        signs_from = (counts.numel() + exact.numel()) * 4

        def decode(_: Future[Any]) -> torch.Tensor:
            flat.zero_()
            for part in gathered:
                floats = part[:signs_from].view(torch.float32)
                their_scales = floats[: counts.numel()][of_entry]
                their_signs = _unpack(part[signs_from:], at.numel()).to(flat.dtype).mul_(2).sub_(1)
                flat.index_add_(0, at, their_signs.mul_(their_scales))
                flat.index_add_(0, exact_at, floats[counts.numel() :].to(flat.dtype))
            return flat.div_(world)

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
