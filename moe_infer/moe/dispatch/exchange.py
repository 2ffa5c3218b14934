"""The all-to-all over the expert-parallel group that both dispatchers move rows with, and its accounting (bytes that
left and reached this rank, time spent waiting) in the call's MoEStats.

    ranks = ExpertGroup(placement, group)                       placement.ranks ranks (None: the default group)
    rows = ranks.start_all_to_all(x_ND, send_R, recv_R, stats)  started in the background
    x_MD = rows.wait()                                          the rows that came in, source rank after source rank
    rows = ranks.start_all_gather(x_BD, stats)                  every rank's B rows, rank after rank: [R * B, D]

Numbers that travel with rows (routing probabilities, expert positions) ride in extra columns of the rows' own
buffer, bit for bit (`as_columns`, `from_columns`): one collective instead of two.

When every rank of the group is on this host and the tensors are on the CPU, both exchanges go through shared memory
(shm.py; MOE_SHM=off keeps gloo), behind the same InFlight.

Shape legend: N rows sent, M rows received, B rows per rank, R ranks.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from moe_infer.moe.dispatch.shm import ShmOp, ShmTransport, chosen_transport, shm_transport
from moe_infer.moe.stats import MoEStats
from moe_infer.placement import Placement
from pipeline.errors import PipelineError


class ExpertGroup:
    """The ranks a dispatcher exchanges rows with: `placement.ranks` of them, `group` (None: the default group).
    One rank needs no process group at all, and then no collective is called."""

    def __init__(self, placement: Placement, group: dist.ProcessGroup | None):
        self.placement, self.group = placement, group
        self.shared_memory = chosen_transport() == "auto"
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

    def start_all_gather(self, x: torch.Tensor, stats: MoEStats | None) -> InFlight:
        """Every rank's `x` (the same shape on every rank), rank after rank, started in the background."""
        if self.size == 1:
            return InFlight(x, None)
        out = x.new_empty((self.size * x.shape[0], *x.shape[1:]))
        if shm := self._shm(x):
            work = shm.start_all_gather(out, x)
        else:
            work = _all_gather_single(out, x.contiguous(), group=self.group, async_op=True)
        if stats is not None:
            stats.bytes_sent += (self.size - 1) * x.numel() * x.element_size()
            stats.bytes_received += (self.size - 1) * x.numel() * x.element_size()
        return InFlight(out, work, stats)

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
        if shm := self._shm(x):
            work = shm.start_all_to_all(out, x, send_R, recv_R)
        else:
            work = dist.all_to_all_single(out, x.contiguous(), recv_R, send_R, group=self.group, async_op=True)
        if stats is not None:
            row_bytes = math.prod(x.shape[1:]) * x.element_size()
            stats.bytes_sent += (sum(send_R) - send_R[self.rank]) * row_bytes
            stats.bytes_received += (sum(recv_R) - recv_R[self.rank]) * row_bytes
        return InFlight(out, work, stats)

    def _shm(self, x: torch.Tensor) -> ShmTransport | None:
        """The shared-memory transport when this exchange can take it: MOE_SHM=auto, CPU tensors, one host."""
        return shm_transport(self.group) if self.shared_memory and x.device.type == "cpu" else None


# torch >= 2.12 names it all_gather_single and warns on every call of the old name (a warnings.warn per MoE layer);
# older torch (the GPU machines' 2.11) has only the old name.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


@dataclass
class InFlight:
    """An exchange under way: its output buffer and the collective's handle (None: nothing to wait for)."""

    out: torch.Tensor
    work: dist.Work | ShmOp | None
    stats: MoEStats | None = None  # where the time spent waiting for it is added (exchange_seconds)

    def wait(self) -> torch.Tensor:
        if self.work is not None:
            start = time.perf_counter()
            self.work.wait()
            if self.stats is not None:
                self.stats.exchange_seconds += time.perf_counter() - start
        return self.out


def as_columns(values_NK: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """4-byte numbers (fp32 or int32, [N, K]) as columns of rows of `dtype`, bit for bit ([N, K * 4 / itemsize])."""
    return values_NK.contiguous().view(dtype)


def from_columns(columns_NC: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The 4-byte numbers `as_columns` packed, back as `dtype` (torch.float32 or torch.int32)."""
    return columns_NC.contiguous().view(dtype)
