"""Adaptive-LR optimizers: LAMB and LARS by their formulas on one process, and under FSDP2,
TP and FSDP×TP the same update as one process on the full tensors, with one collective per
shard layout per step; the schedules and the large-batch scaling rules."""

from __future__ import annotations

import itertools
import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from trainer.config import LarsConfig, OptimConfig
from trainer.optim import build_optimizer, learning_rate, peak_learning_rate
from trainer.optim.trust import Lamb, Lars, full_squared_norms

from .conftest import ROOT, TRAINER_TIMEOUT_S, free_port, trainer_env

WORKER = Path(__file__).with_name("optim_worker.py")
# Largest |sharded − one process| after a step, relative to the parameter's largest entry.
# Measured: ≤ 4.2e-6 (LAMB under TP), ≤ 1.1e-6 (LARS); reduction order is all that differs.
TOLERANCE = 2e-5


def params(*shapes: tuple[int, ...], seed: int = 0) -> list[torch.nn.Parameter]:
    generator = torch.Generator().manual_seed(seed)
    made = []
    for shape in shapes:
        param = torch.nn.Parameter(torch.randn(shape, generator=generator))
        param.grad = torch.randn(shape, generator=generator)
        made.append(param)
    return made


def test_lamb_takes_one_step_by_the_formula() -> None:
    weight, bias = params((6, 4), (4,))
    w0, b0, gw, gb = weight.detach().clone(), bias.detach().clone(), weight.grad, bias.grad
    lr, decay, eps = 0.1, 0.01, 1e-6
    Lamb([weight, bias], lr=lr, betas=(0.9, 0.99), eps=eps, weight_decay=decay).step()
    # Step 1: the bias-corrected moments are g and g², so m̂ / (√v̂ + ε) = g / (|g| + ε).
    assert gw is not None and gb is not None
    update = gw / (gw.abs() + eps) + decay * w0
    expected = w0 - lr * (w0.norm() / update.norm()) * update
    torch.testing.assert_close(weight.detach(), expected, rtol=1e-6, atol=1e-7)
    # The bias: no weight decay, no trust ratio.
    torch.testing.assert_close(bias.detach(), b0 - lr * gb / (gb.abs() + eps), rtol=1e-6,
                               atol=1e-7)  # fmt: skip


@pytest.mark.parametrize("clip", [False, True])
def test_lars_takes_two_steps_by_the_formula(clip: bool) -> None:
    (weight,) = params((5, 3))
    lr, decay, eta, momentum = 0.5, 1e-3, 0.02, 0.9
    optimizer = Lars([weight], lr=lr, momentum=momentum, weight_decay=decay,
                     trust_coefficient=eta, eps=0.0, clip=clip)  # fmt: skip
    w, buffer = weight.detach().clone(), None
    for _ in range(2):
        grad = weight.grad
        assert grad is not None
        local = eta * w.norm() / (grad.norm() + decay * w.norm())
        scale = min(local / lr, 1.0) if clip else local
        direction = scale * (grad + decay * w)
        buffer = direction if buffer is None else momentum * buffer + direction
        w = w - lr * buffer
        optimizer.step()
        torch.testing.assert_close(weight.detach(), w, rtol=1e-6, atol=1e-7)
        weight.grad = torch.randn_like(weight)
    if clip:  # with η = 0.02 the local rate sits below lr: clipping must have kept it
        assert eta * w.norm() / (weight.grad.norm() + decay * w.norm()) < lr


def test_a_zero_norm_gives_a_trust_ratio_of_one() -> None:
    (weight,) = params((3, 3))
    with torch.no_grad():
        weight.zero_()
    grad = weight.grad
    assert grad is not None
    Lamb([weight], lr=0.1, betas=(0.9, 0.99), eps=1e-6).step()
    torch.testing.assert_close(weight.detach(), -0.1 * grad / (grad.abs() + 1e-6))


def test_full_squared_norms_of_plain_tensors_need_no_process_group() -> None:
    tensors = [torch.arange(4.0), torch.ones(2, 3)]
    assert full_squared_norms(tensors) == [14.0, 6.0]
    assert full_squared_norms([]) == []


def test_the_configured_optimizer_is_built() -> None:
    weights = params((4, 4))
    kinds = {"sgd": torch.optim.SGD, "adamw": torch.optim.AdamW, "lamb": Lamb, "lars": Lars,
             "adafactor": torch.optim.Adafactor}  # fmt: skip
    for name, kind in kinds.items():
        assert isinstance(build_optimizer(OptimConfig(name=name), weights), kind)  # type: ignore[arg-type]


def test_poly_decays_to_the_floor_and_rules_scale_the_peak() -> None:
    config = OptimConfig(lr=1.0, warmup_steps=2, schedule="poly", poly_power=2.0,
                         min_lr_ratio=0.0)  # fmt: skip
    rates = [learning_rate(config, step, 12) for step in range(12)]
    assert rates[:3] == [0.5, 1.0, 1.0]
    assert rates[-1] == 0.0 and all(a >= b for a, b in itertools.pairwise(rates[1:]))
    assert rates[6] == pytest.approx((1 - 4 / 9) ** 2)
    linear = OptimConfig(lr=0.1, scale_rule="linear", base_batch=256)
    root = OptimConfig(lr=0.1, scale_rule="sqrt", base_batch=256)
    assert peak_learning_rate(linear, 2048) == pytest.approx(0.8)
    assert peak_learning_rate(root, 2048) == pytest.approx(0.1 * math.sqrt(8))
    assert learning_rate(root, 0, 10, global_batch=1024) == pytest.approx(0.2)
    with pytest.raises(ValueError, match="needs the global batch"):
        learning_rate(linear, 0, 10)


def test_bad_optimizer_settings_are_refused() -> None:
    with pytest.raises(ValueError, match=r"optim\.lars\.eps and optim\.lars\.trust_coefficient"):
        LarsConfig(trust_coefficient=0.0)
    with pytest.raises(ValueError, match="base_batch"):
        OptimConfig(base_batch=0)


def run_worker(layout: str, nproc: int, out: Path) -> dict[str, Any]:
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
               "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}",
               str(WORKER), layout, str(out)]  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, env=trainer_env(), capture_output=True, text=True,
                          timeout=TRAINER_TIMEOUT_S)  # fmt: skip
    assert done.returncode == 0, done.stderr[-6000:]
    results: dict[str, Any] = json.loads(out.read_text())
    return results


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize(("layout", "nproc"), [("fsdp", 2), ("tp", 2), ("fsdp-tp", 4)])
def test_sharded_trust_ratios_match_one_process(layout: str, nproc: int, tmp_path: Path) -> None:
    results = run_worker(layout, nproc, tmp_path / "results.json")
    for name in ("lamb", "lars", "lars-larc"):
        result = results[name]
        assert max(result["differences"]) < TOLERANCE, (name, result)
        assert result["moved"] > 1e-2, (name, result)  # the steps did change the weights
        # One all-reduce per (mesh, sharded dims) group: FSDP 1, TP 1, FSDP×TP 3 (2-D
        # sharded weights: two dims; the rest: one) — for 25 parameters.
        assert result["collectives_per_step"] == [3 if layout == "fsdp-tp" else 1] * 3, result
        assert result["parameters"] == 25
    # The control: the same LAMB on each rank's local norms is visibly wrong, so the
    # tolerance above can see a norm that is not the full tensor's.
    assert max(results["lamb-local-norms"]["differences"]) > 100 * TOLERANCE
    assert "cannot step sharded" in results["adafactor_error"]


def test_frozen_variance_adamw_is_adamw_until_it_freezes_then_linear_in_the_gradient() -> None:
    """Bit-identical to torch.optim.AdamW (single tensor) up to freeze_step; after it the
    second moment stays, so the update is linear in the gradient: a burst of k steps of
    gradient moves the weight k times as far as one (AdamW moves it about as far as one)."""
    from trainer.optim.frozen import FrozenVarianceAdamW

    torch.manual_seed(0)
    start = torch.randn(6, 5)
    grads = [torch.randn(6, 5) for _ in range(5)]
    ours, theirs = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    frozen = FrozenVarianceAdamW([ours], lr=0.01, betas=(0.9, 0.95), eps=1e-8,
                                 weight_decay=0.1, freeze_step=5)  # fmt: skip
    adamw = torch.optim.AdamW([theirs], lr=0.01, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1,
                              foreach=False)  # fmt: skip
    for grad in grads:
        ours.grad, theirs.grad = grad.clone(), grad.clone()
        frozen.step()
        adamw.step()
        assert torch.equal(ours, theirs)
    assert torch.equal(frozen.state[ours]["exp_avg_sq"], adamw.state[theirs]["exp_avg_sq"])
    variance = frozen.state[ours]["exp_avg_sq"].clone()

    moves = {}
    for name, optimizer, param in (("frozen", frozen, ours), ("adamw", adamw, theirs)):
        for burst in (1.0, 50.0):
            state = {k: v.clone() for k, v in optimizer.state[param].items()}
            before = param.detach().clone()
            param.grad = burst * torch.ones(6, 5)
            optimizer.step()
            moves[name, burst] = float((before - param.detach()).abs().mean())
            with torch.no_grad():
                param.copy_(before)
            optimizer.state[param] = state
    assert torch.equal(frozen.state[ours]["exp_avg_sq"], variance)  # frozen
    assert moves["frozen", 50.0] > 20 * moves["frozen", 1.0]
    assert moves["adamw", 50.0] < 3 * moves["adamw", 1.0]


def test_adamw_freezes_its_variance_by_default_only_under_top_k() -> None:
    from trainer.config import load
    from trainer.optim.frozen import FrozenVarianceAdamW

    def freeze(*overrides: str) -> int:
        return load(None, list(overrides)).optim.adamw.freeze_variance_step

    assert freeze("compression.method=topk") == 20
    assert freeze("compression.method=topk", "compression.start_step=5") == 5
    assert freeze("compression.method=powersgd") == freeze("compression.method=sign") == 0
    assert freeze() == freeze("compression.method=topk", "optim.adamw.freeze_variance_step=0") == 0
    assert freeze("compression.method=sign", "optim.adamw.freeze_variance_step=20") == 20
    assert freeze("compression.method=topk", "optim.name=lamb") == -1  # not adamw: unread
    params = list(torch.nn.Linear(2, 2).parameters())
    optim = load(None, ["compression.method=topk"]).optim
    assert type(build_optimizer(optim, params)) is FrozenVarianceAdamW
    assert type(build_optimizer(OptimConfig(), params)) is torch.optim.AdamW
