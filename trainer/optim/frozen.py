"""AdamW whose second moment stops updating after a warm-up: 1-bit Adam's "frozen variance"
(Tang et al., 2021), for gradients that arrive compressed with error feedback.

Why: top-k and sign send what error feedback has held back in bursts — a coordinate left out
for k steps arrives with k steps of gradient at once. Adam divides each coordinate by the
root of its running mean square, so a burst of size k·g lifts that root by about √(1−β2)·k·g
and moves the weight about as far as a single step would: most of the delayed gradient is
lost (under AdamW (0.9, 0.95) a burst after ~100 steps moves a weight ~6 steps' worth,
against 100 dense). With the variance frozen at the end of the warm-up, the update is linear
in the gradient again — m / √v_frozen — and a burst moves the weight as far as its steps
would have one by one. 1-bit Adam freezes after a dense warm-up for the same reason; here the
warm-up is ``compression.start_step``, whose steps send exact (bf16) gradients.

Until ``freeze_step`` the update is torch.optim.AdamW's single-tensor one, operation for
operation (bit-identical, tested); the state has AdamW's keys (step, exp_avg, exp_avg_sq),
so checkpoints load either way.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch


class FrozenVarianceAdamW(torch.optim.Optimizer):
    def __init__(self, params: Iterable[torch.nn.Parameter], *, lr: float,
                 betas: tuple[float, float], eps: float, weight_decay: float,
                 freeze_step: int) -> None:  # fmt: skip
        if freeze_step < 1:
            raise ValueError(f"freeze_step must be >= 1, got {freeze_step}")
        defaults = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay,
                    "freeze_step": freeze_step}  # fmt: skip
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        assert closure is None, "FrozenVarianceAdamW takes no closure"
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, eps, decay, freeze = group["lr"], group["eps"], group["weight_decay"], \
                group["freeze_step"]  # fmt: skip
            for param in group["params"]:
                if param.grad is None:
                    continue
                grad = param.grad
                state = self.state[param]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(
                        param, memory_format=torch.preserve_format
                    )
                state["step"] += 1
                step = int(state["step"].item())
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                param.mul_(1 - lr * decay)
                exp_avg.lerp_(grad, 1 - beta1)
                if step <= freeze:
                    exp_avg_sq.mul_(beta2).addcmul_(grad, grad.conj(), value=1 - beta2)
                bias_correction1 = 1 - beta1**step
                bias_correction2 = 1 - beta2 ** min(step, freeze)
                step_size = lr / bias_correction1
                denom = (exp_avg_sq.sqrt() / bias_correction2**0.5).add_(eps)
                param.addcdiv_(exp_avg, denom, value=-step_size)
