"""Serve an export: generate text (LM) or translate (MT), with expert parallelism; or benchmark it.

    python launch/infer.py --export exports/lm-tiny < prompts.txt                        one process
    deepspeed --num_gpus 2 launch/infer.py --export exports/lm-tiny --input prompts.txt
    torchrun --nproc-per-node 2 launch/infer.py --export exports/mt-tiny --input src.txt --references ref.txt
    python launch/infer.py --export exports/lm-tiny --mode bench --policies dynamic,static --max-batch 16
    torchrun --nproc-per-node 2 launch/infer.py --export exports/lm-tiny --mode serve --port 8000   HTTP server

Serving a file is moe_infer.serve.cli (flags: --help); `--mode serve` is the OpenAI-compatible HTTP server,
moe_infer.serve.server (flags: `--mode serve --help`). `--mode bench` and `--mode bench-serving` run the benchmarks
`python -m moe_infer.bench model` and `serving` with the other flags (their own: `python -m moe_infer.bench --help`).
"""

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run from a checkout without installing

from moe_infer.bench import infer_mode_argv  # noqa: E402
from moe_infer.serve import is_serve_mode  # noqa: E402
from moe_infer.serve.cli import main  # noqa: E402

if __name__ == "__main__":
    bench_argv = infer_mode_argv(sys.argv[1:])  # --mode bench | bench-serving: a benchmark, with its own flags
    if bench_argv is not None:
        from moe_infer.bench.cli import main as bench

        sys.exit(bench(bench_argv))
    if is_serve_mode(sys.argv[1:]):  # --mode serve: the HTTP server, with its own flags
        from moe_infer.serve.server import main as serve

        sys.exit(serve())
    sys.exit(main())
