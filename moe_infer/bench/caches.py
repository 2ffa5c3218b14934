"""Evicting the caches before a timed call, so that every implementation starts as a served MoE layer does: its
weights and inputs in memory, not in the last-level cache (between two calls of one layer, the model's other layers
stream their own weights through it).

    flush = CacheFlusher(device)      a buffer of twice the device's last-level cache
    flush()                           read and write all of it (untimed, before each timed call)

Why: the layer bench times its implementations round robin, and at the paper-shaped layers a layer's expert weights
(16 MB at E=64, D=128, F=256) fit this machine's 32 MB L3. Without a flush, an implementation timed right after
another one on the same weights found them in cache, and the ones timed after a different copy of the weights did
not: the engine's own expert floors followed one another on the engine's stacked weights, and dynamic followed the
floors' plain-torch copy. (triton.testing.do_bench clears the GPU's L2 the same way before each repeat.)
The buffer is read and written (add_), not only written: large writes may bypass the cache (non-temporal stores).
"""

from __future__ import annotations

from pathlib import Path

import torch

DEFAULT_CACHE_BYTES = 64 * 2**20  # where the size cannot be read
CPU_CACHES = Path("/sys/devices/system/cpu/cpu0/cache")


def last_level_cache_bytes(device: torch.device | str) -> int:
    """The device's largest cache: the GPU's L2 on CUDA, the CPU's last level (Linux sysfs) on CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0)) or DEFAULT_CACHE_BYTES
    sizes = []
    for entry in CPU_CACHES.glob("index*/size"):
        try:
            text = entry.read_text().strip()
        except OSError:
            continue
        units = {"K": 2**10, "M": 2**20, "G": 2**30}
        if text[-1:] in units and text[:-1].isdigit():
            sizes.append(int(text[:-1]) * units[text[-1]])
        elif text.isdigit():
            sizes.append(int(text))
    return max(sizes, default=DEFAULT_CACHE_BYTES)


class CacheFlusher:
    def __init__(self, device: torch.device | str):
        self.buffer = torch.zeros(2 * last_level_cache_bytes(device) // 4, dtype=torch.int32, device=device)

    def __call__(self) -> None:
        self.buffer.add_(1)
