"""`FastMLA`, the drop-in for `model.mla.MLA`: the same two forms of attention, laid out for fast kernels.

- expanded (training): v zero-padded to the query's head dim, so flash SDPA kernels take it instead
  of the math path (its extra output columns are zero and dropped);
- absorbed (decode, prefill through the cache): one latent key/value "head" serves all H query heads,
  so the heads become query rows of a single-head attention (as FlashMLA does): no [B, H, T, S]
  einsums, no K/V copy per head (SDPA's enable_gqa would repeat K/V H times). For the few query rows
  of a decode step two bmm and a softmax beat SDPA's kernel on CPU; longer prefills take SDPA, which
  never materializes the [T*H, S] scores.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from nanoseek.model.mla import MLA

SMALL_T = 8  # query positions up to which a latent step runs as two bmm (decode, speculative verification)


class FastMLA(MLA):
    def _softmax_attention(self, q, k, v, mask):
        pad = q.shape[-1] - self.v_dim
        if mask is None and pad > 0:
            out = F.scaled_dot_product_attention(q, k, F.pad(v, (0, pad)), is_causal=True, scale=self.scale)
            return out[..., : self.v_dim]
        return super()._softmax_attention(q, k, v, mask)

    def _attend_latent(self, q_nope, q_pe, kv, mask):
        B, H, T, _ = q_nope.shape
        S, C = kv.shape[1], self.kv_lora_rank
        q_lat = self._absorb_query(q_nope)                                # [B, H, T, C]
        q = torch.cat([q_lat, q_pe], dim=-1).transpose(1, 2).reshape(B, T * H, -1)  # rows (t, h): [B, T*H, C+rope]
        v = kv[..., :C]                                                   # [B, S, C]: a view, no copy
        if mask is None:  # plain causal, queries at the last T of S positions
            mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T).view(1, 1, T, S)
        if T <= SMALL_T:
            scores = torch.bmm(q, kv.transpose(1, 2)).mul_(self.scale)
            scores.view(B, T, H, S).masked_fill_(~mask.transpose(1, 2), float("-inf"))  # mask [B, T, 1, S]
            o_lat = torch.bmm(scores.softmax(-1, dtype=torch.promote_types(v.dtype, torch.float32)).to(v.dtype), v)
        else:
            mask = mask.unsqueeze(3).expand(-1, -1, -1, H, -1).reshape(mask.shape[0], 1, T * H, S)
            o_lat = F.scaled_dot_product_attention(q.unsqueeze(1), kv.unsqueeze(1), v.unsqueeze(1),
                                                   attn_mask=mask, scale=self.scale).squeeze(1)
        return self._absorb_output(o_lat.view(B, T, H, C).transpose(1, 2))  # [B, H, T, C] -> [B, H, T, v]
