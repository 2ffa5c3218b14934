"""Host memory reuse: glibc's malloc told to keep the memory a process frees, so the next tensor of the same size
reuses pages that are already mapped.

    tune_host_malloc()      once per process, before the work (the engine, the layer bench, training do it)

Why: glibc gives an allocation above its mmap threshold (128 KiB at first, raised to the largest block freed so far)
pages of its own, and returns them to the kernel when it is freed; a heap whose free top passes the trim threshold
is shrunk too. Every MB-sized tensor an MoE layer makes per call (the gathered rows, the experts' outputs, the
combined result) then starts as fresh pages, each of them a page fault and a page of zeroing on first touch. Measured
on the layer bench's paper shape (E=64, D=256, F=1024, 4096 tokens, one core, three processes each way): the dynamic
layer took 5,088-5,269 page faults per call (20 MB of fresh pages), the expert floor on preallocated rows 0-36;
with the settings below the layer took 0-1. The time that saves (zeroing 20 MB, a few ms of a ~200 ms call) is
within this machine's noise at that shape; it grows with the tensors.

The settings: allocations up to 32 MiB (glibc's largest mmap threshold on 64-bit) come from the heap, and up to
1 GiB of freed heap is kept. The price is resident memory that stays at its peak (up to 1 GiB above the live
tensors) instead of shrinking after a burst; a serving or training process reaches that peak again at its next
batch anyway. Larger allocations are mapped and unmapped as before. Only glibc has mallopt; elsewhere (macOS, musl)
nothing changes. MOE_MALLOC_TUNING=auto|off (auto, the default: tune where glibc is present).
"""

from __future__ import annotations

import ctypes

from pipeline.errors import env_choice

ENV = "MOE_MALLOC_TUNING"
CHOICES = ("auto", "off")
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameter numbers (malloc.h)
MMAP_THRESHOLD_BYTES = 32 << 20  # glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit: the largest it accepts
TRIM_THRESHOLD_BYTES = 1 << 30


def tune_host_malloc() -> bool:
    """Apply the settings above to this process; whether they were applied (False: MOE_MALLOC_TUNING=off, or no
    glibc)."""
    choice = env_choice(ENV, CHOICES)
    if choice == "off":
        return False
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return False
    if not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallopt"):  # musl's mallopt ignores these
        return False
    mallopt = libc.mallopt
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    applied = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
    return bool(applied)
