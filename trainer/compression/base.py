"""What every compressor shares: the layout of a gradient buffer (``Segment``), byte counts,
step counting, error-feedback residuals kept per parameter name, and the two ways gradients
reach a compressor — a DDP comm hook per bucket (``Compressor.hook``) and an FSDP2
all-reduce hook per sharded module (``Compressor.fsdp_hook``), which under HSDP averages the
reduce-scattered shard over the replicate dimension only.

Convergence: the defaults and why (issue 20). Measured on tools/bench_compression.py's GPT
(5.26 M parameters, AdamW, 64 steps of batch 32, 2 ranks; deterministic kernels give the same
losses on any link), final held-out loss against the dense run's 2.684:

                      before: start 10 / 2    start 20 (fp32)    now (bench, 100 Mbit/s)
    PowerSGD rank 4   +13.3 %                 +5.2 %             +2.1 %
    top-k 1 %         +43.2 %                 +18.8 %            +17.8 %
    sign              +19.3 %                 +6.6 %             +5.3 %

"now" is ``start_step`` = 20 with the warm-up sent in bf16 (``ErrorFeedback.warm_up``),
vectors exact, and for PowerSGD the embedding tables exact (PowerSGD measured with Q
orthonormalised every step, since replaced by the redraw in ``PowerSGD.initial_q``). Why 20
for all three (PowerSGD's start_iter; DGC warms up too): the first steps move the weights most
and their gradients change fastest, the case a delayed residual serves worst; 20 fp32 steps
cost 84 s of PowerSGD's 117 s run at 100 Mbit/s, which bf16 halves (bf16 alone: +0.16 %).

Under AdamW, top-k's bursts: AdamW divides each coordinate by its own running RMS, so
error feedback's delayed burst — a coordinate top-k sends once in ~100 steps, carrying ~100
steps' sum — lifts that RMS and moves the weight about as far as one ordinary step, not 100.
So under top-k AdamW freezes its second moment at ``start_step`` by default
(``optim.adamw.freeze_variance_step``, 1-bit Adam's frozen variance; trainer/optim/frozen.py):
the update is linear in the gradient again. Measured (same runs, held-out loss against dense):

                      AdamW         variance frozen at step 20
    top-k 1 %, GPT    +17.8 %       +14.6 % (128 steps: +4.0 %)
    top-k 1 %, CNN    +113.7 %      +91.5 % (2× the steps: +14.3 %)
    sign, GPT         +5.3 %        +2.7 %
    sign, CNN         +46.4 %       diverged (NaN)
    PowerSGD, GPT     +2.1 %        +9.0 %

Sign gives every entry of a block the block's mean magnitude: an entry whose frozen
variance is tiny then takes huge steps, and the CNN diverged — so sign keeps AdamW's own
variance, as PowerSGD does (it sends every coordinate each step, and freezing hurt it).
Top-k stays behind dense in these short runs: at 1 % a coordinate waits ~100 steps for its
turn, longer than the 44 compressed steps of the GPT run. DGC's momentum correction and local
clipping are for momentum SGD (the accumulated quantity is the velocity) and are not
implemented; the trainer's momentum sits in the optimizer, after the all-reduce.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

Future = torch.futures.Future


@dataclass(frozen=True)
class Segment:
    """One parameter's gradient inside a flat buffer: entries [offset, offset + numel)."""

    name: str
    offset: int
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def end(self) -> int:
        return self.offset + self.numel


def tile(named_shapes: list[tuple[str, tuple[int, ...]]]) -> tuple[Segment, ...]:
    """Segments laid end to end, in the given order."""
    segments, offset = [], 0
    for name, shape in named_shapes:
        segments.append(Segment(name, offset, shape))
        offset += math.prod(shape)
    return tuple(segments)


def done_future(value: torch.Tensor) -> Future[torch.Tensor]:
    future: Future[torch.Tensor] = Future()
    future.set_result(value)
    return future


class Compressor:
    """Averages a flat gradient buffer over a process group, densely in fp32 here (what the
    subclasses compress), and counts the bytes each rank contributed to its collectives
    beside those a dense fp32 all-reduce would have: ``take_bytes()``.

    ``compress(group, flat, segments)`` receives a buffer its segments tile exactly and
    returns a future of the averaged buffer. The first ``warmup_steps`` steps go dense;
    the trainer calls ``step_done()`` after each optimizer step.
    """

    name = "dense"

    def __init__(self, warmup_steps: int = 2) -> None:
        self.warmup_steps = warmup_steps
        self.steps = 0
        self._sent = 0
        self._dense = 0
        self._seconds = 0.0
        self._lock = threading.Lock()
        self.names: dict[int, str] = {}
        self._bucket_segments: dict[tuple[int, ...], tuple[Segment, ...]] = {}
        self.place = torch.tensor([0, 1, 0, 1])
        """(dp_shard coordinate, dp_shard, tp coordinate, tp): ranks with the same place hold
        the same pieces of the parameters, so their states can stand in for each other when a
        checkpoint is resumed at another world size (``StateAverage``)."""

    # -- bookkeeping -------------------------------------------------------------------
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

    def take_seconds(self) -> float:
        """Seconds the FSDP hooks spent averaging (the DDP path is timed by CommTimer)."""
        with self._lock:
            seconds, self._seconds = self._seconds, 0.0
        return seconds

    def step_done(self) -> None:
        self.steps += 1

    def name_parameters(self, module: nn.Module) -> None:
        """Learn the parameters' names (before DDP wraps ``module``), for per-name state."""
        self.names = {id(param): name for name, param in module.named_parameters()}

    def state_dict(self) -> dict[str, torch.Tensor]:
        """This rank's state (error feedback differs per rank), as tensors for DCP."""
        return {"steps": torch.tensor(self.steps), "place": self.place.clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.steps = int(state["steps"])

    # -- averaging ---------------------------------------------------------------------
    def average(
        self, group: dist.ProcessGroup, flat: torch.Tensor, segments: tuple[Segment, ...]
    ) -> Future[torch.Tensor]:
        if self.steps < self.warmup_steps:
            return self.warm_up(group, flat)
        return self.compress(group, flat, segments)

    def warm_up(self, group: dist.ProcessGroup, flat: torch.Tensor) -> Future[torch.Tensor]:
        """One of the first ``warmup_steps`` steps: the dense fp32 all-reduce."""
        return self.dense(group, flat)

    def dense(self, group: dist.ProcessGroup, flat: torch.Tensor) -> Future[torch.Tensor]:
        self.count(flat.numel() * 4, flat.numel() * 4)
        world = group.size()
        work = dist.all_reduce(flat, group=group, async_op=True)
        return work.get_future().then(lambda _: flat.div_(world))

    def compress(
        self, group: dist.ProcessGroup, flat: torch.Tensor, segments: tuple[Segment, ...]
    ) -> Future[torch.Tensor]:
        return self.dense(group, flat)

    # -- where gradients come from -----------------------------------------------------
    def hook(self, group: dist.ProcessGroup, bucket: dist.GradBucket) -> Future[torch.Tensor]:
        """DDP comm hook: one bucket. Its gradients are views laid end to end in the buffer."""
        return self.average(group, bucket.buffer(), self.bucket_segments(bucket))

    def bucket_segments(self, bucket: dist.GradBucket) -> tuple[Segment, ...]:
        """The named segments of a DDP bucket's buffer (learned once per bucket layout)."""
        params = bucket.parameters()
        layout = tuple(map(id, params))  # DDP re-lays its buckets once, after the first step
        segments = self._bucket_segments.get(layout)
        if segments is None:
            shapes = [(self.names.get(id(param), f"#{id(param)}"), tuple(param.shape))
                      for param in params]  # fmt: skip
            segments = self._bucket_segments[layout] = tile(shapes)
        return segments

    def fsdp_hook(
        self, group: dist.ProcessGroup, module: nn.Module
    ) -> Callable[[torch.Tensor], None]:
        """An FSDP2 all-reduce hook (``set_all_reduce_hook``) for ``module``, sharded on a 1-D
        mesh: it receives the reduce-scattered (already averaged within the shard group)
        shard of the module's gradients and averages it over ``group`` in place.

        FSDP2 lays each parameter's shard out at the start of a padded stretch; the padding
        is left out, and a rank whose shard of a parameter is empty sends nothing for it.
        """
        layout: list[tuple[Segment, int]] = []  # (segment in the packed tensor, flat offset)
        segments: list[tuple[Segment, ...]] = []  # the packed layout, once learned

        def learn_layout() -> None:
            state = module._get_fsdp_state()  # type: ignore[operator]
            group_state = state._fsdp_param_group
            named, offsets, offset = [], [], 0
            for param in group_state.fsdp_params if group_state is not None else []:
                shape = tuple(param.sharded_size)
                if math.prod(shape):
                    named.append((param._param_fqn, shape))
                    offsets.append(offset)
                offset += param.padded_sharded_param_size.numel()
            layout.extend(zip(tile(named), offsets, strict=True))

        def hook(reduce_output: torch.Tensor) -> None:
            started = time.perf_counter()
            if not layout:
                learn_layout()
                segments.append(tuple(segment for segment, _ in layout))
            packed = torch.cat([reduce_output[offset : offset + segment.numel]
                                for segment, offset in layout])  # fmt: skip
            averaged = self.average(group, packed, segments[0]).wait()
            for segment, offset in layout:
                reduce_output[offset : offset + segment.numel].copy_(
                    averaged[segment.offset : segment.end]
                )
            with self._lock:
                self._seconds += time.perf_counter() - started

        return hook


# DDP checks a hook's annotations itself; under `from __future__ import annotations` they
# would be strings, and it would refuse the hook.
Compressor.hook.__annotations__["bucket"] = dist.GradBucket
Compressor.hook.__annotations__["return"] = torch.futures.Future[torch.Tensor]


class Cast(Compressor):
    """fp16 / bf16: divided by the world size, then cast (so fp16 cannot overflow in the
    sum), all-reduced, and cast back — what torch's fp16/bf16 DDP hooks do, on any buffer."""

    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        self.dtype = dtype
        self.name = "fp16" if dtype == torch.float16 else "bf16"

    def compress(
        self, group: dist.ProcessGroup, flat: torch.Tensor, segments: tuple[Segment, ...]
    ) -> Future[torch.Tensor]:
        return cast_average(self, group, flat, self.dtype)


def cast_average(
    compressor: Compressor, group: dist.ProcessGroup, flat: torch.Tensor, dtype: torch.dtype
) -> Future[torch.Tensor]:
    """``flat`` averaged over ``group`` in ``dtype`` (divided first, so fp16 cannot overflow)."""
    cast = flat.to(dtype).div_(group.size())
    compressor.count(cast.numel() * cast.element_size(), flat.numel() * 4)
    work = dist.all_reduce(cast, group=group, async_op=True)
    return work.get_future().then(lambda _: flat.copy_(cast))


class ErrorFeedback(Compressor):
    """Residuals — what compression left out, added to the next step's gradient — kept per
    parameter name: DDP lays its buckets out again after the first step, a restarted run
    starts from the initial layout, and FSDP groups parameters its own way, so a residual
    kept per bucket would move to other entries.

    Only matrices (and convolution kernels) are compressed (``compressible``); vectors —
    biases, norm gains — are sent exactly, in fp32, with the compressed payload. They are a
    sliver of the bytes (0.13 % of the benchmark GPT's 5.3 M entries, 0.5 % of the CNN's
    0.33 M) but under top-k 1 % a 256-entry norm gain would move 2 entries a step, and a
    layer's scale learns that slowly (PowerSGD, Vogels et al. 2019, sends them exactly too).
    """

    def __init__(self, warmup_steps: int) -> None:
        super().__init__(warmup_steps)
        self.residuals: dict[str, torch.Tensor] = {}
        self._partitions: dict[tuple[Segment, ...], Partition] = {}

    def warm_up(self, group: dist.ProcessGroup, flat: torch.Tensor) -> Future[torch.Tensor]:
        """Warm-up steps send every entry, in bf16: half the bytes of fp32, and the bf16 cast
        ended 0.16 % from fp32 on the benchmark GPT, where 20 fp32 warm-up steps at 100 Mbit/s
        took 84 s of PowerSGD's 117 s run."""
        return cast_average(self, group, flat, torch.bfloat16)

    def compressible(self, segment: Segment) -> bool:
        """A matrix or convolution kernel, not a vector; see the class."""
        return len(segment.shape) >= 2

    def partition(self, segments: tuple[Segment, ...], device: torch.device) -> Partition:
        """The segments split into compressed and exact ones (learned once per layout)."""
        partition = self._partitions.get(segments)
        if partition is None:
            compressed = tuple(s for s in segments if self.compressible(s))
            exact = [torch.arange(s.offset, s.end) for s in segments if not self.compressible(s)]
            exact_at = torch.cat(exact) if exact else torch.zeros(0, dtype=torch.long)
            partition = self._partitions[segments] = Partition(compressed, exact_at.to(device))
        return partition

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = super().state_dict()
        state.update({f"residual-{name}": r for name, r in self.residuals.items()})
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        super().load_state_dict(state)
        self.residuals = with_prefix(state, "residual-")

    def corrected(self, flat: torch.Tensor, segments: tuple[Segment, ...]) -> torch.Tensor:
        """The gradients plus each parameter's residual (a new tensor)."""
        corrected = flat.clone()
        for segment in segments:
            residual = self.residuals.get(segment.name)
            if residual is not None and residual.numel() == segment.numel:
                corrected[segment.offset : segment.end] += residual
        return corrected

    def keep(self, residual: torch.Tensor, segments: tuple[Segment, ...]) -> None:
        """Store a flat residual back per parameter."""
        for segment in segments:
            self.residuals[segment.name] = residual[segment.offset : segment.end]


@dataclass(frozen=True)
class Partition:
    """A buffer's segments as an error-feedback compressor sends them."""

    compressed: tuple[Segment, ...]
    """The segments compressed, each with its residual."""
    exact_at: torch.Tensor
    """Positions in the buffer of every entry sent exactly (int64)."""


def with_prefix(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {key[len(prefix) :]: tensor.clone()
            for key, tensor in state.items() if key.startswith(prefix)}  # fmt: skip


class StateAverage:
    """One rank's state from the saved states of the ranks that held its place, when the
    world size changed: floating-point entries averaged over the states that have them,
    counters taken from the first. States are added one at a time (``add``).

    A residual is what one rank still owes the mean update, (1/W)·Σ e_w over W ranks; every
    new rank of that place starting from the mean residual owes the same in total, at any
    new world size. PowerSGD's Q is the same on all of them already.
    """

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}

    def add(self, state: dict[str, torch.Tensor]) -> None:
        for key, tensor in state.items():
            if key not in self.sums:
                self.sums[key], self.counts[key] = tensor.clone(), 1
            elif tensor.is_floating_point() and tensor.shape == self.sums[key].shape:
                self.sums[key] += tensor
                self.counts[key] += 1

    def result(self) -> dict[str, torch.Tensor]:
        return {key: tensor / self.counts[key] if tensor.is_floating_point() else tensor
                for key, tensor in self.sums.items()}  # fmt: skip
