"""Rotary position embedding with YaRN long-context scaling.

DeepSeek-V3 rotates the decoupled `qk_rope_head_dim` part of queries and keys. Its weights
lay each rotated pair out interleaved, (x0, x1), (x2, x3), ... ("rope_interleave"); the
output is written de-interleaved (first halves, then second halves), which leaves q·k
unchanged and matches HF's layout bit for bit.
"""
from __future__ import annotations

import math

import torch
from torch import nn


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def yarn_inv_freq(dim: int, theta: float, scaling: dict | None, max_position_embeddings: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [dim/2] and the cos/sin magnitude (YaRN's attention factor)."""
    pos_freqs = theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    inv_freq = 1.0 / pos_freqs
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type"))
    if kind != "yarn":
        return inv_freq, 1.0
    original = scaling.get("original_max_position_embeddings") or max_position_embeddings
    factor = scaling.get("factor") or max_position_embeddings / original
    beta_fast, beta_slow = scaling.get("beta_fast") or 32, scaling.get("beta_slow") or 1
    mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
    attn_factor = scaling.get("attention_factor")
    if attn_factor is None:
        attn_factor = (yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
                       if mscale and mscale_all_dim else yarn_mscale(factor))

    # Dimensions that rotate fewer than beta_slow times over the original context are
    # interpolated (divided by factor); those above beta_fast keep their frequency; a linear ramp between.
    def correction_dim(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1: extrapolate (keep), 0: interpolate
    inv_freq = (inv_freq / factor) * (1 - keep) + inv_freq * keep
    return inv_freq, float(attn_factor)


class RotaryEmbedding(nn.Module):
    def __init__(self, dim: int, theta: float, scaling: dict | None = None,
                 max_position_embeddings: int = 4096, interleave: bool = False):
        super().__init__()
        inv_freq, self.attention_factor = yarn_inv_freq(dim, theta, scaling, max_position_embeddings)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.interleave = interleave

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [B, T] -> cos, sin [B, T, dim/2]."""
        freqs = positions[..., None].float() * self.inv_freq.to(positions.device)
        return (freqs.cos() * self.attention_factor).to(dtype), (freqs.sin() * self.attention_factor).to(dtype)

    def rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [B, H, T, dim] with cos/sin [B, T, dim/2] -> rotated x, in half-split layout."""
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        if self.interleave:
            x1, x2 = x[..., 0::2], x[..., 1::2]
        else:
            x1, x2 = x.chunk(2, dim=-1)
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
