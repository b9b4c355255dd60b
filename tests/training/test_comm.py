"""The all-reduce strategies (``trainer.comm``): the hierarchical two-level all-reduce and the
flat one average exactly what a plain all-reduce does; compression under the hierarchical
hook applies to the cross-node step only. One torchrun launch of ``comm_worker.py`` (4 gloo
ranks) produces the figures; the trainer runs of both strategies are layouts in
``test_parallel.py``.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from typing import Any

import numpy as np
import pytest

from trainer.comm import pieces
from trainer.comm.model import cost, table
from trainer.compression import Segment, tile

from .conftest import ROOT, free_port, trainer_env


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("comm") / "result.json"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=4",
               "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}",
               str(ROOT / "tests" / "training" / "comm_worker.py"), str(out)]  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, env=trainer_env(), capture_output=True, text=True,
                          timeout=240)  # fmt: skip
    assert done.returncode == 0, done.stderr[-6000:]
    result: dict[str, Any] = json.loads(out.read_text())
    return result


@pytest.mark.timeout(300)
def test_hierarchical_average_equals_a_plain_all_reduce(worker: dict[str, Any]) -> None:
    cases = worker["buffers"]
    assert sorted(cases) == sorted(f"{n}x{length}" for n in (1, 2, 4)
                                   for length in (1, 3, 1001, 65536))  # fmt: skip
    for name, case in cases.items():
        assert case["ranks_agree"], name
        # Sums in another order: float32 rounding, no more.
        assert case["max_diff"] <= 1e-6, (name, case)


@pytest.mark.timeout(300)
def test_every_strategy_trains_like_ddps_ring(worker: dict[str, Any]) -> None:
    training = worker["training"]
    ring = training["ring"]["losses"]
    for how in ("hierarchical", "flat"):
        np.testing.assert_allclose(training[how]["losses"], ring, rtol=1e-6, atol=1e-6)
        assert training[how]["max_weight_diff"] <= 1e-6, (how, training[how])


@pytest.mark.timeout(300)
def test_compression_applies_to_the_cross_node_shard_only(worker: dict[str, Any]) -> None:
    # 2 nodes × 2: each rank carries half the bucket across nodes, in fp16.
    case = worker["compressed"]
    shard = math.ceil(case["entries"] / 2)
    assert case["dense"] == shard * 4
    assert case["sent"] == shard * 2


def test_pieces_keep_whole_rows_as_matrices() -> None:
    segments = tile([("w", (4, 3)), ("b", (3,))])  # entries 0..11 and 12..14
    # Entries 2..13: the end of w's row 0, rows 1–3 whole, the first two entries of b.
    got = pieces(segments, 2, 14)
    assert got == (
        Segment("w@2", 0, (1,)),
        Segment("w@3", 1, (3, 3)),
        Segment("b@0", 10, (2,)),
    )
    assert sum(s.numel for s in got) == 12
    # A parameter wholly inside keeps its name and shape.
    assert pieces(segments, 0, 15) == segments
    assert pieces(segments, 12, 15) == (Segment("b", 0, (3,)),)
    # A cut inside one row only: a vector.
    assert pieces(segments, 4, 5) == (Segment("w@4", 0, (1,)),)


@pytest.mark.timeout(300)
def test_gossip_keeps_the_mean_and_shrinks_the_spread(worker: dict[str, Any]) -> None:
    # Parameters start at r + 1 on rank r of 4: mean 2.5, spread 3.
    ring, exponential = worker["decentral"]["ring"], worker["decentral"]["exponential"]
    for case in (ring, exponential):
        np.testing.assert_allclose(case["means"], 2.5, atol=1e-6)
    # Ring weights ⅓: the spread falls 3× a round (1, ⅓, 1/9, 1/27).
    np.testing.assert_allclose(ring["spreads"], [1, 1 / 3, 1 / 9, 1 / 27], rtol=1e-5)
    # One peer at hop 1, then hop 2: exact consensus after log2(4) = 2 rounds.
    assert exponential["spreads"][0] == 2.0 and exponential["spreads"][1:] == [0, 0, 0]
    entry_bytes = 4 * ring["entries"]
    assert ring["sent"] == [2 * entry_bytes] * 4  # to both neighbours
    assert exponential["sent"] == [entry_bytes] * 4  # to one peer


@pytest.mark.timeout(300)
def test_local_sgd_and_diloco_average_every_local_steps(worker: dict[str, Any]) -> None:
    for name in ("local_sgd", "diloco"):
        case = worker["decentral"][name]
        # Synced after steps 2 and 4 (local_steps = 2), untouched between.
        assert case["spreads"] == [3.0, 0.0, 0.0, 0.0], (name, case)
        np.testing.assert_allclose(case["means"], 2.5, atol=1e-6)
        ring_all_reduce = 2 * 3 * 4 * case["entries"] // 4
        assert case["sent"] == [0, ring_all_reduce, 0, ring_all_reduce]


@pytest.mark.timeout(300)
def test_the_comm_model_predicts_the_bytes_on_the_wire(worker: dict[str, Any]) -> None:
    measured = worker["wire"]
    for strategy in ("ring", "hierarchical", "gossip-ring"):
        predicted = cost(strategy, world=4, node_size=2, gradient_bytes=measured["bytes"],
                         gloo=True)  # fmt: skip
        # TCP/IP headers and gloo's framing add ~1%; other traffic on loopback would add more.
        assert measured[strategy] == pytest.approx(predicted.bytes_per_rank, rel=0.05), strategy


def test_comm_model_formulas() -> None:
    mb = 1e6
    ring = cost("ring", world=8, node_size=4, gradient_bytes=mb, buckets=3)
    assert ring.bytes_per_rank == pytest.approx(2 * 7 / 8 * mb)
    assert ring.latency_terms == 2 * 7 * 3
    assert ring.cross_node_bytes_per_rank == pytest.approx(ring.bytes_per_rank / 4)
    flat = cost("flat", world=8, node_size=4, gradient_bytes=mb, buckets=3)
    assert flat.latency_terms == 14 and flat.seconds < ring.seconds
    two_level = cost("hierarchical", world=8, node_size=4, gradient_bytes=mb, compression=4)
    assert two_level.cross_node_bytes_per_rank == pytest.approx(2 * 1 / 2 * mb / 4 / 4)
    assert two_level.latency_terms == 2 * 3 + 2 * 1
    on_gloo = cost("hierarchical", world=8, node_size=4, gradient_bytes=mb, gloo=True)
    assert on_gloo.bytes_per_rank - cost("hierarchical", world=8, node_size=4,
                                         gradient_bytes=mb).bytes_per_rank == pytest.approx(
        3 / 4 * mb)  # fmt: skip
    assert cost("gossip-ring", world=8, node_size=4, gradient_bytes=mb).bytes_per_rank == 2 * mb
    assert cost("gossip-ring", world=2, node_size=1, gradient_bytes=mb).bytes_per_rank == mb
    exponential = cost("gossip-exponential", world=8, node_size=4, gradient_bytes=mb)
    assert exponential.bytes_per_rank == mb
    assert exponential.cross_node_bytes_per_rank == pytest.approx(mb / 3)  # hop 4 of 1, 2, 4
    local = cost("local_sgd", world=8, node_size=4, gradient_bytes=mb, local_steps=7)
    assert local.bytes_per_rank == pytest.approx(2 * 7 / 8 * mb / 7)
    # At 1,024 ranks the ring's 2,046 latency steps dominate; two levels cut them to 268.
    big = {c.strategy: c for c in table(world=1024, node_size=8, gradient_bytes=4 * mb)}
    assert big["ring"].latency_terms == 2046 and big["hierarchical"].latency_terms == 268
    assert big["hierarchical"].seconds < big["ring"].seconds / 5
    with pytest.raises(ValueError, match="does not split into nodes"):
        cost("ring", world=6, node_size=4, gradient_bytes=mb)
