"""The dtype the hand-written kernels compute in."""
from __future__ import annotations

import torch


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype matmuls on x run in here: autocast's inside an autocast region, else x's own.
    The hand-written functions cast their inputs to it (autocast skips their out= matmuls)."""
    kind = x.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x.dtype
