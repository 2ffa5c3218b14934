"""The all-to-all over the expert-parallel group that both dispatchers move rows with, and its accounting (bytes that
left and reached this rank, time spent waiting) in the call's MoEStats.

    ranks = ExpertGroup(placement, group)                       placement.ranks ranks (None: the default group)
    rows = ranks.start_all_to_all(x_ND, send_R, recv_R, stats)  started in the background
    x_MD = rows.wait()                                          the rows that came in, source rank after source rank

Shape legend: N rows sent, M rows received, R ranks.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from moe_infer.collectives import all_reduce
from moe_infer.moe.stats import MoEStats
from moe_infer.placement import Placement
from pipeline.errors import PipelineError


class ExpertGroup:
    """The ranks a dispatcher exchanges rows with: `placement.ranks` of them, `group` (None: the default group).
    One rank needs no process group at all, and then no collective is called."""

    def __init__(self, placement: Placement, group: dist.ProcessGroup | None):
        self.placement, self.group = placement, group
        if placement.ranks == 1:
            self.rank, self.size = 0, 1
            return
        if not dist.is_available() or not dist.is_initialized():
            raise PipelineError(
                f"dispatch: the placement spans {placement.ranks} ranks but torch.distributed is not initialized"
            )
        self.rank, self.size = dist.get_rank(group), dist.get_world_size(group)
        if self.size != placement.ranks:
            raise PipelineError(
                f"dispatch: the placement spans {placement.ranks} ranks but the process group has {self.size}"
            )

    def max(self, value: int, device: torch.device) -> int:
        if self.size == 1:
            return value
        return all_reduce([value], "max", device=device, group=self.group)[0]

    def all_to_all(self, x: torch.Tensor, send_R: list[int], recv_R: list[int], stats: MoEStats | None) -> torch.Tensor:
        """Rows send_R[r] of `x` (in rank order) go to rank r; recv_R[r] rows come back from rank r, in rank order."""
        return self.start_all_to_all(x, send_R, recv_R, stats).wait()

    def start_all_to_all(
        self, x: torch.Tensor, send_R: list[int], recv_R: list[int], stats: MoEStats | None
    ) -> InFlight:
        """The same exchange, started in the background: `.wait()` returns the rows. Every rank must start its
        exchanges in the same order."""
        if self.size == 1:
            return InFlight(x, None)
        out = x.new_empty((sum(recv_R), *x.shape[1:]))
        work = dist.all_to_all_single(out, x.contiguous(), recv_R, send_R, group=self.group, async_op=True)
        if stats is not None:
            row_bytes = math.prod(x.shape[1:]) * x.element_size()
            stats.bytes_sent += (sum(send_R) - send_R[self.rank]) * row_bytes
            stats.bytes_received += (sum(recv_R) - recv_R[self.rank]) * row_bytes
        return InFlight(out, work, stats)


@dataclass
class InFlight:
    """An all-to-all under way: its output buffer and the collective's handle (None: nothing to wait for)."""

    out: torch.Tensor
    work: dist.Work | None
    stats: MoEStats | None = None  # where the time spent waiting for it is added (exchange_seconds)

    def wait(self) -> torch.Tensor:
        if self.work is not None:
            start = time.perf_counter()
            self.work.wait()
            if self.stats is not None:
                self.stats.exchange_seconds += time.perf_counter() - start
        return self.out
