"""`python -m moe_infer.bench serve-demo`: the HTTP server shown end to end (the last step of `make demo`).

    python -m moe_infer.bench serve-demo --export exports/demo-lm-tiny --nproc 2

Starts `launch/infer.py --mode serve` on the export (torchrun, --nproc ranks), sends a few requests (a batch of
prompts, then one streamed), prints one completion and an excerpt of /metrics, and stops the server with SIGTERM to
rank 0 (it drains and every rank exits 0).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import urllib.request
from pathlib import Path

from moe_infer.bench.servers import REPO, ServerProcess, serve_command

PROMPTS = ["ROMEO:", "JULIET:", "First Witch:", "HAMLET: To be"]
METRICS = (
    "moe_time_to_first_token_seconds_count",
    "moe_time_to_first_token_seconds_sum",
    "moe_generation_tokens_total",
    "moe_request_success_total",
    "moe_layer_expert_pairs_total",
    "moe_layer_all_to_all_bytes_total",
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--export", type=Path, required=True, help="an LM export")
    parser.add_argument("--nproc", type=int, default=2, help="ranks (default 2)")
    parser.add_argument("--max-tokens", type=int, default=32)


def _post(url: str, body: dict) -> urllib.request.Request:
    data = json.dumps(body).encode()
    return urllib.request.Request(f"{url}/v1/completions", data, {"Content-Type": "application/json"})


def main(args: argparse.Namespace) -> int:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    command = serve_command([str(args.export), "--quiet"], args.nproc)
    print(f"serve-demo: {' '.join(command)}", flush=True)
    with ServerProcess(command, env) as server:
        model = args.export.name
        print(f"serve-demo: {model} is up at {server.url}", flush=True)
        body = {"model": model, "prompt": PROMPTS, "max_tokens": args.max_tokens, "temperature": 0}
        with urllib.request.urlopen(_post(server.url, body), timeout=300) as response:
            completion = json.loads(response.read())
        print(f"serve-demo: POST /v1/completions with {len(PROMPTS)} prompts -> usage {completion['usage']}")
        print(f"serve-demo: {PROMPTS[0]!r} -> {completion['choices'][0]['text']!r}", flush=True)
        print(f"serve-demo: streamed, {PROMPTS[3]!r} ->", end=" ", flush=True)
        stream = {**body, "prompt": PROMPTS[3], "stream": True, "temperature": 0.8, "seed": 1}
        with urllib.request.urlopen(_post(server.url, stream), timeout=300) as response:
            for raw in response:
                line = raw.decode().strip()
                if line.startswith("data: {"):
                    print("".join(c["text"] for c in json.loads(line[6:])["choices"]), end="", flush=True)
        print()
        with urllib.request.urlopen(f"{server.url}/metrics", timeout=60) as response:
            metrics = response.read().decode().splitlines()
        excerpt = [line for prefix in METRICS for line in [m for m in metrics if m.startswith(prefix)][:4]]
        print("serve-demo: GET /metrics (excerpt)\n  " + "\n  ".join(excerpt), flush=True)
        os.kill(server.rank(0).pid, signal.SIGTERM)  # rank 0 drains the server; every rank (so torchrun) exits 0
        code = server.wait(60)
        print(f"serve-demo: SIGTERM to rank 0: the server drained and exited with status {code}", flush=True)
    return 0 if code == 0 else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    add_arguments(parser)
    sys.exit(main(parser.parse_args()))
