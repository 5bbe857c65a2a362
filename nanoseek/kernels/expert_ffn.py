"""SwiGLU experts with a hand-written backward, gather and scatter included; the dense MLP as one expert.

    xs = x[src]                                                          rows grouped by expert
    ys[rows of e] = (silu(xs_e G_e^T) * (xs_e U_e^T) * w) D_e^T          three GEMMs per expert
    y  = sum over rows r of ys[r] into y[src[r]]                         back to token order

Autograd through this would keep the gathered rows, both up-projections, silu's output, their
product and the expert outputs: ~7 activations per routed slot. This keeps only the two
up-projections (x itself is kept by the router anyway) and recomputes the gather, silu and the
products in backward (copies and elementwise work, cheap next to the GEMMs): the largest saving
of activation memory in `benchmarks/train_memory.py`. The dense MLP (dense layers, shared experts,
the dense student) is the same function with one expert and every row in order (`FastMLP`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from nanoseek.kernels.compute_dtype import compute_dtype
from nanoseek.model.moe import MLP


def _blocks(sizes: list[int]) -> list[tuple[int, int, int]]:
    """(expert, first row, end row) for each expert with rows."""
    out, start = [], 0
    for e, n in enumerate(sizes):
        if n:
            out.append((e, start, start + n))
        start += n
    return out


def _weight_grad(w: torch.Tensor, blocks: list[tuple[int, int, int]]) -> torch.Tensor:
    """Gradient buffer for stacked expert weights [E, ...]: each expert with rows is written whole
    by one mm, so only the idle ones are zeroed (zeroing all of it would be a full extra pass over
    the experts' weights)."""
    d = torch.empty_like(w)
    idle = sorted(set(range(w.shape[0])) - {e for e, _, _ in blocks})
    if idle:
        d[idle] = 0
    return d


class _ExpertFFN(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, src, row_w, w_gate, w_up, w_down, sizes):
        xs = x if src is None else x.index_select(0, src)               # [M, D]
        M, I = xs.shape[0], w_gate.shape[1]
        blocks = _blocks(sizes)
        g, u = xs.new_empty(M, I), xs.new_empty(M, I)                     # the up-projections
        for e, a, b in blocks:
            torch.mm(xs[a:b], w_gate[e].t(), out=g[a:b])
            torch.mm(xs[a:b], w_up[e].t(), out=u[a:b])
        h = F.silu(g).mul_(u)
        if row_w is not None:
            h.mul_(row_w.unsqueeze(-1))
        ys = torch.empty_like(xs)
        for e, a, b in blocks:
            torch.mm(h[a:b], w_down[e].t(), out=ys[a:b])
        ctx.blocks = blocks
        ctx.save_for_backward(x, src, row_w, w_gate, w_up, w_down, g, u)
        return ys if src is None else torch.zeros_like(x).index_add_(0, src, ys)

    @staticmethod
    def backward(ctx, dy):
        x, src, row_w, w_gate, w_up, w_down, g, u = ctx.saved_tensors
        need_x, _, need_w, need_gate, need_up, need_down, _ = ctx.needs_input_grad
        s = F.silu(g)
        h = s * u
        dys = dy.contiguous() if src is None else dy.index_select(0, src)  # [M, D]
        dh = torch.empty_like(h)
        d_down = _weight_grad(w_down, ctx.blocks) if need_down else None
        for e, a, b in ctx.blocks:
            torch.mm(dys[a:b], w_down[e], out=dh[a:b])
            if d_down is not None:
                hw = h[a:b] if row_w is None else h[a:b] * row_w[a:b].unsqueeze(-1)
                torch.mm(dys[a:b].t(), hw, out=d_down[e])
        d_row_w = (dh * h).sum(-1) if row_w is not None and need_w else None
        if row_w is not None:
            dh.mul_(row_w.unsqueeze(-1))
        # ATen's fused silu' (one pass, not the six of sig * (1 + g * (1 - sig)))
        dg, du = torch.ops.aten.silu_backward(dh * u, g), dh.mul_(s)
        xs = x if src is None or not (need_gate or need_up) else x.index_select(0, src)
        dxs = torch.empty_like(dys) if need_x else None
        d_gate = _weight_grad(w_gate, ctx.blocks) if need_gate else None
        d_up = _weight_grad(w_up, ctx.blocks) if need_up else None
        for e, a, b in ctx.blocks:
            if dxs is not None:
                torch.mm(dg[a:b], w_gate[e], out=dxs[a:b])
                torch.addmm(dxs[a:b], du[a:b], w_up[e], out=dxs[a:b])  # out=, not addmm_: FLOP counters see it
            if d_gate is not None:
                torch.mm(dg[a:b].t(), xs[a:b], out=d_gate[e])
            if d_up is not None:
                torch.mm(du[a:b].t(), xs[a:b], out=d_up[e])
        dx = dxs if src is None or not need_x else torch.zeros_like(x).index_add_(0, src, dxs)
        return dx, None, d_row_w, d_gate, d_up, d_down, None


def expert_ffn(x: torch.Tensor, src: torch.Tensor | None, sizes: list[int], w_gate: torch.Tensor, w_up: torch.Tensor,
               w_down: torch.Tensor, row_w: torch.Tensor | None = None) -> torch.Tensor:
    """x [N, D]; src [M]: the row of x each expert slot takes, grouped by expert (sizes[e] slots
    for expert e), or None for x's rows in order (with one expert: a dense SwiGLU); weights
    [E, I, D] / [E, D, I]; row_w [M]: each slot's routing weight, or None -> [N, D], each row
    the sum of its slots' outputs."""
    dt = compute_dtype(x)
    w_gate, w_up, w_down = (w.to(dt) for w in (w_gate, w_up, w_down))
    return _ExpertFFN.apply(x.to(dt), src, None if row_w is None else row_w.to(dt), w_gate, w_up, w_down, sizes)


class FastMLP(MLP):
    """`MLP` whose training forward keeps 2 activations instead of autograd's 5 (module docstring)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled():
            return super().forward(x)
        w = [m.weight.unsqueeze(0) for m in (self.gate_proj, self.up_proj, self.down_proj)]  # [1, out, in]
        return expert_ffn(x.reshape(-1, x.shape[-1]), None, [x.numel() // x.shape[-1]], *w).view_as(x)
