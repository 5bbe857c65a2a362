"""Datasheet peaks of the GPUs that cost and MFU figures are computed against (this machine's own peak,
measured or looked up, is hardware.device_peak_flops)."""
from __future__ import annotations

# Dense (no 2:4 sparsity) tensor-core peaks in FLOP/s from the vendors' datasheets (SXM parts).
# H800 is the export variant of H100: same compute, cut NVLink bandwidth, which is why
# DeepSeek-V3 reports its cost in H800 hours against the H100's 989 / 1979 TFLOP/s.
_GPU_PEAKS: dict[str, dict[str, float]] = {
    "H100": {"bf16": 989e12, "fp8": 1979e12},
    "H800": {"bf16": 989e12, "fp8": 1979e12},
    "H200": {"bf16": 989e12, "fp8": 1979e12},  # same die as H100, more/faster HBM
    "B200": {"bf16": 2250e12, "fp8": 4500e12},
    "A100": {"bf16": 312e12},                   # Ampere has no FP8 tensor cores
    "A800": {"bf16": 312e12},
}


def gpu_peak_flops(name: str, dtype: str = "bf16") -> float | None:
    """Peak dense FLOP/s of a GPU named like "H800" or "NVIDIA H100 80GB HBM3"; None if unknown.

    Longest key first so "H200" never matches as "H20..." of something else.
    """
    up = name.upper()
    for key in sorted(_GPU_PEAKS, key=len, reverse=True):
        if key in up:
            return _GPU_PEAKS[key].get(dtype)
    return None
