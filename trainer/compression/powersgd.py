"""PowerSGD (Vogels et al., 2019): each gradient matrix M (n × m, a parameter's gradient
viewed as rows × the rest) is sent as two thin factors, P = M·Q (n × r) and Qᵀ = Mᵀ·P̂
(r × m), with one step of subspace iteration per training step:

    P_w = M_w Q          all-reduce P → orthonormalise → P̂     (every rank the same P̂)
    Q_w = M_wᵀ P̂         all-reduce Q → Q̄ = ΣQ_w / W
    update = P̂ Q̄ᵀ        ≈ mean of M_w, rank r
    e_w = M_w − P̂ Q_wᵀ   this rank's residual, added to the next step's gradient

With warm start Q̄ seeds the next step's Q (the iteration continues across steps); without,
Q is drawn afresh from (parameter name, step). Vectors, embedding tables, and matrices where
r(n + m) saves less than 2× of n·m (torch's rule), go dense in the first all-reduce. An
embedding table's gradient has a row per token of the batch and nothing elsewhere, rows
unrelated to each other: a rank-4 sketch of it carries a few tokens' worth a step. On the
benchmark GPT (tools/bench_compression.py, 64 steps, 20 warm-up) the tables and the output
head sent exactly took the final held-out loss from +5.2 % of dense to +2.1 % for 2.1 MB
more a step; the tables alone (this rule, 1.1 MB) also end at +2.1 %.

Why not torch's hook: it keeps residuals and P, Q per DDP *bucket*, and DDP re-lays its
buckets after the first step and after a restart, so that state cannot be saved and put
back (a resumed run restarted it); and it only runs as a DDP hook. Here the state is per
parameter name — exact resume, and the same code averages FSDP shards under HSDP. The
collectives of one buffer run back to back on the calling thread: chaining them through
future callbacks, as torch's hook does, lets one bucket's second all-reduce and the next
bucket's first one reach the process group in different orders on different ranks.
"""

from __future__ import annotations

import zlib

import torch
import torch.distributed as dist
from torch import nn

from trainer.compression.base import ErrorFeedback, Future, Segment, done_future, with_prefix


class PowerSGD(ErrorFeedback):
    name = "powersgd"
    min_compression_rate = 2.0

    def __init__(self, *, rank: int, start_step: int, warm_start: bool) -> None:
        super().__init__(warmup_steps=start_step)
        self.rank = rank
        self.warm_start = warm_start
        self.qs: dict[str, torch.Tensor] = {}
        """The last averaged Q per parameter (warm start)."""
        self.tables: set[str] = set()
        """Names of embedding tables' weights, sent exactly (see the module docstring)."""

    def name_parameters(self, module: nn.Module) -> None:
        super().name_parameters(module)
        self.tables = {f"{prefix}.{name}" if prefix else name
                       for prefix, child in module.named_modules()
                       if isinstance(child, nn.Embedding)
                       for name, _ in child.named_parameters(recurse=False)}  # fmt: skip

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = super().state_dict()
        state.update({f"q-{name}": q for name, q in self.qs.items()})
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        super().load_state_dict(state)
        self.qs = with_prefix(state, "q-")

    def shape(self, segment: Segment) -> tuple[int, int, int] | None:
        """(n, m, r) when the segment is worth compressing, else None."""
        if len(segment.shape) < 2 or segment.name in self.tables:
            return None  # the rule below covers small matrices
        n = segment.shape[0]
        m = segment.numel // n
        r = min(n, m, self.rank)
        if (n + m) * r * self.min_compression_rate >= n * m:
            return None
        return n, m, r

    def initial_q(self, segment: Segment, m: int, r: int, device: torch.device) -> torch.Tensor:
        """This step's Q: the last step's (warm start) or a fresh draw."""
        q = self.qs.get(segment.name) if self.warm_start else None
        # A warm-started Q̄ = Mᵀ·P̂ with a zero column — after a step where the matrix had no
        # gradient (a branch not taken, a frozen layer) it is all zeros — spans too little:
        # P = M·Q̄ loses those directions, and the step's update missed 99.4 % of a rank-4
        # gradient (a unit test). Such a Q is drawn afresh. Orthonormalising Q every step
        # instead (QR) made resumed runs differ in the last bits: LAPACK's result depends on
        # the memory alignment of its input.
        if q is not None and q.shape == (m, r) and bool(q.norm(dim=0).min() > 0):
            return q
        # The same on every rank (and after a resume): drawn from (name, step).
        seed = zlib.crc32(segment.name.encode()) * 1_000_003 + self.steps
        generator = torch.Generator().manual_seed(seed % (2**63))
        return torch.randn(m, r, generator=generator).to(device)

    def compress(
        self, group: dist.ProcessGroup, flat: torch.Tensor, segments: tuple[Segment, ...]
    ) -> Future[torch.Tensor]:
        world = group.size()
        corrected = self.corrected(flat, segments)
        low: list[tuple[Segment, torch.Tensor, torch.Tensor]] = []  # (segment, M, Q)
        dense: list[Segment] = []
        for segment in segments:
            shape = self.shape(segment)
            if shape is None:
                dense.append(segment)
                continue
            n, m, r = shape
            matrix = corrected[segment.offset : segment.end].view(n, m)
            low.append((segment, matrix, self.initial_q(segment, m, r, flat.device)))
        first = torch.cat([(matrix @ q).reshape(-1) for _, matrix, q in low]
                          + [corrected[s.offset : s.end] for s in dense])  # fmt: skip
        dist.all_reduce(first, group=group)
        offset, hats = 0, []
        for _, matrix, q in low:
            n, r = matrix.shape[0], q.shape[1]
            hats.append(torch.linalg.qr(first[offset : offset + n * r].view(n, r)).Q)
            offset += n * r
        local_qs = [matrix.T @ hat for (_, matrix, _), hat in zip(low, hats, strict=True)]
        second = torch.cat([q.reshape(-1) for q in local_qs]) if low else first[:0]
        mean_q = second.clone()
        if low:
            dist.all_reduce(mean_q, group=group)
            mean_q.div_(world)
        self.count((first.numel() + second.numel()) * 4, flat.numel() * 4)
        residual = torch.zeros_like(flat)
        at = 0
        for (segment, matrix, _), hat, local_q in zip(low, hats, local_qs, strict=True):
            m, r = local_q.shape
            q = mean_q[at : at + m * r].view(m, r)
            at += m * r
            flat[segment.offset : segment.end].view_as(matrix).copy_(hat @ q.T)
            residual[segment.offset : segment.end].view_as(matrix).copy_(matrix - hat @ local_q.T)
            if self.warm_start:
                self.qs[segment.name] = q.clone()
        for segment in dense:
            flat[segment.offset : segment.end].copy_(first[offset : offset + segment.numel])
            flat[segment.offset : segment.end].div_(world)
            offset += segment.numel
        self.keep(residual, segments)
        return done_future(flat)
