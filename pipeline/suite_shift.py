"""The suite's shifting-workload experiments (issue 18), planned by pipeline.suite: expert placement when the traffic
moves away from the history a placement was fitted on.

    shift-lm          python -m moe_infer.bench shift: held-out prompts from the LM's plays (phase 1), then held-out
                      Bible verses (phase 2: text the LM never saw, so its tokens pick other experts), served with
                      contiguous placement, greedy fitted on phase 1, and online re-balancing; balancedness per
                      window of MoE calls before and after the shift (with a plot), tokens/s per phase, bytes moved
    serving-shift-lm  python -m moe_infer.bench live: the same two phases as one arrival trace (phase 1's prompts,
                      then phase 2's) at one fixed offered load through the HTTP server: contiguous (the baseline,
                      and again as the noise control), greedy fitted offline on the recorded history of the plays
                      (the suite's placements/greedy.json), online re-balancing; p50 / p99 latency and throughput

Both need the LM export; the live one also the greedy placement the suite's placement-lm experiment fits (it runs
first). Quick (the demo): the shift bench in two rounds, no live run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.atomic import write_atomic

ONLINE = ["--rebalance-interval", "8", "--rebalance-window", "32"]  # re-fit every 8 steps on the last 32 MoE calls
OFFERED_LOAD = "0.7x"  # of the baseline's request rate at saturation: loaded, not overloaded


def shift_trace(out: Path, phase1: Path, phase2: Path) -> Path:
    """phase1's prompts then phase2's, one file (out/inputs/lm-shift-trace.txt): the live bench sends its lines in
    order, so the shift is at line len(phase1)."""
    lines = [line for p in (phase1, phase2) for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    path = out / "inputs" / "lm-shift-trace.txt"
    write_atomic(path, "\n".join(lines) + "\n")
    return path


def plan_shift(suite, args: argparse.Namespace, phase1: Path, phase2: Path) -> None:
    """Adds shift-lm and (not quick) serving-shift-lm to `suite` (a pipeline.suite.Suite)."""
    export, out = args.lm, args.out
    if not (export / "config.json").is_file():
        suite.skip("shift-lm", f"no export at {export}: make train convert MODEL={export.name}")
        return
    py = sys.executable
    torchrun = [py, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}"]
    bench = [*torchrun, "-m", "moe_infer.bench", "shift", "--quiet", "--export", export, "--input", phase1]
    bench += ["--shift-to", phase2, "--max-new-tokens", "24", "--batch-size", "8", "--report-window", "16", *ONLINE]
    bench += ["--repeats", "2" if args.quick else "5", "--out", out / "shift-lm.json", "--run-dir", out / "shift-lm"]
    suite.add("shift-lm", *bench)
    if args.quick:
        return
    live = [py, "-m", "moe_infer.bench", "live", "--nproc", args.nproc, "--export", export]
    live += ["--input", shift_trace(out, phase1, phase2), "--max-tokens", "24", "--batch-size", "32"]
    live += ["--max-concurrency", "64", "--request-rates", OFFERED_LOAD, "--repeats", "5"]
    live += ["--variant", f"offline-greedy=--placement {out / 'placements' / 'greedy.json'}"]
    live += ["--variant", f"online={' '.join(ONLINE)}"]
    suite.add("serving-shift-lm", *live, "--out", out / "live-shift-lm.json", "--run-dir", out / "live-shift-lm")
