"""Decentralized data parallelism: no gradient all-reduce; each rank steps on its own
gradients, and parameters are mixed after the optimizer step.

    gossip      D-PSGD: after every step each rank averages its parameters with its
                neighbours' on a graph, by point-to-point sends only —
                ``ring``: the two ring neighbours, weights ⅓ each (½ with 2 ranks);
                ``exponential``: one peer per step, rank + 2^k at step k (k cycling through
                ⌈log₂ W⌉), weights ½ — the one-peer exponential graph, whose rotation
                reaches exact consensus every ⌈log₂ W⌉ steps when W is a power of two
    local_sgd   every ``local_steps`` steps the ranks all-reduce their parameters; with
                ``outer_lr`` = 1 and ``outer_momentum`` = 0 that is local SGD (periodic
                averaging); otherwise DiLoCo: the mean change since the last sync is an
                outer gradient, applied to the last synced parameters by SGD with Nesterov
                momentum

The ranks' parameters differ between syncs, and so do their optimizer states: ``state_dict``
holds this rank's parameters and optimizer tensors (and for local SGD the synced anchor and
the outer momentum), which the checkpoint keeps per rank; at another world size every rank
starts from the mean of the saved ranks (``StateAverage``).
"""

from __future__ import annotations

import math
import threading
import time

import torch
import torch.distributed as dist
from torch import nn

from trainer.compression.base import with_prefix


class Decentralized:
    """Mixes parameters after each optimizer step (``after_step``); counts bytes sent."""

    name = "decentralized"

    def __init__(self, parts: list[nn.Module], optimizers: list[torch.optim.Optimizer],
                 group: dist.ProcessGroup) -> None:  # fmt: skip
        self.group = group
        self.rank, self.world = group.rank(), group.size()
        self.params = [(n, p) for part in parts for n, p in part.named_parameters()]
        self.optimizers = optimizers
        self.steps = 0
        self.place = torch.zeros(4, dtype=torch.int64)
        """Every rank holds whole parameters: any saved rank can stand in for any other."""
        self._sent = 0
        self._seconds = 0.0
        self._lock = threading.Lock()

    # -- the flat parameter vector ---------------------------------------------------------
    def flat(self) -> torch.Tensor:
        return torch.cat([p.detach().reshape(-1) for _, p in self.params])

    def assign(self, flat: torch.Tensor) -> None:
        offset = 0
        with torch.no_grad():
            for _, param in self.params:
                param.copy_(flat[offset : offset + param.numel()].view_as(param))
                offset += param.numel()

    def after_step(self) -> None:
        started = time.perf_counter()
        self.mix()
        self.steps += 1
        with self._lock:
            self._seconds += time.perf_counter() - started

    def mix(self) -> None:
        raise NotImplementedError

    # -- metrics ---------------------------------------------------------------------------
    def take_bytes(self) -> int:
        with self._lock:
            sent, self._sent = self._sent, 0
        return sent

    def take_seconds(self) -> float:
        with self._lock:
            seconds, self._seconds = self._seconds, 0.0
        return seconds

    def consensus_distance(self) -> float:
        """mean over ranks of ‖x_r − x̄‖ / ‖x̄‖ (one all-reduce; for metrics only)."""
        mine = self.flat()
        mean = mine.clone()
        dist.all_reduce(mean, group=self.group)
        mean /= self.world
        distance = torch.stack([(mine - mean).norm() / mean.norm().clamp_min(1e-12)])
        dist.all_reduce(distance, group=self.group)
        return float(distance) / self.world

    # -- state -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {"steps": torch.tensor(self.steps), "place": self.place.clone()}
        state.update({f"param-{name}": p.detach().clone() for name, p in self.params})
        for number, optimizer in enumerate(self.optimizers):
            for index, per_param in optimizer.state_dict()["state"].items():
                for key, value in per_param.items():
                    if torch.is_tensor(value):
                        state[f"optim-{number}-{index}-{key}"] = value.clone()
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.steps = int(state["steps"])
        params = with_prefix(state, "param-")
        with torch.no_grad():
            for name, param in self.params:
                if name in params:
                    param.copy_(params[name])
        for number, optimizer in enumerate(self.optimizers):
            ids = [p for group in optimizer.param_groups for p in group["params"]]
            for index, param in enumerate(ids):
                for key, value in optimizer.state.get(param, {}).items():
                    saved = state.get(f"optim-{number}-{index}-{key}")
                    if torch.is_tensor(value) and saved is not None:
                        value.copy_(saved)


class Gossip(Decentralized):
    name = "gossip"

    def __init__(self, parts: list[nn.Module], optimizers: list[torch.optim.Optimizer],
                 group: dist.ProcessGroup, graph: str) -> None:  # fmt: skip
        super().__init__(parts, optimizers, group)
        if graph not in ("ring", "exponential"):
            raise ValueError(f"parallel.gossip_graph must be ring or exponential, got {graph!r}")
        self.graph = graph
        self.rounds = max(1, math.ceil(math.log2(self.world)))

    def peers(self, step: int) -> tuple[list[int], list[int]]:
        """(ranks this rank sends to, ranks it receives from) at ``step``, in group ranks."""
        if self.world == 1:
            return [], []
        if self.graph == "exponential":
            hop = 2 ** (step % self.rounds) % self.world
            return [(self.rank + hop) % self.world], [(self.rank - hop) % self.world]
        neighbours = sorted({(self.rank - 1) % self.world, (self.rank + 1) % self.world})
        return neighbours, neighbours

    def mix(self) -> None:
        send_to, receive_from = self.peers(self.steps)
        if not send_to:
            return
        mine = self.flat()
        received = [torch.empty_like(mine) for _ in receive_from]
        global_rank = dist.get_global_rank
        operations = [dist.P2POp(dist.isend, mine, global_rank(self.group, peer), self.group)
                      for peer in send_to]  # fmt: skip
        operations += [dist.P2POp(dist.irecv, buffer, global_rank(self.group, peer), self.group)
                       for buffer, peer in zip(received, receive_from, strict=True)]  # fmt: skip
        for work in dist.batch_isend_irecv(operations):
            work.wait()
        mixed = mine.clone()
        for buffer in received:
            mixed += buffer
        mixed /= 1 + len(received)
        self.assign(mixed)
        with self._lock:
            self._sent += mine.numel() * mine.element_size() * len(send_to)


class LocalSGD(Decentralized):
    name = "local_sgd"

    def __init__(
        self, parts: list[nn.Module], optimizers: list[torch.optim.Optimizer],
        group: dist.ProcessGroup, *, local_steps: int, outer_lr: float, outer_momentum: float,
    ) -> None:  # fmt: skip
        super().__init__(parts, optimizers, group)
        self.local_steps, self.outer_lr, self.outer_momentum = local_steps, outer_lr, outer_momentum
        # Ranks start alike (weights are initialised per name), but take the mean anyway:
        # the anchor must be the same everywhere.
        self.anchor = self.flat()
        dist.all_reduce(self.anchor, group=group)
        self.anchor /= self.world
        """The parameters of the last sync (the same on every rank)."""
        self.momentum = torch.zeros_like(self.anchor)

    def mix(self) -> None:
        if (self.steps + 1) % self.local_steps:
            return
        mean = self.flat()
        dist.all_reduce(mean, group=self.group)
        mean /= self.world
        with self._lock:
            self._sent += 2 * (self.world - 1) * mean.numel() * mean.element_size() // self.world
        if self.outer_lr == 1.0 and self.outer_momentum == 0.0:
            synced = mean  # plain periodic averaging
        else:
            outer_gradient = self.anchor - mean
            self.momentum.mul_(self.outer_momentum).add_(outer_gradient)
            step = outer_gradient.add(self.momentum, alpha=self.outer_momentum)  # Nesterov
            synced = self.anchor - self.outer_lr * step
        self.anchor = synced.clone()
        self.assign(synced)

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = super().state_dict()
        state["anchor"], state["momentum"] = self.anchor.clone(), self.momentum.clone()
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        super().load_state_dict(state)
        if "anchor" in state:
            self.anchor, self.momentum = state["anchor"].clone(), state["momentum"].clone()
