"""`python -m moe_infer.bench live`: the paper's techniques under live traffic. The same arrival trace of held-out
prompts, at several offered loads, sent to one HTTP server per engine variant (all started up front), in interleaved
rounds; the baseline is served twice, the second copy being the noise control; and the batch CLI's throughput on
the same prompts, the offline reference for the server's at saturation.

    python -m moe_infer.bench live --export exports/lm-tiny --input prompts.txt --nproc 2 \\
        --variant static="--policy static" --variant buffering="--expert-slots 2" \\
        --variant greedy="--placement greedy.json" --request-rates 0.4x,0.8x,inf --max-concurrency 64 \\
        --num-prompts 64 --max-tokens 32 --batch-size 32 --repeats 5 --offline --out live.json --run-dir DIR

Servers: launch/infer.py --mode serve under torchrun with --nproc ranks of --threads threads each (one plain process
for --nproc 1), the baseline's engine flags (`--baseline`, default: dynamic gating, contiguous placement, every
expert resident) plus each variant's. An idle server's ranks wait blocked, using no CPU, so the others are measured
alone. Rates: requests/s, `inf` (every request at once: saturation, with --max-concurrency in flight), or `Fx`: F
times the baseline's request throughput at saturation, measured first. A round sends the trace at every rate to
every server, each round starting one server later; --repeats rounds. The offline reference (--offline) runs the
batch CLI (launch/infer.py, the same ranks, prompts, max tokens, --batch-size and engine flags) once per round.

Figures per variant and rate: the median over rounds, with its min-max, of output tokens/s, requests/s and the p50 /
p99 of TTFT, TPOT and E2E latency; each variant's throughput and latencies over the baseline's, "within noise" when
their min-max ranges overlap. Checks (temperature 0): every variant's texts equal the baseline's (a dropless one
must; static gating may drop), and the server's equal the batch CLI's. Output: a table, --out JSON (what the report
reads: its "serving under load" section) and a W&B run in --run-dir.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import shlex
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from moe_infer.bench.load import add_load_arguments, read_prompts, request_extra, run_load, summarize
from moe_infer.bench.results import Results, check_result_paths
from moe_infer.bench.servers import REPO, ServerProcess, serve_command
from pipeline.errors import ConfigError

FIGURES = (
    "out_tok_s", "req_s", "ttft_p50_ms", "ttft_p99_ms", "tpot_p50_ms", "tpot_p99_ms", "e2el_p50_ms", "e2el_p99_ms",
)  # fmt: skip
NOISE = "baseline again"
# The --out JSON's (_document), by which a previous one is recognised and replaced.
RESULT_KEYS = (
    "export", "model", "ranks", "threads", "settings", "saturation_req_s", "rates", "variants", "rows", "summary",
    "offline_tok_s", "saturation", "same_texts_as_baseline",
)  # fmt: skip


@dataclass
class Variant:
    name: str
    flags: list[str]
    server: ServerProcess | None = None


def parse_variant(text: str) -> tuple[str, str]:
    name, sep, flags = text.partition("=")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f'expected NAME="engine flags", got {text!r}')
    return name.strip(), flags


def parse_rate(text: str, saturation: float | None) -> float:
    """`inf`, a number of requests/s, or `Fx`: F times the baseline's saturated request rate."""
    if text == "inf":
        return math.inf
    if text.endswith("x"):
        return float(text[:-1]) * saturation
    return float(text)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--export", type=Path, required=True, help="the export to serve")
    parser.add_argument("--nproc", type=int, default=2, help="ranks per server: the EP degree (default 2)")
    parser.add_argument("--threads", type=int, default=1, help="threads per rank (default 1)")
    parser.add_argument("--baseline", default="", help="engine flags of the baseline (default: the engine's own)")
    parser.add_argument(
        "--variant", type=parse_variant, action="append", default=[], help='NAME="engine flags" beside the baseline'
    )
    parser.add_argument("--request-rates", default="0.4x,0.8x,inf", help="offered loads (default 0.4x,0.8x,inf)")
    parser.add_argument("--batch-size", type=int, default=32, help="rows per rank, servers and batch CLI (default 32)")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds (default 5)")
    parser.add_argument("--offline", action="store_true", help="also time the batch CLI on the same prompts")
    add_load_arguments(parser)
    parser.add_argument("--out", type=Path, help="the figures (JSON)")
    parser.add_argument("--run-dir", type=Path, help="W&B run (offline by default) and its files")


def _env(threads: int) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(REPO)}


def _max_tokens_flag(export: Path) -> str:
    config = json.loads((export / "config.json").read_text())
    return "--max-len" if config["architecture"] == "encoder-decoder" else "--max-new-tokens"


def run_offline(args: argparse.Namespace, prompts_file: Path) -> tuple[float, list[str]]:
    """The batch CLI on the prompts: (output tokens/s of its serving alone, its texts one per line)."""
    with tempfile.TemporaryDirectory(prefix="moe-live-offline-") as tmp:
        out, run_dir = Path(tmp) / "out.txt", Path(tmp) / "run"
        launcher = [sys.executable] if args.nproc == 1 else [sys.executable, "-m", "torch.distributed.run"]
        if args.nproc > 1:
            launcher += ["--standalone", f"--nproc-per-node={args.nproc}"]
        command = [*launcher, str(REPO / "launch/infer.py"), "--export", str(args.export), "--input", str(prompts_file)]
        command += [_max_tokens_flag(args.export), str(args.max_tokens), "--batch-size", str(args.batch_size)]
        command += ["--output", str(out), "--run-dir", str(run_dir), "--quiet", *shlex.split(args.baseline)]
        env = {**_env(args.threads), "WANDB_MODE": "disabled"}
        done = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True)
        if done.returncode != 0:
            raise ConfigError("--offline", f"the batch CLI failed ({done.returncode}):\n{done.stderr[-3000:]}")
        summary = json.loads((run_dir / "summary.json").read_text())
        return summary["output_tokens_per_s"], out.read_text(encoding="utf-8").split("\n")[:-1]


def _texts(results) -> list[str]:
    """As the batch CLI writes them: one line each (newlines as the two characters backslash-n)."""
    return [r.text.replace("\r", "\\r").replace("\n", "\\n") for r in results]


def _spread(values: list[float]) -> dict[str, float]:
    return {"median": float(np.median(values)), "min": float(min(values)), "max": float(max(values))}


def aggregate(rows: list[dict[str, Any]], variants: list[str]) -> list[dict[str, Any]]:
    """Per variant and rate: each figure's median and min-max over rounds, and its ratio to the baseline's."""
    out = []
    keys = list(dict.fromkeys((r["variant"], r["rate_label"]) for r in rows))
    for variant, rate in keys:
        mine = [r for r in rows if (r["variant"], r["rate_label"]) == (variant, rate)]
        base = [r for r in rows if (r["variant"], r["rate_label"]) == (variants[0], rate)]
        entry: dict[str, Any] = {
            "variant": variant,
            "rate": rate,
            "offered_req_s": mine[0]["rate"],
            "rounds": len(mine),
        }
        for figure in FIGURES:
            values = [r[figure] for r in mine if r[figure] is not None]
            reference = [r[figure] for r in base if r[figure] is not None]
            if not values or not reference:
                continue
            entry[figure] = _spread(values)
            ref = _spread(reference)
            entry[f"{figure}_x_baseline"] = entry[figure]["median"] / ref["median"] if ref["median"] else None
            overlap = entry[figure]["min"] <= ref["max"] and ref["min"] <= entry[figure]["max"]
            entry[f"{figure}_within_noise"] = bool(overlap)
        out.append(entry)
    return out


async def _warm_up(variants: list[Variant], model: str, prompts: list[str], args) -> None:
    for v in variants:  # the first requests pay for allocations: not part of any figure
        await run_load(v.server.url, model, prompts[:8], math.inf, max_tokens=4, extra=request_extra(args))


def main(args: argparse.Namespace) -> int:
    inputs = {"--input": args.input, "--export": args.export}
    check_result_paths(args.out, args.run_dir, "live-bench result", RESULT_KEYS, inputs)
    prompts = read_prompts(args.input, args.num_prompts)
    model = args.export.name
    variants = [Variant("baseline", []), Variant(NOISE, [])]
    variants += [Variant(name, shlex.split(flags)) for name, flags in args.variant]
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    rows: list[dict[str, Any]] = []
    offline: list[float] = []
    checks: dict[str, Any] = {}
    prompts_file = Path(tempfile.mkstemp(prefix="moe-live-prompts-", suffix=".txt")[1])
    prompts_file.write_text("\n".join(prompts) + "\n", encoding="utf-8")
    # SIGTERM (and SIGINT, which a background job ignores) end the bench through `finally`: the servers go too.
    previous = signal.signal(signal.SIGTERM, _exit_on_signal)
    try:
        for v in variants:  # one server each, started up front (idle ones use no CPU)
            flags = [str(args.export), "--batch-size", str(args.batch_size), "--quiet", *shlex.split(args.baseline)]
            command = serve_command([*flags, *v.flags, "--served-model-name", model], args.nproc)
            print(f"live: starting {v.name}: {' '.join(command)}", file=sys.stderr, flush=True)
            v.server = ServerProcess(command, _env(args.threads))
        asyncio.run(_warm_up(variants, model, prompts, args))
        saturation = None
        if any(r.endswith("x") for r in args.request_rates.split(",")):
            done, seconds = asyncio.run(
                run_load(variants[0].server.url, model, prompts, math.inf, args.burstiness, args.max_concurrency,
                         args.max_tokens, args.seed, request_extra(args))
            )  # fmt: skip
            saturation = summarize(done, seconds, math.inf, {})["req_s"]
        rates = [(label, parse_rate(label, saturation)) for label in args.request_rates.split(",")]
        texts: dict[str, list[str]] = {}
        with Results(f"live-{model}", settings, args.run_dir, "live", json_path=args.out) as results:
            for round_ in range(args.repeats):
                if args.offline:
                    tok_s, offline_texts = run_offline(args, prompts_file)
                    offline.append(tok_s)
                    checks.setdefault("offline_texts", offline_texts)
                for label, rate in rates:
                    order = variants[round_ % len(variants) :] + variants[: round_ % len(variants)]
                    for v in order:
                        done, seconds = asyncio.run(
                            run_load(v.server.url, model, prompts, rate, args.burstiness, args.max_concurrency,
                                     args.max_tokens, args.seed, request_extra(args))
                        )  # fmt: skip
                        row = summarize(done, seconds, rate, {})
                        row.update(variant=v.name, rate_label=label, round=round_)
                        rows.append(row)
                        texts.setdefault(v.name, _texts(done))
                        latency = (  # none without streaming (--disable-stream)
                            f", TTFT p50 {row['ttft_p50_ms']:.0f} ms, TPOT p50 {row['tpot_p50_ms']:.1f} ms"
                            if row["ttft_p50_ms"] is not None and row["tpot_p50_ms"] is not None
                            else f", E2E p50 {row['e2el_p50_ms'] or 0:.0f} ms"
                        )
                        print(
                            f"live: round {round_ + 1}/{args.repeats} {label} {v.name}: {row['out_tok_s']:.0f} "
                            f"tok/s{latency}, {row['failed']} failed",
                            file=sys.stderr,
                            flush=True,
                        )
                        results.row(
                            {f"{v.name}/{label}/{k}": x for k, x in row.items() if isinstance(x, float)}, len(rows)
                        )
                doc = _document(args, model, saturation, rates, rows, variants, offline, texts, checks)
                results.save(doc)
            summary = doc["summary"]
            columns = ["variant", "rate", *FIGURES]
            table_rows = [[s["variant"], s["rate"], *(s.get(f, {}).get("median") for f in FIGURES)] for s in summary]
            results.table("live", columns, table_rows, **doc["saturation"])
            results.print(_table(columns, table_rows, doc), sys.stdout)
    finally:
        for v in variants:
            if v.server is not None:
                v.server.kill()
        prompts_file.unlink(missing_ok=True)
        signal.signal(signal.SIGTERM, previous)
    failed = sum(r["failed"] for r in rows)
    return 0 if failed == 0 else 1


def _exit_on_signal(signum, frame) -> None:
    raise SystemExit(128 + signum)


def _document(args, model, saturation, rates, rows, variants, offline, texts, checks) -> dict[str, Any]:
    names = [v.name for v in variants]
    summary = aggregate(rows, names)
    base = texts.get("baseline", [])
    same = {name: texts[name] == base for name in names if name in texts}
    sat = {}
    inf_rows = [r for r in rows if r["rate_label"] == "inf" and r["variant"] in ("baseline", NOISE)]
    if offline and inf_rows:
        server = _spread([r["out_tok_s"] for r in inf_rows])
        sat = {
            "server_tok_s": server["median"],
            "server_tok_s_min": server["min"],
            "server_tok_s_max": server["max"],
            "offline_tok_s": float(np.median(offline)),
            "offline_tok_s_min": float(min(offline)),
            "offline_tok_s_max": float(max(offline)),
            "server_over_offline": server["median"] / float(np.median(offline)),
        }
    if "offline_texts" in checks:
        same["batch CLI"] = checks["offline_texts"] == base
    return {
        "export": str(args.export),
        "model": model,
        "ranks": args.nproc,
        "threads": args.threads,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "saturation_req_s": saturation,
        "rates": [{"label": label, "req_s": None if math.isinf(r) else r} for label, r in rates],
        "variants": [{"name": v.name, "flags": " ".join(v.flags)} for v in variants],
        "rows": rows,
        "summary": summary,
        "offline_tok_s": offline,
        "saturation": sat,
        "same_texts_as_baseline": same,
    }


def _table(columns: list[str], rows: list[list[Any]], doc: dict[str, Any]) -> str:
    def cell(v):
        return "-" if v is None else f"{v:.1f}" if isinstance(v, float) else str(v)

    lines = ["  ".join(columns), *("  ".join(cell(v) for v in row) for row in rows)]
    sat = doc["saturation"]
    if sat:
        lines.append(
            f"saturation: server {sat['server_tok_s']:.0f} tok/s ({sat['server_tok_s_min']:.0f}-"
            f"{sat['server_tok_s_max']:.0f}), batch CLI {sat['offline_tok_s']:.0f} ({sat['offline_tok_s_min']:.0f}-"
            f"{sat['offline_tok_s_max']:.0f}): x{sat['server_over_offline']:.2f}"
        )
    lines.append(f"same texts as the baseline: {doc['same_texts_as_baseline']}")
    return "\n".join(lines)
