"""`python -m moe_infer.bench <benchmark> [flags]`: every benchmark and study, each owning its flags and its `main`;
this command line only registers them (so no benchmark imports another's entry point, or this one).

    model      the whole model served by each MoE policy, swept over batch sizes (launch/infer.py --mode bench)
    layer      one MoE layer, every implementation side by side, the floors and the dense equivalent
    serving    real requests served under several engine settings: buffering, placements (--mode bench-serving)
    replay     recorded expert loads through every eviction policy and cache size (python -m moe_infer.buffering)
    prefetch   the cross-layer prefetch study, replayed against a base-rate control
    load       a load generator for the HTTP server (launch/infer.py --mode serve)
    live       the paper's techniques under live traffic: one server per variant, the same trace, interleaved
    shift      placement under a shifting workload: contiguous, fitted offline, re-balanced online
    serve-demo the HTTP server end to end (make demo's last step)

`model`, `serving` and `layer` serve under a launcher like the engine does (torchrun / deepspeed, or one process);
`replay` and `prefetch` read a trace in one process. `make bench` runs them all (pipeline.suite).
"""

from __future__ import annotations

import argparse
import sys

from moe_infer.bench import demo, layer, live, load, model, prefetch, replay, serving, shift
from moe_infer.serve.process import ArgumentParser
from pipeline.errors import PipelineError

# name -> (module, one line of help). The module has add_arguments(parser) and main(args) -> exit status.
BENCHMARKS = {
    "model": (model, "the whole model served by each MoE policy, swept over batch sizes"),
    "layer": (layer, "one MoE layer: every implementation, the floors, the dense equivalent"),
    "serving": (serving, "real requests served with expert buffering and placements, side by side"),
    "replay": (replay, "expert loads replayed through every eviction policy and cache size"),
    "prefetch": (prefetch, "the cross-layer prefetch study (replayed against a base-rate control)"),
    "load": (load, "a load generator for the HTTP server: Poisson arrivals, TTFT / TPOT / ITL, throughput, goodput"),
    "live": (live, "engine variants served under the same live traffic, against the batch CLI at saturation"),
    "shift": (shift, "contiguous, offline-fitted and online re-balanced placement under a workload that shifts"),
    "serve-demo": (demo, "the HTTP server end to end: start it, a few requests, a completion, /metrics, SIGTERM"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="python -m moe_infer.bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    for name, (module, help_) in BENCHMARKS.items():
        command = sub.add_parser(
            name, help=help_, description=module.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
        )
        module.add_arguments(command)
        command.set_defaults(main=module.main)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    benchmark_main = args.main
    del args.main, args.benchmark  # the benchmark's own flags are what it records
    try:
        return benchmark_main(args)
    except PipelineError as err:  # load, live and serve-demo run in one plain process: one line, not a traceback
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
