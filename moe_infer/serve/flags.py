"""The command-line flags every command that serves an export shares (the serving CLI, and the benchmarks that run
the engine), and what they turn into: EngineOptions, GenerationSettings / TranslationSettings, placement maps.

    add_engine_arguments(parser)          --export, the MoE implementation and its settings, buffering, --timeout,
                                          online re-balancing (--rebalance-*)
    check_engine_flags(args, export, world)      the placement maps, every engine flag checked before any collective
    add_request_arguments(parser)         --input / --output / --run-dir ..., and the generate and translate settings
    engine_options(args, policy, placements), serving_settings(args, mode, cfg), read_placements(path, export, ranks)
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from moe_infer.buffering.policies import ONLINE_POLICIES as ENGINE_EVICTIONS
from moe_infer.moe.layer import POLICIES, MoEOptions
from moe_infer.placement import Placement, PlacementError
from moe_infer.placement.files import placements_for_export, read_placement_file
from moe_infer.placement.online import ALGORITHMS as ONLINE_ALGORITHMS
from moe_infer.placement.online import RebalanceOptions
from moe_infer.runtime.engine import EngineOptions, expert_placements, moe_layer_names
from moe_infer.runtime.generate import GenerationSettings
from moe_infer.runtime.translate import TranslationSettings
from pipeline.errors import ConfigError

DEFAULT_MAX_LEN = 128  # translation steps when --max-len is not given (capped at the model's learned positions)


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text}")
    return value


def add_engine_arguments(parser: argparse.ArgumentParser, policy: bool = True) -> None:
    """--export and how the engine serves it; `policy`: with --policy (a benchmark of several policies has its own)."""
    parser.add_argument("--export", required=True, type=Path, help="the export directory (pipeline.convert)")
    serve = parser.add_argument_group("the engine")
    if policy:
        serve.add_argument("--policy", choices=POLICIES, default="dynamic", help="the MoE layer implementation")
    serve.add_argument(
        "--capacity-fraction",
        type=positive_float,
        help="static: expert slots as a fraction of the tokens per rank (default: the export's)",
    )
    serve.add_argument("--ds-capacity-factor", type=positive_float, default=1.0, help="deepspeed: capacity factor")
    serve.add_argument(
        "--ds-drop-tokens",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="deepspeed: drop pairs past the capacity (--no-ds-drop-tokens pads to the largest count)",
    )
    serve.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    serve.add_argument(
        "--placement",
        type=Path,
        help="where each expert lives, per MoE layer (a file from `python -m moe_infer.placement fit`); "
        "default contiguous. Replicas need --policy dynamic",
    )
    serve.add_argument(
        "--expert-slots",
        type=positive_int,
        help="expert buffering: device slots per MoE layer on each rank (default: every local expert resident); "
        "dynamic and static policies",
    )
    serve.add_argument(
        "--eviction",
        choices=ENGINE_EVICTIONS,
        default="paper",
        help="expert buffering: which expert leaves a full set of slots (paper: not needed later in the call, then "
        "last in first out)",
    )
    serve.add_argument(
        "--timeout", type=positive_float, default=120.0, help="seconds any collective may wait (default 120)"
    )
    online = parser.add_argument_group("online re-balancing (dynamic and static policies)")
    online.add_argument(
        "--rebalance-interval",
        type=positive_int,
        help="re-fit the expert placement every N serving steps from the recent loads and move the experts whose "
        "rank changes (default: off, the placement stays as started)",
    )
    online.add_argument(
        "--rebalance-window", type=positive_int, default=32, help="fit on each layer's last W MoE calls (default 32)"
    )
    online.add_argument(
        "--rebalance-algorithm", choices=ONLINE_ALGORITHMS, default="greedy", help="the placement algorithm"
    )
    online.add_argument(
        "--rebalance-layers-per-step",
        type=positive_int,
        default=1,
        help="layers whose experts move after one step (default 1: no step waits for the whole model's moves)",
    )
    online.add_argument(
        "--rebalance-min-gain",
        type=float,
        default=0.01,
        help="move only when the fitted placement raises the window's balancedness (mean / max rank load) by at "
        "least this much (default 0.01: a placement fitted on noise moves nothing)",
    )
    online.add_argument(
        "--redundant-experts",
        type=int,
        default=0,
        help="extra expert copies online: not supported (refused with a message); replicas are served from a "
        "fitted --placement file",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress lines and no library logs on stderr")
    # The deepspeed launcher passes --local_rank=N; the rank comes from the environment (LOCAL_RANK) either way.
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)


def add_request_arguments(parser: argparse.ArgumentParser) -> None:
    """Where requests come from and results go, and the generate / translate settings."""
    io_ = parser.add_argument_group("input and output")
    io_.add_argument("--input", default="-", help="one prompt / source sentence per line; '-' is stdin (default)")
    io_.add_argument("--output", type=Path, help="write the results here (atomically) instead of stdout")
    io_.add_argument("--format", choices=("text", "jsonl"), default="text", help="text: one output per line")
    io_.add_argument("--references", type=Path, help="translate: one reference per input line; prints the BLEU")
    io_.add_argument(
        "--run-dir",
        type=Path,
        help="W&B run (offline unless WANDB_MODE says otherwise) and metrics here; default none (serving), "
        "runs/bench-serving-<export name> (the serving benchmark)",
    )
    gen = parser.add_argument_group("generate")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (the default)")
    gen.add_argument("--top-k", type=int, default=0, help="0: off")
    gen.add_argument("--top-p", type=float, default=1.0, help="1: off")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--batch-size", type=int, default=8, help="requests per batch on each rank (both modes)")
    mt = parser.add_argument_group("translate")
    mt.add_argument("--beam-size", type=int, default=1, help="1 is greedy")
    mt.add_argument(
        "--max-len", type=int, help=f"decoder steps at most (default {DEFAULT_MAX_LEN}, capped at the positions)"
    )
    mt.add_argument("--length-penalty", type=float, default=1.0)


def engine_options(args: argparse.Namespace, policy: str, placements=None) -> EngineOptions:
    moe = MoEOptions(
        capacity_fraction=args.capacity_fraction,
        capacity_factor=args.ds_capacity_factor,
        drop_tokens=args.ds_drop_tokens,
    )
    return EngineOptions(
        policy=policy,
        moe=moe,
        expert_slots=args.expert_slots,
        eviction=args.eviction,
        dtype=args.dtype,
        timeout_s=args.timeout,
        placement=placements,
        rebalance=rebalance_options(args),
    )


def rebalance_options(args: argparse.Namespace) -> RebalanceOptions | None:
    """--rebalance-* as RebalanceOptions (None without --rebalance-interval)."""
    if getattr(args, "rebalance_interval", None) is None:
        if getattr(args, "redundant_experts", 0):
            raise ConfigError("--redundant-experts", "only applies with --rebalance-interval")
        return None
    return RebalanceOptions(
        interval=args.rebalance_interval,
        window=args.rebalance_window,
        algorithm=args.rebalance_algorithm,
        redundant_experts=args.redundant_experts,
        layers_per_step=args.rebalance_layers_per_step,
        min_gain=args.rebalance_min_gain,
    )


def serving_settings(args: argparse.Namespace, mode: str, cfg) -> GenerationSettings | TranslationSettings:
    """GenerationSettings / TranslationSettings from the flags (ConfigError names a bad value)."""
    if mode == "generate":
        return GenerationSettings(
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            seed=args.seed,
            batch_size=args.batch_size,
        )
    max_len = args.max_len
    if max_len is None:  # the default fits the model: learned positions end at max_positions
        max_len = DEFAULT_MAX_LEN if cfg.position_embedding != "learned" else min(DEFAULT_MAX_LEN, cfg.max_positions)
    return TranslationSettings(
        max_len=max_len, beam_size=args.beam_size, length_penalty=args.length_penalty, batch_size=args.batch_size
    )


def check_engine_flags(args: argparse.Namespace, export, world: int):
    """The engine flags checked against the export and the number of ranks, before any collective (the same on
    every rank): the placement file's maps per MoE layer (None: contiguous), an EP degree that divides the experts,
    buffering only with a policy that has an expert store."""
    placements = read_placements(args.placement, export, world)
    expert_placements(export, world, placements)
    if args.expert_slots is not None and args.policy not in ("dynamic", "static"):
        raise ConfigError("--expert-slots", f"expert buffering needs --policy dynamic or static, not {args.policy}")
    rebalance = rebalance_options(args)
    if rebalance is not None:
        try:
            rebalance.check()
        except PlacementError as err:
            raise ConfigError(
                "--redundant-experts" if rebalance.redundant_experts else "--rebalance-algorithm", str(err)
            ) from err
        if args.policy not in ("dynamic", "static"):
            raise ConfigError(
                "--rebalance-interval", f"online re-balancing needs --policy dynamic or static, not {args.policy}"
            )
        if placements is not None and any(not isinstance(p, Placement) for p in placements.values()):
            raise ConfigError(
                "--rebalance-interval",
                f"{args.placement} has expert replicas, which online re-balancing does not move: serve it without "
                "--rebalance-interval",
            )
    return placements


def read_placements(path: Path | None, export, world: int):
    """--placement's maps for every MoE layer of the export, checked against it and the number of ranks."""
    if path is None:
        return None
    names = moe_layer_names(export)
    pfile = read_placement_file(path, num_experts=export.model_config.num_experts, layer_names=names, ranks=world)
    return placements_for_export(pfile, names)


def flag_record(args: argparse.Namespace) -> dict[str, Any]:
    """The flags as plain values, for a run's recorded settings."""

    def plain(value):
        return (
            str(value) if isinstance(value, Path) else [plain(v) for v in value] if isinstance(value, list) else value
        )

    return {k: plain(v) for k, v in vars(args).items() if k != "local_rank"}
