"""What the output head's logits are needed for in training, computed in row chunks: the masked
next-token cross-entropy (pretraining, SFT, distillation) and the per-token log-probs (GRPO).

The plain way builds the logits [N, V]; autograd keeps log-softmax's fp32 output (another [N, V])
and backward allocates two more. On the tiny preset these are the largest tensors of a training
step. Here at most one chunk of logits exists at a time:
- CE: each chunk goes head -> fp32 log-softmax -> loss and, when a gradient is wanted, straight on
  to its gradients for the hidden rows and the head weight; backward only scales them.
- log-probs: the loss that uses them is not known yet, so forward keeps one log-sum-exp per row
  and backward recomputes each chunk's logits (one more head matmul instead of three [N, V] tensors).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from nanoseek.model.expert_ffn import compute_dtype

CHUNK_ROWS = 1024  # tiny preset: 16 MiB of fp32 logits per chunk


def _add_weight_grad(dw: torch.Tensor, dlogits: torch.Tensor, rows: torch.Tensor) -> None:
    """dw [V, D] += dlogits [n, V]^T @ rows [n, D]: in place when the dtypes agree, else (bf16
    compute) a bf16 matmul summed over chunks in fp32."""
    if dw.dtype == rows.dtype:
        dw.addmm_(dlogits.t(), rows)
    else:
        dw += dlogits.t() @ rows


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
                _add_weight_grad(dw, dlogits, rows)
        ctx.save_for_backward(dh, None if dw is None else dw.to(weight.dtype))
        return loss

    @staticmethod
    def backward(ctx, grad):
        dh, dw = ctx.saved_tensors
        return dh * grad.to(dh.dtype), dw * grad.to(dw.dtype), None, None, None


def _kept_rows(mask: torch.Tensor) -> torch.Tensor | None:
    """The indices of the rows whose mask [N] is set, or None when all are. The head then runs on
    the rows a loss reads only: SFT's prompts and GRPO's prompts and padding cost no head matmul
    (on the tiny preset the head is ~45 % of a step's matmul FLOPs)."""
    keep = mask.nonzero().squeeze(1)
    return None if len(keep) == len(mask) else keep


def masked_head_ce(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean CE of the head's logits (h [..., D] @ weight [V, D]^T) at the targets [...] where
    mask [...] is set (0/1 floats); 0 when the mask is empty."""
    h, targets = h.reshape(-1, h.shape[-1]), targets.reshape(-1)
    mask = mask.reshape(-1).to(torch.promote_types(h.dtype, torch.float32))  # the loss's dtype
    scale = mask / mask.sum().clamp_min(1.0)
    keep = _kept_rows(mask)
    if keep is not None:
        h, targets, scale = h.index_select(0, keep), targets[keep], scale[keep]
    want_grad = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)
    dt = compute_dtype(h)
    return _HeadCE.apply(h.to(dt), weight.to(dt), targets, scale, want_grad)


class _HeadLogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, temperature, with_entropy):
        """h [N, D], weight [V, D], targets [N] -> log softmax(h weight^T / temperature)[target] [N]
        and the entropy of that distribution [N] (without gradient; empty unless asked)."""
        acc = torch.promote_types(h.dtype, torch.float32)
        logp = h.new_empty(h.shape[0], dtype=acc)
        lse = torch.empty_like(logp)
        ent = torch.empty_like(logp) if with_entropy else logp.new_empty(0)
        for a in range(0, h.shape[0], CHUNK_ROWS):
            z = F.linear(h[a:a + CHUNK_ROWS], weight).to(acc).div_(temperature)  # [n, V]
            m = lse[a:a + CHUNK_ROWS]
            torch.logsumexp(z, -1, out=m)
            logp[a:a + CHUNK_ROWS] = z.gather(1, targets[a:a + CHUNK_ROWS].unsqueeze(1)).squeeze(1) - m
            if with_entropy:  # H = lse - sum_j p_j z_j
                ent[a:a + CHUNK_ROWS] = m - (z - m.unsqueeze(1)).exp_().mul_(z).sum(-1)
        ctx.save_for_backward(h, weight, targets, lse)
        ctx.temperature = temperature
        ctx.mark_non_differentiable(ent)
        return logp, ent

    @staticmethod
    def backward(ctx, grad, _):
        h, weight, targets, lse = ctx.saved_tensors
        want_h, want_w = ctx.needs_input_grad[:2]
        dh = torch.empty_like(h) if want_h else None
        dw = torch.zeros(weight.shape, dtype=lse.dtype, device=weight.device) if want_w else None
        g = grad / ctx.temperature                                          # d z / d logits = 1 / temperature
        for a in range(0, h.shape[0], CHUNK_ROWS):
            rows, t, gc = h[a:a + CHUNK_ROWS], targets[a:a + CHUNK_ROWS], g[a:a + CHUNK_ROWS]
            z = F.linear(rows, weight).to(lse.dtype).div_(ctx.temperature)
            # d logp_i / d z_ij = onehot(t_i)_j - softmax(z_i)_j
            dz = (z - lse[a:a + CHUNK_ROWS].unsqueeze(1)).exp_().mul_(-gc.unsqueeze(1))
            dz[torch.arange(len(t), device=t.device), t] += gc
            dz = dz.to(h.dtype)
            if want_h:
                torch.mm(dz, weight, out=dh[a:a + CHUNK_ROWS])
            if want_w:
                _add_weight_grad(dw, dz, rows)
        return dh, None if dw is None else dw.to(weight.dtype), None, None, None


def head_logprobs(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                  entropy: bool = False, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log pi(target) [...] (fp32) with pi = softmax(h [..., D] @ weight [V, D]^T / temperature),
    and with `entropy` the entropy of pi per position [...] (a diagnostic: no gradient). With a
    mask [...], only the positions where it is set are computed; the others read 0."""
    shape, dt = targets.shape, compute_dtype(h)
    h, targets = h.reshape(-1, h.shape[-1]), targets.reshape(-1)
    keep = None if mask is None else _kept_rows(mask.reshape(-1))
    if keep is not None:
        h, targets = h.index_select(0, keep), targets[keep]
    logp, ent = _HeadLogProbs.apply(h.to(dt), weight.to(dt), targets, float(temperature), entropy)
    if keep is not None:  # back to every position, 0 where masked
        spread = lambda x: x.new_zeros(shape.numel()).index_put((keep,), x)  # noqa: E731
        logp, ent = spread(logp), spread(ent) if entropy else ent
    return logp.view(shape), ent.view(shape) if entropy else None
