"""Process-wide tuning for a host that trains: settings of the whole process (here the C
allocator's), which a library function must not change behind its caller's back. Entry
points that own the process (the CLI's train and finetune verbs, the training benchmarks)
call them; :func:`gptkit.train.train` never does.
"""

from __future__ import annotations

import ctypes
import sys


def keep_freed_memory() -> bool:
    """Have glibc keep the memory a training step frees for the next step (Linux only).

    By default glibc maps every block over 32 MB (a batch's MLP activations, say) fresh
    from the kernel and unmaps it when freed, and trims freed memory off its heap: each
    step then faults in hundreds of MB of new zeroed pages, 5-10% of a CPU training step
    at nanoGPT's Shakespeare size. ``mallopt`` (M_MMAP_MAX 0, M_TRIM_THRESHOLD -1) serves
    every block from the heap and never trims it; a step reuses the same sizes, so peak
    memory stays near what it was (2.7-2.8 GB for a step of that config either way; 3.0-3.2
    against 2.75-2.97 GB in bench/train_speed.py runs). Returns whether it was applied.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # musl or another C library: leave it alone
        return False
    m_trim_threshold, m_mmap_max = -1, -4
    return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, -1))
