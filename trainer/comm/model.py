"""The communication model: what one training step costs each rank under each strategy, for
a cluster of ``world`` ranks in nodes of ``node_size`` — the planning view for clusters
larger than the one at hand.

Ring algorithms throughout (what NCCL and gloo use for large messages). For a message of
B bytes over p ranks, one rank sends:

    all-reduce       2(p−1)/p · B      in 2(p−1) sequential steps
    reduce-scatter    (p−1)/p · B      in  (p−1) steps
    all-gather        (p−1)/p · B      in  (p−1) steps

and each step costs α (latency) + its bytes / β (link bandwidth). A ring over all ranks of
several nodes runs at the pace of its slowest link, the one between nodes, in every step.

    ring          DDP: one ring all-reduce per bucket (``buckets`` of them, overlapping
                  backward): 2(W−1)·buckets latency terms
    flat          one ring all-reduce of all gradients after backward: 2(W−1) terms
    hierarchical  per bucket: reduce-scatter in the node, all-reduce of the 1/L shard across
                  the N nodes (compressed by ``compression``× when set), all-gather in the
                  node: 2(L−1) fast terms + 2(N−1) slow ones, and only 2(N−1)/N · B/L bytes
                  per rank cross nodes

and the decentralized ones, which send parameters (as many bytes as the gradients) instead:

    gossip-ring         both ring neighbours every step: 2·B per rank, 1 step of parallel
                        sends; only the ranks at a node's edge cross nodes
    gossip-exponential  one peer at hop 2^k: B per rank, 1 step; hops of a node's size or
                        more cross nodes (those rounds of the ⌈log₂ W⌉)
    local_sgd           one ring all-reduce every ``local_steps`` steps: 2(W−1)/W · B / H
                        per step on average, 2(W−1)/H latency terms

``Cost.seconds`` is the communication time alone, before any overlap with backward.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

STRATEGIES = ("ring", "flat", "hierarchical", "gossip-ring", "gossip-exponential", "local_sgd")


@dataclass(frozen=True, kw_only=True)
class Network:
    alpha_intra_s: float = 5e-6
    """Latency of one message step inside a node (NVLink/PCIe class)."""
    alpha_inter_s: float = 2e-5
    """Latency of one message step between nodes (InfiniBand/RoCE class)."""
    beta_intra: float = 150e9
    """Bytes/s of one rank's link inside a node."""
    beta_inter: float = 25e9
    """Bytes/s of one rank's share of the links between nodes (e.g. 200 Gb/s per GPU)."""


@dataclass(frozen=True)
class Cost:
    strategy: str
    bytes_per_rank: float
    """Bytes one rank sends per step, all levels."""
    cross_node_bytes_per_rank: float
    """Of those, the bytes that leave the node (ring: the node's one outgoing ring link,
    shared by its L ranks)."""
    latency_terms: float
    """Sequential message steps per training step (each pays α; local SGD's average)."""
    seconds: float
    """Predicted communication time per step with the given Network."""


def cost(
    strategy: str, *, world: int, node_size: int, gradient_bytes: float, buckets: int = 1,
    compression: float = 1.0, local_steps: int = 8, network: Network | None = None,
    gloo: bool = False,
) -> Cost:  # fmt: skip
    """The cost of averaging ``gradient_bytes`` of fp32 gradients over ``world`` ranks.

    ``gloo``: gloo's reduce-scatter sends what an all-reduce does, 2(p−1)/p · B (measured on
    loopback with 2 and 4 ranks: 1.00 B and 1.50 B per rank, as its all-reduce), so the
    hierarchical strategy's first step costs twice the ring's (p−1)/p · B there."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; choose one of {STRATEGIES}")
    if world < 1 or node_size < 1 or world % node_size:
        raise ValueError(f"world {world} does not split into nodes of {node_size}")
    net = network or Network()
    b, w, local = float(gradient_bytes), world, node_size
    nodes = w // local
    if strategy in ("ring", "flat"):
        messages = buckets if strategy == "ring" else 1
        sent = 2 * (w - 1) / w * b / compression
        # The ring's steps all wait for its slowest link: between nodes once there are two.
        alpha, beta = (net.alpha_inter_s, net.beta_inter) if nodes > 1 else (
            net.alpha_intra_s, net.beta_intra)  # fmt: skip
        terms = 2 * (w - 1) * messages
        seconds = terms * alpha + sent / beta
        cross = sent / local if nodes > 1 else 0.0
        return Cost(strategy, sent, cross, terms, seconds)
    if strategy == "gossip-ring":
        neighbours = min(2, w - 1)
        sent = neighbours * b
        crossing = min(2, local) / local if nodes > 1 else 0.0  # ranks at a node's edges
        seconds = (net.alpha_inter_s + b / net.beta_inter) if nodes > 1 else (
            net.alpha_intra_s + b / net.beta_intra)  # fmt: skip
        return Cost(strategy, sent, crossing * b, 1 if w > 1 else 0, seconds if w > 1 else 0.0)
    if strategy == "gossip-exponential":
        rounds = max(1, math.ceil(math.log2(w))) if w > 1 else 0
        crossing = sum(1 for k in range(rounds) if 2**k % w >= local) / rounds if rounds else 0
        slow = crossing * (net.alpha_inter_s + b / net.beta_inter)
        fast = (1 - crossing) * (net.alpha_intra_s + b / net.beta_intra)
        return Cost(strategy, b if w > 1 else 0.0, crossing * b, 1 if w > 1 else 0,
                    slow + fast if w > 1 else 0.0)  # fmt: skip
    if strategy == "local_sgd":
        every = cost("flat", world=w, node_size=local, gradient_bytes=b, network=net)
        return Cost(strategy, every.bytes_per_rank / local_steps,
                    every.cross_node_bytes_per_rank / local_steps,
                    every.latency_terms / local_steps, every.seconds / local_steps)  # fmt: skip
    shard = b / local
    intra = (3 if gloo else 2) * (local - 1) / local * b
    cross = 2 * (nodes - 1) / nodes * shard / compression
    terms_intra, terms_cross = 2 * (local - 1) * buckets, 2 * (nodes - 1) * buckets
    seconds = (terms_intra * net.alpha_intra_s + intra / net.beta_intra
               + terms_cross * net.alpha_inter_s + cross / net.beta_inter)  # fmt: skip
    return Cost(strategy, intra + cross, cross, terms_intra + terms_cross, seconds)


def table(
    *, world: int, node_size: int, gradient_bytes: float, buckets: int = 1,
    compression: float = 1.0, local_steps: int = 8, network: Network | None = None,
) -> list[Cost]:  # fmt: skip
    """Every strategy's cost (hierarchical twice when ``compression`` > 1: with and without)."""
    costs = [cost(s, world=world, node_size=node_size, gradient_bytes=gradient_bytes,
                  buckets=buckets, local_steps=local_steps, network=network)
             for s in STRATEGIES]  # fmt: skip
    if compression > 1:
        compressed = cost("hierarchical", world=world, node_size=node_size,
                          gradient_bytes=gradient_bytes, buckets=buckets,
                          compression=compression, network=network)  # fmt: skip
        costs.append(Cost(f"hierarchical+{compression:g}×", compressed.bytes_per_rank,
                          compressed.cross_node_bytes_per_rank, compressed.latency_terms,
                          compressed.seconds))  # fmt: skip
    return costs


def format_table(costs: list[Cost]) -> str:
    lines = [f"{'strategy':<22} {'MB/rank':>10} {'cross-node MB/rank':>19} {'α terms':>8} "
             f"{'predicted ms':>13}"]  # fmt: skip
    for c in costs:
        lines.append(f"{c.strategy:<22} {c.bytes_per_rank / 1e6:>10.2f} "
                     f"{c.cross_node_bytes_per_rank / 1e6:>19.2f} {c.latency_terms:>8.4g} "
                     f"{c.seconds * 1e3:>13.3f}")  # fmt: skip
    return "\n".join(lines)


def loopback_bytes() -> int:
    """Bytes this machine has sent over its loopback interface (``/proc/net/dev``): what the
    model is checked against when all ranks run on one machine."""
    with open("/proc/net/dev") as handle:
        for line in handle:
            name, _, fields = line.partition(":")
            if name.strip() == "lo":
                return int(fields.split()[8])
    raise RuntimeError("no loopback interface in /proc/net/dev")
