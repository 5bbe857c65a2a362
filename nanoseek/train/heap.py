"""This process's heap, tuned for training: the large tensors of one step are reused by the next."""
from __future__ import annotations

import ctypes
import functools
import platform


@functools.lru_cache(maxsize=None)
def retain_freed_memory() -> bool:
    """Keep freed memory in this process's heap instead of handing it back to the OS (glibc only).

    glibc serves every block over 32 MiB with its own mmap and unmaps it when freed, so a training
    step that allocates the same large tensors every step pays for zero-filling them page by page,
    each time: on the `small` preset on a CPU, that is much of a step's system time. With mmap off and
    heap trimming off, those blocks are reused, for a somewhat higher peak RSS; `tiny`'s tensors stay
    under the threshold, so nothing changes there. Returns whether it applied (False off glibc)."""
    if platform.libc_ver()[0] != "glibc":
        return False
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # malloc.h
    libc = ctypes.CDLL(None)
    return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
