"""Top-k sparsification and sign (1-bit) compression, both with error feedback."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from trainer.compression.base import ErrorFeedback, Future, Segment


class TopK(ErrorFeedback):
    """The ratio·n largest-magnitude entries of (gradient + residual) of each parameter:
    values and int32 indices all-gathered and summed, or the kept values all-reduced densely
    when that is cheaper; the rest stays in the residual."""

    name = "topk"

    def __init__(self, ratio: float) -> None:
        super().__init__()
        self.ratio = ratio

    def compress(
        self, group: dist.ProcessGroup, flat: torch.Tensor, segments: tuple[Segment, ...]
    ) -> Future[torch.Tensor]:
        numel, world = flat.numel(), group.size()
        corrected = self.corrected(flat, segments)
        # Top-k of each parameter, not of the whole buffer: a layer whose gradients are small
        # next to another's would otherwise send nothing for many steps.
        magnitudes, chosen = corrected.abs(), []
        for segment in segments:
            keep = max(1, int(segment.numel * self.ratio))
            part = magnitudes[segment.offset : segment.end]
            chosen.append(part.topk(keep, sorted=False).indices + segment.offset)
        indices = torch.cat(chosen)
        k = indices.numel()
        values = corrected[indices]
        residual = corrected.clone()
        residual[indices] = 0
        self.keep(residual, segments)
        if k * 8 >= numel * 4:  # sparse would cost more than dense: all-reduce the kept values
            sparse = torch.zeros_like(flat)
            sparse[indices] = values
            self.count(numel * 4, numel * 4)
            work = dist.all_reduce(sparse, group=group, async_op=True)
            return work.get_future().then(lambda _: flat.copy_(sparse.div_(world)))
        payload = torch.cat([values, indices.to(torch.int32).view(values.dtype)])
        gathered = [torch.empty_like(payload) for _ in range(world)]
        self.count(payload.numel() * payload.element_size(), numel * 4)
        work = dist.all_gather(gathered, payload, group=group, async_op=True)

        def scatter(_: Future[Any]) -> torch.Tensor:
            flat.zero_()
            for part in gathered:
                flat.index_add_(0, part[k:].view(torch.int32).long(), part[:k])
            return flat.div_(world)

        return work.get_future().then(scatter)


class Sign(ErrorFeedback):
    """EF-SignSGD (Karimireddy et al., 2019): one bit per entry, packed, plus one fp32 scale
    mean|g + e| per block of up to ``block`` entries of one parameter; the residual keeps
    the rest."""

    name = "sign"
    block = 1024
    """Entries of one parameter sharing one fp32 scale (≈ 1.03 bits an entry). One scale per
    bucket let the residual grow like steps^0.55 on a fixed gradient; blocks grow it far less.
    Blocks lie within each parameter, so bucket layouts do not change them."""

    def __init__(self) -> None:
        super().__init__()
        self._blocks: dict[tuple[Segment, ...], tuple[torch.Tensor, torch.Tensor]] = {}

    def blocks(
        self, segments: tuple[Segment, ...], device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Each entry's block number, and each block's entry count."""
        if segments not in self._blocks:
            numbers, first = [], 0
            for segment in segments:
                numbers.append(torch.arange(segment.numel) // self.block + first)
                first += -(-segment.numel // self.block)
            of_entry = torch.cat(numbers).to(device)
            self._blocks[segments] = (of_entry, torch.bincount(of_entry, minlength=first))
        return self._blocks[segments]

    def compress(
        self, group: dist.ProcessGroup, flat: torch.Tensor, segments: tuple[Segment, ...]
    ) -> Future[torch.Tensor]:
        numel, world = flat.numel(), group.size()
        of_entry, counts = self.blocks(segments, flat.device)
        corrected = self.corrected(flat, segments)
        scales = torch.zeros(counts.numel(), dtype=torch.float32, device=flat.device)
        scales.index_add_(0, of_entry, corrected.abs().float()).div_(counts)
        positive = corrected >= 0
        sent = positive.to(flat.dtype).mul_(2).sub_(1).mul_(scales[of_entry])
        # What this rank contributes: scale · sign; the rest carries over to the next step.
        self.keep(corrected - sent, segments)
        # Scales first: a float32 view needs an offset divisible by 4.
        payload = torch.cat([scales.view(torch.uint8), _pack(positive)])
        gathered = [torch.empty_like(payload) for _ in range(world)]
        self.count(payload.numel(), numel * 4)
        work = dist.all_gather(gathered, payload, group=group, async_op=True)
        start = counts.numel() * 4

        def decode(_: Future[Any]) -> torch.Tensor:
            flat.zero_()
            for part in gathered:
                their_scales = part[:start].view(torch.float32)[of_entry]
                their_signs = _unpack(part[start:], numel).to(flat.dtype).mul_(2).sub_(1)
                flat.add_(their_signs.mul_(their_scales))
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
