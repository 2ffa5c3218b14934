"""Serve an export: generate text (LM), translate (MT) or benchmark the MoE policies, with expert parallelism.

    python launch/infer.py --export exports/lm-tiny < prompts.txt                        one process
    deepspeed --num_gpus 2 launch/infer.py --export exports/lm-tiny --input prompts.txt
    torchrun --nproc-per-node 2 launch/infer.py --export exports/mt-tiny --input src.txt --references ref.txt
    python launch/infer.py --export exports/lm-tiny --mode bench --policies dynamic,static --max-batch 16

Everything is in moe_infer.engine.cli (flags: --help) and moe_infer.engine.bench.
"""

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run from a checkout without installing

from moe_infer.engine.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
