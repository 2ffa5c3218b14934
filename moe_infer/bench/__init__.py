"""Every benchmark and study of the engine, at the top of moe_infer: nothing else in moe_infer imports it.

    cli.py            `python -m moe_infer.bench <name>`: registers the benchmarks below (each owns its flags and main)
    model.py          the whole model per MoE policy, swept over batch sizes (one step measured in model_measure.py)
    layer.py          one MoE layer: every implementation, the expert floors, the FLOP-equivalent dense FFN
    serving.py        real requests served with expert buffering and placements, against every expert resident
    replay.py         recorded expert loads through every eviction policy and cache size, Belady's MIN last
    prefetch.py       the cross-layer prefetch study (not used by the engine)
    synthetic.py      random layers scaled like trained ones, the FLOP-equivalent dense FFN
    memory.py         the activation memory of one call
    results.py        the one writer of every benchmark's figures: JSON, W&B run, table on stdout

The experiments of the paper, run together (`make bench`), are pipeline.suite: it needs the training stages for its
held-out inputs, so it lives in pipeline/ and runs these benchmarks as commands.
"""

# launch/infer.py --mode X: the benchmark it runs (the rest of its flags are the benchmark's).
INFER_MODES = {"bench": "model", "bench-serving": "serving"}


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
