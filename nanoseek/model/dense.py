"""Qwen2-style dense decoder: the distillation student (GQA, SwiGLU, RoPE, q/k/v bias).

The same `Decoder` as the MoE `Transformer` (forward, hidden_states, loss, token_logprobs), with
GQA blocks and no MTP, so trainers and the engine treat both alike.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from nanoseek.config import DenseConfig
from nanoseek.model.cache import KVCache
from nanoseek.model.moe import MLP
from nanoseek.model.rope import RotaryEmbedding
from nanoseek.model.transformer import Block, Decoder


class GQA(nn.Module):
    def __init__(self, cfg: DenseConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.head_dim, bias=True)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=True)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=True)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=False)

    def forward(self, x, rotary, cos, sin, positions, mask=None, cache=None, absorb=None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # [B, H, T, d]
        k = self.k_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)    # [B, Hkv, T, d]
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim)
        q, k = rotary.rotate(q, cos, sin), rotary.rotate(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, positions, k.transpose(1, 2), v)     # [B, S, Hkv, d]
            k = k.transpose(1, 2)
        v = v.transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                             enable_gqa=self.n_kv != self.n_heads)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))


class DenseTransformer(Decoder):
    config_class = DenseConfig

    def __init__(self, cfg: DenseConfig):
        super().__init__(cfg, lambda i: Block(GQA(cfg, i), MLP(cfg.hidden_size, cfg.intermediate_size),
                                              cfg.hidden_size, cfg.rms_norm_eps))
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.rope_theta, None, cfg.max_position_embeddings, False)
        self.apply(self._init_weights)

    def make_cache(self, batch: int, max_len: int, dtype=None, mtp: bool = False) -> KVCache:
        cfg, p = self.config, next(self.parameters())
        shape = (cfg.num_key_value_heads, cfg.head_dim)
        return KVCache(cfg.num_hidden_layers, batch, max_len, (shape, shape), dtype or p.dtype, p.device)
