"""Keep the ranks of an expert-parallel group calling the model together.

Every MoE layer exchanges rows with all-to-alls, so each rank must run the same sequence of model calls even when it
has no requests left: it then calls the model with an empty batch (0 rows), which costs only the collectives. The
loops ask `sync.any(flag)` once per step and stop when no rank has work left.

    sync = LockStep()                      the default process group (or a world of one: no collective at all)
    rounds = sync.max(len(my_batches))     how many batches every rank must step through
    while sync.any(bool(active_rows)):     one tiny all-reduce per decoding step
        ...
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class LockStep:
    def __init__(self, group: dist.ProcessGroup | None = None, device: torch.device | str = "cpu"):
        self.group = group
        self.active = dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1
        # NCCL reduces only CUDA tensors; gloo only CPU ones.
        self.device = torch.device(device)

    def max(self, value: int) -> int:
        if not self.active:
            return value
        t = torch.tensor([value], dtype=torch.int64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return int(t.item())

    def any(self, flag: bool) -> bool:
        return self.max(int(flag)) > 0
