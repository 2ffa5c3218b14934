"""`python -m moe_infer.bench serving` (or `launch/infer.py --mode bench-serving`): the same real requests served under
several engine settings, side by side: every expert resident in the contiguous placement (the baseline), expert
buffering (K device slots per MoE layer x eviction policy) and placement files (moe_infer.placement fit).

    deepspeed --num_gpus 2 launch/infer.py --export exports/mt-tiny --mode bench-serving --input src.txt \\
        --slots-sweep 1,2,3 --evictions paper,lru --repeats 3 [--beam-size 4]
    deepspeed --num_gpus 2 launch/infer.py --export exports/lm-tiny-e64 --mode bench-serving --input prompts.txt \\
        --slots-sweep none --placements greedy.json,eplb.json --max-new-tokens 32

Every variant gets its own Engine, all built up front, and the variants are timed round-robin (--repeats rounds, each
starting one variant later; the best round kept), so machine noise hits them alike. One round serves every request
(translate or generate, with the serving flags: --batch-size, --beam-size, --max-new-tokens, ...) and is timed from a
barrier to the slowest rank's end. Each variant's outputs must equal the baseline's token for token (buffering moves
weights and a placement moves experts; neither may change a result); a difference is an error.

Per variant: output tokens/s and the ratio to the baseline; device-resident expert MB per rank (all MoE layers, and
the decoder's alone: the paper's MT decoder figure) and the saving against the baseline; over the best round, summed
over ranks: hits, misses, miss rate, MB copied host -> device, and the slowest rank's copy and stall ms; rank balance,
the mean over max of the expert rows each rank computed (1 = even). Output: the table (rank 0), `serving.json`
(atomic) and a W&B run in --run-dir (default runs/bench-serving-<export>).
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import IO, Any

from moe_infer.bench.results import Results
from moe_infer.collectives import all_reduce, barrier, clock
from moe_infer.runtime.engine import Engine
from moe_infer.serve.cli import Job, prepare
from moe_infer.serve.flags import (
    ENGINE_EVICTIONS,
    add_engine_arguments,
    add_request_arguments,
    engine_options,
    flag_record,
    positive_int,
    read_placements,
)
from moe_infer.serve.process import launched, progress
from pipeline.errors import ConfigError, PipelineError
from pipeline.tracking import check_run_dir

REPO = Path(__file__).resolve().parents[2]

RESULT_FILE = "serving.json"
COLUMNS = [
    "variant", "placement", "slots", "eviction", "seconds", "tok_s", "x_baseline", "expert_mb_per_rank",
    "decoder_expert_mb", "memory_saving", "decoder_memory_saving", "hits", "misses", "miss_rate", "copied_mb",
    "copy_ms", "stall_ms", "rank_balance",
]  # fmt: skip


@dataclass
class Variant:
    label: str
    placement: str  # "contiguous" or a placement file
    slots: int | None  # None: every expert resident
    eviction: str
    placements: Any = None  # the file's maps per MoE layer (moe_infer.placement.files), read and checked once


@dataclass
class Result:
    variant: str
    placement: str
    slots: int | None
    eviction: str
    seconds: float  # best round, slowest rank
    tok_s: float
    x_baseline: float  # tokens/s over the baseline's tokens/s
    expert_mb_per_rank: float  # expert weights on the device, all MoE layers, the largest rank
    decoder_expert_mb: float  # the decoder's MoE layers alone
    memory_saving: float  # the baseline's expert MB / this variant's
    decoder_memory_saving: float
    hits: int
    misses: int
    miss_rate: float
    copied_mb: float
    copy_ms: float
    stall_ms: float
    rank_balance: float  # mean / max over ranks of the expert rows computed (all MoE layers, best round)

    def table_row(self) -> list[Any]:
        return [getattr(self, c) for c in COLUMNS]


def plan_variants(job: Job) -> list[Variant]:
    """The variants to compare, checked before any collective (the same on every rank): a slot count that would not
    buffer, or a placement file that cannot serve this export on these ranks, is one clear error."""
    args = job.args
    if args.slots_sweep and args.policy not in ("dynamic", "static"):
        raise ConfigError("--slots-sweep", f"expert buffering needs --policy dynamic or static, not {args.policy}")
    if job.placements is not None:
        raise ConfigError("--placement", "bench-serving compares --placements files with contiguous, its baseline")
    local = job.export.model_config.num_experts // job.world
    too_many = [k for k in args.slots_sweep if k >= local]
    if too_many:
        raise ConfigError(
            "--slots-sweep",
            f"{too_many} slots would hold every one of the {local} local experts per rank (no buffering); "
            f"expected values below {local}",
        )
    chosen = [Variant("baseline", "contiguous", None, "-")]
    chosen += [
        Variant(f"{eviction} K={k}", "contiguous", k, eviction) for k in args.slots_sweep for eviction in args.evictions
    ]
    chosen += [
        Variant(f"placement {p.stem}", str(p), None, "-", read_placements(p, job.export, job.world))
        for p in args.placements
    ]
    return chosen


def _layer_figures(engine) -> tuple[list[float], list[float]]:
    """This rank's ([device bytes, decoder device bytes], [hits, misses, bytes copied, copy s, stall s, rows])."""
    device = [0.0, 0.0]
    counts = [0.0] * 6
    for layer in engine.moe_layers:
        experts, stats = layer.experts, layer.buffer_stats
        resident = stats.device_bytes if stats else experts.num_local * experts.expert_bytes()
        device[0] += resident
        device[1] += resident if layer.name.startswith("decoder.") else 0.0
        if stats:
            for i, value in enumerate((stats.hits, stats.misses, stats.bytes_copied, stats.copy_seconds)):
                counts[i] += value
            counts[4] += stats.stall_seconds
        counts[5] += layer.totals.expert_rows
    return device, counts


def _serve_once(engine, job) -> tuple[float, list[list[int]]]:
    engine.reset_stats()
    barrier(engine.device)  # every rank starts the clock together
    start = clock(engine.device)
    outputs = engine.serve(job.requests, job.settings)  # it ends with a gather: the slowest rank is waited for
    return clock(engine.device) - start, outputs


def _start_engines(job: Job, chosen: list[Variant]) -> dict[str, Any]:
    engines = {}
    for v in chosen:
        options = engine_options(job.args, job.args.policy, v.placements)
        options = replace(options, expert_slots=v.slots, eviction=v.eviction if v.slots else "paper")
        engines[v.label] = Engine.start(job.export.path, options)
    return engines


def run_dir_of(job: Job) -> Path:
    return Path(job.args.run_dir or REPO / "runs" / f"bench-serving-{job.export.path.name}")


def run_variants(job: Job, chosen: list[Variant], out: IO[str]) -> None:
    """Serve `job`'s requests with every variant, round after round; the table, serving.json and the W&B run."""
    args = job.args
    run_dir = run_dir_of(job)
    engines = _start_engines(job, chosen)
    first = engines["baseline"]
    progress(args.quiet, job.rank, f"bench-serving: {len(chosen)} variants x {args.repeats} rounds, "
             f"{len(job.requests)} {job.mode} requests on {first.world_size} rank(s) ({first.device})")  # fmt: skip
    best: dict[str, tuple[float, list[float]]] = {}
    reference = None
    for round_ in range(args.repeats):
        # Each round starts one variant later, so no variant always runs first (just after the previous round's
        # last one) or last.
        for v in chosen[round_ % len(chosen) :] + chosen[: round_ % len(chosen)]:
            engine = engines[v.label]
            seconds, outputs = _serve_once(engine, job)
            reference = outputs if reference is None else reference
            if outputs != reference:
                raise PipelineError(f"bench-serving: {v.label} changed the outputs")
            (seconds,) = all_reduce([seconds], "max", device=engine.device)
            if v.label not in best or seconds < best[v.label][0]:
                best[v.label] = (seconds, _layer_figures(engine)[1])
    tokens = sum(map(len, reference))
    rows = _results(chosen, engines, best, tokens)
    meta = {"export": str(job.export.path), "ranks": job.world, "device": str(first.device), "mode": job.mode,
            "requests": len(job.requests), "output_tokens": tokens, "settings": flag_record(args)}  # fmt: skip
    name, settings = f"bench-serving-{job.export.path.name}", {"export": str(job.export.path), **flag_record(args)}
    json_path = run_dir / RESULT_FILE
    with Results(name, settings, run_dir, "bench-serving", json_path=json_path, is_main=job.rank == 0) as results:
        results.save({**meta, "rows": [asdict(r) for r in rows]})
        summary = {f"{r.variant}/{c}": getattr(r, c) for r in rows for c in COLUMNS[4:]}
        results.table("serving", COLUMNS, [r.table_row() for r in rows], **summary)
        results.print(format_table(rows, job, first), out)


def _results(chosen: list[Variant], engines: dict, best: dict, tokens: int) -> list[Result]:
    """The group's figures per variant (collectives: every rank calls this in the same order)."""
    measured = []
    for v in chosen:
        engine = engines[v.label]
        device = all_reduce(_layer_figures(engine)[0], "max", device=engine.device)
        seconds, counts = best[v.label]
        sums = all_reduce(counts[:3], "sum", device=engine.device)
        times = all_reduce(counts[3:5], "max", device=engine.device)
        rows_R = [0.0] * engine.world_size
        rows_R[engine.rank] = counts[5]
        rows_R = all_reduce(rows_R, "sum", device=engine.device)
        balance = (sum(rows_R) / len(rows_R)) / max(rows_R) if max(rows_R) else 1.0
        measured.append((v, seconds, device, sums, times, balance))
    base_seconds, base_device = measured[0][1], measured[0][2]
    return [
        Result(
            variant=v.label,
            placement=Path(v.placement).stem,
            slots=v.slots,
            eviction=v.eviction,
            seconds=seconds,
            tok_s=tokens / seconds,
            x_baseline=base_seconds / seconds,
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
            rank_balance=balance,
        )  # fmt: skip
        for v, seconds, device, sums, times, balance in measured
    ]


def format_table(rows: list[Result], job, engine) -> str:
    header = (
        f"{job.export.path.name}: {len(job.requests)} {job.mode} requests on {job.world} rank(s), {engine.device}; "
        f"best of {job.args.repeats} interleaved rounds; expert MB = expert weights on the device per rank (all MoE "
        "layers / decoder only); hits, misses and MB copied summed over ranks; copy and stall ms the slowest rank's; "
        "balance = mean/max expert rows per rank"
    )
    titles = ["variant", "s", "tok/s", "x base", "expert MB", "dec MB", "saving", "dec saving", "hits", "misses"]
    titles += ["miss rate", "copied MB", "copy ms", "stall ms", "balance"]
    width = max(12, *(len(r.variant) + 1 for r in rows))
    lines = [header, f"{titles[0]:<{width}}" + "".join(f"{t:>11}" for t in titles[1:])]
    for r in rows:
        values = [f"{r.seconds:.3f}", f"{r.tok_s:.1f}", f"{r.x_baseline:.3f}", f"{r.expert_mb_per_rank:.2f}"]
        values += [f"{r.decoder_expert_mb:.2f}", f"{r.memory_saving:.2f}x", f"{r.decoder_memory_saving:.2f}x"]
        values += [str(r.hits), str(r.misses), f"{r.miss_rate:.3f}", f"{r.copied_mb:.1f}", f"{r.copy_ms:.1f}"]
        values += [f"{r.stall_ms:.1f}", f"{r.rank_balance:.3f}"]
        lines.append(f"{r.variant:<{width}}" + "".join(f"{v:>11}" for v in values))
    return "\n".join(lines)


# ---- the command ----------------------------------------------------------------------------------------------------


def _int_list(text: str) -> list[int]:
    if text.strip() == "none":
        return []
    try:
        values = [positive_int(part) for part in text.split(",") if part.strip()]
    except (ValueError, argparse.ArgumentTypeError):
        values = []
    if not values:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers >= 1 (or none), got {text!r}")
    return values


def _evictions(text: str) -> list[str]:
    names = [p.strip() for p in text.split(",") if p.strip()]
    if not names or any(n not in ENGINE_EVICTIONS for n in names):
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of {', '.join(ENGINE_EVICTIONS)}")
    return names


def _paths(text: str) -> list[Path]:
    return [Path(part.strip()) for part in text.split(",") if part.strip()]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_engine_arguments(parser)
    add_request_arguments(parser)
    variants = parser.add_argument_group("the variants")
    variants.add_argument(
        "--slots-sweep", type=_int_list, default=[], help="expert buffering: device slots per layer to compare (1,2)"
    )
    variants.add_argument(
        "--evictions", type=_evictions, default=["paper"], help=f"comma-separated of {', '.join(ENGINE_EVICTIONS)}"
    )
    variants.add_argument(
        "--placements", type=_paths, default=[], help="comma-separated placement files to compare with contiguous"
    )
    variants.add_argument("--repeats", type=positive_int, default=3, help="interleaved rounds; the best is kept")


def main(args: argparse.Namespace) -> int:
    with launched(args.quiet) as command:
        job = prepare(args, command.rank, command.world)
        chosen = plan_variants(job)
        # Adds to a run of this benchmark only (its tracked files and serving.json, or buffering.json of old).
        check_run_dir(run_dir_of(job), own=(RESULT_FILE, "buffering.json"), protected={"--export": job.export.path})
        command.checked()
        run_variants(job, chosen, command.out)
    return command.status
