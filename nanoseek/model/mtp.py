"""Multi-Token Prediction (DeepSeek-V3 §2.2).

Module k predicts token i+k+1 from the previous depth's representation at i and the
embedding of token i+k, keeping the causal chain:

    h'_i = W_eh [RMSNorm(Emb(t_{i+k})) ; RMSNorm(h^{k-1}_i)]
    h^k  = Block(h'),   logits = Head(RMSNorm(h^k))

Embedding and output head are the main model's (shared); each module has its own norms,
projection and transformer block. In checkpoints a module is layer `num_hidden_layers + k - 1`
with DeepSeek's names (enorm, hnorm, eh_proj, shared_head.norm), so vLLM/SGLang can load it.
"""
from __future__ import annotations

import torch
from torch import nn

from nanoseek.config import ModelConfig
from nanoseek.model.norm import RMSNorm


class MTPModule(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, block: nn.Module):
        super().__init__()
        self.enorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * cfg.hidden_size, cfg.hidden_size, bias=False)
        self.block = block
        self.head_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, h_prev: torch.Tensor, emb_next: torch.Tensor, **block_kw) -> torch.Tensor:
        """h_prev, emb_next [B, T, D] -> h [B, T, D] (before the head norm)."""
        x = self.eh_proj(torch.cat([self.enorm(emb_next), self.hnorm(h_prev)], dim=-1))
        return self.block(x, **block_kw)
