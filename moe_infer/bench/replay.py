"""Replay recorded expert loads through every eviction policy and cache size: the paper's cache-miss figure.

    python -m moe_infer.bench replay --trace runs/lm-tiny/traces/valid-step000300.npz --ranks 2 \\
        [--placement placement.json] [--slots 1,2,4] [--policies paper,fifo,lru,lfu] [--layers decoder.layers.2] \\
        [--run-dir runs/lm-tiny-buffering]               (also `python -m moe_infer.buffering replay ...`)

prints one miss-rate table per MoE layer and their total (rows: policies, Belady's MIN last; columns: device slots
K per rank), then each policy's misses over Belady's at K = L/2. With --run-dir the rows are also written to
replay.json and logged as a W&B run (table + summary; moe_infer.bench.results).

    history = LoadHistory.read("runs/lm-tiny/traces/valid-step000300.npz")     training trace or engine load history
    rows = replay_history(history, ranks=2, placements=None, slots=[1, 2, 3, 4], policies=["paper", "lru"])
    print(format_tables(rows))                      one miss-rate table per layer, then the total
    ratios_to_belady(rows, slots=2)                 {layer: {policy: misses / belady's misses}} at K = 2

What a rank sees: under a placement (contiguous unless given) rank r holds L local experts; in each batch of a
layer its active experts are the local slots whose global expert got at least one token (count > 0), and the
engine runs them in ascending local slot order. Each (layer, rank) is replayed through its own `ExpertCache`
starting full with local experts 0..K-1 in slots 0..K-1, which is how the engine's store starts (it loads the first
K local experts before the first batch). Hits and misses are summed over ranks, and over layers for the total.
Belady's MIN (the offline optimum for this demand-loading cache) is always replayed, as the last row.

With replicas a rank may hold more experts than another; K is then capped at each rank's own L (a rank with
K >= L never misses). A replicated expert's tokens are split over its copies by token index, which counts do not
record: every copy of an active expert is taken as active, an upper bound on the copies' loads.

Rows (COLUMNS): [layer, policy, slots, hits, misses, accesses, miss_rate], layer "total" for the sum over layers.

Shape legend: B batches, E experts, L local experts per rank, K device slots.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from moe_infer.bench.results import Results
from moe_infer.buffering.cache import simulate
from moe_infer.buffering.policies import POLICIES, make_policy
from moe_infer.placement.files import placements_for_export, read_placement_file
from moe_infer.placement.history import LoadHistory
from moe_infer.placement.map import Placement
from moe_infer.placement.replicas import ReplicatedPlacement
from pipeline.errors import PipelineError, exit_status
from pipeline.tracking import check_run_dir

RESULT_FILE = "replay.json"
COLUMNS = ["layer", "policy", "slots", "hits", "misses", "accesses", "miss_rate"]
TOTAL = "total"
ORACLE = "belady"
DEFAULT_POLICIES = "paper,fifo,lru,lfu"


def rank_batches(counts_BE: np.ndarray, local_experts: Sequence[int]) -> list[list[int]]:
    """Per batch, the local slots whose global expert is active, ascending: the order the engine runs them."""
    active_BL = counts_BE[:, list(local_experts)] > 0
    return [np.flatnonzero(active_L).tolist() for active_L in active_BL]


def local_expert_lists(
    history: LoadHistory, ranks: int, placements: Mapping[str, Placement | ReplicatedPlacement] | None, layer: str
) -> list[list[int]]:
    """Each rank's global experts in local-slot order for `layer`: the given placement, else contiguous."""
    if placements is None:
        placement = Placement.contiguous(history.num_experts, ranks)
    elif layer not in placements:
        raise PipelineError(f"replay: no placement for layer {layer!r} (placements cover {list(placements)})")
    else:
        placement = placements[layer]
    if placement.ranks != ranks:
        raise PipelineError(f"replay: layer {layer}'s placement is over {placement.ranks} ranks, replaying {ranks}")
    return [placement.local_experts(rank) for rank in range(ranks)]


def replay_history(
    history: LoadHistory,
    ranks: int,
    placements: Mapping[str, Placement | ReplicatedPlacement] | None,
    slots: Sequence[int],
    policies: Sequence[str],
    layers: Sequence[str] | None = None,
) -> list[list]:
    """Rows of COLUMNS: for each layer (then the total), each policy (belady last) and each K in `slots`."""
    for name in policies:
        make_policy(name)  # an unknown name fails here, before any work
    order = [name for name in policies if name != ORACLE] + [ORACLE]
    layers = history.layer_names if layers is None else list(layers)
    unknown = [layer for layer in layers if layer not in history.counts_BE]
    if unknown:
        raise PipelineError(f"replay: unknown layer(s) {unknown}; the trace has {history.layer_names}")
    if not slots or min(slots) < 1:
        raise PipelineError(f"replay: slots must be positive integers, got {list(slots)}")
    totals = {(policy, k): [0, 0] for policy in order for k in slots}  # hits, misses
    rows = []
    for layer in layers:
        rank_experts = local_expert_lists(history, ranks, placements, layer)
        per_rank = [rank_batches(history.counts_BE[layer], local) for local in rank_experts]
        sizes = [len(local) for local in rank_experts]
        for policy in order:
            for k in slots:
                hits = misses = 0
                for batches, size in zip(per_rank, sizes, strict=True):
                    stats = simulate(batches, min(k, size), policy, initial=range(min(k, size)))
                    hits, misses = hits + stats.hits, misses + stats.misses
                rows.append(_row(layer, policy, k, hits, misses))
                totals[policy, k][0] += hits
                totals[policy, k][1] += misses
    rows += [_row(TOTAL, policy, k, *totals[policy, k]) for policy in order for k in slots]
    return rows


def _row(layer: str, policy: str, k: int, hits: int, misses: int) -> list:
    accesses = hits + misses
    return [layer, policy, k, hits, misses, accesses, round(misses / accesses, 4) if accesses else 0.0]


def ratios_to_belady(rows: list[list], slots: int) -> dict[str, dict[str, float | None]]:
    """{layer: {policy: policy's misses / belady's misses}} at K = `slots`. None when belady never misses but the
    policy does (an infinite ratio, which JSON cannot hold); 1.0 when neither misses."""
    misses = {(row[0], row[1]): row[4] for row in rows if row[2] == slots}
    ratios: dict[str, dict[str, float | None]] = {}
    for (layer, policy), count in misses.items():
        if policy == ORACLE:
            continue
        best = misses[layer, ORACLE]
        ratios.setdefault(layer, {})[policy] = round(count / best, 4) if best else (1.0 if count == 0 else None)
    return ratios


def format_tables(rows: list[list]) -> str:
    """One miss-rate table per layer (rows: policies, belady last; columns: K), like the paper's figure."""
    blocks = []
    for layer in dict.fromkeys(row[0] for row in rows):
        mine = [row for row in rows if row[0] == layer]
        ks = list(dict.fromkeys(row[2] for row in mine))
        rate = {(row[1], row[2]): row[6] for row in mine}
        cells = [["miss rate", *(f"K={k}" for k in ks)]]
        cells += [[policy, *(f"{rate[policy, k]:.4f}" for k in ks)] for policy in dict.fromkeys(r[1] for r in mine)]
        widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
        # Names left-aligned, numbers right-aligned.
        lines = [
            "  ".join([r[0].ljust(widths[0]), *(c.rjust(w) for c, w in zip(r[1:], widths[1:], strict=True))])
            for r in cells
        ]
        blocks.append(f"{layer}\n" + "\n".join(lines))
    return "\n\n".join(blocks)


# ---- the command ----------------------------------------------------------------------------------------------------


def int_list(text: str, flag: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise PipelineError(f"{flag}: expected comma-separated integers, got {text!r}") from None


def name_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def replay(args: argparse.Namespace) -> int:
    if args.run_dir:  # a run of this study only (its tracked files and replay.json), checked before any work
        check_run_dir(args.run_dir, own=(RESULT_FILE,))
    history = LoadHistory.read(args.trace)
    layers = name_list(args.layers) if args.layers else history.layer_names
    unknown = [layer for layer in layers if layer not in history.counts_BE]
    if unknown:
        raise PipelineError(f"--layers: unknown layer(s) {unknown}; {args.trace} has {history.layer_names}")
    placements = None
    ranks = args.ranks
    if args.placement:
        pfile = read_placement_file(args.placement, num_experts=history.num_experts, ranks=ranks)
        ranks = pfile.ranks
        placements = placements_for_export(pfile, layers)
    ranks = 1 if ranks is None else ranks
    if ranks < 1:
        raise PipelineError(f"--ranks: must be at least 1, got {ranks}")
    if placements is None and history.num_experts % ranks:
        raise PipelineError(f"--ranks: {ranks} ranks do not split the {history.num_experts} experts evenly")
    # L: the most local experts any rank holds (more than E / D only with replicas).
    local = max(p.experts_per_rank for p in placements.values()) if placements else history.num_experts // ranks
    slots = int_list(args.slots, "--slots") if args.slots else list(range(1, local + 1))
    if not slots or any(not 1 <= k <= local for k in slots):
        raise PipelineError(f"--slots: each K must be in 1..{local} (the local experts per rank), got {slots}")
    policies = name_list(args.policies)
    rows = replay_history(history, ranks, placements, slots, policies, layers)
    half = max(1, local // 2)
    ratios = ratios_to_belady(rows, half) if half in slots else {}
    where = f"placement {args.placement}" if args.placement else "contiguous placement"
    batches = {layer: len(history.counts_BE[layer]) for layer in layers}
    print(f"{args.trace}: {history.num_experts} experts, {ranks} rank(s), {where}, L={local}, batches {batches}")
    print(format_tables(rows))
    if ratios:
        print(f"\nmisses / {ORACLE} misses at K = L/2 = {half}:")
        for policy, ratio in ratios[TOTAL].items():
            print(f"  {policy:8s} {'inf' if ratio is None else f'{ratio:.3f}'}")
    else:
        print(f"\n(K = L/2 = {half} is not among --slots: no ratio to {ORACLE})")
    if args.run_dir:
        settings = {
            "trace": str(args.trace),
            "ranks": ranks,
            "placement": str(args.placement or "contiguous"),
            "num_experts": history.num_experts,
            "local_experts": local,
            "slots": slots,
            "policies": [p for p in policies if p != ORACLE] + [ORACLE],
            "layers": layers,
        }
        # One summary figure per (layer, policy, K), so runs compare without opening the table.
        summary = {f"{layer}/{policy}/K{k}/miss_rate": rate for layer, policy, k, *_, rate in rows}
        summary |= {
            f"{layer}/{policy}/K{half}/misses_over_belady": ratio
            for layer, by_policy in ratios.items()
            for policy, ratio in by_policy.items()
            if ratio is not None
        }
        doc = {**settings, "columns": COLUMNS, "rows": rows, "half_slots": half, "misses_over_belady": ratios}
        with Results("buffering", settings, args.run_dir, "buffering", args.run_dir / RESULT_FILE) as results:
            results.table("buffering", COLUMNS, rows, **summary)
            results.save(doc)
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--trace",
        type=Path,
        required=True,
        help="routing trace (launch/train.py --record-traces) or load history (launch/infer.py --record-trace)",
    )
    parser.add_argument("--ranks", type=int, help="expert-parallel ranks D (default: the placement file's, else 1)")
    parser.add_argument("--placement", type=Path, help="placement file (JSON); default: contiguous")
    parser.add_argument("--slots", help="comma-separated device slots K per rank (default: 1..L)")
    parser.add_argument(
        "--policies",
        default=DEFAULT_POLICIES,
        help=f"comma-separated, of {', '.join(POLICIES)} (default {DEFAULT_POLICIES}; {ORACLE} is always added last)",
    )
    parser.add_argument("--layers", help="comma-separated MoE layer names (default: every layer of the trace)")
    parser.add_argument("--run-dir", type=Path, help="also log the rows here (W&B table + summary, replay.json)")


def main(args: argparse.Namespace) -> int:
    return exit_status(replay, args)
