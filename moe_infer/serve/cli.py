"""Serve an export from the command line: generate text (LM) or translate (MT), under expert parallelism.

    python launch/infer.py --export exports/lm-tiny < prompts.txt                       one process, stdin -> stdout
    deepspeed --num_gpus 2 launch/infer.py --export exports/lm-tiny --input prompts.txt --temperature 0.8 --top-p 0.9
    torchrun --nproc-per-node 2 launch/infer.py --export exports/mt-tiny --input src.txt --references ref.txt \\
        --beam-size 4 --output hyp.txt
    python launch/infer.py --export exports/mt-tiny --expert-slots 2 --input src.txt   expert buffering: 2 slots/layer
    python launch/infer.py --export exports/lm-tiny --mode bench ...              the benchmarks, moe_infer.bench:
    python launch/infer.py --export exports/mt-tiny --mode bench-serving ...      `python -m moe_infer.bench --help`

Each input line is one request: a prompt (generate) or a source sentence (translate); see moe_infer.serve.requests.
Rank 0 writes one output line per input line, in input order; a newline inside an output is written as the two
characters `\\n` (or use --format jsonl).

The expert-parallel degree is the number of ranks the launcher starts; it must divide the export's expert count. Every
rank reads every request and checks all of them before the first collective (stdin is read by rank 0 and broadcast),
so a bad request makes every rank stop with the same message: `error: ...` on stderr, exit status 2 for bad input
(requests, references, flag values), 1 for any other known problem (a missing or broken export, an EP degree that
does not divide the experts). An unexpected exception prints its traceback with the rank and exits 1; the launcher
then stops the other ranks, and `--timeout` bounds every collective as the backstop (moe_infer.serve.process).

Everything libraries print (DeepSpeed's logs, W&B's notes) goes to stderr: stdout carries the results only.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from moe_infer.collectives import all_reduce, clock
from moe_infer.model.loader import Export
from moe_infer.placement.history import LoadHistory, describe_load_history
from moe_infer.runtime.engine import Engine
from moe_infer.runtime.rebalance import Rebalancer
from moe_infer.runtime.recorder import LoadRecorder
from moe_infer.runtime.translate import bleu
from moe_infer.serve.flags import (
    add_engine_arguments,
    add_request_arguments,
    check_engine_flags,
    engine_options,
    flag_record,
    serving_settings,
)
from moe_infer.serve.process import ArgumentParser, launched, progress
from moe_infer.serve.requests import (
    check_lines,
    check_requests,
    encode_requests,
    format_output,
    read_requests,
    read_text,
    split_lines,
)
from moe_infer.serve.written import describe_written, record_written
from pipeline.atomic import write_atomic
from pipeline.errors import ConfigError, PipelineError
from pipeline.outputs import check_output, describe_os_error
from pipeline.platform import init_distributed
from pipeline.tokenizer import Tokenizer
from pipeline.tracking import NamedRun, Tracker, check_run_dir

MODES = ("generate", "translate")
TASK_MODE = {"decoder": "generate", "encoder-decoder": "translate"}  # the mode each architecture serves


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="launch/infer.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--mode",
        choices=MODES,
        help="generate (decoder LM) or translate (encoder-decoder); default: what the export's model does "
        "(launch/infer.py also takes bench and bench-serving: moe_infer.bench)",
    )
    add_engine_arguments(parser)
    parser.add_argument(
        "--record-trace",
        type=Path,
        help="save each MoE call's per-expert token counts (summed over ranks) here, for `moe_infer.placement`",
    )
    parser.add_argument(
        "--record-calls", type=int, default=4096, help="--record-trace keeps the last N calls per layer"
    )
    add_request_arguments(parser)
    parser.add_argument(
        "--force",
        action="store_true",
        help="replace a file already at --output, and a load history already at --record-trace (nothing else)",
    )
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


# ---- the job: everything checked before anything is served ----------------------------------------------------------


@dataclass
class Job:
    """Everything checked, nothing served yet: the same on every rank."""

    args: argparse.Namespace
    export: Export
    mode: str
    rank: int
    world: int
    lines: list[str] = field(default_factory=list)
    requests: list[list[int]] = field(default_factory=list)
    references: list[str] | None = None
    settings: Any = None
    tokenizer: Any = None
    placements: Any = None  # {MoE layer name: Placement | ReplicatedPlacement} from --placement, else None


def resolve_mode(requested: str | None, export: Export) -> str:
    architecture = export.model_config.architecture
    native = TASK_MODE[architecture]
    if requested is None or requested == native:
        return native
    other = {"generate": "an LM (decoder) export", "translate": "an MT (encoder-decoder) export"}[requested]
    raise ConfigError(
        "--mode",
        f"{requested} needs {other}, but {export.path} holds an {architecture} model: use --mode {native}",
    )


def prepare(args: argparse.Namespace, rank: int, world: int) -> Job:
    """Open the export, read and check every request and flag. Identical on every rank: the only collectives are the
    process group's start and (stdin under a launcher) one broadcast of the lines, which every rank reaches."""
    export = Export.open(args.export)
    mode = resolve_mode(getattr(args, "mode", None), export)
    # The EP degree must divide the experts (or the placement must fit the ranks): said before any collective.
    job = Job(args, export, mode, rank, world, placements=check_engine_flags(args, export, world))
    cfg = export.model_config
    job.settings = serving_settings(args, mode, cfg)
    job.tokenizer = Tokenizer(export.tokenizer_bytes(), export.path / export.config["tokenizer"]["file"])
    if args.references is not None and mode != "translate":
        raise ConfigError("--references", "only translate mode has references")
    if args.input == "-" and world > 1:
        init_distributed(timeout_s=args.timeout, use_deepspeed=True)  # for the broadcast of stdin
    where = "stdin" if args.input == "-" else str(args.input)
    job.lines = read_requests(args.input, rank, world)
    check_lines(job.lines, mode, where)
    job.requests = encode_requests(job.tokenizer, job.lines, mode)
    check_requests(job.requests, cfg, mode, job.settings, where)
    if args.references is not None:
        job.references = split_lines(read_text(args.references, "--references"))
        if len(job.references) != len(job.lines):
            raise ConfigError(
                "--references",
                f"{args.references} has {len(job.references)} lines for {len(job.lines)} sources: one each expected",
            )
    return job


def check_outputs(args: argparse.Namespace) -> None:
    """What this command writes may be written (pipeline.outputs.check_output), checked on every rank before any
    collective: --output and --record-trace replace only a previous one of theirs and only with --force, --run-dir
    adds only to a tracked run of its own; none of them may be, lie inside or contain an input or each other."""
    inputs = {"--export": args.export, "--references": args.references, "--placement": args.placement}
    if args.input != "-":
        inputs["--input"] = Path(args.input)
    outputs = {"--output": args.output, "--record-trace": args.record_trace, "--run-dir": args.run_dir}
    inputs, outputs = ({k: v for k, v in d.items() if v is not None} for d in (inputs, outputs))
    others = {flag: {**inputs, **{k: v for k, v in outputs.items() if k != flag}} for flag in outputs}
    if args.output is not None:
        only = "--force replaces only results this command wrote, unchanged since"
        check_output(args.output, kind="results file of this command", recognise=describe_written, force=args.force,
                     protected=others["--output"], note=only)  # fmt: skip
    if args.record_trace is not None:
        trace = args.record_trace
        check_output(trace, kind="load history", recognise=describe_load_history, force=args.force,
                     protected=others["--record-trace"])  # fmt: skip
    if args.run_dir is not None:
        check_run_dir(args.run_dir, protected=others["--run-dir"])


# ---- serving --------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)  # bad flags: argparse's message and exit status 2
    with launched(args.quiet) as command:
        check_outputs(args)
        job = prepare(args, command.rank, command.world)
        command.checked()
        engine = Engine.start(job.export.path, engine_options(args, args.policy, job.placements))
        recorder = LoadRecorder(engine, args.record_calls) if args.record_trace is not None else None
        rebalancer = Rebalancer(engine) if engine.options.rebalance is not None else None
        if rebalancer is not None:
            engine.sync.hooks.append(rebalancer)  # after every step of the batch loop, on every rank
        progress(
            args.quiet,
            job.rank,
            f"serving {len(job.requests)} {job.mode} requests from {job.export.path} on {engine.world_size} rank(s) "
            f"({engine.device}, policy {args.policy}, {args.dtype})",
        )
        start = clock(engine.device)
        outputs = engine.serve(job.requests, job.settings)
        finish(job, engine, recorder, outputs, clock(engine.device) - start, command.out, rebalancer)
    return command.status


def finish(
    job: Job,
    engine: Engine,
    recorder,
    outputs: list[list[int]],
    seconds: float,
    out: IO[str],
    rebalancer: Rebalancer | None = None,
) -> None:
    """The load history and the MoE figures (collectives), then on rank 0: the outputs, BLEU, the tracked run (with
    online re-balancing: its figures, and a table of every re-fit)."""
    if recorder is not None:
        save_load_history(recorder, job)
    metrics = moe_figures(engine)
    if rebalancer is not None:
        metrics.update(rebalancer.summary())
    if job.rank != 0:
        return
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
        metrics["bleu"] = bleu(texts, job.references)
        print(f"BLEU = {metrics['bleu']:.2f} (sacrebleu corpus BLEU, {len(texts)} sentences)", file=sys.stderr)
    progress(job.args.quiet, job.rank, f"{len(outputs)} requests, {new_tokens} tokens in {seconds:.2f}s")
    if job.args.run_dir is not None:
        track(job, texts, metrics, rebalancer.history if rebalancer is not None else None)


def save_load_history(recorder: LoadRecorder, job: Job) -> None:
    """--record-trace: the group's per-call expert counts, written by rank 0 (gathering them is a collective)."""
    counts = {name: counts_CE.numpy() for name, counts_CE in recorder.gather().items()}
    if job.rank == 0:
        source = f"served {job.export.path} ({job.mode}, {len(job.requests)} requests, {job.world} ranks)"
        LoadHistory(counts, job.export.model_config.num_experts, source).save(job.args.record_trace)
        progress(
            job.args.quiet, job.rank, f"expert loads of {len(counts)} MoE layers written to {job.args.record_trace}"
        )


def moe_figures(engine: Engine) -> dict[str, float]:
    """The dropped fraction of each MoE layer and of all of them, over the whole group (a collective)."""
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


def write_results(job: Job, texts: list[str], out: IO[str]) -> None:
    pairs = zip(job.lines, texts, strict=True)
    body = "".join(format_output(line, text, job.args.format) + "\n" for line, text in pairs)
    if job.args.output is None:
        out.write(body)
        out.flush()
        return
    try:
        write_atomic(job.args.output, body)
    except OSError as err:  # a read-only or full file system: one line, not a traceback
        raise PipelineError(f"cannot write --output {job.args.output}: {describe_os_error(err)}") from None
    record_written(job.args.output)  # so that a later --force may replace it (and nothing else)


def track(job: Job, texts: list[str], metrics: dict[str, float], refits: list[dict] | None = None) -> None:
    """Rank 0: the run's figures and a table of every request with its output, under --run-dir."""
    run = NamedRun(
        f"{job.export.path.name}-{job.args.policy}", {"export": str(job.export.path), **flag_record(job.args)}
    )
    with Tracker(run, job.args.run_dir, job.mode, is_main=job.rank == 0) as tracker:
        tracker.log(metrics, step=0)
        rows = [[i, line, text] for i, (line, text) in enumerate(zip(job.lines, texts, strict=True))]
        columns = ["index", "input", "output"]
        if job.references is not None:
            columns.append("reference")
            rows = [row + [ref] for row, ref in zip(rows, job.references, strict=True)]
        tracker.log_table("outputs", columns, rows)
        if refits:
            columns = ["step", "layer", "balancedness", "fitted_balancedness", "moves"]
            tracker.log_table("placement_refits", columns, [[r[c] for c in columns] for r in refits])
        tracker.summary(**metrics)


__all__ = ["Job", "build_parser", "main", "parse_args", "prepare"]
