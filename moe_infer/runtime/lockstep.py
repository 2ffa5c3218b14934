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

from moe_infer.collectives import all_reduce


class LockStep:
    def __init__(self, group: dist.ProcessGroup | None = None, device: torch.device | str = "cpu"):
        self.group = group
        self.device = torch.device(device)  # where the collectives' tensors live (moe_infer.collectives)
        # Step hooks (moe_infer.runtime.steploop.StepHook) run after every step of the batch loops, on every rank at
        # the same point, as in the serving loop: the online re-balancer (moe_infer.runtime.rebalance).
        self.hooks: list = []

    def max(self, value: int) -> int:
        (largest,) = all_reduce([int(value)], "max", device=self.device, group=self.group)
        return largest

    def any(self, flag: bool) -> bool:
        return self.max(int(flag)) > 0

    def any_each(self, flags: list[bool]) -> list[bool]:
        """Element-wise: is each flag set on any rank (one all-reduce for all of them)."""
        return [v > 0 for v in all_reduce([int(f) for f in flags], "max", device=self.device, group=self.group)]
