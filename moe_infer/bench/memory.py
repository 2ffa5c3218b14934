"""Peak memory a call allocates beyond what was live before it: the activation memory of an MoE layer.

    peak = peak_activation_bytes(lambda: layer(x_TD))

CUDA: the caching allocator's own peak counter (max_memory_allocated after a reset) minus what was allocated before.
CPU: torch has no peak counter for host memory, so the call runs once under torch.profiler with profile_memory=True,
which records every allocation and free made by torch ops (sizes as the CPU allocator saw them); the running sum of
those records, in order, peaks at the call's activation peak. Both count only torch tensors, which is what the paper's
"activation memory" means (weights and the Python process are outside it). The profiled call is slower: use it for
memory, never for time.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.profiler import ProfilerActivity, profile


def peak_activation_bytes(fn: Callable[[], object], device: torch.device | str = "cpu") -> int:
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=False) as prof:
        fn()
    live = peak = 0
    for event in sorted(_memory_events(prof), key=lambda e: e[0]):
        live += event[1]
        peak = max(peak, live)
    return peak


def _memory_events(prof) -> list[tuple[int, int]]:
    """(time, bytes) of every [memory] record: positive for an allocation, negative for a free. Read from the raw
    kineto records: the summarised `prof.events()` folds allocations into their op's net usage and loses peaks."""
    return [(e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
