"""Masked next-token cross-entropy through the output head, in row chunks.

The plain way builds the logits [N, V]; autograd keeps log-softmax's fp32 output (another [N, V])
and backward allocates two more. On the tiny preset these are the largest tensors of a training
step. Here each chunk of rows goes head -> fp32 log-softmax -> loss and, when a gradient is wanted,
straight on to its gradients for the hidden rows and the head weight, so at most one chunk of
logits exists at a time; backward only scales the stored gradients by the incoming one.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from nanoseek.model.expert_ffn import compute_dtype

CHUNK_ROWS = 1024  # tiny preset: 16 MiB of fp32 logits per chunk


class _HeadCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, row_scale, want_grad):
        """h [N, D], weight [V, D], targets [N], row_scale [N] (fp32, fp64 for fp64 h) -> sum_i row_scale_i * CE_i."""
        acc = torch.promote_types(h.dtype, torch.float32)                # bf16 compute: fp32 softmax and sums
        loss = h.new_zeros((), dtype=acc)
        dh = torch.empty_like(h) if want_grad else None
        dw = torch.zeros(weight.shape, dtype=acc, device=weight.device) if want_grad else None
        for a in range(0, h.shape[0], CHUNK_ROWS):
            rows, t, s = h[a:a + CHUNK_ROWS], targets[a:a + CHUNK_ROWS], row_scale[a:a + CHUNK_ROWS]
            logp = F.linear(rows, weight).to(acc).log_softmax(-1)         # [n, V]
            loss -= (logp.gather(1, t.unsqueeze(1)).squeeze(1) * s).sum()
            if want_grad:  # d loss / d logits = s * (softmax - onehot(target))
                dlogits = logp.exp_().mul_(s.unsqueeze(1))
                dlogits[torch.arange(len(t), device=t.device), t] -= s
                dlogits = dlogits.to(h.dtype)
                torch.mm(dlogits, weight, out=dh[a:a + CHUNK_ROWS])
                if dw.dtype == rows.dtype:
                    dw.addmm_(dlogits.t(), rows)
                else:  # bf16 matmul, summed over chunks in fp32
                    dw += dlogits.t() @ rows
        ctx.save_for_backward(dh, None if dw is None else dw.to(weight.dtype))
        return loss

    @staticmethod
    def backward(ctx, grad):
        dh, dw = ctx.saved_tensors
        return dh * grad.to(dh.dtype), dw * grad.to(dw.dtype), None, None, None


def masked_head_ce(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean CE of the head's logits (h [..., D] @ weight [V, D]^T) at the targets [...] where
    mask [...] is set (0/1 floats); 0 when the mask is empty."""
    h, targets = h.reshape(-1, h.shape[-1]), targets.reshape(-1)
    mask = mask.reshape(-1).to(torch.promote_types(h.dtype, torch.float32))  # the loss's dtype
    scale = mask / mask.sum().clamp_min(1.0)
    want_grad = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)
    dt = compute_dtype(h)
    return _HeadCE.apply(h.to(dt), weight.to(dt), targets, scale, want_grad)
