"""The MoE layers' figures while serving, as a step hook of the serving loop (moe_infer.runtime.steploop): at most
every `interval_s` seconds, what this rank's MoE layers did since the last time, for rank 0's /metrics.

    meter = MoEMeter(engine.moe_layers, interval_s=1.0)
    loop.add_hook(meter)         after_step returns {"moe": {layer: LayerFigures as a dict}} now and then

Per MoE layer, on this rank: (token, expert) pairs its tokens sent to each expert (dynamic and static policies: our
router's choices; the peers' layers do not expose theirs), pairs dropped past an expert's capacity, bytes sent and
received in the all-to-alls, and with expert buffering the cache hits, misses, bytes copied to the device and the
seconds the experts waited for them. Rank 0 adds every rank's figures up: the group's totals.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from moe_infer.moe.layer import ServedMoE, ServedMoELayer

TOTALS = ("pairs_routed", "pairs_dropped", "bytes_sent", "bytes_received")
BUFFER = ("hits", "misses", "bytes_copied", "stall_seconds")


@dataclass
class LayerFigures:
    tokens_per_expert: list[int] = field(default_factory=list)  # empty: the layer does not expose its routing
    pairs_routed: int = 0
    pairs_dropped: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    buffer: dict[str, float] | None = None  # hits, misses, bytes_copied, stall_seconds (expert buffering only)


class MoEMeter:
    def __init__(self, layers: list[ServedMoE], interval_s: float = 1.0):
        self.layers, self.interval_s = layers, interval_s
        self._last_sent = time.monotonic()
        self._seen: dict[str, dict[str, float]] = {layer.name: self._totals(layer) for layer in layers}
        for layer in layers:
            if isinstance(layer, ServedMoELayer):
                # The layer keeps each call's expert counts while `recording` (as runtime.recorder does); this meter
                # empties the list every interval.
                layer.recording, layer.counts = True, []

    def after_step(self, step: int, worked: bool) -> dict[str, Any] | None:
        if time.monotonic() - self._last_sent < self.interval_s:
            return None
        self._last_sent = time.monotonic()
        figures = {}
        for layer in self.layers:
            now = self._totals(layer)
            seen, self._seen[layer.name] = self._seen[layer.name], now
            delta = {k: now[k] - seen[k] for k in now}
            counts = self._take_counts(layer)
            if not any(delta.values()) and not counts:
                continue
            figures[layer.name] = asdict(
                LayerFigures(
                    counts,
                    *(int(delta[k]) for k in TOTALS),
                    {k: delta[k] for k in BUFFER} if layer.buffer_stats is not None else None,
                )
            )
        return {"moe": figures} if figures else None

    @staticmethod
    def _totals(layer: ServedMoE) -> dict[str, float]:
        totals = {k: float(getattr(layer.totals, k)) for k in TOTALS}
        stats = layer.buffer_stats
        totals.update({k: float(getattr(stats, k)) if stats is not None else 0.0 for k in BUFFER})
        return totals

    @staticmethod
    def _take_counts(layer: ServedMoE) -> list[int]:
        if not isinstance(layer, ServedMoELayer) or not layer.counts:
            return []
        counts_E = torch.stack(list(layer.counts)).sum(dim=0)
        layer.counts.clear()
        return counts_E.tolist()
