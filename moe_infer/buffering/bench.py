"""`launch/infer.py --mode bench-buffering`: real requests served with every expert resident and with K device slots
per MoE layer, side by side, to price expert buffering's memory saving in throughput.

    deepspeed --num_gpus 2 launch/infer.py --export exports/mt-tiny --mode bench-buffering \\
        --input data/valid.src --slots-sweep 1,2,3 --evictions paper,lru --repeats 3 [--beam-size 4]

Every variant (resident, then each K x eviction policy) gets its own Engine, all built up front, and the variants are
timed round-robin (--repeats rounds, best round kept), so machine noise hits them alike. One round serves every
request (translate or generate, with the serving flags: --batch-size, --beam-size, --max-new-tokens, ...) and is
timed from a barrier to the slowest rank's end. Each buffered variant's outputs must equal the resident ones token
for token (buffering moves weights, it never changes them); a difference is an error.

Per variant: output tokens/s and the ratio to resident; device-resident expert bytes per rank (all MoE layers, and
the decoder's alone: the paper's MT decoder figure) and the saving against resident; over the best round, summed over
ranks: hits, misses, miss rate, bytes copied host -> device, copy and stall time (the slowest rank's). Output: the
table (rank 0), `buffering.json` (atomic) and a W&B run in --run-dir (default runs/bench-buffering-<export>).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import IO, Any

from pipeline.atomic import write_atomic
from pipeline.errors import PipelineError

RESULT_FILE = "buffering.json"
COLUMNS = [
    "variant", "slots", "eviction", "seconds", "tok_s", "x_resident", "expert_mb_per_rank", "decoder_expert_mb",
    "memory_saving", "decoder_memory_saving", "hits", "misses", "miss_rate", "copied_mb", "copy_ms", "stall_ms",
]  # fmt: skip


@dataclass
class Variant:
    label: str
    slots: int | None  # None: every expert resident
    eviction: str


@dataclass
class Result:
    variant: str
    slots: int | None
    eviction: str
    seconds: float  # best round, slowest rank
    tok_s: float
    x_resident: float  # tokens/s over resident tokens/s
    expert_mb_per_rank: float  # expert weights on the device, all MoE layers, the largest rank
    decoder_expert_mb: float  # the decoder's MoE layers alone
    memory_saving: float  # resident expert MB / this variant's
    decoder_memory_saving: float
    hits: int
    misses: int
    miss_rate: float
    copied_mb: float
    copy_ms: float
    stall_ms: float

    def table_row(self) -> list[Any]:
        return [getattr(self, c) for c in COLUMNS]


def variants(slots_sweep: list[int], evictions: list[str]) -> list[Variant]:
    return [Variant("resident", None, "-")] + [
        Variant(f"{eviction} K={k}", k, eviction) for k in slots_sweep for eviction in evictions
    ]


def _layer_figures(engine) -> tuple[list[float], list[float]]:
    """This rank's ([device bytes, decoder device bytes], [hits, misses, bytes copied, copy s, stall s])."""
    device = [0.0, 0.0]
    counts = [0.0] * 5
    for layer in engine.moe_layers:
        experts = layer.block.experts
        stats = getattr(experts, "stats", None)
        resident = stats.device_bytes if stats else experts.num_local * experts.expert_bytes()
        device[0] += resident
        device[1] += resident if layer.name.startswith("decoder.") else 0.0
        if stats:
            for i, value in enumerate((stats.hits, stats.misses, stats.bytes_copied)):
                counts[i] += value
            counts[3] += stats.copy_seconds
            counts[4] += stats.stall_seconds
    return device, counts


def _reset(engine) -> None:
    engine.reset_stats()
    for layer in engine.moe_layers:
        reset = getattr(layer.block.experts, "reset_stats", None)
        if reset:
            reset()


def _serve_once(engine, job) -> tuple[float, list[list[int]]]:
    from moe_infer.engine.generate import generate
    from moe_infer.engine.translate import translate

    _reset(engine)
    engine.sync.max(0)  # a barrier: every rank starts the clock together
    start = time.perf_counter()
    if job.mode == "generate":
        ids = engine.share(range(len(job.requests)))
        mine = generate(engine.model, engine.share(job.requests), job.settings, engine.sync, request_ids=ids)
    else:
        mine = translate(engine.model, engine.share(job.requests), job.settings, engine.sync)
    outputs = engine.gather(mine, len(job.requests))  # also where the slowest rank is waited for
    return time.perf_counter() - start, outputs


def run_buffering_bench(job, out: IO[str]) -> int:
    """`job`: moe_infer.engine.cli.Job with requests read (generate or translate)."""
    from moe_infer.engine.cli import REPO, _flags, engine_options, group_reduce, progress
    from moe_infer.engine.engine import Engine
    from pipeline.tracking import NamedRun, Tracker

    args = job.args
    if args.policy not in ("dynamic", "static"):
        raise PipelineError(f"bench-buffering: expert buffering needs --policy dynamic or static, not {args.policy}")
    run_dir = Path(args.run_dir or REPO / "runs" / f"bench-buffering-{job.export.path.name}")
    chosen = variants(args.slots_sweep, args.evictions)
    engines = {}
    for v in chosen:
        options = engine_options(args, args.policy, job.placements)
        block = replace(options.block, expert_slots=v.slots, eviction=v.eviction if v.slots else "paper")
        engines[v.label] = Engine.start(job.export.path, replace(options, block=block))
    first = engines["resident"]
    progress(args, job.rank, f"bench-buffering: {len(chosen)} variants x {args.repeats} rounds, "
             f"{len(job.requests)} {job.mode} requests on {first.world_size} rank(s) ({first.device})")  # fmt: skip
    best: dict[str, tuple[float, list[float]]] = {}
    reference = None
    for _ in range(args.repeats):
        for v in chosen:
            engine = engines[v.label]
            seconds, outputs = _serve_once(engine, job)
            reference = outputs if reference is None else reference
            if outputs != reference:
                raise PipelineError(f"bench-buffering: {v.label} changed the outputs (it must only move weights)")
            (seconds,) = group_reduce(engine, [seconds], "max")
            if v.label not in best or seconds < best[v.label][0]:
                best[v.label] = (seconds, _layer_figures(engine)[1])
    tokens = sum(map(len, reference))
    results = []
    for v in chosen:
        engine = engines[v.label]
        device = group_reduce(engine, _layer_figures(engine)[0], "max")
        seconds, counts = best[v.label]
        sums = group_reduce(engine, counts[:3], "sum")
        times = group_reduce(engine, counts[3:], "max")
        results.append((v, seconds, device, sums, times))
    base_seconds, base_device = results[0][1], results[0][2]
    rows = [
        Result(
            variant=v.label,
            slots=v.slots,
            eviction=v.eviction,
            seconds=seconds,
            tok_s=tokens / seconds,
            x_resident=base_seconds / seconds,
            expert_mb_per_rank=device[0] / 2**20,
            decoder_expert_mb=device[1] / 2**20,
            memory_saving=base_device[0] / device[0],
            decoder_memory_saving=base_device[1] / device[1] if device[1] else 0.0,
            hits=int(sums[0]),
            misses=int(sums[1]),
            miss_rate=sums[1] / (sums[0] + sums[1]) if sums[0] + sums[1] else 0.0,
            copied_mb=sums[2] / 2**20,
            copy_ms=times[0] * 1e3,
            stall_ms=times[1] * 1e3,
        )  # fmt: skip
        for v, seconds, device, sums, times in results
    ]
    if job.rank == 0:
        meta = {"export": str(job.export.path), "ranks": job.world, "device": str(first.device),
                "requests": len(job.requests), "output_tokens": tokens, "settings": _flags(args)}  # fmt: skip
        write_atomic(run_dir / RESULT_FILE, json.dumps({**meta, "rows": [asdict(r) for r in rows]}, indent=1) + "\n")
    run = NamedRun(f"bench-buffering-{job.export.path.name}", {"export": str(job.export.path), **_flags(args)})
    with Tracker(run, run_dir, "bench-buffering", is_main=job.rank == 0) as tracker:
        tracker.log_table("buffering", COLUMNS, [r.table_row() for r in rows])
        tracker.summary(**{f"{r.variant}/{c}": getattr(r, c) for r in rows for c in COLUMNS[3:]})
    if job.rank == 0:
        out.write(format_table(rows, job, first) + f"\nresults: {run_dir / RESULT_FILE}\n")
        out.flush()
    return 0


def format_table(rows: list[Result], job, engine) -> str:
    header = (
        f"{job.export.path.name}: {len(job.requests)} {job.mode} requests on {job.world} rank(s), {engine.device}; "
        f"best of {job.args.repeats} interleaved rounds; expert MB = expert weights on the device per rank (all MoE "
        "layers / decoder only); hits, misses and MB copied summed over ranks; copy and stall ms the slowest rank's"
    )
    titles = ["variant", "s", "tok/s", "x resident", "expert MB", "dec MB", "saving", "dec saving", "hits"]
    titles += ["misses", "miss rate", "copied MB", "copy ms", "stall ms"]
    lines = [header, "  ".join(f"{t:>10}" for t in titles)]
    for r in rows:
        values = [r.variant, f"{r.seconds:.3f}", f"{r.tok_s:.1f}", f"{r.x_resident:.3f}", f"{r.expert_mb_per_rank:.2f}"]
        values += [f"{r.decoder_expert_mb:.2f}", f"{r.memory_saving:.2f}x", f"{r.decoder_memory_saving:.2f}x"]
        values += [str(r.hits), str(r.misses), f"{r.miss_rate:.3f}", f"{r.copied_mb:.1f}", f"{r.copy_ms:.1f}"]
        values += [f"{r.stall_ms:.1f}"]
        lines.append("  ".join(f"{v:>10}" for v in values))
    return "\n".join(lines)
