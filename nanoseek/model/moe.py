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
from nanoseek.model.expert_ffn import expert_ffn
from nanoseek.model.linear import Linear, engine_copies


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x)). Dense layers and shared experts."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = Linear(dim, hidden, bias=False)
        self.up_proj = Linear(dim, hidden, bias=False)
        self.down_proj = Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():  # training: the hand-written backward keeps 2 activations, not 5
            w = [m.weight.unsqueeze(0) for m in (self.gate_proj, self.up_proj, self.down_proj)]
            return expert_ffn(x.reshape(-1, x.shape[-1]), None, [x.numel() // x.shape[-1]], *w).view_as(x)
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

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [N, D] -> weights [N, k], expert ids [N, k], all scores [N, E] (for the balance loss)."""
        scores = F.linear(x.float(), self.weight.float()).sigmoid()      # [N, E]
        biased = scores.detach() + self.e_score_correction_bias
        if self.n_group > 1:
            N = x.shape[0]
            grouped = biased.view(N, self.n_group, -1)
            group_scores = grouped.topk(2, dim=-1).values.sum(-1)       # [N, G]
            keep = group_scores.topk(self.topk_group, dim=-1).indices
            group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep, True)
            biased = grouped.masked_fill(~group_mask.unsqueeze(-1), float("-inf")).view(N, -1)
        idx = biased.topk(self.top_k, dim=-1).indices                    # [N, k]
        weights = scores.gather(1, idx)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return weights * self.scaling, idx, scores


_GROUPED_MM = {"ok": hasattr(torch, "_grouped_mm")}
DENSE_DECODE_MAX_BYTES = 1 << 30  # the engine's all-experts copies double the experts' memory
# Above this many tokens a decode step's experts run grouped (padded). Tiny preset, 2-core CPU,
# limit 64 vs 32, greedy decode: batch 48 eager 1.21x, batch 64 eager 0.99x, compiled 1.08-1.20x.
DENSE_DECODE_MAX_TOKENS = 64


@torch.library.custom_op("nanoseek::padded_experts", mutates_args=())
def padded_experts(xs: torch.Tensor, expert: torch.Tensor, counts: torch.Tensor, gate: torch.Tensor,
                   up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """xs [M, D] sorted by expert (expert [M] their ids, counts [E]) -> each row's FFN output [M, D].

    All experts in three batched matmuls over zero-padded blocks of up to max-count tokens: for
    few tokens per expert (decoding) the padding costs less than E small matmul calls. Tokens
    are the blocks' columns (W [out, in] @ X^T): the weights' stored layout, which CPU batched
    matmul runs ~2x faster than transposed weights. A custom op because the block size depends
    on the routing: torch.compile sees one call with a static [M, D] result, not a graph break."""
    E, cap = counts.shape[0], int(counts.max())
    slot = torch.arange(len(xs), device=xs.device) - (counts.cumsum(0) - counts)[expert]  # column in its block
    xt = xs.new_zeros(E, xs.shape[-1], cap)
    xt[expert, :, slot] = xs                                              # [E, D, cap]
    h = F.silu(torch.bmm(gate, xt)) * torch.bmm(up, xt)                   # [E, I, cap]
    return torch.bmm(down, h)[expert, :, slot]                            # [M, D]


@padded_experts.register_fake
def _(xs, expert, counts, gate, up, down):
    return torch.empty_like(xs)


class Experts(nn.Module):
    """n routed SwiGLU experts stored stacked ([E, out, in]) so tokens run grouped by expert."""

    def __init__(self, n: int, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Parameter(torch.empty(n, hidden, dim))
        self.up_proj = nn.Parameter(torch.empty(n, hidden, dim))
        self.down_proj = nn.Parameter(torch.empty(n, dim, hidden))

    def _grouped_ffn(self, xs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """All experts in three grouped GEMMs, no host sync (GPU)."""
        offs = counts.cumsum(0).to(torch.int32)
        try:
            mm = lambda a, w: torch._grouped_mm(a, w.transpose(-2, -1).to(a.dtype), offs=offs)  # noqa: E731
            return mm(F.silu(mm(xs, self.gate_proj)) * mm(xs, self.up_proj), self.down_proj)
        except (RuntimeError, AttributeError, TypeError):  # unsupported GPU/dtype: loop from now on
            _GROUPED_MM["ok"] = False
            return expert_ffn(xs, None, counts.tolist(), self.gate_proj, self.up_proj, self.down_proj)

    def decode_copies(self) -> tuple[torch.Tensor, ...] | None:
        """All experts side by side for `_dense_ffn`: [g | u] of every expert as one [D, E*2I]
        matrix, the down projections as one [E*I, D]. None (no dense decoding) when the copies
        would cost more than DENSE_DECODE_MAX_BYTES."""
        E, I, D = self.gate_proj.shape
        if 3 * E * I * D * self.gate_proj.element_size() > DENSE_DECODE_MAX_BYTES:
            return None
        gu = torch.stack([self.gate_proj, self.up_proj], 1).detach()     # [E, 2, I, D]
        return gu.reshape(E * 2 * I, D).t().contiguous(), self.down_proj.detach().transpose(1, 2).reshape(E * I, D)

    def _dense_ffn(self, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor, copies) -> torch.Tensor:
        """Every expert on every token, unchosen ones weighted 0: two plain matmuls, no sorting or
        scatter. For a decode step whose few tokens touch most experts anyway, the extra FLOPs cost
        less than grouping (tiny preset, 16 tokens: 0.62 ms vs 1.07 ms per layer)."""
        gu_t, down_t = copies
        N, (E, I, _) = x.shape[0], self.gate_proj.shape
        gu = (x @ gu_t).view(N, E, 2, I)
        w = x.new_zeros(N, E).scatter_(1, idx, weights.to(x.dtype))      # [N, E], 0 = not chosen
        h = F.silu(gu[:, :, 0]).mul_(gu[:, :, 1]).mul_(w.unsqueeze(-1))  # [N, E, I]
        return h.view(N, E * I) @ down_t

    def forward(self, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, D], idx/weights [N, k] -> y [N, D], tokens per expert [E]."""
        N, k = idx.shape
        flat = idx.reshape(-1)
        # (not bincount, whose output shape depends on the ids: torch.compile would break the graph)
        counts = torch.zeros(self.gate_proj.shape[0], dtype=torch.long, device=x.device)
        counts.scatter_add_(0, flat, torch.ones_like(flat))
        copies = engine_copies(self) if N <= DENSE_DECODE_MAX_TOKENS and N * k >= len(counts) else None
        if copies is not None:  # a decode step whose tokens touch most experts
            return self._dense_ffn(x, idx, weights, copies), counts
        order = flat.argsort(stable=True)                                 # token slots sorted by expert
        src, row_w = order // k, weights.reshape(-1)[order].to(x.dtype)  # each slot's token and routing weight
        grouped = x.is_cuda and _GROUPED_MM["ok"]
        # decoding (<= 64 rows per expert on average): zero-padded batched matmuls measured faster on
        # CPU; a compiled decode always takes them, as the per-expert loop below would break the graph
        padded = not torch.is_grad_enabled() and (torch.compiler.is_compiling() or 1 < N and N * k <= 64 * len(counts))
        if not (grouped or padded):  # GEMMs per expert (on CPU faster than torch._grouped_mm)
            return expert_ffn(x, src, counts.tolist(), self.gate_proj, self.up_proj, self.down_proj, row_w), counts
        xs = x.index_select(0, src)                                      # [N*k, D], grouped by expert
        ys = (self._grouped_ffn(xs, counts) if grouped
              else padded_experts(xs, flat[order], counts, self.gate_proj, self.up_proj, self.down_proj))
        y = torch.zeros_like(x).index_add_(0, src, ys * row_w.unsqueeze(-1))
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
