"""`ChunkedLMHead`, the drop-in for `model.head.LMHead`: its cross-entropy (pretraining, SFT,
distillation) and per-token log-probs (GRPO) computed in row chunks, with hand-written backwards.

The plain way builds the logits [N, V]; autograd keeps log-softmax's fp32 output (another [N, V])
and backward allocates two more. On the tiny preset these are the largest tensors of a training
step. Here at most one chunk of logits exists at a time:
- CE: each chunk goes head -> fp32 log-softmax -> loss and, when a gradient is wanted, straight on
  to its gradients for the hidden rows and the head weight; backward only scales them.
- log-probs: the loss that uses them is not known yet, so forward keeps one log-sum-exp per row
  and backward recomputes each chunk's logits (one more head matmul instead of three [N, V] tensors),
  unless the caller knows the gradient in advance (`known_logprob_gradient`, on-policy GRPO): then
  forward forms them as the CE does.
The head runs on the rows a mask sets only: SFT's prompts and GRPO's prompts and padding cost no
head matmul (on the tiny preset the head is ~45 % of a step's matmul FLOPs).
"""
from __future__ import annotations

import contextlib
import threading

import torch
import torch.nn.functional as F

from nanoseek.kernels.compute_dtype import compute_dtype
from nanoseek.model.head import LMHead

CHUNK_ROWS = 1024  # tiny preset: 16 MiB of fp32 logits per chunk
_hint = threading.local()  # per thread: a forward elsewhere (the server's engine thread) never sees a promise


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
    """The indices of the rows whose mask [N] is set, or None when all are."""
    keep = mask.nonzero().squeeze(1)
    return None if len(keep) == len(mask) else keep


def masked_head_ce(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean CE of the head's logits (h [..., D] @ weight [V, D]^T) at the targets [...] where
    mask [...] is set (0/1 floats); 0 when the mask is empty. mask None: every position (no row
    selection, so no host sync on a GPU)."""
    h, targets = h.reshape(-1, h.shape[-1]), targets.reshape(-1)
    acc = torch.promote_types(h.dtype, torch.float32)                    # the loss's dtype
    if mask is None:
        scale, keep = h.new_full((h.shape[0],), 1.0 / max(h.shape[0], 1), dtype=acc), None
    else:
        mask = mask.reshape(-1).to(acc)
        scale = mask / mask.sum().clamp_min(1.0)
        keep = _kept_rows(mask)
    if keep is not None:
        h, targets, scale = h.index_select(0, keep), targets[keep], scale[keep]
    want_grad = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)
    dt = compute_dtype(h)
    return _HeadCE.apply(h.to(dt), weight.to(dt), targets, scale, want_grad)


def _logprob_grads(dh, dw, a, p, t, g, rows, weight) -> None:
    """One chunk's gradients of sum_i g_i log p_i(t_i) w.r.t. z = logits / temperature, pushed on to
    dh[a:a+n] and dw: dz = g * (onehot(t) - p), written over the softmax p [n, V]. g [n] already
    holds the 1 / temperature of dz / dlogits."""
    dz = p.mul_(-g.unsqueeze(1))
    dz[torch.arange(len(t), device=t.device), t] += g
    dz = dz.to(rows.dtype)
    if dh is not None:
        torch.mm(dz, weight, out=dh[a:a + len(rows)])
    if dw is not None:
        _add_weight_grad(dw, dz, rows)


class _HeadLogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, temperature, with_entropy, grad_hint):
        """h [N, D], weight [V, D], targets [N] -> log softmax(h weight^T / temperature)[target] [N]
        and the entropy of that distribution [N] (without gradient; empty unless asked).

        grad_hint [N] or None: the gradient the caller will send back for the log-probs, when it is
        known before the forward (on-policy GRPO). The gradients are then formed here from each
        chunk's softmax, as for the CE, and backward returns them if that gradient arrives: the
        head matmul that backward would redo to get the softmax back is saved."""
        acc = torch.promote_types(h.dtype, torch.float32)
        logp = h.new_empty(h.shape[0], dtype=acc)
        lse = torch.empty_like(logp)
        ent = torch.empty_like(logp) if with_entropy else logp.new_empty(0)
        want_h, want_w = ctx.needs_input_grad[:2]
        early = grad_hint is not None and (want_h or want_w)
        dh = torch.empty_like(h) if early and want_h else None
        dw = torch.zeros(weight.shape, dtype=acc, device=weight.device) if early and want_w else None
        for a in range(0, h.shape[0], CHUNK_ROWS):
            rows, t = h[a:a + CHUNK_ROWS], targets[a:a + CHUNK_ROWS]
            z = F.linear(rows, weight).to(acc).div_(temperature)          # [n, V]
            m = lse[a:a + CHUNK_ROWS]
            torch.logsumexp(z, -1, out=m)
            logp[a:a + CHUNK_ROWS] = z.gather(1, t.unsqueeze(1)).squeeze(1) - m
            if with_entropy or early:
                p = (z.sub(m.unsqueeze(1)) if with_entropy else z.sub_(m.unsqueeze(1))).exp_()  # softmax [n, V]
                if with_entropy:  # H = lse - sum_j p_j z_j
                    ent[a:a + CHUNK_ROWS] = m - torch.linalg.vecdot(p, z)
                if early:
                    _logprob_grads(dh, dw, a, p, t, grad_hint[a:a + CHUNK_ROWS] / temperature, rows, weight)
        ctx.save_for_backward(h, weight, targets, lse, grad_hint if early else None, dh,
                              None if dw is None else dw.to(weight.dtype))
        ctx.temperature = temperature
        ctx.mark_non_differentiable(ent)
        return logp, ent

    @staticmethod
    def backward(ctx, grad, _):
        h, weight, targets, lse, hint, dh, dw = ctx.saved_tensors
        if hint is not None and torch.equal(grad, hint):
            return dh, dw, None, None, None, None
        want_h, want_w = ctx.needs_input_grad[:2]
        dh = torch.empty_like(h) if want_h else None
        dw = torch.zeros(weight.shape, dtype=lse.dtype, device=weight.device) if want_w else None
        g = grad / ctx.temperature                                          # d z / d logits = 1 / temperature
        for a in range(0, h.shape[0], CHUNK_ROWS):
            rows, t = h[a:a + CHUNK_ROWS], targets[a:a + CHUNK_ROWS]
            z = F.linear(rows, weight).to(lse.dtype).div_(ctx.temperature)
            p = z.sub_(lse[a:a + CHUNK_ROWS].unsqueeze(1)).exp_()
            _logprob_grads(dh, dw, a, p, t, g[a:a + CHUNK_ROWS], rows, weight)
        return dh, None if dw is None else dw.to(weight.dtype), None, None, None, None


def head_logprobs(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                  entropy: bool = False, mask: torch.Tensor | None = None,
                  grad_hint: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log pi(target) [...] (fp32) with pi = softmax(h [..., D] @ weight [V, D]^T / temperature),
    and with `entropy` the entropy of pi per position [...] (a diagnostic: no gradient). With a
    mask [...], only the positions where it is set are computed; the others read 0. grad_hint
    [...]: the gradient backward will bring for these log-probs, if known now (see _HeadLogProbs)."""
    shape, dt = targets.shape, compute_dtype(h)
    h, targets = h.reshape(-1, h.shape[-1]), targets.reshape(-1)
    hint = None if grad_hint is None else grad_hint.reshape(-1).to(torch.promote_types(dt, torch.float32))
    keep = None if mask is None else _kept_rows(mask.reshape(-1))
    if keep is not None:
        h, targets, hint = h.index_select(0, keep), targets[keep], None if hint is None else hint[keep]
    logp, ent = _HeadLogProbs.apply(h.to(dt), weight.to(dt), targets, float(temperature), entropy, hint)
    if keep is not None:  # back to every position, 0 where masked
        spread = lambda x: x.new_zeros(shape.numel()).index_put((keep,), x)  # noqa: E731
        logp, ent = spread(logp), spread(ent) if entropy else ent
    return logp.view(shape), ent.view(shape) if entropy else None


@contextlib.contextmanager
def known_logprob_gradient(grad: torch.Tensor | None):
    """In this block (this thread), the chunked head's log-probs [B, T] are told the gradient the
    caller's loss will send back to them (None: not known). Backward then returns the gradients
    formed in the forward if exactly that gradient arrives, and recomputes them otherwise; the
    reference head has no use for it."""
    before = getattr(_hint, "grad", None)
    _hint.grad = grad
    try:
        yield
    finally:
        _hint.grad = before


class ChunkedLMHead(LMHead):
    def cross_entropy(self, h: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return masked_head_ce(h, self.weight, targets, mask)

    def log_probs(self, h: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0, entropy: bool = False,
                  mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        hint = getattr(_hint, "grad", None)
        if hint is not None and hint.shape != targets.shape:
            raise ValueError(f"known_logprob_gradient: gradient {tuple(hint.shape)} for log-probs {tuple(targets.shape)}")
        return head_logprobs(h, self.weight, targets, temperature, entropy, mask, hint)
