"""What every gating policy shares: the policy interface, its per-call statistics, phase timing, and the
all-to-all over the expert-parallel group.

Shape legend: T tokens, K experts per token, D model dim, N rows, R ranks.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.distributed as dist

from moe_infer.collectives import all_reduce, clock
from moe_infer.placement import Placement
from pipeline.errors import PipelineError


class RunExpert(Protocol):
    """This rank's experts of one layer, by local slot (moe_infer.moe.experts.LocalExperts, or the buffered store
    in moe_infer.buffering.store). A policy first says which slots the call will run, in the order it runs them (a
    buffered store starts copying missing experts then; `overlapped`: an all-to-all is in flight meanwhile), then
    calls each of them once: run_expert(local_slot, x_ND, probs_N, out_ND=None) -> y_ND, the expert on rows x_ND with
    the routing probability applied, written into out_ND when given (a slice of the policy's output buffer, so it is
    not copied again), else returned as a new tensor."""

    def prepare(self, active_L: list[int], overlapped: bool) -> None: ...

    def __call__(
        self, slot: int, x_ND: torch.Tensor, probs_N: torch.Tensor, out_ND: torch.Tensor | None = None
    ) -> torch.Tensor: ...


PHASES = ("gate", "dispatch", "experts", "combine")


@dataclass
class GatingStats:
    """One policy call on one rank. Counts are of (token, expert) pairs; bytes are those that left / reached this
    rank in the all-to-alls (the chunk a rank keeps for itself is not counted), so over a group the sums of
    `bytes_sent` and `bytes_received` are equal."""

    tokens: int = 0  # tokens this rank brought
    pairs_routed: int = 0  # tokens * K
    pairs_dropped: int = 0  # past an expert's capacity: the token keeps only the residual path for that expert
    padded_slots: int = 0  # empty capacity slots in the buffer this rank sent (experts compute them anyway)
    expert_rows: int = 0  # rows this rank's experts computed, padding included
    bytes_sent: int = 0
    bytes_received: int = 0
    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PHASES, 0.0))
    # Of the phases' time, how long this rank sat waiting for all-to-alls to finish (inside dispatch and combine):
    # the exchange's share of the layer, as far as the host sees it (on CUDA the phase timer's synchronisation
    # makes this the wait for the NCCL kernels).
    exchange_seconds: float = 0.0

    @property
    def dropped_fraction(self) -> float:
        return self.pairs_dropped / self.pairs_routed if self.pairs_routed else 0.0

    def add(self, other: GatingStats) -> None:
        """Accumulate another call's figures into these (a layer's totals over a run)."""
        for name in ("tokens", "pairs_routed", "pairs_dropped", "padded_slots", "expert_rows"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.bytes_sent += other.bytes_sent
        self.bytes_received += other.bytes_received
        self.exchange_seconds += other.exchange_seconds
        for phase, seconds in other.seconds.items():
            self.seconds[phase] = self.seconds.get(phase, 0.0) + seconds


class GatingPolicy(Protocol):
    def __call__(
        self, x_TD: torch.Tensor, probs_TK: torch.Tensor, experts_TK: torch.Tensor, run_expert: RunExpert
    ) -> tuple[torch.Tensor, GatingStats]: ...


class PhaseTimer:
    """Wall time per phase (moe_infer.collectives.clock: on CUDA it synchronizes first, else the kernels are still
    queued)."""

    def __init__(self, stats: GatingStats, device: torch.device):
        self.stats, self.device = stats, device
        self.start = clock(device)

    def lap(self, phase: str) -> None:
        now = clock(self.device)
        self.stats.seconds[phase] += now - self.start
        self.start = now


class ExpertGroup:
    """The ranks a policy exchanges rows with: `placement.ranks` of them, `group` (None: the default group).
    One rank needs no process group at all, and then no collective is called."""

    def __init__(self, placement: Placement, group: dist.ProcessGroup | None):
        self.placement, self.group = placement, group
        if placement.ranks == 1:
            self.rank, self.size = 0, 1
            return
        if not dist.is_available() or not dist.is_initialized():
            raise PipelineError(
                f"gating: the placement spans {placement.ranks} ranks but torch.distributed is not initialized"
            )
        self.rank, self.size = dist.get_rank(group), dist.get_world_size(group)
        if self.size != placement.ranks:
            raise PipelineError(
                f"gating: the placement spans {placement.ranks} ranks but the process group has {self.size}"
            )

    def max(self, value: int, device: torch.device) -> int:
        if self.size == 1:
            return value
        return all_reduce([value], "max", device=device, group=self.group)[0]

    def all_to_all(
        self, x: torch.Tensor, send_R: list[int], recv_R: list[int], stats: GatingStats | None
    ) -> torch.Tensor:
        """Rows send_R[r] of `x` (in rank order) go to rank r; recv_R[r] rows come back from rank r, in rank order."""
        return self.start_all_to_all(x, send_R, recv_R, stats).wait()

    def start_all_to_all(
        self, x: torch.Tensor, send_R: list[int], recv_R: list[int], stats: GatingStats | None
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
    stats: GatingStats | None = None  # where the time spent waiting for it is added (exchange_seconds)

    def wait(self) -> torch.Tensor:
        if self.work is not None:
            start = time.perf_counter()
            self.work.wait()
            if self.stats is not None:
                self.stats.exchange_seconds += time.perf_counter() - start
        return self.out
