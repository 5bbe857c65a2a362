"""Multi-head Latent Attention (DeepSeek-V2/V3; V3 §2.1.1, eq. 1-11).

Queries go through a low-rank latent (q_lora_rank); keys and values through a shared latent
c_kv (kv_lora_rank) plus one rotary key k_pe shared by all heads (qk_rope_head_dim):

    c_q  = RMSNorm(W_DQ x)                          q = W_UQ c_q = [q_nope | q_pe]  per head
    [c_kv | k_pe] = W_DKV x,  c_kv = RMSNorm(c_kv)  [k_nope | v] = W_UKV c_kv       per head
    score = q_nope·k_nope + rope(q_pe)·rope(k_pe)

Expanded form (training, `_attend_expanded`): per-head K/V from the latent, then SDPA. Absorbed
form (decode, `_attend_latent`): fold W_UK into the query and W_UV into the output, so attention runs on the latent and the cache holds only
c_kv + k_pe — (kv_lora_rank + qk_rope_head_dim) values per token per layer, stored side by
side in one row, which is at once the key (c_kv | k_pe) and, in its first columns, the value.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.config import ModelConfig
from nanoseek.model.norm import RMSNorm
from nanoseek.model.rope import RotaryEmbedding


class MLA(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads = cfg.num_attention_heads
        self.nope, self.rope, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.kv_lora_rank = cfg.kv_lora_rank
        self.q_lora_rank = cfg.q_lora_rank
        qk_dim = self.n_heads * cfg.qk_head_dim
        if cfg.q_lora_rank is None:
            self.q_proj = nn.Linear(cfg.hidden_size, qk_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(cfg.hidden_size, cfg.q_lora_rank, bias=cfg.attention_bias)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, qk_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(cfg.hidden_size, cfg.kv_lora_rank + self.rope, bias=cfg.attention_bias)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, cfg.rms_norm_eps)
        self.kv_b_proj = nn.Linear(cfg.kv_lora_rank, self.n_heads * (self.nope + self.v_dim), bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.v_dim, cfg.hidden_size, bias=cfg.attention_bias)
        self.scale = cfg.softmax_scale()

    def _queries(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, T, _ = x.shape
        q = self.q_proj(x) if self.q_lora_rank is None else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(B, T, self.n_heads, self.nope + self.rope).transpose(1, 2)  # [B, H, T, nope+rope]
        return q.split([self.nope, self.rope], dim=-1)

    def forward(self, x: torch.Tensor, rotary: RotaryEmbedding, cos: torch.Tensor, sin: torch.Tensor,
                positions: torch.Tensor, mask: torch.Tensor | None = None, cache=None,
                absorb: bool | None = None) -> torch.Tensor:
        """x [B, T, D] -> [B, T, D]. mask: bool [B, 1, T, S] (True = attend) or None for causal."""
        B, T, _ = x.shape
        q_nope, q_pe = self._queries(x)                                   # [B, H, T, nope], [B, H, T, rope]
        c_kv, k_pe = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.rope], dim=-1)
        c_kv = self.kv_a_layernorm(c_kv)                                  # [B, T, kv_lora]
        q_pe = rotary.rotate(q_pe, cos, sin)
        k_pe = rotary.rotate(k_pe.unsqueeze(1), cos, sin).squeeze(1)       # [B, T, rope]
        kv = torch.cat([c_kv, k_pe], dim=-1)                              # [B, T, C+rope]
        if cache is not None:
            kv, = cache.update(self.layer_idx, positions, kv)             # [B, S, C+rope]
        if absorb if absorb is not None else cache is not None:
            out = self._attend_latent(q_nope, q_pe, kv, mask)
        else:
            out = self._attend_expanded(q_nope, q_pe, kv[..., :self.kv_lora_rank], kv[..., self.kv_lora_rank:], mask)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.n_heads * self.v_dim))

    def _attend_expanded(self, q_nope, q_pe, c_kv, k_pe, mask):
        """Per-head keys [k_nope | k_pe] and values expanded from the latent (eq. 2-5), attended (eq. 10)."""
        B, S, _ = c_kv.shape
        kv = self.kv_b_proj(c_kv).view(B, S, self.n_heads, self.nope + self.v_dim).transpose(1, 2)
        k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)              # [B, H, S, nope], [B, H, S, v]
        q = torch.cat([q_nope, q_pe], dim=-1)                             # [B, H, T, nope+rope]
        k = torch.cat([k_nope, k_pe.unsqueeze(1).expand(-1, self.n_heads, -1, -1)], dim=-1)
        return self._softmax_attention(q, k, v, mask)                     # [B, H, T, v]

    def _softmax_attention(self, q, k, v, mask):
        """softmax(q k^T * scale, masked) v; mask None: causal."""
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=self.scale)

    def _absorb_query(self, q_nope: torch.Tensor) -> torch.Tensor:
        """W_UK folded into the query: q_nope [B, H, T, nope] -> q_lat [B, H, T, C], so that
        q_lat · c_kv = q_nope · k_nope without expanding any key."""
        w_uk = self.kv_b_proj.weight.view(self.n_heads, self.nope + self.v_dim, self.kv_lora_rank)[:, : self.nope]
        return torch.einsum("bhtd,hdc->bhtc", q_nope, w_uk)

    def _absorb_output(self, o_lat: torch.Tensor) -> torch.Tensor:
        """W_UV applied after attention: o_lat [B, H, T, C] -> per-head values [B, H, T, v]."""
        w_uv = self.kv_b_proj.weight.view(self.n_heads, self.nope + self.v_dim, self.kv_lora_rank)[:, self.nope:]
        return torch.einsum("bhtc,hvc->bhtv", o_lat, w_uv)

    def _attend_latent(self, q_nope, q_pe, kv, mask):
        """Decode form: attention on the cached latent kv [B, S, C+rope], W_UK and W_UV absorbed."""
        T, S, C = q_nope.shape[2], kv.shape[1], self.kv_lora_rank
        c_kv, k_pe = kv[..., :C], kv[..., C:]                             # [B, S, C], [B, S, rope]
        q_lat = self._absorb_query(q_nope)                                # [B, H, T, C]
        scores = torch.einsum("bhtc,bsc->bhts", q_lat, c_kv) + torch.einsum("bhtr,bsr->bhts", q_pe, k_pe)
        if mask is None:  # plain causal, queries at the last T of S positions
            mask = torch.ones(T, S, dtype=torch.bool, device=kv.device).tril(S - T)
        scores = (scores * self.scale).masked_fill(~mask, float("-inf"))
        attn = scores.softmax(-1, dtype=torch.promote_types(scores.dtype, torch.float32))  # [B, H, T, S]
        return self._absorb_output(torch.einsum("bhts,bsc->bhtc", attn.to(c_kv.dtype), c_kv))  # [B, H, T, v]
