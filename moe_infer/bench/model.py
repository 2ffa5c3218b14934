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

For each policy of --policies (each served by its own Engine, freed before the next one starts), for batch sizes
1, 2, 4, ... doubling up to --max-batch, each rank brings B synthetic requests of its own (random token ids, seeded by
--seed and the rank) of --prompt-len tokens, then measures:
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
sweep: the batch size is recorded as its limit and the next policy starts. With several ranks this is recovered only
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
from moe_infer.bench.model_measure import BUFFER_COLUMNS, COLUMNS, Row, measure
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
        if engine.sync.any(oom):  # every rank leaves the sweep at the same batch size
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
    settings = {"export": str(export.path), **flag_record(args)}
    name, is_main = f"bench-{export.path.name}", command.rank == 0
    with Results(name, settings, run_dir, "bench", json_path=run_dir / BENCH_FILE, is_main=is_main) as results:

        def on_row(row: Row) -> None:
            rows.append(row)
            results.row({"batch_per_rank": row.batch_per_rank, **row.metrics()}, step=len(rows))
            results.save({**meta, "limits": limits, "rows": [asdict(r) for r in rows]})

        for policy in args.policies:
            if policy == hf_baseline.POLICY:  # its own interleaved comparison, in this one process
                meta[policy] = hf_baseline.sweep(args, export, placements, batch_sizes(args.max_batch), on_row)
                continue
            options = engine_options(args, "dynamic" if policy == DENSE else policy, placements)
            engine = Engine.start(export.path, options)
            if policy == DENSE:
                use_dense_equivalent(engine)
            if not meta.get("device"):
                meta["device"] = str(engine.device)
                meta["memory"] = "cuda max_memory_allocated" if engine.device.type == "cuda" else "cpu peak RSS"
            progress(args.quiet, command.rank, f"bench: {policy} on {engine.world_size} rank(s), batch sizes up to "
                     f"{args.max_batch} per rank")  # fmt: skip
            limits[policy] = sweep_policy(engine, policy, args, on_row)
            _free(engine)
            del engine
        results.save({**meta, "limits": limits, "rows": [asdict(r) for r in rows]})
        buffered = any(r.buffering for r in rows)
        columns = COLUMNS + (BUFFER_COLUMNS if buffered else [])
        table = [r.table_row() + ([r.buffering.get(c, 0.0) for c in BUFFER_COLUMNS] if buffered else []) for r in rows]
        results.table(TABLE_KEY, columns, table)
        header = (
            f"{export.path.name} on {command.world} rank(s), {meta.get('device')}: prompt {args.prompt_len} tokens, "
            f"{args.decode_steps} decode steps; B is per rank, tokens/s count all ranks; times are the slowest "
            f"rank's; peak MB = {meta.get('memory')}; MoE MB = one prefill MoE layer call's activations; "
            f"phase ms summed over MoE layers, prefill + decode"
        )
        comparison = [hf_baseline.format_comparison(meta[hf_baseline.POLICY])] if hf_baseline.POLICY in meta else []
        results.print("\n".join([format_table(rows, limits, header), *comparison]), command.out)
