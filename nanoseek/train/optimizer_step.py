"""The optimizer step every stage takes: the Trainer's (pretrain, SFT, distillation, context extension) and
GRPO's. After the backward passes: the global gradient norm, clipped; a step whose loss or norm is not
finite skipped whole (counted); otherwise AdamW and the MoE routing-bias update; then the lr schedule
and the gradients cleared for the next step."""
from __future__ import annotations

from typing import Any, Callable

import torch

from nanoseek.model.moe import moe_layers, update_balancing_bias


def clip_grad_norm(model: torch.nn.Module, max_norm: float) -> torch.Tensor:
    """The global norm of the gradients, which are scaled down to at most max_norm (0 = no clipping).
    DTensor parameters (FSDP, expert parallel): the norm of the full tensors, the same on every rank."""
    params = [p for p in model.parameters() if p.grad is not None]
    if not params:
        return torch.zeros(())
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


class OptimizerStep:
    """`step(bias_gamma)` applies the accumulated gradients. `all_reduce` sums the MoE expert loads over the
    ranks, so that every rank takes the identical bias step; `scheduler` (optional) steps whether or not
    the step was skipped, so the lr stays a function of the step count."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, grad_clip: float,
                 scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
                 all_reduce: Callable[[torch.Tensor], Any] | None = None):
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.grad_clip, self.all_reduce = grad_clip, all_reduce
        self.has_moe = bool(moe_layers(model))
        self.skipped = 0  # steps skipped for a non-finite loss or gradient norm
        optimizer.zero_grad(set_to_none=True)  # the first step applies its own gradients alone, as every later one

    def step(self, bias_gamma: float, finite: bool = True) -> tuple[torch.Tensor, bool, dict[str, Any]]:
        """(gradient norm, applied, the MoE load balance row). finite=False: the caller's loss was not finite
        (its backward may not have run for every micro-batch). A skipped step reaches neither the weights,
        nor Adam's moments, nor the routing bias: its expert loads are dropped too."""
        norm = clip_grad_norm(self.model, self.grad_clip)
        applied = finite and bool(torch.isfinite(norm))
        balance: dict[str, Any] = {}
        if applied:
            self.optimizer.step()
            if self.has_moe:
                balance = update_balancing_bias(self.model, bias_gamma, self.all_reduce)
        else:
            self.skipped += 1
            for m in moe_layers(self.model):
                m.load.zero_()
        if self.scheduler is not None:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm, applied, balance
