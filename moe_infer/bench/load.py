"""`python -m moe_infer.bench load`: a load generator for the HTTP server (launch/infer.py --mode serve), after
vLLM's `vllm bench serve` and SGLang's `bench_serving`.

    python -m moe_infer.bench load --url http://127.0.0.1:8000 --input prompts.txt --num-prompts 64 \\
        --request-rate 4 --burstiness 1 --max-concurrency 64 --max-tokens 32 --out load.json [--run-dir DIR]

An async HTTP client (aiohttp: a third of httpx's CPU per streamed token, measured) sends one streamed completion
(`--disable-stream`: a plain one) per prompt (`--input`: one per line, cycled to `--num-prompts`) at arrival times
drawn from a gamma process of `--request-rate` requests per second (`--burstiness` 1 is Poisson, < 1 burstier, > 1
more regular; `inf`: all at once), at most `--max-concurrency` in flight. The trace (arrival times and prompt order)
depends only on `--seed`, so two runs, or two servers, get the same one. Several rates (`--request-rate 2,4,inf`) run
one after another against the same server.

Per request: TTFT (send -> first text), ITL (between text chunks), TPOT ((end - first text) / (tokens - 1)), E2E
(send -> [DONE]; plain: send -> the answer, and no TTFT, ITL or TPOT), output tokens (the server's usage). Per rate:
request and token throughput over the run's span, mean / p50 / p99 of each latency, goodput (requests per second
meeting every SLO of `--goodput ttft:MS tpot:MS e2el:MS`), and the errors. Output: a table on stdout, `--out` JSON,
and a W&B run in `--run-dir` (offline by default).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import aiohttp
import numpy as np

from moe_infer.bench.results import Results, check_result_paths
from moe_infer.serve.flags import positive_float, positive_int
from pipeline.errors import ConfigError

METRICS = ("ttft", "tpot", "itl", "e2el")
RESULT_KEYS = ("url", "model", "settings", "rows")  # the --out JSON's, by which a previous one is recognised
COLUMNS = [
    "rate", "completed", "failed", "seconds", "req_s", "out_tok_s", "total_tok_s", "goodput_req_s", "ttft_p50_ms",
    "ttft_p99_ms", "tpot_p50_ms", "tpot_p99_ms", "itl_p50_ms", "itl_p99_ms", "e2el_p50_ms", "e2el_p99_ms",
]  # fmt: skip


@dataclass
class RequestResult:
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft: float | None = None  # seconds
    itl: list[float] = field(default_factory=list)
    e2el: float = 0.0
    text: str = ""
    error: str | None = None

    @property
    def tpot(self) -> float | None:
        if self.ttft is None or self.output_tokens < 2:
            return None
        return (self.e2el - self.ttft) / (self.output_tokens - 1)


def parse_rates(text: str) -> list[float]:
    rates = []
    for part in text.split(","):
        try:
            rate = math.inf if part.strip() == "inf" else float(part)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected requests/s (a number > 0, or inf), got {part!r}") from None
        if not rate > 0:
            raise argparse.ArgumentTypeError(f"a request rate must be > 0 (or inf), got {part!r}")
        rates.append(rate)
    return rates


def parse_goodput(items: list[str]) -> dict[str, float]:
    """["ttft:500", "tpot:50"] -> {"ttft": 0.5, "tpot": 0.05} (seconds)."""
    slos = {}
    for item in items:
        name, _, ms = item.partition(":")
        if name not in ("ttft", "tpot", "e2el"):
            raise ConfigError("--goodput", f"{item!r}: expected ttft:MS, tpot:MS or e2el:MS")
        try:
            slos[name] = float(ms) / 1000
        except ValueError:
            raise ConfigError("--goodput", f"{item!r}: the limit is milliseconds, a number") from None
    return slos


def arrival_times(n: int, rate: float, burstiness: float, seed: int) -> list[float]:
    """Seconds from the start at which each request is sent: gamma gaps of mean 1 / rate (shape `burstiness`)."""
    if math.isinf(rate):
        return [0.0] * n
    gaps = np.random.default_rng(seed).gamma(burstiness, 1.0 / (rate * burstiness), size=n)
    return np.concatenate(([0.0], np.cumsum(gaps)[:-1])).tolist()


async def _one(session: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> RequestResult:
    result, start = RequestResult(), time.perf_counter()
    last = start
    try:
        async with session.post(url, json=body) as response:
            if response.status != 200:
                result.error = f"HTTP {response.status}: {(await response.text())[:200]}"
                return result
            if not body["stream"]:  # one answer: no first-token time, no gaps
                answer = await response.json()
                result.text = "".join(c["text"] for c in answer["choices"])
                result.prompt_tokens = answer["usage"]["prompt_tokens"]
                result.output_tokens = answer["usage"]["completion_tokens"]
                result.e2el = time.perf_counter() - start
                return result
            pending = b""
            # Whatever the socket has, at once (not a line per await: the client shares the machine's cores with
            # the server it measures); the events that came in one read share its arrival time.
            async for data in response.content.iter_any():
                now = time.perf_counter()
                *events, pending = (pending + data).split(b"\n\n")
                for event in events:
                    line = event.decode("utf-8").strip()
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        result.error = chunk["error"].get("message", "error")
                        return result
                    if chunk.get("usage"):
                        result.prompt_tokens = chunk["usage"]["prompt_tokens"]
                        result.output_tokens = chunk["usage"]["completion_tokens"]
                    text = "".join(c["text"] for c in chunk["choices"])
                    if text:
                        if result.ttft is None:
                            result.ttft = now - start
                        else:
                            result.itl.append(now - last)
                        last = now
                        result.text += text
        result.e2el = time.perf_counter() - start
    except (aiohttp.ClientError, TimeoutError) as err:
        result.error = f"{type(err).__name__}: {err}"
    return result


async def run_load(
    url: str,
    model: str,
    prompts: list[str],
    rate: float,
    burstiness: float = 1.0,
    max_concurrency: int | None = None,
    max_tokens: int = 32,
    seed: int = 0,
    extra: dict[str, Any] | None = None,
) -> tuple[list[RequestResult], float]:
    """Send every prompt on the trace; return each one's result (in prompt order) and the span in seconds."""
    times = arrival_times(len(prompts), rate, burstiness, seed)
    limit = asyncio.Semaphore(max_concurrency or len(prompts))
    endpoint = f"{url.rstrip('/')}/v1/completions"
    base = {"model": model, "max_tokens": max_tokens, "stream": True, **(extra or {})}
    if base["stream"]:
        base["stream_options"] = {"include_usage": True}
    timeout, connector = aiohttp.ClientTimeout(total=3600), aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        start = time.perf_counter()

        async def send(prompt: str, at: float) -> RequestResult:
            await asyncio.sleep(max(0.0, start + at - time.perf_counter()))
            async with limit:
                return await _one(session, endpoint, {**base, "prompt": prompt})

        results = await asyncio.gather(*(send(p, t) for p, t in zip(prompts, times, strict=True)))
        return list(results), time.perf_counter() - start


def summarize(results: list[RequestResult], seconds: float, rate: float, slos: dict[str, float]) -> dict[str, Any]:
    done = [r for r in results if r.error is None]
    values = {
        "ttft": [r.ttft for r in done if r.ttft is not None],
        "tpot": [r.tpot for r in done if r.tpot is not None],
        "itl": [gap for r in done for gap in r.itl],
        "e2el": [r.e2el for r in done],
    }
    out_tokens, prompt_tokens = sum(r.output_tokens for r in done), sum(r.prompt_tokens for r in done)
    good = [r for r in done if all((getattr(r, k) or 0.0) <= limit for k, limit in slos.items())]
    row: dict[str, Any] = {
        "rate": "inf" if math.isinf(rate) else rate,
        "completed": len(done),
        "failed": len(results) - len(done),
        "seconds": seconds,
        "req_s": len(done) / seconds if seconds else 0.0,
        "out_tok_s": out_tokens / seconds if seconds else 0.0,
        "total_tok_s": (out_tokens + prompt_tokens) / seconds if seconds else 0.0,
        "goodput_req_s": len(good) / seconds if seconds and slos else None,
        "output_tokens": out_tokens,
        "prompt_tokens": prompt_tokens,
    }
    for name, xs in values.items():
        ms = np.array(xs) * 1000 if xs else None
        row[f"{name}_mean_ms"] = float(ms.mean()) if ms is not None else None
        row[f"{name}_p50_ms"] = float(np.percentile(ms, 50)) if ms is not None else None
        row[f"{name}_p99_ms"] = float(np.percentile(ms, 99)) if ms is not None else None
    row["errors"] = sorted({r.error for r in results if r.error})[:5]
    return row


def served_model(url: str) -> str:
    """The name /v1/models lists first."""
    import urllib.request

    try:
        with urllib.request.urlopen(f"{url.rstrip('/')}/v1/models", timeout=30) as response:
            return json.loads(response.read())["data"][0]["id"]
    except (OSError, ValueError, KeyError, IndexError) as err:
        raise ConfigError("--url", f"cannot read the served model from {url}/v1/models: {err}") from None


def read_prompts(path: Path, n: int | None) -> list[str]:
    try:
        lines = [line for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError("--input", f"cannot read {path}: {err}") from None
    if not lines:
        raise ConfigError("--input", f"{path} has no prompts: one per line expected")
    n = n or len(lines)
    return [lines[i % len(lines)] for i in range(n)]


def add_load_arguments(parser: argparse.ArgumentParser) -> None:
    """The trace and the requests (shared with the live-traffic bench, moe_infer.bench.live)."""
    parser.add_argument("--input", type=Path, required=True, help="prompts, one per line (cycled to --num-prompts)")
    parser.add_argument("--num-prompts", type=positive_int, help="requests per rate (default: the lines of --input)")
    parser.add_argument("--burstiness", type=positive_float, default=1.0, help="gamma shape of the gaps: 1 is Poisson")
    parser.add_argument("--max-concurrency", type=positive_int, help="requests in flight at most (default: no limit)")
    parser.add_argument("--max-tokens", type=positive_int, default=32, help="max_tokens of every request (default 32)")
    parser.add_argument("--temperature", type=float, default=0.0, help="temperature of every request (default 0)")
    parser.add_argument("--ignore-eos", action="store_true", help="every request runs to --max-tokens")
    parser.add_argument(
        "--disable-stream",
        action="store_true",
        help="plain completions instead of streamed ones (as SGLang's bench_serving): the client and the server's "
        "front end do one response per request instead of one event per token; TTFT, TPOT and ITL are not measured",
    )
    parser.add_argument("--seed", type=int, default=0, help="the arrival trace's seed (default 0)")
    parser.add_argument("--goodput", nargs="*", default=[], help="SLOs in ms for goodput: ttft:500 tpot:50 e2el:5000")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", required=True, help="the server, e.g. http://127.0.0.1:8000")
    parser.add_argument("--model", help="the model name to send (default: the one /v1/models lists)")
    parser.add_argument("--request-rate", type=parse_rates, default=[math.inf], help="requests/s, or inf; a list")
    add_load_arguments(parser)
    parser.add_argument("--out", type=Path, help="write the figures here (JSON)")
    parser.add_argument("--run-dir", type=Path, help="W&B run (offline by default) and its files here")


def request_extra(args: argparse.Namespace) -> dict[str, Any]:
    extra = {"temperature": args.temperature, **({"ignore_eos": True} if args.ignore_eos else {})}
    return {**extra, "stream": False} if args.disable_stream else extra


def table(rows: list[dict[str, Any]]) -> str:
    def cell(v):
        return "-" if v is None else f"{v:.1f}" if isinstance(v, float) else str(v)

    lines = ["  ".join(COLUMNS)]
    lines += ["  ".join(cell(row.get(c)) for c in COLUMNS) for row in rows]
    return "\n".join(lines)


def main(args: argparse.Namespace, out: IO[str] | None = None) -> int:
    out = out or sys.stdout
    check_result_paths(args.out, args.run_dir, "load-generator result", RESULT_KEYS, {"--input": args.input})
    slos = parse_goodput(args.goodput)
    prompts = read_prompts(args.input, args.num_prompts)
    model = args.model or served_model(args.url)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    rows = []
    with Results(f"load-{model}", settings, args.run_dir, "load", json_path=args.out) as results:
        for step, rate in enumerate(args.request_rate):
            done, seconds = asyncio.run(
                run_load(args.url, model, prompts, rate, args.burstiness, args.max_concurrency, args.max_tokens,
                         args.seed, request_extra(args))
            )  # fmt: skip
            rows.append(summarize(done, seconds, rate, slos))
            results.row({k: v for k, v in rows[-1].items() if isinstance(v, int | float)}, step=step)
            results.save({"url": args.url, "model": model, "settings": settings, "rows": rows})
        results.table("load", COLUMNS, [[r.get(c) for c in COLUMNS] for r in rows])
        results.print(table(rows), out)
    return 0 if all(r["failed"] == 0 for r in rows) else 1


__all__ = ["RequestResult", "add_arguments", "arrival_times", "main", "run_load", "summarize"]
