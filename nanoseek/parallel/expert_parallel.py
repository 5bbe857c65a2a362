"""Expert parallelism: each rank owns E/world routed experts; tokens travel to their experts.

Per MoE layer (every rank runs the router on its own tokens, as in data parallelism):

    1. sort the (token, expert) slots by expert -> contiguous blocks per destination rank
    2. all-to-all the per-expert counts (so every rank knows how many rows it will receive)
    3. all-to-all the token rows ("dispatch"), run the local experts, all-to-all back ("combine")
    4. weight by the gate and sum the k expert outputs per token, on the token's own rank

The all-to-alls have variable splits and are wrapped in an autograd Function whose backward
is the reverse all-to-all (the functional collectives' autograd variant is not available for
every backend; this one is two lines and works on gloo and nccl alike).

Shared experts, attention and the router stay data-parallel. Expert weights become DTensors
sharded on dim 0 over the EP mesh dimension, so distributed checkpoints save each expert once
and load into any other world size. Their gradient is the sum over the tokens of the EP group;
it is scaled by 1/world, and when ep < world summed over the replicas (the same EP rank in
every group) after backward, so it equals the data-parallel mean used for every other parameter.

Node-limited routing (V3 §2.1.2: a token's experts on at most M nodes) is the router's
group-limited routing when groups coincide with nodes: experts are placed contiguously
(rank r owns experts [r*E/w, (r+1)*E/w)), so with n_group a multiple of the node count
every group lives on one node and topk_group bounds the nodes a token reaches.
`check_node_limited` states the bound for a given layout.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from nanoseek.kernels.expert_ffn import expert_ffn
from nanoseek.model.moe import Experts, MoE


class _AllToAll(torch.autograd.Function):
    """Variable-split all_to_all_single; backward sends gradients back along the same routes."""

    @staticmethod
    def forward(ctx, x, out_splits: list[int], in_splits: list[int], group):
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x.new_empty((sum(out_splits),) + tuple(x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        out_splits, in_splits = ctx.splits
        g = grad.new_empty((sum(in_splits),) + tuple(grad.shape[1:]))
        dist.all_to_all_single(g, grad.contiguous(), in_splits, out_splits, group=ctx.group)
        return g, None, None, None


def all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group=None) -> torch.Tensor:
    return _AllToAll.apply(x, out_splits, in_splits, group)


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale: float):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


class ExpertParallelExperts(nn.Module):
    """Drop-in for `Experts` (same parameter names and forward contract) holding this rank's
    slice of the experts as Shard(0) DTensors."""

    def __init__(self, experts: Experts, mesh, group=None, rep_group=None):
        """mesh: 1-D (EP over all ranks) or 2-D (replicas, EP). group: this rank's EP group for
        the all-to-alls; rep_group: the ranks holding the same experts (2-D mesh only)."""
        super().__init__()
        from torch.distributed.tensor import Replicate, Shard, distribute_tensor  # slow to import: EP runs only
        self.n_experts = experts.gate_proj.shape[0]
        self.ep = mesh.size(mesh.ndim - 1)                                # EP degree
        self.grad_scale = 1.0 / mesh.size()                               # 1 / all data-parallel ranks
        if self.n_experts % self.ep:
            raise ValueError(f"n_routed_experts={self.n_experts} is not divisible by ep={self.ep}")
        self.n_local = self.n_experts // self.ep
        # A separate gloo/nccl group: the token all-to-alls never interleave with FSDP's collectives.
        self.group = group
        placements = [Replicate()] * (mesh.ndim - 1) + [Shard(0)]
        for name in ("gate_proj", "up_proj", "down_proj"):
            full = getattr(experts, name).detach()
            # distribute_tensor scatters rank 0's copy, so all ranks start from the same experts.
            p = nn.Parameter(distribute_tensor(full, mesh, placements))
            if rep_group is not None:
                p.register_post_accumulate_grad_hook(lambda p: dist.all_reduce(p.grad.to_local(), group=rep_group))
            setattr(self, name, p)

    def forward(self, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, D], idx/weights [N, k] -> y [N, D], this rank's tokens per expert [E] (global ids)."""
        N, k = idx.shape
        W, El = self.ep, self.n_local
        flat = idx.reshape(-1)
        order = flat.argsort(stable=True)                                 # slots sorted by expert = by owner rank
        counts = torch.bincount(flat, minlength=self.n_experts)
        # recv[s, e]: rows rank s sends to my local expert e (counts travel as one small all-to-all)
        recv = torch.empty_like(counts)
        dist.all_to_all_single(recv, counts, group=self.group)
        recv = recv.view(W, El)
        send_splits = counts.view(W, El).sum(1).tolist()
        recv_splits = recv.sum(1).tolist()

        # Each row travels with its routing weight as one extra column: the experts apply it, as in one process.
        rows = torch.cat([x.index_select(0, order // k), weights.reshape(-1)[order].unsqueeze(-1).to(x.dtype)], 1)
        xr = all_to_all(rows, recv_splits, send_splits, self.group)      # [M, D+1], by (src, expert)
        # Regroup the received rows by local expert, run each expert once over its block.
        local_eid = torch.arange(El, device=x.device).repeat(W).repeat_interleave(recv.reshape(-1))
        perm = local_eid.argsort(stable=True)
        per_expert = recv.sum(0).tolist()
        scale = self.grad_scale
        # .to(dtype): under FSDP mixed precision the tokens arrive in bf16 while these fp32
        # master weights sit outside FSDP's casting; the cast's backward returns fp32 grads.
        w_gate, w_up, w_down = (_ScaleGrad.apply(p.to_local(), scale).to(x.dtype)
                                for p in (self.gate_proj, self.up_proj, self.down_proj))
        # Rows come back in the received (src, expert) order. A rank with no rows still returns
        # (zero) weight gradients, so every rank runs the same backward.
        yr = expert_ffn(xr[:, :-1], perm, per_expert, w_gate, w_up, w_down, xr[:, -1][perm])
        ys = all_to_all(yr, send_splits, recv_splits, self.group)         # [N*k, D], in `order`
        y = torch.zeros_like(x).index_add_(0, order // k, ys)
        return y, counts


def _my_group(rows: list[list[int]]):
    """new_group for every row (collective: all ranks create all groups, in the same order)."""
    me, mine = dist.get_rank(), None
    for ranks in rows:
        g = dist.new_group(ranks)
        if me in ranks:
            mine = g
    return mine


def apply_expert_parallel(model: nn.Module, mesh) -> set[nn.Parameter]:
    """Replace every MoE's experts by an EP version over `mesh`: 1-D (EP over all ranks) or
    2-D (replicas, EP). Returns the expert parameters, which the data-parallel wrappers must ignore."""
    ranks = mesh.mesh.reshape(-1, mesh.size(mesh.ndim - 1))             # rows: EP groups
    group = _my_group(ranks.tolist())
    rep_group = _my_group(ranks.t().tolist()) if ranks.shape[0] > 1 else None
    params: set[nn.Parameter] = set()
    for m in model.modules():
        if isinstance(m, MoE):
            m.experts = ExpertParallelExperts(m.experts, mesh, group, rep_group)
            params.update(m.experts.parameters())
    return params


def check_node_limited(n_experts: int, n_group: int, topk_group: int, ep: int, ranks_per_node: int) -> int | None:
    """Max nodes one token's routed experts can touch under group-limited routing, or None
    when groups straddle nodes (then the bound does not hold)."""
    nodes = max(1, ep // ranks_per_node)
    if n_group % nodes:
        return None
    return min(topk_group, nodes)
