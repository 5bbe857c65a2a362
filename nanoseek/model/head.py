"""The output head and what training reads from it: the cross-entropy (V3 eq. 24 for MTP's depths)
and GRPO's per-token log-probs.

    logits          = W_out h                                   [..., V]
    CE              = -log softmax(logits)[target]              averaged over the positions a mask sets
    log pi(target)  = log softmax(logits / temperature)[target]

Plain autograd over the full logits; `nanoseek.kernels.chunked_head` computes the same in row chunks.
"""
from __future__ import annotations

import torch
from torch import nn


class LMHead(nn.Linear):
    def __init__(self, dim: int, vocab: int):
        super().__init__(dim, vocab, bias=False)

    def log_softmax(self, h: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        """h [..., D] -> log softmax(logits / temperature) [..., V], in fp32 at least (bf16 logits lose the tail)."""
        logits = self(h)
        return (logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature).log_softmax(-1)

    def cross_entropy(self, h: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Mean CE at the targets [...] over the positions where mask [...] (0/1) is set, 0 when none
        is; mask None: over every position."""
        nll = -self.log_softmax(h).gather(-1, targets.unsqueeze(-1)).squeeze(-1)   # [...]
        if mask is None:
            return nll.sum() / max(nll.numel(), 1)
        mask = mask.to(nll.dtype)
        return (nll * mask).sum() / mask.sum().clamp_min(1.0)

    def log_probs(self, h: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0, entropy: bool = False,
                  mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """log pi(targets) [...] with pi = softmax(logits / temperature), and with `entropy` the entropy
        of pi [...] (a diagnostic: no gradient); with mask [...], both 0 where it is not set."""
        logp_all = self.log_softmax(h, temperature)                                # [..., V]
        logp = logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        ent = None
        if entropy:
            with torch.no_grad():
                ent = -(logp_all.exp() * logp_all).sum(-1)
        if mask is not None:
            keep = mask.bool()
            logp = torch.where(keep, logp, 0.0)
            ent = None if ent is None else torch.where(keep, ent, 0.0)
        return logp, ent
