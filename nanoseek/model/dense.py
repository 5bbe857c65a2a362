"""Qwen2-style dense decoder: the distillation student (GQA, SwiGLU, RoPE, q/k/v bias).

Same calling convention as the MoE `Transformer` (forward, hidden_states, loss, make_cache),
so trainers and the engine treat both alike.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.config import DenseConfig
from nanoseek.model.cache import KVCache
from nanoseek.model.head_loss import masked_head_ce
from nanoseek.model.hf_save import save_pretrained
from nanoseek.model.moe import MLP
from nanoseek.model.norm import RMSNorm
from nanoseek.model.rope import RotaryEmbedding
from nanoseek.model.transformer import Transformer


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


class DenseBlock(nn.Module):
    def __init__(self, cfg: DenseConfig, layer_idx: int):
        super().__init__()
        self.self_attn = GQA(cfg, layer_idx)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, **attn_kw):
        x = x + self.self_attn(self.input_layernorm(x), **attn_kw)
        return x + self.mlp(self.post_attention_layernorm(x))


class DenseTransformer(nn.Module):
    config_class = DenseConfig

    def __init__(self, cfg: DenseConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DenseBlock(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.rope_theta, None, cfg.max_position_embeddings, False)
        self.mtp = nn.ModuleList()  # no MTP: lets engine/trainers treat both models alike
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=cfg.initializer_range)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)

    # Same decoder loop and calling convention as the MoE model (GQA ignores `absorb`).
    hidden_states = Transformer.hidden_states
    forward = Transformer.forward
    token_logprobs = Transformer.token_logprobs

    def loss(self, input_ids, targets, loss_mask=None, doc_ids=None, mtp_weight: float = 0.0):
        h, _ = self.hidden_states(input_ids, doc_ids=doc_ids)
        lm = masked_head_ce(h, self.lm_head.weight, targets, None if loss_mask is None else loss_mask.float())
        return {"loss": lm, "lm_loss": lm}

    def num_parameters(self, active: bool = False, include_mtp: bool = False) -> int:
        return sum(p.numel() for p in self.parameters())

    def make_cache(self, batch: int, max_len: int, dtype=None, mtp: bool = False) -> KVCache:
        cfg, p = self.config, next(self.parameters())
        shape = (cfg.num_key_value_heads, cfg.head_dim)
        return KVCache(cfg.num_hidden_layers, batch, max_len, (shape, shape), dtype or p.dtype, p.device)

    def save_pretrained(self, path, **kw) -> None:
        save_pretrained(self, path, **kw)
