"""Routed experts without the per-expert Python loop: the drop-in `FastExperts` for `model.moe.Experts`.

Which way runs depends on the work, not on the result (all equal the reference loop):

    training, CPU            per-expert GEMMs with a hand-written backward (expert_ffn.py)
    CUDA                     torch._grouped_mm: all experts in three GEMMs, no host sync
    decode, engine copies    every expert on every token, unchosen ones weighted 0 (two matmuls)
    other no-grad, compiled  zero-padded batched matmuls (`padded_experts`)
"""
from __future__ import annotations

import functools
import warnings

import torch
import torch.nn.functional as F

from nanoseek.kernels.decode_weights import engine_copies
from nanoseek.kernels.expert_ffn import expert_ffn
from nanoseek.model.moe import Experts

DENSE_DECODE_MAX_BYTES = 1 << 30  # the engine's all-experts copies double the experts' memory
# Up to this many tokens a decode step runs every expert on every token; above it the wasted
# FLOPs of unchosen experts outgrow what skipping the grouping saves.
DENSE_DECODE_MAX_TOKENS = 64
# Up to this many routed slots per expert (on average), and from one per expert, a no-grad forward
# pads experts to equal blocks; above it the padding costs more than one GEMM call per expert.
PADDED_MAX_ROWS_PER_EXPERT = 64


@torch.library.custom_op("nanoseek::padded_experts", mutates_args=())
def padded_experts(xs: torch.Tensor, expert: torch.Tensor, counts: torch.Tensor, gate: torch.Tensor,
                   up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """xs [M, D] sorted by expert (expert [M] their ids, counts [E]) -> each row's FFN output [M, D].

    All experts in three batched matmuls over zero-padded blocks of up to max-count tokens: for
    few tokens per expert (decoding) the padding costs less than E small matmul calls. Tokens
    are the blocks' columns (W [out, in] @ X^T): the weights' stored layout, which CPU batched
    matmul runs faster than transposed weights. A custom op because the block size depends
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


@functools.cache
def grouped_mm_runs(device: torch.device, dtype: torch.dtype, dim: int, hidden: int) -> bool:
    """Whether torch._grouped_mm runs the experts' shapes here (it needs a recent GPU, and some
    dtypes and sizes); when not, says so once and the experts take the per-expert GEMMs."""
    try:
        x = torch.zeros(16, dim, device=device, dtype=dtype)
        offs = torch.tensor([8, 16], device=device, dtype=torch.int32)
        torch._grouped_mm(x, torch.zeros(2, dim, hidden, device=device, dtype=dtype), offs=offs)
        return True
    except (RuntimeError, AttributeError, TypeError, NotImplementedError) as e:
        warnings.warn(f"torch._grouped_mm cannot run {dtype} experts on {device} ({e}); "
                      "the routed experts run one GEMM per expert instead", stacklevel=2)
        return False


class FastExperts(Experts):
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
        less than grouping."""
        gu_t, down_t = copies
        N, (E, I, _) = x.shape[0], self.gate_proj.shape
        gu = (x @ gu_t).view(N, E, 2, I)
        w = x.new_zeros(N, E).scatter_(1, idx, weights.to(x.dtype))      # [N, E], 0 = not chosen
        h = F.silu(gu[:, :, 0]).mul_(gu[:, :, 1]).mul_(w.unsqueeze(-1))  # [N, E, I]
        return h.view(N, E * I) @ down_t

    def _grouped_ffn(self, xs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """xs [M, D] grouped by expert -> [M, D]: all experts in three grouped GEMMs, no host sync."""
        offs = counts.cumsum(0).to(torch.int32)
        mm = lambda a, w: torch._grouped_mm(a, w.transpose(-2, -1).to(a.dtype), offs=offs)  # noqa: E731
        return mm(F.silu(mm(xs, self.gate_proj)) * mm(xs, self.up_proj), self.down_proj)

    def forward(self, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, D], idx/weights [N, k] -> y [N, D], tokens per expert [E], as `Experts.forward`."""
        N, k = idx.shape
        E, I, D = self.gate_proj.shape
        flat = idx.reshape(-1)
        # (not bincount, whose output shape depends on the ids: torch.compile would break the graph)
        counts = torch.zeros(E, dtype=torch.long, device=x.device).scatter_add_(0, flat, torch.ones_like(flat))
        copies = engine_copies(self) if N <= DENSE_DECODE_MAX_TOKENS and N * k >= E else None
        if copies is not None:  # a decode step whose tokens touch most experts
            return self._dense_ffn(x, idx, weights, copies), counts
        order = flat.argsort(stable=True)                                 # token slots sorted by expert
        src, row_w = order // k, weights.reshape(-1)[order].to(x.dtype)  # each slot's token and routing weight
        grouped = x.is_cuda and grouped_mm_runs(x.device, x.dtype, D, I)
        # A compiled decode always pads, as the per-expert GEMMs would break the graph. Eager, padding
        # pays only when most experts have tokens: the blocks of experts without any still get multiplied.
        padded = not torch.is_grad_enabled() and (
            torch.compiler.is_compiling() or E <= N * k <= PADDED_MAX_ROWS_PER_EXPERT * E)
        if not (grouped or padded):
            return expert_ffn(x, src, counts.tolist(), self.gate_proj, self.up_proj, self.down_proj, row_w), counts
        xs = x.index_select(0, src)                                      # [N*k, D], grouped by expert
        ys = (self._grouped_ffn(xs, counts) if grouped
              else padded_experts(xs, flat[order], counts, self.gate_proj, self.up_proj, self.down_proj))
        return torch.zeros_like(x).index_add_(0, src, ys * row_w.unsqueeze(-1)), counts
