"""`python -m moe_infer.bench <benchmark> [flags]`: every benchmark and study, each owning its flags and its `main`;
this command line only registers them (so no benchmark imports another's entry point, or this one).

    model      the whole model served by each MoE policy, swept over batch sizes (launch/infer.py --mode bench)
    layer      one MoE layer, every implementation side by side, the floors and the dense equivalent
    serving    real requests served under several engine settings: buffering, placements (--mode bench-serving)
    replay     recorded expert loads through every eviction policy and cache size (python -m moe_infer.buffering)
    prefetch   the cross-layer prefetch study, replayed against a base-rate control

`model`, `serving` and `layer` serve under a launcher like the engine does (torchrun / deepspeed, or one process);
`replay` and `prefetch` read a trace in one process. `make bench` runs them all (pipeline.suite).
"""

from __future__ import annotations

import argparse
import importlib

# name -> (module, one line of help). The module has add_arguments(parser) and main(args) -> exit status.
BENCHMARKS = {
    "model": ("moe_infer.bench.model", "the whole model served by each MoE policy, swept over batch sizes"),
    "layer": ("moe_infer.bench.layer", "one MoE layer: every implementation, the floors, the dense equivalent"),
    "serving": ("moe_infer.bench.serving", "real requests served with expert buffering and placements, side by side"),
    "replay": ("moe_infer.bench.replay", "expert loads replayed through every eviction policy and cache size"),
    "prefetch": ("moe_infer.bench.prefetch", "the cross-layer prefetch study (replayed against a base-rate control)"),
}
# launch/infer.py --mode X: the benchmark it runs (the rest of its flags are the benchmark's).
INFER_MODES = {"bench": "model", "bench-serving": "serving"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m moe_infer.bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    for name, (module_name, help_) in BENCHMARKS.items():
        module = importlib.import_module(module_name)
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
    return benchmark_main(args)


def infer_mode_argv(argv: list[str]) -> list[str] | None:
    """`launch/infer.py --mode bench|bench-serving ...` as `python -m moe_infer.bench model|serving ...`; None for
    any other mode (the serving CLI's)."""
    for i, arg in enumerate(argv):
        if arg == "--mode" and i + 1 < len(argv):
            mode, rest = argv[i + 1], argv[:i] + argv[i + 2 :]
        elif arg.startswith("--mode="):
            mode, rest = arg.removeprefix("--mode="), argv[:i] + argv[i + 1 :]
        else:
            continue
        return [INFER_MODES[mode], *rest] if mode in INFER_MODES else None
    return None
