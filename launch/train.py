"""Train a megatron-core MoE model with expert parallelism.

    torchrun --standalone --nproc_per_node 2 launch/train.py --config lm-tiny
    deepspeed --num_gpus 2 launch/train.py --config mt-tiny --set train.steps=100
    python launch/train.py --config lm-tiny --set parallel.ep_size=1      (one process)

Checkpoints, metrics and the W&B run go to runs/<config name>/ (or --run-dir). SIGINT/SIGTERM save a checkpoint
and exit; --resume continues from the latest checkpoint with the same data order.
"""

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run from a checkout without installing

from pipeline.config import add_override_argument, load_config  # noqa: E402
from pipeline.errors import PipelineError  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="a config name (lm-tiny) or a YAML path")
    add_override_argument(parser)
    parser.add_argument("--run-dir", type=Path, help="where checkpoints and metrics go (default runs/<config name>)")
    parser.add_argument("--resume", action="store_true", help="continue from the run directory's latest checkpoint")
    parser.add_argument(
        "--record-traces",
        metavar="SPLIT",
        choices=("valid", "test"),
        help="after training, record each token's selected experts on SPLIT (routing traces, .npz)",
    )
    # The deepspeed launcher passes --local_rank=N; the rank comes from the environment (LOCAL_RANK) either way.
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        if not cfg.trainable_here:
            raise PipelineError(
                f"{cfg.name} is the paper's shape, for planners and benchmarks: too large to train here"
            )
        run_dir = args.run_dir or REPO / "runs" / cfg.name
        from pipeline.platform import quiet_known_warnings
        from pipeline.train.loop import train

        quiet_known_warnings()

        summary = train(cfg, run_dir, resume=args.resume, trace_split=args.record_traces)
    except PipelineError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_rank() == 0:
        shown = {k: v for k, v in summary.items() if k not in ("examples", "bleu_signature")}
        print(json.dumps(shown, indent=2))
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
