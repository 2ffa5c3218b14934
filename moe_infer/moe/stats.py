"""One MoE layer call's figures on one rank (MoEStats), and the timer that splits its wall time into phases.

    stats = MoEStats(tokens=T, pairs_routed=T * K)
    timer = PhaseTimer(stats, x_TD.device)      started at the router
    ... timer.lap("gate") ... timer.lap("dispatch") ... timer.lap("experts") ... timer.lap("combine")
    layer.totals.add(stats)                      a layer's figures summed over every call

Every implementation the engine serves fills one in: ours (moe_infer.moe.layer, with the dispatchers of
moe_infer.moe.dispatch) and the peers (moe_infer.moe.baselines), so they are compared on the same figures.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from moe_infer.collectives import clock

PHASES = ("gate", "dispatch", "experts", "combine")


@dataclass
class MoEStats:
    """One MoE layer call on one rank. Counts are of (token, expert) pairs; bytes are those that left / reached this
    rank in the all-to-alls (the chunk a rank keeps for itself is not counted), so over a group the sums of
    `bytes_sent` and `bytes_received` are equal."""

    tokens: int = 0  # tokens this rank brought
    pairs_routed: int = 0  # tokens * K
    pairs_dropped: int = 0  # past an expert's capacity: the token keeps only the residual path for that expert
    padded_slots: int = 0  # empty capacity slots in the buffer this rank sent (experts compute them anyway)
    expert_rows: int = 0  # rows this rank's experts computed, padding included
    bytes_sent: int = 0
    bytes_received: int = 0
    # gate: the router and the dispatcher's own routing work (sort, count, capacity); dispatch: rows to their experts'
    # ranks; experts; combine: outputs back to their tokens, summed.
    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PHASES, 0.0))
    # Of the phases' time, how long this rank sat waiting for all-to-alls to finish (inside dispatch and combine):
    # the exchange's share of the layer, as far as the host sees it (on CUDA the phase timer's synchronisation
    # makes this the wait for the NCCL kernels).
    exchange_seconds: float = 0.0

    @property
    def dropped_fraction(self) -> float:
        return self.pairs_dropped / self.pairs_routed if self.pairs_routed else 0.0

    def add(self, other: MoEStats) -> None:
        """Accumulate another call's figures into these (a layer's totals over a run)."""
        for name in ("tokens", "pairs_routed", "pairs_dropped", "padded_slots", "expert_rows"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.bytes_sent += other.bytes_sent
        self.bytes_received += other.bytes_received
        self.exchange_seconds += other.exchange_seconds
        for phase, seconds in other.seconds.items():
            self.seconds[phase] = self.seconds.get(phase, 0.0) + seconds


class PhaseTimer:
    """Wall time per phase. `stats` is the call's MoEStats, where the laps are added.

    On CUDA the kernels are still queued when the host reads its clock: the phase times are the host's (launch)
    times unless `PhaseTimer.synchronize` is set, which makes every lap synchronize the device first
    (moe_infer.collectives.clock). That is off by default: a synchronize per phase would make each rank's host wait
    for its GPU, and through the collectives for every other rank, four times per MoE layer. Benchmarks of one
    layer (moe_infer.bench.layer) turn it on; on CPU it changes nothing."""

    synchronize = False

    def __init__(self, stats: MoEStats, device: torch.device):
        self.stats, self.device = stats, device
        self.start = clock(device, self.synchronize)

    def lap(self, phase: str) -> None:
        now = clock(self.device, self.synchronize)
        self.stats.seconds[phase] += now - self.start
        self.start = now
