"""Fit expert placements from routing traces, or compare the algorithms on held-out batches.

    python -m moe_infer.placement fit --trace runs/lm-tiny/traces/valid-step000300.npz --ranks 2 \\
        --algorithm greedy [--replicas 1] --out placement.json
    python -m moe_infer.placement fit --trace T.npz --ranks 8 --algorithm eplb --replicas 8 --out placement.json
    python -m moe_infer.placement evaluate --trace T.npz --ranks 2,4,8 [--run-dir runs/lm-tiny-placement]

`fit` uses every batch of the trace. `evaluate` follows the paper: fit on the first half of the batches, measure on
the second (max load, avg max load, balancedness: see metrics.py) for each layer, rank count and algorithm, including
greedy + replication and eplb, both with E/8 (at least 1) extra slots. With --run-dir the table is also logged through
the project's Tracker (metrics table + W&B offline run).

eplb packs each expert's EPLB_QUANTILE-th percentile of per-batch load rather than its mean: what is measured is the
largest rank load of each held-out batch, so an expert whose load swings needs room for its busy batches. Tried on
two served traces of lm-tiny with 64 experts (runs/lm-tiny-e64), held-out balancedness averaged over D = 2, 4, 8, 16:
the mean 0.826 / 0.665 (prefill / decode trace), mean + std 0.842 / 0.648, the 90th percentile 0.845 / 0.673, per-batch
shares' mean 0.841 / 0.673 and mean + std 0.829 / 0.678; the percentile is the most even across both.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from moe_infer.placement import algorithms
from moe_infer.placement.files import describe_placement_file, write_placement_file
from moe_infer.placement.history import LoadHistory
from moe_infer.placement.metrics import placement_metrics
from pipeline.errors import PipelineError, exit_status
from pipeline.outputs import check_output
from pipeline.tracking import check_run_dir

ALGORITHMS = ("contiguous", "greedy", "anti-correlation", "eplb")
EPLB_QUANTILE = 0.9
COLUMNS = ["layer", "ranks", "algorithm", "max_load", "avg_max_load", "balancedness", "total_balancedness"]


def fit_layer(history: LoadHistory, layer: str, ranks: int, algorithm: str, replicas: int = 0) -> list[list[int]]:
    """One layer's placement over `ranks` ranks from `history`, with `replicas` extra slots for hot experts (eplb
    plans them with the placement; the others add them afterwards with algorithms.replicate)."""
    counts_BE = history.counts_BE[layer]
    if algorithm == "eplb":
        return algorithms.eplb(np.quantile(counts_BE, EPLB_QUANTILE, axis=0), ranks, replicas)
    if algorithm == "contiguous":
        placement = algorithms.contiguous(history.num_experts, ranks)
    elif algorithm == "greedy":
        placement = algorithms.greedy(counts_BE.mean(axis=0), ranks)
    elif algorithm == "anti-correlation":
        placement = algorithms.anti_correlation(counts_BE, ranks)
    else:
        raise PipelineError(f"unknown placement algorithm {algorithm!r}; expected one of {', '.join(ALGORITHMS)}")
    return algorithms.replicate(counts_BE.mean(axis=0), placement, replicas) if replicas else placement


def evaluate_rows(history: LoadHistory, ranks_list: list[int]) -> list[list]:
    """Rows of COLUMNS: fit on the first half of the batches, metrics on the second."""
    fit, held_out = history.split_halves()
    extra = max(1, history.num_experts // 8)
    variants = [(name, name, 0) for name in ALGORITHMS if name != "eplb"]
    variants += [(f"greedy+{extra} replica", "greedy", extra), (f"eplb+{extra}", "eplb", extra)]
    rows = []
    for layer in history.layer_names:
        for ranks in ranks_list:
            for label, algorithm, replicas in variants:
                # One rank has no second rank to hold a copy: eplb refuses extra slots there, replicate adds none.
                replicas = min(replicas, history.num_experts * (ranks - 1))
                placement = fit_layer(fit, layer, ranks, algorithm, replicas)
                scores = placement_metrics(held_out.counts_BE[layer], placement)
                rows.append([layer, ranks, label, *(round(scores[c], 4) for c in COLUMNS[3:])])
    return rows


def format_table(columns: list[str], rows: list[list]) -> str:
    cells = [columns, *[[f"{v:.4f}" if isinstance(v, float) else str(v) for v in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in cells)


def _ranks_list(text: str, num_experts: int) -> list[int]:
    try:
        ranks = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise PipelineError(f"--ranks: expected comma-separated integers, got {text!r}") from None
    unusable = [d for d in ranks if d < 1 or num_experts % d]
    if unusable:
        raise PipelineError(f"--ranks: {unusable} do not divide the {num_experts} experts evenly")
    return ranks


def cmd_fit(args) -> int:
    # Only a placement file is replaced, and only with --force; never the trace being read (it is a file too).
    inputs = {"--trace": args.trace}
    check_output(args.out, kind="placement file", recognise=describe_placement_file, force=args.force, protected=inputs)
    history = LoadHistory.read(args.trace)
    (ranks,) = _ranks_list(str(args.ranks), history.num_experts)
    layers = {layer: fit_layer(history, layer, ranks, args.algorithm, args.replicas) for layer in history.layer_names}
    algorithm = args.algorithm + (f"+{args.replicas} replicas" if args.replicas else "")
    write_placement_file(args.out, layers, history.num_experts, algorithm=algorithm, source=str(args.trace))
    for layer, placement in layers.items():
        print(f"{layer}: {placement}")
    print(f"placement for {ranks} ranks written to {args.out}")
    return 0


def cmd_evaluate(args) -> int:
    if args.run_dir:
        check_run_dir(args.run_dir, protected={"--trace": args.trace})
    history = LoadHistory.read(args.trace)
    ranks_list = _ranks_list(args.ranks, history.num_experts)
    rows = evaluate_rows(history, ranks_list)
    fit, held_out = history.split_halves()
    print(f"{args.trace}: fit on {fit.num_batches} batches, evaluated on {held_out.num_batches}")
    print(format_table(COLUMNS, rows))
    if args.run_dir:
        _log(args, history, rows)
    return 0


def _log(args, history: LoadHistory, rows: list[list]) -> None:
    from pipeline.tracking import NamedRun, Tracker

    settings = {"trace": str(args.trace), "ranks": args.ranks, "num_experts": history.num_experts}
    with Tracker(NamedRun("placement", settings), args.run_dir, "placement") as tracker:
        tracker.log_table("placement", COLUMNS, rows)
        # One summary figure per (layer, ranks, algorithm), so runs compare without opening the table.
        tracker.summary(
            **{f"{row[0]}/D{row[1]}/{row[2]}/{col}": row[i] for row in rows for i, col in enumerate(COLUMNS) if i >= 3}
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m moe_infer.placement", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    fit = sub.add_parser("fit", help="fit a placement file from a routing trace")
    fit.add_argument(
        "--trace",
        type=Path,
        required=True,
        help="routing trace (launch/train.py --record-traces) or load history (launch/infer.py --record-trace)",
    )
    fit.add_argument("--ranks", type=int, required=True, help="expert-parallel ranks D")
    fit.add_argument("--algorithm", choices=ALGORITHMS, default="greedy")
    fit.add_argument(
        "--replicas",
        type=int,
        default=0,
        help="extra expert slots per layer for hot-expert replicas (eplb: the ranks then hold (E + R) / D slots, "
        "rounded down or up)",
    )
    fit.add_argument("--out", type=Path, required=True, help="placement file (JSON) to write")
    fit.add_argument("--force", action="store_true", help="replace a placement file already at --out (nothing else)")
    ev = sub.add_parser("evaluate", help="compare the algorithms: fit on the first half, measure on the second")
    ev.add_argument("--trace", type=Path, required=True)
    ev.add_argument("--ranks", default="2,4,8", help="comma-separated rank counts (default 2,4,8)")
    ev.add_argument(
        "--run-dir", type=Path, help="also log the table here (metrics files + W&B offline): a new or earlier such run"
    )
    args = parser.parse_args(argv)
    return exit_status(cmd_fit if args.command == "fit" else cmd_evaluate, args)


if __name__ == "__main__":
    np.set_printoptions(linewidth=120)
    sys.exit(main())
