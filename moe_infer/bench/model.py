"""`python -m moe_infer.bench model` (or `launch/infer.py --mode bench`): the whole model served by each MoE policy,
swept over batch sizes.

    python -m moe_infer.bench model --export exports/lm-tiny                              all four policies, B = 1..64
    deepspeed --num_gpus 2 launch/infer.py --export exports/mt-tiny --mode bench --policies dynamic,static \\
        --max-batch 16 --prompt-len 24 --decode-steps 8 --run-dir runs/bench-mt
    torchrun --nproc-per-node 2 -m moe_infer.bench model --export exports/mt-tiny ...     the same, as a module

`--policies` may also name `dense-equivalent`: the same model with every MoE layer replaced by a dense FFN of K*F
hidden units (the same FLOPs per token; DenseEquivalent), the MoE-vs-dense characterisation; and `transformers`:
the same weights in transformers' Qwen3MoeForCausalLM, each experts implementation it offers, interleaved with our
engine in one process (moe_infer.bench.hf_baseline).

Each policy of --policies is served by its own Engine, all started up front. For batch sizes 1, 2, 4, ... doubling
up to --max-batch, each rank brings B synthetic requests of its own (random token ids, seeded by --seed and the
rank) of --prompt-len tokens; --repeats rounds each measure every policy once (each round starting one policy later,
so machine noise hits them alike), and each timed figure is the median of the repeats with their min-max:
    prefill   LM: one forward over the B prompts filling the KV cache; MT: the encoder over the B sources
    decode    --decode-steps greedy steps of one token per row with the KV cache (MT: from BOS, cross-attention cached)
Times are the slowest rank's (every rank starts together after a barrier); tokens/s counts the tokens of all ranks
(B x ranks rows). Peak memory: CUDA, torch.cuda.max_memory_allocated over the step (the largest of the ranks); CPU, the
process's peak RSS so far (it never goes down, so it is the peak of everything run before too). MoE activation memory:
moe_infer.bench.memory.peak_activation_bytes around one call of the first MoE layer of the prefill on the hidden
states it received, after the timed region. Dropped fraction: pairs past capacity over pairs routed, over all ranks,
for prefill and decode separately. Per MoE layer, the phase times (gate, dispatch, experts, combine) of prefill and
decode from the layers' MoEStats, the slowest rank's. With --expert-slots K (expert buffering), each row also has
the store's figures (BUFFER_COLUMNS: hits, misses, MB copied host -> device, stall ms, device-resident expert MB).

An out-of-memory error (torch.OutOfMemoryError, MemoryError, a RuntimeError saying "out of memory") ends that policy's
sweep: the batch size is recorded as its limit and the other policies go on. With several ranks this is recovered only
when every rank meets it before the step's first collective (same shapes, same allocations: the usual case); a rank
stopped elsewhere leaves the others in a collective, and --timeout ends the job.

Output: the table on stdout (rank 0), `bench.json` in the run directory (rewritten atomically after every row, so a
killed sweep keeps what it measured), and a W&B run there (offline unless WANDB_MODE says otherwise): one `log` per row
(keys `<policy>/<figure>`, step = row number) and the table as `bench`. Nothing is printed or logged inside a timed
region.
"""

from __future__ import annotations

import argparse
import gc
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from moe_infer.bench import hf_baseline
from moe_infer.bench.model_measure import BUFFER_COLUMNS, COLUMNS, TIMED, Row, measure
from moe_infer.bench.results import Results
from moe_infer.bench.synthetic import DENSE, DenseEquivalent
from moe_infer.model.loader import Export
from moe_infer.moe.layer import POLICIES, PeerMoELayer
from moe_infer.runtime.engine import Engine, expert_placements
from moe_infer.serve.flags import add_engine_arguments, engine_options, flag_record, positive_int, read_placements
from moe_infer.serve.process import launched, progress
from pipeline.errors import ConfigError
from pipeline.tracking import check_run_dir

REPO = Path(__file__).resolve().parents[2]
BENCH_FILE = "bench.json"
TABLE_KEY = "bench"


def moe_settings(export: Export, args) -> dict[str, Any]:
    """What the gating ratios depend on: experts E, top-k, static's capacity fraction C, and the waste factor E*C/k
    (static's padded slots over the routed pairs; the paper's LM 12.8, MT 64)."""
    cfg = export.model_config
    fraction = args.capacity_fraction or float(export.config["moe"]["capacity_fraction"])
    waste = cfg.num_experts * fraction / cfg.topk
    return {"num_experts": cfg.num_experts, "topk": cfg.topk, "capacity_fraction": fraction, "waste_factor": waste}


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


def use_dense_equivalent(engine) -> None:
    """Serve `engine`'s model with every MoE layer replaced by a DenseEquivalent (each rank on its own tokens: a dense
    model needs no expert parallelism)."""
    for layer in list(engine.model.modules()):
        if hasattr(layer, "moe"):
            layer.moe = PeerMoELayer(layer.moe.name, DenseEquivalent(engine.model.cfg, engine.device))


# ---- the sweep ------------------------------------------------------------------------------------------------------


def sweep_engines(engines: dict, args, on_row) -> dict[str, int | None]:
    """Every batch size for every engine (policy -> Engine), `args.repeats` interleaved repeats each: a round times
    every policy once, each round starting one policy later, so a noisy neighbour slows them all alike. `on_row(row)`
    after each (policy, batch) with the repeats' median and min-max. Returns each policy's out-of-memory batch size
    (None: it never ran out); a policy that ran out leaves the sweep."""
    for policy, engine in engines.items():  # warm-up: lazy init, caches, the expert kernel's crossover
        measure(engine, policy, 1, args.prompt_len, min(args.decode_steps, 2), args.seed, activation=False)
    limits: dict[str, int | None] = dict.fromkeys(engines)
    for batch in batch_sizes(args.max_batch):
        running = [p for p in engines if limits[p] is None]
        repeats: dict[str, list] = {p: [] for p in running}
        for round_ in range(args.repeats):
            shift = round_ % len(running) if running else 0
            for policy in running[shift:] + running[:shift]:
                if limits[policy] is not None:
                    continue
                row = _measure_or_oom(engines[policy], policy, batch, args, activation=round_ == 0)
                if row is None:
                    limits[policy] = batch
                else:
                    repeats[policy].append(row)
        for policy in running:
            if limits[policy] is None:
                on_row(Row.of_repeats(repeats[policy]))
        if all(limit is not None for limit in limits.values()):
            break
    return limits


def _measure_or_oom(engine, policy: str, batch: int, args, activation: bool) -> Row | None:
    """One repeat, or None when any rank ran out of memory (every rank leaves together)."""
    row, oom = None, False
    try:
        row = measure(engine, policy, batch, args.prompt_len, args.decode_steps, args.seed, activation)
    except Exception as err:
        if not is_out_of_memory(err):
            raise
        oom = True
    if engine.device.type == "cuda":
        torch.cuda.empty_cache()
    return None if engine.sync.any(oom) else row


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
    timed = dict(zip(titles[2:6], TIMED, strict=True))  # shown as median [min-max]
    cells_of = [_cells(row, titles, timed) for row in rows]
    widths = [max([len(t) + 2, *(len(c[i]) + 2 for c in cells_of)]) for i, t in enumerate(titles)]
    lines = [header] + [
        "".join(f"{c:>{w}}" if i else f"{c:<{w}}" for i, (c, w) in enumerate(zip(cells, widths, strict=True)))
        for cells in [titles, *cells_of]
    ]
    if any(row.buffering for row in rows):
        lines.append("expert buffering: hits, misses, MB copied (all ranks), stall ms, device expert MB (per rank)")
        for row in rows:
            figures = "  ".join(f"{k} {v:.1f}" for k, v in row.buffering.items())
            lines.append(f"{row.policy:<{widths[0]}}B={row.batch_per_rank:<5}{figures}")
    for policy, limit in limits.items():
        if limit is not None:
            lines.append(f"{policy}: out of memory at batch size {limit} per rank (the sweep stopped there)")
    return "\n".join(lines)


def _cells(row: Row, titles: list[str], timed: dict[str, str]) -> list[str]:
    cells = [row.policy, str(row.batch_per_rank)]
    for title, value in zip(titles[2:], row.table_row()[2:], strict=True):
        if title in timed:
            low, high = row.spread.get(f"{timed[title]}_min", value), row.spread.get(f"{timed[title]}_max", value)
            digits = 0 if title.endswith("tok/s") else 1
            cells.append(f"{value:.{digits}f} [{low:.{digits}f}-{high:.{digits}f}]")
        else:
            cells.append(f"{value:.3f}" if title.startswith(("dropped", "MoE")) else f"{value:.1f}")
    return cells


# ---- the command ----------------------------------------------------------------------------------------------------


def _policies(text: str) -> list[str]:
    known = (*POLICIES, DENSE, hf_baseline.POLICY)
    names = [p.strip() for p in text.split(",") if p.strip()]
    unknown = [p for p in names if p not in known]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of {', '.join(known)}, got {text!r}")
    return names


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_engine_arguments(parser, policy=False)
    bench = parser.add_argument_group("the sweep")
    bench.add_argument(
        "--policies",
        type=_policies,
        default=list(POLICIES),
        help="comma-separated (default: the four policies); dense-equivalent adds the FLOP-equivalent dense model",
    )
    bench.add_argument(
        "--max-batch", type=positive_int, default=64, help="batch sizes 1, 2, 4, ... up to this, per rank"
    )
    bench.add_argument("--prompt-len", type=positive_int, default=32, help="tokens per synthetic prompt / source")
    bench.add_argument(
        "--decode-steps", type=positive_int, default=16, help="KV-cached decoding steps after the prefill"
    )
    bench.add_argument("--seed", type=int, default=0, help="the synthetic requests' seed (with the rank)")
    hf_baseline.add_arguments(bench)
    bench.add_argument(
        "--repeats", type=positive_int, default=5, help="interleaved repeats per batch size; the median is the figure"
    )
    bench.add_argument(
        "--run-dir", type=Path, help="bench.json, metrics and the W&B run here (default runs/bench-<export name>)"
    )


def main(args: argparse.Namespace) -> int:
    """The sweep for every policy of --policies; the table, bench.json and the W&B run."""
    with launched(args.quiet) as command:
        export = Export.open(args.export)
        placements = read_placements(args.placement, export, command.world)
        expert_placements(export, command.world, placements)  # the EP degree fits, before any collective
        check_bench(args, export.model_config)
        hf_baseline.check(args, export, command.world)
        # Adds to a run of this benchmark only (its tracked files and bench.json), never to another directory.
        check_run_dir(run_dir_of(args, export), own=(BENCH_FILE,), protected={"--export": export.path})
        command.checked()
        sweep(args, export, placements, command)
    return command.status


def run_dir_of(args: argparse.Namespace, export: Export) -> Path:
    return Path(args.run_dir or REPO / "runs" / f"bench-{export.path.name}")


def sweep(args: argparse.Namespace, export: Export, placements, command) -> None:
    run_dir = run_dir_of(args, export)
    rows: list[Row] = []
    limits: dict[str, int | None] = {}
    meta: dict[str, Any] = {"export": str(export.path), "ranks": command.world, "settings": flag_record(args)}
    meta["moe"] = moe_settings(export, args)
    settings = {"export": str(export.path), **flag_record(args)}
    name, is_main = f"bench-{export.path.name}", command.rank == 0
    with Results(name, settings, run_dir, "bench", json_path=run_dir / BENCH_FILE, is_main=is_main) as results:

        def on_row(row: Row) -> None:
            rows.append(row)
            results.row({"batch_per_rank": row.batch_per_rank, **row.metrics()}, step=len(rows))
            results.save({**meta, "limits": limits, "rows": [asdict(r) for r in rows]})

        engines = {}
        policies = [p for p in args.policies if p != hf_baseline.POLICY]  # transformers: its own comparison, below
        for policy in policies:  # all alive at once, for the interleaved repeats
            options = engine_options(args, "dynamic" if policy == DENSE else policy, placements)
            engine = engines[policy] = Engine.start(export.path, options)
            if policy == DENSE:
                use_dense_equivalent(engine)
            if not meta.get("device"):
                meta["device"] = str(engine.device)
                meta["memory"] = "cuda max_memory_allocated" if engine.device.type == "cuda" else "cpu peak RSS"
        if engines:
            progress(args.quiet, command.rank, f"bench: {', '.join(engines)} on {command.world} rank(s), batch sizes "
                     f"up to {args.max_batch} per rank, {args.repeats} interleaved repeats")  # fmt: skip
            limits.update(sweep_engines(engines, args, on_row))
        for engine in engines.values():
            _free(engine)
        if hf_baseline.POLICY in args.policies:  # in this one process, after the engines above are freed
            meta[hf_baseline.POLICY] = hf_baseline.sweep(args, export, placements, batch_sizes(args.max_batch), on_row)
        results.save({**meta, "limits": limits, "rows": [asdict(r) for r in rows]})
        buffered = any(r.buffering for r in rows)
        columns = COLUMNS + (BUFFER_COLUMNS if buffered else [])
        table = [r.table_row() + ([r.buffering.get(c, 0.0) for c in BUFFER_COLUMNS] if buffered else []) for r in rows]
        results.table(TABLE_KEY, columns, table)
        header = (
            f"{export.path.name} on {command.world} rank(s), {meta.get('device')}: prompt {args.prompt_len} tokens, "
            f"{args.decode_steps} decode steps; timed figures: the median of {args.repeats} interleaved repeats "
            f"[min-max]; B is per rank, tokens/s count all ranks; times are the slowest "
            f"rank's; peak MB = {meta.get('memory')}; MoE MB = one prefill MoE layer call's activations; "
            f"phase ms summed over MoE layers, prefill + decode"
        )
        comparison = [hf_baseline.format_comparison(meta[hf_baseline.POLICY])] if hf_baseline.POLICY in meta else []
        results.print("\n".join([format_table(rows, limits, header), *comparison]), command.out)
