"""One measured step of the model sweep (moe_infer.bench.model): B synthetic requests per rank prefilled, then
decoded for a few greedy steps, timed from a barrier to the slowest rank's end; the row of figures it gives (Row).

Shape legend: B batch rows per rank, S prompt positions, V vocabulary, T tokens, D model dim.
"""

from __future__ import annotations

import resource
import sys
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from moe_infer.bench.memory import peak_activation_bytes
from moe_infer.bench.results import Spread
from moe_infer.collectives import all_reduce, barrier, clock
from moe_infer.moe.stats import PHASES

COLUMNS = [
    "policy",
    "batch_per_rank",
    "prefill_ms",
    "prefill_tok_s",
    "decode_ms_per_step",
    "decode_tok_s",
    "peak_mem_mb",
    "moe_act_mb",
    "dropped_prefill",
    "dropped_decode",
    *(f"{p}_ms" for p in PHASES),  # summed over the MoE layers, prefill and decode
]
# Expert buffering (--expert-slots), prefill + decode over every MoE layer: misses and bytes summed over the ranks,
# stall time and device-resident expert MB the largest rank's.
BUFFER_COLUMNS = ["expert_hits", "expert_misses", "copied_mb", "stall_ms", "device_expert_mb"]


TIMED = ("prefill_ms", "prefill_tok_s", "decode_ms_per_step", "decode_tok_s")  # each with its _min and _max


@dataclass
class Row:
    policy: str
    batch_per_rank: int
    prefill_ms: float  # the timed figures: the median over the repeats (one repeat: its own figure)
    prefill_tok_s: float
    decode_ms_per_step: float
    decode_tok_s: float
    peak_mem_mb: float
    moe_act_mb: float
    dropped_prefill: float
    dropped_decode: float
    layers: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)  # layer -> stage -> phase -> ms
    buffering: dict[str, float] = field(default_factory=dict)  # BUFFER_COLUMNS, when experts are buffered
    spread: dict[str, float] = field(default_factory=dict)  # <timed figure>_min and _max over the repeats
    repeats: int = 1

    @classmethod
    def of_repeats(cls, rows: list[Row]) -> Row:
        """The repeats of one (policy, batch) as one row: each timed figure the median with its min-max; the other
        figures (memory, drops, phases, buffering) those of the repeat whose prefill time is the median."""
        spreads = {name: Spread.of([getattr(r, name) for r in rows]) for name in TIMED}
        middle = min(rows, key=lambda r: abs(r.prefill_ms - spreads["prefill_ms"].median))
        row = replace(middle, **{name: s.median for name, s in spreads.items()}, repeats=len(rows))
        row.moe_act_mb = max(r.moe_act_mb for r in rows)  # measured in one repeat only
        row.peak_mem_mb = max(r.peak_mem_mb for r in rows)
        row.spread = {k: v for name, s in spreads.items() for k, v in s.fields(name).items() if k != name}
        return row

    def phase_totals(self) -> dict[str, float]:
        return {p: sum(stage.get(p, 0.0) for layer in self.layers.values() for stage in layer.values()) for p in PHASES}

    def table_row(self) -> list[Any]:
        return [*(getattr(self, c) for c in COLUMNS[:10]), *self.phase_totals().values()]

    def metrics(self) -> dict[str, float]:
        """What W&B gets for this row: `<policy>/<figure>`, so each policy is a line over the batch sizes."""
        named = {**dict(zip(COLUMNS[1:], self.table_row()[1:], strict=True)), **self.spread, **self.buffering}
        return {f"{self.policy}/{k}": v for k, v in named.items()}


def _stage_figures(engine) -> tuple[dict[str, dict[str, float]], list[float]]:
    """(layer -> phase -> ms on this rank, [pairs dropped, pairs routed]) of the layers called since the reset."""
    phases, counts = {}, [0.0, 0.0]
    for layer in engine.moe_layers:
        if layer.calls:
            phases[layer.name] = {p: layer.totals.seconds.get(p, 0.0) * 1e3 for p in PHASES}
            counts[0] += layer.totals.pairs_dropped
            counts[1] += layer.totals.pairs_routed
    return phases, counts


def _buffer_figures(engine) -> tuple[list[float], list[float]]:
    """This rank's ([hits, misses, bytes copied], [stall s, device expert bytes]) over its buffered MoE layers."""
    sums, maxima = [0.0, 0.0, 0.0], [0.0, 0.0]
    for layer in engine.moe_layers:
        stats = layer.buffer_stats
        if stats is not None:
            sums = [a + b for a, b in zip(sums, (stats.hits, stats.misses, stats.bytes_copied), strict=True)]
            maxima = [maxima[0] + stats.stall_seconds, maxima[1] + stats.device_bytes]
    return sums, maxima


def _peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB, macOS bytes


def _synthetic(engine, batch: int, prompt_len: int, seed: int) -> torch.Tensor:
    """[B, S] random ids above the special ones; each rank its own (seeded by seed and rank), the same every run."""
    cfg = engine.model.cfg
    gen = torch.Generator().manual_seed(seed * 1_000_003 + engine.rank)
    low = max(cfg.pad_id, cfg.bos_id, cfg.eos_id) + 1
    return torch.randint(low, cfg.vocab_size, (batch, prompt_len), generator=gen).to(engine.device)


class _Probe:
    """The hidden states the first MoE layer of the prefill receives (for the activation-memory call afterwards)."""

    def __init__(self, engine):
        stack = "decoder" if engine.model.cfg.architecture == "decoder" else "encoder"
        self.layer = next(m for m in engine.moe_layers if m.name.startswith(stack))
        self.x_BSD: torch.Tensor | None = None
        self.handle = self.layer.register_forward_pre_hook(self._keep)

    def _keep(self, module, args) -> None:
        if self.x_BSD is None:
            self.x_BSD = args[0]

    def remove(self) -> None:
        self.handle.remove()

    def activation_bytes(self, device: torch.device) -> int:
        """One call of the layer (a collective under EP: every rank makes it) on what it saw in prefill."""
        x_TD = self.x_BSD.reshape(-1, self.x_BSD.shape[-1])
        return peak_activation_bytes(lambda: self.layer(x_TD), device)


@torch.inference_mode()
def measure(
    engine, policy: str, batch: int, prompt_len: int, decode_steps: int, seed: int, activation: bool = True
) -> Row:
    """One repeat: prefill then decode, timed; `activation`: also the MoE layer's activation memory (a profiled
    call, once per batch size is enough)."""
    model, device = engine.model, engine.device
    tokens_BS = _synthetic(engine, batch, prompt_len, seed)
    decoder_only = model.cfg.architecture == "decoder"
    probe = _Probe(engine)
    engine.reset_stats()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    barrier(device)
    try:
        # ---- timed: prefill
        start = clock(device)
        cache = model.new_cache()
        if decoder_only:
            next_B = model(tokens_BS, cache)[:, -1].argmax(dim=-1)
        else:
            src_pad_BS = torch.zeros_like(tokens_BS, dtype=torch.bool)
            memory_BSD = model.encode(tokens_BS, src_pad_BS, skip_pads=True)
            next_B = torch.full((batch,), model.cfg.bos_id, dtype=torch.int64, device=device)
        prefill_s = clock(device) - start
    finally:
        probe.remove()  # an out-of-memory error must not leave the hook on for the next batch size
    prefill_phases, prefill_counts = _stage_figures(engine)
    prefill_buffers = _buffer_figures(engine)
    engine.reset_stats()
    barrier(device)
    # ---- timed: decode
    start = clock(device)
    for _ in range(decode_steps):
        if decoder_only:
            logits_BV = model(next_B[:, None], cache)[:, -1]
        else:
            logits_BV = model.decode(next_B[:, None], memory_BSD, src_pad_BS, cache)[:, -1]
        next_B = logits_BV.argmax(dim=-1)
    decode_s = clock(device) - start
    decode_phases, decode_counts = _stage_figures(engine)
    peak = _peak_memory_bytes(device)
    decode_buffers = _buffer_figures(engine)  # before the activation call adds one more
    # Prefill + decode: counts and stall time add up, the device-resident bytes are the same in both.
    buffer_sums = [a + b for a, b in zip(prefill_buffers[0], decode_buffers[0], strict=True)]
    buffer_maxima = [prefill_buffers[1][0] + decode_buffers[1][0], decode_buffers[1][1]]
    activation = probe.activation_bytes(device) if activation else 0
    row = _group_row(
        engine, policy, batch, prompt_len, decode_steps, (prefill_s, decode_s, peak, activation),
        (prefill_phases, decode_phases), prefill_counts + decode_counts,
    )  # fmt: skip
    if engine.options.expert_slots is not None:
        hits, misses, copied = all_reduce(buffer_sums, "sum", device=device)
        stall, device_bytes = all_reduce(buffer_maxima, "max", device=device)
        values = (hits, misses, copied / 2**20, stall * 1e3, device_bytes / 2**20)
        row.buffering = dict(zip(BUFFER_COLUMNS, values, strict=True))
    return row


def _group_row(engine, policy, batch, prompt_len, decode_steps, local, phases, counts) -> Row:
    """The group's figures from each rank's: times and memory the largest over the ranks, counts summed."""
    prefill_phases, decode_phases = phases
    names = sorted(set(prefill_phases) | set(decode_phases))
    flat = [stage.get(name, {}).get(p, 0.0) for stage in phases for name in names for p in PHASES]
    maxima = all_reduce([*local, *flat], "max", device=engine.device)
    prefill_s, decode_s, peak, activation = maxima[:4]
    counts = all_reduce(counts, "sum", device=engine.device)
    layers: dict[str, dict[str, dict[str, float]]] = {}
    values = iter(maxima[4:])
    for stage in ("prefill", "decode"):
        for name in names:
            layers.setdefault(name, {})[stage] = {p: next(values) for p in PHASES}
    rows_total = batch * engine.world_size
    return Row(
        policy=policy,
        batch_per_rank=batch,
        prefill_ms=prefill_s * 1e3,
        prefill_tok_s=rows_total * prompt_len / prefill_s if prefill_s > 0 else 0.0,
        decode_ms_per_step=decode_s / decode_steps * 1e3,
        decode_tok_s=rows_total * decode_steps / decode_s if decode_s > 0 else 0.0,
        peak_mem_mb=peak / 2**20,
        moe_act_mb=activation / 2**20,
        dropped_prefill=counts[0] / counts[1] if counts[1] else 0.0,
        dropped_decode=counts[2] / counts[3] if counts[3] else 0.0,
        layers={name: {s: layers[name][s] for s in ("prefill", "decode")} for name in names},
    )
