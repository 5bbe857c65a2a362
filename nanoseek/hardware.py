"""What machine are we on, how fast is it, and which dtype should we train in? (The GPUs' datasheet
peaks are in gpu_peaks.py.)

Everything here is cheap and cached: trainers call `pick_dtype` (through
`nanoseek.dtype_choice.choose_dtype`) at start-up and `measure_matmul_peak` once to turn
tokens/s into MFU (see `nanoseek.cost.summarize_run`).

Why the dtype choice is not simply "bf16": on AVX2/AVX-512 CPUs *without* the BF16
extensions, PyTorch's bf16 matmul falls back to scalar code, orders of magnitude slower than
fp32. CPUs with AVX512-BF16 or AMX can run bf16 matmuls faster than fp32, but whether a whole
training step gains depends on the model's shapes (small models can lose), so there
`dtype_choice` times both; every recent GPU wants bf16.
"""
from __future__ import annotations

import functools
import os
import platform
import statistics
import time

import torch

from nanoseek.gpu_peaks import gpu_peak_flops


@functools.lru_cache(maxsize=None)
def measure_matmul_peak(dtype: torch.dtype = torch.float32, n: int = 1024, seconds: float = 0.5,
                        device: str = "cpu") -> float:
    """Achievable matmul FLOP/s on this machine: median over timed n×n @ n×n products.

    The median (not the max) of many short timings: robust to the other processes sharing a
    laptop, and the number a long training run actually gets. Cached per process, because
    every trainer wants it and it costs `seconds` of wall time.
    """
    dev = torch.device(device)
    a = torch.randn(n, n, device=dev).to(dtype)
    b = torch.randn(n, n, device=dev).to(dtype)

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    for _ in range(2):  # warm-up: thread pool start, allocator, kernel selection
        a @ b
    sync()
    times: list[float] = []
    deadline = time.perf_counter() + seconds
    while len(times) < 3 or (time.perf_counter() < deadline and len(times) < 10_000):
        t0 = time.perf_counter()
        a @ b
        sync()
        times.append(time.perf_counter() - t0)
    return 2.0 * n ** 3 / statistics.median(times)


def _cpu_flags() -> set[str] | None:
    """CPU feature flags from /proc/cpuinfo (Linux); None where that file does not exist."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


@functools.lru_cache(maxsize=None)
def cpu_has_fast_bf16() -> bool:
    """True where bf16 matmul on this CPU is at least as fast as fp32.

    Linux: the AVX512-BF16 / AMX-BF16 flags decide (no timing noise). Elsewhere (macOS,
    where Apple silicon has its own bf16 story) time a small bf16 vs fp32 matmul; the
    slow path is off by orders of magnitude, so a short measurement cannot get the answer wrong.

    NANOSEEK_CPU_BF16=1 / =0 overrides the detection (and the measurement in
    `nanoseek.dtype_choice`), so that `dtype="auto"` takes the bf16-autocast / fp32 path on any
    CPU: CI runs the dtype-sensitive training tests on both (`make test-dtypes`). Read once per
    process, like the flags.
    """
    forced = os.environ.get("NANOSEEK_CPU_BF16", "")
    if forced:
        if forced not in ("0", "1"):
            raise ValueError(f"NANOSEEK_CPU_BF16 must be 1 or 0, got {forced!r}")
        return forced == "1"
    flags = _cpu_flags()
    if flags is not None:
        return bool(flags & {"avx512_bf16", "amx_bf16"})
    fp32 = measure_matmul_peak(torch.float32, n=256, seconds=0.05)
    bf16 = measure_matmul_peak(torch.bfloat16, n=256, seconds=0.05)
    return bf16 >= 0.9 * fp32


def pick_dtype(device: str | torch.device = "cpu", requested: str = "auto") -> tuple[torch.dtype, torch.dtype | None]:
    """(parameter dtype, autocast dtype or None) for training on `device`.

    Parameters stay fp32 (master weights); mixed precision comes from autocast. "auto":
    CUDA -> bf16 autocast where the GPU supports it; CPU -> bf16 autocast only with fast
    bf16 hardware, else plain fp32. An explicit "bf16" is honoured even where it is slow
    (the user asked), "fp32" always means no autocast. This is the answer from the hardware
    alone: the trainer asks `nanoseek.dtype_choice.choose_dtype`, which, where this says bf16
    on a CPU, times the run's model in both dtypes.
    """
    requested = requested.lower()
    if requested not in ("auto", "fp32", "bf16"):
        raise ValueError(f"dtype must be 'auto', 'fp32' or 'bf16', got {requested!r}")
    if requested == "fp32":
        return torch.float32, None
    if requested == "bf16":
        return torch.float32, torch.bfloat16
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.float32, (torch.bfloat16 if torch.cuda.is_bf16_supported() else None)
    if dev.type == "cpu" and cpu_has_fast_bf16():
        return torch.float32, torch.bfloat16
    return torch.float32, None


def _cpu_model_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def describe_device(device: str | torch.device | None = None) -> str:
    """Short human string for reports, e.g. "Intel(R) Xeon(R) ... (2 cores)" or "NVIDIA H100 80GB HBM3"."""
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cuda":
        name = torch.cuda.get_device_name(dev)
        n = torch.cuda.device_count()
        return name if n == 1 else f"{n}× {name}"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{_cpu_model_name()} ({cores} cores, {torch.get_num_threads()} torch threads)"


def device_peak_flops(device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> float:
    """Peak FLOP/s to compute MFU against: datasheet bf16 for known GPUs; on CPU the measured
    matmul rate in the dtype the run computes in (fp32 unless bf16 autocast was picked)."""
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cuda":
        peak = gpu_peak_flops(torch.cuda.get_device_name(dev))
        return peak if peak else measure_matmul_peak(torch.bfloat16, n=4096, device=str(dev))
    return measure_matmul_peak(dtype or torch.float32)
