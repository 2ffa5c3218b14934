"""Convert a megatron training checkpoint (LM or MT, trained at any EP degree) into a verified, EP-agnostic export
directory: config.json, tokenizer.model, dense.safetensors, one safetensors file per (layer, expert), manifest.json.

    python -m pipeline.convert                      the latest checkpoint of runs/lm-tiny -> exports/lm-tiny-step<N>
    python -m pipeline.convert --ckpt runs/mt-tiny --out exports/mt-tiny
    python -m pipeline.convert --ckpt runs/lm-tiny/checkpoints/step_000200 --force

--verify (the default) runs a validation batch through megatron-core and through the export and fails the conversion
if they differ by more than 1e-4 relative (max|a - b| / max|a|, fp32). The export is written to a temporary directory
and renamed when complete: a failed conversion leaves nothing at the output path, and an existing export is replaced
only with --force.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.errors import PipelineError

DEFAULT_RUN = "runs/lm-tiny"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.convert", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--ckpt",
        type=Path,
        help=f"a checkpoint directory (checkpoints/step_N) or a run directory: its latest checkpoint "
        f"(default {DEFAULT_RUN} in the repository)",
    )
    parser.add_argument("--out", type=Path, help="the export directory (default exports/<config name>-step<N>)")
    parser.add_argument("--force", action="store_true", help="replace an existing export at --out")
    parser.add_argument(
        "--verify",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="check the export's outputs against megatron-core on a validation batch (default: on)",
    )
    parser.add_argument(
        "--config",
        metavar="NAME",
        help="a config name or YAML path the checkpoint must match (same task and model shape); optional",
    )
    args = parser.parse_args(argv)
    try:
        from pipeline.convert import REPO, convert
        from pipeline.platform import quiet_known_warnings

        quiet_known_warnings()
        convert(args.ckpt or REPO / DEFAULT_RUN, args.out, force=args.force, verify=args.verify, config=args.config)
    except PipelineError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
