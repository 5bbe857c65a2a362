"""Preallocated per-layer cache for decoding.

Each layer keeps a fixed tuple of tensors, one row per sequence slot:
MLA caches (c_kv [S, kv_lora_rank], k_pe [S, qk_rope_head_dim]) — the compressed latent —
and the dense student caches (k [S, Hkv, d], v [S, Hkv, d]). Writes go to the given
positions, so sequences of different lengths share one batch; attention masks keys past each
query's position, which also hides whatever an earlier sequence left in a reused slot.
"""
from __future__ import annotations

import torch


class KVCache:
    def __init__(self, num_layers: int, batch: int, max_len: int, shapes: tuple[tuple[int, ...], ...],
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        self.max_len = max_len
        self.shapes = shapes
        self.dtype = dtype
        self.layers = [tuple(torch.zeros(batch, max_len, *s, dtype=dtype, device=device) for s in shapes)
                       for _ in range(num_layers)]
        self.limit = max_len  # keys visible this step: set by the model from the positions
        self.rows: slice | None = None  # cache rows for batch rows 0..B-1 of the next forward (None: 0..B-1)

    @property
    def batch(self) -> int:
        return self.layers[0][0].shape[0]

    def bytes_per_token(self) -> int:
        """Cache bytes for one token across all layers."""
        per_layer = sum(int(torch.Size(s).numel()) for s in self.shapes)
        return per_layer * len(self.layers) * torch.empty((), dtype=self.dtype).element_size()

    def update(self, layer: int, positions: torch.Tensor, *values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Write values [B, T, ...] at positions [B, T] into `rows`; return those rows [B, limit, ...]."""
        B, T = positions.shape
        start = self.rows.start if self.rows is not None else 0
        rows = torch.arange(start, start + B, device=positions.device).view(B, 1).expand(B, T)
        out = []
        for buf, val in zip(self.layers[layer], values):
            # an in-place write into the whole buffer, not into a slice of it: torch.compile then
            # writes the B*T new rows in place instead of copying the cache around the write
            buf.index_put_((rows, positions), val.to(buf.dtype))
            out.append(buf[start:start + B, : self.limit])
        return tuple(out)

    def copy_rows(self, src: torch.Tensor, dst: torch.Tensor, length: int | None = None) -> None:
        """Copy slots src -> dst (LongTensors of slot ids): prefix sharing for sampled groups."""
        n = self.max_len if length is None else length
        for bufs in self.layers:
            for buf in bufs:
                buf[dst, :n] = buf[src, :n]
