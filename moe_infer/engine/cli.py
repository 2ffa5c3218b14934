"""Serve an export from the command line: generate text (LM), translate (MT) or benchmark, under expert parallelism.

    python launch/infer.py --export exports/lm-tiny < prompts.txt                       one process, stdin -> stdout
    deepspeed --num_gpus 2 launch/infer.py --export exports/lm-tiny --input prompts.txt --temperature 0.8 --top-p 0.9
    torchrun --nproc-per-node 2 launch/infer.py --export exports/mt-tiny --input src.txt --references ref.txt \\
        --beam-size 4 --output hyp.txt
    python launch/infer.py --export exports/lm-tiny --mode bench --max-batch 16        see moe_infer.engine.bench
    python launch/infer.py --export exports/mt-tiny --expert-slots 2 --input src.txt   expert buffering: 2 slots/layer
    python launch/infer.py --export exports/mt-tiny --mode bench-serving --input src.txt --slots-sweep 1,2,3
                                                                                 see moe_infer.engine.serving_bench

Each input line is one request: a prompt (generate) or a source sentence (translate). Prompts are the plain token ids
of the line (the LM was trained on a stream of documents without BOS); sources are ids + EOS, as the MT model was
trained (pipeline.train.batches). Rank 0 writes one output line per input line, in input order; a newline inside an
output is written as the two characters `\\n` (or use --format jsonl).

The expert-parallel degree is the number of ranks the launcher starts; it must divide the export's expert count. Every
rank reads every request and checks all of them before the first collective (stdin is read by rank 0 and broadcast),
so a bad request makes every rank stop with the same message: `error: ...` on stderr, exit status 2 for bad input
(requests, references, flag values), 1 for any other known problem (a missing or broken export, an EP degree that
does not divide the experts). An unexpected exception prints its traceback with the rank and exits 1; the launcher
then stops the other ranks, and `--timeout` bounds every collective as the backstop.

Everything libraries print (DeepSpeed's logs, W&B's notes) goes to stderr: stdout carries the results only.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from moe_infer.buffering.policies import ONLINE_POLICIES as ENGINE_EVICTIONS
from pipeline.errors import ConfigError, PipelineError

REPO = Path(__file__).resolve().parents[2]
MODES = ("generate", "translate", "bench", "bench-serving")
TASK_MODE = {"decoder": "generate", "encoder-decoder": "translate"}  # the mode each architecture serves
DEFAULT_MAX_LEN = 128  # translation steps when --max-len is not given (capped at the model's learned positions)


# ---- arguments ------------------------------------------------------------------------------------------------------


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text}")
    return value


def _paths(text: str) -> list[Path]:
    return [Path(part.strip()) for part in text.split(",") if part.strip()]


def _int_list(text: str) -> list[int]:
    if text.strip() == "none":
        return []
    try:
        values = [_positive_int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        values = []
    if not values:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers >= 1 (or none), got {text!r}")
    return values


def _evictions(text: str) -> list[str]:
    names = [p.strip() for p in text.split(",") if p.strip()]
    if not names or any(n not in ENGINE_EVICTIONS for n in names):
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of {', '.join(ENGINE_EVICTIONS)}")
    return names


def _policies(text: str) -> list[str]:
    from moe_infer.engine.bench import DENSE
    from moe_infer.moe.layer import POLICIES

    known = (*POLICIES, DENSE)
    names = [p.strip() for p in text.split(",") if p.strip()]
    unknown = [p for p in names if p not in known]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of {', '.join(known)}, got {text!r}")
    return names


def build_parser() -> argparse.ArgumentParser:
    from moe_infer.moe.layer import POLICIES

    parser = argparse.ArgumentParser(
        prog="launch/infer.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--export", required=True, type=Path, help="the export directory (pipeline.convert)")
    parser.add_argument(
        "--mode",
        choices=MODES,
        help="generate (decoder LM), translate (encoder-decoder) or bench; default: what the export's model does",
    )
    serve = parser.add_argument_group("serving")
    serve.add_argument("--policy", choices=POLICIES, default="dynamic", help="the MoE layer implementation")
    serve.add_argument(
        "--capacity-fraction",
        type=_positive_float,
        help="static: expert slots as a fraction of the tokens per rank (default: the export's)",
    )
    serve.add_argument("--ds-capacity-factor", type=_positive_float, default=1.0, help="deepspeed: capacity factor")
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
        "--record-trace",
        type=Path,
        help="save each MoE call's per-expert token counts (summed over ranks) here, for `moe_infer.placement`",
    )
    serve.add_argument("--record-calls", type=int, default=4096, help="--record-trace keeps the last N calls per layer")
    serve.add_argument(
        "--expert-slots",
        type=_positive_int,
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
        "--timeout", type=_positive_float, default=120.0, help="seconds any collective may wait (default 120)"
    )
    io_ = parser.add_argument_group("input and output")
    io_.add_argument("--input", default="-", help="one prompt / source sentence per line; '-' is stdin (default)")
    io_.add_argument("--output", type=Path, help="write the results here (atomically) instead of stdout")
    io_.add_argument("--format", choices=("text", "jsonl"), default="text", help="text: one output per line")
    io_.add_argument("--references", type=Path, help="translate: one reference per input line; prints the BLEU")
    io_.add_argument(
        "--run-dir",
        type=Path,
        help="W&B run (offline unless WANDB_MODE says otherwise) and metrics here; default none for "
        "generate/translate, runs/bench-<export name> for bench",
    )
    io_.add_argument("--quiet", action="store_true", help="no progress lines and no library logs on stderr")
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
    bench = parser.add_argument_group("bench (see moe_infer.engine.bench)")
    bench.add_argument(
        "--policies",
        type=_policies,
        default=list(POLICIES),
        help="comma-separated (default: the four policies); dense-equivalent adds the FLOP-equivalent dense model",
    )
    bench.add_argument("--max-batch", type=int, default=64, help="batch sizes 1, 2, 4, ... up to this, per rank")
    bench.add_argument("--prompt-len", type=int, default=32, help="tokens per synthetic prompt / source")
    bench.add_argument("--decode-steps", type=int, default=16, help="KV-cached decoding steps after the prefill")
    variants = parser.add_argument_group("bench-serving (see moe_infer.engine.serving_bench)")
    variants.add_argument(
        "--slots-sweep", type=_int_list, default=[], help="expert buffering: device slots per layer to compare (1,2)"
    )
    variants.add_argument(
        "--evictions", type=_evictions, default=["paper"], help=f"comma-separated of {', '.join(ENGINE_EVICTIONS)}"
    )
    variants.add_argument(
        "--placements", type=_paths, default=[], help="comma-separated placement files to compare with contiguous"
    )
    variants.add_argument("--repeats", type=_positive_int, default=3, help="interleaved rounds; the best is kept")
    # The deepspeed launcher passes --local_rank=N; the rank comes from the environment (LOCAL_RANK) either way.
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in ("max_batch", "prompt_len", "decode_steps", "record_calls"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    return args


# ---- the job's place: rank, world, output streams -------------------------------------------------------------------


def launcher_rank() -> tuple[int, int]:
    """(rank, world size) as the launcher set them, before torch.distributed exists ((0, 1) without a launcher)."""
    try:
        return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 0, 1  # init_distributed names the bad variable later


@contextlib.contextmanager
def results_stdout() -> Iterator[IO[str]]:
    """A text stream on the process's stdout, while file descriptor 1 itself points at stderr: whatever the libraries
    print (DeepSpeed logs to stdout, W&B prints its notes there, C++ code writes to fd 1) lands on stderr, and stdout
    carries the results alone."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    results = os.fdopen(os.dup(saved), "w", encoding="utf-8", closefd=True)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield results
    finally:
        results.flush()
        results.close()
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def configure_process(quiet: bool) -> None:
    from pipeline.platform import quiet_known_warnings

    quiet_known_warnings()  # (threads per rank: Engine.start decides)
    if quiet:
        import logging

        os.environ.setdefault("WANDB_SILENT", "true")
        logging.getLogger("DeepSpeed").setLevel(logging.ERROR)


def progress(args: argparse.Namespace, rank: int, message: str) -> None:
    if not args.quiet and rank == 0:
        print(message, file=sys.stderr, flush=True)


# ---- reading and checking requests ----------------------------------------------------------------------------------


def split_lines(text: str) -> list[str]:
    """One request per line; a final newline ends the last line rather than starting an empty one. Only \\n and \\r\\n
    end a line (str.splitlines would also split at form feeds and other separators inside a sentence)."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line.removesuffix("\r") for line in lines]


def read_text(path: str | Path, what: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(what, f"cannot read {path}: {err}") from None


def read_requests(source: str, rank: int, world: int) -> list[str]:
    """Every request, on every rank. A file is read by each rank; stdin by rank 0 alone (the launcher's ranks share
    it, and only one may consume it), whose lines (or its read error) are then broadcast to the others."""
    if source != "-":
        return split_lines(read_text(source, "--input"))
    if world == 1:
        return split_lines(sys.stdin.read())
    import torch.distributed as dist

    payload: list[Any] = [None]
    if rank == 0:
        try:
            payload = [split_lines(sys.stdin.read())]
        except (OSError, UnicodeDecodeError) as err:
            payload = [f"cannot read stdin: {err}"]
    dist.broadcast_object_list(payload, src=0)
    if isinstance(payload[0], str):
        raise ConfigError("--input", payload[0])
    return payload[0]


def _name_the_line(err: PipelineError, what: str, where: str) -> str:
    """check_tokens numbers requests from 0; a user knows lines, numbered from 1."""
    return re.sub(rf"^{what} (\d+)", lambda m: f"{what} on line {int(m[1]) + 1} of {where}", str(err), count=1)


def encode_requests(tokenizer, lines: list[str], mode: str) -> list[list[int]]:
    """Prompts: the line's ids. Sources: ids + EOS, the encoder's input in training (an empty line stays empty, so the
    check below names it instead of translating a lone EOS)."""
    ids = tokenizer.encode_batch(lines)
    if mode == "translate":
        return [seq + [tokenizer.sp.eos_id()] if seq else seq for seq in ids]
    return ids


def check_requests(requests: list[list[int]], cfg, mode: str, settings, where: str) -> None:
    from moe_infer.runtime.generate import RequestError, check_prompts
    from moe_infer.runtime.translate import check_sources

    if not requests:
        raise RequestError(f"no {'prompts' if mode == 'generate' else 'sources'} in {where}: one per line expected")
    try:
        if mode == "generate":
            check_prompts(requests, cfg, settings.max_new_tokens)
        else:
            check_sources(requests, cfg, settings)
    except RequestError as err:
        raise RequestError(_name_the_line(err, "prompt" if mode == "generate" else "source", where)) from None


# ---- the job --------------------------------------------------------------------------------------------------------


@dataclass
class Job:
    """Everything checked, nothing served yet: the same on every rank."""

    args: argparse.Namespace
    export: Any  # moe_infer.model.loader.Export
    mode: str
    rank: int
    world: int
    lines: list[str] = field(default_factory=list)
    requests: list[list[int]] = field(default_factory=list)
    references: list[str] | None = None
    settings: Any = None
    tokenizer: Any = None
    placements: Any = None  # {MoE layer name: Placement | ReplicatedPlacement} from --placement, else None
    variants: Any = None  # bench-serving: what it compares (moe_infer.engine.serving_bench.plan_variants)


def open_export(path: Path):
    from moe_infer.model.loader import Export

    return Export.open(path)


def resolve_mode(requested: str | None, export) -> str:
    architecture = export.model_config.architecture
    native = TASK_MODE[architecture]
    if requested == "bench-serving":  # it serves the export's own requests
        return native
    if requested is None or requested in ("bench", native):
        return requested or native
    other = {"generate": "an LM (decoder) export", "translate": "an MT (encoder-decoder) export"}[requested]
    raise ConfigError(
        "--mode",
        f"{requested} needs {other}, but {export.path} holds an {architecture} model: use --mode {native}",
    )


def engine_options(args: argparse.Namespace, policy: str, placements=None):
    from moe_infer.moe.layer import MoEOptions
    from moe_infer.runtime.engine import EngineOptions

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
    )


def serving_settings(args: argparse.Namespace, mode: str, cfg):
    """GenerationSettings / TranslationSettings from the flags (ConfigError names a bad value)."""
    from moe_infer.runtime.generate import GenerationSettings
    from moe_infer.runtime.translate import TranslationSettings

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


def read_placements(path: Path | None, export, world: int):
    """--placement's maps for every MoE layer of the export, checked against it and the number of ranks."""
    if path is None:
        return None
    from moe_infer.placement.files import placements_for_export, read_placement_file
    from moe_infer.runtime.engine import moe_layer_names

    names = moe_layer_names(export)
    pfile = read_placement_file(path, num_experts=export.model_config.num_experts, layer_names=names, ranks=world)
    return placements_for_export(pfile, names)


def prepare(args: argparse.Namespace) -> Job:
    """Open the export, read and check every request and flag. Identical on every rank: the only collectives are the
    process group's start and (stdin under a launcher) one broadcast of the lines, which every rank reaches."""
    from moe_infer.runtime.engine import expert_placements
    from pipeline.platform import init_distributed
    from pipeline.tokenizer import Tokenizer

    rank, world = launcher_rank()
    export = open_export(args.export)
    mode = resolve_mode(args.mode, export)
    job = Job(args, export, mode, rank, world, placements=read_placements(args.placement, export, world))
    # The EP degree must divide the experts (or the placement must fit the ranks): say so before any collective.
    expert_placements(export, world, job.placements)
    if args.expert_slots is not None and args.policy not in ("dynamic", "static"):
        raise ConfigError("--expert-slots", f"expert buffering needs --policy dynamic or static, not {args.policy}")
    if mode == "bench":
        from moe_infer.engine.bench import check_bench

        check_bench(args, export.model_config)
        return job
    cfg = export.model_config
    job.settings = serving_settings(args, mode, cfg)
    job.tokenizer = Tokenizer(export.tokenizer_bytes(), export.path / export.config["tokenizer"]["file"])
    if args.references is not None and mode != "translate":
        raise ConfigError("--references", "only translate mode has references")
    if args.input == "-" and world > 1:
        init_distributed(timeout_s=args.timeout, use_deepspeed=True)  # for the broadcast of stdin
    where = "stdin" if args.input == "-" else str(args.input)
    job.lines = read_requests(args.input, rank, world)
    job.requests = encode_requests(job.tokenizer, job.lines, mode)
    check_requests(job.requests, cfg, mode, job.settings, where)
    if args.references is not None:
        job.references = split_lines(read_text(args.references, "--references"))
        if len(job.references) != len(job.lines):
            raise ConfigError(
                "--references",
                f"{args.references} has {len(job.references)} lines for {len(job.lines)} sources: one each expected",
            )
    if args.mode == "bench-serving":
        from moe_infer.engine.serving_bench import plan_variants

        job.variants = plan_variants(job)
    return job


def serve(job: Job) -> tuple[list[list[int]], float, dict[str, float]]:
    """Start the engine and serve every request: (outputs in request order, seconds, the group's MoE figures)."""
    from moe_infer.runtime.engine import Engine

    engine = Engine.start(job.export.path, engine_options(job.args, job.args.policy, job.placements))
    recorder = None
    if job.args.record_trace is not None:
        from moe_infer.runtime.recorder import LoadRecorder

        recorder = LoadRecorder(engine, job.args.record_calls)
    progress(
        job.args,
        job.rank,
        f"serving {len(job.requests)} {job.mode} requests from {job.export.path} on {engine.world_size} rank(s) "
        f"({engine.device}, policy {job.args.policy}, {job.args.dtype})",
    )
    start = time.perf_counter()
    outputs = engine.serve(job.requests, job.settings)
    seconds = time.perf_counter() - start
    if recorder is not None:
        save_load_history(recorder, job)
    return outputs, seconds, moe_figures(engine)


def save_load_history(recorder, job: Job) -> None:
    """--record-trace: the group's per-call expert counts, written by rank 0 (gathering them is a collective)."""
    from moe_infer.placement.history import LoadHistory

    counts = {name: counts_CE.numpy() for name, counts_CE in recorder.gather().items()}
    if job.rank == 0:
        source = f"served {job.export.path} ({job.mode}, {len(job.requests)} requests, {job.world} ranks)"
        LoadHistory(counts, job.export.model_config.num_experts, source).save(job.args.record_trace)
        progress(job.args, job.rank, f"expert loads of {len(counts)} MoE layers written to {job.args.record_trace}")


def moe_figures(engine) -> dict[str, float]:
    """The dropped fraction of each MoE layer and of all of them, over the whole group (a collective)."""
    from moe_infer.collectives import all_reduce

    layers = engine.moe_layers
    counts = [v for layer in layers for v in (layer.totals.pairs_dropped, layer.totals.pairs_routed)]
    counts = all_reduce(counts, "sum", device=engine.device)
    figures = {}
    for i, layer in enumerate(layers):
        dropped, routed = counts[2 * i], counts[2 * i + 1]
        figures[f"moe/{layer.name}/dropped_fraction"] = dropped / routed if routed else 0.0
    dropped, routed = sum(counts[0::2]), sum(counts[1::2])
    figures["moe/dropped_fraction"] = dropped / routed if routed else 0.0
    return figures


def format_output(line: str, text: str, fmt: str) -> str:
    if fmt == "jsonl":
        return json.dumps({"input": line, "output": text}, ensure_ascii=False)
    return text.replace("\r", "\\r").replace("\n", "\\n")  # one output per line, whatever the model wrote


def write_results(job: Job, texts: list[str], out: IO[str]) -> None:
    from pipeline.atomic import write_atomic

    pairs = zip(job.lines, texts, strict=True)
    body = "".join(format_output(line, text, job.args.format) + "\n" for line, text in pairs)
    if job.args.output is None:
        out.write(body)
        out.flush()
    else:
        write_atomic(job.args.output, body)


def track(job: Job, texts: list[str], metrics: dict[str, float]) -> None:
    """Rank 0: the run's figures and a table of every request with its output, under --run-dir."""
    from pipeline.tracking import NamedRun, Tracker

    run = NamedRun(f"{job.export.path.name}-{job.args.policy}", {"export": str(job.export.path), **_flags(job.args)})
    with Tracker(run, job.args.run_dir, job.mode, is_main=job.rank == 0) as tracker:
        tracker.log(metrics, step=0)
        rows = [[i, line, text] for i, (line, text) in enumerate(zip(job.lines, texts, strict=True))]
        columns = ["index", "input", "output"]
        if job.references is not None:
            columns.append("reference")
            rows = [row + [ref] for row, ref in zip(rows, job.references, strict=True)]
        tracker.log_table("outputs", columns, rows)
        tracker.summary(**metrics)


def _flags(args: argparse.Namespace) -> dict[str, Any]:
    def plain(value):
        return (
            str(value) if isinstance(value, Path) else [plain(v) for v in value] if isinstance(value, list) else value
        )

    return {k: plain(v) for k, v in vars(args).items() if k != "local_rank"}


def run_serving(job: Job, out: IO[str]) -> int:
    outputs, seconds, metrics = serve(job)
    if job.rank != 0:
        return 0
    texts = [job.tokenizer.decode(ids) for ids in outputs]
    write_results(job, texts, out)
    new_tokens = sum(map(len, outputs))
    metrics = {
        "requests": len(outputs),
        "output_tokens": new_tokens,
        "seconds": seconds,
        "output_tokens_per_s": new_tokens / seconds if seconds > 0 else 0.0,
        "ranks": job.world,
        **metrics,
    }
    if job.references is not None:
        from moe_infer.runtime.translate import bleu

        metrics["bleu"] = bleu(texts, job.references)
        print(f"BLEU = {metrics['bleu']:.2f} (sacrebleu corpus BLEU, {len(texts)} sentences)", file=sys.stderr)
    progress(job.args, job.rank, f"{len(outputs)} requests, {new_tokens} tokens in {seconds:.2f}s")
    if job.args.run_dir is not None:
        track(job, texts, metrics)
    return 0


# ---- entry point ----------------------------------------------------------------------------------------------------


def _fail(err: PipelineError, rank: int, world: int, same_everywhere: bool) -> int:
    """Print one clear message: an error every rank meets alike is printed by rank 0 only."""
    from moe_infer.runtime.generate import RequestError

    if rank == 0 or not same_everywhere:
        where = f" (rank {rank} of {world})" if world > 1 and not same_everywhere else ""
        print(f"error{where}: {err}", file=sys.stderr, flush=True)
    return 2 if isinstance(err, RequestError | ConfigError) else 1


def _is_collective_failure(err: BaseException, world: int) -> bool:
    """A collective that failed because a peer went away or --timeout passed: a consequence, not the cause."""
    import torch.distributed as dist

    if world == 1:
        return False
    if isinstance(err, dist.DistError):
        return True
    text = str(err)
    peer_gone = ("Connection closed by peer", "Connection reset by peer", "Timed out", "timed out", "Broken pipe")
    return isinstance(err, RuntimeError) and any(s in text for s in peer_gone)


def _crash(err: BaseException, rank: int, world: int) -> int:
    if _is_collective_failure(err, world):
        # The rank that caused it prints its own traceback; this one only says why it stopped.
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(
            f"error (rank {rank} of {world}): a collective failed: another rank stopped, or --timeout passed ({first})",
            file=sys.stderr,
            flush=True,
        )
        return 1
    print(f"rank {rank} of {world}: unexpected error\n{traceback.format_exc()}", file=sys.stderr, flush=True)
    return 1


def _finish_distributed() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)  # bad flags: argparse's message and exit status 2
    rank, world = launcher_rank()
    with results_stdout() as out:
        try:
            configure_process(args.quiet)
            try:
                job = prepare(args)
            except PipelineError as err:
                return _fail(err, rank, world, same_everywhere=True)
            try:
                if job.mode == "bench":
                    from moe_infer.engine.bench import run_bench

                    return run_bench(job, out)
                if args.mode == "bench-serving":
                    from moe_infer.engine.serving_bench import run_serving_bench

                    return run_serving_bench(job, out)
                return run_serving(job, out)
            except PipelineError as err:
                return _fail(err, rank, world, same_everywhere=False)
        except Exception as err:  # a bug, not a user error: the traceback, with the rank that met it
            return _crash(err, rank, world)
        finally:
            _finish_distributed()


__all__ = ["build_parser", "main", "parse_args"]
