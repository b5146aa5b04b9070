"""The process's own memory: what the streamed compression reports (RSS now, peak) and one glibc setting."""

from __future__ import annotations

import ctypes
import resource
from pathlib import Path


def _status(field: str) -> int:
    """A ``/proc/self/status`` field in bytes (Linux; 0 elsewhere)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def resident_bytes() -> int:
    """The process's resident memory now (Linux /proc; 0 elsewhere)."""
    return _status("VmRSS")


def return_freed_memory(threshold: int = 1 << 20) -> bool:
    """Makes glibc give freed blocks of ``threshold`` bytes and more back to the system at once (``mallopt``) and
    trims its heap now (``malloc_trim``); False where there is no glibc.

    By default glibc's mmap threshold grows to 32 MiB after the first large free, so the many 8-32 MiB
    temporaries of a layer (activations, blocks of the n x n work) then come from its heap, which fragments and is
    not returned: measured 0.5 GiB of [heap] between layers on the LLaMA-1B shape. Fixed at 1 MiB they are mapped
    and unmapped one by one (a page fault per page, negligible beside the float64 solves)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_mmap_threshold = -3
    libc.mallopt(m_mmap_threshold, threshold)
    libc.malloc_trim(0)
    return True


def peak_resident_bytes() -> int:
    """The process's peak resident memory so far (bytes): /proc's VmHWM, which includes the current RSS; getrusage's
    ru_maxrss is the kernel's high-water mark as last updated and can lag behind the RSS now (measured in a test)."""
    return max(_status("VmHWM"), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, resident_bytes())
