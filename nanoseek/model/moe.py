"""DeepSeekMoE: fine-grained routed experts + always-on shared experts, aux-loss-free balancing.

    s_i   = sigmoid(u · e_i)                          affinity of token u to expert i
    pick  = top-k of (s_i + b_i) inside the topk_group best groups (group score: sum of its top-2)
    g_i   = s_i / sum_{j in pick} s_j * routed_scaling_factor      (bias b only steers selection)
    y     = sum_i g_i FFN_i(u) + sum shared FFN(u)

b is not trained by gradient: after each optimizer step the trainer nudges it toward equal
load, b_i -= gamma * sign(load_i - mean_load) (`update_balancing_bias`). A tiny sequence-wise
balance loss (alpha) guards against extreme imbalance inside one sequence.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.config import ModelConfig


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x)). Dense layers and shared experts."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Gate(nn.Module):
    """Sigmoid router with group-limited top-k and a selection-only correction bias."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.top_k, self.n_group, self.topk_group = cfg.num_experts_per_tok, cfg.n_group, cfg.topk_group
        self.n_experts = cfg.n_routed_experts
        self.scaling, self.norm_topk_prob = cfg.routed_scaling_factor, cfg.norm_topk_prob
        self.weight = nn.Parameter(torch.empty(self.n_experts, cfg.hidden_size))
        # fp32 always: tiny bias steps (1e-3) must not round away in bf16.
        self.register_buffer("e_score_correction_bias", torch.zeros(self.n_experts, dtype=torch.float32))
        # Routing replay (R3): expert ids [N, k] for the next forward's N tokens, set from outside (RL replays
        # the rollout engine's choice in the training forward). Rows of -1 choose for themselves. Only the
        # selection is replayed: the weights are this gate's affinities at those experts, so it still learns.
        self.replay: torch.Tensor | None = None

    def select(self, scores: torch.Tensor) -> torch.Tensor:
        """Affinities [N, E] -> the top-k experts [N, k] of (s + b) inside the topk_group best groups."""
        biased = scores.detach() + self.e_score_correction_bias
        if self.n_group > 1:
            N = scores.shape[0]
            grouped = biased.view(N, self.n_group, -1)
            group_scores = grouped.topk(2, dim=-1).values.sum(-1)       # [N, G]
            keep = group_scores.topk(self.topk_group, dim=-1).indices
            group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep, True)
            biased = grouped.masked_fill(~group_mask.unsqueeze(-1), float("-inf")).view(N, -1)
        return biased.topk(self.top_k, dim=-1).indices                   # [N, k]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [N, D] -> weights [N, k], expert ids [N, k], all scores [N, E] (for the balance loss)."""
        scores = F.linear(x.float(), self.weight.float()).sigmoid()      # [N, E]
        idx = self.select(scores)
        if self.replay is not None:
            forced = self.replay.to(idx.device)
            idx = torch.where(forced >= 0, forced, idx)
        weights = scores.gather(1, idx)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return weights * self.scaling, idx, scores


class Experts(nn.Module):
    """n routed SwiGLU experts, stored stacked ([E, out, in]) as HF checkpoints keep them per expert."""

    def __init__(self, n: int, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Parameter(torch.empty(n, hidden, dim))
        self.up_proj = nn.Parameter(torch.empty(n, hidden, dim))
        self.down_proj = nn.Parameter(torch.empty(n, dim, hidden))

    def forward(self, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, D], idx/weights [N, k] -> y [N, D] = sum_k g_k FFN_{idx_k}(x), tokens per expert [E].

        One expert at a time over the tokens that chose it, as DeepSeek's reference inference
        does; `nanoseek.kernels` replaces this loop by grouped GEMMs."""
        counts = torch.bincount(idx.flatten(), minlength=self.gate_proj.shape[0])
        weights = weights.to(x.dtype)
        y = torch.zeros_like(x)
        for e in range(self.gate_proj.shape[0]):
            token, slot = torch.where(idx == e)                            # who chose e, as which of its k
            xe = x[token]                                                  # [n_e, D]
            h = F.silu(F.linear(xe, self.gate_proj[e])) * F.linear(xe, self.up_proj[e])  # [n_e, I]
            y.index_add_(0, token, F.linear(h, self.down_proj[e]) * weights[token, slot, None])
        return y, counts


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_experts, self.top_k, self.alpha = cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.aux_loss_alpha
        self.gate = Gate(cfg)
        self.experts = Experts(cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size)
        self.shared_experts = (MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts)
                               if cfg.n_shared_experts else None)
        # Tokens routed to each expert since the last bias update (summed over micro-batches).
        self.register_buffer("load", torch.zeros(cfg.n_routed_experts), persistent=False)
        self.aux_loss: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, T, D] -> [B, T, D]
        B, T, D = x.shape
        flat = x.reshape(-1, D)
        weights, idx, scores = self.gate(flat)
        y, counts = self.experts(flat, idx, weights)
        if self.training:
            self.load += counts.to(self.load.dtype)
            self.aux_loss = self._sequence_balance_loss(scores.view(B, T, -1), idx.view(B, T, -1)) if self.alpha else None
        y = y.view(B, T, D)
        return y + self.shared_experts(x) if self.shared_experts is not None else y

    def _sequence_balance_loss(self, scores: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """V3 eq. 17-20: alpha * sum_i f_i P_i per sequence, averaged over sequences."""
        B, T, E = scores.shape
        chosen = torch.zeros(B, T, E, device=scores.device).scatter_(2, idx, 1.0)
        f = chosen.sum(1) * E / (self.top_k * T)                          # [B, E] load fraction (x E/k)
        p = (scores / scores.sum(-1, keepdim=True)).mean(1)               # [B, E] mean normalized affinity
        return self.alpha * (f * p).sum(-1).mean()


def moe_layers(model: nn.Module) -> list[MoE]:
    return [m for m in model.modules() if isinstance(m, MoE)]


@torch.no_grad()
def update_balancing_bias(model: nn.Module, gamma: float, all_reduce=None) -> dict[str, float]:
    """Aux-loss-free balancing step, run by the trainer after optimizer.step().

    b_i -= gamma * sign(load_i - mean(load)). `all_reduce` (e.g. a torch.distributed sum) makes
    the load global so every rank applies the identical update. Returns the max/mean load
    ratio of the step (1.0 = perfectly balanced), averaged over MoE layers, for logging.
    """
    layers = moe_layers(model)
    if not layers:
        return {}
    loads = torch.stack([m.load for m in layers])                         # [L, E]
    if all_reduce is not None:
        all_reduce(loads)
    mean = loads.mean(-1, keepdim=True)
    if gamma:
        for m, load, mu in zip(layers, loads, mean):
            m.gate.e_score_correction_bias -= gamma * torch.sign(load - mu).to(torch.float32)
    for m in layers:
        m.load.zero_()
    ratio = (loads.max(-1).values / mean.squeeze(-1).clamp_min(1e-9))
    return {"load_max_over_mean": ratio.mean().item(), "load_max_over_mean_per_layer": ratio.tolist()}


def balance_losses(model: nn.Module) -> torch.Tensor | None:
    losses = [m.aux_loss for m in moe_layers(model) if m.aux_loss is not None]
    return torch.stack(losses).sum() if losses else None
