"""Replay a recorded expert-load trace through the expert cache's eviction policies, for every cache size.

    python -m moe_infer.buffering replay --trace runs/lm-tiny/traces/valid-step000300.npz --ranks 2 \\
        [--placement placement.json] [--slots 1,2,4] [--policies paper,fifo,lru,lfu] [--layers decoder.layers.2] \\
        [--run-dir runs/lm-tiny-buffering]

Prints one miss-rate table per MoE layer and their total (rows: policies, Belady's MIN last; columns: device slots
K per rank), then each policy's misses over Belady's at K = L/2. Each rank's cache starts full with its local
experts 0..K-1, as the engine's store does. With --run-dir the rows are also logged through the project's Tracker
(table + summary, W&B offline) and written to replay.json.

    python -m moe_infer.buffering prefetch --trace runs/lm-tiny-e64/traces/served-decode-heldout.npz --ranks 2 \\
        [--slots 8,16,24] [--policies paper,lru] [--threshold 0.5] [--predictor transition|base] [--run-dir DIR]

The cross-layer prefetch study (prefetch.py): fit on the first half, replay the second; per layer and the total,
on-demand misses (stalls) and copies without / with prefetching layer l+1's predicted experts while layer l
computes. --predictor base is the control that ignores layer l (every call predicted at the base rate). With
--run-dir: Tracker table + summary and prefetch.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from moe_infer.buffering import prefetch
from moe_infer.buffering.policies import POLICIES
from moe_infer.buffering.replay import COLUMNS, ORACLE, TOTAL, format_tables, ratios_to_belady, replay_history
from moe_infer.placement.history import LoadHistory
from pipeline.errors import PipelineError

DEFAULT_POLICIES = "paper,fifo,lru,lfu"


def _int_list(text: str, flag: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise PipelineError(f"{flag}: expected comma-separated integers, got {text!r}") from None


def _names(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def cmd_replay(args) -> int:
    history = LoadHistory.read(args.trace)
    layers = _names(args.layers) if args.layers else history.layer_names
    unknown = [layer for layer in layers if layer not in history.counts_BE]
    if unknown:
        raise PipelineError(f"--layers: unknown layer(s) {unknown}; {args.trace} has {history.layer_names}")
    placements = None
    ranks = args.ranks
    if args.placement:
        from moe_infer.placement.files import placements_for_export, read_placement_file

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
    slots = _int_list(args.slots, "--slots") if args.slots else list(range(1, local + 1))
    if not slots or any(not 1 <= k <= local for k in slots):
        raise PipelineError(f"--slots: each K must be in 1..{local} (the local experts per rank), got {slots}")
    policies = _names(args.policies)
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
        _log(args.run_dir, "buffering", settings, COLUMNS, rows, summary, doc, "replay.json")
    return 0


def cmd_prefetch(args) -> int:
    history = LoadHistory.read(args.trace)
    if args.ranks < 1 or history.num_experts % args.ranks:
        raise PipelineError(f"--ranks: {args.ranks} ranks do not split the {history.num_experts} experts evenly")
    local = history.num_experts // args.ranks
    slots = _int_list(args.slots, "--slots") if args.slots else sorted({max(1, local * q // 4) for q in (1, 2, 3)})
    if not slots or any(not 1 <= k <= local for k in slots):
        raise PipelineError(f"--slots: each K must be in 1..{local} (the local experts per rank), got {slots}")
    policies = _names(args.policies)
    rows = prefetch.prefetch_study(history, args.ranks, slots, policies, args.threshold, args.predictor)
    pairs = ", ".join(f"{a} -> {b}" for a, b in prefetch.layer_pairs(history))
    print(f"{args.trace}: {history.num_experts} experts, {args.ranks} rank(s), L={local}, predicted: {pairs}")
    print(
        f"fit on the first {history.num_batches // 2} calls, replayed on the rest; predictor {args.predictor}, ", end=""
    )
    print(f"threshold {args.threshold}; stalls = on-demand misses, copies+pf = stalls+pf + prefetched\n")
    print(prefetch.format_tables(rows))
    if args.run_dir:
        settings = {
            "trace": str(args.trace),
            "ranks": args.ranks,
            "num_experts": history.num_experts,
            "local_experts": local,
            "slots": slots,
            "policies": policies,
            "threshold": args.threshold,
            "predictor": args.predictor,
            "layers": history.layer_names,
        }
        names = prefetch.COLUMNS
        summary = {f"{r[0]}/{r[1]}/K{r[2]}/{names[i]}": r[i] for r in rows for i in (4, 5, 6, 8, 10)}
        doc = {**settings, "columns": names, "rows": rows}
        _log(args.run_dir, "prefetch", settings, names, rows, summary, doc, "prefetch.json")
    return 0


def _log(
    run_dir: Path, key: str, settings: dict, columns: list[str], rows: list[list], summary: dict, doc: dict, name: str
) -> None:
    from pipeline.atomic import atomic_path
    from pipeline.tracking import NamedRun, Tracker

    with Tracker(NamedRun("buffering", settings), run_dir, "buffering") as tracker:
        tracker.log_table(key, columns, rows)
        tracker.summary(**summary)
    with atomic_path(Path(run_dir) / name) as tmp:
        tmp.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m moe_infer.buffering", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    replay = sub.add_parser(
        "replay",
        help="miss rates of every eviction policy and cache size on a recorded trace, Belady's MIN last",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    replay.add_argument(
        "--trace",
        type=Path,
        required=True,
        help="routing trace (launch/train.py --record-traces) or load history (launch/infer.py --record-trace)",
    )
    replay.add_argument("--ranks", type=int, help="expert-parallel ranks D (default: the placement file's, else 1)")
    replay.add_argument("--placement", type=Path, help="placement file (JSON); default: contiguous")
    replay.add_argument("--slots", help="comma-separated device slots K per rank (default: 1..L)")
    replay.add_argument(
        "--policies",
        default=DEFAULT_POLICIES,
        help=f"comma-separated, of {', '.join(POLICIES)} (default {DEFAULT_POLICIES}; {ORACLE} is always added last)",
    )
    replay.add_argument("--layers", help="comma-separated MoE layer names (default: every layer of the trace)")
    replay.add_argument("--run-dir", type=Path, help="also log the rows here (Tracker table + summary, replay.json)")
    study = sub.add_parser(
        "prefetch",
        help="cross-layer prefetch study: on-demand misses and copies without / with prefetch (held-out half)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    study.add_argument("--trace", type=Path, required=True, help="load history or routing trace (as for replay)")
    study.add_argument("--ranks", type=int, default=1, help="expert-parallel ranks D, contiguous placement (default 1)")
    study.add_argument("--slots", help="comma-separated device slots K per rank (default: L/4, L/2, 3L/4)")
    study.add_argument("--policies", default="paper,lru", help=f"comma-separated, of {', '.join(POLICIES[:-1])}")
    study.add_argument(
        "--threshold",
        type=float,
        default=prefetch.DEFAULT_THRESHOLD,
        help=f"prefetch experts predicted to run with at least this probability (default {prefetch.DEFAULT_THRESHOLD})",
    )
    study.add_argument("--predictor", choices=prefetch.PREDICTORS, default="transition", help="base: the control")
    study.add_argument("--run-dir", type=Path, help="also log the rows here (Tracker table + summary, prefetch.json)")
    args = parser.parse_args(argv)
    try:
        return cmd_prefetch(args) if args.command == "prefetch" else cmd_replay(args)
    except PipelineError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
