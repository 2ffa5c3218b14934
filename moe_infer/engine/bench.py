"""`launch/infer.py --mode bench`: the whole model served by each MoE policy, swept over batch sizes.

    python launch/infer.py --export exports/lm-tiny --mode bench                          all four policies, B = 1..64
    deepspeed --num_gpus 2 launch/infer.py --export exports/mt-tiny --mode bench --policies dynamic,static \\
        --max-batch 16 --prompt-len 24 --decode-steps 8 --run-dir runs/bench-mt

`--policies` may also name `dense-equivalent`: the same model with every MoE layer replaced by a dense FFN of K*F
hidden units (the same FLOPs per token; DenseEquivalent), the MoE-vs-dense characterisation.

For each policy of --policies (each served by its own Engine, freed before the next one starts), for batch sizes
1, 2, 4, ... doubling up to --max-batch, each rank brings B synthetic requests of its own (random token ids, seeded by
--seed and the rank) of --prompt-len tokens, then measures:
    prefill   LM: one forward over the B prompts filling the KV cache; MT: the encoder over the B sources
    decode    --decode-steps greedy steps of one token per row with the KV cache (MT: from BOS, cross-attention cached)
Times are the slowest rank's (every rank starts together after a barrier); tokens/s counts the tokens of all ranks
(B x ranks rows). Peak memory: CUDA, torch.cuda.max_memory_allocated over the step (the largest of the ranks); CPU, the
process's peak RSS so far (it never goes down, so it is the peak of everything run before too). MoE activation memory:
moe_infer.engine.memory.peak_activation_bytes around one call of the first MoE layer of the prefill on the hidden
states it received, after the timed region. Dropped fraction: pairs past capacity over pairs routed, over all ranks,
for prefill and decode separately. Per MoE layer, the phase times (gate, dispatch, experts, combine) of prefill and
decode from the layers' MoEStats, the slowest rank's. With --expert-slots K (expert buffering), each row also has
the store's figures (BUFFER_COLUMNS: hits, misses, MB copied host -> device, stall ms, device-resident expert MB).

An out-of-memory error (torch.OutOfMemoryError, MemoryError, a RuntimeError saying "out of memory") ends that policy's
sweep: the batch size is recorded as its limit and the next policy starts. With several ranks this is recovered only
when every rank meets it before the step's first collective (same shapes, same allocations: the usual case); a rank
stopped elsewhere leaves the others in a collective, and --timeout ends the job.

Output: the table on stdout (rank 0), `bench.json` in the run directory (rewritten atomically after every row, so a
killed sweep keeps what it measured), and a W&B run there (offline unless WANDB_MODE says otherwise): one `log` per row
(keys `<policy>/<figure>`, step = row number) and the table as `bench`. Nothing is printed or logged inside a timed
region.
"""

from __future__ import annotations

import gc
import json
import resource
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

import torch

from moe_infer.collectives import all_reduce, barrier, clock
from moe_infer.engine.memory import peak_activation_bytes
from moe_infer.moe.layer import PeerMoELayer
from moe_infer.moe.stats import PHASES, MoEStats, PhaseTimer
from pipeline.atomic import write_atomic
from pipeline.errors import ConfigError

BENCH_FILE = "bench.json"
TABLE_KEY = "bench"
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


@dataclass
class Row:
    policy: str
    batch_per_rank: int
    prefill_ms: float
    prefill_tok_s: float
    decode_ms_per_step: float
    decode_tok_s: float
    peak_mem_mb: float
    moe_act_mb: float
    dropped_prefill: float
    dropped_decode: float
    layers: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)  # layer -> stage -> phase -> ms
    buffering: dict[str, float] = field(default_factory=dict)  # BUFFER_COLUMNS, when experts are buffered

    def phase_totals(self) -> dict[str, float]:
        return {p: sum(stage.get(p, 0.0) for layer in self.layers.values() for stage in layer.values()) for p in PHASES}

    def table_row(self) -> list[Any]:
        return [*(getattr(self, c) for c in COLUMNS[:10]), *self.phase_totals().values()]

    def metrics(self) -> dict[str, float]:
        """What W&B gets for this row: `<policy>/<figure>`, so each policy is a line over the batch sizes."""
        named = {**dict(zip(COLUMNS[1:], self.table_row()[1:], strict=True)), **self.buffering}
        return {f"{self.policy}/{k}": v for k, v in named.items()}


def check_bench(args, cfg) -> None:
    """The synthetic requests must fit the model: raised on every rank alike, before any collective."""
    if cfg.position_embedding != "learned":
        return
    needed = args.prompt_len + args.decode_steps if cfg.architecture == "decoder" else args.prompt_len
    if needed > cfg.max_positions:
        raise ConfigError(
            "--prompt-len/--decode-steps",
            f"{args.prompt_len} prompt tokens + {args.decode_steps} decode steps need {needed} positions, beyond "
            f"the model's {cfg.max_positions} learned positions",
        )
    if args.decode_steps > cfg.max_positions:
        raise ConfigError("--decode-steps", f"{args.decode_steps} is beyond the {cfg.max_positions} positions")


def batch_sizes(max_batch: int) -> list[int]:
    sizes, b = [], 1
    while b <= max_batch:
        sizes.append(b)
        b *= 2
    return sizes


def is_out_of_memory(err: BaseException) -> bool:
    if isinstance(err, torch.OutOfMemoryError | MemoryError):
        return True
    return isinstance(err, RuntimeError) and "out of memory" in str(err).lower()


# ---- the FLOP-equivalent dense model ---------------------------------------------------------------------------------

DENSE = "dense-equivalent"  # a bench-only "policy": every MoE layer replaced by DenseEquivalent


class DenseEquivalent(torch.nn.Module):
    """A dense FFN with K*F hidden units on every token: the FLOPs per token of a top-K MoE layer, no router and no
    exchange (the model the MoE one is characterised against). Random weights, scaled like trained ones: there is no
    trained dense counterpart, and only its time and memory are measured."""

    def __init__(self, cfg, device: torch.device, seed: int = 0):
        from moe_infer.engine.layer_bench import layer_config, random_layer
        from moe_infer.moe.experts import LocalExperts

        super().__init__()
        dense_cfg = layer_config(1, cfg.hidden_size, cfg.topk * cfg.ffn_hidden_size, 1, cfg.activation)
        _, weights = random_layer(dense_cfg, seed)
        self.ffn = LocalExperts(dense_cfg, [{k: v.to(device) for k, v in weights[0].items()}])

    def forward(self, x_TD: torch.Tensor) -> tuple[torch.Tensor, MoEStats]:
        stats = MoEStats(tokens=x_TD.shape[0], expert_rows=x_TD.shape[0])
        timer = PhaseTimer(stats, x_TD.device)
        y_TD = self.ffn.run(0, x_TD, torch.ones(x_TD.shape[0], device=x_TD.device))
        timer.lap("experts")
        return y_TD, stats


def use_dense_equivalent(engine) -> None:
    """Serve `engine`'s model with every MoE layer replaced by a DenseEquivalent (each rank on its own tokens: a dense
    model needs no expert parallelism)."""
    for layer in engine.model.modules():
        if hasattr(layer, "moe"):
            layer.moe = PeerMoELayer(layer.moe.name, DenseEquivalent(engine.model.cfg, engine.device))


# ---- one measurement ------------------------------------------------------------------------------------------------


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
def measure(engine, policy: str, batch: int, prompt_len: int, decode_steps: int, seed: int) -> Row:
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
    activation = probe.activation_bytes(device)
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


# ---- the sweep ------------------------------------------------------------------------------------------------------


def _any_rank(engine, flag: bool) -> bool:
    return engine.sync.any(flag)


def sweep_policy(engine, policy: str, args, on_row) -> int | None:
    """Every batch size for one engine; `on_row(row)` after each. Returns the batch size that ran out of memory."""
    measure(engine, policy, 1, args.prompt_len, min(args.decode_steps, 2), args.seed)  # warm-up: lazy init, caches
    for batch in batch_sizes(args.max_batch):
        row, oom = None, False
        try:
            row = measure(engine, policy, batch, args.prompt_len, args.decode_steps, args.seed)
        except Exception as err:
            if not is_out_of_memory(err):
                raise
            oom = True
        if engine.device.type == "cuda":
            torch.cuda.empty_cache()
        if _any_rank(engine, oom):  # every rank leaves the sweep at the same batch size
            return batch
        on_row(row)
    return None


def _free(engine) -> None:
    """Let the next policy start from a clean slate: the model, its MoE layers and DeepSpeed's wrapper gone."""
    engine.ds_engine = None
    engine.model = None
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def format_table(rows: list[Row], limits: dict[str, int | None], header: str) -> str:
    titles = ["policy", "B/rank", "prefill ms", "prefill tok/s", "decode ms/step", "decode tok/s", "peak MB"]
    titles += ["MoE act MB", "dropped pre", "dropped dec", "gate ms", "dispatch ms", "experts ms", "combine ms"]
    widths = [max(len(t) + 2, 8) for t in titles]
    widths[0] = max(10, *(len(r.policy) + 2 for r in rows)) if rows else 10
    cells = [f"{t:>{w}}" if i else f"{t:<{w}}" for i, (t, w) in enumerate(zip(titles, widths, strict=True))]
    lines = [header, "".join(cells)]
    for row in rows:
        cells = row.table_row()
        text = f"{cells[0]:<{widths[0]}}{cells[1]:>{widths[1]}}"
        for title, value, width in zip(titles[2:], cells[2:], widths[2:], strict=True):
            text += f"{value:>{width}.3f}" if title.startswith(("dropped", "MoE")) else f"{value:>{width}.1f}"
        lines.append(text)
    if any(row.buffering for row in rows):
        lines.append("expert buffering: hits, misses, MB copied (all ranks), stall ms, device expert MB (per rank)")
        for row in rows:
            figures = "  ".join(f"{k} {v:.1f}" for k, v in row.buffering.items())
            lines.append(f"{row.policy:<{widths[0]}}B={row.batch_per_rank:<5}{figures}")
    for policy, limit in limits.items():
        if limit is not None:
            lines.append(f"{policy}: out of memory at batch size {limit} per rank (the sweep stopped there)")
    return "\n".join(lines)


def run_bench(job, out: IO[str]) -> int:
    """The sweep for every policy; the table, bench.json and the W&B run. `job`: moe_infer.engine.cli.Job."""
    from moe_infer.engine.cli import REPO, _flags, engine_options, progress
    from moe_infer.runtime.engine import Engine
    from pipeline.tracking import NamedRun, Tracker

    args, export = job.args, job.export
    run_dir = Path(args.run_dir or REPO / "runs" / f"bench-{export.path.name}")
    rows: list[Row] = []
    limits: dict[str, int | None] = {}
    meta: dict[str, Any] = {"export": str(export.path), "ranks": job.world, "settings": _flags(args)}

    def save() -> None:
        if job.rank == 0:
            payload = {**meta, "limits": limits, "rows": [asdict(r) for r in rows]}
            write_atomic(run_dir / BENCH_FILE, json.dumps(payload, indent=1) + "\n")

    run = NamedRun(f"bench-{export.path.name}", {"export": str(export.path), **_flags(args)})
    with Tracker(run, run_dir, "bench", is_main=job.rank == 0) as tracker:

        def on_row(row: Row) -> None:
            rows.append(row)
            tracker.log({"batch_per_rank": row.batch_per_rank, **row.metrics()}, step=len(rows))
            save()

        for policy in args.policies:
            engine = Engine.start(export.path, engine_options(args, "dynamic" if policy == DENSE else policy,
                                                              job.placements))  # fmt: skip
            if policy == DENSE:
                use_dense_equivalent(engine)
            if not meta.get("device"):
                meta["device"] = str(engine.device)
                meta["memory"] = "cuda max_memory_allocated" if engine.device.type == "cuda" else "cpu peak RSS"
            progress(args, job.rank, f"bench: {policy} on {engine.world_size} rank(s), batch sizes up to "
                     f"{args.max_batch} per rank")  # fmt: skip
            limits[policy] = sweep_policy(engine, policy, args, on_row)
            _free(engine)
            del engine
        save()
        buffered = any(r.buffering for r in rows)
        columns = COLUMNS + (BUFFER_COLUMNS if buffered else [])
        table = [r.table_row() + ([r.buffering.get(c, 0.0) for c in BUFFER_COLUMNS] if buffered else []) for r in rows]
        tracker.log_table(TABLE_KEY, columns, table)
        header = (
            f"{export.path.name} on {job.world} rank(s), {meta.get('device')}: prompt {args.prompt_len} tokens, "
            f"{args.decode_steps} decode steps; B is per rank, tokens/s count all ranks; times are the slowest "
            f"rank's; peak MB = {meta.get('memory')}; MoE MB = one prefill MoE layer call's activations; "
            f"phase ms summed over MoE layers, prefill + decode"
        )
        if job.rank == 0:
            out.write(format_table(rows, limits, header) + "\n")
            out.write(f"results: {run_dir / BENCH_FILE}\n")
            out.flush()
    return 0


__all__ = ["Row", "batch_sizes", "check_bench", "format_table", "is_out_of_memory", "measure", "run_bench"]
