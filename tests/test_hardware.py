"""nanoseek.hardware: peak measurement, bf16 detection, dtype choice, allocator settings."""
import platform
import subprocess
import sys
import textwrap

import pytest
import torch

from nanoseek import hardware


def test_matmul_peak_positive_and_cached():
    a = hardware.measure_matmul_peak(torch.float32, n=128, seconds=0.05)
    assert a > 1e6
    assert hardware.measure_matmul_peak(torch.float32, n=128, seconds=0.05) == a  # cached


def test_pick_dtype_cpu(monkeypatch):
    monkeypatch.setattr(hardware, "cpu_has_fast_bf16", lambda: False)
    assert hardware.pick_dtype("cpu") == (torch.float32, None)
    monkeypatch.setattr(hardware, "cpu_has_fast_bf16", lambda: True)
    assert hardware.pick_dtype("cpu") == (torch.float32, torch.bfloat16)
    assert hardware.pick_dtype("cpu", "fp32") == (torch.float32, None)
    assert hardware.pick_dtype("cpu", "BF16") == (torch.float32, torch.bfloat16)
    with pytest.raises(ValueError):
        hardware.pick_dtype("cpu", "fp8")


def test_fast_bf16_from_flags(monkeypatch):
    monkeypatch.delenv("NANOSEEK_CPU_BF16", raising=False)  # the override is tested below
    for flags, want in (({"avx2", "avx512f"}, False), ({"avx512_bf16"}, True), ({"amx_bf16"}, True)):
        hardware.cpu_has_fast_bf16.cache_clear()
        monkeypatch.setattr(hardware, "_cpu_flags", lambda f=flags: f)
        assert hardware.cpu_has_fast_bf16() is want
    hardware.cpu_has_fast_bf16.cache_clear()
    # no /proc/cpuinfo (macOS): decided by timing
    monkeypatch.setattr(hardware, "_cpu_flags", lambda: None)
    monkeypatch.setattr(hardware, "measure_matmul_peak", lambda dtype, **kw: 1e11 if dtype == torch.float32 else 1e9)
    assert hardware.cpu_has_fast_bf16() is False
    hardware.cpu_has_fast_bf16.cache_clear()


def test_fast_bf16_override(monkeypatch):
    monkeypatch.setattr(hardware, "_cpu_flags", lambda: {"avx2"})
    try:
        for value, want in (("1", True), ("0", False), ("", False)):
            hardware.cpu_has_fast_bf16.cache_clear()
            monkeypatch.setenv("NANOSEEK_CPU_BF16", value)
            assert hardware.cpu_has_fast_bf16() is want
        hardware.cpu_has_fast_bf16.cache_clear()
        monkeypatch.setenv("NANOSEEK_CPU_BF16", "yes")
        with pytest.raises(ValueError, match="NANOSEEK_CPU_BF16"):
            hardware.cpu_has_fast_bf16()
    finally:
        hardware.cpu_has_fast_bf16.cache_clear()


def test_gpu_peaks_and_description():
    assert hardware.gpu_peak_flops("H800") == 989e12
    assert hardware.gpu_peak_flops("NVIDIA H100 80GB HBM3", "fp8") == 1979e12
    assert hardware.gpu_peak_flops("NVIDIA H200") == hardware.gpu_peak_flops("H100")
    assert hardware.gpu_peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert hardware.gpu_peak_flops("A100", "fp8") is None
    assert hardware.gpu_peak_flops("Some GPU") is None
    d = hardware.describe_device("cpu")
    assert "cores" in d and len(d) < 200


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's allocator settings")
def test_retain_freed_memory_keeps_large_blocks_in_the_heap():
    """By default glibc gives a 64 MiB tensor its own mmap, returned to the OS (and page-faulted in
    anew) every time; after retain_freed_memory() it comes from the heap and stays there when freed."""
    code = textwrap.dedent("""
        import ctypes, torch
        from nanoseek.hardware import retain_freed_memory
        class Info(ctypes.Structure):
            _fields_ = [(n, ctypes.c_size_t) for n in
                        "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = Info
        def mapped_and_heap_free(mib=64):
            t = torch.ones(mib * 2**18)
            mapped = libc.mallinfo2().hblkhd >> 20          # bytes in blocks with their own mmap
            del t
            return mapped, libc.mallinfo2().fordblks >> 20  # free bytes kept in the heap
        before = mapped_and_heap_free()
        assert retain_freed_memory()
        print(*before, *mapped_and_heap_free())
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    mapped0, kept0, mapped1, kept1 = map(int, out)
    assert mapped0 >= 64 and kept0 < 64, out       # default: an own mapping, unmapped when freed
    assert mapped1 < 64 and kept1 >= 64, out       # retained: heap memory, kept for the next step
