"""The engine's expert store with buffering (the paper's second technique): every local expert of a layer in host
memory, a fixed number K of device slots, and an eviction policy deciding which expert leaves a slot.

    experts = BufferedExperts(cfg, tensors_L, slots=K, eviction="paper", device=device)
    experts.prepare(active_L, overlapped=True)    this call's active local experts, in run order: copies start now
    experts(rows)                                  the experts on their rows (the ExpertStore interface of
                                                   moe_infer.moe.experts, as LocalExperts)
    experts.stats                                  BufferStats summed over every call (hits, misses, bytes, times)

The runtime (moe_infer.runtime.engine) gives a served MoE layer this store instead of LocalExperts when it is asked for
fewer device slots than the rank has local experts.

The decisions (hit or miss, which slot, which expert is evicted) are made by moe_infer.buffering.cache.ExpertCache, the
same code the trace replay tool runs, so served and replayed miss rates are the same figure. The cache starts holding
local experts 0..K-1 (loaded with the layer). Inactive experts are never fetched. When more experts are active than
there are slots, they run in rounds, one expert at a time: a slot is reused by a later expert of the same call only
after the expert that held it has run, and that copy is issued right after it. When every active expert has its
slot (one round), they run as one call of the kernel over the slots (moe_infer.moe.kernels: grouped GEMM at few rows
per expert), the rows put in slot order first and their outputs back in expert order after.

The two tiers, by device:
    CUDA    host tier: the stacked weights in pinned host memory. Device tier: one stacked tensor of K slots per
            weight. A miss is a non-blocking copy on a side stream; each slot has an event, and the compute stream
            waits only for the slots of the experts it is about to run. Copies issued by `prepare` run while the
            all-to-all moves the rows.
    CPU     both tiers in RAM: a copy reads and writes the expert's bytes once, as a host-to-device copy would.
            Copies issued by `prepare` run on this thread while gloo moves the rows in its own. `stats` reports the
            bytes a GPU would hold (`device_bytes`) and would have copied.
Stall time is the time the experts phase waited for weights: on CPU every copy not overlapped with an all-to-all; on
CUDA the compute stream's waits on copy events, measured with CUDA events.

Shape legend: L local experts, K device slots, M rows (grouped by local expert), N one expert's rows, D model dim.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn

from moe_infer.buffering.cache import ExpertCache
from moe_infer.buffering.policies import ONLINE_POLICIES
from moe_infer.model.config import ModelConfig
from moe_infer.moe.experts import Rows, expert_kernel
from moe_infer.moe.kernels import ExpertWeights
from pipeline.errors import PipelineError

ENGINE_EVICTIONS = ONLINE_POLICIES  # belady needs the future: trace replay only


@dataclass
class BufferStats:
    """One layer on one rank, summed over calls."""

    calls: int = 0
    hits: int = 0  # active experts found in a slot
    misses: int = 0  # active experts copied in
    bytes_copied: int = 0  # host -> device
    copy_seconds: float = 0.0
    stall_seconds: float = 0.0  # the experts phase waiting for weights
    device_bytes: int = 0  # expert weights resident on the device: K slots (all L experts when unbuffered)
    host_bytes: int = 0  # every local expert in host memory

    @property
    def miss_rate(self) -> float:
        return self.misses / (self.hits + self.misses) if self.hits + self.misses else 0.0

    def add(self, other: BufferStats) -> None:
        for name in ("calls", "hits", "misses", "bytes_copied", "copy_seconds", "stall_seconds"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.device_bytes += other.device_bytes
        self.host_bytes += other.host_bytes

    def to_dict(self) -> dict[str, float]:
        return {**asdict(self), "miss_rate": self.miss_rate}


class BufferedExperts(nn.Module):
    def __init__(
        self,
        cfg: ModelConfig,
        experts: list[dict[str, torch.Tensor]],
        slots: int,
        eviction: str = "paper",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        initial: Sequence[int] | None = None,
    ):
        """`initial`: the local experts in the device slots at the start (default 0..slots-1); the online
        re-balancer passes the ones that were resident before a move, so a moved expert starts in the host tier."""
        super().__init__()
        if eviction not in ENGINE_EVICTIONS:
            raise PipelineError(
                f"expert buffering: eviction policy {eviction!r} cannot serve; expected one of "
                f"{', '.join(ENGINE_EVICTIONS)} (belady is an offline oracle: replay a recorded trace with "
                "`python -m moe_infer.buffering replay`)"
            )
        num_local = len(experts)
        if not 1 <= slots <= num_local:
            raise PipelineError(
                f"expert buffering: --expert-slots must be between 1 and the {num_local} local experts of a layer, "
                f"got {slots}"
            )
        self.kernel, device, dtype = expert_kernel(cfg, experts, device, dtype)
        self.cuda = device.type == "cuda"
        # Host tier: every local expert, pinned on CUDA so copies can be asynchronous, in the layout of the device
        # tier (the kernel's, for the device): K slots.
        self.host = ExpertWeights.stack(experts, "cpu", dtype, self.kernel.layout)
        if self.cuda:
            self.host = self.host.map(torch.Tensor.pin_memory)
        self.slots = self.host.empty_like(slots, device)
        expert_bytes = self.host.expert_bytes()
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self.ready_K: list[torch.cuda.Event | None] = [None] * slots
        initial = list(range(slots) if initial is None else initial)
        self.cache = ExpertCache(slots, eviction, initial=initial)
        for slot, expert in enumerate(initial):
            self._copy_in(expert, slot)
        self.totals = BufferStats(device_bytes=slots * expert_bytes, host_bytes=num_local * expert_bytes)
        self._expert_bytes, self.num_local, self.num_slots = expert_bytes, num_local, slots
        self._slot_of: dict[int, int] = {}  # this call: local expert -> device slot
        self._after: dict[int, list[tuple[int, int]]] = {}  # expert -> (expert, slot) copies waiting for it to run
        self._events: list[tuple[str, torch.cuda.Event, torch.cuda.Event]] = []  # CUDA timings not yet read

    def expert_bytes(self) -> int:
        return self._expert_bytes

    @property
    def stats(self) -> BufferStats:
        self._read_cuda_timings()
        return self.totals

    def reset_stats(self) -> None:
        self._read_cuda_timings()
        self.totals = BufferStats(device_bytes=self.totals.device_bytes, host_bytes=self.totals.host_bytes)

    def prepare(self, active_L: list[int], overlapped: bool) -> None:
        """Decide this call's hits and misses and start every copy whose slot is free now; a copy into a slot that an
        earlier expert of this call still needs waits until that expert has run."""
        self._read_cuda_timings()
        self._slot_of, self._after = {}, {}
        self.totals.calls += 1
        user_of_slot: dict[int, int] = {}  # slot -> the last expert of this call placed in it so far
        for access in self.cache.step(active_L):
            self._slot_of[access.expert] = access.slot
            if access.hit:
                self.totals.hits += 1
            elif access.slot in user_of_slot:
                self._after.setdefault(user_of_slot[access.slot], []).append((access.expert, access.slot))
            else:
                self._timed_copy(access.expert, access.slot, stalls=not overlapped)
            user_of_slot[access.slot] = access.expert

    def forward(self, rows: Rows) -> None:
        """The active experts on their rows, into rows.y_MD: all at once over the slots when every one has its slot
        (one round), else one at a time in the order `prepare` was told, each waiting for its own copy only and
        handing its slot to the copy waiting for it once it has run (the next round of this call)."""
        missing = [local for local in rows.active_L if local not in self._slot_of]
        if missing:
            raise PipelineError(
                f"expert buffering: local experts {missing} run but the dispatcher did not prepare them"
            )
        grouped = self.kernel.uses_grouped(rows.rows_L)  # what the resident experts would run
        if not self._after and grouped:
            self._run_over_slots(rows)
            return
        start = 0
        for local, n in enumerate(rows.rows_L):
            if not n:
                continue
            slot, end = self._slot_of[local], start + n
            if self.cuda and self.ready_K[slot] is not None:
                self._wait(self.ready_K[slot])
            x_ND, probs_N, y_ND = rows.x_MD[start:end], rows.probs_M[start:end], rows.y_MD[start:end]
            self.kernel.one(self.slots, slot, x_ND, probs_N, y_ND, fused_bias=not grouped)  # the same arithmetic
            for expert, next_slot in self._after.pop(local, []):  # its slot is free for the next round now
                self._timed_copy(expert, next_slot, stalls=True)
            start = end

    def _run_over_slots(self, rows: Rows) -> None:
        """One kernel call over the K slots: the rows reordered from expert order to slot order, and back."""
        starts_L = [0] * len(rows.rows_L)
        for local in range(1, len(rows.rows_L)):
            starts_L[local] = starts_L[local - 1] + rows.rows_L[local - 1]
        rows_K, blocks = [0] * self.num_slots, []  # blocks: (start in expert order, rows), in slot order
        for local in sorted(rows.active_L, key=self._slot_of.__getitem__):
            slot = self._slot_of[local]
            rows_K[slot] = rows.rows_L[local]
            blocks.append((starts_L[local], rows.rows_L[local]))
            if self.cuda and self.ready_K[slot] is not None:
                self._wait(self.ready_K[slot])
        device = rows.x_MD.device
        # Row m of slot order is row m + (its block's start in expert order - its start in slot order).
        shift, new_start = [], 0
        for start, n in blocks:
            shift.append(start - new_start)
            new_start += n
        counts = torch.tensor([n for _, n in blocks], device=device)
        order_M = torch.arange(new_start, device=device) + torch.tensor(shift, device=device).repeat_interleave(
            counts, output_size=new_start
        )
        x_MD, probs_M = rows.x_MD.index_select(0, order_M), rows.probs_M.index_select(0, order_M)
        y_MD = self.kernel(self.slots, x_MD, probs_M, rows_K, torch.empty_like(x_MD))
        rows.y_MD.index_copy_(0, order_M, y_MD)

    def _timed_copy(self, expert: int, slot: int, stalls: bool) -> None:
        self.totals.misses += 1
        self.totals.bytes_copied += self._expert_bytes
        if self.cuda:  # asynchronous: the time is read from CUDA events once they have completed
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(self.stream)
            self._copy_in(expert, slot)
            end.record(self.stream)
            self._events.append(("copy", start, end))
            return
        begin = time.perf_counter()
        self._copy_in(expert, slot)
        seconds = time.perf_counter() - begin
        self.totals.copy_seconds += seconds
        if stalls:
            self.totals.stall_seconds += seconds

    def _copy_in(self, expert: int, slot: int) -> None:
        """Host expert `expert` into device slot `slot`."""
        if not self.cuda:
            self.slots.copy_expert_(slot, self.host, expert)
            return
        # The slot's previous expert may still be computing on the compute stream: the copy waits for that first.
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream):
            self.slots.copy_expert_(slot, self.host, expert, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record(self.stream)
        self.ready_K[slot] = ready

    def _wait(self, ready: torch.cuda.Event) -> None:
        compute = torch.cuda.current_stream()
        before, after = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        before.record(compute)
        compute.wait_event(ready)
        after.record(compute)
        self._events.append(("stall", before, after))

    def _read_cuda_timings(self) -> None:
        for kind, start, end in self._events:
            end.synchronize()
            seconds = start.elapsed_time(end) / 1e3
            if kind == "copy":
                self.totals.copy_seconds += seconds
            else:
                self.totals.stall_seconds += seconds
        self._events.clear()
