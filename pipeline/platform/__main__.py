"""`python -m pipeline.platform`: say which device and backend this machine gets and which substitutes apply."""

import argparse
import sys

import torch

from pipeline.errors import exit_status
from pipeline.platform import (
    detect_platform,
    patch_deepspeed_for_cpu,
    patch_megatron_for_cpu,
    quiet_known_warnings,
    set_threads_per_rank,
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.platform",
        description="Print the device and backend picked here, threads per rank, and the CPU substitutes applied to "
        "megatron-core and DeepSpeed (none when CUDA is present).",
    )
    parser.add_argument("--prefer", choices=("auto", "cpu", "cuda"), default="auto", help="device preference")
    args = parser.parse_args(argv)
    quiet_known_warnings()
    return exit_status(show, args)


def show(args: argparse.Namespace) -> int:
    platform = detect_platform(args.prefer)
    threads = set_threads_per_rank()
    megatron = patch_megatron_for_cpu()
    deepspeed = patch_deepspeed_for_cpu()
    print(f"torch {torch.__version__}: device {platform.device}, backend {platform.backend}, {threads} thread(s)/rank")
    print(f"megatron-core substitutes: {', '.join(megatron) or 'none (CUDA present)'}")
    print(f"deepspeed substitutes: {', '.join(deepspeed) or 'none (CUDA present)'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
